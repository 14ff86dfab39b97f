//! Sizes for the memory settings, as Kubernetes writes them (`512Mi`, `2G`) or in bytes, and
//! the watch threshold: a size, or a share of `--max-worker-memory` (`0.8`, `80%`).

use serde::{Deserialize, Serialize};

/// Parses `123`, `64k`, `512Mi`, `2G`, `1.5Gi` (an optional trailing `B` is allowed:
/// `512MiB`). `k`, `M`, `G`, `T` are powers of 1000, `Ki`, `Mi`, `Gi`, `Ti` powers of 1024.
///
/// # Errors
/// Anything else, or a size past `u64`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix('B').unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor: u64 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(size_error(text)),
    };
    let value: f64 = number.parse().map_err(|_| size_error(text))?;
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(size_error(text));
    }
    Ok(bytes.round() as u64)
}

fn size_error(text: &str) -> String {
    format!(
        "{text:?} is not a size: write bytes, or a number with k, M, G (powers of 1000) or Ki, \
         Mi, Gi (powers of 1024), e.g. 512Mi"
    )
}

/// When tracing starts in a worker, ahead of `--max-worker-memory`; written as it is given
/// (`80%`, or bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Threshold {
    /// At this many bytes of private memory.
    Bytes(u64),
    /// At this share (0 < f < 1) of the limit.
    Share(f64),
}

impl Threshold {
    /// The threshold in bytes for `limit`.
    pub fn bytes(self, limit: u64) -> u64 {
        match self {
            Threshold::Bytes(b) => b,
            Threshold::Share(f) => (limit as f64 * f) as u64,
        }
    }
}

impl From<Threshold> for String {
    fn from(t: Threshold) -> String {
        match t {
            Threshold::Bytes(b) => b.to_string(),
            Threshold::Share(f) => format!("{}%", f * 100.0),
        }
    }
}

impl TryFrom<String> for Threshold {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse_threshold(&text)
    }
}

/// Parses a [`Threshold`]: `0.8` or `80%` of the limit, else a size ([`parse_size`]).
///
/// # Errors
/// A share outside (0, 1), or neither a share nor a size.
pub fn parse_threshold(text: &str) -> Result<Threshold, String> {
    let t = text.trim();
    let share = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok().map(|p| p / 100.0),
        None if t.contains('.') && t.chars().all(|c| c.is_ascii_digit() || c == '.') => {
            t.parse::<f64>().ok()
        }
        None => None,
    };
    match share {
        Some(f) if f > 0.0 && f < 1.0 => Ok(Threshold::Share(f)),
        Some(_) => Err(format!(
            "{text:?}: a share of --max-worker-memory must be above 0 and below 1 (100%)"
        )),
        None => parse_size(text).map(Threshold::Bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_kubernetes_writes_them() {
        for (text, bytes) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("64k", 64_000),
            ("512Mi", 512 << 20),
            ("512MiB", 512 << 20),
            ("2G", 2_000_000_000),
            ("1.5Gi", 3 << 29),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "Mi", "12 parsecs", "-5Mi", "1e30Ti", "5mi"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_threshold_is_a_share_of_the_limit_or_a_size() {
        assert_eq!(parse_threshold("0.8"), Ok(Threshold::Share(0.8)));
        assert_eq!(parse_threshold("80%"), Ok(Threshold::Share(0.8)));
        assert_eq!(parse_threshold("400Mi"), Ok(Threshold::Bytes(400 << 20)));
        assert_eq!(Threshold::Share(0.5).bytes(1000), 500);
        for t in [Threshold::Share(0.8), Threshold::Bytes(400 << 20)] {
            assert_eq!(parse_threshold(&String::from(t)), Ok(t), "round trip");
        }
        for bad in ["0%", "100%", "1.0", "1.5", "half"] {
            assert!(parse_threshold(bad).is_err(), "{bad}");
        }
    }
}
