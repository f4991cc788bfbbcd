//! Performing the stems' decisions ([`super::stems`]): starting a stem, its messages, fork
//! requests and their answers, and what a stem's end means for the pool.
//!
//! A worker forked by a stem is the master's child (the stem forks twice, so the worker is
//! reparented to the master, a child subreaper): the one reaper sees it. Its pid comes twice,
//! from the stem's answer and from `waitpid`, in either order: a worker that died before its
//! pid was reported is held as *unclaimed* for [`UNCLAIMED_HOLD`] and accounted for when the
//! answer comes. A reported pid that is not a child of the master leading its own process
//! group is refused.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::killpg;
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::children::At;
use super::error::MasterError;
use super::report::round_ms;
use super::stems::{self, Ended, Failure, Request};
use super::stop::ExitStatus;
use super::Master;
use crate::procstat::Stat;
use crate::stem::{Channel, FromStem};

/// How long the exit of an unknown child is kept for a fork answer that may name it.
pub(super) const UNCLAIMED_HOLD: Duration = Duration::from_secs(5);

impl Master {
    /// The generation whose stem must run: the pool's, while workers run and are forked.
    pub(super) fn stem_wanted(&self) -> Option<u64> {
        let forks = self.config.workers.preload && self.pool.target() > 0;
        (forks && self.stage.runs_workers() && !self.stage.stopping())
            .then(|| self.pool.generation())
    }

    /// The other generations whose stems are kept: the one a reload would go back to, and any
    /// that still has live workers.
    fn stems_kept(&self) -> BTreeSet<u64> {
        if self.stage.stopping() {
            return BTreeSet::new();
        }
        let live = self.pool.workers().map(|(_, w)| w.generation);
        self.pool.settled_generation().into_iter().chain(live).collect()
    }

    pub(super) fn stems_deadline(&self) -> Option<Instant> {
        self.stems.next_deadline(self.stem_wanted())
    }

    pub(super) fn step_stems(&mut self, now: Instant) -> bool {
        let wanted = self.stem_wanted();
        let actions = self.stems.step(wanted, &self.stems_kept(), now);
        let busy = !actions.is_empty();
        for action in actions {
            match action {
                stems::Action::Spawn { generation } => self.spawn_stem(generation, now),
                stems::Action::Signal { pid, signal, why } => {
                    info!(pid = pid.as_raw(), signal = signal.as_str(), "stopping the stem: {why}");
                    let _ = killpg(pid, signal);
                }
            }
        }
        // The pool forks through the stem of its generation: spawns wait until it is ready.
        let held =
            self.config.workers.preload && self.stems.ready(self.pool.generation()).is_none();
        self.pool.hold_spawns(held);
        busy
    }

    fn spawn_stem(&mut self, generation: u64, now: Instant) {
        let command = self.config.workers.command.join(" ");
        let started = Channel::pair().map_err(|e| e.to_string()).and_then(|(channel, theirs)| {
            let count = self.pool.target();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
            let pid = self.children.stem(generation, count, &self.config, &self.listeners, fd);
            pid.map(|pid| (pid, channel)).map_err(|e| e.to_string())
        });
        match started {
            Ok((pid, channel)) => {
                self.watcher.watch(pid);
                info!(pid = pid.as_raw(), generation, "stem spawned: `{command}` loads the app");
                self.stems.spawned(generation, pid, now);
                self.stem_channels.insert(pid, channel);
            }
            Err(why) => {
                error!(generation, "cannot start the stem `{command}`: {why}");
                let failure = self.stems.spawn_failed(generation, why, now);
                self.stem_failed(failure, now);
            }
        }
    }

    /// A stem of `failure.generation` ended before it was ever ready.
    fn stem_failed(&mut self, failure: Failure, now: Instant) {
        let Failure { generation, why } = failure;
        if generation != self.pool.generation() || self.stems.was_ever_ready(generation) {
            if generation == self.pool.generation() {
                error!(generation, "the stem failed to start again: {why}; retried with backoff");
            }
            return;
        }
        if self.pool.reloading() {
            if let Some((failed, to)) = self.pool.abandon_reload() {
                let why = format!("reload to generation {failed} undone: its stem failed: {why}");
                self.rolled_back(failed, to, why, now);
            }
        } else if self.stage == super::Stage::Workers {
            let command = self.config.workers.command.join(" ");
            self.fail(MasterError::Stem { command, why }, now);
        }
    }

    /// Asks the stem of `generation` to fork the worker of `slot`.
    pub(super) fn request_fork(&mut self, slot: usize, generation: u64, now: Instant) {
        let Some((id, stem)) = self.stems.request(slot, generation, now) else {
            // Held spawns never get here; a stem that died meanwhile is restarted.
            debug!(slot, generation, "no ready stem for a fork request");
            return;
        };
        let at = At { slot, count: self.pool.target(), generation };
        let (env, pid_vars) = self.children.worker_env(at, &self.config, &self.listeners);
        let request = crate::stem::Request { id, slot, generation, env: &env, pid_vars: &pid_vars };
        match (request.encode(), self.stem_channels.get_mut(&stem)) {
            (Ok(packet), Some(channel)) => {
                channel.send(packet);
                self.pool.requested(slot, generation);
                debug!(slot, generation, id, stem = stem.as_raw(), "fork request sent");
            }
            (Err(why), _) => {
                self.stems.answered(stem, id, false);
                error!(slot, generation, "cannot start worker: {why}");
                self.pool.spawn_failed(slot, why, now);
            }
            (Ok(_), None) => {
                // Its socket is gone: the stem is killed, and spawns wait for the next one.
                self.stems.answered(stem, id, false);
                self.kill_stem_without_channel(stem);
            }
        }
    }

    /// Reads and writes what the stems' sockets allow now.
    pub(super) fn stem_io(&mut self) {
        let pids: Vec<Pid> = self.stem_channels.keys().copied().collect();
        for stem in pids {
            self.stem_read(stem);
            // A stem whose socket closed or failed serves no more: killed, and reaped as
            // usual (its exit status says why it ended; spawns wait for the next stem).
            if self.stem_channels.get(&stem).is_some_and(Channel::is_closed) {
                self.stem_channels.remove(&stem);
                self.kill_stem_without_channel(stem);
            }
        }
    }

    /// Flushes and reads stem `stem`'s socket, and acts on what it said.
    pub(super) fn stem_read(&mut self, stem: Pid) {
        let Some(channel) = self.stem_channels.get_mut(&stem) else { return };
        channel.flush();
        let got = channel.receive();
        let now = Instant::now();
        for message in got.messages {
            self.stem_message(stem, message, now);
        }
        if let Some(why) = got.broken {
            let why = format!("the stem broke the protocol: {why}");
            error!(pid = stem.as_raw(), "{why}; killing it");
            if let Some(stems::Action::Signal { pid, signal, .. }) = self.stems.broken(stem, why) {
                let _ = killpg(pid, signal);
            }
        }
    }

    fn kill_stem_without_channel(&mut self, stem: Pid) {
        if let Some(stems::Action::Signal { pid, signal, why }) = self.stems.lost_channel(stem) {
            debug!(pid = pid.as_raw(), "killing the stem: {why}");
            let _ = killpg(pid, signal);
        }
    }

    fn stem_message(&mut self, stem: Pid, message: FromStem, now: Instant) {
        match message {
            FromStem::Ready => {
                if self.stems.notified_ready(stem) {
                    let (generation, took) = self
                        .stems
                        .stems()
                        .find(|(p, _)| *p == stem)
                        .map(|(_, s)| (s.generation, now.saturating_duration_since(s.started)))
                        .unwrap_or_default();
                    let took = humantime::format_duration(round_ms(took));
                    info!(
                        pid = stem.as_raw(),
                        generation, "stem ready: the app is loaded (took {took})"
                    );
                }
            }
            FromStem::Refused(why) => {
                error!(pid = stem.as_raw(), "the stem refused to fork: {why}");
                self.stems.refused(stem, why);
            }
            FromStem::Forked { id, pid } => match self.stems.answered(stem, id, true) {
                Some(request) => self.worker_forked(request, pid, now),
                None => warn!(
                    stem = stem.as_raw(),
                    id,
                    pid = pid.as_raw(),
                    "the stem answered a request it was not sent; ignored"
                ),
            },
            FromStem::ForkFailed { id, error } => {
                if let Some(Request { slot, generation, .. }) = self.stems.answered(stem, id, false)
                {
                    error!(
                        slot,
                        generation, "cannot start worker: the stem could not fork: {error}"
                    );
                    self.pool.spawn_failed(slot, format!("the stem could not fork: {error}"), now);
                }
            }
            FromStem::Unknown(kind) => {
                debug!(stem = stem.as_raw(), "a stem message of unknown type `{kind}`; ignored")
            }
        }
    }

    /// The stem reported the pid of a worker it forked.
    fn worker_forked(&mut self, request: Request, pid: Pid, now: Instant) {
        let Request { slot, generation, .. } = request;
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < UNCLAIMED_HOLD;
        let held = self.unclaimed.iter().position(|(p, _, at)| *p == pid && fresh(at));
        if let Some(i) = held {
            // It died before its pid came: accounted for as spawned, then reaped.
            let (_, status, _) = self.unclaimed.remove(i);
            self.watcher.watch(pid);
            self.pool.spawned(slot, generation, pid, now);
            let raw = pid.as_raw();
            info!(slot, pid = raw, generation, by = "stem", "worker spawned (already ended)");
            self.replay_notifications(pid);
            self.reaped(pid, status, now);
            return;
        }
        let master = nix::unistd::getpid().as_raw();
        let ours =
            Stat::read(pid.as_raw()).is_some_and(|s| s.ppid == master && s.pgrp == pid.as_raw());
        if !ours || self.known_child(pid) {
            let why = format!(
                "the stem reported pid {pid}, which is not a new child of the master leading its own process group; refused"
            );
            error!(slot, generation, "{why}");
            self.pool.spawn_failed(slot, why, now);
            return;
        }
        self.watcher.watch(pid);
        info!(slot, pid = pid.as_raw(), generation, by = "stem", "worker spawned");
        self.pool.spawned(slot, generation, pid, now);
        self.replay_notifications(pid);
    }

    /// Whether `pid` is a child the master already accounts for: a worker, a stem, or a child
    /// whose group the watcher was told of (a singleton, a hook).
    fn known_child(&self, pid: Pid) -> bool {
        self.pool.workers().any(|(p, _)| p == pid)
            || self.watcher.watches(pid)
            || self.stems.contains(pid)
    }

    /// A datagram from a process the master does not know yet, while fork answers are due:
    /// a worker may say `READY=1` before its stem's answer is read. Held for
    /// [`UNCLAIMED_HOLD`] (at most 1024 senders); returns whether it was.
    pub(super) fn hold_notification(
        &mut self,
        pid: Pid,
        messages: &[crate::notify::Message],
        now: Instant,
    ) -> bool {
        // Held long enough and still nobody's: rejected after all, and logged as such.
        let (stale, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_notes)
            .into_iter()
            .partition(|(_, _, at)| now.saturating_duration_since(*at) >= UNCLAIMED_HOLD);
        self.early_notes = kept;
        for (sender, said, _) in stale {
            self.rejected_notification(sender, &said, now);
        }
        if !self.stems.requests_pending() || self.early_notes.len() >= 1024 {
            return false;
        }
        self.early_notes.push((pid, messages.to_vec(), now));
        true
    }

    /// The held datagrams of `pid`, now a known worker, handled in their order.
    fn replay_notifications(&mut self, pid: Pid) {
        let (mine, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.early_notes).into_iter().partition(|(p, ..)| *p == pid);
        self.early_notes = rest;
        for (_, messages, _) in mine {
            self.on_notify(pid, messages);
        }
    }

    /// Kills the children of the master that no one knows and that lead their own process
    /// group: after a stem died with fork requests unanswered, a worker it forked may have
    /// been reparented to the master without its pid ever being reported. Called when such a
    /// stem is reaped, and when an unknown child is reaped soon after (its middle process,
    /// whose worker is then the master's).
    pub(super) fn kill_strays(&mut self) {
        for pid in super::children::of(std::process::id()) {
            let known = self.known_child(pid)
                || Some(pid) == self.watcher.pid()
                || super::children::is_zombie(pid);
            let leads = Stat::read(pid.as_raw()).is_some_and(|s| s.pgrp == pid.as_raw());
            if !known && leads {
                warn!(
                    pid = pid.as_raw(),
                    "killing a worker its dead stem forked but never reported"
                );
                let _ = killpg(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// A reaped stem.
    pub(super) fn stem_exited(&mut self, pid: Pid, end: Ended, now: Instant) {
        self.stem_channels.remove(&pid);
        for &slot in &end.lost {
            self.pool.request_lost(slot);
        }
        if !end.lost.is_empty() {
            self.strays_until = Some(now + UNCLAIMED_HOLD);
            self.kill_strays();
        }
        let Ended { generation, status, uptime, was_ready, why, restart_in, .. } = end;
        let uptime = humantime::format_duration(round_ms(uptime));
        if !was_ready {
            let why = why.unwrap_or_else(|| match &status {
                ExitStatus::Code(_) | ExitStatus::Signal(_) => format!(
                    "the stem {status} before it was ready (its stderr, above, says why: the \
                     Python traceback of an import error, say)"
                ),
                other => other.to_string(),
            });
            error!(pid = pid.as_raw(), generation, %uptime, "stem failed: {why}");
            self.stem_failed(Failure { generation, why }, now);
            return;
        }
        let again = restart_in.map(|d| humantime::format_duration(round_ms(d)).to_string());
        match (why, again) {
            (_, None) => info!(pid = pid.as_raw(), generation, %uptime, "stem exited ({status})"),
            (Some(why), Some(again)) => {
                warn!(pid = pid.as_raw(), generation, %uptime, "stem ended ({status}): {why}; running workers keep serving; a new stem in {again}")
            }
            (None, Some(again)) => {
                warn!(pid = pid.as_raw(), generation, %uptime, "stem exited ({status}); running workers keep serving; a new stem in {again}")
            }
        }
    }

    /// A reaped child nobody claims, while fork answers are due: it may be a worker whose pid
    /// is on its way. Returns whether it was held.
    pub(super) fn hold_unclaimed(&mut self, pid: Pid, status: &ExitStatus, now: Instant) -> bool {
        self.unclaimed.retain(|(_, _, at)| now.saturating_duration_since(*at) < UNCLAIMED_HOLD);
        if !self.stems.requests_pending() || self.unclaimed.len() >= 1024 {
            return false;
        }
        self.unclaimed.push((pid, status.clone(), now));
        true
    }
}
