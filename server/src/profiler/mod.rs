//! The profiler doorbell inside every worker: tracemalloc heap diffs and stack dumps (DESIGN.md).
//!
//! Stub: the interface the worker calls; the implementation follows.

use forkscope_protocol::RuntimeDir;
use pyo3::prelude::*;

/// Who this worker is and where it writes results.
#[derive(Debug, Clone)]
pub struct ProfilerContext {
    /// The runtime directory shared with the sidecar.
    pub runtime: RuntimeDir,
    /// This worker's PID.
    pub pid: u32,
    /// This worker's stable slot.
    pub slot: u32,
    /// The leader's PID.
    pub leader_pid: u32,
}

/// Registers the `forkscope` module in `sys.modules` (leader, right after Python starts).
///
/// # Errors
/// Python refused to create or register the module.
pub fn register_module(_py: Python<'_>) -> PyResult<()> {
    Ok(())
}

/// Installs the SIGUSR2 doorbell in a freshly forked worker.
///
/// # Errors
/// The handler could not be installed.
pub fn install(_py: Python<'_>, _ctx: ProfilerContext) -> PyResult<()> {
    Ok(())
}

/// Writes an `ExitedWhileTracing` result when the worker exits while tracing.
pub fn on_worker_exit(_py: Python<'_>, _reason: &str) {}
