//! Evaluates a gunicorn-style Python config file (`-c gunicorn.conf.py`) into settings values and hooks.
//!
//! The file runs as a module named `__config__` (with `__file__` set), exactly the way gunicorn
//! loads it, or is imported as a module for `-c python:MODULE`. Then its module-level globals
//! are read:
//!
//! - a global named like a setting is type-checked here (bool, int, str, list of str) and
//!   handed to [`load`](mod@super::load), which validates it with the same clap parser as the command
//!   line;
//! - a global named like a server hook ([`Hook`]) must be a callable with gunicorn's arity (or
//!   a `"module.function"` string, as gunicorn allows) and lands in [`Hooks`];
//! - a gunicorn setting forkscope refuses is an error, unless its value is off (falsy) or
//!   gunicorn's default, so gunicorn's own example config (`daemon = False`, `user = None`)
//!   loads unchanged;
//! - anything else (imports, helpers, private names) is ignored, as gunicorn ignores it.
//!
//! The caller has initialized Python and holds the GIL. The settings' own names and kinds come
//! in as an argument, so nothing here depends on how [`load`](mod@super::load) resolves them.

use std::collections::BTreeMap;
use std::path::Path;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use super::unsupported;
use crate::hooks::table::{Hook, Hooks};
use crate::python::{exception_line, traceback_text};

/// What a setting's value looks like, for type-checking config-file globals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingKind {
    /// A switch (`--preload`): a Python `bool`.
    Flag,
    /// A repeatable or comma-separated value (`bind`): a `str` or a list of `str`.
    List,
    /// A number (`workers`): a Python `int` (or a `str` of digits, as gunicorn accepts).
    Int,
    /// Text or a path (`errorlog`): a Python `str`.
    Text,
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
/// ([`super::load::setting_kinds`]).
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
        if let Some(hook) = Hook::from_name(&name) {
            let callable = check_hook(&helpers, location, hook, &value)?;
            file.hooks.set(hook, callable);
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
    hook: Hook,
    value: &Bound<'_, PyAny>,
) -> Result<Py<PyAny>, ConfigError> {
    let py = helpers.py();
    let arity = hook.arity();
    let post_request = hook == Hook::PostRequest;
    let bad = |problem: String| ConfigError::BadHook {
        location: location.to_owned(),
        name: hook.name().to_owned(),
        problem,
    };
    let callable = helpers
        .call_method1("resolve", (value,))
        .map_err(|err| bad(format!("cannot be resolved: {}", exception_line(py, &err))))?;
    if !callable.is_callable() {
        return Err(bad(format!(
            "must be callable, not {}",
            describe(&callable)
        )));
    }
    let (count, varargs): (usize, bool) = helpers
        .call_method1("arity", (&callable,))
        .and_then(|result| result.extract())
        .map_err(|err| {
            bad(format!(
                "has no inspectable signature: {}",
                exception_line(py, &err)
            ))
        })?;
    let accepted = if post_request {
        (2..=4).contains(&count) || (varargs && count <= 4)
    } else {
        count == arity || (varargs && count <= arity)
    };
    if !accepted {
        let expected = if post_request {
            "2 to 4 (worker, req, environ, resp)".to_owned()
        } else {
            arity.to_string()
        };
        return Err(bad(format!(
            "must take {expected} positional argument(s), but takes {count}"
        )));
    }
    let callable = if post_request && !varargs {
        helpers
            .call_method1("wrap_post_request", (&callable, count))
            .map_err(|err| bad(format!("cannot be wrapped: {}", exception_line(py, &err))))?
    } else {
        callable
    };
    Ok(callable.unbind())
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

#[cfg(test)]
mod tests;
