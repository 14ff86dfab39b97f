//! The leader's lifecycle on the real binary: reload (HUP), upgrade (USR2), scaling (TTIN/TTOU),
//! recycling (max-requests), timeouts with stack traces, graceful stops, log rotation (USR1),
//! WINCH, gunicorn config-file hooks, and the preload signal trap removed.
//!
//! The zero-failure tests run a bounded load from a client thread ([`Load`]) across the event
//! and count every request that did not get a 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use forkscope_tests::client::parse_one;
use forkscope_tests::{Server, ServerBuilder, procs, request, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The app these tests serve, written into the test's own folder (so HUP can change it).
fn app_source(version: &str) -> String {
    format!(
        r#"import os, time
from urllib.parse import parse_qs

VERSION = "{version}"


def app(environ, start_response):
    path = environ["PATH_INFO"]
    q = {{k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}}
    if path == "/slow":
        with open(q["marker"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(float(q.get("s", "1")))
        body = b"slow done"
    elif path == "/pid":
        body = str(os.getpid()).encode()
    elif path == "/error":
        raise RuntimeError("lifecycle error " + q.get("tag", ""))
    else:
        body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#
    )
}

/// A folder holding `lc_app.py` (and whatever a test adds).
fn app_dir(version: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("lc_app.py"), app_source(version)).expect("write app");
    dir
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// One `GET path` on a new connection; the body on a 200, else why not.
fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    match parse_one(&out, false) {
        Some((r, _)) if r.status == 200 => Ok(r.text()),
        Some((r, _)) => Err(format!("status {}", r.status)),
        None => Err(format!(
            "no response ({:?})",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        )),
    }
}

/// A keep-alive client: one connection reused until the server answers `Connection: close`.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<TcpStream>,
}

impl KeepAlive {
    /// `GET /` on the kept connection (a new one when there is none). A connection that ends
    /// without answering a request it took is a failed request.
    fn get(&mut self) -> Result<String, String> {
        let mut s = match self.conn.take() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                    .map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                s
            }
        };
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .map_err(|e| format!("keep-alive write: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((r, _)) = parse_one(&buf, false)
                && r.header("content-length").is_some()
            {
                if r.status != 200 {
                    return Err(format!("keep-alive status {}", r.status));
                }
                if !r
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    self.conn = Some(s);
                }
                return Ok(r.text());
            }
            match s.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "keep-alive connection closed after {} bytes",
                        buf.len()
                    ));
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("keep-alive read: {e}")),
            }
        }
    }
}

/// Two client threads sending `GET /` one after another until stopped, one on a new
/// connection per request, one on a kept-alive connection; counts what failed.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handles: Vec<JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let handles = [false, true]
            .into_iter()
            .map(|keep_alive| {
                let flag = Arc::clone(&stop);
                let counter = Arc::clone(&done);
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    let mut kept = KeepAlive { addr, conn: None };
                    // Bounded: at most 100k requests, paced so the server keeps some CPU.
                    for _ in 0..100_000 {
                        if flag.load(Ordering::SeqCst) {
                            break;
                        }
                        let answer = if keep_alive {
                            kept.get()
                        } else {
                            get(addr, "/")
                        };
                        match answer {
                            Ok(_) => ok += 1,
                            Err(e) => failed.push(e),
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    (ok, failed)
                })
            })
            .collect();
        Self {
            stop,
            done,
            handles,
        }
    }

    /// Waits until `n` more requests have completed (so the load spans what came before).
    fn wait_requests(&self, n: u64) {
        let target = self.done.load(Ordering::SeqCst) + n;
        wait_for("the load to go on", Duration::from_secs(60), || {
            (self.done.load(Ordering::SeqCst) >= target).then_some(())
        });
    }

    /// Stops the clients; panics unless every request succeeded (and there were some).
    fn finish(self, what: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut ok, mut failed) = (0, Vec::new());
        for h in self.handles {
            let (o, f) = h.join().expect("load thread");
            ok += o;
            failed.extend(f);
        }
        assert!(
            failed.is_empty(),
            "{what}: {} of {} requests failed, first: {:?}",
            failed.len(),
            ok + failed.len() as u64,
            failed.first()
        );
        assert!(ok > 0, "{what}: no request ran");
        eprintln!("{what}: {ok} requests, none failed");
    }
}

fn pids(s: &Server) -> Vec<i32> {
    s.workers().into_iter().map(|(_, p)| p).collect()
}

#[test]
fn hup_reloads_config_and_preloaded_code_without_failed_requests() {
    hup_reloads(true);
}

#[test]
fn hup_reloads_config_and_code_without_failed_requests() {
    hup_reloads(false);
}

fn hup_reloads(preload: bool) {
    let dir = app_dir("version-one");
    let conf = dir.path().join("gunicorn.conf.py");
    let preload_line = format!("preload_app = {}\n", if preload { "True" } else { "False" });
    std::fs::write(&conf, &preload_line).expect("conf");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .workers(2)
        .args(&["-c", path_str(&conf)])
        .start();
    let leader = s.pid();
    assert_eq!(get(s.addr, "/").as_deref(), Ok("version-one"));
    let old = pids(&s);
    let load = Load::start(s.addr);
    load.wait_requests(20);

    // New code (another length, so the cached bytecode is not reused) and a new setting.
    std::fs::write(dir.path().join("lc_app.py"), app_source("version-two!")).expect("app");
    std::fs::write(&conf, format!("{preload_line}proc_name = 'reloaded'\n")).expect("conf");
    s.signal(Signal::SIGHUP);
    wait_for("the new code to answer", Duration::from_secs(60), || {
        (get(s.addr, "/").as_deref() == Ok("version-two!")).then_some(())
    });
    wait_for("only new workers", Duration::from_secs(60), || {
        let now = pids(&s);
        (now.len() == 2 && now.iter().all(|p| !old.contains(p))).then_some(())
    });
    // A few more requests on the new generation, then count.
    load.wait_requests(20);
    load.finish("HUP");
    assert_eq!(s.pid(), leader, "the leader keeps its PID");
    // The new config's proc_name names the leader and the new workers.
    assert_eq!(
        procs::title(leader).as_deref(),
        Some("forkscope-server: leader [reloaded]")
    );
    for (slot, pid) in s.workers() {
        assert_eq!(
            procs::title(pid),
            Some(format!("forkscope-server: worker {slot} [reloaded]"))
        );
    }
    let log = s.log_text();
    assert!(log.contains("reload: configuration re-read"), "{log}");
    assert_eq!(
        log.contains("reload: the application was imported again"),
        preload,
        "{log}"
    );
}

#[test]
fn hup_with_a_broken_app_keeps_serving_the_old_code() {
    let dir = app_dir("still-good");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["--preload"])
        .start();
    let old = pids(&s);
    std::fs::write(
        dir.path().join("lc_app.py"),
        "raise ImportError('half-deployed')\n",
    )
    .expect("app");
    s.signal(Signal::SIGHUP);
    s.wait_log(
        "the application failed to import; the workers keep the old one",
        Duration::from_secs(30),
    );
    assert!(s.log_text().contains("ImportError: half-deployed"));
    wait_for("a replaced worker", Duration::from_secs(30), || {
        let now = pids(&s);
        (now.len() == 1 && now != old).then_some(())
    });
    assert_eq!(get(s.addr, "/").as_deref(), Ok("still-good"));
}

/// Kills a leader started by USR2 (not our child) when the test ends.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0);
        let workers = procs::workers(self.0);
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..1000 {
            if !procs::alive(self.0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(pid, Signal::SIGKILL);
        for (_, w) in workers {
            let _ = kill(Pid::from_raw(w), Signal::SIGKILL);
        }
    }
}

#[test]
fn usr2_upgrades_in_place_and_term_of_the_old_leader_fails_no_request() {
    usr2_upgrades_in_place(ServerBuilder::new);
}

/// USR2 then TERM of the old leader, on the server `server(app)` starts (tests/wheel.rs passes
/// the command a wheel installed: USR2 executes that command again).
pub(crate) fn usr2_upgrades_in_place(server: fn(&str) -> ServerBuilder) {
    let dir = app_dir("upgradable");
    let pidfile = dir.path().join("server.pid");
    let oldbin = dir.path().join("server.pid.oldbin");
    let pre_exec = dir.path().join("pre_exec.txt");
    let conf = dir.path().join("gunicorn.conf.py");
    std::fs::write(
        &conf,
        format!(
            "import os\n\ndef pre_exec(server):\n    with open({:?}, 'a') as f:\n        f.write('%s %s\\n' % (server.pid, os.getppid()))\n",
            path_str(&pre_exec)
        ),
    )
    .expect("conf");
    let mut s = server("lc_app:app")
        .chdir(dir.path())
        .workers(2)
        .args(&["-c", path_str(&conf), "--pid", path_str(&pidfile)])
        .start();
    let old_leader = s.pid();
    let load = Load::start(s.addr);
    load.wait_requests(20);

    s.signal(Signal::SIGUSR2);
    let new_leader = wait_for("the new leader's pid file", Duration::from_secs(60), || {
        let old = std::fs::read_to_string(&oldbin).ok()?;
        let new: i32 = std::fs::read_to_string(&pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (old.trim() == old_leader.to_string() && new != old_leader).then_some(new)
    });
    let _guard = KillOnDrop(new_leader);
    // pre_exec ran in the child that became the new leader, with the old leader as `server`.
    assert_eq!(
        std::fs::read_to_string(&pre_exec)
            .expect("pre_exec ran")
            .trim(),
        format!("{old_leader} {old_leader}")
    );
    assert_eq!(procs::parent(new_leader), Some(old_leader));
    wait_for("the new leader's title", Duration::from_secs(30), || {
        (procs::title(new_leader).as_deref() == Some("forkscope-server: leader [lc_app:app]"))
            .then_some(())
    });
    wait_for("the new leader's workers", Duration::from_secs(60), || {
        (procs::workers(new_leader).len() == 2).then_some(())
    });

    // Both generations serve; now the old one goes.
    s.signal(Signal::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    assert!(
        !oldbin.exists(),
        "the old leader removes its .oldbin pid file"
    );
    // The new leader alone serves the same socket.
    let served_by = wait_for(
        "a request served by the new generation",
        Duration::from_secs(30),
        || {
            let pid: i32 = get(s.addr, "/pid").ok()?.parse().ok()?;
            Some(pid)
        },
    );
    assert!(
        procs::workers(new_leader)
            .iter()
            .any(|(_, p)| *p == served_by),
        "served by a worker of the new leader"
    );
    load.wait_requests(20);
    load.finish("USR2 + TERM of the old leader");
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("pid file").trim(),
        new_leader.to_string()
    );
    s.wait_log("this leader is promoted", Duration::from_secs(30));
}

#[test]
fn ttin_ttou_and_max_requests_recycling_fail_no_request() {
    let dir = app_dir("scaled");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .workers(2)
        .args(&["--max-requests", "25", "--max-requests-jitter", "5"])
        .start();
    let first = pids(&s);
    let load = Load::start(s.addr);
    load.wait_requests(20);
    s.signal(Signal::SIGTTIN);
    wait_for("three workers", Duration::from_secs(60), || {
        (s.workers()
            .iter()
            .map(|(slot, _)| *slot)
            .collect::<Vec<_>>()
            == vec![0, 1, 2])
        .then_some(())
    });
    s.signal(Signal::SIGTTOU);
    wait_for("two workers again", Duration::from_secs(60), || {
        (s.workers()
            .iter()
            .map(|(slot, _)| *slot)
            .collect::<Vec<_>>()
            == vec![0, 1])
        .then_some(())
    });
    wait_for("recycled workers", Duration::from_secs(120), || {
        let now = pids(&s);
        (now.len() == 2 && now.iter().all(|p| !first.contains(p))).then_some(())
    });
    load.wait_requests(20);
    load.finish("TTIN/TTOU/max-requests");
    assert!(
        s.log_text()
            .contains("Autorestarting worker after current request.")
    );
}

#[test]
fn winch_stops_the_workers_and_keeps_the_leader() {
    let dir = app_dir("winch");
    let mut s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .workers(2)
        .start();
    s.signal(Signal::SIGWINCH);
    wait_for("no workers", Duration::from_secs(60), || {
        s.workers().is_empty().then_some(())
    });
    s.assert_running();
    s.signal(Signal::SIGHUP);
    wait_for("workers back after HUP", Duration::from_secs(60), || {
        (s.workers().len() == 2).then_some(())
    });
    assert_eq!(get(s.addr, "/").as_deref(), Ok("winch"));
}

/// A request hung far longer than --timeout: the leader aborts its worker, the stacks go to
/// the log, worker_abort runs and a fresh worker takes the slot. (Under --preload a worker's
/// boot is a fork, so a busy machine cannot make a boot itself run into the short timeout.)
#[test]
fn a_hung_request_yields_its_traceback_in_the_log_and_a_fresh_worker() {
    let dir = app_dir("hung");
    let record = dir.path().join("abort.txt");
    let conf = dir.path().join("gunicorn.conf.py");
    std::fs::write(
        &conf,
        format!(
            "import os\n\ndef worker_abort(worker):\n    with open({:?}, 'a') as f:\n        f.write('%s %s\\n' % (worker.pid, worker.slot))\n",
            path_str(&record)
        ),
    )
    .expect("conf");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["-c", path_str(&conf), "--timeout", "3", "--preload"])
        .start();
    let marker = dir.path().join("in-flight");
    let addr = s.addr;
    let q = format!("/slow?s=600&marker={}", path_str(&marker));
    let hung = std::thread::spawn(move || get(addr, &q));
    // The worker that runs the hung request wrote its PID.
    let victim: i32 = wait_for("the request in the app", Duration::from_secs(60), || {
        std::fs::read_to_string(&marker).ok()?.parse().ok()
    });
    let slot = s
        .workers()
        .into_iter()
        .find(|(_, p)| *p == victim)
        .expect("the worker")
        .0;
    s.wait_log(
        &format!("WORKER TIMEOUT (pid:{victim})"),
        Duration::from_secs(60),
    );
    let fresh = wait_for(
        "a fresh worker in the slot",
        Duration::from_secs(60),
        || {
            let w = s.workers();
            (w.len() == 1 && w[0].1 != victim).then(|| w[0])
        },
    );
    assert_eq!(fresh.0, slot);
    assert!(
        hung.join().expect("client").is_err(),
        "the hung request was cut"
    );
    let log = wait_for("the stack dump", Duration::from_secs(30), || {
        let log = s.log_text();
        (log.contains("lc_app.py") && log.contains("in app")).then_some(log)
    });
    assert!(log.contains("most recent call first"), "{log}");
    let abort = wait_for("the worker_abort hook", Duration::from_secs(30), || {
        std::fs::read_to_string(&record).ok()
    });
    assert!(
        abort.lines().any(|l| l == format!("{victim} {slot}")),
        "worker_abort ran in the hung worker: {abort:?}"
    );
    assert_eq!(get(s.addr, "/").as_deref(), Ok("hung"));
}

#[test]
fn term_lets_a_slow_request_in_flight_finish() {
    let dir = app_dir("slow");
    let mut s = ServerBuilder::new("lc_app:app").chdir(dir.path()).start();
    let marker = dir.path().join("in-flight");
    let addr = s.addr;
    let q = format!("/slow?s=2&marker={}", path_str(&marker));
    let slow = std::thread::spawn(move || get(addr, &q));
    wait_for("the request in the app", Duration::from_secs(30), || {
        marker.exists().then_some(())
    });
    s.signal(Signal::SIGTERM);
    assert_eq!(
        slow.join().expect("client").as_deref(),
        Ok("slow done"),
        "the in-flight request finished"
    );
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
}

/// Serves lc_app with an hour of --graceful-timeout and one request in flight that would run
/// for an hour: only a quick stop ends such a server within the tests' waits.
fn server_with_a_request_in_flight(
    dir: &Path,
) -> (Server, Vec<i32>, JoinHandle<Result<String, String>>) {
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir)
        .workers(2)
        .args(&["--graceful-timeout", "3600"])
        .start();
    let workers = pids(&s);
    let marker = dir.join("in-flight");
    let addr = s.addr;
    let q = format!("/slow?s=3600&marker={}", path_str(&marker));
    let slow = std::thread::spawn(move || get(addr, &q));
    wait_for("the request in the app", Duration::from_secs(30), || {
        marker.exists().then_some(())
    });
    (s, workers, slow)
}

/// After a quick stop: the leader exited with 0, every worker is gone, the request in flight
/// was cut (not answered).
fn assert_stopped_quickly(
    mut s: Server,
    workers: &[i32],
    slow: JoinHandle<Result<String, String>>,
) {
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    for w in workers {
        wait_for("the workers to exit", Duration::from_secs(30), || {
            (!procs::alive(*w)).then_some(())
        });
    }
    let answer = slow.join().expect("client");
    assert!(answer.is_err(), "the request in flight was cut: {answer:?}");
}

/// INT and QUIT stop the server at once (gunicorn's quick shutdown): the workers exit without
/// finishing the request in flight.
#[test]
fn int_and_quit_stop_at_once() {
    for sig in [Signal::SIGINT, Signal::SIGQUIT] {
        let dir = app_dir("quick");
        let (s, workers, slow) = server_with_a_request_in_flight(dir.path());
        s.signal(sig);
        assert_stopped_quickly(s, &workers, slow);
    }
}

/// A second INT during a graceful stop (TERM) makes it quick.
#[test]
fn int_during_a_graceful_stop_makes_it_quick() {
    let dir = app_dir("graceful-then-quick");
    let (mut s, workers, slow) = server_with_a_request_in_flight(dir.path());
    s.signal(Signal::SIGTERM);
    s.wait_log("Handling signal: term", Duration::from_secs(30));
    // The graceful stop waits for the request (an hour).
    s.assert_running();
    assert!(
        !slow.is_finished(),
        "the graceful stop waits for the request"
    );
    s.signal(Signal::SIGINT);
    assert_stopped_quickly(s, &workers, slow);
}

/// A leader killed outright (SIGKILL, the OOM killer) takes its workers with it: they stop
/// instead of serving on as orphans.
#[test]
fn workers_stop_when_the_leader_is_killed() {
    let mut s = ServerBuilder::new("app:app").workers(2).start();
    let workers = pids(&s);
    assert_eq!(workers.len(), 2);
    s.signal(Signal::SIGKILL);
    assert_eq!(
        s.wait_exit(Duration::from_secs(30)),
        None,
        "killed by a signal"
    );
    for w in &workers {
        wait_for(
            "the orphaned workers to exit",
            Duration::from_secs(60),
            || (!procs::alive(*w)).then_some(()),
        );
    }
    assert!(
        TcpStream::connect(s.addr).is_err(),
        "nothing serves on the port any more"
    );
}

#[test]
fn usr1_after_moving_the_log_file_writes_a_new_file() {
    let dir = app_dir("rotated");
    let s = ServerBuilder::new("lc_app:app").chdir(dir.path()).start();
    let moved = s.dir().join("error.log.1");
    std::fs::rename(&s.log, &moved).expect("rotate");
    s.signal(Signal::SIGUSR1);
    // The leader and the worker both reopen: a line from each must reach the new file.
    wait_for(
        "worker lines in the new file",
        Duration::from_secs(30),
        || {
            let _ = get(s.addr, "/error?tag=after-rotation");
            s.log_text()
                .contains("lifecycle error after-rotation")
                .then_some(())
        },
    );
    s.signal(Signal::SIGTTIN);
    s.wait_log("Handling signal: ttin", Duration::from_secs(30));
    let old = std::fs::read_to_string(&moved).expect("old log");
    assert!(old.contains("Handling signal: usr1"), "{old}");
    assert!(!old.contains("Handling signal: ttin"), "{old}");
}

/// A gunicorn.conf.py defining every hook; each call appends one JSON line to `record`.
fn hooks_conf(record: &Path) -> String {
    format!(
        r#"import json, os, signal

workers = 1
_RECORD = {record:?}


def _rec(hook, **kw):
    kw["hook"] = hook
    kw["in_pid"] = os.getpid()
    with open(_RECORD, "a") as f:
        f.write(json.dumps(kw, default=str) + "\n")


def on_starting(server):
    _rec("on_starting", server_pid=server.pid, workers=server.cfg.workers)

def on_reload(server):
    _rec("on_reload", server_pid=server.pid)

def when_ready(server):
    server.log.info("when_ready says %s", "hello")
    _rec("when_ready", server_pid=server.pid)

def pre_fork(server, worker):
    _rec("pre_fork", server_pid=server.pid, worker_pid=worker.pid, age=worker.age, slot=worker.slot)

def post_fork(server, worker):
    _rec("post_fork", server_pid=server.pid, worker_pid=worker.pid, age=worker.age, slot=worker.slot)

def post_worker_init(worker):
    _rec("post_worker_init", worker_pid=worker.pid, slot=worker.slot)

def worker_int(worker):
    _rec("worker_int", worker_pid=worker.pid)

def worker_abort(worker):
    _rec("worker_abort", worker_pid=worker.pid)

def pre_exec(server):
    _rec("pre_exec", server_pid=server.pid)

def pre_request(worker, req):
    _rec("pre_request", worker_pid=worker.pid, method=req.method, path=req.path)

def post_request(worker, req, environ, resp):
    _rec("post_request", worker_pid=worker.pid, path=req.path, path_info=environ["PATH_INFO"], status=resp.status_code)

def child_exit(server, worker):
    _rec("child_exit", server_pid=server.pid, worker_pid=worker.pid, slot=worker.slot)

def worker_exit(server, worker):
    _rec("worker_exit", server_pid=server.pid, worker_pid=worker.pid)

def nworkers_changed(server, new_value, old_value):
    _rec("nworkers_changed", new=new_value, old=old_value)

def on_exit(server):
    _rec("on_exit", server_pid=server.pid)
"#
    )
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn position(recs: &[serde_json::Value], pred: impl Fn(&serde_json::Value) -> bool) -> usize {
    recs.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no such hook call in {recs:#?}"))
}

#[test]
fn a_gunicorn_conf_py_gets_every_hook_in_order_with_gunicorn_arguments() {
    let dir = app_dir("hooked");
    let record = dir.path().join("hooks.jsonl");
    let conf = dir.path().join("gunicorn.conf.py");
    std::fs::write(&conf, hooks_conf(&record)).expect("conf");
    let mut s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["-c", path_str(&conf)])
        .start();
    let leader = i64::from(s.pid());
    let w1: i64 = get(s.addr, "/pid").expect("pid").parse().expect("pid");
    wait_for("post_request", Duration::from_secs(30), || {
        records(&record)
            .iter()
            .any(|r| r["hook"] == "post_request")
            .then_some(())
    });
    s.signal(Signal::SIGTTIN);
    wait_for("a second worker", Duration::from_secs(60), || {
        records(&record)
            .iter()
            .any(|r| r["hook"] == "post_worker_init" && r["slot"] == 1)
            .then_some(())
    });
    kill(Pid::from_raw(w1 as i32), Signal::SIGINT).expect("INT the worker");
    wait_for(
        "child_exit of the first worker",
        Duration::from_secs(30),
        || {
            records(&record)
                .iter()
                .any(|r| r["hook"] == "child_exit" && r["worker_pid"] == w1)
                .then_some(())
        },
    );
    s.signal(Signal::SIGHUP);
    wait_for("on_reload", Duration::from_secs(30), || {
        records(&record)
            .iter()
            .any(|r| r["hook"] == "on_reload")
            .then_some(())
    });
    s.signal(Signal::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    let recs = records(&record);
    let hook = |i: usize| recs[i]["hook"].as_str().unwrap_or("?").to_owned();

    // Start-up, in gunicorn's order.
    assert_eq!(
        (0..3).map(hook).collect::<Vec<_>>(),
        ["nworkers_changed", "on_starting", "when_ready"]
    );
    assert_eq!(recs[0]["new"], 1);
    assert_eq!(recs[0]["old"], serde_json::Value::Null);
    assert_eq!(recs[1]["server_pid"], leader);
    assert_eq!(recs[1]["in_pid"], leader);
    assert_eq!(recs[1]["workers"], 1);
    assert!(s.log_text().contains("when_ready says hello"));

    // The first worker: pre_fork in the leader, then post_fork and post_worker_init in it.
    let pre_fork = position(&recs, |r| r["hook"] == "pre_fork" && r["slot"] == 0);
    assert_eq!(recs[pre_fork]["in_pid"], leader);
    assert_eq!(recs[pre_fork]["worker_pid"], "[booting]");
    assert_eq!(recs[pre_fork]["age"], 1);
    let post_fork = position(&recs, |r| r["hook"] == "post_fork" && r["worker_pid"] == w1);
    assert_eq!(recs[post_fork]["in_pid"], w1);
    assert_eq!(recs[post_fork]["server_pid"], leader);
    assert_eq!(recs[post_fork]["slot"], 0);
    let init = position(&recs, |r| {
        r["hook"] == "post_worker_init" && r["worker_pid"] == w1
    });
    assert!(pre_fork < post_fork && post_fork < init);

    // The request.
    let pre = position(&recs, |r| r["hook"] == "pre_request");
    let post = position(&recs, |r| r["hook"] == "post_request");
    assert!(init < pre && pre < post);
    assert_eq!(recs[pre]["method"], "GET");
    assert_eq!(recs[pre]["path"], "/pid");
    assert_eq!(recs[pre]["in_pid"], w1);
    assert_eq!(recs[post]["path_info"], "/pid");
    assert_eq!(recs[post]["status"], 200);

    // TTIN.
    let grow = position(&recs, |r| r["hook"] == "nworkers_changed" && r["new"] == 2);
    assert_eq!(recs[grow]["old"], 1);
    let second = position(&recs, |r| r["hook"] == "pre_fork" && r["slot"] == 1);
    assert!(grow < second);

    // INT to a worker: worker_int and worker_exit in it, child_exit in the leader.
    let int = position(&recs, |r| r["hook"] == "worker_int" && r["in_pid"] == w1);
    let exit = position(&recs, |r| r["hook"] == "worker_exit" && r["in_pid"] == w1);
    let child = position(&recs, |r| {
        r["hook"] == "child_exit" && r["worker_pid"] == w1
    });
    assert!(int < exit && exit < child);
    assert_eq!(recs[child]["in_pid"], leader);
    assert_eq!(recs[child]["slot"], 0);

    // HUP, then TERM: on_exit is the very last call, in the leader.
    let reload = position(&recs, |r| r["hook"] == "on_reload");
    assert_eq!(recs[reload]["in_pid"], leader);
    assert_eq!(hook(recs.len() - 1), "on_exit");
    assert_eq!(recs[recs.len() - 1]["in_pid"], leader);
    assert!(!recs.iter().any(|r| r["hook"] == "worker_abort"));
}

#[test]
fn failing_hooks_are_handled_as_gunicorn_handles_them() {
    let dir = app_dir("failing");
    let conf = dir.path().join("gunicorn.conf.py");
    std::fs::write(
        &conf,
        "def post_fork(server, worker):\n    raise ValueError('post_fork refuses')\n",
    )
    .expect("conf");
    let mut s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["-c", path_str(&conf)])
        .no_wait()
        .start();
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(4));
    let log = s.log_text();
    assert!(log.contains("Exception in post_fork hook"), "{log}");
    assert!(log.contains("ValueError: post_fork refuses"), "{log}");
    assert!(log.contains("failed to boot"), "{log}");

    std::fs::write(
        &conf,
        "def pre_request(worker, req):\n    if req.path == '/refused':\n        raise ValueError('pre_request refuses')\n",
    )
    .expect("conf");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["-c", path_str(&conf)])
        .start();
    assert_eq!(request(s.addr, "GET", "/refused", &[], b"").status, 500);
    assert_eq!(get(s.addr, "/").as_deref(), Ok("failing"));
    s.wait_log("ValueError: pre_request refuses", Duration::from_secs(10));
    drop(s);

    std::fs::write(
        &conf,
        "def on_starting(server):\n    raise ValueError('on_starting refuses')\n",
    )
    .expect("conf");
    let mut s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["-c", path_str(&conf)])
        .no_wait()
        .start();
    assert_ne!(s.wait_exit(Duration::from_secs(60)), Some(0));
    assert!(s.log_text().contains("ValueError: on_starting refuses"));
}

#[test]
fn signal_handlers_installed_in_post_fork_and_post_worker_init_keep_working() {
    let dir = app_dir("trap");
    let usr2 = dir.path().join("usr2.txt");
    let hup = dir.path().join("hup.txt");
    let conf = dir.path().join("gunicorn.conf.py");
    std::fs::write(
        &conf,
        format!(
            r#"import os, signal

def _writer(path):
    def handler(signum, frame):
        with open(path, "a") as f:
            f.write("%d\n" % os.getpid())
    return handler

def post_fork(server, worker):
    signal.signal(signal.SIGUSR2, _writer({usr2:?}))

def post_worker_init(worker):
    signal.signal(signal.SIGHUP, _writer({hup:?}))
"#,
            usr2 = path_str(&usr2),
            hup = path_str(&hup)
        ),
    )
    .expect("conf");
    for preload in [false, true] {
        let _ = std::fs::remove_file(&usr2);
        let _ = std::fs::remove_file(&hup);
        let mut args = vec!["-c", path_str(&conf)];
        if preload {
            args.push("--preload");
        }
        let s = ServerBuilder::new("lc_app:app")
            .chdir(dir.path())
            .args(&args)
            .start();
        // Served means booted: post_fork and post_worker_init have run.
        let worker: i32 = get(s.addr, "/pid").expect("pid").parse().expect("pid");
        kill(Pid::from_raw(worker), Signal::SIGUSR2).expect("USR2");
        let ran = wait_for(
            "the post_fork USR2 handler",
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(&usr2)
                    .ok()
                    .filter(|t| t.ends_with('\n'))
            },
        );
        assert_eq!(ran.trim(), worker.to_string());
        kill(Pid::from_raw(worker), Signal::SIGHUP).expect("HUP");
        let ran = wait_for(
            "the post_worker_init HUP handler",
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(&hup)
                    .ok()
                    .filter(|t| t.ends_with('\n'))
            },
        );
        assert_eq!(ran.trim(), worker.to_string());
        assert!(
            procs::alive(worker),
            "the worker lives (preload: {preload})"
        );
        assert_eq!(
            get(s.addr, "/pid").as_deref(),
            Ok(worker.to_string().as_str())
        );
        assert_eq!(s.workers()[0].1, worker);
    }
}

#[test]
fn the_leader_warns_about_handlers_a_preloaded_app_sets_at_import() {
    let dir = app_dir("unused");
    std::fs::write(
        dir.path().join("lc_trap.py"),
        "import signal\nsignal.signal(signal.SIGUSR2, lambda s, f: None)\n\
         def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'ok']\n",
    )
    .expect("app");
    let s = ServerBuilder::new("lc_trap:app")
        .chdir(dir.path())
        .args(&["--preload"])
        .start();
    s.wait_log(
        "the application set a Python handler for SIGUSR2 at import time",
        Duration::from_secs(10),
    );
    assert!(
        !s.log_text().contains("handler for SIGINT"),
        "CPython's own SIGINT handler is not the app's"
    );
    // The doorbell owns USR2 in the worker: the worker lives.
    let worker = s.workers()[0].1;
    kill(Pid::from_raw(worker), Signal::SIGUSR2).expect("USR2");
    assert_eq!(request(s.addr, "GET", "/", &[], b"").status, 200);
    assert!(procs::alive(worker));
}

/// Starts a server with a pid file, sends USR2 and returns it with the new leader's PID once
/// the new generation serves.
fn upgraded(dir: &Path) -> (Server, i32, KillOnDrop) {
    let pidfile = dir.join("server.pid");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir)
        .workers(2)
        .args(&["--pid", path_str(&pidfile)])
        .start();
    let old_leader = s.pid();
    s.signal(Signal::SIGUSR2);
    let new_leader = wait_for("the new leader's pid file", Duration::from_secs(60), || {
        let new: i32 = std::fs::read_to_string(&pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (new != old_leader).then_some(new)
    });
    let guard = KillOnDrop(new_leader);
    wait_for("the new leader's workers", Duration::from_secs(60), || {
        (procs::workers(new_leader).len() == 2).then_some(())
    });
    (s, new_leader, guard)
}

#[test]
fn usr2_then_winch_then_term_of_the_old_leader_fails_no_request() {
    let dir = app_dir("winched");
    let (mut s, new_leader, _guard) = upgraded(dir.path());
    let load = Load::start(s.addr);
    load.wait_requests(20);
    // WINCH: the old generation's workers go, the old leader stays as a fall-back.
    s.signal(Signal::SIGWINCH);
    wait_for("the old workers to go", Duration::from_secs(60), || {
        s.workers().is_empty().then_some(())
    });
    s.assert_running();
    load.wait_requests(20);
    s.signal(Signal::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    load.wait_requests(20);
    load.finish("USR2, WINCH, TERM");
    assert_eq!(procs::workers(new_leader).len(), 2);
}

#[test]
fn a_new_leader_that_exits_gives_the_pid_file_back_to_the_old_one() {
    let dir = app_dir("rolled-back");
    let (s, new_leader, _guard) = upgraded(dir.path());
    let load = Load::start(s.addr);
    load.wait_requests(20);
    // Roll back: the new generation goes, the old one serves on.
    kill(Pid::from_raw(new_leader), Signal::SIGTERM).expect("TERM the new leader");
    let pidfile = dir.path().join("server.pid");
    wait_for(
        "the pid file back with the old leader",
        Duration::from_secs(60),
        || {
            let pid = std::fs::read_to_string(&pidfile).ok()?;
            (pid.trim() == s.pid().to_string()).then_some(())
        },
    );
    assert!(!dir.path().join("server.pid.oldbin").exists());
    s.wait_log(
        &format!("The new leader (pid {new_leader}) exited"),
        Duration::from_secs(30),
    );
    load.wait_requests(20);
    load.finish("USR2 rolled back");
    assert_eq!(s.workers().len(), 2);
}

#[test]
fn a_worker_that_outlives_the_graceful_timeout_leaves_its_stacks_in_the_log() {
    let dir = app_dir("stuck");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["--graceful-timeout", "1"])
        .start();
    let victim: i32 = get(s.addr, "/pid").expect("pid").parse().expect("pid");
    let marker = dir.path().join("in-flight");
    let addr = s.addr;
    let q = format!("/slow?s=120&marker={}", path_str(&marker));
    let stuck = std::thread::spawn(move || get(addr, &q));
    wait_for("the request in the app", Duration::from_secs(30), || {
        marker.exists().then_some(())
    });
    // HUP retires the worker; its request does not end within --graceful-timeout.
    s.signal(Signal::SIGHUP);
    s.wait_log(
        &format!("Worker (pid:{victim}) still busy 1s after it was told to stop"),
        Duration::from_secs(30),
    );
    wait_for("the stack dump", Duration::from_secs(30), || {
        let log = s.log_text();
        (log.contains("lc_app.py") && log.contains("in app")).then_some(())
    });
    wait_for("the stuck worker to go", Duration::from_secs(30), || {
        (!procs::alive(victim)).then_some(())
    });
    assert!(stuck.join().expect("client").is_err());
    assert_eq!(get(s.addr, "/").as_deref(), Ok("stuck"));
}

#[test]
fn hup_with_new_workers_that_cannot_boot_keeps_the_old_workers_serving() {
    let dir = app_dir("old-and-good");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .workers(2)
        .start();
    let old = pids(&s);
    let load = Load::start(s.addr);
    load.wait_requests(20);
    std::fs::write(
        dir.path().join("lc_app.py"),
        "raise ImportError('deployed broken')\n",
    )
    .expect("app");
    s.signal(Signal::SIGHUP);
    s.wait_log(
        "after a reload: the previous workers keep serving",
        Duration::from_secs(60),
    );
    // The old generation still answers, with the old code.
    load.wait_requests(20);
    assert_eq!(get(s.addr, "/").as_deref(), Ok("old-and-good"));
    assert!(old.iter().all(|p| procs::alive(*p)));

    // Fixed code and another HUP: the new generation takes over.
    std::fs::write(dir.path().join("lc_app.py"), app_source("fixed-and-new")).expect("app");
    s.signal(Signal::SIGHUP);
    wait_for("the fixed code to answer", Duration::from_secs(60), || {
        (get(s.addr, "/").as_deref() == Ok("fixed-and-new")).then_some(())
    });
    wait_for("the old workers to go", Duration::from_secs(60), || {
        old.iter().all(|p| !procs::alive(*p)).then_some(())
    });
    load.wait_requests(20);
    load.finish("HUP with a broken, then a fixed app");
}

/// A new worker whose import hangs during a reload is aborted at --timeout with its stack while
/// the old worker serves on. The first workers boot under a long timeout (a busy machine may
/// slow a boot down by seconds); the reload brings the short one with the hanging import.
#[test]
fn a_new_worker_stuck_in_its_import_during_a_reload_times_out_with_its_stack() {
    let dir = app_dir("before-the-hang");
    let conf = dir.path().join("gunicorn.conf.py");
    std::fs::write(&conf, "timeout = 120\n").expect("conf");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["-c", path_str(&conf)])
        .start();
    let old: i32 = get(s.addr, "/pid").expect("pid").parse().expect("pid");
    std::fs::write(
        dir.path().join("lc_app.py"),
        "import time\n\ndef connect_to_a_database_that_never_answers():\n    time.sleep(600)\n\n\
         connect_to_a_database_that_never_answers()\n",
    )
    .expect("app");
    std::fs::write(&conf, "timeout = 3\n").expect("conf");
    s.signal(Signal::SIGHUP);
    s.wait_log("WORKER TIMEOUT", Duration::from_secs(60));
    wait_for("the import's stack", Duration::from_secs(30), || {
        s.log_text()
            .contains("in connect_to_a_database_that_never_answers")
            .then_some(())
    });
    assert!(
        !s.log_text()
            .contains(&format!("WORKER TIMEOUT (pid:{old})"))
    );
    // Meanwhile the old worker serves the old code.
    assert_eq!(get(s.addr, "/").as_deref(), Ok("before-the-hang"));
    assert!(procs::alive(old));
}

#[test]
fn hup_with_an_invalid_config_file_keeps_the_current_settings() {
    let dir = app_dir("configured");
    let conf = dir.path().join("gunicorn.conf.py");
    std::fs::write(&conf, "proc_name = 'first'\n").expect("conf");
    let s = ServerBuilder::new("lc_app:app")
        .chdir(dir.path())
        .args(&["-c", path_str(&conf)])
        .start();
    std::fs::write(&conf, "proc_name = 'second'\nworkers = 'many'\n").expect("conf");
    s.signal(Signal::SIGHUP);
    s.wait_log(
        "reload: the configuration is invalid, keeping the current one",
        Duration::from_secs(30),
    );
    assert!(
        s.log_text().contains("workers"),
        "the error names the setting"
    );
    wait_for("the replaced worker", Duration::from_secs(60), || {
        let w = s.workers();
        (w.len() == 1 && procs::title(w[0].1).is_some_and(|t| t.ends_with("[first]"))).then_some(())
    });
    assert_eq!(
        procs::title(s.pid()).as_deref(),
        Some("forkscope-server: leader [first]")
    );
    assert_eq!(get(s.addr, "/").as_deref(), Ok("configured"));
}

/// A worker that serves its last request under `--max-requests` takes no more clients, even
/// ones already queued when that request ends: they are the next worker's. (Its last request
/// is held in the app while a second client connects, so that client is waiting in the
/// listener's queue when the retiring worker's request ends.)
#[test]
fn a_retiring_worker_leaves_queued_clients_to_its_successor() {
    let s = ServerBuilder::new("app:app")
        .args(&["--max-requests", "2"])
        .start();
    let retiring = request(s.addr, "GET", "/pid", &[], b"").text();
    let last = forkscope_tests::Held::start(s.addr);
    let queued = std::thread::spawn({
        let addr = s.addr;
        move || request(addr, "GET", "/pid", &[], b"").text()
    });
    wait_for(
        "the second client in the queue",
        Duration::from_secs(30),
        || queued_connections(s.addr).then_some(()),
    );
    assert_eq!(last.release().text(), "released");
    let served_by = queued.join().expect("the queued client");
    assert_ne!(
        served_by, retiring,
        "the queued client went to the next worker"
    );
    s.wait_log(
        "Autorestarting worker after current request.",
        Duration::from_secs(30),
    );
}

/// True when the listener on `addr` (IPv4) has a connection waiting to be accepted: a
/// listening socket's `rx_queue` in `/proc/net/tcp` is its accept queue.
fn queued_connections(addr: SocketAddr) -> bool {
    let local = format!(":{:04X}", addr.port());
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A: listening), tx_queue:rx_queue
            (f.len() > 4 && f[1].ends_with(&local) && f[3] == "0A").then(|| f[4].to_owned())
        })
        .any(|queues| {
            queues
                .split_once(':')
                .and_then(|(_, rx)| u32::from_str_radix(rx, 16).ok())
                .is_some_and(|q| q > 0)
        })
}
