//! The master's notification socket: children speak systemd's `sd_notify` protocol to it.
//!
//! A Unix datagram socket in a private runtime directory (mode 0700), handed to children as
//! `NOTIFY_SOCKET`, so every language's sd_notify library works unchanged. The kernel attaches
//! the sender's credentials to each datagram (`SO_PASSCRED`), so a message is attributed to
//! the pid that sent it, not to what it claims; the master ignores pids it did not start.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;

/// The most datagrams one [`NotifySocket::drain`] takes, so that a flood cannot hold the
/// master in it while signals and deadlines wait.
pub const DRAIN_MAX: usize = 1024;

/// One thing a child said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ready,
    Watchdog,
    Stopping,
    Status(String),
}

/// Parses one datagram: newline-separated `KEY=VALUE` assignments, unknown ones ignored.
pub fn parse(datagram: &[u8]) -> Vec<Message> {
    let text = String::from_utf8_lossy(datagram);
    text.lines()
        .filter_map(|line| match line.split_once('=')? {
            ("READY", "1") => Some(Message::Ready),
            ("WATCHDOG", "1") => Some(Message::Watchdog),
            ("STOPPING", "1") => Some(Message::Stopping),
            ("STATUS", s) => Some(Message::Status(s.to_owned())),
            _ => None,
        })
        .collect()
}

/// The private runtime directory and the socket in it; both removed on drop.
pub struct NotifySocket {
    dir: PathBuf,
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    /// Creates `presup-<pid>-<random>` (mode 0700) under `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR` or
    /// the temp dir, and binds `notify` in it.
    pub fn create() -> io::Result<NotifySocket> {
        let base = ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"]
            .iter()
            .find_map(|v| std::env::var_os(v).filter(|p| Path::new(p).is_dir()))
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        // An unpredictable name, created (never reused) with mode 0700.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let dir = base.join(format!("presup-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path)?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        Ok(NotifySocket { dir, path, socket })
    }

    /// What children get as `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The private runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the datagrams waiting (at most [`DRAIN_MAX`]; poll wakes the master again for
    /// the rest), with their sender's pid; never blocks.
    pub fn drain(&self) -> Vec<(Pid, Vec<Message>)> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..DRAIN_MAX {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let msg = match recvmsg::<UnixAddr>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            };
            let pid = msg.cmsgs().ok().into_iter().flatten().find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(cred) => Some(Pid::from_raw(cred.pid())),
                _ => None,
            });
            let len = msg.bytes;
            if let Some(pid) = pid {
                out.push((pid, parse(&buf[..len])));
            }
        }
        out
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_sd_notify_format() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=serving 4 shards\nMAINPID=12\nWATCHDOG=1\nSTOPPING=1\n"),
            vec![
                Message::Ready,
                Message::Status("serving 4 shards".into()),
                Message::Watchdog,
                Message::Stopping
            ]
        );
        assert_eq!(parse(b"READY=0\ngarbage"), vec![]);
    }

    #[test]
    fn datagrams_are_attributed_to_the_sender_pid() {
        let sock = NotifySocket::create().unwrap();
        let meta = std::fs::metadata(sock.dir()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", sock.path()).unwrap();
        let got = sock.drain();
        assert_eq!(got, vec![(Pid::this(), vec![Message::Ready])]);
        assert_eq!(sock.drain(), vec![]);
        let dir = sock.dir().to_path_buf();
        drop(sock);
        assert!(!dir.exists());
    }
}
