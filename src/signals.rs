//! Signals turned into counted events at the edge.
//!
//! The master blocks the signals it acts on and reads them from a `signalfd`, polled with
//! everything else; once woken, it drains the fd and counts each signal ([`Signals::drain`]).
//! No handler is ever installed, so nothing runs in signal context, and a process forked from
//! the master holds no trace of presup's signal machinery: its dispositions are the defaults
//! (nothing was changed), and the spawn empties the mask it inherited. A signal library in a
//! forked worker (tokio, signal-hook, ctrlc) then finds a process as fresh as any: the process-
//! wide registries such libraries keep were never touched in the master, so the worker's copy
//! of them is empty and they install their handlers for real.
//!
//! The kernel keeps one pending instance of each standard signal: signals sent back to back
//! before the master reads them merge; signals sent apart are each counted.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

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

    pub fn signal(self) -> Signal {
        match self {
            Event::Term => Signal::SIGTERM,
            Event::Int => Signal::SIGINT,
            Event::Quit => Signal::SIGQUIT,
            Event::Hup => Signal::SIGHUP,
            Event::Ttin => Signal::SIGTTIN,
            Event::Ttou => Signal::SIGTTOU,
            Event::Usr1 => Signal::SIGUSR1,
            Event::Usr2 => Signal::SIGUSR2,
            Event::Chld => Signal::SIGCHLD,
        }
    }

    pub fn number(self) -> i32 {
        self.signal() as i32
    }
}

/// The blocked signals and the `signalfd` that receives them.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the master's signals and opens their `signalfd`. Call once, in the master,
    /// before any child exists (children get an empty mask from the spawn).
    pub fn install() -> io::Result<Signals> {
        let mut mask = SigSet::empty();
        for event in Event::ALL {
            mask.add(event.signal());
        }
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// Reads every pending signal and returns each with its count, in the order of
    /// [`Event::ALL`] (CHLD first, so exits are known before anything else).
    pub fn drain(&mut self) -> Vec<(Event, u32)> {
        let mut counts = [0u32; Event::ALL.len()];
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => {
                    let signo = info.ssi_signo as i32;
                    if let Some(i) = Event::ALL.iter().position(|e| e.number() == signo) {
                        counts[i] = counts[i].saturating_add(1);
                    }
                }
                Ok(None) | Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("reading the signalfd: {e}");
                    break;
                }
            }
        }
        Event::ALL.iter().zip(counts).filter(|(_, n)| *n > 0).map(|(&e, n)| (e, n)).collect()
    }

    /// The `signalfd` (a forked worker closes it).
    pub fn raw_fds(&self) -> [RawFd; 1] {
        [self.fd.as_raw_fd()]
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
