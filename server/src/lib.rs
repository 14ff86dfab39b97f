//! forkscope-server: a gunicorn-compatible pre-fork WSGI server that embeds CPython.
//!
//! # Layout
//!
//! - [`settings`]: THE settings table (CLI flags, env vars, `gunicorn.conf.py` names), and
//!   [`config_file`], which evaluates a gunicorn-style Python config file.
//! - [`logging`]: the error log and the access log in gunicorn's formats, reopenable on USR1.
//! - [`listeners`]: parse `--bind` values and bind (or inherit) the listening sockets.
//! - [`leader`]: the single-threaded leader loop: signals, reaping, spawning workers in slots.
//! - [`worker`]: one worker process: event loop, connections, request dispatch.
//! - [`http`]: pure HTTP/1.x parsing and response framing; never touches a socket.
//! - [`wsgi`]: the bridge to the Python application (environ, start_response, wsgi.input).
//! - [`python`]: interpreter start-up, imports, preload, fork hooks.
//! - [`profiler`]: the tracemalloc doorbell inside every worker.
//! - [`runtime_dir`]: this process' folder in the runtime directory shared with the sidecar.
//! - [`proctitle`]: the process titles `ps` shows (`forkscope-server: worker N [APP]`).

pub mod config_file;
pub mod http;
pub mod leader;
pub mod listeners;
pub mod logging;
pub mod proctitle;
pub mod profiler;
pub mod python;
pub mod runtime_dir;
pub mod settings;
pub mod worker;
pub mod wsgi;
