//! The error log: gunicorn's line format, levels, file output and reopen after rotation.

use chrono::{FixedOffset, TimeZone};

use super::*;
use crate::settings::load_with_env;

#[test]
fn line_format_is_gunicorns() {
    let time = FixedOffset::east_opt(0)
        .unwrap()
        .with_ymd_and_hms(2026, 11, 25, 20, 42, 14)
        .unwrap();
    assert_eq!(
        format_line(
            &time,
            4242,
            LogLevel::Info,
            &format_args!("Booting worker with pid: {}", 7)
        ),
        "[2026-11-25 20:42:14 +0000] [4242] [INFO] Booting worker with pid: 7\n"
    );
    let time = FixedOffset::west_opt(5 * 3600 + 30 * 60)
        .unwrap()
        .with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
        .unwrap();
    assert_eq!(
        format_line(
            &time,
            1,
            LogLevel::Critical,
            &format_args!("WORKER TIMEOUT (pid:9)")
        ),
        "[2026-01-02 03:04:05 -0530] [1] [CRITICAL] WORKER TIMEOUT (pid:9)\n"
    );
    for (level, name) in [
        (LogLevel::Debug, "DEBUG"),
        (LogLevel::Warning, "WARNING"),
        (LogLevel::Error, "ERROR"),
    ] {
        assert!(
            format_line(&time, 1, level, &format_args!("x")).contains(&format!("] [{name}] x"))
        );
    }
}

fn settings(args: &[&str]) -> Settings {
    let args = std::iter::once("forkscope-server")
        .chain(args.iter().copied())
        .map(std::ffi::OsString::from)
        .collect();
    load_with_env(args, &|_| None, None)
        .expect("valid settings")
        .settings
}

/// The only test that installs the process-wide logger (tests run in parallel threads).
#[test]
fn error_log_to_file_levels_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("error.log");
    let path_str = path.to_str().unwrap();

    init(&settings(&[
        "--error-logfile",
        path_str,
        "--log-level",
        "warning",
    ]))
    .unwrap();
    log::info!("hidden info line");
    log::warn!("visible warning line");
    log::error!("visible error line\nwith a second line");
    crate::critical!("visible critical line");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("hidden info line"), "{text}");
    let pid = std::process::id();
    let warning = text
        .lines()
        .find(|line| line.ends_with("visible warning line"))
        .unwrap_or_else(|| panic!("no warning line in {text}"));
    let prefix = format!("] [{pid}] [WARNING] visible warning line");
    assert!(
        warning.starts_with('[') && warning.ends_with(&prefix),
        "{warning}"
    );
    assert!(text.contains(&format!(
        "[{pid}] [ERROR] visible error line\nwith a second line\n"
    )));
    assert!(text.contains(&format!("[{pid}] [CRITICAL] visible critical line\n")));

    // logrotate: move the file away, reopen, and new lines go to a new file at the path.
    let rotated = dir.path().join("error.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    log::warn!("into the rotated file");
    reopen().unwrap();
    log::warn!("into the new file");
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&path).unwrap();
    assert!(old.contains("into the rotated file") && !old.contains("into the new file"));
    assert!(new.contains("into the new file") && !new.contains("into the rotated file"));

    // --log-level critical keeps only critical!, a second init switches level and file.
    let critical_path = dir.path().join("critical.log");
    init(&settings(&[
        "--error-logfile",
        critical_path.to_str().unwrap(),
        "--log-level",
        "critical",
    ]))
    .unwrap();
    log::error!("plain error is dropped");
    crate::critical!("critical is kept");
    let text = std::fs::read_to_string(&critical_path).unwrap();
    assert!(!text.contains("plain error is dropped"), "{text}");
    assert!(text.contains("[CRITICAL] critical is kept"), "{text}");

    init(&settings(&[
        "--error-logfile",
        path_str,
        "--log-level",
        "debug",
    ]))
    .unwrap();
    log::debug!("debug is shown at debug");
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("[DEBUG] debug is shown at debug")
    );
    // Leave the logger writing to stderr at info for whatever runs next in this process.
    init(&settings(&[])).unwrap();
}

#[test]
fn an_unwritable_error_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("error.log");
    let error = Sink::open(path.to_str().unwrap(), Sink::Stderr).unwrap_err();
    assert!(error.to_string().contains("missing-dir"), "{error}");
}
