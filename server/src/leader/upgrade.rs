//! USR2: upgrade in place (`Leader::reexec`). The leader forks a child that executes the binary on disk with the
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
use pyo3::prelude::*;

use super::{Leader, signals, spawn, start};
use crate::hooks::{Hook, arg};

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
        // SAFETY: set_var/remove_var race only with other threads touching the environment; the
        // leader runs on this one thread alone (its invariant, since fork copies only the calling
        // thread), and this runs at start-up before any worker is forked.
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

impl Leader {
    /// USR2: starts a new leader from the binary on disk, on our sockets.
    pub(super) fn reexec(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        if let Some(child) = self.upgrade.child {
            log::warn!("USR2 ignored: the new leader (pid {child}) is still running");
            return;
        }
        if let Some(parent) = self.upgrade.parent {
            log::warn!("USR2 ignored: the old leader (pid {parent}) is still running");
            return;
        }
        let start = start();
        let Some(exe) = &start.exe else {
            log::error!("USR2: cannot tell which binary to execute");
            return;
        };
        let mut fds = Vec::new();
        for l in &self.listeners {
            if let Err(e) = l.set_inheritable() {
                log::error!("USR2: cannot pass the socket {l} on: {e}");
                return;
            }
            fds.push(l.fd().to_string());
        }
        let plan = match ExecPlan::new(exe, &start.argv, start.cwd.as_deref(), &fds.join(",")) {
            Ok(p) => p,
            Err(e) => {
                log::error!("USR2: {e:#}");
                return;
            }
        };
        // Renamed before the fork, so the new leader's pid file never collides with ours.
        if let Some(path) = self.pidfile.clone() {
            let old = oldbin(&path);
            match std::fs::rename(&path, &old) {
                Ok(()) => {
                    self.pidfile = Some(old);
                    self.upgrade.renamed_from = Some(path);
                }
                Err(e) => log::warn!("USR2: cannot rename {}: {e}", path.display()),
            }
        }
        let forked = spawn::fork_child(|| {
            signals::uninstall();
            let ok = Python::attach(|py| {
                crate::hooks::call(py, &self.hooks, Hook::PreExec, || {
                    Ok(vec![arg(py, &self.server)])
                })
                .is_ok()
            });
            if ok {
                let err = plan.exec();
                log::error!("USR2: cannot execute {}: {err}", exe.display());
            }
            crate::worker::WorkerExit::BootError
        });
        match forked {
            Ok(pid) => {
                log::info!(
                    "USR2: started a new leader (pid {pid}) from {}",
                    exe.display()
                );
                self.upgrade.child = Some(pid);
            }
            Err(e) => {
                log::error!("USR2: fork failed: {e}");
                self.restore_pidfile();
            }
        }
        // Our own workers must not inherit the sockets past an exec of their own.
        for l in &self.listeners {
            set_cloexec(l.fd());
        }
    }

    /// The new leader is gone while we still run: the pid file is ours again.
    pub(super) fn restore_pidfile(&mut self) {
        if let (Some(current), Some(original)) = (&self.pidfile, self.upgrade.renamed_from.take()) {
            match std::fs::rename(current, &original) {
                Ok(()) => self.pidfile = Some(original),
                Err(e) => log::warn!("cannot rename {} back: {e}", current.display()),
            }
        }
    }

    /// A leader started by USR2 becomes the only one once its old leader is gone.
    pub(super) fn check_promoted(&mut self) {
        if let Some(parent) = self.upgrade.parent
            && nix::unistd::getppid() != parent
        {
            log::info!("The old leader (pid {parent}) is gone: this leader is promoted");
            self.upgrade.parent = None;
        }
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
            // SAFETY: `cwd` is a CString we own, so the pointer is valid and NUL-terminated for
            // the call; chdir is async-signal-safe, as the forked child requires.
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
