//! `forkscope-server [OPTIONS] MODULE:VARIABLE` — see the crate docs of `forkscope_server`.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
