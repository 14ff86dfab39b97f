//! The `Date` header value, formatted at most once per second.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Length of an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub const DATE_LEN: usize = 29;

/// Caches the IMF-fixdate for the current second so that writing a response head costs a
/// clock read, an uncontended lock and a 29-byte copy. Shareable between threads.
#[derive(Debug)]
pub struct DateCache {
    /// The second the value was formatted for, and the value.
    cached: Mutex<(u64, [u8; DATE_LEN])>,
}

impl Default for DateCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DateCache {
    /// A cache that formats on first use.
    pub const fn new() -> Self {
        DateCache {
            cached: Mutex::new((u64::MAX, [b' '; DATE_LEN])),
        }
    }

    /// The current date as an IMF-fixdate (refreshed when the second changed).
    pub fn get(&self) -> [u8; DATE_LEN] {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        // A panic while holding the lock cannot leave a torn value: it is replaced whole.
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if second != cached.0 {
            let formatted = httpdate::fmt_http_date(now);
            let bytes = formatted.as_bytes();
            let n = bytes.len().min(DATE_LEN);
            cached.1[..n].copy_from_slice(&bytes[..n]);
            cached.0 = second;
        }
        cached.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_imf_fixdate() {
        let date = DateCache::new().get();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
