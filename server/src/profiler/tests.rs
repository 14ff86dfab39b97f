//! Unit tests of the doorbell logic with a real CPython, each test in a process of its own (the
//! reason is above `rusty_fork_test!` below).
//!
//! `signal.signal` only works on the main thread and cargo runs tests on others, so these call
//! the handler's body ([`ring`]) directly; the signal path itself is proven by the integration
//! tests in `tests/profiler.rs` with the real server and `kill -USR2`.

use std::path::Path;

use forkscope_protocol::{CommandResult, read_json_limited};
use rusty_fork::rusty_fork_test;

use super::*;

/// A worker armed on a temporary runtime directory (slot 3), with a leaky module loaded.
struct Fixture {
    dir: tempfile::TempDir,
    runtime: RuntimeDir,
    pid: u32,
}

impl Fixture {
    fn new(py: Python<'_>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = RuntimeDir::new(dir.path());
        let pid = std::process::id();
        register_module(py).expect("module");
        // A failed test may have left tracing on.
        if heap::tracemalloc_is_tracing(py) {
            py.import("tracemalloc")
                .and_then(|t| t.call_method0("stop"))
                .expect("stop tracemalloc");
        }
        arm(
            py,
            ProfilerContext {
                runtime: runtime.clone(),
                pid,
                slot: 3,
                leader_pid: 1,
            },
            ToggleDefaults {
                frames: 4,
                top: 20,
                group_by: GroupBy::Lineno,
            },
        )
        .expect("arm");
        Self { dir, runtime, pid }
    }

    fn command(&self, json: &str) {
        std::fs::write(self.runtime.command(self.pid), json).expect("write command");
    }

    fn result(&self, id: &str, action: Action) -> CommandResult {
        read(&self.runtime.result(self.pid, id, action))
    }

    /// Every result file's name, sorted.
    fn results(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.runtime.results_dir(self.pid))
            .expect("results dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn finish(self, py: Python<'_>) {
        on_worker_exit(py, "test over");
        *WORKER.lock().unwrap_or_else(PoisonError::into_inner) = None;
        drop(self.dir);
    }
}

fn read(path: &Path) -> CommandResult {
    read_json_limited(path, 64 << 20).unwrap_or_else(|e| panic!("result {}: {e}", path.display()))
}

fn leak(py: Python<'_>, n: usize) {
    let m = match py.import("leaky_doorbell") {
        Ok(m) => m,
        Err(_) => {
            let m = pyo3::types::PyModule::from_code(
                py,
                c"kept = []\ndef leak(n):\n    for _ in range(n):\n        kept.append(bytearray(512))\n",
                c"/fs/leaky_doorbell.py",
                c"leaky_doorbell",
            )
            .expect("module");
            py.import("sys")
                .and_then(|s| s.getattr("modules"))
                .and_then(|mods| mods.set_item("leaky_doorbell", &m))
                .expect("register");
            m
        }
    };
    m.call_method1("leak", (n,)).expect("leak");
}

// Each test runs in a process of its own (rusty-fork): tracemalloc and the profiler state are
// process-wide, and CPython before 3.12.9 and 3.13.2 can crash when tracemalloc stops while
// another thread makes its Python thread state (python/cpython#128679), which the other unit
// tests of this crate do, each on a thread of its own.
rusty_fork_test! {
    #[test]
    fn bare_doorbell_toggles_start_then_capture_and_stop() {
        Python::initialize();
        Python::attach(|py| {
            let fx = Fixture::new(py);
            assert!(!is_tracing());
            ring(py);
            assert!(is_tracing());
            assert!(heap::tracemalloc_is_tracing(py));
            let names = fx.results();
            assert_eq!(names.len(), 1, "{names:?}");
            let id = names[0]
                .strip_suffix(".start.json")
                .expect("a start result")
                .to_owned();
            assert!(id.starts_with("manual-"), "{id}");
            let started = fx.result(&id, Action::Start);
            assert_eq!((started.pid, started.slot), (fx.pid, 3));
            assert!(matches!(
                started.outcome,
                Outcome::Started {
                    frames: 4,
                    pss_bytes: Some(_)
                }
            ));

            leak(py, 300);
            ring(py);
            assert!(!is_tracing());
            assert!(!heap::tracemalloc_is_tracing(py), "tracing is stopped");
            let capture = fx.result(&id, Action::Capture);
            let Outcome::HeapDiff(diff) = capture.outcome else {
                panic!("expected a heap diff: {capture:?}");
            };
            assert_eq!(diff.group_by, GroupBy::Lineno);
            assert_eq!(
                diff.sites[0].traceback[0].location(),
                "/fs/leaky_doorbell.py:4"
            );
            assert!(diff.sites[0].count_diff >= 300, "{:?}", diff.sites[0]);
            assert!(diff.sites.len() <= 20);
            fx.finish(py);
        });
    }

    #[test]
    fn commands_start_capture_stop_and_their_errors() {
        Python::initialize();
        Python::attach(|py| {
            let fx = Fixture::new(py);
            fx.command(r#"{"version":1,"request_id":"c1","action":"capture"}"#);
            ring(py);
            let r = fx.result("c1", Action::Capture);
            assert!(
                matches!(&r.outcome, Outcome::Error { reason } if reason.contains("not tracing")),
                "{r:?}"
            );

            fx.command(r#"{"version":1,"request_id":"s1","action":"start","frames":7}"#);
            ring(py);
            assert!(matches!(
                fx.result("s1", Action::Start).outcome,
                Outcome::Started { frames: 7, .. }
            ));
            assert!(
                !fx.runtime.command(fx.pid).exists(),
                "the command is consumed"
            );

            fx.command(r#"{"version":1,"request_id":"s2","action":"start"}"#);
            ring(py);
            let r = fx.result("s2", Action::Start);
            assert!(
                matches!(&r.outcome, Outcome::Error { reason } if reason.contains("already tracing")),
                "{r:?}"
            );
            assert!(is_tracing(), "a refused start leaves the session alone");

            leak(py, 100);
            fx.command(
                r#"{"version":1,"request_id":"c2","action":"capture","top":3,"group_by":"traceback"}"#,
            );
            ring(py);
            let Outcome::HeapDiff(diff) = fx.result("c2", Action::Capture).outcome else {
                panic!("expected a diff");
            };
            assert_eq!((diff.frames, diff.group_by), (7, GroupBy::Traceback));
            assert!(diff.sites.len() <= 3);
            assert_eq!(
                diff.sites[0].traceback[0].location(),
                "/fs/leaky_doorbell.py:4"
            );
            assert!(is_tracing(), "a capture command keeps tracing");

            fx.command(r#"{"version":1,"request_id":"st","action":"stop"}"#);
            ring(py);
            assert_eq!(fx.result("st", Action::Stop).outcome, Outcome::Stopped);
            assert!(!is_tracing() && !heap::tracemalloc_is_tracing(py));
            fx.finish(py);
        });
    }

    #[test]
    fn garbage_unknown_and_invalid_commands_get_error_results() {
        Python::initialize();
        Python::attach(|py| {
            let fx = Fixture::new(py);
            fx.command("\u{0}garbage{");
            ring(py);
            fx.command(r#"{"version":1,"request_id":"d1","action":"dance"}"#);
            ring(py);
            fx.command(r#"{"version":1,"request_id":"f0","action":"start","frames":0}"#);
            ring(py);
            let names = fx.results();
            assert_eq!(names.len(), 3, "{names:?}");
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with("invalid-") && n.ends_with(".invalid.json")),
                "{names:?}"
            );
            assert!(matches!(
                fx.result("d1", Action::Invalid).outcome,
                Outcome::Error { .. }
            ));
            assert!(matches!(
                fx.result("f0", Action::Start).outcome,
                Outcome::Error { .. }
            ));
            assert!(!is_tracing(), "nothing was started");
            fx.finish(py);
        });
    }

    #[test]
    fn stacks_command_lists_the_current_thread() {
        Python::initialize();
        Python::attach(|py| {
            let fx = Fixture::new(py);
            fx.command(r#"{"version":1,"request_id":"k","action":"stacks"}"#);
            ring(py);
            let Outcome::Stacks { threads } = fx.result("k", Action::Stacks).outcome else {
                panic!("expected stacks");
            };
            assert_eq!(
                threads.iter().filter(|t| t.current).count(),
                1,
                "{threads:?}"
            );
            fx.finish(py);
        });
    }

    #[test]
    fn a_ring_inside_profiler_code_is_answered_after_it() {
        Python::initialize();
        Python::attach(|py| {
            let fx = Fixture::new(py);
            fx.command(r#"{"version":1,"request_id":"n1","action":"stacks"}"#);
            let answered_inside = with_worker(py, true, |py, _| {
                // As a signal handler run between two bytecodes of profiler code would.
                ring(py);
                fx.runtime.result(fx.pid, "n1", Action::Stacks).exists()
            });
            assert_eq!(answered_inside, Some(false), "no re-entry into the state");
            fx.result("n1", Action::Stacks);
            fx.finish(py);
        });
    }

    #[test]
    fn mark_writes_labelled_diffs_only_while_tracing() {
        Python::initialize();
        Python::attach(|py| {
            let fx = Fixture::new(py);
            let forkscope = py.import("forkscope").expect("import forkscope");
            let mark = |label: &str| -> Option<String> {
                forkscope
                    .call_method1("mark", (label,))
                    .and_then(|r| r.extract())
                    .expect("mark never raises")
            };
            assert_eq!(mark("idle"), None);
            assert_eq!(
                forkscope
                    .getattr("slot")
                    .and_then(|s| s.extract::<u32>())
                    .ok(),
                Some(3)
            );
            ring(py);
            let tracing: bool = forkscope
                .call_method0("is_tracing")
                .and_then(|r| r.extract())
                .expect("is_tracing");
            assert!(tracing);
            leak(py, 50);
            let path = mark("after login").expect("a result path");
            assert!(path.ends_with("mark-after_login-1.capture.json"), "{path}");
            let r = read(Path::new(&path));
            assert!(matches!(r.outcome, Outcome::HeapDiff(_)));
            assert!(is_tracing(), "a mark keeps tracing");
            fx.finish(py);
        });
    }

    #[test]
    fn exit_while_tracing_leaves_a_result() {
        Python::initialize();
        Python::attach(|py| {
            let fx = Fixture::new(py);
            fx.command(r#"{"version":1,"request_id":"x1","action":"start"}"#);
            ring(py);
            on_worker_exit(py, "SIGTERM");
            let r = fx.result("x1", Action::Exit);
            assert_eq!(
                r.outcome,
                Outcome::ExitedWhileTracing {
                    reason: "SIGTERM".into()
                }
            );
            assert!(!heap::tracemalloc_is_tracing(py));
            fx.finish(py);
        });
    }

    #[test]
    fn toggle_defaults_from_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            ToggleDefaults::from_lookup(env(&[])),
            ToggleDefaults::default()
        );
        let d = ToggleDefaults::from_lookup(env(&[
            ("FORKSCOPE_PROFILE_FRAMES", "25"),
            ("FORKSCOPE_PROFILE_TOP", "7"),
            ("FORKSCOPE_PROFILE_GROUP_BY", "lineno"),
        ]));
        assert_eq!((d.frames, d.top, d.group_by), (25, 7, GroupBy::Lineno));
        let d = ToggleDefaults::from_lookup(env(&[
            ("FORKSCOPE_PROFILE_FRAMES", "0"),
            ("FORKSCOPE_PROFILE_TOP", "many"),
            ("FORKSCOPE_PROFILE_GROUP_BY", "module"),
        ]));
        assert_eq!(d, ToggleDefaults::default());
    }
}
