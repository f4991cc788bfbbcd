//! The process groups of the master's children that outlive their leader.
//!
//! Every child (worker, singleton, hook) leads its own process group (pgid = its pid). When the
//! leader is reaped, what is left of its group (the `sleep` of `sh -c "sleep 100; true"`, a
//! worker's helper processes) is killed: at once for a child that ended on its own, at the end
//! of its grace for one the master was stopping (the `stop_signal` reached the whole group, and
//! the rest may finish within the same `graceful_timeout`). Until the group is empty the slot or
//! singleton waits ([`crate::master::pool::Life::Draining`]): a new worker never starts beside
//! the leftovers of the old one, and the primary rule counts every process of the group.
//!
//! The group's members are descendants of the master, a child subreaper, so they are reparented
//! to it and reaped by it: emptiness is checked after each reaping (`killpg(pgid, 0)` fails
//! with `ESRCH`), never polled. [`DRAIN_GIVE_UP`] bounds the wait for a member the master cannot
//! kill (a setuid program it has no right to signal) or does not reap (one that joined the group
//! from outside). Pure, like the pool: the master performs the actions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::stop::Grace;

/// How long the master waits for a SIGKILLed group to empty before it gives up on it.
pub const DRAIN_GIVE_UP: Duration = Duration::from_secs(5);

/// Whose group it is, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Worker {
        slot: usize,
    },
    Singleton {
        index: usize,
    },
    Hook,
    /// A stem (`preload = true`).
    Stem,
    /// A child the master started that none of the above claims.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Drain {
    owner: Owner,
    /// SIGKILL to the group at the end of the grace its leader had.
    grace: Grace,
    /// Stop waiting for the group at this instant.
    give_up: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL to what is left of the group.
    Kill { pgid: Pid, owner: Owner },
    /// The group is still not empty long after its SIGKILL: stop waiting for it.
    GiveUp { pgid: Pid, owner: Owner },
}

/// The groups whose leader was reaped and that still have members.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    draining: BTreeMap<Pid, Drain>,
}

impl Groups {
    /// `pgid`'s leader was reaped and its group is not empty. `grace`: until when the rest may
    /// run; `None` (or an instant already past) means it was SIGKILLed now.
    pub fn outlived(&mut self, pgid: Pid, owner: Owner, grace: Option<Instant>, now: Instant) {
        let kill_at = grace.filter(|&at| at > now);
        let give_up = kill_at.unwrap_or(now) + DRAIN_GIVE_UP;
        let grace = kill_at.map_or(Grace::Killed, Grace::Until);
        self.draining.insert(pgid, Drain { owner, grace, give_up });
    }

    /// Whether a SIGKILL to the group is due now (the grace of `outlived` is over or absent).
    pub fn kill_now(grace: Option<Instant>, now: Instant) -> bool {
        grace.map_or(true, |at| at <= now)
    }

    /// A fast stop: every group still in its grace is SIGKILLed at `kill_at` at the latest.
    /// Returns the groups whose grace was shortened (the master sends them SIGQUIT, as a
    /// fast stop does to a live child).
    pub fn hasten(&mut self, kill_at: Instant) -> Vec<Pid> {
        let mut hastened = Vec::new();
        for (&pgid, d) in self.draining.iter_mut() {
            if d.grace.kill_at().is_some_and(|at| at > kill_at) {
                d.grace = Grace::Until(kill_at);
                d.give_up = kill_at + DRAIN_GIVE_UP;
                hastened.push(pgid);
            }
        }
        hastened
    }

    /// The group is empty: forget it. Returns its owner if it was draining.
    pub fn gone(&mut self, pgid: Pid) -> Option<Owner> {
        self.draining.remove(&pgid).map(|d| d.owner)
    }

    pub fn draining(&self) -> impl Iterator<Item = Pid> + '_ {
        self.draining.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.draining.is_empty()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.draining.values().map(|d| d.grace.kill_at().unwrap_or(d.give_up)).min()
    }

    /// The kills that are due, and the groups given up on (forgotten here; the master reports
    /// them gone to their owner).
    pub fn step(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        self.draining.retain(|&pgid, d| {
            let owner = d.owner;
            match d.grace {
                grace if grace.due(now) => {
                    d.grace = Grace::Killed;
                    d.give_up = now + DRAIN_GIVE_UP;
                    actions.push(Action::Kill { pgid, owner });
                    true
                }
                Grace::Killed if d.give_up <= now => {
                    actions.push(Action::GiveUp { pgid, owner });
                    false
                }
                _ => true,
            }
        });
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_group_killed_at_once_waits_for_the_reaper_then_is_given_up() {
        let t = Instant::now();
        let mut g = Groups::default();
        let (pgid, owner) = (Pid::from_raw(10), Owner::Worker { slot: 0 });
        assert!(Groups::kill_now(None, t));
        g.outlived(pgid, owner, None, t);
        assert_eq!(g.next_deadline(), Some(t + DRAIN_GIVE_UP));
        assert_eq!(g.step(t + ms(10)), vec![]);
        assert_eq!(g.step(t + DRAIN_GIVE_UP), vec![Action::GiveUp { pgid, owner }]);
        assert!(g.is_empty());
        assert_eq!(g.gone(pgid), None);
        assert_eq!(g.next_deadline(), None);
    }

    #[test]
    fn a_stopping_group_keeps_its_grace_then_is_killed() {
        let t = Instant::now();
        let mut g = Groups::default();
        let (pgid, owner) = (Pid::from_raw(11), Owner::Singleton { index: 2 });
        assert!(!Groups::kill_now(Some(t + ms(500)), t));
        assert!(Groups::kill_now(Some(t), t));
        g.outlived(pgid, owner, Some(t + ms(500)), t);
        assert_eq!(g.next_deadline(), Some(t + ms(500)));
        assert_eq!(g.step(t + ms(499)), vec![]);
        assert_eq!(g.step(t + ms(500)), vec![Action::Kill { pgid, owner }]);
        assert_eq!(g.next_deadline(), Some(t + ms(500) + DRAIN_GIVE_UP));
        assert_eq!(g.draining().collect::<Vec<_>>(), [pgid]);
        assert_eq!(g.gone(pgid), Some(owner));
        assert!(g.is_empty());
    }

    #[test]
    fn a_fast_stop_shortens_the_grace_of_draining_groups_only() {
        let t = Instant::now();
        let mut g = Groups::default();
        let owner = Owner::Worker { slot: 0 };
        let (slow, soon, killed) = (Pid::from_raw(20), Pid::from_raw(21), Pid::from_raw(22));
        g.outlived(slow, owner, Some(t + ms(30_000)), t);
        g.outlived(soon, owner, Some(t + ms(1200)), t);
        g.outlived(killed, owner, None, t);
        assert_eq!(g.hasten(t + ms(1500)), [slow], "only a grace ending later is shortened");
        assert_eq!(g.next_deadline(), Some(t + ms(1200)));
        assert_eq!(g.step(t + ms(1200)), vec![Action::Kill { pgid: soon, owner }]);
        assert_eq!(g.step(t + ms(1500)), vec![Action::Kill { pgid: slow, owner }]);
        assert_eq!(g.hasten(t + ms(1600)), Vec::<Pid>::new(), "once killed, nothing to hasten");
        assert_eq!(g.step(t + DRAIN_GIVE_UP), vec![Action::GiveUp { pgid: killed, owner }]);
    }
}
