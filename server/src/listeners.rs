//! Parses `--bind` addresses and binds or inherits the listening sockets.
//!
//! Forms (gunicorn's): `HOST:PORT`, `HOST` (port 8000), `[::1]:PORT`, `unix:PATH`, `fd://N`.
//! A new leader started by a USR2 upgrade inherits the old leader's sockets through the
//! `FORKSCOPE_FDS` environment variable (comma-separated descriptors, in `--bind` order), so no
//! connection is refused while both run.

use std::fmt;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};

/// Environment variable through which a re-executed leader inherits its sockets.
pub const INHERIT_ENV: &str = "FORKSCOPE_FDS";

/// One parsed `--bind` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddr {
    /// A TCP host (name or literal) and port.
    Tcp(String, u16),
    /// A Unix socket path.
    Unix(PathBuf),
    /// An already-open listening descriptor.
    Fd(RawFd),
}

impl BindAddr {
    /// Parses one `--bind` value.
    ///
    /// # Errors
    /// A malformed address or port.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                bail!("invalid bind {text:?}: empty unix socket path");
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(fd) = text.strip_prefix("fd://") {
            let fd = fd
                .parse::<RawFd>()
                .with_context(|| format!("invalid bind {text:?}: not a file descriptor"))?;
            return Ok(Self::Fd(fd));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .with_context(|| format!("invalid bind {text:?}: missing ']'"))?;
            let port = after.strip_prefix(':').unwrap_or("8000");
            (host, port)
        } else {
            match text.rsplit_once(':') {
                Some((host, port)) => (host, port),
                None => (text, "8000"),
            }
        };
        let port = port
            .parse::<u16>()
            .with_context(|| format!("invalid bind {text:?}: bad port {port:?}"))?;
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        Ok(Self::Tcp(host.to_owned(), port))
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain; the path is removed when the leader exits.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The descriptor (for inheritance and for registering with a poller).
    pub fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    /// The local address of a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Clears `FD_CLOEXEC` so a re-executed leader inherits the socket.
    ///
    /// # Errors
    /// `fcntl` failed.
    pub fn set_inheritable(&self) -> nix::Result<()> {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        // SAFETY: the fd is owned by self and stays open for the duration of the call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd()) };
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map(|_| ())
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => write!(f, "http://{addr}"),
                Err(_) => write!(f, "http://?"),
            },
            Listener::Unix(_, path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Binds every address (or adopts inherited descriptors when `FORKSCOPE_FDS` is set).
///
/// # Errors
/// An address that cannot be resolved or bound; the message names it.
pub fn bind_all(binds: &[String], backlog: i32) -> anyhow::Result<Vec<Listener>> {
    let inherited = std::env::var(INHERIT_ENV).ok();
    // SAFETY: remove_var races only with other threads touching the environment; the leader
    // runs on this one thread alone (its invariant, since fork copies only the calling thread).
    unsafe { std::env::remove_var(INHERIT_ENV) };
    if let Some(fds) = inherited {
        return fds
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                let fd = s
                    .parse::<RawFd>()
                    .with_context(|| format!("bad {INHERIT_ENV} entry {s:?}"))?;
                adopt_fd(fd)
            })
            .collect();
    }
    binds
        .iter()
        .map(|b| {
            bind_one(&BindAddr::parse(b)?, backlog).with_context(|| format!("cannot bind {b}"))
        })
        .collect()
}

fn bind_one(addr: &BindAddr, backlog: i32) -> anyhow::Result<Listener> {
    match addr {
        BindAddr::Tcp(host, port) => {
            let sockaddr = (host.as_str(), *port)
                .to_socket_addrs()?
                .next()
                .with_context(|| format!("{host} resolves to no address"))?;
            let socket = Socket::new(
                Domain::for_address(sockaddr),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            if sockaddr.is_ipv6() {
                socket.set_only_v6(host != "::")?;
            }
            socket.set_tcp_nodelay(true)?;
            socket.bind(&sockaddr.into())?;
            socket.listen(backlog)?;
            Ok(Listener::Tcp(socket.into()))
        }
        BindAddr::Unix(path) => {
            // A stale socket file from a crashed run would make bind fail with EADDRINUSE.
            if let Ok(meta) = std::fs::symlink_metadata(path)
                && std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
            {
                std::fs::remove_file(path)?;
            }
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&socket2::SockAddr::unix(path)?)?;
            socket.listen(backlog)?;
            Ok(Listener::Unix(socket.into(), path.clone()))
        }
        BindAddr::Fd(fd) => adopt_fd(*fd),
    }
}

/// Wraps an inherited listening descriptor, telling TCP from Unix by its address family.
fn adopt_fd(fd: RawFd) -> anyhow::Result<Listener> {
    // SAFETY: the descriptor was handed to us (fd://N or FORKSCOPE_FDS) to own from now on.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = Socket::from(owned);
    let local = socket
        .local_addr()
        .with_context(|| format!("fd {fd} is not a socket"))?;
    if local.is_unix() {
        let path = local.as_pathname().map(PathBuf::from).unwrap_or_default();
        Ok(Listener::Unix(socket.into(), path))
    } else {
        Ok(Listener::Tcp(socket.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_forms() {
        assert_eq!(
            BindAddr::parse("127.0.0.1:9000").expect("ok"),
            BindAddr::Tcp("127.0.0.1".into(), 9000)
        );
        assert_eq!(
            BindAddr::parse("[::]:80").expect("ok"),
            BindAddr::Tcp("::".into(), 80)
        );
        assert_eq!(
            BindAddr::parse("localhost").expect("ok"),
            BindAddr::Tcp("localhost".into(), 8000)
        );
        assert_eq!(
            BindAddr::parse(":8080").expect("ok"),
            BindAddr::Tcp("0.0.0.0".into(), 8080)
        );
        assert_eq!(
            BindAddr::parse("unix:/tmp/x.sock").expect("ok"),
            BindAddr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(BindAddr::parse("fd://3").expect("ok"), BindAddr::Fd(3));
        assert!(BindAddr::parse("host:notaport").is_err());
        assert!(BindAddr::parse("unix:").is_err());
    }

    #[test]
    fn binds_tcp_and_unix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s.sock");
        let listeners = bind_all(
            &["127.0.0.1:0".into(), format!("unix:{}", sock.display())],
            16,
        )
        .expect("bind");
        assert!(listeners[0].tcp_addr().expect("tcp").port() != 0);
        assert!(sock.exists());
        // A stale socket file is replaced, not an error.
        drop(listeners);
        bind_all(&[format!("unix:{}", sock.display())], 16).expect("rebind over stale file");
    }
}
