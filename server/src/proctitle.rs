//! Process titles, as `ps` and `/proc/PID/cmdline` show them (DESIGN.md "Names").
//!
//! The sidecar finds roles by these titles, so their format is a contract, written once in
//! [`forkscope_protocol::title`]: `forkscope-server: leader [APP]` and
//! `forkscope-server: worker N [APP]`.
//!
//! Linux shows the memory between `arg_start` and `env_end` of the process as its command line.
//! [`init`] moves the environment strings to the heap (rebuilding `environ`), which frees the
//! whole area; [`set`] then writes the title there. This is what `setproctitle` does, without
//! needing CAP_SYS_RESOURCE for `PR_SET_MM`.

use std::sync::Mutex;

use forkscope_protocol::title::Title;

struct Area {
    start: usize,
    len: usize,
}

static AREA: Mutex<Option<Area>> = Mutex::new(None);

/// The leader's title (format: [`forkscope_protocol::title`]).
pub fn leader_title(app: &str) -> String {
    Title::Leader { app: app.into() }.render()
}

/// A worker's title; `slot` is the stable 0-based worker slot.
pub fn worker_title(slot: u32, app: &str) -> String {
    Title::Worker {
        slot,
        app: app.into(),
    }
    .render()
}

/// Reads `arg_start`..`env_end` (fields 48–51) from `/proc/self/stat`.
fn read_bounds() -> Option<[usize; 4]> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let get = |field: usize| fields.get(field - 3)?.parse::<usize>().ok();
    Some([get(48)?, get(49)?, get(50)?, get(51)?])
}

/// Claims the command-line area for titles. Call once, first thing in `main`, before any thread
/// starts (it replaces `environ`). Without it, [`set`] does nothing.
pub fn init() {
    let Some([arg_start, arg_end, env_start, env_end]) = read_bounds() else {
        return;
    };
    if arg_start == 0 || arg_end <= arg_start {
        return;
    }
    // Only take the environment area when it directly follows argv, as it does on Linux.
    let end = if env_start == arg_end && env_end > env_start {
        // SAFETY: single-threaded start-up; `environ` is a NULL-terminated array of C strings
        // that we copy before the area they point into is reused.
        unsafe { relocate_environ() };
        env_end
    } else {
        arg_end
    };
    let mut area = AREA.lock().unwrap_or_else(|e| e.into_inner());
    *area = Some(Area {
        start: arg_start,
        len: end - arg_start,
    });
}

unsafe extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Copies every environment string to the heap and points `environ` at the copies.
///
/// # Safety
/// No other thread may read or change the environment meanwhile (call it before any exists).
unsafe fn relocate_environ() {
    // SAFETY: the caller guarantees no other thread touches `environ` meanwhile; it is a
    // NULL-terminated array of NUL-terminated strings (POSIX), each copied by strdup before
    // the array pointer is replaced by the leaked copy.
    unsafe {
        let mut copies: Vec<*mut libc::c_char> = Vec::new();
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            copies.push(libc::strdup(*p));
            p = p.add(1);
        }
        copies.push(std::ptr::null_mut());
        // Leaked on purpose: the environment lives as long as the process.
        environ = Box::leak(copies.into_boxed_slice()).as_mut_ptr();
    }
}

/// Sets this process' title (truncated to the available area).
pub fn set(title: &str) {
    let area = AREA.lock().unwrap_or_else(|e| e.into_inner());
    let Some(area) = area.as_ref() else {
        return;
    };
    let bytes = title.as_bytes();
    let n = bytes.len().min(area.len.saturating_sub(1));
    // SAFETY: [start, start+len) is this process' own argv+environ memory, which `init` made
    // unused by anything else; writes stay inside it and leave a NUL terminator.
    unsafe {
        let dst = area.start as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, n);
        std::ptr::write_bytes(dst.add(n), 0, area.len - n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_follow_the_design() {
        assert_eq!(
            leader_title("app:app"),
            "forkscope-server: leader [app:app]"
        );
        assert_eq!(
            worker_title(3, "app:app"),
            "forkscope-server: worker 3 [app:app]"
        );
    }

    #[test]
    fn stat_bounds_are_ordered() {
        let [a, b, c, d] = read_bounds().expect("/proc/self/stat is readable");
        assert!(a < b && b <= c && c < d, "{a} {b} {c} {d}");
    }
}
