//! The master's side of the control socket ([`crate::control`]): each request performed, and
//! the status it answers with (README, "Control"). What the status reports that the pure
//! decisions do not keep (restarts per slot, last exits, counters) is kept here, in
//! [`Ledger`], updated where the master reaps and reloads.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::unistd::Pid;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::pool::{self, Life};
use super::singletons;
use super::stems;
use super::stop::ExitStatus;
use super::{Master, Stage};
use crate::control::{self, Request, Scale};

/// How many finished restarts `status` lists.
const RESTARTS_KEPT: usize = 32;

/// What presup status reports beyond the live state.
#[derive(Debug)]
pub(super) struct Ledger {
    pub started: (Instant, SystemTime),
    /// Per slot: restarts (a death the master did not ask for) and the last exit.
    slots: BTreeMap<usize, Exits>,
    singletons: BTreeMap<String, Exits>,
    /// Worker exits by kind: crash, boot_failure, stopped, watchdog.
    worker_exits: [u64; 4],
    /// Hook runs by point and result.
    hook_runs: BTreeMap<(&'static str, &'static str), u64>,
    /// Restarts asked for and not finished yet, and the last finished ones.
    restarts: Vec<Restart>,
    restarts_done: VecDeque<u64>,
    next_restart: u64,
}

#[derive(Debug, Default)]
struct Exits {
    restarts: u64,
    last: Option<(ExitStatus, SystemTime)>,
}

#[derive(Debug)]
struct Restart {
    id: u64,
    what: Target,
    /// The process being replaced, if there was one.
    old: Option<Pid>,
}

#[derive(Debug)]
enum Target {
    Slot(usize),
    Singleton(String),
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger {
            started: (Instant::now(), SystemTime::now()),
            slots: BTreeMap::new(),
            singletons: BTreeMap::new(),
            worker_exits: [0; 4],
            hook_runs: BTreeMap::new(),
            restarts: Vec::new(),
            restarts_done: VecDeque::new(),
            next_restart: 1,
        }
    }

    /// A worker was reaped.
    pub fn worker_exit(&mut self, exit: &pool::Ended) {
        let kind = match exit.cause {
            pool::Cause::Crash => 0,
            pool::Cause::BootFailure => 1,
            pool::Cause::Stopped { why: pool::StopCause::Watchdog, .. } => 3,
            pool::Cause::Stopped { .. } => 2,
        };
        self.worker_exits[kind] += 1;
        let e = self.slots.entry(exit.slot).or_default();
        if kind != 2 {
            e.restarts += 1;
        }
        e.last = Some((exit.status.clone(), SystemTime::now()));
    }

    /// A singleton was reaped.
    pub fn singleton_exit(&mut self, name: &str, exit: &singletons::Ended) {
        let e = self.singletons.entry(name.to_owned()).or_default();
        if !exit.stopped {
            e.restarts += 1;
        }
        e.last = Some((exit.status.clone(), SystemTime::now()));
    }

    /// A hook run ended.
    pub fn hook_run(&mut self, point: &'static str, ok: bool) {
        *self.hook_runs.entry((point, if ok { "ok" } else { "failed" })).or_insert(0) += 1;
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// `then` as seconds since the epoch, from the master's clock pair.
fn unix_at(then: Instant, now: Instant) -> f64 {
    unix(SystemTime::now()) - now.saturating_duration_since(then).as_secs_f64()
}

fn exit_json(exit: &Option<(ExitStatus, SystemTime)>) -> Value {
    let Some((status, at)) = exit else { return Value::Null };
    let (code, signal) = match status {
        ExitStatus::Code(c) => (Some(*c), None),
        ExitStatus::Signal(s) => (None, Some(s.as_str())),
        ExitStatus::NotStarted(_) => (None, None),
    };
    json!({ "status": status.to_string(), "code": code, "signal": signal, "at_unix": unix(*at) })
}

impl Master {
    /// Accepts, reads and answers what the control socket has now.
    pub(super) fn control_io(&mut self) {
        let Some(control) = &mut self.control else { return };
        let found = control.on_ready(Instant::now());
        for uid in found.refused {
            warn!(uid, "control socket: a client of another user was refused");
        }
        for incoming in found.requests {
            let answer = match incoming.request {
                Request::Ping | Request::Status => self.perform(incoming.request),
                _ if incoming.read_only => control::error(
                    "permission denied: the children's user may only ask for ping and status",
                ),
                request => self.perform(request),
            };
            if let Some(control) = &mut self.control {
                control.answer(incoming.client, &answer);
            }
        }
    }

    fn perform(&mut self, request: Request) -> Value {
        let now = Instant::now();
        match request {
            Request::Ping => control::ok(json!({
                "pid": std::process::id(),
                "config": self.options.config_path.canonicalize().unwrap_or_else(|_| self.options.config_path.clone()),
                "version": env!("CARGO_PKG_VERSION"),
            })),
            Request::Status => control::ok(json!({ "status": self.status_json(now) })),
            Request::Reload => {
                info!("control: reload");
                match self.reload(now) {
                    Some(id) => control::ok(json!({ "reload": id })),
                    None => control::error("the master is stopping"),
                }
            }
            Request::Stop { fast } => {
                info!(fast, "control: stop");
                self.stop(fast, now);
                control::ok(json!({}))
            }
            Request::Scale(scale) => {
                if self.pool.target() == 0 {
                    return control::error("this master runs no workers (count = 0)");
                }
                if self.stage.stopping() {
                    return control::error("the master is stopping");
                }
                let target = self.pool.target() as i64;
                let n = match scale {
                    Scale::To(n) => n as i64,
                    Scale::By(d) => target.saturating_add(d),
                };
                if !(1..=crate::config::MAX_WORKERS as i64).contains(&n) {
                    return control::error(&format!(
                        "scale to {n}: the worker count goes from 1 to {}",
                        crate::config::MAX_WORKERS
                    ));
                }
                self.pool.set_target(n as usize);
                info!(workers = self.pool.target(), "control: scale");
                control::ok(json!({ "workers": self.pool.target() }))
            }
            Request::RestartSlot(slot) => {
                let old = self.pool.slot_up(slot).or_else(|| {
                    self.pool
                        .workers()
                        .find(|(_, w)| w.slot == slot && w.generation == self.pool.generation())
                        .map(|(p, _)| p)
                });
                if !self.pool.restart_slot(slot) {
                    return control::error(&format!(
                        "no slot {slot}: the master runs {} worker(s), slots 0 to {}",
                        self.pool.target(),
                        self.pool.target().saturating_sub(1)
                    ));
                }
                info!(slot, "control: restart");
                control::ok(json!({ "restart": self.ledger_restart(Target::Slot(slot), old) }))
            }
            Request::RestartSingleton(name) => {
                let entries = self.singletons.entries();
                let Some(index) =
                    entries.iter().position(|e| e.spec.name == name && e.configured())
                else {
                    let names: Vec<&str> = entries
                        .iter()
                        .filter(|e| e.configured())
                        .map(|e| e.spec.name.as_str())
                        .collect();
                    return control::error(&format!(
                        "no singleton {name:?} (there are: {})",
                        names.join(", ")
                    ));
                };
                let old = entries[index].pid();
                if !self.singletons.restart(index, now) {
                    return control::error("the master is stopping");
                }
                info!(singleton = %name, "control: restart");
                control::ok(json!({ "restart": self.ledger_restart(Target::Singleton(name), old) }))
            }
        }
    }

    fn ledger_restart(&mut self, what: Target, old: Option<Pid>) -> u64 {
        let id = self.ledger.next_restart;
        self.ledger.next_restart += 1;
        self.ledger.restarts.push(Restart { id, what, old });
        id
    }

    /// Marks the restarts that are over: the old process gone, a new one up.
    pub(super) fn check_restarts(&mut self) {
        if self.ledger.restarts.is_empty() {
            return;
        }
        let mut done = Vec::new();
        for r in &self.ledger.restarts {
            let finished = match &r.what {
                Target::Slot(slot) => {
                    let old_gone = r.old.map_or(true, |p| self.pool.workers().all(|(q, _)| q != p));
                    old_gone && self.pool.slot_up(*slot).is_some_and(|p| Some(p) != r.old)
                }
                Target::Singleton(name) => self.singletons.entries().iter().any(|e| {
                    e.spec.name == *name
                        && matches!(e.life, singletons::Life::Up { pid } if Some(pid) != r.old)
                }),
            };
            if finished || self.stage.stopping() {
                done.push(r.id);
            }
        }
        self.ledger.restarts.retain(|r| !done.contains(&r.id));
        for id in done {
            if self.ledger.restarts_done.len() == RESTARTS_KEPT {
                self.ledger.restarts_done.pop_front();
            }
            self.ledger.restarts_done.push_back(id);
        }
    }

    fn status_json(&self, now: Instant) -> Value {
        let uptime = |since: Instant| now.saturating_duration_since(since).as_secs_f64();
        let text = |pid: Pid| self.statuses.get(&pid).map(|s| s.latest.clone());
        let stage = match self.stage {
            Stage::OnStarting | Stage::Singletons | Stage::Workers => "starting",
            Stage::Running if self.pool.reloading() || self.reload.waiting() => "reloading",
            Stage::Running => "running",
            _ => "stopping",
        };
        let workers: Vec<Value> = self
            .pool
            .workers()
            .map(|(pid, w)| {
                let state = match w.life {
                    Life::Starting { .. } => "starting",
                    Life::Up { .. } => "up",
                    Life::Stopping { .. } => "stopping",
                    Life::Draining => "draining",
                };
                json!({
                    "slot": w.slot, "pid": pid.as_raw(), "generation": w.generation, "state": state,
                    "started_unix": unix_at(w.started, now), "uptime_seconds": uptime(w.started),
                    "status_text": text(pid),
                })
            })
            .collect();
        let slot_count =
            self.pool.target().max(self.ledger.slots.keys().next_back().map_or(0, |s| s + 1));
        let slots: Vec<Value> = (0..slot_count)
            .map(|slot| {
                let e = self.ledger.slots.get(&slot);
                json!({
                    "slot": slot,
                    "restarts": e.map_or(0, |e| e.restarts),
                    "last_exit": e.map_or(Value::Null, |e| exit_json(&e.last)),
                })
            })
            .collect();
        let singletons: Vec<Value> = self
            .singletons
            .entries()
            .iter()
            .filter(|e| e.configured() || e.pid().is_some())
            .map(|e| {
                let state = match e.life {
                    singletons::Life::Waiting { .. } => "waiting",
                    singletons::Life::Starting { .. } => "starting",
                    singletons::Life::Up { .. } => "up",
                    singletons::Life::Stopping { .. } => "stopping",
                    singletons::Life::Finished => "stopped",
                };
                let started = e.pid().and(e.started);
                let ledger = self.ledger.singletons.get(&e.spec.name);
                json!({
                    "name": e.spec.name, "pid": e.pid().map(Pid::as_raw), "state": state,
                    "started_unix": started.map(|s| unix_at(s, now)),
                    "uptime_seconds": started.map(uptime),
                    "restarts": ledger.map_or(0, |l| l.restarts),
                    "last_exit": ledger.map_or(Value::Null, |l| exit_json(&l.last)),
                    "status_text": e.pid().and_then(text),
                })
            })
            .collect();
        let stems: Vec<Value> = self
            .stems
            .stems()
            .map(|(pid, s)| {
                let state = match s.life {
                    stems::Life::Starting { .. } => "starting",
                    stems::Life::Ready => "ready",
                    stems::Life::Stopping { .. } => "stopping",
                };
                json!({
                    "pid": pid.as_raw(), "generation": s.generation, "state": state,
                    "uptime_seconds": uptime(s.started), "forks": s.forks, "pending": s.pending(),
                })
            })
            .collect();
        let hooks: Vec<Value> = self
            .runs
            .iter()
            .filter(|r| !r.is_done())
            .map(|r| {
                json!({
                    "point": r.point.name(),
                    "command": r.command().map(|c| c.join(" ")),
                    "pid": r.pid().map(Pid::as_raw),
                    "since_unix": r.pid().and(r.since).map(|s| unix_at(s, now)),
                })
            })
            .collect();
        let reload_json = |l: &super::reload::LastReload| {
            json!({
                "id": l.id, "generation": l.generation, "result": l.outcome.name(), "why": l.why,
                "errors": l.errors, "at_unix": unix(l.at),
            })
        };
        let last_reload = self.reload.last().map_or(Value::Null, reload_json);
        let reloads: Vec<Value> = self.reload.records.iter().map(reload_json).collect();
        let [crash, boot_failure, stopped, watchdog] = self.ledger.worker_exits;
        let [done, undone, rejected] = self.reload.counts;
        let hook_runs: Vec<Value> = self
            .ledger
            .hook_runs
            .iter()
            .map(|((point, result), n)| json!({ "point": point, "result": result, "count": n }))
            .collect();
        json!({
            "master": {
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "config": self.options.config_path.canonicalize().unwrap_or_else(|_| self.options.config_path.clone()),
                "started_unix": unix(self.ledger.started.1),
                "uptime_seconds": uptime(self.ledger.started.0),
                "generation": self.pool.generation(),
                "stage": stage,
                "status": self.status_line(),
                "workers_target": self.pool.target(),
                "preload": self.config.workers.preload,
                "runtime_dir": self.notify.dir(),
            },
            "workers": workers,
            "slots": slots,
            "singletons": singletons,
            "stems": stems,
            "hooks": hooks,
            "last_reload": last_reload,
            "reloads": reloads,
            "counters": {
                "worker_exits": { "crash": crash, "boot_failure": boot_failure, "stopped": stopped, "watchdog": watchdog },
                "reloads": { "done": done, "undone": undone, "rejected": rejected },
                "hook_runs": hook_runs,
            },
            "tickets": self.tickets.status_json(),
            "restarts_done": self.ledger.restarts_done,
        })
    }
}
