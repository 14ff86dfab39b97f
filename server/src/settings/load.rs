//! Resolves one [`Settings`] from every source, with gunicorn's precedence.
//!
//! # Precedence (lowest first; a later source replaces a whole value)
//!
//! 1. the defaults declared on [`Settings`];
//! 2. gunicorn's environment defaults: `WEB_CONCURRENCY` (workers), `PORT` (bind
//!    `0.0.0.0:$PORT`), `FORWARDED_ALLOW_IPS` — defaults in gunicorn, so a config file beats
//!    them;
//! 3. the config file (`-c`; else `FORKSCOPE_CONFIG`; else `./gunicorn.conf.py` if it exists);
//! 4. the per-setting `FORKSCOPE_<NAME>` env vars — above the config file baked into an image,
//!    below anything given as arguments, which is where clap puts env vars too;
//! 5. `GUNICORN_CMD_ARGS`, then 6. `FORKSCOPE_CMD_ARGS` (shell-quoted arguments);
//! 7. the command line.
//!
//! This is gunicorn's `defaults < config file < env args < CLI` (`gunicorn/app/base.py`) with
//! the per-setting env vars slotted in. Lists are replaced, not merged: `--bind` on the command
//! line replaces the config file's `bind`, as in gunicorn.
//!
//! # How
//!
//! Every source is parsed by the same clap command, so validation is identical everywhere.
//! Each parse yields a layer: the settings that source set explicitly, as JSON values keyed by
//! setting name. Layers are laid over the defaults in order and the result is deserialized
//! into [`Settings`].

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use clap::parser::ValueSource;
use clap::{ArgAction, FromArgMatches};
use serde_json::{Map, Value};

use super::config_file::{self, ConfigValue, SettingKind};
use super::{Settings, unsupported};
use crate::hooks::table::Hooks;

/// The result of [`load`]: the resolved settings and the config file's hooks.
#[derive(Debug)]
pub struct Loaded {
    /// Every setting, resolved.
    pub settings: Settings,
    /// The server hooks the config file defined (all `None` without a config file).
    pub hooks: Hooks,
}

/// The config file gunicorn (and forkscope) reads when `-c` is not given and it exists.
pub const DEFAULT_CONFIG: &str = "./gunicorn.conf.py";

/// Resolves the settings from `args` (with the program name first, like `std::env::args_os`),
/// the process environment and the config file, in gunicorn's precedence (module docs).
///
/// `py` is needed only when there is a config file; the caller has initialized Python.
///
/// # Errors
///
/// Any invalid value or unsupported gunicorn option, naming it and where it came from. Errors
/// from the command line itself are returned as an unwrapped [`clap::Error`], so `main` can
/// `downcast_ref::<clap::Error>()` and call `.exit()` (help, version and usage errors print the
/// way users expect).
pub fn load(args: Vec<OsString>, py: Option<pyo3::Python<'_>>) -> anyhow::Result<Loaded> {
    load_with_env(args, &|name| std::env::var_os(name), py)
}

/// [`load`] with the environment injected (tests; a reload that wants a snapshot).
///
/// # Errors
///
/// As [`load`].
pub fn load_with_env(
    args: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    py: Option<pyo3::Python<'_>>,
) -> anyhow::Result<Loaded> {
    let program = args
        .first()
        .cloned()
        .unwrap_or_else(|| OsString::from("forkscope-server"));

    let command_line = parse_args(args, Origin::CommandLine)?;
    let gunicorn_args = cmd_args_layer(&program, env, "GUNICORN_CMD_ARGS")?;
    let forkscope_args = cmd_args_layer(&program, env, "FORKSCOPE_CMD_ARGS")?;
    let env_layer = env_layer(env)?;

    let config = [&command_line, &forkscope_args, &gunicorn_args, &env_layer]
        .iter()
        .find_map(|layer| {
            layer
                .get("config")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .or_else(|| {
            Path::new(DEFAULT_CONFIG)
                .is_file()
                .then(|| DEFAULT_CONFIG.to_owned())
        });

    let mut merged = defaults()?;
    let (config_layer, hooks) = match &config {
        None => (Map::new(), Hooks::default()),
        Some(location) => {
            let py = py.ok_or_else(|| {
                anyhow!("the config file {location} needs Python, which is not initialized")
            })?;
            let file = config_file::evaluate(py, location, &setting_kinds())?;
            let mut layer = Map::new();
            for (name, value) in file.values {
                let origin = format!("setting `{name}` in config file {location}");
                let json = match value {
                    ConfigValue::Flag(flag) => Value::Bool(flag),
                    ConfigValue::Values(values) => parse_value(&name, &values, &origin)?,
                    ConfigValue::Unset if merged.get(&name).is_none_or(Value::is_null) => continue,
                    ConfigValue::Unset => bail!("{origin}: None is not a valid value"),
                };
                layer.insert(name, json);
            }
            (layer, file.hooks)
        }
    };

    for layer in [
        gunicorn_env_defaults(env)?,
        config_layer,
        env_layer,
        gunicorn_args,
        forkscope_args,
        command_line,
    ] {
        merged.extend(layer);
    }
    merged.insert(
        "config".to_owned(),
        config.map_or(Value::Null, Value::String),
    );
    let settings: Settings = serde_json::from_value(Value::Object(merged))
        .context("internal error: the merged settings do not deserialize")?;
    Ok(Loaded { settings, hooks })
}

/// Where a set of arguments came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    CommandLine,
    EnvArgs(&'static str),
}

impl Origin {
    fn describe(self) -> String {
        match self {
            Origin::CommandLine => "on the command line".to_owned(),
            Origin::EnvArgs(name) => format!("in {name}"),
        }
    }
}

/// The settings' command without its env vars: every source is parsed without clap reading
/// the process environment, because the env vars are a layer of their own (read through the
/// injected `env`, with their own error messages).
fn command_without_env() -> clap::Command {
    Settings::command().mut_args(|arg| arg.env(None::<&'static str>))
}

/// The command arguments are parsed with: the settings plus hidden unsupported flags.
fn parse_command() -> clap::Command {
    command_without_env().args(unsupported::hidden_args())
}

/// Parses one argument list into the layer of settings it sets explicitly.
fn parse_args(args: Vec<OsString>, origin: Origin) -> anyhow::Result<Map<String, Value>> {
    let matches = match parse_command().try_get_matches_from(&args) {
        Ok(matches) => matches,
        Err(err) if origin == Origin::CommandLine => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                // Help shows the env vars, so it comes from the full command.
                if let Err(help) = Settings::command().try_get_matches_from(&args)
                    && help.kind() == err.kind()
                {
                    return Err(help.into());
                }
            }
            return Err(err.into());
        }
        Err(err) => bail!("{}: {}", origin.describe(), clap_message(&err)),
    };
    for id in matches.ids() {
        let id = id.as_str();
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        if let Some(entry) = unsupported::by_arg_id(id) {
            bail!(entry.flag_error(&origin.describe()));
        }
    }
    let settings = Settings::from_arg_matches(&matches)
        .map_err(|err| anyhow!("{}: {}", origin.describe(), clap_message(&err)))?;
    Ok(explicit(&settings, |id| {
        matches.value_source(id) == Some(ValueSource::CommandLine)
    }))
}

/// The JSON values of the settings for which `chosen(name)` holds.
fn explicit(settings: &Settings, chosen: impl Fn(&str) -> bool) -> Map<String, Value> {
    let Value::Object(all) = serde_json::to_value(settings).expect("Settings serializes") else {
        unreachable!("Settings is a struct, so it serializes to a JSON object")
    };
    all.into_iter().filter(|(name, _)| chosen(name)).collect()
}

/// The layer from `GUNICORN_CMD_ARGS` or `FORKSCOPE_CMD_ARGS` (shell-quoted, like gunicorn).
fn cmd_args_layer(
    program: &OsStr,
    env: &dyn Fn(&str) -> Option<OsString>,
    name: &'static str,
) -> anyhow::Result<Map<String, Value>> {
    let Some(raw) = env(name) else {
        return Ok(Map::new());
    };
    let raw = raw
        .into_string()
        .map_err(|_| anyhow!("{name} is not valid UTF-8"))?;
    let words = shlex::split(&raw)
        .ok_or_else(|| anyhow!("{name} has unbalanced quotes or a trailing backslash: {raw}"))?;
    let mut args = vec![program.to_owned()];
    args.extend(words.into_iter().map(OsString::from));
    parse_args(args, Origin::EnvArgs(name))
}

/// The settings' defaults, as declared on the struct (no environment involved).
fn defaults() -> anyhow::Result<Map<String, Value>> {
    let matches = command_without_env()
        .try_get_matches_from(["forkscope-server"])
        .context("internal error: the defaults do not parse")?;
    let settings = Settings::from_arg_matches(&matches)
        .context("internal error: the defaults do not parse")?;
    Ok(explicit(&settings, |_| true))
}

/// gunicorn's own environment defaults: `WEB_CONCURRENCY`, `PORT`, `FORWARDED_ALLOW_IPS`.
fn gunicorn_env_defaults(
    env: &dyn Fn(&str) -> Option<OsString>,
) -> anyhow::Result<Map<String, Value>> {
    let mut layer = Map::new();
    let sources = [
        ("WEB_CONCURRENCY", "workers", None),
        ("PORT", "bind", Some("0.0.0.0:")),
        ("FORWARDED_ALLOW_IPS", "forwarded_allow_ips", None),
    ];
    for (variable, setting, prefix) in sources {
        let Some(value) = env(variable) else { continue };
        let value = value
            .into_string()
            .map_err(|_| anyhow!("{variable} is not valid UTF-8"))?;
        let value = format!("{}{}", prefix.unwrap_or(""), value.trim());
        let origin = format!("{variable} (the default of `{setting}`)");
        layer.insert(setting.to_owned(), parse_value(setting, &[value], &origin)?);
    }
    Ok(layer)
}

/// The layer from the per-setting `FORKSCOPE_<NAME>` env vars (empty values are ignored).
fn env_layer(env: &dyn Fn(&str) -> Option<OsString>) -> anyhow::Result<Map<String, Value>> {
    let mut layer = Map::new();
    let command = Settings::command();
    for arg in command.get_arguments() {
        let Some(variable) = arg.get_env().and_then(OsStr::to_str) else {
            continue;
        };
        let Some(value) = env(variable).filter(|value| !value.is_empty()) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| anyhow!("{variable} is not valid UTF-8"))?;
        let name = arg.get_id().as_str();
        let json = if is_flag(arg) {
            Value::Bool(parse_boolish(&value).ok_or_else(|| {
                anyhow!("{variable}={value}: expected true/false, yes/no, on/off or 1/0")
            })?)
        } else {
            parse_value(
                name,
                std::slice::from_ref(&value),
                &format!("{variable}={value}"),
            )?
        };
        layer.insert(name.to_owned(), json);
    }
    Ok(layer)
}

/// Validates `values` for setting `name` through its clap value parser; returns its JSON.
fn parse_value(name: &str, values: &[String], origin: &str) -> anyhow::Result<Value> {
    let command = command_without_env();
    let arg = command
        .get_arguments()
        .find(|arg| arg.get_id() == name)
        .ok_or_else(|| anyhow!("internal error: no setting named {name}"))?;
    let mut args = vec![OsString::from("forkscope-server")];
    match arg.get_long() {
        Some(long) => args.extend(
            values
                .iter()
                .map(|v| OsString::from(format!("--{long}={v}"))),
        ),
        None => {
            args.push(OsString::from("--"));
            args.extend(values.iter().map(OsString::from));
        }
    }
    let matches = command
        .clone()
        .try_get_matches_from(args)
        .map_err(|err| anyhow!("{origin}: {}", clap_message(&err)))?;
    let settings = Settings::from_arg_matches(&matches)
        .map_err(|err| anyhow!("{origin}: {}", clap_message(&err)))?;
    let mut layer = explicit(&settings, |id| id == name);
    layer
        .remove(name)
        .ok_or_else(|| anyhow!("internal error: setting {name} did not parse"))
}

/// Setting name → kind, for every setting a config file may set (all but `config`).
pub fn setting_kinds() -> BTreeMap<String, SettingKind> {
    use std::any::TypeId;
    let ints = [
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<i32>(),
        TypeId::of::<usize>(),
    ];
    Settings::command()
        .get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "config" | "help" | "version"))
        .map(|arg| {
            let kind = if is_flag(arg) {
                SettingKind::Flag
            } else if matches!(arg.get_action(), ArgAction::Append)
                || arg.get_value_delimiter().is_some()
            {
                SettingKind::List
            } else if ints
                .iter()
                .any(|id| arg.get_value_parser().type_id() == *id)
            {
                SettingKind::Int
            } else {
                SettingKind::Text
            };
            (arg.get_id().as_str().to_owned(), kind)
        })
        .collect()
}

fn is_flag(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
}

/// Boolean spellings accepted in env vars (clap's "boolish" set).
pub(crate) fn parse_boolish(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "y" | "on" | "1" => Some(true),
        "false" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// clap's message without the `error: ` prefix and the usage/help footer.
fn clap_message(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}
