//! `/proc` look-ups the tests need: children of a process and their titles.

use std::fs;

/// The command line of `pid` with NULs as spaces (the process title), if it still exists.
pub fn title(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    Some(text.trim().to_owned())
}

/// The parent PID of `pid`.
pub fn parent(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Live children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| parent(*p) == Some(pid))
        .collect()
}

/// Workers of a forkscope-server leader as (slot, pid), sorted by slot, from their titles.
pub fn workers(leader: i32) -> Vec<(u32, i32)> {
    let mut out: Vec<(u32, i32)> = children(leader)
        .into_iter()
        .filter_map(|pid| {
            let t = title(pid)?;
            let rest = t.strip_prefix("forkscope-server: worker ")?;
            let slot = rest.split_whitespace().next()?.parse().ok()?;
            Some((slot, pid))
        })
        .collect();
    out.sort_unstable();
    out
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.get(s.rfind(')')? + 2..).map(|r| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Connections waiting in the accept queue of the IPv4 TCP socket listening on `port`
/// (`/proc/net/tcp`: for a listening socket, `rx_queue` counts them), if one listens there.
pub fn accept_queue(port: u16) -> Option<u32> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        if local_port != port || *fields.get(3)? != "0A" {
            return None;
        }
        u32::from_str_radix(fields.get(4)?.split(':').nth(1)?, 16).ok()
    })
}
