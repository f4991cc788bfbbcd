//! The workers' state and the decisions about them, without any I/O.
//!
//! The *wanted* state (how many slots, which generation, running or stopping) is kept apart
//! from the *actual* one (the live workers, keyed by pid, each with its [`Life`]). [`Pool::step`]
//! compares the two at an instant and returns the [`Action`]s that bring them together; the
//! master performs them and reports back ([`Pool::spawned`], [`Pool::spawn_failed`],
//! [`Pool::exited`], [`Pool::notified_ready`]). Everything here is a function of the state,
//! the event and a made-up `now`, so it is tested exactly, in microseconds.
//!
//! Rules kept here:
//! - a slot restarts after a death at its [`Backoff`]'s instant;
//! - a reload replaces slots one batch at a time, each old worker stopped only once its new
//!   worker is up, slot 0 last;
//! - slot 0 (the primary) never has two live processes: its old process, and every process
//!   of its old process group, is gone before a new one is spawned;
//! - no slot gets a new worker while the process group of its last one still has members
//!   ([`Life::Draining`]);
//! - during the boot, a slot that fails to come up `boot_attempts` times in a row fails the
//!   boot;
//! - a fork that fails for want of resources (the process limit, memory) pauses every spawn,
//!   in all slots, for one backoff shared by the pool: it is not a slot's boot failure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::stop::{ExitStatus, Grace, Plan};
use crate::backoff::Backoff;
use crate::config;

/// How the workers of the current generation are run.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub notify: bool,
    pub min_uptime: Duration,
    pub boot_timeout: Duration,
    pub stop_signal: Signal,
    pub graceful_timeout: Duration,
    pub backoff: config::Backoff,
    pub boot_attempts: u32,
    pub reload_batch: usize,
    /// A worker up and silent (no `WATCHDOG=1`) for longer gets SIGABRT.
    pub watchdog: Option<Duration>,
}

impl Policy {
    pub fn from_config(c: &config::Config) -> Policy {
        let w = &c.workers;
        Policy {
            notify: w.ready == config::Ready::Notify,
            min_uptime: w.min_uptime,
            boot_timeout: w.boot_timeout,
            stop_signal: w.stop_signal.0,
            graceful_timeout: c.graceful_timeout,
            backoff: w.restart_backoff,
            boot_attempts: w.boot_attempts.max(1),
            reload_batch: w.reload_batch.max(1),
            watchdog: w.watchdog,
        }
    }
}

/// The grace between a watchdog's SIGABRT and SIGKILL.
pub const WATCHDOG_GRACE: Duration = Duration::from_secs(2);

/// How a silent worker is stopped: SIGABRT (a core dump, a stack trace), SIGKILL after
/// [`WATCHDOG_GRACE`].
const WATCHDOG_PLAN: Plan = Plan { signal: Signal::SIGABRT, grace: WATCHDOG_GRACE };

/// Why the master stops a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Replaced by a worker of a newer generation.
    Retired,
    /// Its slot is above the wanted count (TTOU, or a reload with fewer workers).
    Surplus,
    /// It did not send `READY=1` within `boot_timeout`.
    BootTimeout,
    /// The master is stopping.
    Shutdown,
    /// It was silent for longer than `watchdog` (SIGABRT, then SIGKILL).
    Watchdog,
    /// It said `STOPPING=1`: it retires by itself, and its replacement starts now.
    Retiring,
}

/// A live worker's state; each state carries its own data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Spawned, not up yet: up at `deadline` (spawn mode) or killed then (notify mode).
    Starting { deadline: Instant },
    /// Up; with `watchdog`, it must send `WATCHDOG=1` before `watchdog_at`.
    Up { watchdog_at: Option<Instant> },
    /// Sent its stop signal (or none: it retires by itself); SIGKILL to its group when its
    /// grace is over.
    Stopping { why: StopCause, grace: Grace },
    /// Reaped, but its process group still has members (being killed): the slot waits for
    /// [`Pool::group_gone`]. Keyed by the old pid, which is the group's id.
    Draining,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub slot: usize,
    pub generation: u64,
    pub started: Instant,
    pub stop_signal: Signal,
    pub life: Life,
    /// Asked to be replaced (`presup restart SLOT`): a new worker starts in its slot, and it
    /// is stopped once that one is up (slot 0: stopped first, the primary rule).
    pub superseded: bool,
}

impl Worker {
    fn live(&self) -> bool {
        !matches!(self.life, Life::Stopping { .. } | Life::Draining)
    }
    /// A worker of `generation` that is not to be replaced.
    fn current(&self, generation: u64) -> bool {
        self.generation == generation && !self.superseded
    }
    pub fn up(&self) -> bool {
        matches!(self.life, Life::Up { .. })
    }
}

/// What the master must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fork and exec a worker of `generation` in `slot`, then call `spawned` or `spawn_failed`.
    Spawn { slot: usize, generation: u64 },
    /// Send `signal` to the worker's process group.
    Signal { pid: Pid, slot: usize, signal: Signal, why: StopCause },
    /// Every slot of the initial generation has an up worker: the boot is over.
    Booted,
    /// A slot failed to boot `attempts` times in a row during the boot; the master gives up.
    BootFailed { slot: usize, attempts: u32, last: ExitStatus },
    /// Every slot runs the reloaded generation: the reload is done.
    ReloadDone { generation: u64 },
    /// A worker of the reloaded generation `failed` could not come up in `slot`: the pool is
    /// back to generation `to` (its target and policy), whose workers keep serving.
    RolledBack { failed: u64, to: u64, slot: usize, status: ExitStatus },
}

/// Why a worker ended, for the log and the `worker_exit` hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub pid: Pid,
    pub slot: usize,
    pub generation: u64,
    pub status: ExitStatus,
    pub uptime: Duration,
    pub cause: Cause,
    /// When the slot will get a new worker, if it needs one.
    pub restart_in: Option<Duration>,
    /// Until when what is left of its process group may run: the SIGKILL instant of a stop
    /// under way (the stop signal went to the whole group); `None` for a worker that was not
    /// being stopped, retired by itself (`STOPPING=1`) or was already killed: the rest of its
    /// group is killed at once.
    pub group_grace: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It died before coming up.
    BootFailure,
    /// It died on its own after coming up.
    Crash,
    /// The master stopped it; `killed` says whether it took the SIGKILL at the deadline.
    Stopped { why: StopCause, killed: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Booting,
    Running,
    Stopping { fast: bool },
}

#[derive(Debug, Clone, Default)]
struct Slot {
    backoff: Backoff,
    /// No spawn in this slot before this instant.
    not_before: Option<Instant>,
    /// Failures to come up since the slot last had an up worker.
    boot_failures: u32,
    last_failure: Option<ExitStatus>,
    /// A stem was asked to fork a worker of this generation for the slot and has not answered:
    /// the slot gets no other spawn meanwhile (for slot 0, a process may be on its way).
    requested: Option<u64>,
}

/// A generation the pool can go back to.
#[derive(Debug, Clone)]
struct Settled {
    generation: u64,
    target: usize,
    policy: Policy,
}

#[derive(Debug, Clone)]
pub struct Pool {
    target: usize,
    generation: u64,
    /// The highest generation ever started (a rolled-back number is never reused).
    last_generation: u64,
    /// During a reload: the last settled generation, to roll back to.
    rollout: Option<Settled>,
    policy: Policy,
    stage: Stage,
    workers: BTreeMap<Pid, Worker>,
    slots: Vec<Slot>,
    /// Actions decided by an event, handed out by the next `step`.
    pending: Vec<Action>,
    /// Forks failed for want of resources in a row, and no spawn before `forks_paused_until`.
    fork_failures: u32,
    forks_paused_until: Option<Instant>,
    /// Spawns wait for something outside the pool (the stem of the generation to be ready).
    held: bool,
}

impl Pool {
    pub fn new(target: usize, policy: Policy) -> Pool {
        Pool {
            target,
            generation: 1,
            last_generation: 1,
            rollout: None,
            policy,
            stage: Stage::Booting,
            workers: BTreeMap::new(),
            slots: Vec::new(),
            pending: Vec::new(),
            fork_failures: 0,
            forks_paused_until: None,
            held: false,
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn stage(&self) -> Stage {
        self.stage
    }
    pub fn workers(&self) -> impl Iterator<Item = (Pid, &Worker)> {
        self.workers.iter().map(|(p, w)| (*p, w))
    }
    /// Live workers that are up, of any generation.
    pub fn up_count(&self) -> usize {
        self.workers.values().filter(|w| w.up()).count()
    }
    /// The master may exit: it is stopping and no worker is left.
    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Stopping { .. })
            && self.workers.is_empty()
            && self.slots.iter().all(|s| s.requested.is_none())
    }

    /// The generation a reload would go back to, while one rolls out.
    pub fn settled_generation(&self) -> Option<u64> {
        self.rollout.as_ref().map(|s| s.generation)
    }

    /// Holds every spawn (or lets them go): the workers' stem is not ready.
    pub fn hold_spawns(&mut self, held: bool) {
        self.held = held;
    }

    /// A stem was asked to fork the worker of `slot`: [`Pool::spawned`] or
    /// [`Pool::spawn_failed`] follows, or [`Pool::request_lost`].
    pub fn requested(&mut self, slot: usize, generation: u64) {
        self.slot(slot).requested = Some(generation);
    }

    /// The stem asked for `slot` ended before it answered: the slot may be asked again, with
    /// no failure counted (the worker was never started).
    pub fn request_lost(&mut self, slot: usize) {
        self.slot(slot).requested = None;
    }

    /// Undoes the reload under way because its generation cannot start at all (its stem
    /// failed to load): returns the failed generation and the one the pool is back to.
    pub fn abandon_reload(&mut self) -> Option<(u64, u64)> {
        let settled = self.rollout.take()?;
        let failed = self.generation;
        self.generation = settled.generation;
        self.target = settled.target;
        self.policy = settled.policy;
        Some((failed, settled.generation))
    }

    /// Changes the wanted number of workers (TTIN/TTOU); never below 1 nor above
    /// [`config::MAX_WORKERS`], and never from 0.
    pub fn set_target(&mut self, n: usize) {
        // A master without workers (singletons only) stays without.
        self.target = if self.target == 0 { 0 } else { n.clamp(1, config::MAX_WORKERS) };
    }

    /// Starts a new generation with `policy` and `target` workers (a reload). A reload during
    /// another supersedes it: its workers are replaced too, and a rollback still goes back to
    /// the last generation that was fully rolled out.
    pub fn reload(&mut self, target: usize, policy: Policy) {
        let settled = Settled {
            generation: self.generation,
            target: self.target,
            policy: self.policy.clone(),
        };
        self.rollout = Some(self.rollout.take().unwrap_or(settled));
        self.last_generation += 1;
        self.generation = self.last_generation;
        self.target = target;
        self.policy = policy;
    }

    /// Whether a reload is rolling out.
    pub fn reloading(&self) -> bool {
        self.rollout.is_some()
    }

    /// Goes back to the last settled generation after `slot` failed to come up.
    fn roll_back(&mut self, slot: usize, status: ExitStatus) {
        let Some(settled) = self.rollout.take() else { return };
        let failed = self.generation;
        self.generation = settled.generation;
        self.target = settled.target;
        self.policy = settled.policy;
        self.pending.push(Action::RolledBack { failed, to: settled.generation, slot, status });
    }

    /// `WATCHDOG=1` from a worker.
    pub fn watchdog_ping(&mut self, pid: Pid, now: Instant) {
        let every = self.policy.watchdog;
        if let Some(Worker { life: Life::Up { watchdog_at, .. }, .. }) = self.workers.get_mut(&pid)
        {
            *watchdog_at = every.map(|d| now + d);
        }
    }

    /// `STOPPING=1` from a worker: it retires by itself; its slot gets a new worker now (slot
    /// 0 once it is gone), and SIGKILL comes at `graceful_timeout` if it lingers.
    pub fn retiring(&mut self, pid: Pid, now: Instant) -> bool {
        let grace = self.policy.graceful_timeout;
        let Some(w) = self.workers.get_mut(&pid) else { return false };
        if !w.live() {
            return false;
        }
        w.life = Life::Stopping { why: StopCause::Retiring, grace: Grace::Until(now + grace) };
        true
    }

    /// Stops every worker: gracefully or fast, by the rule of [`Plan::new`] with
    /// `graceful_timeout`. A fast stop during a graceful one hurries the workers already
    /// stopping ([`Grace::hasten`]).
    pub fn stop(&mut self, fast: bool, now: Instant) {
        match self.stage {
            Stage::Stopping { fast: true } => return,
            Stage::Stopping { fast: false } if !fast => return,
            _ => {}
        }
        self.stage = Stage::Stopping { fast };
        if !fast {
            return;
        }
        let plan = Plan::fast(self.policy.graceful_timeout);
        for (&pid, w) in self.workers.iter_mut() {
            if let Life::Stopping { grace, why } = &mut w.life {
                if grace.hasten(plan, now) {
                    let (slot, signal, why) = (w.slot, plan.signal, *why);
                    self.pending.push(Action::Signal { pid, slot, signal, why });
                }
            }
        }
    }

    /// Replaces the live worker of `slot` (`presup restart SLOT`): its replacement starts and
    /// it is retired once that one is up, as in a reload. False if the slot is not wanted.
    pub fn restart_slot(&mut self, slot: usize) -> bool {
        if slot >= self.target || matches!(self.stage, Stage::Stopping { .. }) {
            return false;
        }
        let generation = self.generation;
        for w in self.workers.values_mut() {
            if w.slot == slot && w.live() && w.generation == generation {
                w.superseded = true;
            }
        }
        true
    }

    /// Whether `slot` has an up worker of the current generation that is not to be replaced.
    pub fn slot_up(&self, slot: usize) -> Option<Pid> {
        let generation = self.generation;
        self.workers
            .iter()
            .find(|(_, w)| w.slot == slot && w.current(generation) && w.up())
            .map(|(p, _)| *p)
    }

    /// Forking a worker failed for want of resources (EAGAIN at the process limit, ENOMEM,
    /// EMFILE): no worker is spawned, in any slot, for the returned wait, which doubles with
    /// each such failure in a row (`restart_backoff`'s `initial` up to `max`) until a fork
    /// succeeds. Not a boot failure of the slot: the same fork may succeed a moment later.
    pub fn fork_failed(&mut self, now: Instant) -> Duration {
        self.fork_failures = self.fork_failures.saturating_add(1);
        let wait = crate::backoff::delay(&self.policy.backoff, self.fork_failures);
        self.forks_paused_until = Some(now + wait);
        wait
    }

    /// Whether spawns wait for the pool's fork backoff at `now`.
    pub fn forks_paused(&self, now: Instant) -> bool {
        self.forks_paused_until.is_some_and(|until| until > now)
    }

    /// A worker was forked for `slot` of `generation`.
    pub fn spawned(&mut self, slot: usize, generation: u64, pid: Pid, now: Instant) {
        self.slot(slot).requested = None;
        self.fork_failures = 0;
        self.forks_paused_until = None;
        let wait =
            if self.policy.notify { self.policy.boot_timeout } else { self.policy.min_uptime };
        let worker = Worker {
            slot,
            generation,
            started: now,
            stop_signal: self.policy.stop_signal,
            life: Life::Starting { deadline: now + wait },
            superseded: false,
        };
        self.workers.insert(pid, worker);
    }

    /// Forking or exec'ing a worker for `slot` failed: a boot failure.
    pub fn spawn_failed(&mut self, slot: usize, why: String, now: Instant) {
        self.slot(slot).requested = None;
        let status = ExitStatus::NotStarted(why);
        self.record_failure(slot, status.clone(), now, now, true);
        if self.rollout.is_some() {
            self.roll_back(slot, status);
        }
    }

    /// A worker sent `READY=1`. Returns whether that made it up.
    pub fn notified_ready(&mut self, pid: Pid, now: Instant) -> bool {
        let Some(w) = self.workers.get_mut(&pid) else { return false };
        if !matches!(w.life, Life::Starting { .. }) {
            return false;
        }
        w.life = Life::Up { watchdog_at: self.policy.watchdog.map(|d| now + d) };
        let slot = w.slot;
        self.slot(slot).boot_failures = 0;
        true
    }

    /// A child was reaped. `None` if it was not one of the workers.
    pub fn exited(&mut self, pid: Pid, status: ExitStatus, now: Instant) -> Option<Ended> {
        if self.workers.get(&pid)?.life == Life::Draining {
            return None;
        }
        let w = self.workers.remove(&pid)?;
        // A worker that retired by itself (STOPPING=1) had no signal sent to its group: what
        // it leaves behind was not asked to finish, so it goes at once, as after a crash.
        let group_grace = match w.life {
            Life::Stopping { why: StopCause::Retiring, .. } => None,
            Life::Stopping { grace, .. } => grace.kill_at(),
            _ => None,
        };
        let cause = match w.life {
            Life::Starting { .. } | Life::Stopping { why: StopCause::BootTimeout, .. } => {
                Cause::BootFailure
            }
            Life::Up { .. } => Cause::Crash,
            Life::Stopping { why, grace } => Cause::Stopped { why, killed: grace.killed() },
            Life::Draining => unreachable!("a draining worker was reaped before"),
        };
        let watchdog = matches!(cause, Cause::Stopped { why: StopCause::Watchdog, .. });
        if watchdog || !matches!(cause, Cause::Stopped { .. }) {
            let boot = cause == Cause::BootFailure;
            self.record_failure(w.slot, status.clone(), w.started, now, boot);
        }
        if cause == Cause::BootFailure && w.generation == self.generation && self.rollout.is_some()
        {
            self.roll_back(w.slot, status.clone());
        }
        let restart_in = self.needs_spawn(w.slot).then(|| {
            let at = self.slots.get(w.slot).and_then(|s| s.not_before).unwrap_or(now);
            at.saturating_duration_since(now)
        });
        Some(Ended {
            pid,
            slot: w.slot,
            generation: w.generation,
            status,
            uptime: now.saturating_duration_since(w.started),
            cause,
            restart_in,
            group_grace,
        })
    }

    /// The process group of the worker of `exit` outlives it: its slot gets no new worker
    /// until [`Pool::group_gone`] (and the pool is not done while it drains).
    pub fn group_outlives(&mut self, exit: &Ended, now: Instant) {
        let worker = Worker {
            slot: exit.slot,
            generation: exit.generation,
            started: now,
            stop_signal: self.policy.stop_signal,
            life: Life::Draining,
            superseded: false,
        };
        self.workers.insert(exit.pid, worker);
    }

    /// The process group `pgid` of a reaped worker is empty (or given up on): its slot may
    /// start again. Returns the slot, if it was a worker's.
    pub fn group_gone(&mut self, pgid: Pid) -> Option<usize> {
        match self.workers.get(&pgid) {
            Some(w) if w.life == Life::Draining => self.workers.remove(&pgid).map(|w| w.slot),
            _ => None,
        }
    }

    /// The slot must wait before a spawn: the group of its last worker is still draining, or
    /// (slot 0) any process of an old worker is left.
    fn blocked(&self, slot: usize) -> bool {
        let mut ws = self.in_slot(slot);
        if slot == 0 {
            ws.next().is_some()
        } else {
            ws.any(|w| w.life == Life::Draining)
        }
    }

    fn record_failure(
        &mut self,
        slot: usize,
        status: ExitStatus,
        started: Instant,
        now: Instant,
        boot: bool,
    ) {
        let policy = self.policy.backoff;
        let s = self.slot(slot);
        s.not_before = Some(s.backoff.record_death(&policy, started, now));
        if boot {
            s.boot_failures += 1;
        }
        s.last_failure = Some(status);
    }

    fn slot(&mut self, slot: usize) -> &mut Slot {
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, Slot::default);
        }
        &mut self.slots[slot]
    }

    /// The slot is wanted and has no live worker of the current generation.
    fn needs_spawn(&self, slot: usize) -> bool {
        !matches!(self.stage, Stage::Stopping { .. })
            && slot < self.target
            && self.slots.get(slot).map_or(true, |s| s.requested.is_none())
            && !self.in_slot(slot).any(|w| w.live() && w.current(self.generation))
    }

    fn in_slot(&self, slot: usize) -> impl Iterator<Item = &Worker> {
        self.workers.values().filter(move |w| w.slot == slot)
    }

    /// The nearest instant at which `step` has something to do, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.life {
            Life::Starting { deadline } => Some(deadline),
            Life::Up { watchdog_at, .. } => watchdog_at,
            Life::Stopping { grace, .. } => grace.kill_at(),
            _ => None,
        });
        // A blocked slot waits for an event (a reaping), not for its backoff instant; a pause
        // of every fork (out of processes) holds back every slot.
        let paused = self.forks_paused_until;
        let held = self.held;
        let slots = (0..self.target)
            .filter(|_| !held)
            .filter(|&s| self.needs_spawn(s) && !self.blocked(s))
            .filter_map(|s| self.slots.get(s).and_then(|x| x.not_before).max(paused));
        workers.chain(slots).min()
    }

    /// Decides what to do at `now`.
    pub fn step(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = std::mem::take(&mut self.pending);
        self.expire(now, &mut actions);
        if let Some(failed) = self.boot_failure() {
            actions.push(failed);
            self.stage = Stage::Stopping { fast: false };
        }
        match self.stage {
            Stage::Stopping { fast } => self.stop_all(fast, now, &mut actions),
            Stage::Booting | Stage::Running => {
                self.stop_surplus(now, &mut actions);
                self.retire_replaced(now, &mut actions);
                self.spawn_missing(now, &mut actions);
                self.check_booted(&mut actions);
                self.check_rolled_out(&mut actions);
            }
        }
        actions
    }

    /// Starting workers whose deadline passed, and stopping ones due for SIGKILL.
    fn expire(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let notify = self.policy.notify;
        let watchdog = self.policy.watchdog;
        let mut came_up = Vec::new();
        for (&pid, w) in self.workers.iter_mut() {
            let slot = w.slot;
            match &mut w.life {
                Life::Starting { deadline } if *deadline <= now && !notify => {
                    let at = *deadline;
                    w.life = Life::Up { watchdog_at: watchdog.map(|d| at + d) };
                    came_up.push(slot);
                }
                Life::Up { watchdog_at: Some(at) } if *at <= now => {
                    let (why, plan) = (StopCause::Watchdog, WATCHDOG_PLAN);
                    w.life = Life::Stopping { why, grace: plan.begin(now) };
                    actions.push(Action::Signal { pid, slot, signal: plan.signal, why });
                }
                // Not up in time: a boot failure, killed at once.
                Life::Starting { deadline } if *deadline <= now => {
                    let why = StopCause::BootTimeout;
                    w.life = Life::Stopping { why, grace: Grace::Killed };
                    actions.push(Action::Signal { pid, slot, signal: Signal::SIGKILL, why });
                }
                Life::Stopping { why, grace } if grace.due(now) => {
                    *grace = Grace::Killed;
                    let why = *why;
                    actions.push(Action::Signal { pid, slot, signal: Signal::SIGKILL, why });
                }
                _ => {}
            }
        }
        for slot in came_up {
            self.slot(slot).boot_failures = 0;
        }
    }

    /// Sends a live worker the signal of `plan`; SIGKILL at the end of its grace.
    fn begin_stop(&mut self, pid: Pid, why: StopCause, plan: Plan, now: Instant) -> Option<Action> {
        let w = self.workers.get_mut(&pid)?;
        if !w.live() {
            return None;
        }
        w.life = Life::Stopping { why, grace: plan.begin(now) };
        Some(Action::Signal { pid, slot: w.slot, signal: plan.signal, why })
    }

    /// The graceful plan of the worker `pid`: its own stop signal, the current
    /// `graceful_timeout`.
    fn graceful(&self, pid: Pid) -> Plan {
        let signal = self.workers.get(&pid).map_or(self.policy.stop_signal, |w| w.stop_signal);
        Plan::new(false, signal, self.policy.graceful_timeout)
    }

    fn stop_all(&mut self, fast: bool, now: Instant, actions: &mut Vec<Action>) {
        let live: Vec<Pid> =
            self.workers.iter().filter(|(_, w)| w.live()).map(|(p, _)| *p).collect();
        for pid in live {
            let plan =
                if fast { Plan::fast(self.policy.graceful_timeout) } else { self.graceful(pid) };
            actions.extend(self.begin_stop(pid, StopCause::Shutdown, plan, now));
        }
    }

    /// Live workers in slots at or above the target, highest slot first.
    fn stop_surplus(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let mut surplus: Vec<(usize, Pid)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.live() && w.slot >= self.target)
            .map(|(p, w)| (w.slot, *p))
            .collect();
        surplus.sort_by(|a, b| b.cmp(a));
        for (_, pid) in surplus {
            actions.extend(self.begin_stop(pid, StopCause::Surplus, self.graceful(pid), now));
        }
    }

    /// Old-generation workers whose slot has an up worker of the current generation.
    fn retire_replaced(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let old: Vec<Pid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.live() && !w.current(self.generation))
            .filter(|(_, w)| self.in_slot(w.slot).any(|n| n.current(self.generation) && n.up()))
            .map(|(p, _)| *p)
            .collect();
        for pid in old {
            actions.extend(self.begin_stop(pid, StopCause::Retired, self.graceful(pid), now));
        }
    }

    /// Spawns what the wanted state lacks: slots 1.. first, then slot 0 once the others have
    /// proved the generation; at most `reload_batch` slots replaced at once.
    fn spawn_missing(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.forks_paused(now) || self.held {
            return;
        }
        let mut replacing = (1..self.target).filter(|&s| self.is_replacing(s)).count();
        for slot in (1..self.target).chain([0]) {
            if !self.needs_spawn(slot)
                || self.slots.get(slot).and_then(|s| s.not_before).is_some_and(|t| t > now)
            {
                continue;
            }
            let has_old = self.in_slot(slot).any(|w| !w.current(self.generation));
            if slot != 0 && self.blocked(slot) {
                continue;
            }
            if slot == 0 {
                if !self.primary_may_spawn(now, actions) {
                    continue;
                }
            } else if has_old && self.in_slot(slot).any(|w| w.live()) {
                if replacing >= self.policy.reload_batch {
                    continue;
                }
                replacing += 1;
            }
            actions.push(Action::Spawn { slot, generation: self.generation });
        }
    }

    /// A slot whose old worker still serves while its new one is starting.
    fn is_replacing(&self, slot: usize) -> bool {
        let mut ws = self.in_slot(slot);
        let new_starting = self
            .in_slot(slot)
            .any(|w| w.current(self.generation) && matches!(w.life, Life::Starting { .. }));
        new_starting && ws.any(|w| w.live() && !w.current(self.generation))
    }

    /// Slot 0 may get a new worker only when no process is left in it (nor in its old process
    /// group: a draining worker counts); an old live one is stopped first, once every other
    /// slot runs the current generation.
    fn primary_may_spawn(&mut self, now: Instant, actions: &mut Vec<Action>) -> bool {
        let old: Vec<Pid> =
            self.workers.iter().filter(|(_, w)| w.slot == 0).map(|(p, _)| *p).collect();
        if old.is_empty() {
            return true;
        }
        let others_done = (1..self.target).all(|s| {
            self.in_slot(s).all(|w| !w.live() || w.generation == self.generation)
                && self.in_slot(s).any(|w| w.generation == self.generation && w.up())
        });
        if others_done {
            for pid in old {
                actions.extend(self.begin_stop(pid, StopCause::Retired, self.graceful(pid), now));
            }
        }
        false
    }

    /// During the boot, a slot that failed to come up `boot_attempts` times in a row.
    fn boot_failure(&self) -> Option<Action> {
        if self.stage != Stage::Booting {
            return None;
        }
        let attempts = self.policy.boot_attempts;
        let (slot, s) = self
            .slots
            .iter()
            .enumerate()
            .take(self.target)
            .find(|(_, s)| s.boot_failures >= attempts)?;
        let last = s.last_failure.clone().unwrap_or(ExitStatus::Code(0));
        Some(Action::BootFailed { slot, attempts: s.boot_failures, last })
    }

    /// A reload is done once every slot runs an up worker of its generation and no older
    /// worker is live.
    fn check_rolled_out(&mut self, actions: &mut Vec<Action>) {
        if self.rollout.is_none() {
            return;
        }
        let all_new = (0..self.target)
            .all(|s| self.in_slot(s).any(|w| w.generation == self.generation && w.up()));
        let old_live = self.workers.values().any(|w| w.live() && w.generation != self.generation);
        if all_new && !old_live {
            self.rollout = None;
            actions.push(Action::ReloadDone { generation: self.generation });
        }
    }

    /// The boot is over once every slot has an up worker.
    fn check_booted(&mut self, actions: &mut Vec<Action>) {
        let all_up = (0..self.target)
            .all(|s| self.in_slot(s).any(|w| w.generation == self.generation && w.up()));
        if self.stage == Stage::Booting && all_up {
            self.stage = Stage::Running;
            actions.push(Action::Booted);
        }
    }
}

#[cfg(test)]
mod tests;
