//! The WSGI (PEP 3333) bridge between a parsed request and the Python application.
