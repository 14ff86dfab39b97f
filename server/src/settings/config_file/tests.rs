//! Config-file evaluation against real CPython: a realistic gunicorn.conf.py, hooks and their
//! arities, module form, errors.

use std::io::Write as _;

use pyo3::prelude::*;
use pyo3::types::PyList;

use super::*;
use crate::hooks::Hook;
use crate::settings::load::setting_kinds;

fn write_config(dir: &tempfile::TempDir, name: &str, body: &str) -> String {
    let path = dir.path().join(name);
    let mut file = std::fs::File::create(&path).expect("create config file");
    file.write_all(body.as_bytes()).expect("write config file");
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

fn evaluate_body(body: &str) -> Result<ConfigFile, ConfigError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(&dir, "gunicorn.conf.py", body);
    Python::initialize();
    Python::attach(|py| evaluate(py, &path, &setting_kinds()))
}

const REALISTIC: &str = r#"
# A gunicorn.conf.py as people write them.
import multiprocessing
import os

bind = ["0.0.0.0:8000", "unix:/tmp/app.sock"]
workers = int(os.environ.get("NO_SUCH_VARIABLE_HOPEFULLY", 4))
threads = 2
timeout = 60
keepalive = 5
accesslog = "-"
loglevel = "info"
preload_app = True
max_requests = 1000
max_requests_jitter = 50
proc_name = "shop"

calls = []

def on_starting(server):
    calls.append(("on_starting", server))

def when_ready(server):
    calls.append(("when_ready", server))

def pre_fork(server, worker):
    calls.append(("pre_fork", worker))

def post_fork(server, worker):
    calls.append(("post_fork", worker))

def post_worker_init(worker):
    pass

def worker_int(worker):
    pass

def worker_abort(worker):
    pass

def pre_request(worker, req):
    pass

def post_request(worker, req):
    calls.append(("post_request", worker, req))

def child_exit(server, worker):
    pass

def worker_exit(server, worker):
    pass

def nworkers_changed(server, new_value, old_value):
    calls.append(("nworkers_changed", new_value, old_value))

on_exit = lambda server: None
pre_exec = lambda server: None
on_reload = lambda server: None
"#;

#[test]
fn realistic_config_file_settings_and_hooks() {
    let file = evaluate_body(REALISTIC).unwrap();
    let values: BTreeMap<&str, &ConfigValue> =
        file.values.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(
        values["bind"],
        &ConfigValue::Values(vec!["0.0.0.0:8000".into(), "unix:/tmp/app.sock".into()])
    );
    assert_eq!(values["workers"], &ConfigValue::Values(vec!["4".into()]));
    assert_eq!(values["preload_app"], &ConfigValue::Flag(true));
    assert_eq!(values["accesslog"], &ConfigValue::Values(vec!["-".into()]));
    assert!(
        !values.contains_key("calls"),
        "non-setting globals are ignored"
    );
    assert!(!values.contains_key("multiprocessing"));
    for hook in Hook::ALL {
        assert!(
            file.hooks.get(hook).is_some(),
            "hook {hook:?} was not collected"
        );
    }

    Python::attach(|py| {
        let hooks = file.hooks.clone_ref(py);
        let call = |hook: Hook, args: Vec<&str>| {
            let args = pyo3::types::PyTuple::new(py, args).unwrap();
            hooks.get(hook).unwrap().call1(py, args).unwrap();
        };
        call(Hook::OnStarting, vec!["server"]);
        call(Hook::PreFork, vec!["server", "worker-0"]);
        // post_request is always called with four arguments; the file's two-argument
        // version is wrapped, as gunicorn does.
        call(
            Hook::PostRequest,
            vec!["worker-0", "req", "environ", "resp"],
        );
        call(Hook::NworkersChanged, vec!["server", "3", "2"]);
        let module_calls = hooks
            .get(Hook::OnStarting)
            .unwrap()
            .getattr(py, "__globals__")
            .unwrap()
            .call_method1(py, "__getitem__", ("calls",))
            .unwrap();
        let calls = module_calls.bind(py).cast::<PyList>().unwrap().to_string();
        assert_eq!(
            calls,
            "[('on_starting', 'server'), ('pre_fork', 'worker-0'), \
             ('post_request', 'worker-0', 'req'), ('nworkers_changed', '3', '2')]"
        );
    });
}

#[test]
fn file_is_run_as_gunicorn_does() {
    let file =
        evaluate_body("import os\nbind = os.path.basename(__file__)\nproc_name = __name__\n")
            .unwrap();
    assert_eq!(
        file.values,
        vec![
            (
                "bind".to_owned(),
                ConfigValue::Values(vec!["gunicorn.conf.py".into()])
            ),
            (
                "proc_name".to_owned(),
                ConfigValue::Values(vec!["__config__".into()])
            ),
        ]
    );
}

#[test]
fn post_request_with_three_or_four_arguments() {
    let file = evaluate_body(
        "seen = []\ndef post_request(worker, req, environ):\n    seen.append(environ)\n",
    )
    .unwrap();
    Python::attach(|py| {
        let hook = file.hooks.get(Hook::PostRequest).unwrap();
        hook.call1(py, (1, 2, "env", 4)).unwrap();
    });
    let file = evaluate_body("def post_request(worker, req, environ, resp):\n    pass\n").unwrap();
    assert!(file.hooks.get(Hook::PostRequest).is_some());
    let error = evaluate_body("def post_request(worker):\n    pass\n").unwrap_err();
    assert!(error.to_string().contains("2 to 4"), "{error}");
}

#[test]
fn hooks_with_the_wrong_arity_or_type_are_refused() {
    for (body, needle) in [
        (
            "def post_fork(server):\n    pass\n",
            "hook `post_fork` in config file",
        ),
        (
            "def when_ready(server, extra):\n    pass\n",
            "must take 1 positional",
        ),
        (
            "nworkers_changed = lambda server: None\n",
            "must take 3 positional",
        ),
        ("on_starting = 42\n", "must be callable, not int (42)"),
        ("on_exit = 'nodots'\n", "cannot be resolved"),
        (
            "pre_request = 'no_such_module_xyz.fn'\n",
            "ModuleNotFoundError",
        ),
    ] {
        let error = evaluate_body(body).unwrap_err();
        assert!(
            matches!(error, ConfigError::BadHook { .. }),
            "{body}: {error:?}"
        );
        assert!(error.to_string().contains(needle), "{body}: {error}");
    }
}

#[test]
fn hooks_by_dotted_name_and_varargs() {
    let file = evaluate_body(
        "on_starting = 'json.dumps'\ndef worker_exit(*args):\n    pass\n\
         class Hook:\n    def __call__(self, worker):\n        pass\nworker_int = Hook()\n",
    )
    .unwrap();
    assert!(file.hooks.get(Hook::OnStarting).is_some());
    assert!(file.hooks.get(Hook::WorkerExit).is_some());
    assert!(file.hooks.get(Hook::WorkerInt).is_some());
}

#[test]
fn unsupported_hooks_are_refused() {
    let error =
        evaluate_body("def ssl_context(config, default):\n    return default\n").unwrap_err();
    assert!(
        error.to_string().starts_with("ssl_context (in config file"),
        "{error}"
    );
}

#[test]
fn a_raising_file_gives_the_traceback() {
    let error = evaluate_body("import no_such_module_for_forkscope\n").unwrap_err();
    let ConfigError::Raised { traceback, .. } = &error else {
        panic!("expected Raised, got {error:?}");
    };
    assert!(traceback.contains("ModuleNotFoundError"), "{traceback}");
    assert!(
        traceback.contains("gunicorn.conf.py\", line 1"),
        "{traceback}"
    );
    let error = evaluate_body("workers = (\n").unwrap_err();
    assert!(error.to_string().contains("SyntaxError"), "{error}");
}

#[test]
fn python_module_form() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_config(&dir, "forkscope_test_conf_mod.py", "workers = 9\n");
    Python::initialize();
    let file = Python::attach(|py| {
        let sys_path = py.import("sys")?.getattr("path")?;
        sys_path.call_method1("insert", (0, dir.path().to_str().unwrap()))?;
        let file = evaluate(py, "python:forkscope_test_conf_mod", &setting_kinds());
        sys_path.call_method1("remove", (dir.path().to_str().unwrap(),))?;
        PyResult::Ok(file)
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        file.values,
        vec![("workers".to_owned(), ConfigValue::Values(vec!["9".into()]))]
    );
    let error = Python::attach(|py| evaluate(py, "python:no_such_conf_module", &setting_kinds()))
        .unwrap_err();
    assert!(error.to_string().contains("ModuleNotFoundError"), "{error}");
}

#[test]
fn hook_table_matches_gunicorn() {
    let table: Vec<(&str, usize)> = Hook::ALL.iter().map(|h| (h.name(), h.arity())).collect();
    assert_eq!(
        table,
        [
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
        ]
    );
}
