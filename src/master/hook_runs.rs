//! The master's side of the hooks: it starts the runs of a hook point, spawns their commands,
//! kills one past its timeout, and hears how each ended. The runs' decisions (order, retries,
//! timeouts) are in [`super::hooks`].

use std::time::Instant;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::hooks::{self, Ended, HookRun, Point};
use super::pool;
use super::stop::ExitStatus;
use super::{Master, MasterError};
use crate::config;

impl Master {
    /// Starts a run of `point`'s hooks of the running config.
    pub(super) fn start_hooks(&mut self, point: Point, env: Vec<(String, String)>, now: Instant) {
        let hooks = point.hooks(&self.config.hooks).to_vec();
        self.start_hook_run(point, hooks, env, now);
    }
    pub(super) fn start_hook_run(
        &mut self,
        point: Point,
        hooks: Vec<config::Hook>,
        env: Vec<(String, String)>,
        now: Instant,
    ) {
        if !hooks.is_empty() {
            info!(hook = point.name(), commands = hooks.len(), "running hooks");
            self.runs.push(HookRun::new(point, hooks, env, now));
        }
    }
    pub(super) fn step_hooks(&mut self, now: Instant) -> bool {
        let mut busy = false;
        for i in 0..self.runs.len() {
            for action in self.runs[i].step(now) {
                busy = true;
                match action {
                    hooks::Action::Spawn { index, attempt } => {
                        self.spawn_hook(i, index, attempt, now)
                    }
                    hooks::Action::Kill { pid } => {
                        warn!(
                            hook = self.runs[i].point.name(),
                            pid = pid.as_raw(),
                            "hook timed out; killing it"
                        );
                        let _ = killpg(pid, Signal::SIGKILL);
                    }
                }
            }
        }
        let finished: Vec<HookRun> = extract_if(&mut self.runs, HookRun::is_done);
        for run in finished {
            busy = true;
            self.hook_run_done(run, now);
        }
        busy
    }
    pub(super) fn spawn_hook(&mut self, run: usize, index: usize, attempt: u32, now: Instant) {
        let r = &self.runs[run];
        let hook = &r.hooks[index];
        let result = self.children.hook(r.point, hook, &r.env, &self.config);
        let point = r.point.name();
        match result {
            Ok(pid) => {
                self.watcher.watch(pid);
                info!(hook = point, pid = pid.as_raw(), attempt, command = %hook.command.join(" "), "hook started");
                self.runs[run].spawned(pid, now);
            }
            Err(e) => {
                error!(hook = point, "cannot start hook: {e}");
                self.runs[run].finished(&Ended { ok: false, status: e.to_string() }, now);
            }
        }
    }
    pub(super) fn hook_exited(&mut self, pid: Pid, status: &ExitStatus, now: Instant) -> bool {
        let Some(run) = self.runs.iter_mut().find(|r| r.pid() == Some(pid)) else { return false };
        let ok = *status == ExitStatus::Code(0);
        let point = run.point.name();
        if ok {
            info!(hook = point, pid = pid.as_raw(), "hook {status}");
        } else {
            warn!(hook = point, pid = pid.as_raw(), "hook {status}");
        }
        run.finished(&Ended { ok, status: status.to_string() }, now);
        true
    }
    pub(super) fn hook_run_done(&mut self, run: HookRun, now: Instant) {
        let point = run.point;
        self.ledger.hook_run(point.name(), run.failure().is_none());
        if let Some((index, outcome)) = run.failure() {
            let command = run.hooks[*index].command.join(" ");
            if point == Point::OnStarting && !self.stage.stopping() {
                let e = MasterError::Hook { command, status: outcome.status.clone() };
                self.fail(e, now);
            } else {
                warn!(
                    hook = point.name(),
                    "hook `{command}` failed: {}; carrying on", outcome.status
                );
            }
        }
        if point == Point::OnReload {
            self.on_reload_done();
        }
    }
    pub(super) fn worker_exit_hooks(&mut self, exit: &pool::Ended, now: Instant) {
        let mut env = vec![
            ("PRESUP_WORKER_ID".to_owned(), exit.slot.to_string()),
            ("PRESUP_WORKER_PID".to_owned(), exit.pid.to_string()),
        ];
        match &exit.status {
            ExitStatus::Code(c) => env.push(("PRESUP_EXIT_CODE".to_owned(), c.to_string())),
            ExitStatus::Signal(s) => {
                env.push(("PRESUP_EXIT_SIGNAL".to_owned(), s.as_str().to_owned()))
            }
            ExitStatus::NotStarted(_) => return,
        }
        self.start_hooks(Point::WorkerExit, env, now);
    }
}

/// Takes the elements matching `pred` out of `v`, keeping the order of both.
fn extract_if<T>(v: &mut Vec<T>, pred: impl Fn(&T) -> bool) -> Vec<T> {
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(v).into_iter().partition(|x| pred(x));
    *v = keep;
    out
}
