//! Timestamps and the request ids the worker makes up itself (bare doorbell, marks, rejects).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as the protocol's timestamps are.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `{prefix}-YYYYMMDD-HHMMSS-mmm` (UTC) for time `at`: sortable, readable, and a valid request
/// id (only `[A-Za-z0-9_-]`).
pub fn stamped(prefix: &str, at: f64) -> String {
    let millis = (at.max(0.0) * 1000.0) as u64;
    let secs = millis / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let day_secs = secs % 86_400;
    format!(
        "{prefix}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{:03}",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        millis % 1000
    )
}

/// The Gregorian date of day `z` since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A request id for `forkscope.mark(label)`: `mark-{label}-{seq}`, with the label reduced to
/// at most 40 characters of `[A-Za-z0-9_-]` (others become `_`). `seq` is unique within the
/// worker process, and each process has its own results folder, so ids never collide.
pub fn mark_id(label: &str, seq: u64) -> String {
    let clean: String = label
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = if clean.is_empty() {
        "mark".to_owned()
    } else {
        clean
    };
    format!("mark-{clean}-{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkscope_protocol::command::valid_request_id;

    #[test]
    fn stamps_are_utc_and_valid_ids() {
        // 2026-11-25 20:52:49.123 UTC
        let id = stamped("manual", 1_795_639_969.123);
        assert_eq!(id, "manual-20261125-205249-123");
        assert!(valid_request_id(&id));
        assert_eq!(stamped("x", 0.0), "x-19700101-000000-000");
        // A leap day.
        assert_eq!(stamped("x", 951_782_400.0), "x-20000229-000000-000");
    }

    #[test]
    fn mark_ids_are_valid_whatever_the_label() {
        for label in ["", "after login", "ünïcode/../x", &"y".repeat(200)] {
            let id = mark_id(label, 123_456);
            assert!(valid_request_id(&id), "{id}");
        }
        assert_eq!(mark_id("after login", 3), "mark-after_login-3");
    }
}
