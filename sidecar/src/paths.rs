//! Every route of the sidecar, written once: the router ([`crate::routes`]), the typed client,
//! the OpenAPI document and the tests all take their paths from here. Paths with `{id}` are
//! axum path templates; [`with_id`] fills them in.

use crate::api::API_PREFIX;

/// `GET`: liveness (no token).
pub const HEALTHZ: &str = "/healthz";
/// `GET`: readiness (no token).
pub const READYZ: &str = "/readyz";
/// `GET`: Prometheus metrics (no token).
pub const METRICS: &str = "/metrics";
/// `GET`: the OpenAPI document.
pub const OPENAPI: &str = "/v1/openapi.json";
/// `GET`: leaders and workers with their memory.
pub const PROCESSES: &str = "/v1/processes";
/// `GET`: the workers the leaders recycled on memory, with the heap diffs captured before.
pub const RECYCLES: &str = "/v1/recycles";
/// `POST` starts a profile session, `GET` lists them.
pub const PROFILES: &str = "/v1/profiles";
/// `GET` one session, `DELETE` cancels it.
pub const PROFILE: &str = "/v1/profiles/{id}";
/// `POST`: capture a tracing heap diff now.
pub const PROFILE_CAPTURE: &str = "/v1/profiles/{id}/capture";
/// `POST`: reload the leader (HUP).
pub const LEADER_RELOAD: &str = "/v1/leader/reload";
/// `PUT`: set the leader's worker count.
pub const LEADER_WORKERS: &str = "/v1/leader/workers";
/// `POST`: reopen the leader's logs (USR1).
pub const LEADER_REOPEN_LOGS: &str = "/v1/leader/reopen-logs";

/// The routes that need no token.
pub const OPEN: [&str; 3] = [HEALTHZ, READYZ, METRICS];

/// Every route, the open ones first.
pub const ALL: [&str; 12] = [
    HEALTHZ,
    READYZ,
    METRICS,
    OPENAPI,
    PROCESSES,
    RECYCLES,
    PROFILES,
    PROFILE,
    PROFILE_CAPTURE,
    LEADER_RELOAD,
    LEADER_WORKERS,
    LEADER_REOPEN_LOGS,
];

/// `template` with its `{id}` replaced by `id`.
pub fn with_id(template: &str, id: &str) -> String {
    template.replace("{id}", id)
}

/// A `/v1` route without the prefix (for a router nested under [`API_PREFIX`]).
///
/// # Panics
/// When `path` is not under the prefix (a bug in this file, caught by its tests).
pub fn under_prefix(path: &'static str) -> &'static str {
    path.strip_prefix(API_PREFIX)
        .filter(|rest| rest.starts_with('/'))
        .expect("every token-guarded route is under the API prefix")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guarded_route_is_under_the_prefix_and_none_repeats() {
        for p in ALL.iter().filter(|p| !OPEN.contains(p)) {
            assert!(under_prefix(p).len() > 1, "{p}");
        }
        let mut sorted = ALL.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALL.len());
        assert_eq!(
            with_id(PROFILE_CAPTURE, "fs-1"),
            "/v1/profiles/fs-1/capture"
        );
    }
}
