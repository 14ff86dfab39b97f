//! Polling with a deadline: how the e2e tests wait for the apiserver to reach a state, instead
//! of sleeping for a fixed time.

use std::future::Future;
use std::time::Duration;

use crate::{Error, Result};

/// How long e2e helpers wait for a state by default. Generous, because the control plane
/// shares two cores with the rest of the test suite.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to pause between polls.
const INTERVAL: Duration = Duration::from_millis(100);

/// Calls `probe` until it returns `Ok(Some(value))` and returns that value.
///
/// # Errors
/// [`Error::Timeout`] naming `what` when `timeout` passes first; the first error `probe`
/// returns.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_the_first_ready_value() {
        let mut calls = 0;
        let got = until("third call", DEFAULT_TIMEOUT, || {
            calls += 1;
            let ready = calls == 3;
            async move { Ok(ready.then_some(calls)) }
        })
        .await
        .expect("ready on the third call");
        assert_eq!(got, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_naming_what_it_waited_for() {
        let err = until("never", Duration::from_secs(1), || async { Ok(None::<()>) })
            .await
            .expect_err("never ready");
        assert!(err.to_string().contains("never"), "{err}");
    }
}
