//! The pre-fork model on real processes: titles and stable slots, respawn, preload, threads,
//! clean stops and boot failures.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use forkscope_tests::client::parse_one;
use forkscope_tests::{Held, Server, ServerBuilder, procs, request, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn titles_and_slots_follow_the_design() {
    let s = ServerBuilder::new("app:app").workers(3).start();
    let title = procs::title(s.pid()).expect("leader title");
    assert_eq!(title, "forkscope-server: leader [app:app]");
    let workers = s.workers();
    assert_eq!(
        workers.iter().map(|(slot, _)| *slot).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for (slot, pid) in &workers {
        assert_eq!(
            procs::title(*pid).expect("title"),
            format!("forkscope-server: worker {slot} [app:app]")
        );
    }
    // The runtime directory announces every process.
    for (_, pid) in &workers {
        let info: serde_json::Value = serde_json::from_slice(
            &std::fs::read(s.runtime.join(pid.to_string()).join("process.json"))
                .expect("process.json"),
        )
        .expect("json");
        assert_eq!(info["role"], "worker");
        assert_eq!(info["leader_pid"], s.pid());
    }
}

#[test]
fn a_killed_worker_is_replaced_in_the_same_slot() {
    let s = ServerBuilder::new("app:app").workers(2).start();
    let before = s.workers();
    let (slot, victim) = before[1];
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    let after = wait_for("a replacement worker", Duration::from_secs(30), || {
        let w = s.workers();
        (w.len() == 2 && w.iter().all(|(_, p)| *p != victim)).then_some(w)
    });
    assert_eq!(after[0], before[0], "the other worker is untouched");
    assert_eq!(after[1].0, slot, "the replacement takes slot {slot}");
    s.wait_log(
        &format!("Worker (pid:{victim}) was sent SIGKILL"),
        Duration::from_secs(10),
    );
    assert_eq!(request(s.addr, "GET", "/", &[], b"").status, 200);
}

#[test]
fn preload_imports_once_in_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let imports = dir.path().join("imports");
    let s = ServerBuilder::new("counted:app")
        .workers(3)
        .args(&["--preload"])
        .env("FORKSCOPE_TEST_IMPORTS", imports.to_str().expect("utf-8"))
        .start();
    let lines = std::fs::read_to_string(&imports).expect("imports file");
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        vec![s.pid().to_string()],
        "imported once, by the leader"
    );
    drop(s);
    std::fs::remove_file(&imports).expect("reset");
    let s = ServerBuilder::new("counted:app")
        .workers(2)
        .env("FORKSCOPE_TEST_IMPORTS", imports.to_str().expect("utf-8"))
        .start();
    // Workers announce themselves before importing: wait for both imports.
    let text = wait_for(
        "both workers to import the app",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&imports).ok()?;
            (text.lines().count() >= 2).then_some(text)
        },
    );
    let mut pids: Vec<i32> = text.lines().map(|l| l.parse().expect("pid")).collect();
    pids.sort_unstable();
    let mut workers: Vec<i32> = s.workers().into_iter().map(|(_, p)| p).collect();
    workers.sort_unstable();
    assert_eq!(pids, workers, "without preload each worker imports the app");
}

/// The collector's state in the worker that served a request to tests/apps/frozen.py.
fn gc_state(s: &Server) -> serde_json::Value {
    let r = request(s.addr, "GET", "/", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).expect("json")
}

/// Serves tests/apps/frozen.py under --preload with `args`; checks what a worker sees, then
/// reloads (HUP re-imports the app in the leader) and checks a worker of the new generation.
fn check_gc_freeze(args: &[&str], frozen: bool) {
    let s = ServerBuilder::new("frozen:app")
        .args(&["--preload"])
        .args(args)
        .start();
    let check = |state: &serde_json::Value, when: &str| {
        let count = state["freeze_count"].as_u64().expect("freeze count");
        if frozen {
            assert!(count > 0, "{when}: nothing frozen in the worker: {state}");
        } else {
            assert_eq!(count, 0, "{when}: frozen although switched off: {state}");
        }
        assert_eq!(
            state["gc_enabled"], true,
            "{when}: the collector runs in workers: {state}"
        );
    };
    let before = gc_state(&s);
    check(&before, "after start");
    s.signal(Signal::SIGHUP);
    let after = wait_for(
        "a worker with the re-imported app",
        Duration::from_secs(60),
        || {
            let state = gc_state(&s);
            (state["import_id"] != before["import_id"]).then_some(state)
        },
    );
    check(&after, "after HUP");
    assert_eq!(
        after["frozen_at_import"], 0,
        "the old app is unfrozen before the re-import: {after}"
    );
}

/// `--preload` imports the app in the leader and freezes it (gc.freeze) before forking, so the
/// workers' collector leaves the shared pages alone; a HUP re-import freezes the new app.
#[test]
fn preload_gc_freezes_the_app_for_the_workers_and_again_after_hup() {
    check_gc_freeze(&[], true);
}

/// `--no-gc-freeze` leaves the preloaded app unfrozen, before and after a reload.
#[test]
fn no_gc_freeze_leaves_the_preloaded_app_unfrozen() {
    check_gc_freeze(&["--no-gc-freeze"], false);
}

/// With --threads, requests run at once in one worker, also from clients that connected while
/// only one thread was free: that thread took both, and before it runs one request the other
/// client's connection goes to the thread that is free by then.
#[test]
fn threads_run_requests_concurrently_in_one_worker() {
    let s = ServerBuilder::new("app:app")
        .args(&["--threads", "2"])
        .start();
    let addr = s.addr;
    let held = Held::start(addr);
    // The other thread accepts both new clients (the busy one cannot).
    let mut clients: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    wait_for("both clients accepted", Duration::from_secs(30), || {
        (procs::accept_queue(addr.port()) == Some(0)).then_some(())
    });
    assert_eq!(held.release().text(), "released");
    // Both threads are free now; the barrier opens only with both requests inside the app.
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        c.write_all(b"GET /barrier?n=2&t=30 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
    }
    for mut c in clients {
        let mut out = Vec::new();
        c.read_to_end(&mut out).expect("read");
        let (r, _) = parse_one(&out, false).expect("response");
        assert_eq!(r.text(), "met", "both requests were in the app at once");
    }
    let env: serde_json::Value =
        serde_json::from_slice(&request(addr, "GET", "/environ", &[], b"").body).expect("json");
    assert_eq!(env["wsgi.multithread"], true);
}

#[test]
fn term_stops_everything_cleanly() {
    let mut s = ServerBuilder::new("app:app").workers(2).start();
    let workers: Vec<i32> = s.workers().into_iter().map(|(_, p)| p).collect();
    s.signal(Signal::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(40)), Some(0));
    for w in workers {
        wait_for("workers to exit", Duration::from_secs(10), || {
            (!procs::alive(w)).then_some(())
        });
    }
}

#[test]
fn an_app_that_cannot_import_stops_the_leader_with_its_traceback() {
    // Under --preload the leader itself fails.
    let mut s = ServerBuilder::new("broken:app")
        .args(&["--preload"])
        .no_wait()
        .start();
    let code = s.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0));
    assert!(
        s.log_text()
            .contains("ImportError: this module is broken on purpose"),
        "{}",
        s.log_text()
    );
    // Without preload the workers fail at boot; the leader backs off, then gives up.
    let mut s = ServerBuilder::new("broken:app").no_wait().start();
    let code = s.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(4));
    let log = s.log_text();
    assert!(
        log.contains("ImportError: this module is broken on purpose"),
        "{log}"
    );
    assert!(log.contains("failed to boot"), "{log}");
}
