//! Signals turned into counted events at the edge.
//!
//! The handlers do two async-signal-safe things: bump a per-signal counter and write one byte
//! to a non-blocking self-pipe. The master polls the pipe's read end with everything else and,
//! once woken, drains the pipe and takes the counters ([`Signals::drain`]). Nothing is done in
//! signal context. Counting (rather than a flag) keeps `kill -TTIN` sent three times in a row
//! worth three workers.
#![allow(unsafe_code)]

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};

use signal_hook::consts::signal as sig;

/// The signals the master acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    Term,
    Int,
    Quit,
    Hup,
    Ttin,
    Ttou,
    Usr1,
    Usr2,
    Chld,
}

impl Event {
    pub const ALL: [Event; 9] = [
        Event::Chld,
        Event::Term,
        Event::Int,
        Event::Quit,
        Event::Hup,
        Event::Ttin,
        Event::Ttou,
        Event::Usr1,
        Event::Usr2,
    ];

    pub fn number(self) -> i32 {
        match self {
            Event::Term => sig::SIGTERM,
            Event::Int => sig::SIGINT,
            Event::Quit => sig::SIGQUIT,
            Event::Hup => sig::SIGHUP,
            Event::Ttin => sig::SIGTTIN,
            Event::Ttou => sig::SIGTTOU,
            Event::Usr1 => sig::SIGUSR1,
            Event::Usr2 => sig::SIGUSR2,
            Event::Chld => sig::SIGCHLD,
        }
    }
}

/// Counters indexed by signal number; only the numbers in [`Event::ALL`] are ever touched.
static COUNTS: [AtomicU32; 65] = [const { AtomicU32::new(0) }; 65];

/// The installed handlers and the read end of their self-pipe.
pub struct Signals {
    read: UnixStream,
    // Kept open for the handlers, which write to its raw fd.
    _write: UnixStream,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    /// Installs the handlers. Call once, in the master, before any child exists.
    pub fn install() -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let fd = write.as_raw_fd();
        let mut ids = Vec::new();
        for event in Event::ALL {
            let n = event.number();
            let action = move || {
                COUNTS[n as usize].fetch_add(1, Ordering::SeqCst);
                // A full pipe already guarantees a wake-up, so the result does not matter.
                // SAFETY: send(2) is async-signal-safe; fd stays open while handlers exist
                // (the write end lives as long as `Signals`, which unregisters on drop);
                // the buffer is a valid one-byte array.
                unsafe {
                    libc::send(fd, [1u8].as_ptr().cast(), 1, libc::MSG_DONTWAIT);
                }
            };
            // SAFETY: the action only does atomics and send(2), both async-signal-safe, and
            // signal-hook-registry preserves errno around it.
            let id = unsafe { signal_hook::low_level::register(n, action) }?;
            ids.push(id);
        }
        Ok(Signals { read, _write: write, ids })
    }

    /// Empties the self-pipe and returns each signal that arrived with its count, in the
    /// order of [`Event::ALL`] (CHLD first, so exits are known before anything else).
    pub fn drain(&mut self) -> Vec<(Event, u32)> {
        let mut buf = [0u8; 256];
        while matches!(self.read.read(&mut buf), Ok(n) if n > 0) {}
        Event::ALL
            .iter()
            .filter_map(|&e| {
                let n = COUNTS[e.number() as usize].swap(0, Ordering::SeqCst);
                (n > 0).then_some((e, n))
            })
            .collect()
    }
}

impl Signals {
    /// Both ends of the self-pipe (a forked worker closes them).
    pub fn raw_fds(&self) -> [std::os::fd::RawFd; 2] {
        [self.read.as_raw_fd(), self._write.as_raw_fd()]
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
