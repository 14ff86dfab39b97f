//! Evaluates a gunicorn-style Python config file (`-c gunicorn.conf.py`) into settings values and hooks.
//!
//! The file runs as a module named `__config__` (with `__file__` set), exactly the way gunicorn
//! loads it, or is imported as a module for `-c python:MODULE`. Then its module-level globals
//! are read:
//!
//! - a global named like a setting is type-checked here (bool, int, str, list of str) and
//!   handed to [`crate::settings::load`], which validates it with the same clap parser as the
//!   command line;
//! - a global named like a server hook must be a callable with gunicorn's arity (or a
//!   `"module.function"` string, as gunicorn allows) and lands in [`Hooks`];
//! - a gunicorn setting forkscope refuses is an error, unless its value is off (falsy) or
//!   gunicorn's default, so gunicorn's own example config (`daemon = False`, `user = None`)
//!   loads unchanged;
//! - anything else (imports, helpers, private names) is ignored, as gunicorn ignores it.
//!
//! The caller has initialized Python and holds the GIL; this module needs nothing else from
//! the rest of the server.

use std::collections::BTreeMap;
use std::path::Path;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::settings::load::SettingKind;
use crate::settings::unsupported;

/// The server hooks a config file may define, with the number of positional arguments
/// gunicorn passes to each.
pub const HOOKS: &[(&str, usize)] = &[
    ("on_starting", 1),
    ("on_reload", 1),
    ("when_ready", 1),
    ("pre_fork", 2),
    ("post_fork", 2),
    ("post_worker_init", 1),
    ("worker_int", 1),
    ("worker_abort", 1),
    ("pre_exec", 1),
    ("pre_request", 2),
    ("post_request", 4),
    ("child_exit", 2),
    ("worker_exit", 2),
    ("nworkers_changed", 3),
    ("on_exit", 1),
];

/// The hooks from a config file; `None` where the file defines none.
///
/// Arguments, as gunicorn passes them (`server` is the leader object, `worker` a worker
/// object with pid, age and slot): `on_starting(server)`, `on_reload(server)`,
/// `when_ready(server)`, `pre_fork(server, worker)`, `post_fork(server, worker)`,
/// `post_worker_init(worker)`, `worker_int(worker)`, `worker_abort(worker)`,
/// `pre_exec(server)`, `pre_request(worker, req)`, `post_request(worker, req, environ, resp)`
/// (always call it with four: a file's two- or three-argument version is wrapped, as gunicorn
/// does), `child_exit(server, worker)`, `worker_exit(server, worker)`,
/// `nworkers_changed(server, new_value, old_value)`, `on_exit(server)`.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Called once, in the leader, before anything else starts.
    pub on_starting: Option<Py<PyAny>>,
    /// Called in the leader on HUP, before the workers are replaced.
    pub on_reload: Option<Py<PyAny>>,
    /// Called in the leader once the sockets are bound and workers are starting.
    pub when_ready: Option<Py<PyAny>>,
    /// Called in the leader just before a worker is forked.
    pub pre_fork: Option<Py<PyAny>>,
    /// Called in the new worker right after fork.
    pub post_fork: Option<Py<PyAny>>,
    /// Called in the worker after the application is loaded.
    pub post_worker_init: Option<Py<PyAny>>,
    /// Called in the worker on INT or QUIT.
    pub worker_int: Option<Py<PyAny>>,
    /// Called in the worker on ABRT (timeout).
    pub worker_abort: Option<Py<PyAny>>,
    /// Called in the leader just before it execs a new binary (USR2 upgrade).
    pub pre_exec: Option<Py<PyAny>>,
    /// Called in the worker before each request.
    pub pre_request: Option<Py<PyAny>>,
    /// Called in the worker after each request (always with 4 arguments, see above).
    pub post_request: Option<Py<PyAny>>,
    /// Called in the leader after a worker exited.
    pub child_exit: Option<Py<PyAny>>,
    /// Called in the worker as it exits.
    pub worker_exit: Option<Py<PyAny>>,
    /// Called in the leader when the number of workers changes.
    pub nworkers_changed: Option<Py<PyAny>>,
    /// Called in the leader just before it exits.
    pub on_exit: Option<Py<PyAny>>,
}

impl Hooks {
    /// A copy that shares the same Python callables.
    pub fn clone_ref(&self, py: Python<'_>) -> Hooks {
        let copy = |hook: &Option<Py<PyAny>>| hook.as_ref().map(|h| h.clone_ref(py));
        Hooks {
            on_starting: copy(&self.on_starting),
            on_reload: copy(&self.on_reload),
            when_ready: copy(&self.when_ready),
            pre_fork: copy(&self.pre_fork),
            post_fork: copy(&self.post_fork),
            post_worker_init: copy(&self.post_worker_init),
            worker_int: copy(&self.worker_int),
            worker_abort: copy(&self.worker_abort),
            pre_exec: copy(&self.pre_exec),
            pre_request: copy(&self.pre_request),
            post_request: copy(&self.post_request),
            child_exit: copy(&self.child_exit),
            worker_exit: copy(&self.worker_exit),
            nworkers_changed: copy(&self.nworkers_changed),
            on_exit: copy(&self.on_exit),
        }
    }

    /// The hook stored under gunicorn's name `name`.
    pub fn get(&self, name: &str) -> Option<&Py<PyAny>> {
        match name {
            "on_starting" => self.on_starting.as_ref(),
            "on_reload" => self.on_reload.as_ref(),
            "when_ready" => self.when_ready.as_ref(),
            "pre_fork" => self.pre_fork.as_ref(),
            "post_fork" => self.post_fork.as_ref(),
            "post_worker_init" => self.post_worker_init.as_ref(),
            "worker_int" => self.worker_int.as_ref(),
            "worker_abort" => self.worker_abort.as_ref(),
            "pre_exec" => self.pre_exec.as_ref(),
            "pre_request" => self.pre_request.as_ref(),
            "post_request" => self.post_request.as_ref(),
            "child_exit" => self.child_exit.as_ref(),
            "worker_exit" => self.worker_exit.as_ref(),
            "nworkers_changed" => self.nworkers_changed.as_ref(),
            "on_exit" => self.on_exit.as_ref(),
            _ => None,
        }
    }

    fn slot(&mut self, name: &str) -> Option<&mut Option<Py<PyAny>>> {
        Some(match name {
            "on_starting" => &mut self.on_starting,
            "on_reload" => &mut self.on_reload,
            "when_ready" => &mut self.when_ready,
            "pre_fork" => &mut self.pre_fork,
            "post_fork" => &mut self.post_fork,
            "post_worker_init" => &mut self.post_worker_init,
            "worker_int" => &mut self.worker_int,
            "worker_abort" => &mut self.worker_abort,
            "pre_exec" => &mut self.pre_exec,
            "pre_request" => &mut self.pre_request,
            "post_request" => &mut self.post_request,
            "child_exit" => &mut self.child_exit,
            "worker_exit" => &mut self.worker_exit,
            "nworkers_changed" => &mut self.nworkers_changed,
            "on_exit" => &mut self.on_exit,
            _ => return None,
        })
    }
}

/// A setting's value as the config file gave it, type-checked but not yet validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    /// A switch (`preload_app = True`).
    Flag(bool),
    /// One or more values in their command-line spelling (`workers = 4` gives `["4"]`).
    Values(Vec<String>),
    /// `None`: leave the setting at its default.
    Unset,
}

/// The evaluated config file.
#[derive(Debug)]
pub struct ConfigFile {
    /// The location as given (`gunicorn.conf.py` or `python:MODULE`).
    pub location: String,
    /// The settings the file sets, in the order of the module's globals.
    pub values: Vec<(String, ConfigValue)>,
    /// The hooks the file defines.
    pub hooks: Hooks,
}

/// Why a config file could not be used. Every message names the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("config file {location} does not exist")]
    NotFound {
        /// The location as given.
        location: String,
    },
    /// Running or importing the file raised; the traceback says where.
    #[error("config file {location} raised an exception:\n{traceback}")]
    Raised {
        /// The location as given.
        location: String,
        /// Python's formatted traceback.
        traceback: String,
    },
    /// A setting has a value of the wrong Python type.
    #[error("setting `{name}` in config file {location} must be {expected}, not {found}")]
    WrongType {
        /// The location as given.
        location: String,
        /// The setting name.
        name: String,
        /// What the setting takes.
        expected: &'static str,
        /// The Python type (and value) found.
        found: String,
    },
    /// A hook is not a callable taking gunicorn's arguments.
    #[error("hook `{name}` in config file {location} {problem}")]
    BadHook {
        /// The location as given.
        location: String,
        /// The hook name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The file sets a gunicorn setting forkscope does not support.
    #[error("{0}")]
    Unsupported(String),
}

/// Python helpers, kept in Python where they mirror gunicorn's own Python.
const HELPERS: &std::ffi::CStr = c"
import importlib, importlib.machinery, importlib.util, inspect, ast

def load_file(filename):
    # gunicorn's util.load_config_from_module_name_or_filename, for files of any extension
    loader = importlib.machinery.SourceFileLoader('__config__', filename)
    spec = importlib.util.spec_from_file_location('__config__', filename, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return vars(module)

def load_module(name):
    return vars(importlib.import_module(name))

def resolve(value):
    # gunicorn's validate_callable accepts 'package.module.function'
    if isinstance(value, str):
        module, _, attr = value.rpartition('.')
        if not module:
            raise TypeError('%r is not of the form module.function' % value)
        return getattr(importlib.import_module(module), attr)
    return value

def arity(f):
    # gunicorn's util.get_arity counts positional parameters; also report *args
    count, varargs = 0, False
    for p in inspect.signature(f).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
        elif p.kind == p.VAR_POSITIONAL:
            varargs = True
    return count, varargs

def wrap_post_request(f, count):
    # gunicorn's validate_post_request: two or three arguments are wrapped to four
    if count == 2:
        return lambda worker, req, environ, resp: f(worker, req)
    if count == 3:
        return lambda worker, req, environ, resp: f(worker, req, environ)
    return f

def equals_literal(value, literal):
    return value == ast.literal_eval(literal)
";

/// Runs the config file at `location` and reads its settings and hooks.
///
/// `kinds` maps every setting name a config file may set to its kind
/// ([`crate::settings::load::setting_kinds`]).
///
/// # Errors
///
/// See [`ConfigError`]: a missing file, an exception while running it (with its traceback),
/// a wrong type, a bad hook, an unsupported gunicorn setting.
pub fn evaluate(
    py: Python<'_>,
    location: &str,
    kinds: &BTreeMap<String, SettingKind>,
) -> Result<ConfigFile, ConfigError> {
    let helpers = PyModule::from_code(
        py,
        HELPERS,
        c"<forkscope config helpers>",
        c"_forkscope_config_helpers",
    )
    .map_err(|err| raised(py, location, &err))?;

    let globals = if let Some(module) = location.strip_prefix("python:") {
        helpers.call_method1("load_module", (module,))
    } else {
        if !Path::new(location).is_file() {
            return Err(ConfigError::NotFound {
                location: location.to_owned(),
            });
        }
        helpers.call_method1("load_file", (location,))
    }
    .map_err(|err| raised(py, location, &err))?;
    let globals = globals
        .cast_into::<PyDict>()
        .map_err(|err| raised(py, location, &PyErr::from(err)))?;

    let mut file = ConfigFile {
        location: location.to_owned(),
        values: Vec::new(),
        hooks: Hooks::default(),
    };
    for (key, value) in globals.iter() {
        let Ok(name) = key.extract::<String>() else {
            continue;
        };
        if name.starts_with('_') {
            continue;
        }
        if let Some(&(_, arity)) = HOOKS.iter().find(|(hook, _)| *hook == name) {
            let hook = check_hook(&helpers, location, &name, arity, &value)?;
            *file
                .hooks
                .slot(&name)
                .expect("HOOKS and Hooks list the same names") = Some(hook);
        } else if let Some(kind) = kinds.get(&name) {
            let value = convert(location, &name, *kind, &value)?;
            file.values.push((name, value));
        } else if let Some(entry) = unsupported::by_name(&name)
            && !is_harmless(&helpers, entry, &value)
        {
            return Err(ConfigError::Unsupported(
                entry.setting_error(&format!("in config file {location}")),
            ));
        }
    }
    Ok(file)
}

/// Whether an unsupported setting is off anyway: falsy, or gunicorn's default.
fn is_harmless(
    helpers: &Bound<'_, PyModule>,
    entry: &unsupported::Unsupported,
    value: &Bound<'_, PyAny>,
) -> bool {
    if !value.is_truthy().unwrap_or(true) {
        return true;
    }
    entry.gunicorn_default().is_some_and(|literal| {
        helpers
            .call_method1("equals_literal", (value, literal))
            .and_then(|same| same.is_truthy())
            .unwrap_or(false)
    })
}

/// Checks a hook: callable (after resolving `"module.function"`) with gunicorn's arity.
fn check_hook(
    helpers: &Bound<'_, PyModule>,
    location: &str,
    name: &str,
    arity: usize,
    value: &Bound<'_, PyAny>,
) -> Result<Py<PyAny>, ConfigError> {
    let py = helpers.py();
    let bad = |problem: String| ConfigError::BadHook {
        location: location.to_owned(),
        name: name.to_owned(),
        problem,
    };
    let hook = helpers
        .call_method1("resolve", (value,))
        .map_err(|err| bad(format!("cannot be resolved: {}", exception_line(py, &err))))?;
    if !hook.is_callable() {
        return Err(bad(format!("must be callable, not {}", describe(&hook))));
    }
    let (count, varargs): (usize, bool) = helpers
        .call_method1("arity", (&hook,))
        .and_then(|result| result.extract())
        .map_err(|err| {
            bad(format!(
                "has no inspectable signature: {}",
                exception_line(py, &err)
            ))
        })?;
    let accepted = if name == "post_request" {
        (2..=4).contains(&count) || (varargs && count <= 4)
    } else {
        count == arity || (varargs && count <= arity)
    };
    if !accepted {
        let expected = if name == "post_request" {
            "2 to 4 (worker, req, environ, resp)".to_owned()
        } else {
            arity.to_string()
        };
        return Err(bad(format!(
            "must take {expected} positional argument(s), but takes {count}"
        )));
    }
    let hook = if name == "post_request" && !varargs {
        helpers
            .call_method1("wrap_post_request", (&hook, count))
            .map_err(|err| bad(format!("cannot be wrapped: {}", exception_line(py, &err))))?
    } else {
        hook
    };
    Ok(hook.unbind())
}

/// Type-checks a setting's Python value and spells it the way the command line would.
fn convert(
    location: &str,
    name: &str,
    kind: SettingKind,
    value: &Bound<'_, PyAny>,
) -> Result<ConfigValue, ConfigError> {
    let wrong = |expected: &'static str| ConfigError::WrongType {
        location: location.to_owned(),
        name: name.to_owned(),
        expected,
        found: describe(value),
    };
    if value.is_none() {
        return Ok(ConfigValue::Unset);
    }
    match kind {
        SettingKind::Flag => {
            if let Ok(flag) = value.cast::<PyBool>() {
                return Ok(ConfigValue::Flag(flag.is_true()));
            }
            // gunicorn's validate_bool also takes the strings "true" and "false".
            if let Ok(text) = value.extract::<String>() {
                match text.trim().to_ascii_lowercase().as_str() {
                    "true" => return Ok(ConfigValue::Flag(true)),
                    "false" => return Ok(ConfigValue::Flag(false)),
                    _ => {}
                }
            }
            Err(wrong("a bool (True or False)"))
        }
        SettingKind::Int => {
            if value.is_instance_of::<PyBool>() {
                return Err(wrong("an int"));
            }
            if value.is_instance_of::<PyInt>() {
                return Ok(ConfigValue::Values(vec![value.to_string()]));
            }
            if let Ok(float) = value.cast::<PyFloat>() {
                let float = float.value();
                if float.fract() == 0.0 && float.is_finite() {
                    return Ok(ConfigValue::Values(vec![format!("{float:.0}")]));
                }
                return Err(wrong("an int"));
            }
            // gunicorn's validate_pos_int accepts digits in a string; clap validates them.
            if value.is_instance_of::<PyString>() {
                return Ok(ConfigValue::Values(vec![value.to_string()]));
            }
            Err(wrong("an int"))
        }
        SettingKind::Text => match text(value) {
            Some(text) => Ok(ConfigValue::Values(vec![text])),
            None => Err(wrong("a str")),
        },
        SettingKind::List => {
            if let Some(text) = text(value) {
                return Ok(ConfigValue::Values(vec![text]));
            }
            if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
                let items: Option<Vec<String>> = value
                    .try_iter()
                    .ok()
                    .and_then(|iter| iter.map(|item| item.ok().and_then(|i| text(&i))).collect());
                if let Some(items) = items {
                    return Ok(ConfigValue::Values(items));
                }
            }
            Err(wrong("a str or a list of str"))
        }
    }
}

/// A `str`, or an `os.PathLike` (e.g. `pathlib.Path`) as its path string.
fn text(value: &Bound<'_, PyAny>) -> Option<String> {
    if value.is_instance_of::<PyString>() {
        return value.extract().ok();
    }
    let fspath = value.py().import("os").ok()?.getattr("fspath").ok()?;
    if value.hasattr("__fspath__").ok()? {
        return fspath.call1((value,)).ok()?.extract().ok();
    }
    None
}

/// `type name (repr)`, shortened, for error messages.
fn describe(value: &Bound<'_, PyAny>) -> String {
    let type_name = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let repr = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let repr: String = if repr.chars().count() > 60 {
        repr.chars().take(57).chain("...".chars()).collect()
    } else {
        repr
    };
    format!("{type_name} ({repr})")
}

/// The `ConfigError::Raised` for `err`, with Python's formatted traceback.
fn raised(py: Python<'_>, location: &str, err: &PyErr) -> ConfigError {
    ConfigError::Raised {
        location: location.to_owned(),
        traceback: traceback_text(py, err),
    }
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

fn exception_line(py: Python<'_>, err: &PyErr) -> String {
    let type_name = err
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".to_owned());
    format!("{type_name}: {}", err.value(py))
}

#[cfg(test)]
mod tests;
