//! Gunicorn-format error log and access log; both reopenable for log rotation (USR1).
