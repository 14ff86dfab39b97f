//! The settings as users meet them: the real `forkscope-server` binary, its real environment
//! and working directory, `--print-config` to read the result.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the binary in `dir` with a clean forkscope/gunicorn environment plus `env`.
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_forkscope-server"));
    command.args(args).current_dir(dir);
    for (name, _) in std::env::vars() {
        if name.starts_with("FORKSCOPE_")
            || name.starts_with("GUNICORN_")
            || matches!(
                name.as_str(),
                "WEB_CONCURRENCY" | "PORT" | "FORWARDED_ALLOW_IPS"
            )
        {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("run forkscope-server")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The `name = value` line of `--print-config` output.
fn setting<'a>(printed: &'a str, name: &str) -> &'a str {
    printed
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(" = ")?;
            (key.trim_end() == name).then_some(value)
        })
        .unwrap_or_else(|| panic!("{name} not printed in:\n{printed}"))
}

#[test]
fn default_config_file_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gunicorn.conf.py"),
        "workers = 3\nbind = ['127.0.0.1:9001']\n",
    )
    .unwrap();
    let output = run(dir.path(), &["--print-config", "app:app"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    assert_eq!(setting(&printed, "workers"), "3");
    assert_eq!(setting(&printed, "bind"), r#"["127.0.0.1:9001"]"#);
    assert_eq!(setting(&printed, "config"), r#""./gunicorn.conf.py""#);

    let output = run(
        dir.path(),
        &["--print-config", "-w", "5"],
        &[
            ("WEB_CONCURRENCY", "9"),
            ("GUNICORN_CMD_ARGS", "-w 4 --timeout 12"),
            ("FORKSCOPE_TIMEOUT", "11"),
            ("FORKSCOPE_CMD_ARGS", "--timeout 13"),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    assert_eq!(setting(&printed, "workers"), "5");
    assert_eq!(setting(&printed, "timeout"), "13");
}

#[test]
fn no_config_file_without_one_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["--print-config"], &[("WEB_CONCURRENCY", "2")]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    assert_eq!(setting(&printed, "config"), "null");
    assert_eq!(setting(&printed, "workers"), "2");
}

#[test]
fn unsupported_gunicorn_options_fail_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["--daemon", "app:app"], &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(
            "--daemon (on the command line) is a gunicorn option that forkscope-server does not \
             support"
        ),
        "{}",
        stderr(&output)
    );
    let output = run(
        dir.path(),
        &["app:app"],
        &[("GUNICORN_CMD_ARGS", "--certfile cert.pem --keyfile key.pem")],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--certfile (in GUNICORN_CMD_ARGS)"),
        "{}",
        stderr(&output)
    );
    std::fs::write(
        dir.path().join("conf.py"),
        "statsd_host = 'localhost:8125'\n",
    )
    .unwrap();
    let output = run(dir.path(), &["-c", "conf.py", "app:app"], &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("statsd_host (in config file conf.py) is a gunicorn setting"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_raising_config_file_shows_its_traceback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("conf.py"),
        "workers = 2\nraise RuntimeError('boom')\n",
    )
    .unwrap();
    let output = run(dir.path(), &["-c", "conf.py", "app:app"], &[]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("config file conf.py raised an exception"),
        "{err}"
    );
    assert!(err.contains("RuntimeError: boom"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn help_and_usage_errors_come_from_clap() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["--help"], &[]);
    assert!(output.status.success());
    let help = stdout(&output);
    assert!(
        help.contains("--workers <INT>") && help.contains("FORKSCOPE_WORKERS"),
        "{help}"
    );
    let output = run(dir.path(), &["--no-such-flag"], &[]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap's usage-error exit code"
    );
    assert!(stderr(&output).contains("--no-such-flag"));
}

/// Issue 14: `--timeout` beyond its range used to start and panic at the first deadline.
#[test]
fn out_of_range_values_stop_the_server_at_start_up_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(
        dir.path(),
        &["--print-config", "--timeout", "18446744073709551615"],
        &[],
    );
    assert!(!output.status.success(), "{}", stdout(&output));
    let err = stderr(&output);
    assert!(
        err.contains("--timeout") && err.contains("31536000"),
        "{err}"
    );
    let output = run(
        dir.path(),
        &["--print-config"],
        &[("FORWARDED_ALLOW_IPS", "10.0.0.1,not-an-address")],
    );
    assert!(!output.status.success(), "{}", stdout(&output));
    let err = stderr(&output);
    assert!(err.contains("not-an-address"), "{err}");
}
