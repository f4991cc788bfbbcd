//! Hook runs: the commands of one hook point, run in order, each to completion, without
//! blocking the loop.
//!
//! A [`HookRun`] is one firing of a hook point (`on_starting` once, `worker_exit` once per
//! exit, ...). Each command gets `timeout` (its process group is SIGKILLed then) and
//! `retries` further attempts, spaced by a doubling delay. Like the pool, a run is stepped at
//! made-up instants and returns actions; the master spawns and reports back.

use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::stop::Grace;
use crate::config::Hook;

/// The lifecycle points at which hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    OnStarting,
    WhenReady,
    OnReload,
    WorkerExit,
    OnExit,
}

impl Point {
    pub fn name(self) -> &'static str {
        match self {
            Point::OnStarting => "on_starting",
            Point::WhenReady => "when_ready",
            Point::OnReload => "on_reload",
            Point::WorkerExit => "worker_exit",
            Point::OnExit => "on_exit",
        }
    }

    pub fn hooks(self, hooks: &crate::config::Hooks) -> &[Hook] {
        match self {
            Point::OnStarting => &hooks.on_starting,
            Point::WhenReady => &hooks.when_ready,
            Point::OnReload => &hooks.on_reload,
            Point::WorkerExit => &hooks.worker_exit,
            Point::OnExit => &hooks.on_exit,
        }
    }
}

/// The delay before the first retry; it doubles for each further one, up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where a run is; each state carries its own data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Life {
    /// The current command is to be spawned (now, or at `not_before`).
    Pending {
        not_before: Instant,
    },
    /// The current command runs; SIGKILL to its group when its `timeout` (the grace) is over.
    Running {
        pid: Pid,
        grace: Grace,
    },
    Done,
}

/// What the master must do for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Spawn `hook`; report with [`HookRun::spawned`] or [`HookRun::finished`].
    Spawn { index: usize, attempt: u32 },
    /// Its time is up: SIGKILL the process group of `pid`.
    Kill { pid: Pid },
}

/// How a hook command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub ok: bool,
    /// "exited with code 3", "killed at its 60s timeout", "cannot execute ..."
    pub status: String,
}

/// One firing of a hook point.
#[derive(Debug, Clone)]
pub struct HookRun {
    pub point: Point,
    pub hooks: Vec<Hook>,
    /// Extra environment for every command of this run (worker_exit's variables).
    pub env: Vec<(String, String)>,
    index: usize,
    attempt: u32,
    life: Life,
    /// The first command that failed for good, with its last outcome.
    failure: Option<(usize, Ended)>,
    /// Whether the master asked the run to stop (a stop during `on_starting`).
    abandoned: bool,
    /// When the command running now started.
    pub since: Option<Instant>,
}

impl HookRun {
    pub fn new(
        point: Point,
        hooks: Vec<Hook>,
        env: Vec<(String, String)>,
        now: Instant,
    ) -> HookRun {
        let life = if hooks.is_empty() { Life::Done } else { Life::Pending { not_before: now } };
        HookRun {
            point,
            hooks,
            env,
            index: 0,
            attempt: 0,
            life,
            failure: None,
            abandoned: false,
            since: None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.life == Life::Done
    }

    /// The failed command and how it ended, once a command failed after all its retries.
    pub fn failure(&self) -> Option<&(usize, Ended)> {
        self.failure.as_ref()
    }

    /// The command of the hook running now, or next.
    pub fn command(&self) -> Option<&[String]> {
        self.hooks.get(self.index).map(|h| h.command.as_slice())
    }

    pub fn pid(&self) -> Option<Pid> {
        match self.life {
            Life::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match self.life {
            Life::Pending { not_before } => Some(not_before),
            Life::Running { grace, .. } => grace.kill_at(),
            _ => None,
        }
    }

    pub fn step(&mut self, now: Instant) -> Vec<Action> {
        match &mut self.life {
            Life::Pending { not_before } if *not_before <= now => {
                vec![Action::Spawn { index: self.index, attempt: self.attempt }]
            }
            Life::Running { pid, grace } if grace.due(now) => {
                *grace = Grace::Killed;
                vec![Action::Kill { pid: *pid }]
            }
            _ => vec![],
        }
    }

    pub fn spawned(&mut self, pid: Pid, now: Instant) {
        let grace = Grace::Until(now + self.hooks[self.index].timeout);
        self.life = Life::Running { pid, grace };
        self.since = Some(now);
    }

    /// The current command ended (or could not be spawned). Returns the outcome as logged.
    pub fn finished(&mut self, outcome: &Ended, now: Instant) {
        let killed = matches!(self.life, Life::Running { grace: Grace::Killed, .. });
        let hook = &self.hooks[self.index];
        if outcome.ok && !killed {
            self.next_command(now);
        } else if self.attempt < hook.retries && !self.abandoned {
            self.attempt += 1;
            let factor = 1u32 << (self.attempt - 1).min(16);
            let delay = RETRY_INITIAL.saturating_mul(factor).min(RETRY_MAX);
            self.life = Life::Pending { not_before: now + delay };
        } else {
            let mut outcome = outcome.clone();
            if killed {
                outcome.ok = false;
                outcome.status = if self.abandoned {
                    "killed: the master is stopping".to_owned()
                } else {
                    format!("killed at its {} timeout", humantime::format_duration(hook.timeout))
                };
            }
            self.failure.get_or_insert((self.index, outcome));
            // on_starting stops at its first failure; other points carry on with the next.
            if self.point == Point::OnStarting || self.abandoned {
                self.life = Life::Done;
            } else {
                self.next_command(now);
            }
        }
    }

    fn next_command(&mut self, now: Instant) {
        self.index += 1;
        self.attempt = 0;
        self.life = if self.index < self.hooks.len() && !self.abandoned {
            Life::Pending { not_before: now }
        } else {
            Life::Done
        };
    }

    /// Stops the run: a running command is killed now, nothing further starts. Returns the
    /// pid to kill, if any.
    pub fn abandon(&mut self) -> Option<Pid> {
        self.abandoned = true;
        match &mut self.life {
            Life::Running { pid, grace } => {
                *grace = Grace::Killed;
                Some(*pid)
            }
            _ => {
                self.life = Life::Done;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn hook(retries: u32) -> Hook {
        Hook {
            command: vec!["x".into()],
            timeout: Duration::from_secs(60),
            retries,
            env: BTreeMap::new(),
        }
    }

    fn ok() -> Ended {
        Ended { ok: true, status: "exited with code 0".into() }
    }

    fn failed() -> Ended {
        Ended { ok: false, status: "exited with code 1".into() }
    }

    #[test]
    fn commands_run_in_order_each_to_completion() {
        let t = Instant::now();
        let mut run = HookRun::new(Point::WhenReady, vec![hook(0), hook(0)], vec![], t);
        assert_eq!(run.step(t), vec![Action::Spawn { index: 0, attempt: 0 }]);
        run.spawned(Pid::from_raw(10), t);
        assert_eq!(run.step(t), vec![]);
        run.finished(&ok(), t);
        assert_eq!(run.step(t), vec![Action::Spawn { index: 1, attempt: 0 }]);
        run.spawned(Pid::from_raw(11), t);
        run.finished(&ok(), t);
        assert!(run.is_done() && run.failure().is_none());
    }

    #[test]
    fn retries_with_doubling_delay_then_fails_for_good() {
        let t = Instant::now();
        let mut run = HookRun::new(Point::OnStarting, vec![hook(2), hook(0)], vec![], t);
        run.step(t);
        run.spawned(Pid::from_raw(10), t);
        run.finished(&failed(), t);
        assert_eq!(run.next_deadline(), Some(t + Duration::from_millis(500)));
        assert_eq!(run.step(t + Duration::from_millis(499)), vec![]);
        let t1 = t + Duration::from_millis(500);
        assert_eq!(run.step(t1), vec![Action::Spawn { index: 0, attempt: 1 }]);
        run.spawned(Pid::from_raw(11), t1);
        run.finished(&failed(), t1);
        assert_eq!(run.next_deadline(), Some(t1 + Duration::from_millis(1000)));
        let t2 = t1 + Duration::from_secs(1);
        run.step(t2);
        run.spawned(Pid::from_raw(12), t2);
        run.finished(&failed(), t2);
        // on_starting stops at the first command that fails for good.
        assert!(run.is_done());
        assert_eq!(run.failure(), Some(&(0, failed())));
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_and_counts_as_failed() {
        let t = Instant::now();
        let mut run = HookRun::new(Point::OnExit, vec![hook(0), hook(0)], vec![], t);
        run.step(t);
        run.spawned(Pid::from_raw(10), t);
        assert_eq!(run.next_deadline(), Some(t + Duration::from_secs(60)));
        let late = t + Duration::from_secs(60);
        assert_eq!(run.step(late), vec![Action::Kill { pid: Pid::from_raw(10) }]);
        assert_eq!(run.step(late), vec![]);
        run.finished(&Ended { ok: false, status: "killed by SIGKILL".into() }, late);
        let (index, outcome) = run.failure().unwrap();
        assert_eq!((*index, outcome.status.as_str()), (0, "killed at its 1m timeout"));
        // Not on_starting: the next command still runs.
        assert_eq!(run.step(late), vec![Action::Spawn { index: 1, attempt: 0 }]);
    }

    #[test]
    fn abandoning_kills_the_running_command_and_starts_nothing_more() {
        let t = Instant::now();
        let mut run = HookRun::new(Point::OnStarting, vec![hook(3), hook(0)], vec![], t);
        run.step(t);
        run.spawned(Pid::from_raw(10), t);
        assert_eq!(run.abandon(), Some(Pid::from_raw(10)));
        run.finished(&Ended { ok: false, status: "killed by SIGKILL".into() }, t);
        assert!(run.is_done());
        assert_eq!(run.step(t), vec![]);
        // Said as it is: the stop killed it, not its timeout.
        let (_, outcome) = run.failure().unwrap();
        assert_eq!(outcome.status, "killed: the master is stopping");
        let empty = HookRun::new(Point::OnExit, vec![], vec![], t);
        assert!(empty.is_done());
    }
}
