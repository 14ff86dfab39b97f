# gunicorn on Python 3.11, for the e2e tests of the sidecar in a gunicorn pod (not a forkscope
# image). scripts/images puts gunicorn (the version of tests/requirements.txt) and the
# `forkscope` wheel, installed with pip --target, in pylib/ of the build context: a plain
# gunicorn unless gunicorn.conf.py has `from forkscope.gunicorn import *`.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
COPY pylib /opt/pylib
ENV PYTHONPATH=/opt/pylib PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /app
ENTRYPOINT ["python3.11", "-m", "gunicorn"]
