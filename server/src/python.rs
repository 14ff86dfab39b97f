//! Interpreter start-up, import paths, the app import, preload and the fork hooks.
//!
//! The leader starts CPython once. Imports then resolve the way they do under gunicorn: the
//! working directory (after `--chdir`) comes first on `sys.path`, then `--pythonpath` entries,
//! and the virtualenv named by `VIRTUAL_ENV` (activated or not) contributes its site-packages.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// Where the application lives: `module:variable`, or `module:factory(args)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    /// Dotted module path.
    pub module: String,
    /// The expression after the colon: a name, or a call of a name with literal arguments.
    pub expr: String,
}

impl AppSpec {
    /// Parses gunicorn's `MODULE[:EXPR]` form; a bare module means `module:application`.
    ///
    /// # Errors
    /// An empty module or expression.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (module, expr) = match text.split_once(':') {
            Some((m, e)) => (m.trim(), e.trim()),
            None => (text.trim(), "application"),
        };
        if module.is_empty() || expr.is_empty() {
            bail!("invalid application {text:?}: expected MODULE:VARIABLE or MODULE:FACTORY(...)");
        }
        Ok(Self {
            module: module.to_owned(),
            expr: expr.to_owned(),
        })
    }
}

impl std::fmt::Display for AppSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.module, self.expr)
    }
}

/// What shapes the interpreter's import path.
#[derive(Debug, Clone, Default)]
pub struct PathSetup {
    /// The program's command line, exposed as `sys.argv`.
    pub argv: Vec<String>,
    /// Extra import roots from `--pythonpath`, in order.
    pub pythonpath: Vec<PathBuf>,
    /// The virtualenv to use (from `VIRTUAL_ENV`), if any.
    pub virtualenv: Option<PathBuf>,
}

impl PathSetup {
    /// Reads `VIRTUAL_ENV` and splits a gunicorn-style comma-separated `--pythonpath`.
    pub fn from_env(argv: Vec<String>, pythonpath: Option<&str>) -> Self {
        let pythonpath = pythonpath
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        let virtualenv = std::env::var_os("VIRTUAL_ENV")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Self {
            argv,
            pythonpath,
            virtualenv,
        }
    }
}

/// Starts CPython (once per process) and prepares `sys.argv` and `sys.path`.
///
/// CPython is started without its own signal handlers (`Py_InitializeEx(0)`): the leader and the
/// workers decide signal handling themselves.
///
/// # Errors
/// A Python error while setting the paths (for example an unreadable virtualenv).
pub fn initialize(setup: &PathSetup) -> anyhow::Result<()> {
    Python::initialize();
    Python::attach(|py| configure_paths(py, setup))
        .map_err(|e| anyhow::anyhow!(format_exception(e)))
        .context("preparing the Python import path")
}

fn configure_paths(py: Python<'_>, setup: &PathSetup) -> PyResult<()> {
    let sys = py.import("sys")?;
    sys.setattr("argv", PyList::new(py, &setup.argv)?)?;
    let path = sys.getattr("path")?.cast_into::<PyList>()?;
    if let Some(venv) = &setup.virtualenv {
        add_virtualenv(py, &path, venv)?;
    }
    // gunicorn puts --pythonpath entries first, then the working directory.
    let cwd = std::env::current_dir().map_err(PyErr::from)?;
    let mut front: Vec<String> = setup
        .pythonpath
        .iter()
        .map(|p| cwd.join(p).to_string_lossy().into_owned())
        .collect();
    front.push(cwd.to_string_lossy().into_owned());
    for entry in front.iter().rev() {
        if !path.contains(entry)? {
            path.insert(0, entry)?;
        }
    }
    Ok(())
}

/// Adds a virtualenv's site-packages (and its `.pth` files) ahead of the base interpreter's.
fn add_virtualenv(py: Python<'_>, path: &Bound<'_, PyList>, venv: &Path) -> PyResult<()> {
    let version = py.version_info();
    let site_packages = venv.join(format!(
        "lib/python{}.{}/site-packages",
        version.major, version.minor
    ));
    if !site_packages.is_dir() {
        log::warn!(
            "VIRTUAL_ENV={} has no {}; ignoring it",
            venv.display(),
            site_packages.display()
        );
        return Ok(());
    }
    let before = path.len();
    py.import("site")?
        .call_method1("addsitedir", (site_packages.to_string_lossy().as_ref(),))?;
    // addsitedir appends; move what it added to the front so the venv wins over the base.
    let added = path.get_slice(before, path.len());
    path.del_slice(before, path.len())?;
    for (i, item) in added.iter().enumerate() {
        path.insert(i, item)?;
    }
    py.import("sys")?
        .setattr("prefix", venv.to_string_lossy().as_ref())?;
    Ok(())
}

/// Python code that resolves `module:expr`: a name, or a call with literal arguments only, as
/// gunicorn allows (no arbitrary code from the command line).
const LOAD_APP: &str = r#"
import ast, importlib

def _forkscope_load(module, expr):
    mod = importlib.import_module(module)
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        raise ValueError(f"failed to parse {expr!r} as an attribute name or function call")
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, None, None
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(f"factory arguments of {expr!r} must be literals")
    else:
        raise ValueError(f"failed to parse {expr!r} as an attribute name or function call")
    try:
        app = getattr(mod, name)
    except AttributeError:
        raise AttributeError(f"failed to find attribute {name!r} in {module!r}")
    if args is not None:
        app = app(*args, **kwargs)
    if app is None:
        raise TypeError(f"the application {module}:{expr} is None")
    if not callable(app):
        raise TypeError(f"the application {module}:{expr} is not callable")
    return app
"#;

/// Imports the application object.
///
/// # Errors
/// The import failed, the name is missing, or the object is not callable; the error holds the
/// Python traceback text.
pub fn import_app(py: Python<'_>, spec: &AppSpec) -> anyhow::Result<Py<PyAny>> {
    let load = || -> PyResult<Py<PyAny>> {
        let globals = PyDict::new(py);
        let code = CString::new(LOAD_APP).expect("the loader source has no NUL byte");
        py.run(&code, Some(&globals), None)?;
        let load = globals
            .get_item("_forkscope_load")?
            .expect("the loader defines _forkscope_load");
        Ok(load.call1((&spec.module, &spec.expr))?.unbind())
    };
    load().map_err(|e| {
        anyhow::anyhow!(
            "failed to load the application {spec}:\n{}",
            format_exception(e)
        )
    })
}

/// `gc.freeze()`: moves every object the leader created into the permanent generation, so a
/// full collection in a worker never writes to (and so never copies) the pages shared after fork.
///
/// # Errors
/// Only if the `gc` module is unusable.
pub fn freeze(py: Python<'_>) -> PyResult<()> {
    // No collection first: freeing garbage now would leave holes in the shared pages that the
    // workers' first allocations fill, copying those pages (CPython's gc.freeze advice).
    py.import("gc")?.call_method0("freeze")?;
    Ok(())
}

/// Switches the cyclic garbage collector off in the leader before a preload import, so no
/// collection frees objects (and leaves holes in pages workers will share) between the import
/// and [`freeze`]. Workers switch it back on with [`enable_gc`] right after fork.
///
/// # Errors
/// Only if the `gc` module is unusable.
pub fn disable_gc(py: Python<'_>) -> PyResult<()> {
    py.import("gc")?.call_method0("disable")?;
    Ok(())
}

/// Switches the cyclic garbage collector back on (in a worker, after fork).
///
/// # Errors
/// Only if the `gc` module is unusable.
pub fn enable_gc(py: Python<'_>) -> PyResult<()> {
    py.import("gc")?.call_method0("enable")?;
    Ok(())
}

/// The outcome of [`fork`] in the calling process.
pub(crate) enum Forked {
    /// In the parent; the child's PID.
    Parent(nix::unistd::Pid),
    /// In the child; the interpreter has been told it is a new process.
    Child,
}

/// Forks the process the way `os.fork()` does, so the child's interpreter is consistent
/// (import lock, thread states, `os.register_at_fork` callbacks).
///
/// The caller must be the only thread that runs (the leader's invariant). The leader forks
/// through [`crate::leader::spawn::fork_child`], which keeps the child out of its frames.
///
/// # Errors
/// `fork()` failed (for example EAGAIN under a process limit).
pub(crate) fn fork(_py: Python<'_>) -> nix::Result<Forked> {
    // SAFETY: the GIL is held (we have `Python`), and the leader runs no other thread, so the
    // child starts with consistent memory; CPython's fork hooks bracket the call as os.fork does.
    unsafe {
        pyo3::ffi::PyOS_BeforeFork();
        match nix::unistd::fork() {
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                pyo3::ffi::PyOS_AfterFork_Parent();
                Ok(Forked::Parent(child))
            }
            Ok(nix::unistd::ForkResult::Child) => {
                pyo3::ffi::PyOS_AfterFork_Child();
                Ok(Forked::Child)
            }
            Err(e) => {
                pyo3::ffi::PyOS_AfterFork_Parent();
                Err(e)
            }
        }
    }
}

/// Runs `atexit` callbacks and flushes `sys.stdout`/`sys.stderr`, as an interpreter exit would;
/// workers call this before `_exit` because they never finalize the interpreter.
pub fn run_exit_functions(py: Python<'_>) {
    let result = (|| -> PyResult<()> {
        py.import("atexit")?.call_method0("_run_exitfuncs")?;
        let sys = py.import("sys")?;
        for stream in ["stdout", "stderr"] {
            if let Ok(s) = sys.getattr(stream)
                && !s.is_none()
            {
                let _ = s.call_method0("flush");
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        log::error!("error in atexit callbacks:\n{}", format_exception(e));
    }
}

/// Formats a Python exception with its traceback, as `traceback.format_exception` does.
pub fn format_exception(err: PyErr) -> String {
    Python::attach(|py| traceback_text(py, &err))
}

/// Python's formatted traceback of `err`, or its one-line form when formatting fails.
pub fn traceback_text(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|module| {
        module
            .call_method1(
                "format_exception",
                (err.get_type(py), err.value(py), err.traceback(py)),
            )
            .and_then(|lines| lines.extract::<Vec<String>>())
    });
    match formatted {
        Ok(lines) => lines.concat().trim_end().to_owned(),
        Err(_) => exception_line(py, err),
    }
}

/// `TypeName: message`, the last line of a traceback.
pub fn exception_line(py: Python<'_>, err: &PyErr) -> String {
    let type_name = err
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".to_owned());
    format!("{type_name}: {}", err.value(py))
}

/// Sets `-e KEY=VALUE` variables in `os.environ` (which also updates the C environment), as
/// gunicorn does.
///
/// # Errors
/// Only if `os.environ` is unusable.
pub fn set_environ(pairs: &[(&str, &str)]) -> anyhow::Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    Python::attach(|py| -> PyResult<()> {
        let environ = py.import("os")?.getattr("environ")?;
        for (k, v) in pairs {
            environ.set_item(*k, *v)?;
        }
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!(format_exception(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_spec_forms() {
        let s = AppSpec::parse("pkg.mod:app").expect("valid");
        assert_eq!((s.module.as_str(), s.expr.as_str()), ("pkg.mod", "app"));
        let s = AppSpec::parse("mod").expect("valid");
        assert_eq!(s.expr, "application");
        let s = AppSpec::parse("mod:create_app('x', debug=True)").expect("valid");
        assert_eq!(s.expr, "create_app('x', debug=True)");
        assert!(AppSpec::parse(":app").is_err());
        assert!(AppSpec::parse("mod:").is_err());
    }

    #[test]
    fn factories_take_literals_only() {
        Python::initialize();
        Python::attach(|py| {
            let sys = py.import("sys").expect("sys");
            let modules = sys.getattr("modules").expect("modules");
            let m = pyo3::types::PyModule::from_code(
                py,
                c"def make(x, y=1):\n    return lambda e, s: [x, y]\napp = 3\n",
                c"fs_factory_mod.py",
                c"fs_factory_mod",
            )
            .expect("module");
            modules.set_item("fs_factory_mod", m).expect("register");
            let app = import_app(
                py,
                &AppSpec::parse("fs_factory_mod:make('a', y=2)").expect("spec"),
            )
            .expect("factory");
            assert!(app.bind(py).is_callable());
            let err = import_app(
                py,
                &AppSpec::parse("fs_factory_mod:make(open('x'))").expect("spec"),
            )
            .expect_err("non-literal");
            assert!(err.to_string().contains("must be literals"), "{err}");
            let err = import_app(py, &AppSpec::parse("fs_factory_mod:app").expect("spec"))
                .expect_err("not callable");
            assert!(err.to_string().contains("not callable"), "{err}");
            let err = import_app(py, &AppSpec::parse("fs_factory_mod:nope").expect("spec"))
                .expect_err("missing");
            assert!(
                err.to_string().contains("failed to find attribute"),
                "{err}"
            );
        });
    }
}
