//! The master as a systemd service: what it tells systemd, and the sockets systemd gives it.
//!
//! [`Notifier`] speaks `sd_notify` to the `NOTIFY_SOCKET` the master was started with (a path or
//! an abstract `@name`): `READY=1` once every initial child is ready, `STATUS=` with the
//! counts, `RELOADING=1` with `MONOTONIC_USEC=` on HUP and `READY=1` when the reload is done or
//! undone, `STOPPING=1`, `WATCHDOG=1` at half of `WATCHDOG_USEC`, and `EXTEND_TIMEOUT_USEC=`
//! while starting or stopping takes long. Without `NOTIFY_SOCKET` every call does nothing.
//!
//! [`inherited_listeners`] takes the sockets of socket activation (`LISTEN_FDS` from fd 3,
//! meant for this pid by `LISTEN_PID`, named by `LISTEN_FDNAMES`).
#![allow(unsafe_code)] // Socket activation: the fds systemd passed, made close-on-exec and adopted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};
use tracing::{debug, warn};

/// How often `EXTEND_TIMEOUT_USEC=` is sent while the master starts or stops, and by how much
/// each one extends systemd's timeout (several periods, so one late wake-up is harmless).
pub const EXTEND_EVERY: Duration = Duration::from_secs(2);
pub const EXTEND_BY: Duration = Duration::from_secs(10);

/// The master's side of systemd's notification protocol.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half of systemd's `WATCHDOG_USEC`, when it asked for pings.
    watchdog_every: Option<Duration>,
    next_watchdog: Option<Instant>,
    next_extend: Option<Instant>,
    last_status: String,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the master's environment.
    pub fn from_env(now: Instant) -> Notifier {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let target = var("NOTIFY_SOCKET").and_then(|path| match connect(&path) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("NOTIFY_SOCKET={path}: {e}; systemd will not hear from presup");
                None
            }
        });
        let ours = var("WATCHDOG_PID").map_or(true, |p| p == std::process::id().to_string());
        let watchdog_every = var("WATCHDOG_USEC")
            .filter(|_| ours && target.is_some())
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0)
            .map(|u| Duration::from_micros(u) / 2);
        let extend = target.as_ref().map(|_| now + EXTEND_EVERY);
        Notifier {
            target,
            watchdog_every,
            next_watchdog: watchdog_every.map(|d| now + d),
            next_extend: extend,
            last_status: String::new(),
        }
    }

    /// The fd of the socket to systemd, if any (a forked worker closes it).
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.target.as_ref().map(|(s, _)| s.as_raw_fd())
    }

    /// Whether systemd is listening.
    pub fn active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one datagram of `KEY=VALUE` lines.
    pub fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else { return };
        debug!(message = %message.replace('\n', " "), "to systemd");
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            warn!("cannot notify systemd: {e}");
        }
    }

    /// `STATUS=` when it changed since the last one sent.
    pub fn status(&mut self, status: String) {
        if self.active() && status != self.last_status {
            self.send(&format!("STATUS={status}"));
            self.last_status = status;
        }
    }

    /// Every initial child is ready, or a reload is done or undone.
    pub fn ready(&mut self, status: String) {
        self.send(&format!("READY=1\nSTATUS={status}"));
        self.last_status = status;
        self.next_extend = None;
    }

    /// A HUP: the reload starts.
    pub fn reloading(&mut self) {
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// The way out begins: systemd's stop timeout runs from here, extended while it lasts.
    pub fn stopping(&mut self, now: Instant) {
        self.send("STOPPING=1");
        if self.active() {
            self.next_extend = Some(now + EXTEND_EVERY);
        }
    }

    /// The nearest instant at which [`Notifier::tick`] has something to send.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.next_watchdog, self.next_extend].into_iter().flatten().min()
    }

    /// Sends the watchdog ping and the timeout extension that are due.
    pub fn tick(&mut self, now: Instant) {
        if let (Some(at), Some(every)) = (self.next_watchdog, self.watchdog_every) {
            if at <= now {
                self.send("WATCHDOG=1");
                self.next_watchdog = Some(now + every);
            }
        }
        if self.next_extend.is_some_and(|at| at <= now) {
            self.send(&format!("EXTEND_TIMEOUT_USEC={}", EXTEND_BY.as_micros()));
            self.next_extend = Some(now + EXTEND_EVERY);
        }
    }
}

fn connect(path: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
        None => return Err(io::Error::other("not an absolute path or an abstract name")),
    };
    // std's sockets are close-on-exec: no child inherits the way to systemd. Non-blocking: a
    // full receive queue on systemd's side drops a message (logged) instead of stalling the
    // master's loop.
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// One socket received from systemd.
#[derive(Debug)]
pub struct Inherited {
    pub fd: OwnedFd,
    /// Its name in `LISTEN_FDNAMES` (systemd says "unknown" when the unit gave none).
    pub name: String,
    /// Where it listens: an IP address and port, or a Unix socket path.
    pub local: Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
    Other(String),
}

impl std::fmt::Display for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Local::Tcp(a) => write!(f, "{a}"),
            Local::Unix(p) => write!(f, "unix:{}", p.display()),
            Local::Other(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: {var}={value:?} is not valid")]
    Var { var: &'static str, value: String },
    #[error("socket activation: fd {fd} ({name}): {why}")]
    Fd { fd: RawFd, name: String, why: String },
}

/// The sockets systemd passed to this process, made close-on-exec; none when `LISTEN_PID` is
/// not this process (the variables were meant for a parent).
pub fn inherited_listeners() -> Result<Vec<Inherited>, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    let Some(count) = var("LISTEN_FDS") else { return Ok(vec![]) };
    if var("LISTEN_PID").map_or(true, |p| p.trim() != std::process::id().to_string()) {
        return Ok(vec![]);
    }
    let n: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or(ActivationError::Var { var: "LISTEN_FDS", value: count.clone() })?;
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    if !names.is_empty() && names.len() != n as usize {
        let value = var("LISTEN_FDNAMES").unwrap_or_default();
        return Err(ActivationError::Var { var: "LISTEN_FDNAMES", value });
    }
    let mut out = Vec::new();
    for (i, raw) in (3..3 + n).enumerate() {
        let name = names.get(i).cloned().unwrap_or_else(|| "unknown".to_owned());
        let bad = |why: String| ActivationError::Fd { fd: raw, name: name.clone(), why };
        // Close-on-exec first, so that no child can ever inherit it as it is.
        // SAFETY: F_SETFD on any integer is defined: it fails with EBADF if it is not open.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
            return Err(bad(format!("not open ({})", io::Error::last_os_error())));
        }
        // SAFETY: systemd's protocol gives this process fds 3..3+LISTEN_FDS, open and owned by
        // nobody else in it; the fcntl above proved the fd is open, and each is taken once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let stream = getsockopt(&fd, sockopt::SockType)
            .map_err(|e| bad(format!("not a socket ({e})")))?
            == nix::sys::socket::SockType::Stream;
        let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
        if !stream || !listening {
            return Err(bad("not a listening stream socket".into()));
        }
        let local = local_address(fd.as_raw_fd()).map_err(|e| bad(e.to_string()))?;
        out.push(Inherited { fd, name, local });
    }
    Ok(out)
}

fn local_address(fd: RawFd) -> nix::Result<Local> {
    let addr: SockaddrStorage = getsockname(fd)?;
    if let Some(a) = addr.as_sockaddr_in() {
        return Ok(Local::Tcp(std::net::SocketAddr::V4((*a).into())));
    }
    if let Some(a) = addr.as_sockaddr_in6() {
        return Ok(Local::Tcp(std::net::SocketAddr::V6((*a).into())));
    }
    if let Some(u) = addr.as_unix_addr() {
        if let Some(p) = u.path() {
            return Ok(Local::Unix(p.to_path_buf()));
        }
    }
    Ok(Local::Other(addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket_and_status_is_sent_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        systemd.set_nonblocking(true).unwrap();
        let (socket, addr) = connect(path.to_str().unwrap()).unwrap();
        let now = Instant::now();
        let mut m = Notifier {
            target: Some((socket, addr)),
            watchdog_every: Some(Duration::from_secs(1)),
            next_watchdog: Some(now + Duration::from_secs(1)),
            next_extend: Some(now + EXTEND_EVERY),
            last_status: String::new(),
        };
        m.status("1/2 workers".into());
        m.status("1/2 workers".into());
        m.ready("2/2 workers".into());
        m.tick(now + Duration::from_secs(1));
        m.reloading();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = systemd.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(got.len(), 4, "no extension once ready: {got:?}");
        assert_eq!(got[0], "STATUS=1/2 workers");
        assert_eq!(got[1], "READY=1\nSTATUS=2/2 workers");
        assert_eq!(got[2], "WATCHDOG=1");
        assert!(got[3].starts_with("RELOADING=1\nMONOTONIC_USEC="), "{got:?}");
        assert_eq!(m.next_deadline(), Some(now + Duration::from_secs(2)));
    }

    #[test]
    fn abstract_names_and_bad_paths() {
        assert!(connect("@presup-test").is_ok());
        assert!(connect("relative/path").is_err());
    }
}
