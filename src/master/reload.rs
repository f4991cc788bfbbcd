//! The reload (HUP): the new config checked, its listeners bound, its `on_reload` hooks run,
//! then rolled out by the pool; undone (the last config that was fully rolled out restored)
//! when a worker of the new generation cannot come up. [`Reload`] owns what lives from the HUP
//! to the end of the rollout; the pool decides the rollout itself.

use std::time::Instant;

use tracing::{error, info, warn};

use super::{Master, Stage};
use crate::config::{self, Config};
use crate::listener::{BindError, Listener};
use crate::master::hooks::Point;
use crate::master::pool::Policy;

/// What a reload keeps from the HUP to the end of its rollout.
#[derive(Default)]
pub(super) struct Reload {
    /// A valid new config waiting for its `on_reload` hooks.
    pending: Option<Config>,
    /// While a reload rolls out: the last config fully rolled out, restored if it fails.
    rollback: Option<Config>,
    /// systemd was told `RELOADING=1` and waits for `READY=1`.
    notified: bool,
    /// Why the last reload was undone or rejected, until the next one (shown in `STATUS=`).
    failure: Option<String>,
    /// Listeners a reload removed, kept while the old workers may still serve on them and a
    /// rollback may need them back; closed when the reload is done or undone.
    retired_listeners: Vec<Listener>,
    /// Reloads asked for so far (HUP or `presup reload`): the last one's number.
    pub(super) seq: u64,
    /// The last reload and how it ended, for `presup status`.
    pub(super) last: Option<LastReload>,
    /// Reloads by how they ended: done, undone, rejected.
    pub(super) counts: [u64; 3],
}

/// How a reload ended, or that it is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    InProgress,
    Done,
    Undone,
    Rejected,
}

impl Outcome {
    pub(super) fn name(self) -> &'static str {
        match self {
            Outcome::InProgress => "in_progress",
            Outcome::Done => "done",
            Outcome::Undone => "undone",
            Outcome::Rejected => "rejected",
        }
    }
}

/// The last reload, for `presup status`.
#[derive(Debug, Clone)]
pub(super) struct LastReload {
    pub id: u64,
    /// The generation it started (none if rejected before).
    pub generation: Option<u64>,
    pub outcome: Outcome,
    pub why: Option<String>,
    pub errors: Vec<String>,
    pub at: std::time::SystemTime,
}

impl Reload {
    /// A reload is asked for: its number.
    fn begin(&mut self) -> u64 {
        self.seq += 1;
        self.last = Some(LastReload {
            id: self.seq,
            generation: None,
            outcome: Outcome::InProgress,
            why: None,
            errors: Vec::new(),
            at: std::time::SystemTime::now(),
        });
        self.seq
    }

    /// The last reload ended (`generation`: the one it had started, for a done or undone).
    fn ended(&mut self, outcome: Outcome, why: Option<String>, errors: Vec<String>) {
        let index = match outcome {
            Outcome::Done => 0,
            Outcome::Undone => 1,
            Outcome::Rejected => 2,
            Outcome::InProgress => return,
        };
        self.counts[index] += 1;
        if let Some(last) = &mut self.last {
            if last.outcome == Outcome::InProgress {
                last.outcome = outcome;
                last.why = why;
                last.errors = errors;
                last.at = std::time::SystemTime::now();
            }
        }
    }
}

impl Reload {
    /// A new config waits for its `on_reload` hooks.
    pub(super) fn waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Why the last reload was undone or rejected.
    pub(super) fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
}

impl Master {
    /// HUP: re-read the config; keep everything as it is if it is invalid.
    /// Returns the reload's number (for `presup reload --wait`), `None` while stopping.
    pub(super) fn reload(&mut self, now: Instant) -> Option<u64> {
        if self.stage.stopping() {
            return None;
        }
        let id = self.reload.begin();
        // systemd hears of reloads once it heard READY=1 (before, that READY=1 ends them too).
        if self.stage == Stage::Running && !self.reload.notified {
            self.reload.notified = true;
            self.systemd.reloading();
        }
        let launch = match self.options.in_process {
            Some(_) => config::Launch::Preload,
            None => config::Launch::Exec,
        };
        let mut new = match config::load_for_this_process(&self.options.config_path, launch) {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.errors {
                    error!("reload rejected: {e}");
                }
                error!(
                    generation = self.pool.generation(),
                    "HUP: the new config is invalid; keeping the running one"
                );
                let list = errors.errors.iter().map(ToString::to_string).collect();
                let why = format!("{} error(s) in the new config", errors.errors.len());
                self.reload_rejected(why, list);
                return Some(id);
            }
        };
        self.tickets.check_reload(&new.tickets);
        self.tickets.add_servers(&mut new);
        if new.control != self.config.control {
            warn!("the new config changes `control`: the control socket stays where it is until presup is restarted");
        }
        if let Some(control) = &self.control {
            crate::control::add_metrics_server(&mut new, control.path());
        }
        if let Err(e) = self.rebind(&new) {
            error!("reload rejected: {e}; keeping the running config");
            self.reload_rejected(e.to_string(), vec![e.to_string()]);
            return Some(id);
        }
        // The new config's on_reload hooks run before its workers replace the old ones.
        let on_reload = new.hooks.on_reload.clone();
        if !on_reload.is_empty() {
            self.reload.pending = Some(new);
            self.start_hook_run(Point::OnReload, on_reload, vec![], now);
        } else {
            self.apply_reload(new);
        }
        Some(id)
    }
    /// A HUP whose config was refused: nothing changed; a reload still rolling out goes on.
    fn reload_rejected(&mut self, why: String, errors: Vec<String>) {
        self.reload.ended(Outcome::Rejected, Some(why.clone()), errors);
        self.reload.failure = Some(format!("reload rejected: {why}"));
        if !self.pool.reloading() && self.reload.pending.is_none() {
            self.reload_settled();
        }
    }
    /// The reloads systemd was told of are over (done, undone or rejected).
    fn reload_settled(&mut self) {
        if std::mem::take(&mut self.reload.notified) {
            let status = self.status_line();
            self.systemd.ready(status);
        }
    }
    fn apply_reload(&mut self, new: Config) {
        self.pool.reload(new.workers.count, Policy::from_config(&new));
        self.singletons.reconfigure(&new.singleton, Instant::now());
        self.stems.reconfigure(&new.workers);
        let old = std::mem::replace(&mut self.config, new);
        // A reload superseding another keeps the last config that was fully rolled out.
        self.reload.rollback.get_or_insert(old);
        let generation = self.pool.generation();
        if let Some(last) = self.reload.last.as_mut().filter(|l| l.outcome == Outcome::InProgress) {
            last.generation = Some(generation);
        }
        info!(generation = self.pool.generation(), workers = self.pool.target(), "HUP: reloading");
    }
    /// Makes the listeners match `new`: an unchanged address keeps its socket (a retired one
    /// comes back), a new one is bound, a removed one is retired until the reload is over.
    fn rebind(&mut self, new: &Config) -> Result<(), BindError> {
        let held = |spec: &&config::Listen| {
            let mut all = self.listeners.iter().chain(&self.reload.retired_listeners);
            all.any(|l| l.address == spec.address)
        };
        // Bind first: a failure leaves the running listeners untouched.
        let fresh: Vec<Listener> = new
            .listen
            .iter()
            .filter(|spec| !held(spec))
            .map(Listener::bind)
            .collect::<Result<_, _>>()?;
        let mut fresh = fresh.into_iter();
        let mut old: Vec<Option<Listener>> = std::mem::take(&mut self.listeners)
            .into_iter()
            .chain(std::mem::take(&mut self.reload.retired_listeners))
            .map(Some)
            .collect();
        for spec in &new.listen {
            let kept =
                old.iter_mut().find(|l| l.as_ref().is_some_and(|l| l.address == spec.address));
            let mut l = match kept.and_then(Option::take) {
                Some(l) => l,
                None => fresh.next().expect("every new address was bound above"),
            };
            l.name = spec.name.clone();
            self.listeners.push(l);
        }
        self.reload.retired_listeners.extend(old.into_iter().flatten());
        Ok(())
    }

    /// Every `on_reload` run is over: the pending config is the last HUP's (a second HUP
    /// started its own run), and it applies unless a stop came meanwhile.
    pub(super) fn on_reload_done(&mut self) {
        if self.runs.iter().any(|r| r.point == Point::OnReload) {
            return;
        }
        if let Some(new) = self.reload.pending.take().filter(|_| !self.stage.stopping()) {
            self.apply_reload(new);
        }
    }

    /// Every slot runs the new generation.
    pub(super) fn reload_done(&mut self, generation: u64) {
        self.reload.rollback = None;
        self.reload.retired_listeners.clear();
        self.reload.failure = None;
        self.reload.ended(Outcome::Done, None, vec![]);
        info!(
            generation,
            workers = self.pool.target(),
            "reload done: every worker runs the new generation"
        );
        self.reload_settled();
    }

    /// Generation `failed` could not come up (`why`): the pool went back to generation `to`;
    /// the config, the listeners and the singletons follow.
    pub(super) fn rolled_back(&mut self, failed: u64, to: u64, why: String, now: Instant) {
        error!(generation = failed, "{why}; generation {to} keeps serving");
        self.reload.ended(Outcome::Undone, Some(why.clone()), vec![]);
        self.reload.failure = Some(why);
        if let Some(old) = self.reload.rollback.take() {
            if let Err(e) = self.rebind(&old) {
                error!("cannot restore the listeners of the running config: {e}");
            }
            // What is left are the failed config's own new listeners.
            self.reload.retired_listeners.clear();
            self.singletons.reconfigure(&old.singleton, now);
            self.stems.reconfigure(&old.workers);
            self.config = old;
        }
        self.reload_settled();
    }
}
