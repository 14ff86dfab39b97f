//! Every thread's Python stack, for a worker that is slow right now.

use std::collections::BTreeMap;

use forkscope_protocol::{Frame, ThreadStack};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Deepest stack walked per thread; a deeper (runaway recursive) stack is cut at the outer end.
const MAX_DEPTH: usize = 2000;

/// The Python stack of every thread, the main thread first, frames outermost first.
///
/// The calling thread is marked `current`. Threads known to `threading` that run no Python code
/// right now (a worker idle in its event loop) are listed with no frames.
///
/// # Errors
/// `sys` or `threading` are unusable (the interpreter is shutting down).
pub fn thread_stacks(py: Python<'_>) -> PyResult<Vec<ThreadStack>> {
    let sys = py.import("sys")?;
    let threading = py.import("threading")?;
    let current: u64 = threading.call_method0("get_ident")?.extract()?;
    let main: Option<u64> = threading
        .call_method0("main_thread")?
        .getattr("ident")?
        .extract()?;
    let mut names = BTreeMap::new();
    for thread in threading.call_method0("enumerate")?.try_iter()? {
        let thread = thread?;
        if let Some(ident) = thread.getattr("ident")?.extract::<Option<u64>>()? {
            names.insert(ident, thread.getattr("name")?.extract::<String>()?);
        }
    }
    let frames = sys.call_method0("_current_frames")?.cast_into::<PyDict>()?;
    let mut stacks: BTreeMap<u64, Vec<Frame>> = BTreeMap::new();
    for (ident, frame) in frames.iter() {
        stacks.insert(ident.extract()?, walk(frame)?);
    }
    // Threads that run no Python code right now (the calling thread when it is the handler
    // run from Rust with no Python frame) are still listed.
    for ident in names.keys().chain([&current]) {
        stacks.entry(*ident).or_default();
    }
    let mut out: Vec<ThreadStack> = stacks
        .into_iter()
        .map(|(thread_id, frames)| ThreadStack {
            thread_id,
            name: names.get(&thread_id).cloned().unwrap_or_else(|| "?".into()),
            current: thread_id == current,
            frames,
        })
        .collect();
    out.sort_by_key(|t| (Some(t.thread_id) != main, t.thread_id));
    Ok(out)
}

/// Frames from `frame` outwards, returned outermost first.
fn walk(frame: Bound<'_, PyAny>) -> PyResult<Vec<Frame>> {
    let mut frames = Vec::new();
    let mut next = Some(frame);
    while let Some(frame) = next.take().filter(|f| !f.is_none()) {
        if frames.len() == MAX_DEPTH {
            break;
        }
        let code = frame.getattr("f_code")?;
        let function = code
            .getattr("co_qualname")
            .or_else(|_| code.getattr("co_name"))?
            .extract::<String>()?;
        frames.push(Frame {
            filename: code.getattr("co_filename")?.extract()?,
            // f_lineno is None while a frame is being set up.
            lineno: frame
                .getattr("f_lineno")?
                .extract::<Option<u32>>()?
                .unwrap_or(0),
            function: Some(function),
        });
        next = Some(frame.getattr("f_back")?);
    }
    frames.reverse();
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A named thread parked in a known function shows up with its name and that function
    /// innermost; the calling thread is marked current.
    #[test]
    fn names_threads_and_orders_frames_outermost_first() {
        Python::initialize();
        Python::attach(|py| {
            let m = PyModule::from_code(
                py,
                c"import threading\nev = threading.Event()\nready = threading.Event()\ndef parked():\n    ready.set()\n    ev.wait()\ndef outer():\n    parked()\nt = threading.Thread(target=outer, name='parker', daemon=True)\nt.start()\n",
                c"/fs/stacks_unit.py",
                c"stacks_unit",
            )
            .expect("module");
            m.getattr("ready")
                .and_then(|r| r.call_method1("wait", (10,)))
                .expect("thread ready");
            let stacks = thread_stacks(py).expect("stacks");
            let parker = stacks
                .iter()
                .find(|t| t.name == "parker")
                .unwrap_or_else(|| panic!("no parker thread in {stacks:#?}"));
            assert!(!parker.current);
            let names: Vec<&str> = parker
                .frames
                .iter()
                .filter(|f| f.filename == "/fs/stacks_unit.py")
                .filter_map(|f| f.function.as_deref())
                .collect();
            assert_eq!(names, ["outer", "parked"], "{parker:#?}");
            let funcs: Vec<&str> = parker
                .frames
                .iter()
                .filter_map(|f| f.function.as_deref())
                .collect();
            let parked = funcs
                .iter()
                .position(|f| *f == "parked")
                .expect("parked frame");
            assert_eq!(funcs.get(parked + 1), Some(&"Event.wait"), "{funcs:?}");
            assert_eq!(funcs.first(), Some(&"Thread._bootstrap"), "{funcs:?}");
            assert_eq!(
                stacks.iter().filter(|t| t.current).count(),
                1,
                "{stacks:#?}"
            );
            m.getattr("ev")
                .and_then(|e| e.call_method0("set"))
                .expect("release");
            m.getattr("t")
                .and_then(|t| t.call_method0("join"))
                .expect("join");
        });
    }
}
