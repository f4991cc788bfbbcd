//! The stems and the decisions about them, without any I/O (like [`super::pool`]).
//!
//! With `[workers] preload = true` each generation's workers are forked by that generation's
//! stem (`crate::stem`). The rules:
//! - the stem of the pool's current generation is wanted; one that died is started again at
//!   its [`Backoff`]'s instant, and the pool's spawns wait until it is ready;
//! - a stem is kept while its generation is the current one, the one a reload would go back
//!   to, or has workers; any other is stopped (TERM, SIGKILL after [`STOP_GRACE`]);
//! - a stem that is not ready within `boot_timeout`, or that leaves a fork request unanswered
//!   for as long, is killed;
//! - a stem that ends before it was ever ready is a [`Failure`] for the master to judge (at
//!   the start: exit 3; during a reload: the reload is undone; after a crash: it is retried);
//! - fork requests are numbered; each is answered once, or lost with its stem.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::stop::{ExitStatus, Grace};
use crate::backoff::Backoff;
use crate::config;

/// How long a stem that was asked to stop has before SIGKILL: it has nothing to drain.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Started, not ready yet: killed at `deadline`.
    Starting {
        deadline: Instant,
    },
    Ready,
    Stopping {
        grace: Grace,
    },
}

/// A fork request waiting for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub slot: usize,
    pub generation: u64,
    pub deadline: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stem {
    pub generation: u64,
    pub started: Instant,
    pub life: Life,
    /// Workers it forked.
    pub forks: u64,
    /// Why it is being killed or will fail, when the master knows better than its exit status.
    pub why: Option<String>,
    /// It said `ready`.
    pub was_ready: bool,
    requests: BTreeMap<u64, Request>,
}

/// What the master must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a stem for `generation` from the current config; then `spawned` or `spawn_failed`.
    Spawn { generation: u64 },
    /// Send `signal` to the stem's process group.
    Signal { pid: Pid, signal: Signal, why: String },
}

/// A stem that ended before it was ever ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub generation: u64,
    pub why: String,
}

/// A reaped stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub generation: u64,
    pub status: ExitStatus,
    pub uptime: Duration,
    /// It had said `ready`.
    pub was_ready: bool,
    /// Why it ended, when the master killed it or it refused.
    pub why: Option<String>,
    /// The slots whose fork requests it took with it.
    pub lost: Vec<usize>,
    /// When the next stem of its generation starts, if it is still wanted.
    pub restart_in: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Stems {
    stems: BTreeMap<Pid, Stem>,
    boot_timeout: Duration,
    backoff_policy: config::Backoff,
    backoff: Backoff,
    /// No stem starts before this instant (after a death).
    not_before: Option<Instant>,
    /// The generation the backoff is counting for: a new wanted generation starts afresh.
    backoff_generation: u64,
    generations_ever_ready: BTreeSet<u64>,
    next_id: u64,
}

impl Stems {
    pub fn new(workers: &config::Workers) -> Stems {
        Stems {
            stems: BTreeMap::new(),
            boot_timeout: workers.boot_timeout,
            backoff_policy: workers.restart_backoff,
            backoff: Backoff::default(),
            not_before: None,
            backoff_generation: 0,
            generations_ever_ready: BTreeSet::new(),
            next_id: 1,
        }
    }

    /// A reload's config: its `boot_timeout` and backoff apply to the stems started from now.
    pub fn reconfigure(&mut self, workers: &config::Workers) {
        self.boot_timeout = workers.boot_timeout;
        self.backoff_policy = workers.restart_backoff;
    }

    pub fn stems(&self) -> impl Iterator<Item = (Pid, &Stem)> {
        self.stems.iter().map(|(p, s)| (*p, s))
    }

    pub fn is_empty(&self) -> bool {
        self.stems.is_empty()
    }

    pub fn contains(&self, pid: Pid) -> bool {
        self.stems.contains_key(&pid)
    }

    /// The ready stem of `generation`, if there is one.
    pub fn ready(&self, generation: u64) -> Option<Pid> {
        let mut ready = self.stems.iter().filter(|(_, s)| s.generation == generation);
        ready.find(|(_, s)| s.life == Life::Ready).map(|(p, _)| *p)
    }

    /// Whether a stem of `generation` was ever ready.
    pub fn was_ever_ready(&self, generation: u64) -> bool {
        self.generations_ever_ready.contains(&generation)
    }

    /// Whether fork requests wait for an answer (a worker may appear).
    pub fn requests_pending(&self) -> bool {
        self.stems.values().any(|s| !s.requests.is_empty())
    }

    /// The backoff counts the deaths of `generation`'s stems: those of another generation's
    /// say nothing of this one's.
    fn backoff_for(&mut self, generation: u64) {
        if generation != self.backoff_generation {
            self.backoff_generation = generation;
            self.backoff = Backoff::default();
            self.not_before = None;
        }
    }

    /// A stem of `generation` was started as `pid`.
    pub fn spawned(&mut self, generation: u64, pid: Pid, now: Instant) {
        self.backoff_for(generation);
        let stem = Stem {
            generation,
            started: now,
            life: Life::Starting { deadline: now + self.boot_timeout },
            forks: 0,
            why: None,
            was_ready: false,
            requests: BTreeMap::new(),
        };
        self.stems.insert(pid, stem);
    }

    /// Starting a stem failed (the command could not be exec'd): like a death before ready.
    pub fn spawn_failed(&mut self, generation: u64, why: String, now: Instant) -> Failure {
        self.not_before = Some(self.backoff.record_death(&self.backoff_policy, now, now));
        Failure { generation, why }
    }

    /// The stem said `ready`. Returns whether that made it ready.
    pub fn notified_ready(&mut self, pid: Pid) -> bool {
        let Some(stem) = self.stems.get_mut(&pid) else { return false };
        if !matches!(stem.life, Life::Starting { .. }) {
            return false;
        }
        stem.life = Life::Ready;
        stem.was_ready = true;
        self.generations_ever_ready.insert(stem.generation);
        true
    }

    /// The stem said why it cannot serve (it exits next); kept for its end.
    pub fn refused(&mut self, pid: Pid, why: String) {
        if let Some(stem) = self.stems.get_mut(&pid) {
            stem.why.get_or_insert(why);
        }
    }

    /// A fork request for `slot` of `generation` to the ready stem of that generation: its id
    /// and the stem to send it to.
    pub fn request(&mut self, slot: usize, generation: u64, now: Instant) -> Option<(u64, Pid)> {
        let pid = self.ready(generation)?;
        let id = self.next_id;
        self.next_id += 1;
        let deadline = now + self.boot_timeout;
        let stem = self.stems.get_mut(&pid)?;
        stem.requests.insert(id, Request { slot, generation, deadline });
        Some((id, pid))
    }

    /// The answer to request `id` from stem `pid`: the request, once.
    pub fn answered(&mut self, pid: Pid, id: u64, forked: bool) -> Option<Request> {
        let stem = self.stems.get_mut(&pid)?;
        let request = stem.requests.remove(&id)?;
        if forked {
            stem.forks += 1;
        }
        Some(request)
    }

    /// The stem is broken (a malformed message, its end closed while it lives, a request it
    /// could not be sent): killed now, `why` told when it is reaped.
    pub fn broken(&mut self, pid: Pid, why: String) -> Option<Action> {
        self.kill(pid, Some(why))
    }

    /// The stem's socket is closed or failed while it lives: killed now, so that no request
    /// waits on it (its exit status still says why it ended).
    pub fn lost_channel(&mut self, pid: Pid) -> Option<Action> {
        self.kill(pid, None)
    }

    /// SIGKILL to stem `pid`, once; `why`, if given, is told when it is reaped.
    fn kill(&mut self, pid: Pid, why: Option<String>) -> Option<Action> {
        let stem = self.stems.get_mut(&pid)?;
        if stem.life == (Life::Stopping { grace: Grace::Killed }) {
            return None;
        }
        stem.life = Life::Stopping { grace: Grace::Killed };
        let said = why.clone().unwrap_or_else(|| "its socket to the master is closed".to_owned());
        if let Some(why) = why {
            stem.why.get_or_insert(why);
        }
        Some(Action::Signal { pid, signal: Signal::SIGKILL, why: said })
    }

    /// A child was reaped: `None` if it was not a stem.
    pub fn exited(
        &mut self,
        pid: Pid,
        status: ExitStatus,
        wanted: Option<u64>,
        now: Instant,
    ) -> Option<Ended> {
        let stem = self.stems.remove(&pid)?;
        let was_ready = stem.was_ready;
        let stopped = matches!(stem.life, Life::Stopping { .. }) && stem.why.is_none();
        let restart_in = (wanted == Some(stem.generation)).then(|| {
            if !stopped {
                self.not_before =
                    Some(self.backoff.record_death(&self.backoff_policy, stem.started, now));
            }
            self.not_before.unwrap_or(now).saturating_duration_since(now)
        });
        Some(Ended {
            generation: stem.generation,
            status,
            uptime: now.saturating_duration_since(stem.started),
            was_ready,
            why: stem.why,
            lost: stem.requests.values().map(|r| r.slot).collect(),
            restart_in,
        })
    }

    /// The nearest instant at which `step` has something to do.
    pub fn next_deadline(&self, wanted: Option<u64>) -> Option<Instant> {
        let stems = self.stems.values().flat_map(|s| {
            let life = match s.life {
                Life::Starting { deadline } => Some(deadline),
                Life::Stopping { grace } => grace.kill_at(),
                Life::Ready => None,
            };
            // Only a ready stem's requests can expire: a stopping one's go with it.
            let requests = s.requests.values().filter(|_| s.life == Life::Ready);
            life.into_iter().chain(requests.map(|r| r.deadline))
        });
        // A killed stem of the wanted generation is reaped before the next one starts.
        let start = wanted
            .filter(|&g| !self.stems.values().any(|s| s.generation == g))
            .and(self.not_before);
        stems.chain(start).min()
    }

    /// Decides what to do at `now`: `wanted` is the generation whose stem must run (none when
    /// the master stops or runs exec'd workers), `keep` the other generations still needed.
    pub fn step(&mut self, wanted: Option<u64>, keep: &BTreeSet<u64>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(generation) = wanted {
            self.backoff_for(generation);
        }
        let boot_timeout = self.boot_timeout;
        for (&pid, stem) in self.stems.iter_mut() {
            let expired = stem.requests.values().any(|r| r.deadline <= now);
            match stem.life {
                Life::Starting { deadline } if deadline <= now => {
                    let why = format!(
                        "the stem was not ready within boot_timeout ({})",
                        humantime::format_duration(boot_timeout)
                    );
                    stem.why.get_or_insert(why.clone());
                    stem.life = Life::Stopping { grace: Grace::Killed };
                    actions.push(Action::Signal { pid, signal: Signal::SIGKILL, why });
                }
                Life::Ready if expired => {
                    let why = format!(
                        "the stem left a fork request unanswered for boot_timeout ({})",
                        humantime::format_duration(boot_timeout)
                    );
                    stem.why.get_or_insert(why.clone());
                    stem.life = Life::Stopping { grace: Grace::Killed };
                    actions.push(Action::Signal { pid, signal: Signal::SIGKILL, why });
                }
                Life::Stopping { grace } if grace.due(now) => {
                    stem.life = Life::Stopping { grace: Grace::Killed };
                    let why = "its stop grace is over".to_owned();
                    actions.push(Action::Signal { pid, signal: Signal::SIGKILL, why });
                }
                Life::Starting { .. } | Life::Ready
                    if wanted != Some(stem.generation) && !keep.contains(&stem.generation) =>
                {
                    stem.life = Life::Stopping { grace: Grace::Until(now + STOP_GRACE) };
                    let why = match wanted {
                        None => "the master stops or forks no more".to_owned(),
                        Some(_) => format!("generation {} needs it no more", stem.generation),
                    };
                    actions.push(Action::Signal { pid, signal: Signal::SIGTERM, why });
                }
                _ => {}
            }
        }
        if let Some(generation) = wanted {
            let running = self.stems.values().any(|s| s.generation == generation);
            if !running && self.not_before.map_or(true, |t| t <= now) {
                actions.push(Action::Spawn { generation });
            }
        }
        actions
    }
}

impl Stem {
    /// Fork requests waiting for an answer.
    pub fn pending(&self) -> usize {
        self.requests.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers() -> config::Workers {
        let toml = "[workers]\ncommand = [\"app\"]\npreload = true\nboot_timeout = \"10s\"\n";
        let c = crate::config::parse_str(
            toml,
            std::path::Path::new("/x/supervisor.toml"),
            std::path::Path::new("/x"),
            None,
            2,
            crate::config::Launch::Exec,
        )
        .unwrap();
        c.workers
    }

    fn p(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    #[test]
    fn the_wanted_stem_starts_gets_ready_and_serves_numbered_requests() {
        let t0 = Instant::now();
        let mut s = Stems::new(&workers());
        let keep = BTreeSet::new();
        assert_eq!(s.step(Some(1), &keep, t0), vec![Action::Spawn { generation: 1 }]);
        s.spawned(1, p(10), t0);
        assert!(s.step(Some(1), &keep, t0).is_empty(), "one stem per generation");
        assert_eq!(s.request(0, 1, t0), None, "not ready: spawns wait");
        assert!(s.notified_ready(p(10)));
        assert!(!s.notified_ready(p(10)));
        let (a, to) = s.request(0, 1, t0).unwrap();
        let (b, _) = s.request(1, 1, t0).unwrap();
        assert_eq!(to, p(10));
        assert_ne!(a, b);
        assert!(s.requests_pending());
        assert_eq!(s.answered(p(10), a, true).map(|r| r.slot), Some(0));
        assert_eq!(s.answered(p(10), a, true), None, "answered once");
        assert_eq!(s.answered(p(10), b, false).map(|r| r.slot), Some(1));
        assert!(!s.requests_pending());
        assert_eq!(s.stems().next().unwrap().1.forks, 1);
    }

    #[test]
    fn a_stem_not_ready_in_time_is_killed_and_fails_with_why() {
        let t0 = Instant::now();
        let mut s = Stems::new(&workers());
        s.spawned(1, p(10), t0);
        assert_eq!(s.next_deadline(Some(1)), Some(t0 + Duration::from_secs(10)));
        let actions = s.step(Some(1), &BTreeSet::new(), t0 + Duration::from_secs(10));
        assert!(
            matches!(&actions[..], [Action::Signal { signal: Signal::SIGKILL, why, .. }] if why.contains("boot_timeout (10s)")),
            "no new stem before the killed one is reaped: {actions:?}"
        );
        let end = s.exited(p(10), ExitStatus::Signal(Signal::SIGKILL), Some(1), t0).unwrap();
        assert!(!end.was_ready);
        assert!(end.why.unwrap().contains("not ready"));
    }

    #[test]
    fn a_ready_stem_that_dies_comes_back_with_backoff_and_takes_its_requests_with_it() {
        let t0 = Instant::now();
        let mut s = Stems::new(&workers());
        s.spawned(1, p(10), t0);
        s.notified_ready(p(10));
        s.request(3, 1, t0).unwrap();
        let t1 = t0 + Duration::from_millis(100);
        let end = s.exited(p(10), ExitStatus::Signal(Signal::SIGKILL), Some(1), t1).unwrap();
        assert!(end.was_ready);
        assert_eq!(end.lost, vec![3]);
        assert_eq!(end.restart_in, Some(Duration::ZERO), "the first restart is at once");
        assert_eq!(s.step(Some(1), &BTreeSet::new(), t1), vec![Action::Spawn { generation: 1 }]);
        s.spawned(1, p(11), t1);
        let end = s.exited(p(11), ExitStatus::Code(1), Some(1), t1).unwrap();
        assert!(!end.was_ready, "this one never said ready");
        let wait = end.restart_in.unwrap();
        assert!(wait > Duration::ZERO, "a second quick death backs off");
        assert!(s.step(Some(1), &BTreeSet::new(), t1).is_empty());
        assert_eq!(s.next_deadline(Some(1)), Some(t1 + wait));
        assert_eq!(
            s.step(Some(1), &BTreeSet::new(), t1 + wait),
            vec![Action::Spawn { generation: 1 }]
        );
        assert!(s.was_ever_ready(1));
    }

    #[test]
    fn an_old_stem_is_kept_while_needed_then_stopped_and_killed_after_its_grace() {
        let t0 = Instant::now();
        let mut s = Stems::new(&workers());
        s.spawned(1, p(10), t0);
        s.notified_ready(p(10));
        let keep: BTreeSet<u64> = [1].into();
        assert_eq!(s.step(Some(2), &keep, t0), vec![Action::Spawn { generation: 2 }]);
        s.spawned(2, p(20), t0);
        assert!(s.step(Some(2), &keep, t0).is_empty(), "generation 1 is kept for a rollback");
        let actions = s.step(Some(2), &BTreeSet::new(), t0);
        assert!(
            matches!(&actions[..], [Action::Signal { pid, signal: Signal::SIGTERM, .. }] if *pid == p(10))
        );
        let actions = s.step(Some(2), &BTreeSet::new(), t0 + STOP_GRACE);
        assert!(
            matches!(&actions[..], [Action::Signal { pid, signal: Signal::SIGKILL, .. }] if *pid == p(10))
        );
        let end = s.exited(p(10), ExitStatus::Signal(Signal::SIGKILL), Some(2), t0 + STOP_GRACE);
        assert_eq!(end.unwrap().restart_in, None, "not wanted: not restarted");
        // The master stops: nothing is wanted.
        let actions = s.step(None, &BTreeSet::new(), t0);
        assert!(
            matches!(&actions[..], [Action::Signal { pid, signal: Signal::SIGTERM, .. }] if *pid == p(20))
        );
    }

    #[test]
    fn an_unanswered_request_kills_the_stem() {
        let t0 = Instant::now();
        let mut s = Stems::new(&workers());
        s.spawned(1, p(10), t0);
        s.notified_ready(p(10));
        s.request(0, 1, t0).unwrap();
        assert_eq!(s.next_deadline(Some(1)), Some(t0 + Duration::from_secs(10)));
        let actions = s.step(Some(1), &BTreeSet::new(), t0 + Duration::from_secs(10));
        assert!(
            matches!(&actions[..], [Action::Signal { signal: Signal::SIGKILL, why, .. }] if why.contains("unanswered"))
        );
        assert_eq!(s.broken(p(10), "again".into()), None, "killed once");
    }

    #[test]
    fn a_new_generation_starts_its_backoff_afresh_and_a_stopping_stems_requests_wake_no_one() {
        let t0 = Instant::now();
        let mut s = Stems::new(&workers());
        // Generation 2's stem fails twice at once: the next would wait.
        for pid in [20, 21] {
            assert_eq!(
                s.step(Some(2), &BTreeSet::new(), t0),
                vec![Action::Spawn { generation: 2 }]
            );
            s.spawned(2, p(pid), t0);
            s.exited(p(pid), ExitStatus::Code(1), Some(2), t0);
        }
        assert!(s.step(Some(2), &BTreeSet::new(), t0).is_empty(), "backing off");
        // Generation 3 (the next reload) owes nothing to generation 2's failures.
        assert_eq!(s.step(Some(3), &BTreeSet::new(), t0), vec![Action::Spawn { generation: 3 }]);
        s.spawned(3, p(30), t0);
        s.notified_ready(p(30));
        s.request(0, 3, t0).unwrap();
        // Its socket is lost: killed once, and its request's deadline no longer counts.
        assert!(matches!(
            s.lost_channel(p(30)),
            Some(Action::Signal { signal: Signal::SIGKILL, .. })
        ));
        assert_eq!(s.lost_channel(p(30)), None);
        assert_eq!(s.next_deadline(Some(3)), None, "nothing to wake up for until it is reaped");
        let end = s.exited(p(30), ExitStatus::Signal(Signal::SIGKILL), Some(3), t0).unwrap();
        assert!(end.was_ready && end.why.is_none(), "its exit status says why: {end:?}");
        assert_eq!(end.lost, vec![0]);
    }
}
