//! Panics: logged where the operator looks, and kept inside the worker that had them.
//!
//! The hook ([`install_hook`]) writes every panic, with its thread, place and message, to the
//! error log (the default hook writes to stderr, which is often not where the log goes). A
//! worker is a forked copy of the leader whose stack still holds the leader's frames, so a
//! panic must never unwind out of the worker's own code: [`contain`] stops it at the fork
//! boundary and at each request thread, and the worker then ends with
//! [`WorkerExit::Panicked`](crate::worker::WorkerExit::Panicked).

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, PanicHookInfo};

/// Sends panics to the error log. Call once the error log is set up.
pub fn install_hook() {
    std::panic::set_hook(Box::new(report));
}

thread_local! {
    /// A panic while reporting a panic (a broken error log) must not recurse.
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

fn report(info: &PanicHookInfo<'_>) {
    if REPORTING.replace(true) {
        return;
    }
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)");
    let place = info
        .location()
        .map_or_else(String::new, |l| format!(" at {l}"));
    // Captured when RUST_BACKTRACE asks for it, as the default hook does.
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = match backtrace.status() {
        std::backtrace::BacktraceStatus::Captured => format!("\n{backtrace}"),
        _ => String::new(),
    };
    crate::logging::error_without_waiting(format_args!(
        "panic in thread '{name}'{place}: {message}{backtrace}"
    ));
    REPORTING.set(false);
}

/// Runs `f`, stopping a panic from unwinding past this call. The hook has already logged it;
/// `Err` tells the caller to end what `f` was doing.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| Panicked)
}

/// A panic was stopped by [`contain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contained_panic_is_an_error_and_the_caller_goes_on() {
        assert_eq!(contain(|| 7), Ok(7));
        let mut touched = false;
        let result: Result<(), Panicked> = contain(|| {
            touched = true;
            panic!("contained");
        });
        assert_eq!(result, Err(Panicked));
        assert!(touched);
    }
}
