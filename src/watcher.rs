//! The watcher: a tiny process that kills what a master killed with `kill -9` leaves behind.
//!
//! The master's direct children die with it through `PR_SET_PDEATHSIG`, but their own children
//! (the `sleep` of `sh -c "sleep 30; true"`) do not. At startup, before any child, the master
//! forks the watcher, which holds the read end of a pipe whose write end only the master holds
//! (close-on-exec, and closed in forked preload workers). The master tells it, over the pipe,
//! the process group of each child it spawns, and when each such group is empty. When the
//! master dies, however it dies, the kernel closes the write end: the watcher reads EOF, sends
//! SIGKILL to every group it was told about, kills the master's [`Cgroup`] (`cgroup.kill`,
//! which also takes the processes that left their group with `setsid`), removes it, and exits.
//! A master that exits cleanly has stopped everything itself: it tells the watcher to quit, and
//! removes the cgroup.
//!
//! Why a bare forked loop rather than exec'ing the presup binary with a hidden subcommand (as
//! the ticket server does): a program built on [`crate::prefork`] would have to recognise the
//! subcommand, or the exec would run its `main` and preload again; an exec also depends on the
//! binary on disk (replaced by an upgrade, or on a lazily unmounted filesystem). The loop needs
//! only `read`, `kill`, `open`, `write`, `close`, `rmdir`, `nanosleep` and `_exit`, all
//! async-signal-safe, on memory prepared before the fork: a fixed table of [`CAPACITY`]
//! groups and a fixed buffer, never an allocation. It runs with every signal blocked (only
//! SIGKILL and SIGSTOP reach it), in its own process group, with every fd but its pipe closed,
//! in `/`, and shares the master's pages copy-on-write (forked before the preload).
//!
//! The master never blocks on it: its end is non-blocking, each write is whole records of at
//! most `PIPE_BUF` bytes (atomic: all or `EAGAIN`), and what does not fit waits in an
//! [`Outbox`] that the loop flushes when `poll` says the pipe is writable. The outbox stays
//! bounded even if the watcher is stopped: forgetting a group whose announcement is still
//! queued cancels both. A watcher that dies is restarted (its table replayed), unless it and
//! the one before it each died within a second of their start.
#![allow(unsafe_code)] // The forked watcher's raw syscalls, and the pidfd and pipe it is watched by.

mod cgroup;

pub use cgroup::Cgroup;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::spawn::{self, SpawnError};

/// How many process groups the watcher keeps at once; later ones are covered by
/// `PR_SET_PDEATHSIG` (the child itself) and the cgroup only.
pub const CAPACITY: usize = 4096;

/// One message: an operation (`u32`) and a process group (`i32`), native-endian.
const RECORD: usize = 8;
/// The most records written at once: `PIPE_BUF` bytes, which the kernel writes atomically.
const BATCH: usize = libc::PIPE_BUF / RECORD;

/// What the master tells the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    /// Kill this group if the master dies.
    Watch = 1,
    /// The group is empty: forget it.
    Forget = 2,
    /// The master exits cleanly: exit without killing anything.
    Quit = 3,
}

fn encode(op: Op, pgid: i32, out: &mut [u8]) {
    out[..4].copy_from_slice(&(op as u32).to_ne_bytes());
    out[4..RECORD].copy_from_slice(&pgid.to_ne_bytes());
}

fn decode(record: &[u8]) -> (u32, i32) {
    let op = u32::from_ne_bytes([record[0], record[1], record[2], record[3]]);
    (op, i32::from_ne_bytes([record[4], record[5], record[6], record[7]]))
}

/// The messages not yet written to the pipe, oldest first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outbox {
    records: Vec<(Op, i32)>,
}

impl Outbox {
    pub fn watch(&mut self, pgid: i32) {
        self.records.push((Op::Watch, pgid));
    }

    /// Forgetting a group still queued for `Watch` cancels both (the watcher never heard of
    /// it), which keeps the outbox bounded by the live groups while the watcher does not read.
    pub fn forget(&mut self, pgid: i32) {
        match self.records.iter().rposition(|&r| r == (Op::Watch, pgid)) {
            Some(i) => {
                self.records.remove(i);
            }
            None => self.records.push((Op::Forget, pgid)),
        }
    }

    pub fn quit(&mut self) {
        self.records.push((Op::Quit, 0));
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// The first records, encoded, at most [`BATCH`] of them; returns the byte count.
    fn batch(&self, buf: &mut [u8; BATCH * RECORD]) -> usize {
        let n = self.records.len().min(BATCH);
        for (i, &(op, pgid)) in self.records[..n].iter().enumerate() {
            encode(op, pgid, &mut buf[i * RECORD..]);
        }
        n * RECORD
    }

    fn sent(&mut self, bytes: usize) {
        self.records.drain(..bytes / RECORD);
    }
}

/// The watcher's table of groups: fixed, filled in place, never allocated.
pub struct Table {
    pgids: [i32; CAPACITY],
    len: usize,
}

impl Table {
    pub fn new() -> Table {
        Table { pgids: [0; CAPACITY], len: 0 }
    }

    /// Applies one message; true for `Quit`. Unknown operations and pgids below 2 are ignored
    /// (`kill(-1)` would signal everything, `kill(0)` the watcher's own group).
    pub fn apply(&mut self, op: u32, pgid: i32) -> bool {
        let at = self.pgids[..self.len].iter().position(|&p| p == pgid);
        match op {
            1 if pgid > 1 && at.is_none() && self.len < CAPACITY => {
                self.pgids[self.len] = pgid;
                self.len += 1;
            }
            2 => {
                if let Some(i) = at {
                    self.len -= 1;
                    self.pgids[i] = self.pgids[self.len];
                }
            }
            3 => return true,
            _ => {}
        }
        false
    }

    pub fn groups(&self) -> &[i32] {
        &self.pgids[..self.len]
    }
}

impl Default for Table {
    fn default() -> Table {
        Table::new()
    }
}

/// The master's side: the pipe, what the watcher should know, what is still to be written.
pub struct Watcher {
    pid: Option<Pid>,
    pipe: Option<OwnedFd>,
    cgroup: Option<Cgroup>,
    /// The groups the watcher is to kill, replayed to a restarted watcher.
    watched: BTreeSet<i32>,
    outbox: Outbox,
    started: Instant,
    /// The last watcher died within a second of its start.
    died_young: bool,
    full_warned: bool,
}

impl Watcher {
    /// Forks the watcher; `cgroup` is the children's cgroup, if the master could create one.
    pub fn start(cgroup: Option<Cgroup>) -> Result<Watcher, SpawnError> {
        let mut w = Watcher {
            pid: None,
            pipe: None,
            cgroup,
            watched: BTreeSet::new(),
            outbox: Outbox::default(),
            started: Instant::now(),
            died_young: false,
            full_warned: false,
        };
        w.fork()?;
        info!(pid = w.pid.map_or(0, Pid::as_raw), "watcher started");
        Ok(w)
    }

    fn fork(&mut self) -> Result<(), SpawnError> {
        let (read, write) = pipe().map_err(SpawnError::Fork)?;
        let paths = self.cgroup.as_ref().map(Cgroup::paths);
        let keep = read.as_raw_fd();
        // SAFETY: the body runs in the freshly forked child on memory prepared here (the
        // paths), with only async-signal-safe calls; it never returns.
        let pid = spawn::fork_helper(keep, || unsafe { watch(keep, paths.as_ref()) })?;
        drop(read);
        self.pid = Some(pid);
        self.pipe = Some(write);
        self.started = Instant::now();
        Ok(())
    }

    pub fn pid(&self) -> Option<Pid> {
        self.pid
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// The master's fds that a child forked without exec must close.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        let pipe = self.pipe.as_ref().map(AsRawFd::as_raw_fd);
        let cgroup = self.cgroup.iter().flat_map(|c| [c.procs_fd(), c.dir_fd()]);
        pipe.into_iter().chain(cgroup).collect()
    }

    /// A child's process group, to be killed if the master dies.
    pub fn watch(&mut self, pgid: Pid) {
        if self.watched.insert(pgid.as_raw()) {
            if self.watched.len() > CAPACITY && !std::mem::replace(&mut self.full_warned, true) {
                warn!("more than {CAPACITY} process groups: the watcher kills only the first {CAPACITY} if the master is killed");
            }
            self.outbox.watch(pgid.as_raw());
            self.flush();
        }
    }

    /// Whether the watcher is to kill `pgid`'s group.
    pub fn watches(&self, pgid: Pid) -> bool {
        self.watched.contains(&pgid.as_raw())
    }

    /// A child's process group is empty.
    pub fn forget(&mut self, pgid: Pid) {
        if self.watched.remove(&pgid.as_raw()) {
            self.outbox.forget(pgid.as_raw());
            self.flush();
        }
    }

    /// The pipe, when something waits to be written (the loop polls it for POLLOUT).
    pub fn pending(&self) -> Option<BorrowedFd<'_>> {
        self.pipe.as_ref().filter(|_| !self.outbox.is_empty()).map(|p| p.as_fd())
    }

    /// Writes what the pipe takes now, never blocking.
    pub fn flush(&mut self) {
        let Some(pipe) = &self.pipe else { return };
        let mut buf = [0u8; BATCH * RECORD];
        while !self.outbox.is_empty() {
            let n = self.outbox.batch(&mut buf);
            match nix::unistd::write(pipe, &buf[..n]) {
                Ok(written) => self.outbox.sent(written),
                Err(Errno::EINTR) => continue,
                // Full: the loop waits for POLLOUT. EPIPE: the watcher is dead; the reaper
                // restarts it.
                Err(_) => return,
            }
        }
    }

    /// A child was reaped: if it was the watcher, start another one (the table replayed),
    /// unless it keeps dying. Returns whether it was the watcher.
    pub fn exited(&mut self, pid: Pid, status: &str) -> bool {
        if self.pid != Some(pid) {
            return false;
        }
        self.pid = None;
        self.pipe = None;
        let young = self.started.elapsed() < Duration::from_secs(1);
        if std::mem::replace(&mut self.died_young, young) && young {
            error!(pid = pid.as_raw(), "the watcher {status} again within a second; not restarted: grandchildren will outlive a kill -9 of the master");
            return true;
        }
        warn!(pid = pid.as_raw(), "the watcher {status}; starting another");
        self.outbox = Outbox::default();
        for &pgid in &self.watched {
            self.outbox.watch(pgid);
        }
        match self.fork() {
            Ok(()) => {
                // Said once the table is in the pipe (a fresh pipe takes 8192 records, more
                // than CAPACITY): the new watcher reads it even if the master dies now.
                self.flush();
                let pid = self.pid.map_or(0, Pid::as_raw);
                let (replayed, unsent) = (self.watched.len(), self.outbox.len());
                info!(pid, replayed, unsent, "watcher started");
            }
            Err(e) => error!("cannot restart the watcher: {e}"),
        }
        true
    }
}

impl Drop for Watcher {
    /// The master is leaving. With nothing left to kill (a clean stop), the watcher is told to
    /// quit; otherwise (the master failed with children alive) it is left to kill them.
    /// Either way the master waits (at most a second) for it to be gone, then removes the
    /// cgroup if it is empty.
    fn drop(&mut self) {
        if self.watched.is_empty() {
            self.outbox.quit();
            self.flush();
        }
        self.pipe = None;
        if let Some(pid) = self.pid.take() {
            wait_gone(pid, Duration::from_secs(1));
        }
        if let Some(c) = &self.cgroup {
            c.remove();
        }
    }
}

/// Waits until `pid` (a child) has exited and reaps it, or `timeout` has passed.
fn wait_gone(pid: Pid, timeout: Duration) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) } as RawFd;
    if fd >= 0 {
        // SAFETY: the fd was just returned to us and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut fds = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
        let ms = timeout.as_millis().min(u16::MAX as u128) as u16;
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    }
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The master's end never blocks.
    nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(std::io::Error::from)?;
    Ok((read, write))
}

/// The cgroup's paths, as the watcher uses them after the fork.
pub struct CgroupPaths {
    pub dir: CString,
    pub kill: CString,
}

/// The watcher's life: read messages until EOF, then kill. Never returns.
///
/// # Safety
/// Only in the freshly forked watcher; only async-signal-safe calls, no allocation.
unsafe fn watch(read: RawFd, cgroup: Option<&CgroupPaths>) -> ! {
    // SAFETY: in the freshly forked watcher (this fn's contract): `have` stays below
    // `buf.len()` (whole records are moved out, at most `buf.len()` bytes read), `read` is its
    // pipe, and every call is async-signal-safe; the cgroup functions' contract is this one.
    unsafe {
        let mut table = Table::new();
        let mut buf = [0u8; BATCH * RECORD];
        let mut have = 0;
        loop {
            let n = libc::read(read, buf.as_mut_ptr().add(have).cast(), buf.len() - have);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            have += n as usize;
            let whole = have / RECORD * RECORD;
            for record in buf[..whole].chunks_exact(RECORD) {
                let (op, pgid) = decode(record);
                if table.apply(op, pgid) {
                    libc::_exit(0);
                }
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
        }
        // The master is gone.
        if let Some(c) = cgroup {
            cgroup::kill_from_watcher(c);
        }
        for &pgid in table.groups() {
            libc::kill(-pgid, libc::SIGKILL);
        }
        if let Some(c) = cgroup {
            cgroup::remove_from_watcher(c);
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_each_group_once_forgets_and_quits() {
        let mut t = Table::new();
        for (op, pgid) in [(1, 10), (1, 11), (1, 10), (1, 12), (2, 11), (2, 99), (1, 1), (1, 0)] {
            assert!(!t.apply(op, pgid));
        }
        assert_eq!(t.groups(), [10, 12]);
        assert!(!t.apply(1, -5), "a negative pgid is never kept");
        assert!(!t.apply(7, 13), "an unknown operation is ignored");
        assert_eq!(t.groups(), [10, 12]);
        assert!(t.apply(3, 0));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Table::new();
        for pgid in 2..(CAPACITY as i32 + 100) {
            t.apply(1, pgid);
        }
        assert_eq!(t.groups().len(), CAPACITY);
        t.apply(2, 2);
        t.apply(1, 1_000_000);
        assert_eq!(t.groups().len(), CAPACITY);
        assert!(t.groups().contains(&1_000_000));
    }

    #[test]
    fn the_outbox_cancels_what_the_watcher_never_heard_of_and_batches_atomically() {
        let mut o = Outbox::default();
        o.watch(10);
        o.watch(11);
        o.forget(10);
        assert_eq!(o.records, [(Op::Watch, 11)]);
        // Sent, then forgotten: the watcher must hear it.
        o.sent(RECORD);
        o.forget(11);
        assert_eq!(o.records, [(Op::Forget, 11)]);
        // A pid reused after a Forget still queued: both stay, in order.
        o.watch(11);
        o.forget(11);
        o.watch(11);
        assert_eq!(o.records, [(Op::Forget, 11), (Op::Watch, 11)]);
        // A stuck watcher: the outbox holds at most the live groups and the forgets.
        let mut stuck = Outbox::default();
        for pgid in 100..10_000 {
            stuck.watch(pgid);
            stuck.forget(pgid);
        }
        assert!(stuck.is_empty());
        for pgid in 0..1000 {
            stuck.watch(pgid);
        }
        let mut buf = [0u8; BATCH * RECORD];
        assert_eq!(stuck.batch(&mut buf), libc::PIPE_BUF);
        assert_eq!(decode(&buf[RECORD..2 * RECORD]), (Op::Watch as u32, 1));
        stuck.sent(libc::PIPE_BUF);
        assert_eq!(stuck.len(), 1000 - BATCH);
    }

    /// The watcher itself, forked from this test process (it makes only async-signal-safe
    /// calls, so the test's threads do not matter): without a cgroup, the groups it was told
    /// about die when the pipe closes with groups still watched; a forgotten one is spared.
    #[test]
    fn when_its_pipe_closes_the_watcher_kills_the_groups_it_was_told_about() {
        use std::os::unix::process::CommandExt;
        let start = |secs: &str| {
            std::process::Command::new("sh")
                .args(["-c", &format!("sleep {secs}; true")])
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let (mut doomed, mut spared) = (start("1031"), start("1032"));
        let mut w = Watcher::start(None).unwrap();
        let watcher = w.pid().unwrap();
        w.watch(Pid::from_raw(doomed.id() as i32));
        w.watch(Pid::from_raw(spared.id() as i32));
        w.forget(Pid::from_raw(spared.id() as i32));
        assert!(w.pending().is_none(), "written at once");
        let dropped = Instant::now();
        drop(w);
        // The drop waits a second for the watcher; a loaded machine may take longer.
        let deadline = Duration::from_secs(20);
        while nix::sys::wait::waitpid(watcher, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
            == Ok(nix::sys::wait::WaitStatus::StillAlive)
        {
            assert!(dropped.elapsed() < deadline, "the watcher outlived its pipe by {deadline:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!("the watcher gone {:?} after its pipe closed", dropped.elapsed());
        assert_eq!(nix::sys::signal::kill(watcher, None), Err(Errno::ESRCH), "reaped");
        let status = doomed.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert_eq!(spared.try_wait().unwrap(), None);
        let spared_group = Pid::from_raw(spared.id() as i32);
        nix::sys::signal::killpg(spared_group, nix::sys::signal::Signal::SIGKILL).unwrap();
        spared.wait().unwrap();
    }
}
