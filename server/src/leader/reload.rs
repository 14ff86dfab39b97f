//! HUP: re-read the configuration and, under `--preload`, import the application afresh in
//! the leader, so the workers forked next run the new code and settings (`Leader::reload`).
//!
//! Re-importing in place (the leader keeps its PID, its sockets and its children) works by
//! taking the application's own modules out of `sys.modules` and importing the app again: the
//! modules whose files live outside the Python installation (not in the standard library, not
//! in a `site-packages`). Libraries stay imported, which is what a code deploy expects and what
//! keeps C extensions (which cannot be imported twice) safe. If the new import fails, the old
//! modules go back into `sys.modules` and the old application keeps serving.
//!
//! The old application is unfrozen first (`gc.unfreeze()`), so an explicit collection after the
//! import frees it; the new one is frozen again for copy-on-write sharing.

use std::ffi::CStr;
use std::process::ExitCode;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::{HOOK_FAILED, Leader, signals, start};
use crate::heartbeat::MAX_SLOTS;
use crate::hooks::{Hook, Hooks, arg};
use crate::python::AppSpec;
use crate::settings::Settings;

const HELPERS: &CStr = c"
import gc, importlib, os, sys, sysconfig

def _installation_roots():
    roots = set()
    for name in ('stdlib', 'platstdlib', 'purelib', 'platlib'):
        for vars in (None, {'base': sys.base_prefix, 'platbase': sys.base_exec_prefix}):
            try:
                path = sysconfig.get_path(name, vars=vars) if vars else sysconfig.get_path(name)
            except Exception:
                continue
            if path:
                roots.add(os.path.realpath(path))
    return tuple(r.rstrip(os.sep) + os.sep for r in roots)

def app_modules():
    # The application's own modules: a source file outside the installation and outside
    # any site-packages / dist-packages folder.
    roots = _installation_roots()
    names = []
    for name, module in list(sys.modules.items()):
        if name == '__main__' or name.startswith('forkscope'):
            continue
        path = getattr(module, '__file__', None)
        if not isinstance(path, str):
            continue
        real = os.path.realpath(path)
        if real.startswith(roots) or os.sep + 'site-packages' + os.sep in real \\
                or os.sep + 'dist-packages' + os.sep in real:
            continue
        names.append(name)
    return names

def forget():
    gc.unfreeze()
    saved = {name: sys.modules.pop(name) for name in app_modules()}
    importlib.invalidate_caches()
    return saved

def restore(saved):
    for name in app_modules():
        sys.modules.pop(name, None)
    sys.modules.update(saved)
";

/// Imports the application again in the leader (see the module docs). On failure the old
/// modules are restored and the error (with the traceback) is returned; the caller keeps the
/// old application.
///
/// # Errors
/// The new import failed.
pub fn reimport(py: Python<'_>, spec: &AppSpec, freeze: bool) -> anyhow::Result<Py<PyAny>> {
    let helpers = PyModule::from_code(
        py,
        HELPERS,
        c"<forkscope reload helpers>",
        c"_forkscope_reload",
    )
    .map_err(|e| anyhow::anyhow!(crate::python::format_exception(e)))?;
    let saved = helpers
        .call_method0("forget")
        .and_then(|s| Ok(s.cast_into::<PyDict>()?))
        .map_err(|e| anyhow::anyhow!(crate::python::format_exception(e)))?;
    log::debug!("reload: re-importing {} application modules", saved.len());
    match crate::python::import_app(py, spec) {
        Ok(app) => {
            drop(saved);
            // The old application is garbage now; the leader's collector may be off (it is
            // under --preload with gc freezing), so collect it explicitly before freezing the
            // new one, or every reload would keep the previous app alive.
            if let Err(e) = py.import("gc").and_then(|gc| gc.call_method0("collect")) {
                log::warn!("reload: {}", crate::python::format_exception(e));
            }
            if freeze {
                crate::python::freeze(py)
                    .map_err(|e| anyhow::anyhow!(crate::python::format_exception(e)))?;
            }
            Ok(app)
        }
        Err(e) => {
            if let Err(restore) = helpers.call_method1("restore", (&saved,)) {
                log::error!(
                    "reload: cannot restore the old modules:\n{}",
                    crate::python::format_exception(restore)
                );
            }
            if freeze {
                let _ = crate::python::freeze(py);
            }
            Err(e)
        }
    }
}

impl Leader {
    /// HUP: re-reads the configuration (keeping the old one when the new one is invalid),
    /// re-imports the app under `--preload`, then replaces every worker: each old worker
    /// finishes its requests while a new one takes its slot. The listening sockets stay open
    /// throughout, so a connection that arrives meanwhile waits in the backlog, never fails.
    pub(super) fn reload(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let start = start();
        let here = std::env::current_dir().ok();
        // Relative paths on the command line (-c, log files) mean what they meant at start.
        if let Some(cwd) = &start.cwd {
            let _ = std::env::set_current_dir(cwd);
        }
        let loaded = Python::attach(|py| crate::settings::load(start.argv.clone(), Some(py)));
        if let Some(dir) = &here {
            let _ = std::env::set_current_dir(dir);
        }
        match loaded {
            Ok(loaded) => self.apply(loaded.settings, loaded.hooks),
            Err(e) => {
                log::error!("reload: the configuration is invalid, keeping the current one: {e:#}");
            }
        }
        if self.settings.preload_app {
            let freeze = self.settings.gc_freeze;
            let spec = self.spec.clone();
            match Python::attach(|py| reimport(py, &spec, freeze)) {
                Ok(app) => {
                    self.preloaded = Some(app);
                    Python::attach(|py| {
                        let _ = crate::worker::signals::warn_about_app_handlers(py);
                    });
                    // The import may have called signal.signal() in the leader.
                    if let Err(e) = signals::reinstall() {
                        log::error!("cannot reinstall the leader's signal handlers: {e}");
                    }
                    log::info!("reload: the application was imported again");
                }
                Err(e) => log::error!(
                    "reload: the application failed to import; the workers keep the old one:\n{e:#}"
                ),
            }
        }
        let failed = Python::attach(|py| {
            crate::hooks::call(py, &self.hooks, Hook::OnReload, || {
                Ok(vec![arg(py, &self.server)])
            })
            .is_err()
        });
        if failed {
            self.halt = Some(ExitCode::from(HOOK_FAILED));
            return;
        }
        self.set_target(self.settings.workers.clamp(1, MAX_SLOTS as u32));
        // A worker that serves keeps serving until its replacement is ready (`manage`); one
        // still booting has nothing to keep and goes now.
        let slots: Vec<(u32, Pid)> = self.slots.serving().map(|(s, w)| (s, w.pid)).collect();
        for (slot, pid) in slots {
            if self.ready.is_ready(slot, pid.as_raw() as u32) {
                self.slots.supersede(slot);
            } else if let Some(pid) = self.slots.retire(slot, false) {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
    }

    /// Takes the reloaded settings and hooks. What needs new sockets or a new process keeps
    /// its old value, with a warning.
    pub(super) fn apply(&mut self, mut new: Settings, hooks: Hooks) {
        if new.bind != self.settings.bind {
            log::warn!(
                "reload: bind changed from {:?} to {:?}; the sockets stay as they are (use USR2 \
                 to start a leader on new sockets)",
                self.settings.bind,
                new.bind
            );
            new.bind = self.settings.bind.clone();
        }
        if new.runtime_dir != self.settings.runtime_dir {
            log::warn!("reload: the runtime directory cannot change while the leader runs");
            new.runtime_dir = self.settings.runtime_dir.clone();
        }
        if new.wsgi_app != self.settings.wsgi_app {
            match new.wsgi_app.as_deref().map(AppSpec::parse) {
                Some(Ok(spec)) => self.spec = spec,
                _ => new.wsgi_app = self.settings.wsgi_app.clone(),
            }
        }
        if new.preload_app && !self.settings.preload_app {
            // Imported by the re-import step below.
            self.preloaded = None;
        } else if !new.preload_app {
            self.preloaded = None;
        }
        if let Err(e) = crate::logging::init(&new) {
            log::error!("reload: cannot open the new error log, keeping the old one: {e:#}");
        }
        if new.pidfile != self.settings.pidfile && !self.upgrade.sharing_sockets() {
            if let Some(old) = &self.pidfile {
                let _ = std::fs::remove_file(old);
            }
            self.pidfile = new.pidfile.clone();
            if let Some(path) = &self.pidfile
                && let Err(e) = std::fs::write(path, format!("{}\n", std::process::id()))
            {
                log::error!("reload: cannot write pid file {}: {e}", path.display());
            }
        }
        self.app_name = new
            .proc_name
            .clone()
            .or_else(|| new.wsgi_app.clone())
            .unwrap_or_else(|| self.app_name.clone());
        crate::proctitle::set(&crate::proctitle::leader_title(&self.app_name));
        Python::attach(|py| {
            let mut server = self.server.borrow_mut(py);
            match crate::hooks::cfg_object(py, &new) {
                Ok(cfg) => server.cfg = cfg,
                Err(e) => log::error!("reload: {}", crate::python::format_exception(e)),
            }
            server.proc_name = self.app_name.clone();
            server.timeout = new.timeout;
        });
        self.hooks = hooks;
        self.settings = new;
        log::info!("reload: configuration re-read");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_modules_are_the_files_outside_the_installation() {
        Python::initialize();
        Python::attach(|py| {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("fs_reload_probe.py"), "X = 1\n").expect("write");
            let sys = py.import("sys").expect("sys");
            sys.getattr("path")
                .expect("path")
                .call_method1("insert", (0, dir.path().to_str().expect("utf-8")))
                .expect("insert");
            py.import("fs_reload_probe").expect("import the probe");
            py.import("json").expect("json");
            let helpers = PyModule::from_code(py, HELPERS, c"<t>", c"_t_reload").expect("helpers");
            let names: Vec<String> = helpers
                .call_method0("app_modules")
                .and_then(|n| n.extract())
                .expect("app_modules");
            assert!(names.contains(&"fs_reload_probe".to_owned()), "{names:?}");
            assert!(!names.iter().any(|n| n == "json" || n == "os"), "{names:?}");

            // forget() takes it out; restore() puts the very same module back.
            let before = sys
                .getattr("modules")
                .and_then(|m| m.get_item("fs_reload_probe"))
                .expect("imported");
            let saved = helpers.call_method0("forget").expect("forget");
            assert!(
                !sys.getattr("modules")
                    .and_then(|m| m.contains("fs_reload_probe"))
                    .expect("contains")
            );
            helpers.call_method1("restore", (saved,)).expect("restore");
            let after = sys
                .getattr("modules")
                .and_then(|m| m.get_item("fs_reload_probe"))
                .expect("restored");
            assert!(before.is(&after));
        });
    }
}
