# forkscope-server: the pre-fork WSGI server, on a Python 3.11 runtime (it embeds CPython
# through PyO3 and links libpython3.11.so.1.0, which any 3.11.x provides).
#
#   docker build -f images/server.Dockerfile -t local/forkscope-server:dev .
#
# BASE is the runtime image (a Python 3.11 with a shared libpython); add your application on
# top of it (`FROM local/forkscope-server:dev`, `COPY . /app`), or mount it (examples/app.yaml).
# BINARIES=prebuilt takes the binary from prebuilt/ in the build context instead of compiling
# it (scripts/images does that: it builds with cargo outside and reaches no registry).
ARG BASE=python:3.11-slim-bookworm
ARG RUST=rust:1-bookworm
ARG BINARIES=build

FROM ${RUST} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3.11-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN PYO3_PYTHON=python3.11 cargo build --release --locked -p forkscope-server \
    && install -D target/release/forkscope-server /out/forkscope-server

FROM scratch AS prebuilt
COPY prebuilt/forkscope-server /out/forkscope-server

FROM ${BINARIES} AS binaries

FROM ${BASE}
COPY --from=binaries /out/forkscope-server /usr/local/bin/forkscope-server
# The server runs the application as a non-root user; pods pick the UID (runAsUser) and share
# /run/forkscope with the sidecar through an emptyDir.
USER 10001:10001
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/forkscope-server"]
CMD ["--help"]
