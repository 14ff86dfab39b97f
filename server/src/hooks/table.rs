//! The hook names as one enum, and the table of the hooks a config file defined.

use pyo3::prelude::*;

/// gunicorn's server hooks. A config file defines one as a global of its [`Hook::name`].
///
/// Arguments, as gunicorn passes them (`server` is the leader object, `worker` a worker
/// object with pid, age and slot): `on_starting(server)`, `on_reload(server)`,
/// `when_ready(server)`, `pre_fork(server, worker)`, `post_fork(server, worker)`,
/// `post_worker_init(worker)`, `worker_int(worker)`, `worker_abort(worker)`,
/// `pre_exec(server)`, `pre_request(worker, req)`, `post_request(worker, req, environ, resp)`
/// (always called with four: a file's two- or three-argument version is wrapped, as gunicorn
/// does), `child_exit(server, worker)`, `worker_exit(server, worker)`,
/// `nworkers_changed(server, new_value, old_value)`, `on_exit(server)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// In the leader, once, before anything else starts.
    OnStarting,
    /// In the leader on HUP, before the workers are replaced.
    OnReload,
    /// In the leader once the sockets are bound and workers are starting.
    WhenReady,
    /// In the leader just before a worker is forked.
    PreFork,
    /// In the new worker right after fork.
    PostFork,
    /// In the worker after the application is loaded.
    PostWorkerInit,
    /// In the worker on INT or QUIT.
    WorkerInt,
    /// In the worker on ABRT (timeout).
    WorkerAbort,
    /// In the leader just before it execs a new binary (USR2 upgrade).
    PreExec,
    /// In the worker before each request.
    PreRequest,
    /// In the worker after each request.
    PostRequest,
    /// In the leader after a worker exited.
    ChildExit,
    /// In the worker as it exits.
    WorkerExit,
    /// In the leader when the number of workers changes.
    NworkersChanged,
    /// In the leader just before it exits.
    OnExit,
}

impl Hook {
    /// Every hook, in gunicorn's order.
    pub const ALL: [Hook; 15] = [
        Hook::OnStarting,
        Hook::OnReload,
        Hook::WhenReady,
        Hook::PreFork,
        Hook::PostFork,
        Hook::PostWorkerInit,
        Hook::WorkerInt,
        Hook::WorkerAbort,
        Hook::PreExec,
        Hook::PreRequest,
        Hook::PostRequest,
        Hook::ChildExit,
        Hook::WorkerExit,
        Hook::NworkersChanged,
        Hook::OnExit,
    ];

    /// gunicorn's name: the config-file global and the setting name.
    pub fn name(self) -> &'static str {
        match self {
            Hook::OnStarting => "on_starting",
            Hook::OnReload => "on_reload",
            Hook::WhenReady => "when_ready",
            Hook::PreFork => "pre_fork",
            Hook::PostFork => "post_fork",
            Hook::PostWorkerInit => "post_worker_init",
            Hook::WorkerInt => "worker_int",
            Hook::WorkerAbort => "worker_abort",
            Hook::PreExec => "pre_exec",
            Hook::PreRequest => "pre_request",
            Hook::PostRequest => "post_request",
            Hook::ChildExit => "child_exit",
            Hook::WorkerExit => "worker_exit",
            Hook::NworkersChanged => "nworkers_changed",
            Hook::OnExit => "on_exit",
        }
    }

    /// The number of positional arguments gunicorn passes.
    pub fn arity(self) -> usize {
        match self {
            Hook::OnStarting
            | Hook::OnReload
            | Hook::WhenReady
            | Hook::PostWorkerInit
            | Hook::WorkerInt
            | Hook::WorkerAbort
            | Hook::PreExec
            | Hook::OnExit => 1,
            Hook::PreFork
            | Hook::PostFork
            | Hook::PreRequest
            | Hook::ChildExit
            | Hook::WorkerExit => 2,
            Hook::NworkersChanged => 3,
            Hook::PostRequest => 4,
        }
    }

    /// The hook named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|hook| hook.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The hooks a config file defined (none without a config file).
#[derive(Debug, Default)]
pub struct Hooks {
    by_hook: [Option<Py<PyAny>>; Hook::ALL.len()],
}

impl Hooks {
    /// The callable defined for `hook`.
    pub fn get(&self, hook: Hook) -> Option<&Py<PyAny>> {
        self.by_hook[hook.index()].as_ref()
    }

    /// Defines `hook`.
    pub fn set(&mut self, hook: Hook, callable: Py<PyAny>) {
        self.by_hook[hook.index()] = Some(callable);
    }

    /// A copy that shares the same Python callables.
    pub fn clone_ref(&self, py: Python<'_>) -> Hooks {
        Hooks {
            by_hook: std::array::from_fn(|i| self.by_hook[i].as_ref().map(|h| h.clone_ref(py))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_index_the_table() {
        for (i, hook) in Hook::ALL.into_iter().enumerate() {
            assert_eq!(hook.index(), i, "{hook:?} is out of order in Hook::ALL");
            assert_eq!(Hook::from_name(hook.name()), Some(hook));
        }
        assert_eq!(Hook::from_name("on_start"), None);
    }
}
