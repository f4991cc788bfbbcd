//! Stopping a child, the same way for workers, singletons and hooks: a [`Plan`] (which signal,
//! how long before SIGKILL) and the [`Grace`] under way once it is sent; and [`ExitStatus`],
//! how a child ended.
//!
//! One rule for a fast stop (INT/QUIT): SIGQUIT, and SIGKILL after [`FAST_STOP_GRACE`] or the
//! child's own stop timeout, whichever is shorter, so a fast stop is never slower than a
//! graceful one would have been. A fast stop that comes during a graceful one hurries the
//! children already stopping by the same rule ([`Grace::hasten`]): it only ever brings their
//! SIGKILL closer. A child that failed to come up in time is killed at once
//! ([`Grace::Killed`]).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// The longest grace a fast stop gives before SIGKILL.
pub const FAST_STOP_GRACE: Duration = Duration::from_secs(1);

/// How a child is asked to stop: `signal` now, SIGKILL `grace` later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub signal: Signal,
    pub grace: Duration,
}

impl Plan {
    /// A graceful stop (the child's `stop_signal`, its `timeout`) or a fast one (SIGQUIT, the
    /// shorter of [`FAST_STOP_GRACE`] and `timeout`).
    pub fn new(fast: bool, stop_signal: Signal, timeout: Duration) -> Plan {
        if fast {
            Plan::fast(timeout)
        } else {
            Plan { signal: stop_signal, grace: timeout }
        }
    }

    /// A fast stop of a child whose own stop timeout is `timeout`.
    pub fn fast(timeout: Duration) -> Plan {
        Plan { signal: Signal::SIGQUIT, grace: FAST_STOP_GRACE.min(timeout) }
    }

    /// The grace that starts when the signal is sent at `now`.
    pub fn begin(self, now: Instant) -> Grace {
        Grace::Until(now + self.grace)
    }
}

/// A stop under way: SIGKILL is due at an instant, or was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grace {
    Until(Instant),
    Killed,
}

impl Grace {
    /// The SIGKILL instant, while it is still to come.
    pub fn kill_at(self) -> Option<Instant> {
        match self {
            Grace::Until(at) => Some(at),
            Grace::Killed => None,
        }
    }

    pub fn killed(self) -> bool {
        self == Grace::Killed
    }

    /// Whether SIGKILL is due at `now` (the caller sends it, and sets [`Grace::Killed`]).
    pub fn due(self, now: Instant) -> bool {
        matches!(self, Grace::Until(at) if at <= now)
    }

    /// A fast stop (`plan`) during this one, at `now`: SIGKILL comes at `now + plan.grace` if
    /// that is sooner. Returns whether it was brought closer (the caller sends `plan.signal`).
    pub fn hasten(&mut self, plan: Plan, now: Instant) -> bool {
        let at = now + plan.grace;
        match self {
            Grace::Until(kill_at) if *kill_at > at => {
                *kill_at = at;
                true
            }
            _ => false,
        }
    }
}

/// How a child ended, as the reaper saw it (or as the spawn failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(Signal),
    /// It never ran: fork or exec failed.
    NotStarted(String),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by {}", s.as_str()),
            ExitStatus::NotStarted(why) => write!(f, "could not start: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_fast_stop_is_sigquit_and_never_slower_than_the_graceful_one() {
        let graceful = Plan::new(false, Signal::SIGTERM, ms(30_000));
        assert_eq!(graceful, Plan { signal: Signal::SIGTERM, grace: ms(30_000) });
        let fast = Plan::new(true, Signal::SIGTERM, ms(30_000));
        assert_eq!(fast, Plan { signal: Signal::SIGQUIT, grace: FAST_STOP_GRACE });
        let short = Plan::new(true, Signal::SIGTERM, ms(200));
        assert_eq!(short, Plan { signal: Signal::SIGQUIT, grace: ms(200) });
    }

    #[test]
    fn a_grace_expires_once_and_a_fast_stop_only_brings_it_closer() {
        let t = Instant::now();
        let mut grace = Plan::new(false, Signal::SIGTERM, ms(30_000)).begin(t);
        assert_eq!(grace.kill_at(), Some(t + ms(30_000)));
        assert!(grace.hasten(Plan::fast(ms(30_000)), t + ms(100)));
        assert_eq!(grace.kill_at(), Some(t + ms(1100)));
        assert!(!grace.hasten(Plan::fast(ms(30_000)), t + ms(200)), "never pushed back");
        assert!(!grace.due(t + ms(1099)));
        assert!(grace.due(t + ms(1100)));
        grace = Grace::Killed;
        assert!(grace.killed() && grace.kill_at().is_none());
        assert!(!grace.due(t + ms(2000)), "SIGKILL is sent once");
        assert!(!grace.hasten(Plan::fast(ms(30_000)), t + ms(2000)));
    }
}
