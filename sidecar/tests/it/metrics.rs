//! `/metrics` against a real forkscope-server: per-process series read at scrape time, bounded
//! labels with the PID only on the info series, and worker restarts.

use std::time::Duration;

use forkscope_tests::wait_for;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{Sidecar, eventually, parse_metrics as parse, unique_app};

#[tokio::test]
async fn per_worker_memory_with_bounded_labels_and_restarts() {
    let (server, app, _dir) = unique_app("app", 2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let text = client.metrics_text().await.expect("metrics");
    let m = parse(&text);
    let worker0 = server.workers()[0].1;
    for role_slot in [
        r#"role="leader",server="forkscope",slot="""#,
        r#"role="worker",server="forkscope",slot="0""#,
        r#"role="worker",server="forkscope",slot="1""#,
    ] {
        let key = format!(r#"forkscope_process_pss_bytes{{app="{app}",{role_slot}}}"#);
        let pss = m
            .get(&key)
            .copied()
            .unwrap_or_else(|| panic!("{key} missing:\n{text}"));
        assert!(pss > 1_000_000.0, "{key} = {pss}");
        for name in [
            "rss_bytes",
            "uss_bytes",
            "shared_bytes",
            "swap_bytes",
            "cpu_seconds_total",
            "start_time_seconds",
        ] {
            let k = format!(r#"forkscope_process_{name}{{app="{app}",{role_slot}}}"#);
            assert!(m.contains_key(&k), "{k} missing:\n{text}");
        }
    }
    let info = format!(
        r#"forkscope_process_info{{app="{app}",pid="{worker0}",role="worker",server="forkscope",slot="0"}}"#
    );
    assert_eq!(m.get(&info), Some(&1.0), "{text}");
    assert_eq!(
        m.get(&format!(
            r#"forkscope_workers{{app="{app}",server="forkscope"}}"#
        )),
        Some(&2.0)
    );
    assert!(m.contains_key("forkscope_sidecar_scrape_duration_seconds"));
    // Only the info series carries a PID.
    for line in text.lines().filter(|l| l.contains("pid=")) {
        assert!(line.starts_with("forkscope_process_info{"), "{line}");
    }
    // Kill slot 0: the leader respawns it, the next scrapes see a new PID and count a restart.
    kill(Pid::from_raw(worker0), Signal::SIGKILL).expect("kill");
    wait_for("slot 0 respawned", Duration::from_secs(60), || {
        server
            .workers()
            .iter()
            .find(|(s, p)| *s == 0 && *p != worker0)
            .map(|_| ())
    });
    let restarts =
        format!(r#"forkscope_worker_restarts_total{{app="{app}",server="forkscope",slot="0"}}"#);
    eventually("a counted restart", Duration::from_secs(30), || {
        let client = client.clone();
        let restarts = restarts.clone();
        async move {
            let m = parse(&client.metrics_text().await.ok()?);
            (m.get(&restarts) == Some(&1.0)).then_some(())
        }
    })
    .await;
}
