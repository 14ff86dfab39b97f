//! How the process was started, recorded before anything changes it: the command line (process
//! titles later overwrite its memory), the working directory (before `--chdir`) and the binary.
//! HUP parses the same command line again; USR2 executes the same binary with it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

/// How the process was started: what USR2 executes again and HUP parses again.
#[derive(Debug)]
pub struct Start {
    /// The command line, program name first.
    pub argv: Vec<OsString>,
    /// The working directory before `--chdir`.
    pub cwd: Option<PathBuf>,
    /// The binary USR2 executes: `argv[0]` when it is a path (so a deploy that swaps a symlink
    /// or replaces the file is picked up), else `/proc/self/exe` as it was at start.
    pub exe: Option<PathBuf>,
}

static START: OnceLock<Start> = OnceLock::new();

/// Records the command line, the working directory and the binary's path. `run` calls it first,
/// before `--chdir` and before process titles overwrite the command-line memory.
pub fn remember_start(args: &[OsString]) {
    let _ = START.set(Start {
        argv: args.to_vec(),
        cwd: std::env::current_dir().ok(),
        exe: binary_path(args.first()),
    });
}

fn binary_path(argv0: Option<&OsString>) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    argv0
        .filter(|a| a.as_bytes().contains(&b'/'))
        .map(PathBuf::from)
        .or_else(|| std::fs::read_link("/proc/self/exe").ok())
}

/// What [`remember_start`] recorded (or the current values, if it never ran).
pub fn start() -> &'static Start {
    START.get_or_init(|| {
        let argv: Vec<OsString> = std::env::args_os().collect();
        Start {
            exe: binary_path(argv.first()),
            argv,
            cwd: std::env::current_dir().ok(),
        }
    })
}
