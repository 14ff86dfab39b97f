//! Renders `docs/SETTINGS.md` from the clap command, so the docs cannot drift from the code.
//!
//! A test compares the committed file with [`render`] and fails when it is stale;
//! `FORKSCOPE_BLESS=1 cargo test -p forkscope-server settings_md` rewrites it.

use std::fmt::Write as _;

use clap::ArgAction;

use super::{Settings, unsupported};
use crate::logging::access::ATOMS;

/// The env var that makes the staleness test rewrite the file instead of failing.
pub const BLESS_ENV: &str = "FORKSCOPE_BLESS";

/// `docs/SETTINGS.md`, relative to the workspace root.
pub const SETTINGS_MD: &str = "docs/SETTINGS.md";

/// The whole of `docs/SETTINGS.md`.
pub fn render() -> String {
    let mut command = Settings::command();
    command.build();
    let mut out = String::new();
    out.push_str(
        "# forkscope-server settings\n\n\
         <!-- Generated from server/src/settings/mod.rs; do not edit. Regenerate with\n     \
         FORKSCOPE_BLESS=1 cargo test -p forkscope-server settings_md -->\n\n\
         Every setting has gunicorn's name, which is also its key in a gunicorn-style config \
         file (`-c gunicorn.conf.py`), gunicorn's flag, and a `FORKSCOPE_<NAME>` environment \
         variable.\n\n\
         ## Where values come from\n\n\
         Lowest precedence first; a later source replaces the whole value (a `--bind` on the \
         command line replaces the config file's `bind` list):\n\n\
         1. the defaults below;\n\
         2. gunicorn's environment defaults: `WEB_CONCURRENCY` (workers), `PORT` (bind \
         `0.0.0.0:$PORT`), `FORWARDED_ALLOW_IPS`;\n\
         3. the config file: `-c`/`--config`, else `FORKSCOPE_CONFIG`, else `./gunicorn.conf.py` \
         when it exists (`-c python:MODULE` imports a module instead);\n\
         4. the `FORKSCOPE_<NAME>` environment variables (switches take true/false, yes/no, \
         on/off or 1/0; empty values are ignored);\n\
         5. `GUNICORN_CMD_ARGS`, then `FORKSCOPE_CMD_ARGS` (shell-quoted arguments);\n\
         6. the command line.\n\n\
         `--print-config` shows the result.\n\n",
    );

    out.push_str("## Settings\n\n");
    out.push_str("| setting (config key) | flag | environment variable | default |\n");
    out.push_str("| --- | --- | --- | --- |\n");
    let args: Vec<&clap::Arg> = command
        .get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
        .collect();
    for arg in &args {
        let _ = writeln!(
            out,
            "| [`{name}`](#{name}) | {flag} | {env} | {default} |",
            name = arg.get_id(),
            flag = flag(arg),
            env = arg
                .get_env()
                .map(|env| format!("`{}`", env.to_string_lossy()))
                .unwrap_or_default(),
            default = default(arg),
        );
    }
    out.push('\n');
    for arg in &args {
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|help| help.to_string())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "### {}\n\n{}\n\n{}\n",
            arg.get_id(),
            flag(arg),
            help.trim()
        );
    }

    out.push_str("## Access log atoms\n\n");
    out.push_str(
        "`access_log_format` uses gunicorn's atoms as `%(atom)s`. An unknown atom renders as \
         `-`; a `\"` inside a value is written as `\\\"`.\n\n",
    );
    out.push_str("| atom | value |\n| --- | --- |\n");
    for (atom, meaning) in ATOMS {
        let _ = writeln!(out, "| `%({atom})s` | {meaning} |");
    }
    out.push('\n');

    out.push_str("## gunicorn options forkscope-server refuses\n\n");
    out.push_str(
        "Each is an error that names it, on the command line, in `GUNICORN_CMD_ARGS`/\
         `FORKSCOPE_CMD_ARGS` and as a config-file global (a config file may still set one to \
         its off or default value, as gunicorn's example config does). `worker_class` accepts \
         `sync` and `gthread` only.\n\n",
    );
    out.push_str("| setting | flags | why |\n| --- | --- | --- |\n");
    for entry in unsupported::UNSUPPORTED {
        let flags: Vec<String> = entry.flags.iter().map(|f| format!("`{f}`")).collect();
        let flags = if flags.is_empty() {
            "(config file only)".to_owned()
        } else {
            flags.join(", ")
        };
        let _ = writeln!(out, "| `{}` | {flags} | {} |", entry.name, entry.reason);
    }
    out
}

/// `` `-w`, `--workers <INT>` `` (or the positional's value name).
fn flag(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map(|name| format!(" <{name}>"))
        .unwrap_or_default();
    let takes_value = !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    let mut spellings = Vec::new();
    if let Some(short) = arg.get_short() {
        spellings.push(format!("`-{short}`"));
    }
    if let Some(long) = arg.get_long() {
        let value = if takes_value { value.as_str() } else { "" };
        spellings.push(format!("`--{long}{value}`"));
    }
    for alias in arg.get_visible_aliases().unwrap_or_default() {
        spellings.push(format!("`--{alias}`"));
    }
    if spellings.is_empty() {
        let name = arg
            .get_value_names()
            .and_then(|names| names.first())
            .map(|name| name.to_string())
            .unwrap_or_else(|| arg.get_id().to_string());
        return format!("`{name}` (positional)");
    }
    spellings.join(", ")
}

/// The declared default, `` `a`, `b` `` for lists, empty when there is none.
fn default(arg: &clap::Arg) -> String {
    let values: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|value| format!("`{}`", value.to_string_lossy().replace('|', "\\|")))
        .collect();
    values.join(", ")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn settings_md_is_fresh() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(SETTINGS_MD);
        let rendered = render();
        if std::env::var_os(BLESS_ENV).is_some_and(|v| v == "1") {
            std::fs::write(&path, &rendered).expect("write docs/SETTINGS.md");
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "{SETTINGS_MD} is stale: it must be regenerated from the Settings struct. Run\n    \
             {BLESS_ENV}=1 cargo test -p forkscope-server settings_md\nand commit the result."
        );
    }

    #[test]
    fn every_setting_is_documented() {
        let rendered = render();
        for name in crate::settings::load::setting_kinds().keys() {
            assert!(rendered.contains(&format!("### {name}\n")), "{name}");
        }
        assert!(rendered.contains("`FORKSCOPE_WORKERS`"));
        assert!(rendered.contains("`--limit-request-field_size <BYTES>`"));
        assert!(rendered.contains("| `daemon` | `-D`, `--daemon` |"));
    }
}
