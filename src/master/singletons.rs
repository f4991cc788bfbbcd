//! Singletons: named children with exactly one instance each.
//!
//! At boot they start in file order, each ready before the next; while running, one that dies
//! is restarted by its `restart` policy at its backoff instant, and only once its previous
//! process has been reaped and its process group is empty, so two instances (or an instance
//! and the leftovers of the last one) never live at once; at stop they go in reverse
//! order, each gone before the one before it is signalled. Pure, like the pool: stepped at
//! made-up instants, performed by the master.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::stop::{ExitStatus, Grace, Plan};
use crate::backoff::Backoff;
use crate::config::{self, Ready, Restart};

/// A singleton's state; each state carries its own data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// No process; to be spawned at `not_before` (when the stage allows).
    Waiting {
        not_before: Instant,
    },
    /// Spawned, not ready: `deadline` is its boot timeout (spawn mode: its `min_uptime`);
    /// `probe_at` the next connection attempt for socket readiness.
    Starting {
        pid: Pid,
        deadline: Instant,
        probe: Option<Probe>,
    },
    Up {
        pid: Pid,
    },
    /// Sent its stop signal; SIGKILL to its group when the grace is over. `boot_timeout`: it
    /// was killed for not being ready in time (a boot failure, not a stop).
    Stopping {
        pid: Pid,
        grace: Grace,
        boot_timeout: bool,
    },
    /// No process and none wanted (its policy said so, or the master is stopping).
    Finished,
}

/// When to try connecting to a starting singleton's socket, and the wait after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// `None` while an attempt is out (the master reports with `probed`).
    pub at: Option<Instant>,
    pub every: Duration,
}

const PROBE_FIRST: Duration = Duration::from_millis(5);
const PROBE_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn {
        index: usize,
    },
    /// Try connecting to the singleton's ready socket; report with `probed`.
    Probe {
        index: usize,
    },
    Signal {
        index: usize,
        pid: Pid,
        signal: Signal,
    },
    /// It became ready.
    Up {
        index: usize,
        pid: Pid,
    },
    /// Every singleton is up: the workers may start.
    Booted,
    /// A singleton could not become ready at boot.
    BootFailed {
        index: usize,
        why: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Booting,
    Running,
    Stopping,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub spec: config::Singleton,
    pub life: Life,
    backoff: Backoff,
    pub started: Option<Instant>,
    /// A reload changed its definition: this one replaces `spec` once the process is gone.
    next: Option<config::Singleton>,
    /// A reload removed it: it stops, and is never started again (unless a reload brings it
    /// back). Its position is kept, so the indexes of the others do not move.
    removed: bool,
    /// Its last process was reaped but its process group still has members (being killed):
    /// no new instance until [`Singletons::group_gone`].
    draining: Option<Pid>,
}

impl Entry {
    fn new(spec: config::Singleton, now: Instant) -> Entry {
        Entry {
            spec,
            life: Life::Waiting { not_before: now },
            backoff: Backoff::default(),
            started: None,
            next: None,
            removed: false,
            draining: None,
        }
    }

    /// Whether the running config has it.
    pub fn configured(&self) -> bool {
        !self.removed
    }

    /// A process or a draining process group.
    fn has_processes(&self) -> bool {
        self.pid().is_some() || self.draining.is_some()
    }

    /// To be spawned now: waiting, due, and nothing of its last instance left.
    fn due(&self, now: Instant) -> bool {
        self.draining.is_none()
            && matches!(self.life, Life::Waiting { not_before } if not_before <= now)
    }

    pub fn pid(&self) -> Option<Pid> {
        match self.life {
            Life::Starting { pid, .. } | Life::Up { pid, .. } | Life::Stopping { pid, .. } => {
                Some(pid)
            }
            Life::Waiting { .. } | Life::Finished => None,
        }
    }
}

/// What the log says of a singleton's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub index: usize,
    pub status: ExitStatus,
    pub stopped: bool,
    pub restart_in: Option<Duration>,
    /// Until when what is left of its process group may run (the SIGKILL instant of a stop
    /// under way); `None`: the rest of its group is killed at once.
    pub group_grace: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct Singletons {
    entries: Vec<Entry>,
    stage: Stage,
    /// A fast stop was asked for.
    fast: bool,
    pending: Vec<Action>,
}

impl Singletons {
    pub fn new(specs: &[config::Singleton], now: Instant) -> Singletons {
        let entries = specs.iter().map(|spec| Entry::new(spec.clone(), now)).collect();
        Singletons { entries, stage: Stage::Booting, fast: false, pending: Vec::new() }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn stage(&self) -> Stage {
        self.stage
    }
    pub fn index_of(&self, pid: Pid) -> Option<usize> {
        self.entries.iter().position(|e| e.pid() == Some(pid))
    }
    /// How many singletons the running config has.
    pub fn configured_count(&self) -> usize {
        self.entries.iter().filter(|e| e.configured()).count()
    }
    pub fn up_count(&self) -> usize {
        self.entries.iter().filter(|e| matches!(e.life, Life::Up { .. })).count()
    }
    /// Stopping, and no singleton process is left (nor any of their process groups).
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Stopping && self.entries.iter().all(|e| !e.has_processes())
    }

    /// The group of singleton `index`'s last process (`pgid`, reaped) outlives it.
    pub fn group_outlives(&mut self, index: usize, pgid: Pid) {
        self.entries[index].draining = Some(pgid);
    }

    /// The group `pgid` is empty (or given up on); returns the singleton's index if it was one.
    pub fn group_gone(&mut self, pgid: Pid) -> Option<usize> {
        let index = self.entries.iter().position(|e| e.draining == Some(pgid))?;
        self.entries[index].draining = None;
        Some(index)
    }

    /// Stops them all, last first, by the rule of [`Plan::new`] with each one's
    /// `stop_signal` and `stop_timeout`. A fast stop also hurries one already stopping
    /// ([`Grace::hasten`]).
    pub fn stop(&mut self, fast: bool, now: Instant) {
        self.stage = Stage::Stopping;
        self.fast |= fast;
        if !fast {
            return;
        }
        for (index, e) in self.entries.iter_mut().enumerate() {
            let plan = Plan::fast(e.spec.stop_timeout);
            if let Life::Stopping { pid, grace, .. } = &mut e.life {
                if grace.hasten(plan, now) {
                    self.pending.push(Action::Signal { index, pid: *pid, signal: plan.signal });
                }
            }
        }
    }

    /// How singleton `index` is stopped now.
    fn plan(&self, index: usize) -> Plan {
        let spec = &self.entries[index].spec;
        Plan::new(self.fast, spec.stop_signal.0, spec.stop_timeout)
    }

    /// A reload: singletons whose definition changed are stopped and started again with the
    /// new one, new ones start, removed ones stop; the others are left alone. The order of the
    /// first config is kept (a new singleton comes after the existing ones).
    pub fn reconfigure(&mut self, specs: &[config::Singleton], now: Instant) {
        if self.stage == Stage::Stopping {
            return;
        }
        for spec in specs {
            let Some(index) = self.entries.iter().position(|e| e.spec.name == spec.name) else {
                self.entries.push(Entry::new(spec.clone(), now));
                continue;
            };
            let e = &mut self.entries[index];
            let current = e.next.as_ref().unwrap_or(&e.spec);
            if current == spec && !e.removed {
                continue;
            }
            e.removed = false;
            match e.life {
                Life::Waiting { .. } | Life::Finished => {
                    e.spec = spec.clone();
                    e.next = None;
                    e.backoff = Backoff::default();
                    e.life = Life::Waiting { not_before: now };
                }
                Life::Stopping { .. } => e.next = Some(spec.clone()),
                Life::Starting { .. } | Life::Up { .. } => {
                    e.next = Some(spec.clone());
                    self.stop_one(index, now);
                }
            }
        }
        for index in 0..self.entries.len() {
            let e = &mut self.entries[index];
            if e.removed || specs.iter().any(|s| s.name == e.spec.name) {
                continue;
            }
            e.removed = true;
            e.next = None;
            match e.life {
                Life::Waiting { .. } => e.life = Life::Finished,
                Life::Starting { .. } | Life::Up { .. } => self.stop_one(index, now),
                Life::Stopping { .. } | Life::Finished => {}
            }
        }
    }

    /// Stops singleton `index` and starts it again (`presup restart NAME`); one not running
    /// (waiting for its backoff, or finished) starts now. False while the master stops.
    pub fn restart(&mut self, index: usize, now: Instant) -> bool {
        if self.stage == Stage::Stopping || index >= self.entries.len() {
            return false;
        }
        let e = &mut self.entries[index];
        if e.removed {
            return false;
        }
        match e.life {
            Life::Waiting { .. } | Life::Finished => {
                e.backoff = Backoff::default();
                e.life = Life::Waiting { not_before: now };
            }
            Life::Stopping { .. } => {
                e.next.get_or_insert_with(|| e.spec.clone());
            }
            Life::Starting { .. } | Life::Up { .. } => {
                e.next.get_or_insert_with(|| e.spec.clone());
                self.stop_one(index, now);
            }
        }
        true
    }

    /// Sends one singleton its stop signal, SIGKILL at the end of its grace.
    fn stop_one(&mut self, index: usize, now: Instant) {
        let plan = self.plan(index);
        let e = &mut self.entries[index];
        if let Life::Starting { pid, .. } | Life::Up { pid, .. } = e.life {
            e.life = Life::Stopping { pid, grace: plan.begin(now), boot_timeout: false };
            self.pending.push(Action::Signal { index, pid, signal: plan.signal });
        }
    }

    pub fn spawned(&mut self, index: usize, pid: Pid, now: Instant) {
        let e = &mut self.entries[index];
        let probe = matches!(e.spec.ready, Ready::UnixSocket(_) | Ready::Tcp(_))
            .then_some(Probe { at: Some(now + PROBE_FIRST), every: PROBE_FIRST });
        let wait =
            if e.spec.ready == Ready::Spawn { e.spec.min_uptime } else { e.spec.boot_timeout };
        e.life = Life::Starting { pid, deadline: now + wait, probe };
        e.started = Some(now);
    }

    pub fn spawn_failed(&mut self, index: usize, why: String, now: Instant) {
        self.entries[index].started = Some(now);
        self.died(index, ExitStatus::NotStarted(why), true, now);
    }

    /// `READY=1` from `pid`; true if that made a singleton up.
    pub fn notified_ready(&mut self, pid: Pid) -> bool {
        match self.index_of(pid) {
            Some(i) if self.entries[i].spec.ready == Ready::Notify => self.came_up(i),
            _ => false,
        }
    }

    /// The result of a `Probe`.
    pub fn probed(&mut self, index: usize, ok: bool, now: Instant) {
        if ok {
            self.came_up(index);
        } else if let Life::Starting { probe: Some(p), .. } = &mut self.entries[index].life {
            p.every = (p.every * 2).min(PROBE_MAX);
            p.at = Some(now + p.every);
        }
    }

    fn came_up(&mut self, index: usize) -> bool {
        let Life::Starting { pid, .. } = self.entries[index].life else { return false };
        self.entries[index].life = Life::Up { pid };
        self.pending.push(Action::Up { index, pid });
        true
    }

    /// A child was reaped; `None` if it was not a singleton.
    pub fn exited(&mut self, pid: Pid, status: ExitStatus, now: Instant) -> Option<Ended> {
        let index = self.index_of(pid)?;
        let group_grace = match self.entries[index].life {
            Life::Stopping { grace, .. } => grace.kill_at(),
            _ => None,
        };
        let (stopped, boot) = match self.entries[index].life {
            Life::Stopping { boot_timeout, .. } => (!boot_timeout, boot_timeout),
            Life::Starting { .. } => (false, true),
            _ => (false, false),
        };
        if stopped {
            let e = &mut self.entries[index];
            e.life = Life::Finished;
            // Replaced by a reload: the new definition starts now, unless the master stops.
            if let Some(spec) = e.next.take().filter(|_| self.stage != Stage::Stopping) {
                *e = Entry::new(spec, now);
            }
        } else {
            self.died(index, status.clone(), boot, now);
        }
        let restart_in = match self.entries[index].life {
            Life::Waiting { not_before } => Some(not_before.saturating_duration_since(now)),
            _ => None,
        };
        Some(Ended { index, status, stopped, restart_in, group_grace })
    }

    fn died(&mut self, index: usize, status: ExitStatus, boot: bool, now: Instant) {
        let e = &mut self.entries[index];
        if self.stage == Stage::Booting && boot {
            let why = match (&e.life, &status) {
                (Life::Stopping { boot_timeout: true, .. }, _) => format!(
                    "not ready within its boot_timeout ({})",
                    humantime::format_duration(e.spec.boot_timeout)
                ),
                _ => format!("{status} before it was ready"),
            };
            e.life = Life::Finished;
            self.pending.push(Action::BootFailed { index, why });
            return;
        }
        let failed = status != ExitStatus::Code(0);
        let restart = match e.spec.restart {
            Restart::Always => true,
            Restart::OnFailure => failed,
            Restart::Never => false,
        };
        e.life = if restart && self.stage != Stage::Stopping {
            let started = e.started.unwrap_or(now);
            Life::Waiting {
                not_before: e.backoff.record_death(&e.spec.restart_backoff, started, now),
            }
        } else {
            Life::Finished
        };
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        // At boot only the first singleton not up may be spawned.
        let booting = self.booting();
        let may_spawn = |i: usize| match self.stage {
            Stage::Booting => Some(i) == booting,
            Stage::Running => true,
            Stage::Stopping => false,
        };
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e.life {
                // A draining one waits for the reaper, not for its instant.
                Life::Waiting { not_before } if may_spawn(i) && e.draining.is_none() => {
                    Some(not_before)
                }
                Life::Starting { deadline, probe, .. } => {
                    Some(probe.and_then(|p| p.at).map_or(deadline, |at| at.min(deadline)))
                }
                Life::Stopping { grace, .. } => grace.kill_at(),
                _ => None,
            })
            .min()
    }

    pub fn step(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = std::mem::take(&mut self.pending);
        for index in 0..self.entries.len() {
            self.expire(index, now, &mut actions);
        }
        actions.append(&mut self.pending);
        match self.stage {
            Stage::Booting => self.boot(now, &mut actions),
            Stage::Running => {
                for (index, e) in self.entries.iter().enumerate() {
                    if e.due(now) {
                        actions.push(Action::Spawn { index });
                    }
                }
            }
            Stage::Stopping => self.stop_last(now, &mut actions),
        }
        actions
    }

    fn expire(&mut self, index: usize, now: Instant, actions: &mut Vec<Action>) {
        let spawn_mode = self.entries[index].spec.ready == Ready::Spawn;
        match &mut self.entries[index].life {
            Life::Starting { deadline, .. } if *deadline <= now && spawn_mode => {
                self.came_up(index);
            }
            Life::Starting { pid, deadline, .. } if *deadline <= now => {
                let pid = *pid;
                self.entries[index].life =
                    Life::Stopping { pid, grace: Grace::Killed, boot_timeout: true };
                actions.push(Action::Signal { index, pid, signal: Signal::SIGKILL });
            }
            Life::Starting { probe: Some(p), .. } if p.at.is_some_and(|at| at <= now) => {
                p.at = None;
                actions.push(Action::Probe { index });
            }
            Life::Stopping { pid, grace, .. } if grace.due(now) => {
                *grace = Grace::Killed;
                actions.push(Action::Signal { index, pid: *pid, signal: Signal::SIGKILL });
            }
            _ => {}
        }
    }

    /// The first configured singleton not up.
    fn booting(&self) -> Option<usize> {
        self.entries.iter().position(|e| e.configured() && !matches!(e.life, Life::Up { .. }))
    }

    /// In file order: the first singleton not up is spawned; the next waits for it.
    fn boot(&mut self, now: Instant, actions: &mut Vec<Action>) {
        match self.booting() {
            None => {
                self.stage = Stage::Running;
                actions.push(Action::Booted);
            }
            Some(index) => {
                if self.entries[index].due(now) {
                    actions.push(Action::Spawn { index });
                }
            }
        }
    }

    /// In reverse order: the last singleton with a process is stopped; the ones before it wait.
    fn stop_last(&mut self, now: Instant, actions: &mut Vec<Action>) {
        for e in &mut self.entries {
            if matches!(e.life, Life::Waiting { .. }) {
                e.life = Life::Finished;
            }
        }
        let Some(index) = self.entries.iter().rposition(Entry::has_processes) else { return };
        let plan = self.plan(index);
        let e = &mut self.entries[index];
        if let Life::Starting { pid, .. } | Life::Up { pid, .. } = e.life {
            e.life = Life::Stopping { pid, grace: plan.begin(now), boot_timeout: false };
            actions.push(Action::Signal { index, pid, signal: plan.signal });
        }
    }
}

#[cfg(test)]
mod tests;
