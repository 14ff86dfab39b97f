//! Evaluates a gunicorn-style Python config file (`-c gunicorn.conf.py`) into settings values and hooks.
