//! The `forkscope` wheel (issue 12): `scripts/wheel` builds it with maturin, pip installs it
//! into a fresh virtualenv, and the `forkscope-server` command installed there serves the key
//! cases of the binary's tests with that venv's interpreter; `import forkscope` there is the
//! module the workers provide.
//!
//! The venv: [`forkscope_tests::wheel`].

use std::path::{Path, PathBuf};
use std::process::Command;

use forkscope_tests::wheel::{command, python, run, venv};
use forkscope_tests::{ServerBuilder, apps_dir, procs, request, server_bin};

use crate::{frameworks, lifecycle, profiler};

/// A server started through the installed command.
fn wheel_server(app: &str) -> ServerBuilder {
    ServerBuilder::new(app).program(&command())
}

/// The venv's `site-packages/forkscope` folder, as its Python reports it.
fn installed_package() -> PathBuf {
    let out = run(Command::new(python())
        .args([
            "-c",
            "import forkscope, os; print(os.path.dirname(forkscope.__file__))",
        ])
        .current_dir(std::env::temp_dir()));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// True when `pid` has the venv's compiled forkscope module mapped.
fn maps_installed_module(pid: i32, package: &Path) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines().any(|l| {
        l.split_whitespace().last().is_some_and(|file| {
            Path::new(file).parent() == Some(package)
                && file
                    .rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with("_native."))
        })
    })
}

#[test]
fn wheel_serves_hello_with_the_venv_interpreter() {
    let package = installed_package();
    assert!(
        package.starts_with(venv()),
        "forkscope imported from {}",
        package.display()
    );
    let s = wheel_server("app:app").workers(2).start();
    let r = request(s.addr, "GET", "/", &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "Hello, World!"));
    // The titles the sidecar discovers processes by, as the binary sets them.
    let leader_title = procs::title(s.pid()).expect("the leader runs");
    assert_eq!(leader_title, "forkscope-server: leader [app:app]");
    let workers = s.workers();
    assert_eq!(workers.iter().map(|w| w.0).collect::<Vec<_>>(), [0, 1]);
    // Leader and workers run the venv's interpreter with the installed extension.
    for pid in std::iter::once(s.pid()).chain(workers.iter().map(|w| w.1)) {
        assert!(
            maps_installed_module(pid, &package),
            "pid {pid} does not map {}/_native.*.so",
            package.display()
        );
    }
}

#[test]
fn wheel_serves_flask() {
    frameworks::flask_serves_routes_and_json(wheel_server);
}

#[test]
fn wheel_serves_django_with_preload() {
    frameworks::django_serves_with_preload(wheel_server);
}

/// USR2 executes the installed command again (its path is `sys.argv[0]`, a script that starts
/// the venv's interpreter), and the new leader takes over the sockets.
#[test]
fn wheel_usr2_upgrades_in_place() {
    lifecycle::usr2_upgrades_in_place(wheel_server);
}

#[test]
fn wheel_forkscope_module_in_the_app() {
    profiler::forkscope_module_in_the_app(wheel_server);
}

/// The command line behaves as the binary's: same output, same exit status.
#[test]
fn wheel_command_line_matches_the_binary() {
    let cases: [&[&str]; 5] = [
        &["--version"],
        &["--check-config", "app:app"],
        &["--check-config", "broken:app"],
        &["--print-config", "-w", "3", "app:app"],
        &["--workers", "0", "app:app"],
    ];
    for args in cases {
        let outputs = [server_bin(), command()].map(|program| {
            let mut cmd = Command::new(&program);
            cmd.args(args)
                .current_dir(apps_dir())
                .env_remove("VIRTUAL_ENV")
                .env_remove("WEB_CONCURRENCY");
            let out = cmd.output().expect("run");
            (out.status.code(), out.stdout)
        });
        assert_eq!(
            outputs[0],
            outputs[1],
            "{args:?}: binary {:?} / installed {:?}\n{}",
            outputs[0].0,
            outputs[1].0,
            String::from_utf8_lossy(&outputs[1].1)
        );
        assert!(outputs[0].0.is_some(), "{args:?} exited by a signal");
    }
}

/// Outside a server, `import forkscope` answers without a worker, and its type stubs declare
/// exactly what the module has.
#[test]
fn wheel_forkscope_module_outside_a_server() {
    let script = r#"
import ast, json, os, forkscope
here = os.path.dirname(forkscope.__file__)
with open(os.path.join(here, "__init__.pyi")) as f:
    stub = ast.parse(f.read())
declared = set()
for node in stub.body:
    if isinstance(node, ast.AnnAssign):
        declared.add(node.target.id)
    elif isinstance(node, ast.FunctionDef):
        declared.add(node.name)
public = {n for n in dir(forkscope) if not n.startswith("_")} | {"__version__"}
print(json.dumps({
    "slot": forkscope.slot,
    "worker_slot": forkscope.worker_slot(),
    "is_tracing": forkscope.is_tracing(),
    "mark": forkscope.mark("outside"),
    "version": forkscope.__version__,
    "py_typed": os.path.isfile(os.path.join(here, "py.typed")),
    "undeclared": sorted(public - declared),
    "missing": sorted(declared - public),
}))
"#;
    let out = run(Command::new(python())
        .args(["-c", script])
        .current_dir(std::env::temp_dir()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v,
        serde_json::json!({
            "slot": null,
            "worker_slot": null,
            "is_tracing": false,
            "mark": null,
            "version": env!("CARGO_PKG_VERSION"),
            "py_typed": true,
            "undeclared": [],
            "missing": [],
        })
    );
}
