//! HUP: re-read the configuration and, under `--preload`, import the application afresh in
//! the leader, so the workers forked next run the new code and settings.
//!
//! Re-importing in place (the leader keeps its PID, its sockets and its children) works by
//! taking the application's own modules out of `sys.modules` and importing the app again: the
//! modules whose files live outside the Python installation (not in the standard library, not
//! in a `site-packages`). Libraries stay imported, which is what a code deploy expects and what
//! keeps C extensions (which cannot be imported twice) safe. If the new import fails, the old
//! modules go back into `sys.modules` and the old application keeps serving.
//!
//! The old application is unfrozen first (`gc.unfreeze()`), so the collection after the import
//! can free it; the new one is frozen again for copy-on-write sharing.

use std::ffi::CStr;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::python::AppSpec;

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
