//! Discovery on fixture `/proc` trees: titles, parents, PID reuse, vanished processes, memory.

use std::fs;

use super::fixture::{BTIME, fixture, proc, rollup};
use super::*;

#[test]
fn classifies_titles() {
    let c = |s: &[&str]| classify(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
    assert_eq!(
        c(&["forkscope-server: leader [app:app]"]),
        Title::ForkscopeLeader {
            app: "app:app".into()
        }
    );
    assert_eq!(
        c(&["forkscope-server: worker 12 [my app:make_app()]"]),
        Title::ForkscopeWorker {
            slot: 12,
            app: "my app:make_app()".into()
        }
    );
    assert_eq!(
        c(&["gunicorn: master [web]"]),
        Title::GunicornMaster { app: "web".into() }
    );
    assert_eq!(
        c(&["gunicorn: worker [web]"]),
        Title::GunicornWorker { app: "web".into() }
    );
    assert_eq!(
        c(&["/v/bin/python3.11", "/v/bin/gunicorn", "-w", "2", "app:app"]),
        Title::GunicornPython {
            app: "app:app".into()
        }
    );
    assert_eq!(
        c(&[
            "python",
            "-m",
            "gunicorn",
            "-b",
            "127.0.0.1:0",
            "pkg.wsgi:application"
        ]),
        Title::GunicornPython {
            app: "pkg.wsgi:application".into()
        }
    );
    for other in [
        &["forkscope-server: worker x [a]"][..],
        &["forkscope-server: leader app"],
        &["python", "server.py"],
        &["bash"],
        &[],
    ] {
        assert_eq!(c(other), Title::Other, "{other:?}");
    }
}

#[test]
fn finds_forkscope_leader_and_its_workers_only() {
    let root = fixture();
    let r = root.path();
    proc(r, 1, 0, 'S', 10, &["/sbin/init"]);
    proc(
        r,
        100,
        1,
        'S',
        1000,
        &["forkscope-server: leader [app:app]"],
    );
    proc(
        r,
        101,
        100,
        'S',
        1100,
        &["forkscope-server: worker 1 [app:app]"],
    );
    proc(
        r,
        102,
        100,
        'R',
        1200,
        &["forkscope-server: worker 0 [app:app]"],
    );
    // A worker title under another parent is not this leader's worker.
    proc(
        r,
        103,
        1,
        'S',
        1300,
        &["forkscope-server: worker 2 [app:app]"],
    );
    // A zombie worker is skipped.
    proc(
        r,
        104,
        100,
        'Z',
        1400,
        &["forkscope-server: worker 3 [app:app]"],
    );
    rollup(r, 100, 2000);
    rollup(r, 101, 900);
    rollup(r, 102, 800);
    let source = ProcSource::new(r);
    let list = source.list();
    assert_eq!(list.leaders.len(), 1);
    let l = &list.leaders[0];
    assert_eq!(l.server, ServerKind::Forkscope);
    assert_eq!(l.app, "app:app");
    assert_eq!(l.leader.pid, 100);
    let workers: Vec<(u32, Option<u32>)> = l.workers.iter().map(|w| (w.pid, w.slot)).collect();
    assert_eq!(workers, vec![(102, Some(0)), (101, Some(1))]);
    let w0 = &l.workers[0];
    let m = w0.memory.expect("memory");
    assert_eq!(m.pss_bytes, 800 * 1024);
    assert_eq!(m.rss_bytes, 950 * 1024);
    assert_eq!(m.uss_bytes, 800 * 1024);
    assert_eq!(m.shared_bytes, 150 * 1024);
    assert_eq!(m.swap_bytes, 3 * 1024);
    let tps = procfs::ticks_per_second() as f64;
    assert_eq!(w0.cpu_seconds, 50.0 / tps);
    assert_eq!(w0.started_at, BTIME as f64 + 1200.0 / tps);
    assert_eq!(w0.start_ticks, 1200);
}

#[test]
fn finds_gunicorn_by_title_and_by_command_line() {
    let root = fixture();
    let r = root.path();
    proc(r, 200, 1, 'S', 500, &["gunicorn: master [web]"]);
    proc(r, 202, 200, 'S', 700, &["gunicorn: worker [web]"]);
    proc(r, 201, 200, 'S', 600, &["gunicorn: worker [web]"]);
    let argv = [
        "/venv/bin/python",
        "/venv/bin/gunicorn",
        "-w",
        "2",
        "app:app",
    ];
    proc(r, 300, 1, 'S', 500, &argv);
    proc(r, 301, 300, 'S', 900, &argv);
    proc(r, 302, 300, 'S', 800, &argv);
    // A child of the gunicorn worker (e.g. a subprocess) is not a worker of the leader.
    proc(r, 303, 301, 'S', 950, &["sh", "-c", "true"]);
    let snap = ProcSource::new(r).scan();
    assert_eq!(snap.leaders.len(), 2);
    let by_title = snap.leader(200).expect("title leader");
    assert_eq!(by_title.server, ServerKind::Gunicorn);
    assert_eq!(by_title.app, "web");
    let ages: Vec<(u32, u32)> = by_title
        .workers
        .iter()
        .map(|w| (w.process.key.pid, w.slot))
        .collect();
    assert_eq!(ages, vec![(201, 0), (202, 1)]);
    let by_cmdline = snap.leader(300).expect("cmdline leader");
    assert_eq!(by_cmdline.app, "app:app");
    let ages: Vec<(u32, u32)> = by_cmdline
        .workers
        .iter()
        .map(|w| (w.process.key.pid, w.slot))
        .collect();
    assert_eq!(ages, vec![(302, 0), (301, 1)]);
    assert!(snap.worker(303).is_none());
}

#[test]
fn a_reused_pid_is_not_the_old_process() {
    let root = fixture();
    let r = root.path();
    proc(r, 100, 1, 'S', 1000, &["forkscope-server: leader [a:a]"]);
    proc(
        r,
        101,
        100,
        'S',
        1100,
        &["forkscope-server: worker 0 [a:a]"],
    );
    rollup(r, 101, 500);
    let source = ProcSource::new(r);
    let old = source.scan().worker(101).expect("worker").1.process.key;
    assert!(source.lookup(old).is_some());
    assert!(source.memory(old).is_some());
    // The worker exits and its PID goes to an unrelated process.
    fs::remove_dir_all(r.join("101")).expect("rm");
    proc(r, 101, 1, 'S', 5000, &["forkscope-server: worker 0 [a:a]"]);
    rollup(r, 101, 500);
    assert!(source.lookup(old).is_none());
    assert!(source.memory(old).is_none());
    assert!(
        source.scan().worker(101).is_none(),
        "new 101 has another parent"
    );
}

#[test]
fn vanished_and_half_written_processes_are_skipped() {
    let root = fixture();
    let r = root.path();
    proc(r, 100, 1, 'S', 1000, &["forkscope-server: leader [a:a]"]);
    proc(
        r,
        101,
        100,
        'S',
        1100,
        &["forkscope-server: worker 0 [a:a]"],
    );
    // 102: the folder is there but the process is gone (no stat any more).
    fs::create_dir_all(r.join("102")).expect("mkdir");
    // 103: stat without cmdline (exited between the reads).
    proc(
        r,
        103,
        100,
        'S',
        1300,
        &["forkscope-server: worker 1 [a:a]"],
    );
    fs::remove_file(r.join("103/cmdline")).expect("rm");
    // 104: garbage stat.
    fs::create_dir_all(r.join("104")).expect("mkdir");
    fs::write(r.join("104/stat"), "garbage").expect("write");
    fs::write(r.join("self"), "not a pid").expect("write");
    let list = ProcSource::new(r).list();
    assert_eq!(list.leaders.len(), 1);
    let pids: Vec<u32> = list.leaders[0].workers.iter().map(|w| w.pid).collect();
    assert_eq!(pids, vec![101]);
    // No smaps at all: memory unknown, not an error.
    assert_eq!(list.leaders[0].workers[0].memory, None);
}

#[test]
fn smaps_is_summed_when_the_rollup_is_missing() {
    let root = fixture();
    let r = root.path();
    proc(r, 100, 1, 'S', 1000, &["forkscope-server: leader [a:a]"]);
    let map = |start: &str, pss: u64| {
        format!(
            "{start}-{start}f000 r-xp 00000000 08:01 1234 /usr/bin/python3\n\
             Size:                 60 kB\n\
             Rss:                  {rss} kB\n\
             Pss:                  {pss} kB\n\
             Shared_Clean:         4 kB\n\
             Shared_Dirty:         0 kB\n\
             Private_Clean:        {pss} kB\n\
             Private_Dirty:        0 kB\n\
             Swap:                 1 kB\n\
             VmFlags: rd ex mr mw me dw\n",
            rss = pss + 4
        )
    };
    fs::write(
        r.join("100/smaps"),
        map("7f0000000000", 10) + &map("7f0000100000", 20),
    )
    .expect("smaps");
    let source = ProcSource::new(r);
    let key = source.scan().leaders[0].leader.key;
    let m = source.memory(key).expect("memory");
    assert_eq!(m.pss_bytes, 30 * 1024);
    assert_eq!(m.rss_bytes, 38 * 1024);
    assert_eq!(m.uss_bytes, 30 * 1024);
    assert_eq!(m.shared_bytes, 8 * 1024);
    assert_eq!(m.swap_bytes, 2 * 1024);
}

#[test]
fn a_missing_root_is_an_empty_snapshot() {
    let source = ProcSource::new("/nonexistent/proc");
    assert!(source.scan().leaders.is_empty());
}
