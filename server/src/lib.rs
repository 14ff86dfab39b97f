//! forkscope-server: a gunicorn-compatible pre-fork WSGI server that embeds CPython.
//!
//! # Layout
//!
//! - [`settings`]: THE settings table (CLI flags, env vars, `gunicorn.conf.py` names), and
//!   [`settings::config_file`], which evaluates a gunicorn-style Python config file.
//! - [`logging`]: the error log and the access log in gunicorn's formats, reopenable on USR1.
//! - [`listeners`]: parse `--bind` values and bind (or inherit) the listening sockets.
//! - [`leader`]: the single-threaded leader loop: signals, reaping, spawning workers in slots.
//! - [`worker`]: one worker process: event loop, connections, request dispatch.
//! - [`http`]: pure HTTP/1.x parsing and response framing; never touches a socket.
//! - [`wsgi`]: the bridge to the Python application (environ, start_response, wsgi.input).
//! - [`hooks`]: gunicorn's server hooks ([`hooks::Hook`]), called with gunicorn-shaped
//!   server/worker objects.
//! - [`python`]: interpreter start-up, imports, preload, fork hooks.
//! - [`profiler`]: the tracemalloc doorbell inside every worker.
//! - [`runtime_dir`]: this process' folder in the runtime directory shared with the sidecar.
//! - [`heartbeat`], [`slot_table`]: per-slot words shared by the leader and its workers.
//! - [`proctitle`]: the process titles `ps` shows (`forkscope-server: worker N [APP]`).
//! - [`panics`]: panics go to the error log and end only the worker that had them.
//! - [`failpoint`]: fault injection for the integration tests (debug builds only).

pub mod balance;
pub mod failpoint;
pub mod heartbeat;
pub mod hooks;
pub mod http;
pub mod leader;
pub mod listeners;
pub mod logging;
pub mod panics;
pub mod proctitle;
pub mod profiler;
pub mod python;
pub mod request_counts;
pub mod runtime_dir;
pub mod settings;
pub mod slot_table;
pub mod worker;
pub mod wsgi;

use std::ffi::OsString;
use std::process::ExitCode;

use pyo3::Python;

/// The whole program: settings, logging, Python, then the leader. `main` only calls this.
pub fn run(args: Vec<OsString>) -> ExitCode {
    leader::remember_start(&args);
    Python::initialize();
    let loaded = Python::attach(|py| settings::load(args, Some(py)));
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            if let Some(clap_err) = e.downcast_ref::<clap::Error>() {
                clap_err.exit();
            }
            eprintln!("Error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let settings = loaded.settings;
    if settings.print_config {
        print!("{}", settings.print_config());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = logging::init(&settings) {
        eprintln!("Error: cannot open the error log: {e:#}");
        return ExitCode::from(1);
    }
    panics::install_hook();
    for warning in settings.warnings() {
        log::warn!("{warning}");
    }
    match prepare_python(&settings) {
        Ok(()) => {}
        Err(e) => {
            log::error!("{e:#}");
            return ExitCode::from(1);
        }
    }
    if settings.check_config {
        return check_config(&settings);
    }
    match leader::Leader::new(settings, loaded.hooks) {
        Ok(leader) => leader.run(),
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(worker::WorkerExit::AppLoadError as u8)
        }
    }
}

/// `--chdir`, `-e KEY=VALUE` and the import path, in the order gunicorn applies them.
fn prepare_python(settings: &settings::Settings) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = &settings.chdir {
        std::env::set_current_dir(dir)
            .with_context(|| format!("cannot chdir to {}", dir.display()))?;
    }
    python::set_environ(&settings.raw_env_pairs())?;
    // The command line `run` was given (under the wheel, Python's `sys.argv`).
    let argv = leader::start::start()
        .argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    python::initialize(&python::PathSetup::from_env(
        argv,
        settings.pythonpath.as_deref(),
    ))
}

/// `--check-config`: the app must import; nothing is bound or forked.
fn check_config(settings: &settings::Settings) -> ExitCode {
    let Some(app) = &settings.wsgi_app else {
        log::error!("no application given");
        return ExitCode::from(1);
    };
    let result = python::AppSpec::parse(app)
        .and_then(|spec| Python::attach(|py| python::import_app(py, &spec).map(|_| ())));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(worker::WorkerExit::AppLoadError as u8)
        }
    }
}
