//! Settings resolution: defaults, gunicorn's env defaults, config file, env vars,
//! `*_CMD_ARGS`, command line, and the refusal of unsupported gunicorn options.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write as _;

use pyo3::Python;

use super::config_file::SettingKind;
use super::load::setting_kinds;
use super::unsupported::{self, UNSUPPORTED};
use super::*;

/// An injected environment.
fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
    let map: HashMap<String, OsString> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
        .collect();
    move |name| map.get(name).cloned()
}

fn argv(args: &[&str]) -> Vec<OsString> {
    std::iter::once("forkscope-server")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect()
}

/// Loads with Python available (needed whenever a config file is involved).
fn load_py(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Loaded> {
    Python::initialize();
    Python::attach(|py| load_with_env(argv(args), &env_of(env), Some(py)))
}

/// Loads without Python.
fn load_plain(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Settings> {
    load_with_env(argv(args), &env_of(env), None).map(|loaded| loaded.settings)
}

fn error_of(result: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", result.expect_err("the settings must be refused"))
}

/// A config file in its own temp dir (kept alive by the returned guard).
fn config_file(body: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gunicorn.conf.py");
    let mut file = std::fs::File::create(&path).expect("create config file");
    file.write_all(body.as_bytes()).expect("write config file");
    let path = path.to_str().expect("temp paths are UTF-8").to_owned();
    (dir, path)
}

#[test]
fn defaults_match_gunicorn() {
    let s = load_plain(&[], &[]).unwrap();
    assert_eq!(s.wsgi_app, None);
    assert_eq!(s.bind, vec!["127.0.0.1:8000"]);
    assert_eq!(s.workers, 1);
    assert_eq!(s.threads, 1);
    assert!(!s.preload_app);
    assert!(s.gc_freeze);
    assert_eq!(s.backlog, 2048);
    assert_eq!(s.keepalive, 2);
    assert_eq!(s.timeout, 30);
    assert_eq!(s.graceful_timeout, 30);
    assert_eq!((s.max_requests, s.max_requests_jitter), (0, 0));
    assert_eq!(s.limit_request_line, 4094);
    assert_eq!(s.limit_request_fields, 100);
    assert_eq!(s.limit_request_field_size, 8190);
    assert_eq!(s.forwarded_allow_ips, vec!["127.0.0.1", "::1"]);
    assert_eq!(s.accesslog, None);
    assert_eq!(
        s.access_log_format,
        r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#
    );
    assert_eq!(s.errorlog, "-");
    assert_eq!(s.loglevel, LogLevel::Info);
    assert_eq!(s.runtime_dir, PathBuf::from("/run/forkscope"));
    assert_eq!(s.worker_class, "sync");
    assert_eq!(s.config, None);
}

#[test]
fn every_gunicorn_flag_spelling_parses() {
    let s = load_plain(
        &[
            "-b",
            "0.0.0.0:1",
            "--bind",
            "unix:/tmp/s",
            "-w",
            "3",
            "--threads",
            "4",
            "--preload",
            "--no-gc-freeze",
            "--chdir",
            "/srv",
            "--pythonpath",
            "a,b",
            "-e",
            "A=1",
            "--env",
            "B=2=3",
            "--backlog",
            "10",
            "--keep-alive",
            "5",
            "-t",
            "6",
            "--graceful-timeout",
            "7",
            "--max-requests",
            "8",
            "--max-requests-jitter",
            "9",
            "--limit-request-line",
            "100",
            "--limit-request-fields",
            "11",
            "--limit-request-field_size",
            "12",
            "--forwarded-allow-ips",
            "*",
            "--access-logfile",
            "-",
            "--access-logformat",
            "%(h)s",
            "--log-file",
            "/tmp/e.log",
            "--log-level",
            "WARNING",
            "-p",
            "/tmp/pid",
            "-n",
            "shop",
            "--runtime-dir",
            "/tmp/rt",
            "-k",
            "gthread",
            "--check-config",
            "--print-config",
            "--worker-tmp-dir",
            "/dev/shm",
            "pkg.mod:app",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(s.bind, vec!["0.0.0.0:1", "unix:/tmp/s"]);
    assert_eq!((s.workers, s.threads), (3, 4));
    assert!(s.preload_app && !s.gc_freeze);
    assert_eq!(s.chdir, Some(PathBuf::from("/srv")));
    assert_eq!(s.pythonpath_entries(), vec!["a", "b"]);
    assert_eq!(s.raw_env_pairs(), vec![("A", "1"), ("B", "2=3")]);
    assert_eq!(
        (s.backlog, s.keepalive, s.timeout, s.graceful_timeout),
        (10, 5, 6, 7)
    );
    assert_eq!((s.max_requests, s.max_requests_jitter), (8, 9));
    assert_eq!(
        (
            s.limit_request_line,
            s.limit_request_fields,
            s.limit_request_field_size
        ),
        (100, 11, 12)
    );
    assert_eq!(s.forwarded_allow_ips, vec!["*"]);
    assert_eq!(s.accesslog.as_deref(), Some("-"));
    assert_eq!(s.access_log_format, "%(h)s");
    assert_eq!(s.errorlog, "/tmp/e.log");
    assert_eq!(s.loglevel, LogLevel::Warning);
    assert_eq!(s.pidfile, Some(PathBuf::from("/tmp/pid")));
    assert_eq!(s.proc_name.as_deref(), Some("shop"));
    assert_eq!(s.runtime_dir, PathBuf::from("/tmp/rt"));
    assert_eq!(s.worker_class, "gthread");
    assert!(s.check_config && s.print_config);
    assert_eq!(s.worker_tmp_dir, Some(PathBuf::from("/dev/shm")));
    assert_eq!(s.wsgi_app.as_deref(), Some("pkg.mod:app"));
    assert_eq!(
        s.warnings().len(),
        1,
        "worker_tmp_dir has no effect and says so"
    );
}

#[test]
fn web_concurrency_is_the_default_worker_count() {
    assert_eq!(
        load_plain(&[], &[("WEB_CONCURRENCY", "4")])
            .unwrap()
            .workers,
        4
    );
    assert_eq!(
        load_plain(&["-w", "2"], &[("WEB_CONCURRENCY", "4")])
            .unwrap()
            .workers,
        2
    );
    assert_eq!(
        load_plain(&[], &[("WEB_CONCURRENCY", "4"), ("FORKSCOPE_WORKERS", "3")])
            .unwrap()
            .workers,
        3
    );
    let error = error_of(load_plain(&[], &[("WEB_CONCURRENCY", "lots")]));
    assert!(error.contains("WEB_CONCURRENCY"), "{error}");
    let error = error_of(load_plain(&[], &[("WEB_CONCURRENCY", "0")]));
    assert!(error.contains("WEB_CONCURRENCY"), "{error}");
}

#[test]
fn web_concurrency_loses_to_the_config_file() {
    let (_dir, path) = config_file("workers = 2\n");
    let loaded = load_py(&["-c", &path], &[("WEB_CONCURRENCY", "4")]).unwrap();
    assert_eq!(loaded.settings.workers, 2);
}

#[test]
fn port_and_forwarded_allow_ips_env_defaults() {
    let s = load_plain(
        &[],
        &[
            ("PORT", "9000"),
            ("FORWARDED_ALLOW_IPS", "10.0.0.1,10.0.0.2"),
        ],
    )
    .unwrap();
    assert_eq!(s.bind, vec!["0.0.0.0:9000"]);
    assert_eq!(s.forwarded_allow_ips, vec!["10.0.0.1", "10.0.0.2"]);
    let s = load_plain(&["-b", "127.0.0.1:1"], &[("PORT", "9000")]).unwrap();
    assert_eq!(s.bind, vec!["127.0.0.1:1"]);
}

/// One config file, and each higher layer added in turn takes over.
#[test]
fn precedence_config_env_cmd_args_cli() {
    let (_dir, path) = config_file(
        "workers = 2\ntimeout = 10\nkeepalive = 7\nbind = ['10.0.0.1:1', '10.0.0.2:2']\n\
         loglevel = 'debug'\npreload_app = True\n",
    );
    let config_only = load_py(&["-c", &path], &[]).unwrap().settings;
    assert_eq!(config_only.workers, 2);
    assert_eq!(config_only.timeout, 10);
    assert_eq!(config_only.bind, vec!["10.0.0.1:1", "10.0.0.2:2"]);
    assert_eq!(config_only.loglevel, LogLevel::Debug);
    assert!(config_only.preload_app);
    assert_eq!(config_only.config.as_deref(), Some(path.as_str()));

    let env = [
        ("FORKSCOPE_WORKERS", "3"),
        ("FORKSCOPE_PRELOAD_APP", "false"),
    ];
    let with_env = load_py(&["-c", &path], &env).unwrap().settings;
    assert_eq!(
        with_env.workers, 3,
        "FORKSCOPE_WORKERS beats the config file"
    );
    assert!(!with_env.preload_app, "an env var can switch a flag off");
    assert_eq!(with_env.timeout, 10);

    let env = [
        ("FORKSCOPE_WORKERS", "3"),
        ("GUNICORN_CMD_ARGS", "-w 4 --timeout 11 -b 127.0.0.1:4"),
    ];
    let with_gunicorn_args = load_py(&["-c", &path], &env).unwrap().settings;
    assert_eq!(
        with_gunicorn_args.workers, 4,
        "GUNICORN_CMD_ARGS beats env vars"
    );
    assert_eq!(with_gunicorn_args.timeout, 11);
    assert_eq!(
        with_gunicorn_args.bind,
        vec!["127.0.0.1:4"],
        "lists are replaced"
    );
    assert_eq!(with_gunicorn_args.keepalive, 7);

    let env = [
        ("FORKSCOPE_WORKERS", "3"),
        ("GUNICORN_CMD_ARGS", "-w 4 --timeout 11"),
        ("FORKSCOPE_CMD_ARGS", "-w 5"),
    ];
    let with_forkscope_args = load_py(&["-c", &path], &env).unwrap().settings;
    assert_eq!(
        with_forkscope_args.workers, 5,
        "FORKSCOPE_CMD_ARGS beats GUNICORN_CMD_ARGS"
    );
    assert_eq!(with_forkscope_args.timeout, 11);

    let with_cli = load_py(&["-c", &path, "-w", "6", "--keep-alive", "8"], &env)
        .unwrap()
        .settings;
    assert_eq!(with_cli.workers, 6, "the command line beats everything");
    assert_eq!(with_cli.keepalive, 8);
    assert_eq!(with_cli.timeout, 11);
    assert_eq!(with_cli.loglevel, LogLevel::Debug);
}

#[test]
fn config_file_named_in_cmd_args_or_env() {
    let (_dir, path) = config_file("workers = 7\n");
    let cmd_args = format!("-c {}", shlex::try_quote(&path).unwrap());
    let s = load_py(&[], &[("GUNICORN_CMD_ARGS", &cmd_args)])
        .unwrap()
        .settings;
    assert_eq!(s.workers, 7);
    let s = load_py(&[], &[("FORKSCOPE_CONFIG", &path)])
        .unwrap()
        .settings;
    assert_eq!(s.workers, 7);
    let (_other_dir, other) = config_file("workers = 8\n");
    let s = load_py(&["-c", &other], &[("GUNICORN_CMD_ARGS", &cmd_args)])
        .unwrap()
        .settings;
    assert_eq!(s.workers, 8, "-c on the command line wins");
}

#[test]
fn config_file_needs_python() {
    let (_dir, path) = config_file("workers = 7\n");
    let error = error_of(load_plain(&["-c", &path], &[]));
    assert!(error.contains("needs Python"), "{error}");
}

#[test]
fn env_flags_and_lists() {
    let s = load_plain(
        &[],
        &[
            ("FORKSCOPE_PRELOAD_APP", "yes"),
            ("FORKSCOPE_GC_FREEZE", "0"),
            ("FORKSCOPE_FORWARDED_ALLOW_IPS", "1.2.3.4,5.6.7.8"),
            ("FORKSCOPE_BIND", "unix:/tmp/x.sock"),
            ("FORKSCOPE_LOGLEVEL", "error"),
            ("FORKSCOPE_WSGI_APP", "app:application"),
            ("FORKSCOPE_RUNTIME_DIR", "/tmp/fs-rt"),
            ("FORKSCOPE_THREADS", ""),
        ],
    )
    .unwrap();
    assert!(s.preload_app);
    assert!(!s.gc_freeze);
    assert_eq!(s.forwarded_allow_ips, vec!["1.2.3.4", "5.6.7.8"]);
    assert_eq!(s.bind, vec!["unix:/tmp/x.sock"]);
    assert_eq!(s.loglevel, LogLevel::Error);
    assert_eq!(s.wsgi_app.as_deref(), Some("app:application"));
    assert_eq!(s.runtime_dir, PathBuf::from("/tmp/fs-rt"));
    assert_eq!(s.threads, 1, "an empty env var is ignored");

    let error = error_of(load_plain(&[], &[("FORKSCOPE_PRELOAD_APP", "perhaps")]));
    assert!(error.contains("FORKSCOPE_PRELOAD_APP"), "{error}");
    let error = error_of(load_plain(&[], &[("FORKSCOPE_TIMEOUT", "soon")]));
    assert!(error.contains("FORKSCOPE_TIMEOUT=soon"), "{error}");
}

#[test]
fn cmd_args_are_shell_quoted() {
    let s = load_plain(
        &[],
        &[(
            "GUNICORN_CMD_ARGS",
            r#"--access-logformat '%(h)s "%(r)s"' -e 'GREETING=hello world'"#,
        )],
    )
    .unwrap();
    assert_eq!(s.access_log_format, r#"%(h)s "%(r)s""#);
    assert_eq!(s.raw_env, vec!["GREETING=hello world"]);
    let error = error_of(load_plain(&[], &[("FORKSCOPE_CMD_ARGS", "--name 'open")]));
    assert!(error.contains("FORKSCOPE_CMD_ARGS"), "{error}");
    let error = error_of(load_plain(&[], &[("GUNICORN_CMD_ARGS", "--workers none")]));
    assert!(error.contains("in GUNICORN_CMD_ARGS"), "{error}");
    assert!(error.contains("--workers"), "{error}");
}

#[test]
fn unknown_options_are_clap_errors() {
    let error = load_plain(&["--no-such-option"], &[]).unwrap_err();
    let clap_error = error
        .downcast_ref::<clap::Error>()
        .expect("command-line errors stay clap errors so main can exit() with them");
    assert_eq!(clap_error.kind(), clap::error::ErrorKind::UnknownArgument);
    let help = load_plain(&["--help"], &[]).unwrap_err();
    let help = help.downcast_ref::<clap::Error>().unwrap();
    assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    assert!(help.to_string().contains("FORKSCOPE_WORKERS"));
}

#[test]
fn invalid_values_are_refused() {
    for args in [
        &["-w", "0"][..],
        &["--threads", "0"],
        &["--log-level", "loud"],
        &["-e", "NOEQUALS"],
        &["--backlog", "-1"],
        &["--timeout", "-5"],
    ] {
        assert!(load_plain(args, &[]).is_err(), "{args:?} must be refused");
    }
}

#[test]
fn worker_classes() {
    for (given, expected) in [
        ("sync", "sync"),
        ("gthread", "gthread"),
        ("gunicorn.workers.gthread.ThreadWorker", "gthread"),
        ("gunicorn.workers.sync.SyncWorker", "sync"),
    ] {
        assert_eq!(
            load_plain(&["-k", given], &[]).unwrap().worker_class,
            expected
        );
    }
    for class in [
        "gevent",
        "eventlet",
        "tornado",
        "uvicorn.workers.UvicornWorker",
    ] {
        let error = format!("{}", load_plain(&["-k", class], &[]).unwrap_err());
        assert!(
            error.contains(class) && error.contains("does not support"),
            "{error}"
        );
        let error = error_of(load_plain(
            &[],
            &[("GUNICORN_CMD_ARGS", &format!("-k {class}"))],
        ));
        assert!(
            error.contains(class) && error.contains("GUNICORN_CMD_ARGS"),
            "{error}"
        );
        let (_dir, path) = config_file(&format!("worker_class = {class:?}\n"));
        let error = error_of(load_py(&["-c", &path], &[]));
        assert!(
            error.contains(class) && error.contains("worker_class"),
            "{error}"
        );
    }
}

/// Every unsupported gunicorn option, in every spelling, on the command line and in both
/// `*_CMD_ARGS`, is an error that names it.
#[test]
fn every_unsupported_flag_is_named() {
    for entry in UNSUPPORTED {
        let long = entry.flags.iter().find(|f| f.starts_with("--"));
        for flag in entry.flags {
            let mut args = vec![*flag];
            if entry.takes_value {
                args.push("x");
            }
            args.push("app:app");
            let error = error_of(load_plain(&args, &[]));
            let long = long.expect("every flagged entry has a long flag");
            assert!(
                error.contains(&format!(
                    "{long} (on the command line) is a gunicorn option"
                )),
                "{flag}: {error}"
            );
            assert!(error.contains(entry.reason), "{flag}: {error}");
            for variable in ["GUNICORN_CMD_ARGS", "FORKSCOPE_CMD_ARGS"] {
                let error = error_of(load_plain(&["app:app"], &[(variable, &args.join(" "))]));
                assert!(
                    error.contains(&format!("{long} (in {variable})")),
                    "{error}"
                );
            }
        }
        if entry.takes_value
            && let Some(long) = long
        {
            let error = error_of(load_plain(&[&format!("{long}=x")], &[]));
            assert!(error.contains(long), "{error}");
        }
    }
}

/// Every unsupported gunicorn setting as a config-file global is an error that names it.
#[test]
fn every_unsupported_setting_is_named_in_config_files() {
    for entry in UNSUPPORTED {
        if entry.gunicorn_default() == Some("True") {
            // Both values of a switch that is on by default are harmless (off = falsy).
            continue;
        }
        let value = if entry.takes_value { "'on'" } else { "True" };
        let (_dir, path) = config_file(&format!("{} = {value}\n", entry.name));
        let result = load_py(&["-c", &path], &[]);
        assert!(result.is_err(), "{} = {value} must be refused", entry.name);
        let error = error_of(result);
        assert!(
            error.contains(&format!(
                "{} (in config file {path}) is a gunicorn setting that forkscope-server does not support",
                entry.name
            )),
            "{}: {error}",
            entry.name
        );
    }
}

/// gunicorn's example config sets unsupported settings to their off/default values; that
/// must load unchanged.
#[test]
fn unsupported_settings_left_off_are_accepted() {
    let (_dir, path) = config_file(
        "daemon = False\nuser = None\ngroup = None\numask = 0\ntmp_upload_dir = None\n\
         spew = False\nworker_connections = 1000\ncertfile = None\nkeyfile = None\n\
         secure_scheme_headers = {'X-FORWARDED-PROTOCOL': 'ssl', 'X-FORWARDED-PROTO': 'https', \
         'X-FORWARDED-SSL': 'on'}\nsyslog_addr = 'udp://localhost:514'\nworkers = 2\n",
    );
    assert_eq!(load_py(&["-c", &path], &[]).unwrap().settings.workers, 2);
    let (_dir, path) = config_file("worker_connections = 50\n");
    let error = error_of(load_py(&["-c", &path], &[]));
    assert!(error.contains("worker_connections"), "{error}");
}

#[test]
fn config_file_types_are_checked() {
    for (body, needle) in [
        ("workers = True\n", "setting `workers` in config file"),
        ("workers = 'four'\n", "setting `workers` in config file"),
        ("workers = 2.5\n", "setting `workers`"),
        ("bind = 8000\n", "setting `bind`"),
        ("bind = ['a:1', 2]\n", "setting `bind`"),
        ("preload_app = 'yes'\n", "setting `preload_app`"),
        ("accesslog = 5\n", "setting `accesslog`"),
        ("raw_env = ['NOEQUALS']\n", "setting `raw_env`"),
        ("loglevel = 'loud'\n", "setting `loglevel`"),
        ("errorlog = None\n", "setting `errorlog`"),
        ("timeout = -1\n", "setting `timeout`"),
    ] {
        let (_dir, path) = config_file(body);
        let error = error_of(load_py(&["-c", &path], &[]));
        assert!(error.contains(needle), "{body}: {error}");
    }
}

#[test]
fn config_file_values_of_every_shape() {
    let (_dir, path) = config_file(
        "import multiprocessing, pathlib\n\
         bind = '0.0.0.0:8080'\n\
         workers = multiprocessing.cpu_count() * 0 + 3\n\
         timeout = '45'\n\
         graceful_timeout = 20.0\n\
         preload_app = 'true'\n\
         gc_freeze = False\n\
         forwarded_allow_ips = '10.0.0.1,10.0.0.2'\n\
         raw_env = ('A=1', 'B=2')\n\
         chdir = pathlib.Path('/srv/app')\n\
         pidfile = None\n\
         wsgi_app = 'shop.wsgi:application'\n\
         loglevel = 'WARNING'\n\
         SOME_CONSTANT = 42\n\
         def helper():\n    return 1\n\
         _private = 'ignored'\n",
    );
    let s = load_py(&["-c", &path], &[]).unwrap().settings;
    assert_eq!(s.bind, vec!["0.0.0.0:8080"]);
    assert_eq!(s.workers, 3);
    assert_eq!(s.timeout, 45);
    assert_eq!(s.graceful_timeout, 20);
    assert!(s.preload_app);
    assert!(!s.gc_freeze);
    assert_eq!(s.forwarded_allow_ips, vec!["10.0.0.1", "10.0.0.2"]);
    assert_eq!(s.raw_env, vec!["A=1", "B=2"]);
    assert_eq!(s.chdir, Some(PathBuf::from("/srv/app")));
    assert_eq!(s.pidfile, None);
    assert_eq!(s.wsgi_app.as_deref(), Some("shop.wsgi:application"));
    assert_eq!(s.loglevel, LogLevel::Warning);
}

#[test]
fn a_config_file_that_raises_shows_its_traceback() {
    let (_dir, path) = config_file("workers = 2\n\ndef broken():\n    return 1 / 0\n\nbroken()\n");
    let error = error_of(load_py(&["-c", &path], &[]));
    assert!(
        error.contains(&format!("config file {path} raised an exception")),
        "{error}"
    );
    assert!(
        error.contains("Traceback (most recent call last)"),
        "{error}"
    );
    assert!(error.contains("ZeroDivisionError"), "{error}");
    assert!(error.contains("line 4, in broken"), "{error}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let error = error_of(load_py(&["-c", "/nonexistent/gunicorn.conf.py"], &[]));
    assert!(
        error.contains("/nonexistent/gunicorn.conf.py does not exist"),
        "{error}"
    );
}

#[test]
fn print_config_lists_every_setting() {
    let s = load_plain(&["-w", "3"], &[]).unwrap();
    let printed = s.print_config();
    for name in setting_kinds().keys() {
        assert!(
            printed
                .lines()
                .any(|line| line.starts_with(&format!("{name} "))),
            "{name} missing from:\n{printed}"
        );
    }
    assert!(
        printed.contains("workers                  = 3\n"),
        "{printed}"
    );
}

#[test]
fn setting_kinds_follow_the_declarations() {
    let kinds = setting_kinds();
    assert_eq!(kinds["preload_app"], SettingKind::Flag);
    assert_eq!(kinds["gc_freeze"], SettingKind::Flag);
    assert_eq!(kinds["bind"], SettingKind::List);
    assert_eq!(kinds["forwarded_allow_ips"], SettingKind::List);
    assert_eq!(kinds["workers"], SettingKind::Int);
    assert_eq!(kinds["backlog"], SettingKind::Int);
    assert_eq!(kinds["limit_request_line"], SettingKind::Int);
    assert_eq!(kinds["errorlog"], SettingKind::Text);
    assert_eq!(kinds["loglevel"], SettingKind::Text);
    assert_eq!(kinds["wsgi_app"], SettingKind::Text);
    assert!(
        !kinds.contains_key("config"),
        "a config file cannot name another"
    );
}

#[test]
fn unsupported_names_never_shadow_settings() {
    let kinds = setting_kinds();
    for entry in UNSUPPORTED {
        assert!(!kinds.contains_key(entry.name), "{} is both", entry.name);
        assert!(unsupported::by_arg_id(entry.name).is_some());
    }
}

#[test]
fn http_limits_clamp_like_gunicorn() {
    let limits = |args: &[&str]| load_plain(args, &[]).unwrap().http_limits();
    let default = limits(&[]);
    assert_eq!(
        (default.request_line, default.fields, default.field_size),
        (4094, 100, 8190)
    );
    let high = limits(&[
        "--limit-request-line",
        "20000",
        "--limit-request-fields",
        "40000",
        "--limit-request-field_size",
        "20000",
    ]);
    assert_eq!(
        (high.request_line, high.fields, high.field_size),
        (8190, 32768, 20000)
    );
    let zero = limits(&[
        "--limit-request-line",
        "0",
        "--limit-request-fields",
        "0",
        "--limit-request-field-size",
        "0",
    ]);
    assert_eq!(
        (zero.request_line, zero.fields, zero.field_size),
        (0, 32768, 8190)
    );
}

/// Every setting of the real gunicorn (from the test venv) is a forkscope setting, a hook, or
/// refused by name; and every gunicorn flag is one of ours or a refused one.
#[test]
fn every_gunicorn_setting_is_covered() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = std::process::Command::new(root.join("scripts/python-env"))
        .output()
        .expect("run scripts/python-env");
    assert!(
        venv.status.success(),
        "{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let python =
        std::path::Path::new(String::from_utf8(venv.stdout).unwrap().trim()).join("bin/python");
    let output = std::process::Command::new(python)
        .args([
            "-c",
            "import json; from gunicorn import config; \
             print(json.dumps({s.name: s.cli or [] for s in config.KNOWN_SETTINGS}))",
        ])
        .output()
        .expect("run the venv's Python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let gunicorn: std::collections::BTreeMap<String, Vec<String>> =
        serde_json::from_slice(&output.stdout).unwrap();
    assert!(gunicorn.len() > 50, "gunicorn lists its settings");

    let kinds = setting_kinds();
    let mut command = Settings::command();
    command.build();
    let mut ours: Vec<String> = Vec::new();
    for arg in command.get_arguments() {
        ours.extend(arg.get_short().map(|s| format!("-{s}")));
        ours.extend(arg.get_long().map(|l| format!("--{l}")));
        for alias in arg.get_all_aliases().unwrap_or_default() {
            ours.push(format!("--{alias}"));
        }
    }
    for (name, flags) in &gunicorn {
        let hook = crate::hooks::Hook::from_name(name).is_some();
        let refused = unsupported::by_name(name);
        assert!(
            kinds.contains_key(name) || name == "config" || hook || refused.is_some(),
            "gunicorn setting {name} ({flags:?}) is neither supported nor refused"
        );
        for flag in flags {
            let covered = match refused {
                Some(entry) => entry.flags.contains(&flag.as_str()),
                None => ours.contains(flag),
            };
            assert!(covered, "gunicorn flag {flag} of {name} is not handled");
        }
    }
}

/// Issue 14: a duration or count too large for the server's arithmetic (a deadline of
/// `now + --timeout`) used to be accepted and panic later; each is refused at start-up, from
/// every source, with the setting named and its bound.
#[test]
fn durations_and_counts_beyond_their_range_are_refused_from_every_source() {
    let huge = "18446744073709551615";
    for (flag, name, env, bound) in [
        ("--timeout", "timeout", "FORKSCOPE_TIMEOUT", "31536000"),
        (
            "--graceful-timeout",
            "graceful_timeout",
            "FORKSCOPE_GRACEFUL_TIMEOUT",
            "31536000",
        ),
        (
            "--keep-alive",
            "keepalive",
            "FORKSCOPE_KEEPALIVE",
            "31536000",
        ),
        (
            "--max-requests",
            "max_requests",
            "FORKSCOPE_MAX_REQUESTS",
            "4294967295",
        ),
        (
            "--max-requests-jitter",
            "max_requests_jitter",
            "FORKSCOPE_MAX_REQUESTS_JITTER",
            "4294967295",
        ),
        ("--workers", "workers", "FORKSCOPE_WORKERS", "4096"),
        ("--threads", "threads", "FORKSCOPE_THREADS", "1024"),
    ] {
        let cli = error_of(load_plain(&[&format!("{flag}={huge}")], &[]));
        assert!(cli.contains(flag) && cli.contains(bound), "{flag}: {cli}");
        let from_env = error_of(load_plain(&[], &[(env, huge)]));
        assert!(
            from_env.contains(env) && from_env.contains(bound),
            "{from_env}"
        );
        let (_dir, path) = config_file(&format!("{name} = {huge}\n"));
        let from_file = error_of(load_py(&["-c", &path], &[]));
        assert!(
            from_file.contains(&format!("setting `{name}`")) && from_file.contains(bound),
            "{from_file}"
        );
        // The bound itself is accepted.
        assert!(
            load_plain(&[&format!("{flag}={bound}")], &[]).is_ok(),
            "{flag}={bound}"
        );
    }
}

/// Issue 14: an entry of --forwarded-allow-ips that is not `*`, an address or a network was
/// dropped in the worker, so a typo silently trusted nobody.
#[test]
fn forwarded_allow_ips_entries_must_be_addresses_or_networks() {
    for bad in ["10.0.0.0/33", "localhost", "10.0.0.1/x", "::1/129", "1.2.3"] {
        let error = error_of(load_plain(&["--forwarded-allow-ips", bad], &[]));
        assert!(
            error.contains("--forwarded-allow-ips") && error.contains(bad),
            "{bad}: {error}"
        );
        let error = error_of(load_plain(&[], &[("FORWARDED_ALLOW_IPS", bad)]));
        assert!(error.contains("FORWARDED_ALLOW_IPS"), "{bad}: {error}");
        let (_dir, path) = config_file(&format!("forwarded_allow_ips = ['127.0.0.1', '{bad}']\n"));
        let error = error_of(load_py(&["-c", &path], &[]));
        assert!(
            error.contains("setting `forwarded_allow_ips`"),
            "{bad}: {error}"
        );
    }
    let s = load_plain(
        &["--forwarded-allow-ips", "*,10.0.0.0/8, ::1,2001:db8::/32"],
        &[],
    )
    .unwrap();
    assert_eq!(
        s.forwarded_allow_ips,
        vec!["*", "10.0.0.0/8", "::1", "2001:db8::/32"]
    );
}
