//! Listening sockets: bound by the master before anything starts, passed to every worker.
//!
//! TCP (IPv4 and IPv6) and Unix stream sockets, each with its configured backlog, all
//! close-on-exec in the master (the spawn places them at fds 3, 4, ... in a worker). A Unix
//! socket file left by a dead process is replaced only when nothing accepts on it.
//!
//! Every TCP listener, bound or inherited, has `TCP_NODELAY` set: Linux copies it to each
//! accepted connection, so no worker waits on Nagle's algorithm and delayed ACKs (40 ms per
//! keep-alive response for a server that writes its head and body apart, as uvicorn does).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, connect, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn, SockaddrIn6, UnixAddr,
};

use crate::config::{Address, Listen};
use crate::systemd::{ActivationError, Inherited, Local};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot bind {address}: {source}")]
    Os { address: Address, source: io::Error },
    #[error("cannot bind {address}: another process accepts connections on it")]
    InUse { address: Address },
    #[error("cannot bind {address}: {path} exists and is not a socket")]
    NotASocket { address: Address, path: PathBuf },
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error("socket activation: fd {fd} (name {name:?}, {local}) matches no [[listen]] by name or address")]
    Unmatched { fd: RawFd, name: String, local: Local },
}

/// One bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: Address,
    fd: OwnedFd,
    /// A Unix socket file this master created, removed when the listener is closed.
    created: Option<PathBuf>,
}

impl Listener {
    /// Binds and listens as `spec` says.
    pub fn bind(spec: &Listen) -> Result<Listener, BindError> {
        let os = |source: io::Error| BindError::Os { address: spec.address.clone(), source };
        let fd = match &spec.address {
            Address::Tcp(addr) => bind_tcp(*addr).map_err(os)?,
            Address::Unix(path) => {
                clear_stale_socket(path, &spec.address)?;
                bind_unix(path).map_err(os)?
            }
        };
        let backlog =
            Backlog::new(spec.backlog.min(i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN);
        listen(&fd, backlog).map_err(|e| os(e.into()))?;
        let created = match &spec.address {
            Address::Unix(p) => Some(p.clone()),
            Address::Tcp(_) => None,
        };
        Ok(Listener { name: spec.name.clone(), address: spec.address.clone(), fd, created })
    }

    /// A socket systemd passed to the master, standing for `spec` (never unlinked by presup).
    fn adopt(spec: &Listen, inherited: Inherited) -> Result<Listener, BindError> {
        if matches!(inherited.local, Local::Tcp(_)) {
            setsockopt(&inherited.fd, sockopt::TcpNoDelay, &true)
                .map_err(|e| BindError::Os { address: spec.address.clone(), source: e.into() })?;
        }
        Ok(Listener {
            name: spec.name.clone(),
            address: spec.address.clone(),
            fd: inherited.fd,
            created: None,
        })
    }

    /// The address actually bound (differs from the configured one for port 0).
    pub fn local_addr(&self) -> io::Result<String> {
        match self.address {
            Address::Unix(_) => Ok(self.address.to_string()),
            Address::Tcp(_) => {
                let std = std::net::TcpListener::from(self.fd.try_clone()?);
                Ok(std.local_addr()?.to_string())
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = self.created.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The listeners of the config, taking the sockets systemd passed where they match: by
/// `LISTEN_FDNAMES` name first, else by address (an unspecified address such as `0.0.0.0:80`
/// matches `[::]:80`). The others are bound as usual; a passed socket that matches nothing is
/// an error. Returns the listeners in config order, with whether each was inherited.
pub fn bind_or_adopt(
    specs: &[Listen],
    inherited: Vec<Inherited>,
) -> Result<Vec<(Listener, bool)>, BindError> {
    let mut slots: Vec<Option<Inherited>> = specs.iter().map(|_| None).collect();
    for fd in inherited {
        let by_name = specs.iter().position(|s| s.name == fd.name);
        let by_address = || {
            specs.iter().enumerate().position(|(i, s)| {
                slots[i].is_none() && by_name.is_none() && same_address(&s.address, &fd.local)
            })
        };
        match by_name.filter(|&i| slots[i].is_none()).or_else(by_address) {
            Some(i) => slots[i] = Some(fd),
            None => {
                let fd_num = fd.fd.as_raw_fd();
                return Err(BindError::Unmatched { fd: fd_num, name: fd.name, local: fd.local });
            }
        }
    }
    specs
        .iter()
        .zip(slots)
        .map(|(spec, slot)| match slot {
            Some(fd) => Listener::adopt(spec, fd).map(|l| (l, true)),
            None => Listener::bind(spec).map(|l| (l, false)),
        })
        .collect()
}

fn same_address(configured: &Address, local: &Local) -> bool {
    match (configured, local) {
        (Address::Tcp(a), Local::Tcp(b)) => {
            a == b || (a.port() == b.port() && a.ip().is_unspecified() && b.ip().is_unspecified())
        }
        (Address::Unix(a), Local::Unix(b)) => a == b,
        _ => false,
    }
}

fn bind_tcp(addr: std::net::SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    match addr {
        std::net::SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        std::net::SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    Ok(fd)
}

fn bind_unix(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Removes a Unix socket file that nothing accepts on any more; refuses to touch a live
/// socket or a file that is not a socket.
pub fn clear_stale_socket(path: &Path, address: &Address) -> Result<(), BindError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(BindError::Os { address: address.clone(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket { address: address.clone(), path: path.to_path_buf() });
    }
    match unix_accepts(path) {
        Ok(true) => Err(BindError::InUse { address: address.clone() }),
        Ok(false) => std::fs::remove_file(path)
            .map_err(|source| BindError::Os { address: address.clone(), source }),
        Err(source) => Err(BindError::Os { address: address.clone(), source }),
    }
}

/// Whether a process listens on the Unix stream socket at `path`: `Ok(false)` when the
/// connection is refused (a socket file left behind). Never waits: the connect is non-blocking,
/// and a listener whose backlog is full (`EAGAIN`) counts as listening, where a blocking
/// connect would hang the master's loop until it accepts.
pub fn unix_accepts(path: &Path) -> io::Result<bool> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) | Err(Errno::EAGAIN) => Ok(true),
        Err(Errno::ECONNREFUSED) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(address: Address) -> Listen {
        Listen { name: "t".into(), address, backlog: 16 }
    }

    #[test]
    fn tcp_port_in_use_names_the_address() {
        let first = Listener::bind(&spec(Address::Tcp("127.0.0.1:0".parse().unwrap()))).unwrap();
        let taken: std::net::SocketAddr = first.local_addr().unwrap().parse().unwrap();
        let err = Listener::bind(&spec(Address::Tcp(taken))).unwrap_err().to_string();
        assert!(err.contains(&taken.to_string()) && err.contains("in use"), "{err}");
    }

    #[test]
    fn accepted_tcp_connections_inherit_tcp_nodelay() {
        let l = Listener::bind(&spec(Address::Tcp("127.0.0.1:0".parse().unwrap()))).unwrap();
        let std = std::net::TcpListener::from(l.fd.try_clone().unwrap());
        let _client = std::net::TcpStream::connect(std.local_addr().unwrap()).unwrap();
        let (accepted, _) = std.accept().unwrap();
        assert!(accepted.nodelay().unwrap(), "an accepted connection waits on Nagle");
    }

    #[test]
    fn stale_unix_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale file: bound once, then its socket closed without unlinking.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let l = Listener::bind(&spec(Address::Unix(path.clone()))).unwrap();
        let err = Listener::bind(&spec(Address::Unix(path.clone()))).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        drop(l);
        assert!(!path.exists(), "the master removes the socket file it created");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = Listener::bind(&spec(Address::Unix(path.clone()))).unwrap_err();
        assert!(matches!(err, BindError::NotASocket { .. }), "{err}");
    }

    #[test]
    fn a_unix_listener_with_a_full_backlog_counts_as_listening_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let _busy = Listener::bind(&spec(Address::Unix(path.clone()))).unwrap();
        // Nobody accepts: fill the backlog until a non-blocking connect says EAGAIN.
        let mut queued = Vec::new();
        loop {
            let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap();
            match connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()) {
                Ok(()) => queued.push(fd),
                Err(Errno::EAGAIN) => break,
                Err(e) => panic!("connect: {e}"),
            }
            assert!(queued.len() < 100_000, "the backlog never filled");
        }
        // A blocking connect would wait here until someone accepts: never, in this test.
        let (tx, rx) = std::sync::mpsc::channel();
        let probe = path.clone();
        std::thread::spawn(move || tx.send(unix_accepts(&probe).unwrap()).unwrap());
        let answer = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(answer, Ok(true), "unix_accepts waited on a full backlog");
        let err = Listener::bind(&spec(Address::Unix(path.clone()))).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");

        drop(std::os::unix::net::UnixListener::bind(dir.path().join("stale.sock")).unwrap());
        assert!(!unix_accepts(&dir.path().join("stale.sock")).unwrap());
        assert!(unix_accepts(&dir.path().join("missing.sock")).is_err());
    }
}
