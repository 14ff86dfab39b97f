//! The profiler inside real workers (issue 4): real server binary, real CPython, real SIGUSR2.
//!
//! Workers are found through `/proc` (children of the leader whose title says `worker N`); the
//! tests ring the doorbell with `kill(pid, SIGUSR2)`, write command files the way the sidecar
//! does, and read the JSON results the worker writes into the runtime directory.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use forkscope_protocol::{
    Action, Command, CommandResult, GroupBy, HeapDiff, Outcome, RuntimeDir, read_json_limited,
    write_json_atomic,
};
use forkscope_tests::{Server, ServerBuilder, procs, request, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The line of tests/apps/leaky.py that allocates what the app keeps (`# LEAK`).
fn leak_line() -> u32 {
    let source = std::fs::read_to_string(forkscope_tests::apps_dir().join("leaky.py"))
        .expect("read leaky.py");
    let index = source
        .lines()
        .position(|l| l.trim_end().ends_with("# LEAK"))
        .expect("leaky.py marks its leak with # LEAK");
    u32::try_from(index + 1).expect("a short file")
}

fn runtime(server: &Server) -> RuntimeDir {
    RuntimeDir::new(&server.runtime)
}

/// The workers as (slot, pid), once each catches SIGUSR2 (its doorbell is installed).
///
/// A worker's title appears before its handlers are installed; until then SIGUSR2 has its
/// default action, which would kill it. `/proc/PID/status` tells (`SigCgt`), so a ring is never
/// sent early (the sidecar can use the same check).
fn worker_pids(server: &Server) -> Vec<(u32, i32)> {
    wait_for("every worker's doorbell", TIMEOUT, || {
        let workers = server.workers();
        (!workers.is_empty() && workers.iter().all(|(_, pid)| catches_usr2(*pid)))
            .then_some(workers)
    })
}

/// True when `pid` has a handler for SIGUSR2 (bit 11 of `SigCgt` in `/proc/PID/status`).
fn catches_usr2(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGUSR2 - 1)) != 0)
}

fn ring(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGUSR2).expect("ring the doorbell");
}

/// Writes a command for worker `pid` and rings its doorbell, as the sidecar does.
fn send(server: &Server, pid: i32, cmd: &Command) {
    write_json_atomic(&runtime(server).command(pid as u32), cmd).expect("write command");
    ring(pid);
}

fn command(id: &str, action: Action) -> Command {
    Command::new(id, action)
}

/// Waits for `results/{id}.{action}.json` of worker `pid` and parses it.
fn await_result(server: &Server, pid: i32, id: &str, action: Action) -> CommandResult {
    let path = runtime(server).result(pid as u32, id, action);
    await_path(server, &path)
}

fn await_path(server: &Server, path: &Path) -> CommandResult {
    wait_for(&format!("{}", path.display()), TIMEOUT, || {
        read_json_limited::<CommandResult>(path, 64 << 20).ok()
    });
    read_json_limited(path, 64 << 20).unwrap_or_else(|e| {
        panic!(
            "result {}: {e}\nlog:\n{}",
            path.display(),
            server.log_text()
        )
    })
}

/// Result files of worker `pid` whose names start with `prefix` and end with `suffix`.
fn results_named(server: &Server, pid: i32, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let dir = runtime(server).results_dir(pid as u32);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    name.is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn heap_diff(result: CommandResult) -> HeapDiff {
    match result.outcome {
        Outcome::HeapDiff(diff) => diff,
        other => panic!("expected a heap diff, got {other:?}"),
    }
}

fn get(server: &Server, path: &str) -> String {
    let r = request(server.addr, "GET", path, &[], b"");
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.text()
}

/// The top site of a diff is the leak line, and it grew by about `n` objects.
fn assert_leak_on_top(diff: &HeapDiff, n: i64) {
    let line = leak_line();
    let top = diff.sites.first().expect("a site");
    let frame = &top.traceback[0];
    assert!(
        frame.filename.ends_with("leaky.py") && frame.lineno == line,
        "top site is {} (expected leaky.py:{line}); sites: {:#?}",
        frame.location(),
        diff.sites.iter().take(5).collect::<Vec<_>>()
    );
    // Each bytearray is two blocks (object and buffer) of at least 10 kB together.
    assert!(top.count_diff >= n, "{top:?}");
    assert!(top.size_diff >= n * 10_000, "{top:?}");
}

/// Start, N requests, capture; then more requests, capture again: the top site is the leak
/// line and its growth follows N.
fn leak_grows_with_requests(preload: bool) {
    let mut builder = ServerBuilder::new("leaky:app");
    if preload {
        builder = builder.args(&["--preload"]);
    }
    let server = builder.start();
    let (slot, pid) = worker_pids(&server)[0];
    send(&server, pid, &command("s", Action::Start));
    let started = await_result(&server, pid, "s", Action::Start);
    assert_eq!((started.pid, started.slot), (pid as u32, slot));
    assert!(matches!(
        started.outcome,
        Outcome::Started {
            frames: 1,
            pss_bytes: Some(_)
        }
    ));

    for _ in 0..50 {
        get(&server, "/leak");
    }
    send(&server, pid, &command("c50", Action::Capture));
    let d50 = heap_diff(await_result(&server, pid, "c50", Action::Capture));
    for _ in 0..150 {
        get(&server, "/leak");
    }
    let mut cmd = command("c200", Action::Capture);
    cmd.group_by = GroupBy::Traceback;
    cmd.top = 5;
    send(&server, pid, &cmd);
    let d200 = heap_diff(await_result(&server, pid, "c200", Action::Capture));

    assert_leak_on_top(&d50, 50);
    assert_leak_on_top(&d200, 200);
    let (s50, s200) = (d50.sites[0].size_diff, d200.sites[0].size_diff);
    assert!(
        s200 >= 3 * s50 && s200 <= 5 * s50,
        "growth should follow N (50 → 200): {s50} → {s200}"
    );
    assert!(d200.sites.len() <= 5);
    assert_eq!(d200.group_by, GroupBy::Traceback);
    assert!(d200.total_size_diff >= s200);
    assert!(d200.pss_after_bytes.is_some() && d200.pss_before_bytes.is_some());
    assert!(d200.traced_after.current > d200.traced_before.current);
    assert!(d200.tracemalloc_overhead_bytes > 0);

    send(&server, pid, &command("x", Action::Stop));
    assert_eq!(
        await_result(&server, pid, "x", Action::Stop).outcome,
        Outcome::Stopped
    );
    let slot_info: serde_json::Value = serde_json::from_str(&get(&server, "/slot")).expect("json");
    assert_eq!(slot_info["is_tracing"], false);
    assert_eq!(worker_pids(&server)[0].1, pid, "the worker kept serving");
}

#[test]
fn profiler_leak_grows_with_requests() {
    leak_grows_with_requests(false);
}

#[test]
fn profiler_leak_grows_with_requests_preloaded() {
    leak_grows_with_requests(true);
}

/// A ring sent as soon as a worker's title appears (before its doorbell is installed) is
/// answered once the worker is up; it never kills the worker.
#[test]
fn profiler_ring_during_boot_is_answered() {
    let mut server = ServerBuilder::new("leaky:app").no_wait().start();
    let (_, pid) = wait_for("a worker title", TIMEOUT, || {
        server.assert_running();
        server.workers().first().copied()
    });
    ring(pid);
    let start = wait_for("a manual start result", TIMEOUT, || {
        results_named(&server, pid, "manual-", ".start.json").pop()
    });
    assert!(matches!(
        await_path(&server, &start).outcome,
        Outcome::Started { .. }
    ));
    assert_eq!(
        worker_pids(&server)[0].1,
        pid,
        "the worker survived the early ring"
    );
}

/// The manual habit: `kill -USR2` twice. The first starts, the second writes
/// `manual-….capture.json`, logs its path and stops tracing.
#[test]
fn profiler_bare_doorbell_toggles() {
    let server = ServerBuilder::new("leaky:app").start();
    let (_, pid) = worker_pids(&server)[0];
    ring(pid);
    let start = wait_for("a manual start result", TIMEOUT, || {
        results_named(&server, pid, "manual-", ".start.json").pop()
    });
    let started = await_path(&server, &start);
    assert!(
        matches!(started.outcome, Outcome::Started { frames: 10, .. }),
        "{started:?}"
    );
    let tracing: serde_json::Value = serde_json::from_str(&get(&server, "/slot")).expect("json");
    assert_eq!(tracing["is_tracing"], true);

    for _ in 0..40 {
        get(&server, "/leak");
    }
    ring(pid);
    let capture = wait_for("a manual capture result", TIMEOUT, || {
        results_named(&server, pid, "manual-", ".capture.json").pop()
    });
    let result = await_path(&server, &capture);
    assert_eq!(
        capture.file_name(),
        start
            .file_name()
            .map(|n| n.to_string_lossy().replace(".start.", ".capture."))
            .as_deref()
            .map(std::ffi::OsStr::new),
        "the capture pairs with its start"
    );
    let diff = heap_diff(result);
    assert_eq!(diff.frames, 10);
    assert_leak_on_top(&diff, 40);
    server.wait_log(&capture.display().to_string(), TIMEOUT);
    let tracing: serde_json::Value = serde_json::from_str(&get(&server, "/slot")).expect("json");
    assert_eq!(
        tracing["is_tracing"], false,
        "the second ring stops tracing"
    );
}

/// The doorbell is answered while the worker is inside a long request (sleeping in
/// `time.sleep`), not after it: start and capture both happen before the request ends.
#[test]
fn profiler_doorbell_answered_inside_a_long_request() {
    let server = ServerBuilder::new("leaky:app").start();
    let (_, pid) = worker_pids(&server)[0];
    let gate = tempfile::tempdir().expect("tempdir");
    let dir = gate.path().to_owned();
    let addr = server.addr;
    let url = format!("/block?dir={}&n=120", dir.display());
    let long = thread::spawn(move || request(addr, "GET", &url, &[], b""));
    wait_for("the long request to begin", TIMEOUT, || {
        dir.join("entered").exists().then_some(())
    });

    send(&server, pid, &command("in-start", Action::Start));
    await_result(&server, pid, "in-start", Action::Start);
    std::fs::write(dir.join("go1"), b"").expect("go1");
    wait_for("the leak inside the request", TIMEOUT, || {
        dir.join("leaked").exists().then_some(())
    });
    send(&server, pid, &command("in-capture", Action::Capture));
    let diff = heap_diff(await_result(&server, pid, "in-capture", Action::Capture));
    assert!(!long.is_finished(), "the request is still running");
    assert_leak_on_top(&diff, 120);

    send(&server, pid, &command("in-stacks", Action::Stacks));
    let Outcome::Stacks { threads } =
        await_result(&server, pid, "in-stacks", Action::Stacks).outcome
    else {
        panic!("expected stacks");
    };
    let main = threads
        .iter()
        .find(|t| t.name == "MainThread")
        .expect("main thread");
    let functions: Vec<&str> = main
        .frames
        .iter()
        .filter_map(|f| f.function.as_deref())
        .collect();
    assert!(
        functions.ends_with(&["app", "block", "_wait_for"]),
        "outermost first, the request innermost: {functions:?}"
    );

    std::fs::write(dir.join("go2"), b"").expect("go2");
    let response = long.join().expect("request thread");
    assert_eq!(response.status, 200);
    send(&server, pid, &command("in-stop", Action::Stop));
    await_result(&server, pid, "in-stop", Action::Stop);
}

/// An app that installs its own SIGUSR2 handler at import: in workers SIGUSR2 stays the
/// doorbell, the worker lives, and the app's handler does not run.
fn app_handler_does_not_steal_the_doorbell(preload: bool) {
    let mut builder = ServerBuilder::new("leaky:app").env("LEAKY_OWN_USR2", "1");
    if preload {
        builder = builder.args(&["--preload"]);
    }
    let server = builder.start();
    let (_, pid) = worker_pids(&server)[0];
    send(&server, pid, &command("own", Action::Stacks));
    await_result(&server, pid, "own", Action::Stacks);
    assert!(procs::alive(pid));
    assert_eq!(get(&server, "/own-usr2"), "0");
    assert_eq!(worker_pids(&server)[0].1, pid);
}

#[test]
fn profiler_app_usr2_handler_at_import_preloaded() {
    app_handler_does_not_steal_the_doorbell(true);
}

#[test]
fn profiler_app_usr2_handler_at_import() {
    app_handler_does_not_steal_the_doorbell(false);
}

/// Garbage, oversized and invalid command files get error results; the worker keeps serving.
#[test]
fn profiler_bad_command_files_get_error_results() {
    let server = ServerBuilder::new("leaky:app").start();
    let (_, pid) = worker_pids(&server)[0];
    let rt = runtime(&server);

    std::fs::write(rt.command(pid as u32), b"\x00\xffgarbage{{").expect("garbage");
    ring(pid);
    let garbage = wait_for("an error result for garbage", TIMEOUT, || {
        results_named(&server, pid, "invalid-", ".invalid.json").pop()
    });
    let r = await_path(&server, &garbage);
    assert!(
        matches!(&r.outcome, Outcome::Error { reason } if reason.contains("not JSON")),
        "{r:?}"
    );

    let mut big = br#"{"version":1,"request_id":"big","action":"start","x":""#.to_vec();
    big.resize(1 << 20, b'x');
    std::fs::write(rt.command(pid as u32), &big).expect("oversized");
    ring(pid);
    wait_for("an error result for the oversized file", TIMEOUT, || {
        (results_named(&server, pid, "invalid-", ".invalid.json").len() == 2).then_some(())
    });
    assert!(
        !rt.command(pid as u32).exists(),
        "the oversized file is removed"
    );

    std::fs::write(
        rt.command(pid as u32),
        br#"{"version":1,"request_id":"dance-1","action":"dance"}"#,
    )
    .expect("unknown action");
    ring(pid);
    let r = await_result(&server, pid, "dance-1", Action::Invalid);
    assert!(
        matches!(&r.outcome, Outcome::Error { reason } if reason.contains("dance")),
        "{r:?}"
    );

    send(&server, pid, &command("cap", Action::Capture));
    let r = await_result(&server, pid, "cap", Action::Capture);
    assert!(matches!(&r.outcome, Outcome::Error { reason } if reason.contains("not tracing")));

    assert_eq!(get(&server, "/"), "Hello, World!");
    assert_eq!(worker_pids(&server)[0].1, pid, "the worker survived");
}

/// Two workers traced at once: each result names its own pid and slot; a worker that was not
/// started is not tracing.
#[test]
fn profiler_two_workers_traced_at_once() {
    let server = ServerBuilder::new("leaky:app").workers(2).start();
    let workers = worker_pids(&server);
    assert_eq!(workers.len(), 2);
    for (_, pid) in &workers {
        send(&server, *pid, &command("both", Action::Start));
    }
    for (slot, pid) in &workers {
        let r = await_result(&server, *pid, "both", Action::Start);
        assert_eq!((r.pid, r.slot), (*pid as u32, *slot));
    }
    for _ in 0..100 {
        get(&server, "/leak");
    }
    for (_, pid) in &workers {
        send(&server, *pid, &command("both", Action::Capture));
    }
    let mut grown = 0;
    for (slot, pid) in &workers {
        let r = await_result(&server, *pid, "both", Action::Capture);
        assert_eq!((r.pid, r.slot), (*pid as u32, *slot));
        let diff = heap_diff(r);
        grown += diff
            .sites
            .iter()
            .filter(|s| s.traceback[0].lineno == leak_line())
            .map(|s| s.count_diff)
            .sum::<i64>();
    }
    assert!(
        grown >= 100,
        "the 100 leaks are split between the two workers: {grown}"
    );
    for (_, pid) in &workers {
        send(&server, *pid, &command("both", Action::Stop));
        await_result(&server, *pid, "both", Action::Stop);
    }

    // Only one traced: the other one is left alone.
    let (_, first) = workers[0];
    let (_, second) = workers[1];
    send(&server, first, &command("one", Action::Start));
    await_result(&server, first, "one", Action::Start);
    send(&server, second, &command("one", Action::Capture));
    let r = await_result(&server, second, "one", Action::Capture);
    assert!(matches!(&r.outcome, Outcome::Error { reason } if reason.contains("not tracing")));
}

/// `forkscope` inside the app: the slot, `is_tracing`, and `mark`.
#[test]
fn profiler_forkscope_module_in_the_app() {
    forkscope_module_in_the_app(ServerBuilder::new);
}

/// `forkscope` inside a preloaded app served by the server `server(app)` starts (tests/wheel.rs
/// passes the command a wheel installed).
pub(crate) fn forkscope_module_in_the_app(server: fn(&str) -> ServerBuilder) {
    let server = server("leaky:app").args(&["--preload"]).start();
    let (slot, pid) = worker_pids(&server)[0];
    let info: serde_json::Value = serde_json::from_str(&get(&server, "/slot")).expect("json");
    assert_eq!(
        info["slot_at_import"],
        serde_json::Value::Null,
        "imported in the leader"
    );
    assert_eq!(info["slot"], slot);
    assert_eq!(info["worker_slot"], slot);
    assert_eq!(info["is_tracing"], false);
    assert_eq!(get(&server, "/mark?label=idle"), "None");

    send(&server, pid, &command("m", Action::Start));
    await_result(&server, pid, "m", Action::Start);
    for _ in 0..30 {
        get(&server, "/leak");
    }
    let path = PathBuf::from(get(&server, "/mark?label=after%20leak"));
    assert!(
        path.ends_with("mark-after_leak-1.capture.json"),
        "{}",
        path.display()
    );
    let diff = heap_diff(await_path(&server, &path));
    assert_leak_on_top(&diff, 30);
}

/// A worker that exits while tracing leaves a result that says so.
#[test]
fn profiler_worker_exit_while_tracing() {
    let server = ServerBuilder::new("leaky:app").start();
    let (slot, pid) = worker_pids(&server)[0];
    send(&server, pid, &command("gone", Action::Start));
    await_result(&server, pid, "gone", Action::Start);
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("TERM the worker");
    let r = await_result(&server, pid, "gone", Action::Exit);
    assert!(
        matches!(r.outcome, Outcome::ExitedWhileTracing { .. }),
        "{r:?}"
    );
    assert_eq!(r.slot, slot);
    wait_for("the replacement worker", TIMEOUT, || {
        worker_pids(&server)
            .iter()
            .any(|(s, p)| *s == slot && *p != pid)
            .then_some(())
    });
}

/// docs/profile-result.schema.json and docs/profile-command.schema.json are generated from the
/// protocol types; set FORKSCOPE_UPDATE_DOCS=1 to rewrite them (any other value compares).
#[test]
fn profiler_documented_schemas_are_current() {
    let update = std::env::var_os("FORKSCOPE_UPDATE_DOCS").is_some_and(|v| v == "1");
    let docs = forkscope_tests::repo_root().join("docs");
    let expected = [
        (
            "profile-result.schema.json",
            schemars::schema_for!(CommandResult),
        ),
        (
            "profile-command.schema.json",
            schemars::schema_for!(Command),
        ),
    ];
    for (name, schema) in expected {
        let path = docs.join(name);
        let text = serde_json::to_string_pretty(&schema).expect("schema serializes") + "\n";
        if update {
            std::fs::write(&path, &text).expect("write schema");
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "{} is stale: run `FORKSCOPE_UPDATE_DOCS=1 cargo test -p forkscope-tests profiler_documented`",
            path.display()
        );
    }
}

/// An idle worker answers `stacks` from its event loop: the main thread is listed, current,
/// with no Python frames.
#[test]
fn profiler_stacks_of_an_idle_worker() {
    let server = ServerBuilder::new("leaky:app").start();
    let (_, pid) = worker_pids(&server)[0];
    send(&server, pid, &command("idle", Action::Stacks));
    let Outcome::Stacks { threads } = await_result(&server, pid, "idle", Action::Stacks).outcome
    else {
        panic!("expected stacks");
    };
    let main = &threads[0];
    assert_eq!(main.name, "MainThread", "{threads:?}");
    assert!(main.current && main.frames.is_empty(), "{main:?}");
}

/// With `--threads`, requests run on several threads: marks from request threads and captures
/// from the doorbell see the same session, and the leak is found.
#[test]
fn profiler_threaded_worker() {
    let server = ServerBuilder::new("leaky:app")
        .args(&["--threads", "4"])
        .start();
    let (_, pid) = worker_pids(&server)[0];
    send(&server, pid, &command("t", Action::Start));
    await_result(&server, pid, "t", Action::Start);
    let addr = server.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..25 {
                    assert_eq!(request(addr, "GET", "/leak", &[], b"").status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let path = PathBuf::from(get(&server, "/mark?label=threads"));
    assert_leak_on_top(&heap_diff(await_path(&server, &path)), 100);
    send(&server, pid, &command("t", Action::Capture));
    assert_leak_on_top(
        &heap_diff(await_result(&server, pid, "t", Action::Capture)),
        100,
    );
}

/// A worker retiring at `--max-requests` while tracing leaves an exit result too.
#[test]
fn profiler_worker_retiring_while_tracing() {
    let server = ServerBuilder::new("leaky:app")
        .args(&["--max-requests", "20"])
        .start();
    let (slot, pid) = worker_pids(&server)[0];
    send(&server, pid, &command("retire", Action::Start));
    await_result(&server, pid, "retire", Action::Start);
    // The start itself served no request: the next 20 retire the worker.
    for _ in 0..20 {
        get(&server, "/leak");
    }
    let r = await_result(&server, pid, "retire", Action::Exit);
    assert!(
        matches!(r.outcome, Outcome::ExitedWhileTracing { .. }),
        "{r:?}"
    );
    assert_eq!((r.pid, r.slot), (pid as u32, slot));
}
