//! Keep-alive connections spread over the workers (see server/src/balance.rs): a load balancer
//! keeps a pool of connections open for hours, so whichever worker accepts a connection serves
//! it for good; one worker holding them all leaves its siblings idle.

use std::collections::HashMap;
use std::time::Duration;

use forkscope_tests::keepalive::KeepAlive;
use forkscope_tests::{Server, ServerBuilder};

/// Starts `workers` workers and waits until each one accepts.
fn serving(workers: u32) -> Server {
    let s = ServerBuilder::new("app:app").workers(workers).start();
    // The start-up log says what serves: not gunicorn's blocking sync worker.
    s.wait_log(
        "Using worker: forkscope event loop, 1 request thread per worker (non-blocking \
         keep-alive; -k sync)",
        Duration::from_secs(10),
    );
    for (_, pid) in s.workers() {
        s.wait_log(&format!("Worker {pid} accepting"), Duration::from_secs(60));
    }
    s
}

/// Which worker serves each connection, asked twice: a connection stays with its worker.
fn owners(conns: &mut [KeepAlive]) -> Vec<String> {
    let first: Vec<String> = conns.iter_mut().map(|c| c.get("/pid").text()).collect();
    let again: Vec<String> = conns.iter_mut().map(|c| c.get("/pid").text()).collect();
    assert_eq!(first, again, "a keep-alive connection changed worker");
    first
}

/// Every worker holds at least half of an equal share of the connections.
fn assert_fair(s: &Server, owners: &[String], workers: usize) {
    let mut per_worker: HashMap<&str, usize> = HashMap::new();
    for o in owners {
        *per_worker.entry(o.as_str()).or_default() += 1;
    }
    let fair = owners.len() / workers / 2;
    for (_, pid) in s.workers() {
        let held = per_worker
            .get(pid.to_string().as_str())
            .copied()
            .unwrap_or(0);
        assert!(
            held >= fair,
            "worker {pid} holds {held} of {} connections (at least {fair} expected): {per_worker:?}",
            owners.len()
        );
    }
}

fn a_burst_of_connections_spreads(workers: u32) {
    let s = serving(workers);
    // All connect before any request: the whole burst queues for the workers at once.
    let mut conns: Vec<KeepAlive> = (0..32).map(|_| KeepAlive::connect(s.addr)).collect();
    let owners = owners(&mut conns);
    assert_fair(&s, &owners, workers as usize);
}

#[test]
fn a_burst_of_keep_alive_connections_spreads_over_two_workers() {
    a_burst_of_connections_spreads(2);
}

#[test]
fn a_burst_of_keep_alive_connections_spreads_over_four_workers() {
    a_burst_of_connections_spreads(4);
}

#[test]
fn keep_alive_connections_arriving_over_time_spread_over_the_workers() {
    let s = serving(3);
    let mut conns = Vec::new();
    for _ in 0..24 {
        let mut c = KeepAlive::connect(s.addr);
        // Served before the next one arrives, so each arrival finds the others settled.
        assert_eq!(c.get("/").status, 200);
        conns.push(c);
    }
    let owners = owners(&mut conns);
    assert_fair(&s, &owners, 3);
}
