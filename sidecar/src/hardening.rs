//! Process-wide protections of the sidecar against the application it shares a pod with.

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0): a process of the same UID (the
/// application, in a pod that shares its PID namespace) can then neither read its memory,
/// environment and descriptors through `/proc/<pid>/...` nor reach the token through
/// `/proc/<pid>/root`, nor ptrace it; and no core dump holds the token. Call it first thing.
///
/// # Errors
/// When the kernel refuses (it does not for this option).
pub fn make_non_dumpable() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process is dumpable now.
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no argument and returns the flag.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}
