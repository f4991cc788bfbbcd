//! The master's notification socket: children speak systemd's `sd_notify` protocol to it.
//!
//! A Unix datagram socket in a private runtime directory, handed to children as
//! `NOTIFY_SOCKET`, so every language's sd_notify library works unchanged. The kernel attaches
//! the sender's credentials to each datagram (`SO_PASSCRED`), so a message is attributed to
//! the pid that sent it, not to what it claims; the master ignores pids it did not start.
//!
//! Who may do what: the directory is the master's (mode 0700); when the children drop
//! privileges it becomes `0710` with the children's group, so that they can reach the files in
//! it (search, not list, not create), and the socket is made theirs with mode 0600: sending a
//! datagram needs write permission on the socket file, which only the children's user (and
//! root) then has.
//!
//! The directory is named `presup-<pid>-<8 hex digits>` and the master holds an exclusive
//! `flock` on it for its whole life. A master killed with `kill -9` cannot remove it, so each
//! master, before making its own, removes those of its base directory that are provably left
//! by a master that is gone ([`remove_stale`]).

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::{Gid, Pid, Uid};
use tracing::{info, warn};

use crate::procstat::Stat;

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

/// A child's side: sends `message` (`READY=1`, say) to the `NOTIFY_SOCKET` it was given, if
/// any, without waiting; a socket that cannot take it is ignored.
pub fn tell(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Ok(s) = UnixDatagram::unbound() {
        let _ = s.send_to(message.as_bytes(), path);
    }
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
    /// The directory, held with an exclusive `flock`: the proof that its master lives.
    _lock: Flock<File>,
}

impl NotifySocket {
    /// Removes the stale runtime directories, then creates `presup-<pid>-<random>` under
    /// `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR` or the temp dir, and binds `notify` in it.
    /// With `children` (the user and group children run as), they are let in (module docs).
    pub fn create(children: Option<(Uid, Gid)>) -> io::Result<NotifySocket> {
        let base = ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"]
            .iter()
            .find_map(|v| std::env::var_os(v).filter(|p| Path::new(p).is_dir()))
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        for dir in remove_stale(&base) {
            info!(dir = %dir.display(), "removed the runtime directory of a master that is gone");
        }
        NotifySocket::create_in(&base, children)
    }

    fn create_in(base: &Path, children: Option<(Uid, Gid)>) -> io::Result<NotifySocket> {
        // An unpredictable name, created (never reused) with mode 0700.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let dir = base.join(format!("presup-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let made = NotifySocket::fill(&dir, children);
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    fn fill(dir: &Path, children: Option<(Uid, Gid)>) -> io::Result<NotifySocket> {
        let lock = open_dir(dir)?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io::Error::from(e))?;
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path)?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        if let Some((uid, gid)) = children {
            // Nobody but root can reach into the directory yet (0700): no race.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            nix::unistd::chown(&path, Some(uid), Some(gid))?;
            nix::unistd::fchown(&*lock, None, Some(gid))?;
            lock.set_permissions(std::fs::Permissions::from_mode(0o710))?;
        }
        Ok(NotifySocket { dir: dir.to_path_buf(), path, socket, _lock: lock })
    }

    /// What children get as `NOTIFY_SOCKET`.
    /// Its fds (the socket, the directory's lock), which a child forked without exec closes.
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.socket.as_raw_fd(), self._lock.as_raw_fd()]
    }

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

/// The pid in a runtime directory's name `presup-<pid>-<8 hex digits>`; `None` for any other
/// name (so nothing presup did not make is ever touched).
pub fn parse_dir_name(name: &str) -> Option<i32> {
    let (pid, random) = name.strip_prefix("presup-")?.split_once('-')?;
    let digits = |s: &str, hex: bool| {
        s.bytes().all(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
    };
    let shaped = !pid.is_empty() && pid.len() <= 10 && digits(pid, false);
    (shaped && random.len() == 8 && digits(random, true)).then(|| pid.parse().ok())?
}

/// Removes the runtime directories under `base` whose master is provably gone, and returns
/// them. One is removed only when all of these hold: its name has the shape presup gives it;
/// it is a directory (not a symlink) owned by this process's user; nobody holds its `flock`
/// (every master holds its own for its whole life); and no live process has the pid in its
/// name (which also keeps the directory of a master between its `mkdir` and its `flock`, and of
/// an older presup that took no lock). Anything else is left alone.
pub fn remove_stale(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else { return vec![] };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(parse_dir_name) else { continue };
        let dir = entry.path();
        if !stale(&dir, pid) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) => warn!(dir = %dir.display(), "cannot remove a stale runtime directory: {e}"),
        }
    }
    removed
}

/// Whether `dir` (named with `pid`) was left by a master that is gone (see [`remove_stale`]).
/// Its lock is taken here, and released when this returns: a directory being removed is not
/// one any master can be using.
fn stale(dir: &Path, pid: i32) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return false };
    if !meta.is_dir() || meta.uid() != Uid::effective().as_raw() {
        return false;
    }
    let Ok(file) = open_dir(dir) else { return false };
    // The directory opened is the one examined (not one renamed there in between).
    match file.metadata() {
        Ok(m) if m.ino() == meta.ino() && m.dev() == meta.dev() => {}
        _ => return false,
    }
    let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else { return false };
    !alive(pid)
}

/// Opens a directory without following a symlink in its last component.
fn open_dir(dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
}

/// Whether a process `pid` exists in this pid namespace (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => Stat::parse(&stat).is_some_and(|s| !s.gone()),
        // No /proc: ask the kernel (EPERM means it exists).
        Err(_) if !Path::new("/proc/self").exists() => !matches!(
            nix::sys::signal::kill(Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        ),
        Err(_) => false,
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
        let sock = NotifySocket::create(None).unwrap();
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

    #[test]
    fn only_names_presup_gives_are_runtime_dirs() {
        assert_eq!(parse_dir_name("presup-1234-0badcafe"), Some(1234));
        assert_eq!(parse_dir_name("presup-1-00000000"), Some(1));
        for name in [
            "presup-1234-0badcaf",
            "presup-1234-0badcafe0",
            "presup--0badcafe",
            "presup-12a4-0badcafe",
            "presup-1234-0badcafg",
            "presup-99999999999-0badcafe",
            "presup-test-abcdef",
            "xpresup-1234-0badcafe",
            "presup-1234-0badcafe.ticket",
        ] {
            assert_eq!(parse_dir_name(name), None, "{name}");
        }
    }

    #[test]
    fn only_dirs_of_masters_that_are_gone_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let path = |name: &str| base.path().join(name);
        // Beyond any pid_max: nobody has this pid.
        let dead = path("presup-999999999-0000abcd");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("notify"), "").unwrap();
        // Named like a runtime dir, but a symlink, or a file, or not presup's name.
        let target = path("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, path("presup-999999998-0000abcd")).unwrap();
        std::fs::write(path("presup-999999997-0000abcd"), "").unwrap();
        std::fs::create_dir(path("presup-999999996-0000abcdx")).unwrap();
        // Of a live process (this one), not locked: kept (a master before its flock).
        let unlocked = path(&format!("presup-{}-0000abcd", std::process::id()));
        std::fs::create_dir(&unlocked).unwrap();
        // Of a live master.
        let live = NotifySocket::create_in(base.path(), None).unwrap();
        // A dead pid's name, but locked (a master in another pid namespace).
        let locked = path("presup-999999995-0000abcd");
        std::fs::create_dir(&locked).unwrap();
        let _held = Flock::lock(open_dir(&locked).unwrap(), FlockArg::LockExclusive).unwrap();

        assert_eq!(remove_stale(base.path()), vec![dead.clone()]);
        assert!(!dead.exists());
        for kept in [
            "target",
            "presup-999999998-0000abcd",
            "presup-999999997-0000abcd",
            "presup-999999996-0000abcdx",
            "presup-999999995-0000abcd",
        ] {
            assert!(std::fs::symlink_metadata(path(kept)).is_ok(), "{kept} removed");
        }
        assert!(unlocked.exists() && live.dir().exists() && live.path().exists());
        assert_eq!(remove_stale(base.path()), Vec::<PathBuf>::new());
    }
}
