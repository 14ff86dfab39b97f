//! Integration tests of forkscope-sidecar: the real sidecar binary over real HTTP, against real
//! forkscope-server and gunicorn processes, real signals and the real runtime directory.

mod api;
mod gunicorn;
mod leader;
mod metrics;
mod orphans;
mod profiles;
mod recycle;
mod requests;
mod unprivileged;
mod util;
