//! What the master says: the `STATUS=` line systemd shows, the log lines of a child's exit,
//! the children's own `STATUS=` (rate-limited), notifications from strangers; and USR1, which
//! reopens the log file and tells the children that ask for it.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::groups::Owner;
use super::pool::{self, Cause, StopCause};
use super::singletons;
use super::{Master, Stage};
use crate::config;
use crate::notify::Message;

impl Master {
    /// The stop signal of a worker the master replaces, or the watchdog's SIGABRT.
    pub(super) fn log_worker_signal(&self, pid: Pid, slot: usize, signal: Signal, why: StopCause) {
        let (pid, sig) = (pid.as_raw(), signal.as_str());
        if why == StopCause::Retired || why == StopCause::Surplus {
            info!(slot, pid, signal = sig, reason = ?why, "stopping worker");
        } else if why == StopCause::Watchdog {
            let every = self.config.workers.watchdog.unwrap_or_default();
            let every = humantime::format_duration(every);
            warn!(slot, pid, signal = sig, "watchdog timeout: no WATCHDOG=1 within {every}");
        }
    }

    pub(super) fn reopen_logs(&mut self) {
        if let Err(e) = self.options.log_sink.reopen() {
            error!("USR1: cannot reopen the log file: {e}");
        }
        // Only to the children whose config asks for it (USR1's default action ends a process:
        // uvicorn, waitress and a plain script would die of it), and not to one still starting:
        // it may not have its handler yet (a boot failure, which would undo a reload).
        let wants = |forward: &[config::Signal]| forward.iter().any(|s| s.0 == Signal::SIGUSR1);
        let to_workers = wants(&self.config.workers.forward_signals);
        let workers = self
            .pool
            .workers()
            .filter(|_| to_workers)
            .filter(|(_, w)| !matches!(w.life, pool::Life::Starting { .. }))
            .map(|(pid, _)| pid);
        let singletons = self
            .singletons
            .entries()
            .iter()
            .filter(|e| wants(&e.spec.forward_signals))
            .filter(|e| !matches!(e.life, singletons::Life::Starting { .. }))
            .filter_map(|e| e.pid());
        let pids: Vec<Pid> = workers.chain(singletons).collect();
        info!(forwarded_to = pids.len(), "USR1: log reopened");
        for pid in pids {
            let _ = kill(pid, Signal::SIGUSR1);
        }
    }
    /// What `STATUS=` says: the counts, and what is under way.
    /// The workers' stem (`preload = true`) is not ready yet.
    fn stem_loading(&self) -> bool {
        self.config.workers.preload && self.stems.ready(self.pool.generation()).is_none()
    }

    /// What the workers said with `STATUS=`, for the summary: `; slot 0: "text"` (the lowest
    /// slot that said something), `(+N more)` when other slots said other things; each text cut
    /// at 60 characters, so the line stays a line.
    fn workers_say(&self) -> String {
        let mut said: Vec<(usize, &str)> = self
            .pool
            .workers()
            .filter_map(|(pid, w)| {
                let text = self.statuses.get(&pid)?.latest.as_str();
                (!text.is_empty()).then_some((w.slot, text))
            })
            .collect();
        said.sort();
        let Some(&(slot, text)) = said.first() else { return String::new() };
        let cut: String = text.chars().take(60).collect();
        let cut = if cut.len() < text.len() { format!("{cut}...") } else { cut };
        let others = said.iter().filter(|(_, t)| *t != text).count();
        if others == 0 && said.len() > 1 {
            format!("; workers: \"{cut}\"")
        } else if others == 0 {
            format!("; slot {slot}: \"{cut}\"")
        } else {
            format!("; slot {slot}: \"{cut}\" (+{others} more)")
        }
    }

    pub(super) fn status_line(&self) -> String {
        let (target, generation) = (self.pool.target(), self.pool.generation());
        let singletons = self.singletons.configured_count();
        let singletons_up = self.singletons.up_count();
        let workers_up = self
            .pool
            .workers()
            .filter(|(_, w)| w.generation == generation && w.up())
            .count()
            .min(target);
        let counts = format!(
            "{workers_up}/{target} workers, {singletons_up}/{singletons} singletons, generation {generation}"
        );
        match self.stage {
            Stage::OnStarting => "running the on_starting hooks".to_owned(),
            Stage::Singletons => format!("starting singletons: {singletons_up}/{singletons} ready"),
            Stage::Workers if self.stem_loading() => {
                format!("the stem loads the app: {counts}")
            }
            Stage::Workers => format!("starting workers: {counts}"),
            Stage::Running if self.pool.reloading() && self.stem_loading() => {
                format!("reloading: the new stem loads the app: {counts}")
            }
            Stage::Running if self.pool.reloading() || self.reload.waiting() => {
                format!("reloading: {counts}")
            }
            Stage::Running => {
                let said = self.workers_say();
                match self.reload.failure() {
                    Some(why) => format!("{counts}; {why}{said}"),
                    None => format!("{counts}{said}"),
                }
            }
            _ => match &self.failure {
                Some(e) => format!("stopping: {e}"),
                None => "stopping".to_owned(),
            },
        }
    }
    /// Logs the statuses held back by the rate limit whose interval is over.
    pub(super) fn flush_statuses(&mut self, now: Instant) {
        for (&pid, log) in &mut self.statuses {
            if let Some(n) = log.flush(now) {
                let slot = self.pool.workers().find(|(p, _)| *p == pid).map(|(_, w)| w.slot);
                let status = &log.latest;
                match n {
                    0 => info!(slot, pid = pid.as_raw(), %status, "status"),
                    n => info!(
                        slot,
                        pid = pid.as_raw(),
                        %status,
                        "status ({n} more changes in between not logged)"
                    ),
                }
            }
        }
    }
    /// A datagram from a process that is neither a worker nor a singleton: ignored, and said
    /// at WARN (at most one line per [`log_limit::REJECTED_EVERY`]), since it is most often a
    /// child's own child (`systemd-notify` without `--pid`) and its worker never becomes ready.
    pub(super) fn rejected_notification(&mut self, pid: Pid, messages: &[Message], now: Instant) {
        // Every one at debug level (which tests use as a barrier); WARN is rate-limited.
        debug!(pid = pid.as_raw(), "notification from a process that is not a child; ignored");
        let Some(held_back) = self.rejected_notifications.admit(now) else { return };
        let said: Vec<&str> = messages
            .iter()
            .map(|m| match m {
                Message::Ready => "READY=1",
                Message::Watchdog => "WATCHDOG=1",
                Message::Stopping => "STOPPING=1",
                Message::Status(_) => "STATUS=",
            })
            .collect();
        let said = if said.is_empty() { "nothing presup reads".to_owned() } else { said.join(" ") };
        let more = match held_back {
            0 => String::new(),
            n => format!(" ({n} more since the last such line not logged)"),
        };
        warn!(
            pid = pid.as_raw(),
            "notification ({said}) from pid {pid}, which is not a worker or singleton of this \
             master; ignored: a child's own process cannot speak for it (with systemd-notify, \
             pass --pid=$$ as root, or send from the child itself){more}"
        );
    }
    pub(super) fn owner_name(&self, owner: Owner) -> String {
        match owner {
            Owner::Worker { slot } => format!("worker of slot {slot}"),
            Owner::Singleton { index } => match self.singletons.entries().get(index) {
                Some(e) => format!("singleton {}", e.spec.name),
                None => "singleton".to_owned(),
            },
            Owner::Hook => "hook".to_owned(),
            Owner::Stem => "stem".to_owned(),
            Owner::Other => "child".to_owned(),
        }
    }

    /// A child's `STATUS=`: logged, at most once per the rate limit's interval.
    pub(super) fn child_status(
        &mut self,
        pid: Pid,
        slot: Option<usize>,
        status: &str,
        now: Instant,
    ) {
        let log = self.statuses.entry(pid).or_default();
        match log.update(status, now) {
            Some(0) => info!(slot, pid = pid.as_raw(), %status, "status"),
            Some(n) => info!(
                slot,
                pid = pid.as_raw(),
                %status,
                "status ({n} more changes in between not logged)"
            ),
            None => {}
        }
    }
}

pub(super) fn log_exit(exit: &pool::Ended) {
    let (slot, pid, generation) = (exit.slot, exit.pid.as_raw(), exit.generation);
    let uptime = format!("{:.3}s", exit.uptime.as_secs_f64());
    let status = &exit.status;
    match exit.cause {
        Cause::Stopped { killed: true, why } => {
            warn!(slot, pid, generation, %uptime, "worker {status} (presup's SIGKILL after the stop timeout, {why:?})")
        }
        Cause::Stopped { why, .. } => {
            info!(slot, pid, generation, %uptime, "worker {status} (stopped: {why:?})")
        }
        Cause::BootFailure => {
            warn!(slot, pid, generation, %uptime, "worker {status} before it was up (boot failure)")
        }
        Cause::Crash => warn!(slot, pid, generation, %uptime, "worker {status}"),
    }
    let died = matches!(exit.cause, Cause::Crash | Cause::BootFailure);
    if let (true, Some(d)) = (died, exit.restart_in) {
        info!(slot, "restart scheduled in {}", humantime::format_duration(round_ms(d)));
    }
}

pub(super) fn log_singleton_exit(name: &str, pid: Pid, exit: &singletons::Ended) {
    let (pid, status) = (pid.as_raw(), &exit.status);
    if exit.stopped {
        info!(singleton = %name, pid, "singleton {status} (stopped)");
    } else {
        warn!(singleton = %name, pid, "singleton {status}");
    }
    if let Some(d) = exit.restart_in {
        info!(singleton = %name, "restart scheduled in {}", humantime::format_duration(round_ms(d)));
    }
}

pub(super) fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// "once", "twice", "3 times".
pub(super) fn times(n: u32) -> String {
    match n {
        1 => "once".to_owned(),
        2 => "twice".to_owned(),
        n => format!("{n} times"),
    }
}
