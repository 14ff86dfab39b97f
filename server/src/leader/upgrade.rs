//! USR2: upgrade in place. The leader forks a child that executes the binary on disk with the
//! original command line; the listening sockets stay open across `exec` (their descriptors are
//! named in `FORKSCOPE_FDS`), so the new leader accepts on the very same sockets and no
//! connection is refused while both generations run. The old leader renames its pid file to
//! `<pidfile>.oldbin` (the new leader writes `<pidfile>`) and serves on until it is told to
//! stop (TERM, or WINCH then TERM). If the new leader dies while the old one still runs, the
//! pid file gets its name back.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

/// Environment variable naming the old leader's PID in a leader started by USR2 (gunicorn's
/// `GUNICORN_PID`). While that leader lives, the new one neither upgrades itself nor removes
/// the Unix socket files it shares with it.
pub const PARENT_ENV: &str = "FORKSCOPE_PARENT_LEADER";

/// Where this leader stands in an upgrade.
#[derive(Debug, Default)]
pub struct Upgrade {
    /// The new leader this one started (old side).
    pub child: Option<Pid>,
    /// The old leader that started this one, while it runs (new side).
    pub parent: Option<Pid>,
    /// The pid file's name before it became `.oldbin`.
    pub renamed_from: Option<PathBuf>,
}

impl Upgrade {
    /// Reads (and removes) [`PARENT_ENV`]: set when this process was started by USR2.
    pub fn from_env() -> Self {
        let parent = std::env::var(PARENT_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map(Pid::from_raw);
        // SAFETY: read once at start-up, before any thread exists.
        unsafe { std::env::remove_var(PARENT_ENV) };
        Self {
            parent,
            ..Self::default()
        }
    }

    /// True while another leader shares our sockets (an upgrade in either direction).
    pub fn sharing_sockets(&self) -> bool {
        self.child.is_some() || self.parent.is_some()
    }
}

/// `<pidfile>.oldbin`.
pub fn oldbin(pidfile: &Path) -> PathBuf {
    let mut name = pidfile.as_os_str().to_owned();
    name.push(".oldbin");
    PathBuf::from(name)
}

/// What the child needs to exec, prepared before the fork (no allocation after it).
pub struct ExecPlan {
    exe: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    cwd: Option<CString>,
}

impl ExecPlan {
    /// The plan for `exe` with `argv`, the current environment plus the inherited sockets
    /// (`fds`) and this leader's PID; run from `cwd` (where the leader started, so relative
    /// paths in `argv` mean what they meant).
    ///
    /// # Errors
    /// A NUL byte inside an argument or variable.
    pub fn new(
        exe: &Path,
        argv: &[OsString],
        cwd: Option<&Path>,
        fds: &str,
    ) -> anyhow::Result<Self> {
        let c = |b: &[u8]| CString::new(b.to_vec());
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != crate::listeners::INHERIT_ENV && k.as_os_str() != PARENT_ENV)
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv)
            })
            .collect::<Result<_, _>>()?;
        env.push(c(
            format!("{}={fds}", crate::listeners::INHERIT_ENV).as_bytes()
        )?);
        env.push(c(format!("{PARENT_ENV}={}", std::process::id()).as_bytes())?);
        Ok(Self {
            exe: c(exe.as_os_str().as_bytes())?,
            argv: argv
                .iter()
                .map(|a| c(a.as_bytes()))
                .collect::<Result<_, _>>()?,
            env,
            cwd: cwd.map(|p| c(p.as_os_str().as_bytes())).transpose()?,
        })
    }

    /// In the forked child: clears the signal mask and executes the plan. Returns only when
    /// `execve` failed.
    pub fn exec(&self) -> nix::Error {
        use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        if let Some(cwd) = &self.cwd {
            // SAFETY: chdir with a valid C string.
            unsafe { libc::chdir(cwd.as_ptr()) };
        }
        match nix::unistd::execve(&self.exe, &self.argv, &self.env) {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }
}

/// Sets `FD_CLOEXEC` on `fd` again after the new leader was started, so nothing our workers
/// execute inherits the listening sockets.
pub fn set_cloexec(fd: std::os::fd::RawFd) {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    // SAFETY: the caller owns `fd`, which stays open for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_pid_file_gets_the_oldbin_suffix() {
        assert_eq!(
            oldbin(Path::new("/run/app.pid")),
            PathBuf::from("/run/app.pid.oldbin")
        );
    }

    #[test]
    fn the_exec_plan_passes_the_sockets_and_the_parent() {
        let plan = ExecPlan::new(
            Path::new("/bin/forkscope-server"),
            &["forkscope-server".into(), "app:app".into()],
            Some(Path::new("/srv")),
            "3,4",
        )
        .expect("plan");
        let env: Vec<String> = plan
            .env
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        assert!(env.contains(&"FORKSCOPE_FDS=3,4".to_owned()), "{env:?}");
        assert!(
            env.contains(&format!("{PARENT_ENV}={}", std::process::id())),
            "{env:?}"
        );
        assert_eq!(plan.argv.len(), 2);
        assert_eq!(plan.cwd.as_deref(), Some(c"/srv"));
    }
}
