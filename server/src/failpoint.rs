//! Fault injection for the integration tests: what happens when the server itself fails where
//! no real input makes it fail. Debug builds only; release builds compile it to nothing.
//!
//! `FORKSCOPE_FAILPOINTS` lists `point` or `point=argument` entries, comma-separated, read once
//! per process. [`check`] panics at a point that is listed, with its argument when one is given
//! (`request=/panic` panics for requests to `/panic` only).
//!
//! | point | argument | where |
//! | --- | --- | --- |
//! | `request` | the request path | a worker loop, before it runs a request |
//! | `thread-start` | the thread name (`loop-1`, ...) | a worker's request thread, as it starts |

/// The environment variable read.
pub const ENV: &str = "FORKSCOPE_FAILPOINTS";

/// Panics when `point` is listed in [`ENV`] for `argument` (or for any argument).
#[cfg(debug_assertions)]
#[track_caller]
pub fn check(point: &str, argument: &[u8]) {
    static LISTED: std::sync::OnceLock<Vec<(String, Option<Vec<u8>>)>> = std::sync::OnceLock::new();
    let listed = LISTED.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .filter(|entry| !entry.is_empty())
            .map(|entry| match entry.split_once('=') {
                Some((point, argument)) => (point.to_owned(), Some(argument.as_bytes().to_vec())),
                None => (entry.to_owned(), None),
            })
            .collect()
    });
    let hit = listed
        .iter()
        .any(|(p, a)| p == point && a.as_deref().is_none_or(|a| a == argument));
    if hit {
        panic!("failpoint {point} ({ENV})");
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn check(_point: &str, _argument: &[u8]) {}
