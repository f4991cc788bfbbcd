//! The master: one thread, one `poll` loop, one reaper. This module holds the [`Master`], its
//! loop and the dispatch of events; the rest lives beside it:
//!
//! - [`startup`] acquires what the master holds, in order, then runs the loop ([`run`]);
//! - [`stage`]: where the master is in its life, from `on_starting` to the final sweep;
//! - the pure decisions, stepped at made-up instants: [`pool`] (workers), [`singletons`],
//!   [`hooks`], [`groups`] (what is left of a reaped child's process group), [`stop`] (how a
//!   child is stopped, and how it ended);
//! - their performing: [`hook_runs`], [`leftovers`], [`reload`] (HUP, and its undoing);
//! - [`report`]: the `STATUS=` line and the log lines of exits; [`error`]: [`MasterError`].
//!
//! The loop steps what the current [`Stage`] allows and performs the actions, moves to the
//! next stage when the current one is over, then sleeps in `poll` until a signal, a child's
//! notification or the nearest deadline (none when idle: an idle master sleeps until something
//! happens).

mod children;
mod control_runs;
mod error;
pub mod groups;
mod hook_runs;
pub mod hooks;
mod leftovers;
mod log_limit;
pub mod pool;
mod reload;
mod report;
pub mod singletons;
mod stage;
mod startup;
mod stem_runs;
pub mod stems;
pub mod stop;

pub use crate::exit::Exit;
pub use error::MasterError;
pub use startup::run;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::listener::Listener;
use crate::logs::Sink;
use crate::notify::{Message, NotifySocket};
use crate::pidfile::Pidfile;
use crate::signals::{Event, Signals};
use crate::systemd;
use crate::ticket::Tickets;
use crate::watcher::Watcher;
use groups::{Groups, Owner};
use hooks::{HookRun, Point};
use log_limit::{LogLimit, StatusLog};
use pool::Pool;
use reload::Reload;
use report::{log_exit, log_singleton_exit, round_ms};
use singletons::Singletons;
use stage::Stage;
use stems::Stems;
use stop::{ExitStatus, FAST_STOP_GRACE};

/// How the master was started: where its config lives and how to re-read it, and whether its
/// workers are forked from this program ([`crate::prefork`]) instead of exec'd.
pub struct Options {
    pub config_path: PathBuf,
    pub log_sink: Sink,
    pub in_process: Option<InProcess>,
}

pub use crate::worker::InProcess;

struct Master {
    config: Config,
    options: Options,
    stage: Stage,
    listeners: Vec<Listener>,
    pool: Pool,
    singletons: Singletons,
    /// Hook runs under way (the finished ones are dropped).
    runs: Vec<HookRun>,
    /// The reload under way, if any, and the last one's failure.
    reload: Reload,
    systemd: systemd::Notifier,
    children: children::Inheritance,
    signals: Signals,
    notify: NotifySocket,
    /// The tickets' files, mapped ([`crate::ticket`]).
    tickets: Tickets,
    /// The last `STATUS=` each child sent, and what of it was logged.
    statuses: BTreeMap<Pid, StatusLog>,
    /// How often a notification from a process that is not a child is logged.
    rejected_notifications: LogLimit,
    pidfile: Option<Pidfile>,
    /// Why the master is stopping, when it is a failure: its exit code once all is stopped.
    failure: Option<MasterError>,
    /// Leftover processes already sent SIGKILL by the sweep.
    swept: BTreeSet<Pid>,
    /// Process groups of reaped children that still have members.
    groups: Groups,
    /// Told of every child's process group; kills them if the master is killed.
    watcher: Watcher,
    /// The stems (`preload = true`), and the master's end of each one's socket.
    stems: Stems,
    stem_channels: BTreeMap<Pid, crate::stem::Channel>,
    /// Reaped children nobody claimed while fork answers were due: a worker whose pid the
    /// stem has not reported yet ([`stem_runs::UNCLAIMED_HOLD`]).
    unclaimed: Vec<(Pid, ExitStatus, Instant)>,
    /// The control socket (`presup status`, ...), and what it reports beyond the live state.
    control: Option<crate::control::Control>,
    ledger: control_runs::Ledger,
}

impl Master {
    fn run_loop(&mut self) -> Result<(), MasterError> {
        loop {
            self.perform_due_actions();
            self.systemd.tick(Instant::now());
            let status = self.status_line();
            self.systemd.status(status);
            if self.stage == Stage::Done {
                info!("master stopped");
                return self.failure.take().map_or(Ok(()), Err);
            }
            // A failure of poll itself ends the master at once (logged here, once).
            self.wait().inspect_err(|e| error!("{e}"))?;
            for (event, count) in self.signals.drain() {
                self.on_signal(event, count);
            }
            for (pid, messages) in self.notify.drain() {
                self.on_notify(pid, messages);
            }
            self.stem_io();
            self.control_io();
        }
    }

    /// Steps everything the stage allows until nothing more is due right now.
    fn perform_due_actions(&mut self) {
        self.flush_statuses(Instant::now());
        self.check_restarts();
        loop {
            let now = Instant::now();
            let mut busy = self.step_groups(now);
            busy |= self.step_hooks(now);
            if self.stage.runs_singletons() {
                busy |= self.step_singletons(now);
            }
            if self.stage.runs_workers() {
                busy |= self.step_stems(now);
                busy |= self.step_pool(now);
            }
            busy |= self.advance(now);
            if !busy {
                return;
            }
        }
    }

    /// Moves to the next stage when the current one is over; true if it moved.
    fn advance(&mut self, now: Instant) -> bool {
        let stage = self.stage;
        let next = match stage {
            Stage::OnStarting if self.runs.iter().all(|r| r.point != Point::OnStarting) => {
                Stage::Singletons
            }
            Stage::StoppingWorkers if self.pool.is_done() && self.stems.is_empty() => {
                // A fast stop (INT/QUIT) of the workers is a fast stop of the singletons too.
                let fast = self.pool.stage() == pool::Stage::Stopping { fast: true };
                self.singletons.stop(fast, now);
                Stage::StoppingSingletons
            }
            // on_exit is the last word: it waits for the hooks still running (the worker_exit
            // of the last workers, say), each bounded by its timeout.
            Stage::StoppingSingletons if self.singletons.is_done() && self.runs.is_empty() => {
                // Every way out of a master that reached on_starting (configured or not).
                self.start_hooks(Point::OnExit, vec![], now);
                Stage::OnExit
            }
            Stage::OnExit if self.runs.is_empty() => Stage::Sweep,
            // Killing an orphan can reparent its own children to the master: sweep again on
            // every wake-up until none is left.
            Stage::Sweep if !self.kill_orphans() => Stage::Done,
            _ => return false,
        };
        debug!(from = ?self.stage, to = ?next, "stage");
        self.stage = next;
        true
    }

    /// Begins the way out: workers first, then singletons, then `on_exit`.
    fn stop(&mut self, fast: bool, now: Instant) {
        if self.stage == Stage::OnStarting {
            for run in &mut self.runs {
                if let Some(pid) = run.abandon() {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
            }
        }
        if fast {
            // Hooks other than on_exit are not waited for in a fast stop.
            for run in self.runs.iter_mut().filter(|r| r.point != Point::OnExit) {
                if let Some(pid) = run.abandon() {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
            }
        }
        if fast {
            // What is left of a stopped child's group had the child's grace: a fast stop
            // shortens it as it does the live children's.
            for pgid in self.groups.hasten(now + FAST_STOP_GRACE) {
                if self.signal_draining(pgid, Signal::SIGQUIT) {
                    info!(
                        pgid = pgid.as_raw(),
                        "fast stop: SIGQUIT to what is left of a process group, SIGKILL in {}s",
                        FAST_STOP_GRACE.as_secs()
                    );
                }
            }
        }
        self.pool.stop(fast, now);
        // Singletons not yet booted have no workers to outlive: they stop now (nothing more
        // of theirs starts); booted ones wait for the workers to be gone.
        let booted = !matches!(self.stage, Stage::OnStarting | Stage::Singletons);
        if self.stage == Stage::StoppingSingletons || !booted {
            self.singletons.stop(fast, now);
        }
        if !self.stage.stopping() {
            self.stage = Stage::StoppingWorkers;
            self.systemd.stopping(now);
        }
    }

    fn fail(&mut self, e: MasterError, now: Instant) {
        error!("{e}; stopping");
        self.failure.get_or_insert(e);
        self.stop(false, now);
    }

    /// Sleeps in `poll` until a signal, a notification or the nearest deadline.
    fn wait(&mut self) -> Result<(), MasterError> {
        let timeout = match self.next_deadline() {
            None => PollTimeout::NONE,
            Some(at) => {
                let d = at.saturating_duration_since(Instant::now());
                // Round up, so that a deadline is never polled for before it is due.
                let ms = d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = vec![
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
        ];
        // Messages the watcher's full pipe did not take yet.
        fds.extend(self.watcher.pending().map(|fd| PollFd::new(fd, PollFlags::POLLOUT)));
        if let Some(control) = &self.control {
            for (fd, out) in control.poll_fds() {
                let flags = if out { PollFlags::POLLOUT } else { PollFlags::POLLIN };
                fds.push(PollFd::new(fd, flags));
            }
        }
        for channel in self.stem_channels.values() {
            let out = if channel.wants_write() { PollFlags::POLLOUT } else { PollFlags::empty() };
            fds.push(PollFd::new(channel.as_fd(), PollFlags::POLLIN | out));
        }
        let polled = nix::poll::poll(&mut fds, timeout);
        drop(fds);
        self.watcher.flush();
        match polled {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(source) => Err(MasterError::Runtime { what: "poll", source }),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let runs = self.runs.iter().filter_map(HookRun::next_deadline);
        let singletons = self.stage.runs_singletons().then(|| self.singletons.next_deadline());
        let pool = self.stage.runs_workers().then(|| self.pool.next_deadline());
        let stems = self.stage.runs_workers().then(|| self.stems_deadline());
        // The sweep waits for SIGCHLD, with a fallback in case a child ignores nothing but
        // takes a moment to be reaped by the kernel.
        let sweep =
            (self.stage == Stage::Sweep).then(|| Instant::now() + Duration::from_millis(50));
        let systemd = self.systemd.next_deadline();
        let groups = self.groups.next_deadline();
        let statuses = self.statuses.values().filter_map(StatusLog::due);
        let control = self.control.as_ref().and_then(crate::control::Control::next_deadline);
        runs.chain(singletons.flatten())
            .chain(pool.flatten())
            .chain(stems.flatten())
            .chain(sweep)
            .chain(systemd)
            .chain(groups)
            .chain(statuses)
            .chain(control)
            .min()
    }

    // ---- singletons ----

    fn step_singletons(&mut self, now: Instant) -> bool {
        let actions = self.singletons.step(now);
        let busy = !actions.is_empty();
        for action in actions {
            match action {
                singletons::Action::Spawn { index } => {
                    let spec = &self.singletons.entries()[index].spec;
                    match self.children.singleton(spec, &self.config) {
                        Ok(pid) => {
                            self.watcher.watch(pid);
                            info!(singleton = %spec.name, pid = pid.as_raw(), "singleton spawned");
                            self.singletons.spawned(index, pid, now);
                        }
                        Err(e) => {
                            error!(singleton = %spec.name, "cannot start singleton: {e}");
                            self.singletons.spawn_failed(index, e.to_string(), now);
                        }
                    }
                }
                singletons::Action::Probe { index } => {
                    let ok = children::probe(&self.singletons.entries()[index].spec.ready);
                    self.singletons.probed(index, ok, now);
                }
                singletons::Action::Signal { index, pid, signal } => {
                    let name = &self.singletons.entries()[index].spec.name;
                    info!(singleton = %name, pid = pid.as_raw(), signal = signal.as_str(), "stopping singleton");
                    let _ = killpg(pid, signal);
                }
                singletons::Action::Up { index, pid } => {
                    let name = &self.singletons.entries()[index].spec.name;
                    info!(singleton = %name, pid = pid.as_raw(), "singleton ready");
                }
                singletons::Action::Booted => {
                    if self.stage == Stage::Singletons {
                        self.stage = Stage::Workers;
                    }
                }
                singletons::Action::BootFailed { index, why } => {
                    let name = self.singletons.entries()[index].spec.name.clone();
                    self.fail(MasterError::Singleton { name, why }, now);
                }
            }
        }
        busy
    }

    // ---- workers ----

    fn step_pool(&mut self, now: Instant) -> bool {
        let actions = self.pool.step(now);
        let busy = !actions.is_empty();
        for action in actions {
            match action {
                // After a fork failed for want of resources, the rest of the batch waits too.
                pool::Action::Spawn { .. } if self.pool.forks_paused(now) => {}
                pool::Action::Spawn { slot, generation } => {
                    self.spawn_worker(slot, generation, now)
                }
                pool::Action::Signal { pid, slot, signal, why } => {
                    self.log_worker_signal(pid, slot, signal, why);
                    // The group is gone if every process in it died: the reaper will tell.
                    let _ = killpg(pid, signal);
                }
                pool::Action::Booted => self.workers_booted(now),
                pool::Action::BootFailed { slot, attempts, last } => {
                    let command = match &self.options.in_process {
                        // A program built on presup::prefork: its workers are itself.
                        Some(_) => crate::worker::program_name(),
                        None => self.config.workers.command.join(" "),
                    };
                    self.fail(MasterError::Boot { command, slot, attempts, last }, now);
                }
                pool::Action::ReloadDone { generation } => self.reload_done(generation),
                pool::Action::RolledBack { failed, to, slot, status } => {
                    let why = format!(
                        "reload to generation {failed} undone: slot {slot} {status} before it was up"
                    );
                    self.rolled_back(failed, to, why, now)
                }
            }
        }
        busy
    }

    /// Every slot has an up worker: the master is running (systemd hears `READY=1`).
    fn workers_booted(&mut self, now: Instant) {
        let (workers, generation) = (self.pool.target(), self.pool.generation());
        let singletons = self.singletons.up_count();
        info!(workers, singletons, generation, "ready: all workers up");
        if self.stage == Stage::Workers {
            self.stage = Stage::Running;
            let status = self.status_line();
            self.systemd.ready(status);
            self.start_hooks(Point::WhenReady, vec![], now);
        }
    }

    /// Every fd of the master's own, which a worker forked without exec closes: the signalfd,
    /// the notification socket and its runtime directory's lock, systemd's socket, the pidfile,
    /// the watcher's pipe and the cgroup's `cgroup.procs`, the tickets' state-file locks. Not
    /// the log file: the worker's copy of the master's log subscriber writes through it (were
    /// it closed, a file the worker opens could take its number and get the log lines).
    fn own_fds(&self) -> Vec<RawFd> {
        let mut fds = self.signals.raw_fds().to_vec();
        fds.extend(self.notify.raw_fds());
        fds.extend(self.systemd.raw_fd());
        fds.extend(self.pidfile.as_ref().and_then(Pidfile::raw_fd));
        fds.extend(self.watcher.raw_fds());
        fds.extend(self.tickets.raw_fds());
        fds.extend(self.stem_channels.values().map(crate::stem::Channel::raw_fd));
        fds.extend(self.control.iter().flat_map(crate::control::Control::raw_fds));
        fds
    }

    fn spawn_worker(&mut self, slot: usize, generation: u64, now: Instant) {
        if self.config.workers.preload {
            return self.request_fork(slot, generation, now);
        }
        let count = self.pool.target();
        let at = children::At { slot, count, generation };
        let forked = self.options.in_process.as_ref().and_then(InProcess::worker);
        let result = match forked {
            None => self.children.worker(at, &self.config, &self.listeners),
            Some(worker) => {
                let close = self.own_fds();
                self.children.forked_worker(at, &self.config, &self.listeners, worker, &close)
            }
        };
        match result {
            Ok(pid) => {
                self.watcher.watch(pid);
                info!(slot, pid = pid.as_raw(), generation, "worker spawned");
                self.pool.spawned(slot, generation, pid, now);
            }
            Err(e) if children::out_of_resources(&e) => {
                let wait = humantime::format_duration(round_ms(self.pool.fork_failed(now)));
                warn!(
                    slot,
                    generation, "cannot start worker: {e}; every worker spawn waits {wait}"
                );
            }
            Err(e) => {
                error!(slot, generation, "cannot start worker: {e}");
                self.pool.spawn_failed(slot, e.to_string(), now);
            }
        }
    }

    // ---- events ----

    fn on_signal(&mut self, event: Event, count: u32) {
        let now = Instant::now();
        match event {
            Event::Chld => self.reap(),
            Event::Term => {
                info!("TERM: graceful stop");
                self.stop(false, now);
            }
            Event::Int | Event::Quit => {
                info!(signal = ?event, "fast stop");
                self.stop(true, now);
            }
            Event::Hup => {
                self.reload(now);
            }
            Event::Ttin | Event::Ttou if self.pool.target() == 0 => {
                warn!(signal = ?event, "this master runs no workers (count = 0); ignored");
            }
            Event::Ttin => {
                self.pool.set_target(self.pool.target() + count as usize);
                info!(workers = self.pool.target(), "TTIN: one worker more");
            }
            Event::Ttou => {
                self.pool.set_target(self.pool.target().saturating_sub(count as usize));
                info!(workers = self.pool.target(), "TTOU: one worker fewer");
            }
            Event::Usr1 => {
                self.reopen_logs();
                self.tickets.log_status();
            }
            Event::Usr2 => warn!("USR2 (binary upgrade) is not supported yet; ignored"),
        }
    }

    /// Datagrams on the notification socket, attributed by the kernel to their sender.
    fn on_notify(&mut self, pid: Pid, messages: Vec<Message>) {
        let slot = self.pool.workers().find(|(p, _)| *p == pid).map(|(_, w)| w.slot);
        let singleton = self.singletons.index_of(pid);
        let now = Instant::now();
        if slot.is_none() && singleton.is_none() {
            self.rejected_notification(pid, &messages, now);
            return;
        }
        for m in messages {
            match m {
                Message::Ready if slot.is_some() => {
                    if self.pool.notified_ready(pid, now) {
                        info!(slot, pid = pid.as_raw(), "worker up (READY=1)");
                    }
                }
                Message::Ready => {
                    self.singletons.notified_ready(pid);
                }
                Message::Status(status) => self.child_status(pid, slot, &status, now),
                Message::Watchdog => self.pool.watchdog_ping(pid, now),
                Message::Stopping => {
                    if self.pool.retiring(pid, now) {
                        info!(
                            slot,
                            pid = pid.as_raw(),
                            "worker retiring (STOPPING=1); its replacement starts"
                        );
                    }
                }
            }
        }
    }

    /// The one place that calls `waitpid`: reaps every child that has ended.
    fn reap(&mut self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid: {e}");
                    break;
                }
            };
            self.reaped(pid, status, Instant::now());
        }
        // Members of draining groups are reparented to the master: this may have emptied some.
        for pgid in self.groups.draining().collect::<Vec<_>>() {
            if killpg(pgid, None) == Err(Errno::ESRCH) {
                if let Some(owner) = self.groups.gone(pgid) {
                    self.release_group(pgid, owner, "is empty");
                }
            }
        }
    }

    /// What a reaped child was, and what its end means.
    fn reaped(&mut self, pid: Pid, status: ExitStatus, now: Instant) {
        self.statuses.remove(&pid);
        if let Some(exit) = self.pool.exited(pid, status.clone(), now) {
            log_exit(&exit);
            self.ledger.worker_exit(&exit);
            let owner = Owner::Worker { slot: exit.slot };
            if self.group_ended(pid, owner, exit.group_grace, now) {
                self.pool.group_outlives(&exit, now);
            }
            self.worker_exit_hooks(&exit, now);
        } else if let Some(exit) = self.singletons.exited(pid, status.clone(), now) {
            let name = &self.singletons.entries()[exit.index].spec.name;
            log_singleton_exit(name, pid, &exit);
            self.ledger.singleton_exit(name, &exit);
            let owner = Owner::Singleton { index: exit.index };
            if self.group_ended(pid, owner, exit.group_grace, now) {
                self.singletons.group_outlives(exit.index, pid);
            }
        } else if self.hook_exited(pid, &status, now) {
            self.group_ended(pid, Owner::Hook, None, now);
        } else if let Some(end) = self.stems.exited(pid, status.clone(), self.stem_wanted(), now) {
            self.group_ended(pid, Owner::Stem, None, now);
            self.stem_exited(pid, end, now);
        } else if self.watcher.watches(pid) {
            // A child the master started that no owner claims any more (one that forgot it
            // before it was reaped): its group still goes, as a crashed child's would.
            self.group_ended(pid, Owner::Other, None, now);
        } else if !self.watcher.exited(pid, &status.to_string())
            && !self.hold_unclaimed(pid, &status, now)
        {
            debug!(
                pid = pid.as_raw(),
                "reaped a process that is not a child of presup's ({status})"
            );
        }
    }
}
