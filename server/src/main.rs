//! `forkscope-server [OPTIONS] MODULE:VARIABLE` — see the crate docs of `forkscope_server`.

fn main() -> std::process::ExitCode {
    // First, before any thread exists: it takes over the memory behind the environment.
    forkscope_server::proctitle::init();
    forkscope_server::run(std::env::args_os().collect())
}
