//! Fixture `/proc` trees for unit tests: `stat`, `cmdline` and `smaps_rollup` files written the
//! way the kernel formats them.

use std::fs;
use std::path::Path;

/// The boot time every fixture's `stat` reports.
pub const BTIME: u64 = 1_700_000_000;

/// Writes `/proc/{pid}/stat` and `cmdline` (argv joined by NUL, as the kernel shows it).
pub fn proc(root: &Path, pid: u32, ppid: u32, state: char, start: u64, argv: &[&str]) {
    let dir = root.join(pid.to_string());
    fs::create_dir_all(&dir).expect("mkdir");
    // Fields 1..=52; utime=30, stime=20 ticks; starttime is field 22.
    let mut fields: Vec<String> = vec![
        pid.to_string(),
        "(comm with) paren)".into(),
        state.to_string(),
        ppid.to_string(),
    ];
    for i in 5..=52 {
        fields.push(match i {
            14 => "30".into(),
            15 => "20".into(),
            22 => start.to_string(),
            _ => "0".into(),
        });
    }
    fs::write(dir.join("stat"), fields.join(" ") + "\n").expect("stat");
    let mut cmdline = argv.join("\0");
    cmdline.push('\0');
    fs::write(dir.join("cmdline"), cmdline).expect("cmdline");
}

/// Writes `smaps_rollup` with `Pss` = `pss_kb`, `Rss` = `pss_kb + 150`, USS = `pss_kb`,
/// shared 150 kB and swap 3 kB.
pub fn rollup(root: &Path, pid: u32, pss_kb: u64) {
    let text = format!(
        "55d0c0a00000-7ffd5a1f2000 ---p 00000000 00:00 0                          [rollup]\n\
         Rss:               {rss} kB\n\
         Pss:               {pss_kb} kB\n\
         Pss_Anon:          1 kB\n\
         Shared_Clean:      100 kB\n\
         Shared_Dirty:      50 kB\n\
         Private_Clean:     7 kB\n\
         Private_Dirty:     {pd} kB\n\
         Referenced:        1 kB\n\
         Anonymous:         1 kB\n\
         Swap:              3 kB\n\
         SwapPss:           3 kB\n",
        rss = pss_kb + 150,
        pd = pss_kb - 7,
    );
    fs::write(root.join(pid.to_string()).join("smaps_rollup"), text).expect("rollup");
}

/// A fresh fixture root with `/proc/stat` (for the boot time).
pub fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join("stat"),
        format!("cpu 1 2 3 4\nbtime {BTIME}\nprocesses 10\n"),
    )
    .expect("stat");
    dir
}

/// A fixture with one forkscope-server leader (PID 100) of `app` and its worker in slot 0
/// (PID 101, PSS 800 kB).
pub fn one_leader(app: &str) -> tempfile::TempDir {
    let root = fixture();
    let r = root.path();
    proc(
        r,
        100,
        1,
        'S',
        1000,
        &[&format!("forkscope-server: leader [{app}]")],
    );
    proc(
        r,
        101,
        100,
        'S',
        1100,
        &[&format!("forkscope-server: worker 0 [{app}]")],
    );
    rollup(r, 101, 800);
    root
}
