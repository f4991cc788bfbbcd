//! The master: one thread, one `poll` loop, one reaper.
//!
//! [`run`] takes the pidfile and binds the listeners, then loops: step what the current
//! [`Stage`] allows (the hook runs, the [`singletons`], the worker [`pool`]) and perform their
//! actions, move to the next stage when the current one is over, then sleep in `poll` until a
//! signal, a child's notification or the nearest deadline (none when idle: an idle master
//! sleeps until something happens). Decisions live in the submodules; this one performs them.
//!
//! The stages follow DESIGN.md §2: `on_starting` hooks → singletons in file order → workers →
//! running; on the way out, workers → singletons in reverse → `on_exit` hooks (on every
//! way out once the master reached `on_starting`) → the children reparented to the master are killed → exit.

mod children;
pub mod groups;
pub mod hooks;
mod log_limit;
pub mod pool;
pub mod singletons;
pub mod stop;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::config::{self, Config};
use crate::environment::Environment;
use crate::listener::{self, BindError, Listener};
use crate::logs::Sink;
use crate::notify::{Message, NotifySocket};
use crate::pidfile::{Pidfile, PidfileError};
use crate::signals::{Event, Signals};
use crate::spawn::Credentials;
use crate::systemd;
use crate::ticket::Tickets;
use crate::watcher::{Cgroup, Watcher};
use groups::{Groups, Owner};
use hooks::{HookRun, Outcome, Point};
use log_limit::{LogLimit, StatusLog};
use pool::{Cause, Exit, Policy, Pool, StopWhy};
use singletons::Singletons;
use stop::{ExitStatus, FAST_STOP_GRACE};

/// Why the master could not start (exit 3) or failed while running (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("worker command `{command}` failed to boot {} in a row in slot {slot}; last: {last}", times(*attempts))]
    Boot { command: String, slot: usize, attempts: u32, last: ExitStatus },
    #[error("on_starting hook `{command}` failed: {status}")]
    Hook { command: String, status: String },
    #[error("singleton {name} could not start: {why}")]
    Singleton { name: String, why: String },
    #[error("cannot set up the master: {0}")]
    Setup(String),
    #[error("preload left {0} threads running; the master refuses to fork: fork() copies only the calling thread, so a lock another thread holds stays locked forever in the workers. Join the threads before preload returns, or start them in the worker function")]
    Threads(usize),
    #[error("the program runs {0} threads before preload; the master refuses to fork: fork() copies only the calling thread, so a lock another thread holds stays locked forever in the workers. The usual cause is an async runtime started before presup: a #[tokio::main] around presup::prefork::main, or a runtime built at startup. Call presup::prefork::main from a plain fn main, and build the runtime in the worker function")]
    ThreadsBeforePreload(usize),
    #[error("the master failed: {0}")]
    Runtime(String),
}

impl MasterError {
    /// The exit code of DESIGN.md §4.
    pub fn exit_code(&self) -> u8 {
        match self {
            MasterError::Runtime(_) => 1,
            _ => 3,
        }
    }
}

/// How the master was started: where its config lives and how to re-read it, and whether its
/// workers are forked from this program ([`crate::prefork`]) instead of exec'd.
pub struct Options {
    pub config_path: PathBuf,
    pub log_sink: Sink,
    pub in_process: Option<InProcess>,
}

pub use crate::prefork::InProcess;

/// A config the master can run: exec'd workers need `[workers] command`.
pub fn check_command(config: &Config, in_process: bool) -> Result<(), String> {
    if !in_process && config.workers.count > 0 && config.workers.command.is_empty() {
        return Err("workers.command: missing required key".into());
    }
    Ok(())
}

/// Where the master is in its life (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    OnStarting,
    Singletons,
    Workers,
    Running,
    StoppingWorkers,
    StoppingSingletons,
    OnExit,
    /// Killing what was reparented to the master; done when no child is left.
    Sweep,
    Done,
}

impl Stage {
    fn runs_singletons(self) -> bool {
        matches!(
            self,
            Stage::Singletons
                | Stage::Workers
                | Stage::Running
                | Stage::StoppingWorkers
                | Stage::StoppingSingletons
        )
    }

    fn runs_workers(self) -> bool {
        matches!(self, Stage::Workers | Stage::Running | Stage::StoppingWorkers)
    }

    fn stopping(self) -> bool {
        matches!(
            self,
            Stage::StoppingWorkers
                | Stage::StoppingSingletons
                | Stage::OnExit
                | Stage::Sweep
                | Stage::Done
        )
    }
}

/// Runs the master until it stops. `Ok` is a clean stop (exit 0).
pub fn run(config: Config, mut options: Options) -> Result<(), MasterError> {
    let setup = |what: &str, e: String| MasterError::Setup(format!("{what}: {e}"));
    // First, before any fd is opened: the sockets systemd passed, made close-on-exec.
    let inherited = systemd::inherited_listeners().map_err(BindError::from)?;
    // Then, before any child: the watcher, which kills what a master killed with kill -9
    // leaves behind (forked before the preload and the signal handlers).
    let cgroup = match Cgroup::create() {
        Ok(c) => {
            info!(path = %c.dir().display(), "children's cgroup created");
            Some(c)
        }
        Err(why) => {
            info!("no cgroup for the children ({why}): a process that leaves its process group (setsid) is not killed with a master killed by kill -9");
            None
        }
    };
    let watcher = Watcher::start(cgroup).map_err(|e| setup("watcher", e.to_string()))?;
    let systemd = systemd::Manager::from_env(Instant::now());
    let signals = Signals::install().map_err(|e| setup("signal handlers", e.to_string()))?;
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| setup("subreaper", e.to_string()))?;
    let credentials = Credentials::resolve(config.user.as_deref(), config.group.as_deref())
        .map_err(|e| setup("user", e))?;
    let pidfile = config.pidfile.as_deref().map(Pidfile::acquire).transpose()?;
    let mut listeners = Vec::new();
    for (l, inherited) in listener::bind_or_adopt(&config.listen, inherited)? {
        let address = l.local_addr().unwrap_or_else(|_| l.address.to_string());
        let from = if inherited { "systemd" } else { "presup" };
        info!(name = %l.name, %address, bound_by = %from, "listening");
        listeners.push(l);
    }
    if let Some(in_process) = &mut options.in_process {
        let threads = crate::prefork::thread_count();
        if threads > 1 {
            return Err(MasterError::ThreadsBeforePreload(threads));
        }
        info!("preload");
        let began = Instant::now();
        in_process.preload();
        let threads = crate::prefork::thread_count();
        if threads > 1 {
            return Err(MasterError::Threads(threads));
        }
        info!(took = %humantime::format_duration(round_ms(began.elapsed())), "preload finished");
    }
    // Children that dropped privileges must still reach the socket and the tickets.
    let owner = credentials.as_ref().map(|c| (c.uid.into(), c.gid.into()));
    let notify =
        NotifySocket::create(owner).map_err(|e| setup("notification socket", e.to_string()))?;
    // The tickets, before any child; their HTTP servers are singletons, started first.
    let tickets = Tickets::create(&config.tickets, notify.dir(), owner)
        .map_err(|e| setup("tickets", e.to_string()))?;
    let mut config = config;
    tickets.add_servers(&mut config);
    let mut own = Environment::default();
    own.set("NOTIFY_SOCKET", notify.path().display());
    own.set("PRESUP_MASTER_PID", std::process::id());
    for (var, path) in tickets.env() {
        own.set(var, path.display());
    }
    let now = Instant::now();
    let on_starting =
        HookRun::new(Point::OnStarting, config.hooks.on_starting.clone(), vec![], now);
    let mut master = Master {
        pool: Pool::new(config.workers.count, Policy::from_config(&config)),
        singletons: Singletons::new(&config.singleton, now),
        runs: vec![on_starting],
        stage: Stage::OnStarting,
        retired_listeners: Vec::new(),
        pending_reload: None,
        rollback_config: None,
        reload_notified: false,
        reload_failure: None,
        systemd,
        children: children::Children {
            inherited: Environment::inherited(std::env::vars()),
            own,
            credentials,
            cgroup_procs: watcher.cgroup().map(Cgroup::procs_fd),
        },
        statuses: BTreeMap::new(),
        rejected_notifications: LogLimit::new(log_limit::REJECTED_EVERY),
        config,
        options,
        listeners,
        signals,
        notify,
        tickets,
        pidfile,
        failure: None,
        swept: BTreeSet::new(),
        groups: Groups::default(),
        watcher,
    };
    info!(pid = std::process::id(), workers = master.pool.target(), "master started");
    let result = master.run_loop();
    if let Some(mut p) = master.pidfile.take() {
        p.remove();
    }
    result
}

struct Master {
    config: Config,
    options: Options,
    stage: Stage,
    listeners: Vec<Listener>,
    pool: Pool,
    singletons: Singletons,
    /// Hook runs under way (the finished ones are dropped).
    runs: Vec<HookRun>,
    /// Listeners a reload removed, kept while the old workers may still serve on them and a
    /// rollback may need them back; closed when the reload is done or undone.
    retired_listeners: Vec<Listener>,
    /// A valid new config waiting for its `on_reload` hooks.
    pending_reload: Option<Config>,
    /// While a reload rolls out: the last config fully rolled out, restored if it fails.
    rollback_config: Option<Config>,
    /// systemd was told `RELOADING=1` and waits for `READY=1`.
    reload_notified: bool,
    /// Why the last reload was undone or rejected, until the next one (shown in `STATUS=`).
    reload_failure: Option<String>,
    systemd: systemd::Manager,
    children: children::Children,
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
            self.wait()?;
            for (event, count) in self.signals.drain() {
                self.on_signal(event, count);
            }
            for (pid, messages) in self.notify.drain() {
                self.on_notify(pid, messages);
            }
        }
    }

    /// Steps everything the stage allows until nothing more is due right now.
    fn perform_due_actions(&mut self) {
        self.flush_statuses(Instant::now());
        loop {
            let now = Instant::now();
            let mut busy = self.step_groups(now);
            busy |= self.step_hooks(now);
            if self.stage.runs_singletons() {
                busy |= self.step_singletons(now);
            }
            if self.stage.runs_workers() {
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
            Stage::StoppingWorkers if self.pool.is_done() => {
                // A fast stop (INT/QUIT) of the workers is a fast stop of the singletons too.
                let fast = self.pool.phase() == pool::Phase::Stopping { fast: true };
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
        let polled = nix::poll::poll(&mut fds, timeout);
        drop(fds);
        self.watcher.flush();
        match polled {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(MasterError::Runtime(format!("poll: {e}"))),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let runs = self.runs.iter().filter_map(HookRun::next_deadline);
        let singletons = self.stage.runs_singletons().then(|| self.singletons.next_deadline());
        let pool = self.stage.runs_workers().then(|| self.pool.next_deadline());
        // The sweep waits for SIGCHLD, with a fallback in case a child ignores nothing but
        // takes a moment to be reaped by the kernel.
        let sweep =
            (self.stage == Stage::Sweep).then(|| Instant::now() + Duration::from_millis(50));
        let systemd = self.systemd.next_deadline();
        let groups = self.groups.next_deadline();
        let statuses = self.statuses.values().filter_map(StatusLog::due);
        runs.chain(singletons.flatten())
            .chain(pool.flatten())
            .chain(sweep)
            .chain(systemd)
            .chain(groups)
            .chain(statuses)
            .min()
    }

    // ---- hooks ----

    /// Starts a run of `point`'s hooks of the running config.
    fn start_hooks(&mut self, point: Point, env: Vec<(String, String)>, now: Instant) {
        let hooks = point.hooks(&self.config.hooks).to_vec();
        self.start_hook_run(point, hooks, env, now);
    }

    fn start_hook_run(
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

    fn step_hooks(&mut self, now: Instant) -> bool {
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

    fn spawn_hook(&mut self, run: usize, index: usize, attempt: u32, now: Instant) {
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
                self.runs[run].finished(&Outcome { ok: false, status: e.to_string() }, now);
            }
        }
    }

    fn hook_exited(&mut self, pid: Pid, status: &ExitStatus, now: Instant) -> bool {
        let Some(run) = self.runs.iter_mut().find(|r| r.pid() == Some(pid)) else { return false };
        let ok = *status == ExitStatus::Code(0);
        let point = run.point.name();
        if ok {
            info!(hook = point, pid = pid.as_raw(), "hook {status}");
        } else {
            warn!(hook = point, pid = pid.as_raw(), "hook {status}");
        }
        run.finished(&Outcome { ok, status: status.to_string() }, now);
        true
    }

    fn hook_run_done(&mut self, run: HookRun, now: Instant) {
        let point = run.point;
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
        // The pending config is the last HUP's: it applies once every on_reload run is over
        // (a second HUP started its own), unless a stop came meanwhile.
        let on_reload_left = self.runs.iter().any(|r| r.point == Point::OnReload);
        if point == Point::OnReload && !on_reload_left {
            if let Some(new) = self.pending_reload.take().filter(|_| !self.stage.stopping()) {
                self.apply_reload(new);
            }
        }
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
                    if why == StopWhy::Retired || why == StopWhy::Surplus {
                        info!(slot, pid = pid.as_raw(), signal = signal.as_str(), reason = ?why, "stopping worker");
                    } else if why == StopWhy::Watchdog {
                        let every = self.config.workers.watchdog.unwrap_or_default();
                        let every = humantime::format_duration(every);
                        warn!(
                            slot,
                            pid = pid.as_raw(),
                            signal = signal.as_str(),
                            "watchdog timeout: no WATCHDOG=1 within {every}"
                        );
                    }
                    // The group is gone if every process in it died: the reaper will tell.
                    let _ = killpg(pid, signal);
                }
                pool::Action::Booted => {
                    let (workers, generation) = (self.pool.target(), self.pool.generation());
                    info!(
                        workers,
                        singletons = self.singletons.up_count(),
                        generation,
                        "ready: all workers up"
                    );
                    if self.stage == Stage::Workers {
                        self.stage = Stage::Running;
                        let status = self.status_line();
                        self.systemd.ready(status);
                        self.start_hooks(Point::WhenReady, vec![], now);
                    }
                }
                pool::Action::BootFailed { slot, attempts, last } => {
                    let command = match &self.options.in_process {
                        // A program built on presup::prefork: its workers are itself.
                        Some(_) => crate::prefork::program_name(),
                        None => self.config.workers.command.join(" "),
                    };
                    self.fail(MasterError::Boot { command, slot, attempts, last }, now);
                }
                pool::Action::ReloadDone { generation } => {
                    self.rollback_config = None;
                    self.retired_listeners.clear();
                    self.reload_failure = None;
                    info!(
                        generation,
                        workers = self.pool.target(),
                        "reload done: every worker runs the new generation"
                    );
                    self.reload_settled();
                }
                pool::Action::RolledBack { failed, to, slot, status } => {
                    let why = format!("reload to generation {failed} undone: slot {slot} {status} before it was up");
                    error!(slot, generation = failed, "{why}; generation {to} keeps serving");
                    self.reload_failure = Some(why);
                    if let Some(old) = self.rollback_config.take() {
                        if let Err(e) = self.rebind(&old) {
                            error!("cannot restore the listeners of the running config: {e}");
                        }
                        // What is left are the failed config's own new listeners.
                        self.retired_listeners.clear();
                        self.singletons.reconfigure(&old.singleton, now);
                        self.config = old;
                    }
                    self.reload_settled();
                }
            }
        }
        busy
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
        fds
    }

    fn spawn_worker(&mut self, slot: usize, generation: u64, now: Instant) {
        let count = self.pool.target();
        let forked = self.options.in_process.as_ref().and_then(InProcess::worker);
        let result = match forked {
            None => self.children.worker(slot, count, generation, &self.config, &self.listeners),
            Some(worker) => {
                let close = self.own_fds();
                let at = children::At { slot, count, generation };
                self.children.forked_worker(at, &self.config, &self.listeners, worker, &close)
            }
        };
        match result {
            Ok(pid) => {
                self.watcher.watch(pid);
                info!(slot, pid = pid.as_raw(), generation, "worker spawned");
                self.pool.spawned(slot, generation, pid, now);
            }
            Err(e) if out_of_resources(&e) => {
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
            Event::Hup => self.reload(now),
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

    /// Logs the statuses held back by the rate limit whose interval is over.
    fn flush_statuses(&mut self, now: Instant) {
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
                Message::Status(status) => {
                    let log = self.statuses.entry(pid).or_default();
                    match log.update(&status, now) {
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

    /// A datagram from a process that is neither a worker nor a singleton: ignored, and said
    /// at WARN (at most one line per [`log_limit::REJECTED_EVERY`]), since it is most often a
    /// child's own child (`systemd-notify` without `--pid`) and its worker never becomes ready.
    fn rejected_notification(&mut self, pid: Pid, messages: &[Message], now: Instant) {
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
            self.statuses.remove(&pid);
            let now = Instant::now();
            if let Some(exit) = self.pool.exited(pid, status.clone(), now) {
                log_exit(&exit);
                let owner = Owner::Worker { slot: exit.slot };
                if self.group_ended(pid, owner, exit.group_grace, now) {
                    self.pool.group_outlives(&exit, now);
                }
                self.worker_exit_hooks(&exit, now);
            } else if let Some(exit) = self.singletons.exited(pid, status.clone(), now) {
                let name = &self.singletons.entries()[exit.index].spec.name;
                log_singleton_exit(name, pid, &exit);
                let owner = Owner::Singleton { index: exit.index };
                if self.group_ended(pid, owner, exit.group_grace, now) {
                    self.singletons.group_outlives(exit.index, pid);
                }
            } else if self.hook_exited(pid, &status, now) {
                self.group_ended(pid, Owner::Hook, None, now);
            } else if self.watcher.watches(pid) {
                // A child the master started that no owner claims any more (one that forgot it
                // before it was reaped): its group still goes, as a crashed child's would.
                self.group_ended(pid, Owner::Other, None, now);
            } else if !self.watcher.exited(pid, &status.to_string()) {
                debug!(
                    pid = pid.as_raw(),
                    "reaped a process that is not a child of presup's ({status})"
                );
            }
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

    // ---- what is left of a child's process group ----

    /// The leader `pgid` of a child's process group was reaped: kills what is left of the
    /// group, now or (a stop under way) at `grace`. Returns whether the group outlives it.
    ///
    /// The pid was freed by the reaping; while the group has members its number stays taken
    /// (it is their pgid), and once it is empty the kernel hands pids out cyclically, so the
    /// number cannot name another group an instant later.
    fn group_ended(
        &mut self,
        pgid: Pid,
        owner: Owner,
        grace: Option<Instant>,
        now: Instant,
    ) -> bool {
        if killpg(pgid, None) == Err(Errno::ESRCH) {
            self.watcher.forget(pgid);
            return false;
        }
        // Listed before the kill, which soon turns them into zombies.
        let left = children::group_members(pgid);
        let pids: Vec<i32> = left.iter().map(|p| p.as_raw()).collect();
        let kill = Groups::kill_now(grace, now);
        if kill {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let who = self.owner_name(owner);
        if kill && !pids.is_empty() {
            warn!(
                pgid = pgid.as_raw(),
                ?pids,
                "{who} exited; killed what was left of its process group"
            );
        } else if !pids.is_empty() {
            info!(pgid = pgid.as_raw(), ?pids, "{who} exited; the rest of its process group gets SIGKILL at the end of its stop timeout");
        }
        self.groups.outlived(pgid, owner, grace, now);
        true
    }

    fn owner_name(&self, owner: Owner) -> String {
        match owner {
            Owner::Worker { slot } => format!("worker of slot {slot}"),
            Owner::Singleton { index } => match self.singletons.entries().get(index) {
                Some(e) => format!("singleton {}", e.spec.name),
                None => "singleton".to_owned(),
            },
            Owner::Hook => "hook".to_owned(),
            Owner::Other => "child".to_owned(),
        }
    }

    /// A draining group is empty (or given up on): its slot or singleton may start again.
    fn release_group(&mut self, pgid: Pid, owner: Owner, why: &str) {
        self.watcher.forget(pgid);
        match owner {
            Owner::Worker { .. } => {
                self.pool.group_gone(pgid);
            }
            Owner::Singleton { .. } => {
                self.singletons.group_gone(pgid);
            }
            Owner::Hook | Owner::Other => {}
        }
        debug!(pgid = pgid.as_raw(), "the process group of a {} {why}", self.owner_name(owner));
    }

    /// A signal to a draining group, some time after its leader was reaped. The master
    /// notices a group emptied only when it reaps something, and a group can empty without
    /// that (its last member reaped by a parent that left the group). So it is checked right
    /// before the signal: found empty, it is released (and forgotten by the watcher) instead
    /// of signalled. Its number could then name another group only if the kernel, which hands
    /// pids out cyclically, went round all of them since the group emptied, or in the
    /// microseconds between the two calls. Returns whether the group had members.
    fn signal_draining(&mut self, pgid: Pid, signal: Signal) -> bool {
        if killpg(pgid, None) == Err(Errno::ESRCH) {
            if let Some(owner) = self.groups.gone(pgid) {
                self.release_group(pgid, owner, "is empty");
            }
            return false;
        }
        let _ = killpg(pgid, signal);
        true
    }

    fn step_groups(&mut self, now: Instant) -> bool {
        let actions = self.groups.step(now);
        let busy = !actions.is_empty();
        for action in actions {
            match action {
                groups::Action::Kill { pgid, owner } => {
                    let pids: Vec<i32> =
                        children::group_members(pgid).iter().map(|p| p.as_raw()).collect();
                    if !self.signal_draining(pgid, Signal::SIGKILL) {
                        continue;
                    }
                    let who = self.owner_name(owner);
                    warn!(pgid = pgid.as_raw(), ?pids, "killed what was left of the process group of a {who} (its stop timeout is over)");
                }
                groups::Action::GiveUp { pgid, owner } => {
                    let pids: Vec<i32> =
                        children::group_members(pgid).iter().map(|p| p.as_raw()).collect();
                    let who = self.owner_name(owner);
                    error!(pgid = pgid.as_raw(), ?pids, "the process group of a {who} still has processes {}s after SIGKILL (not ours to signal, or not our descendants); no longer waiting for it", groups::DRAIN_GIVE_UP.as_secs());
                    self.release_group(pgid, owner, "is given up on");
                }
            }
        }
        busy
    }

    fn worker_exit_hooks(&mut self, exit: &Exit, now: Instant) {
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

    /// HUP: re-read the config; keep everything as it is if it is invalid.
    fn reload(&mut self, now: Instant) {
        if self.stage.stopping() {
            return;
        }
        // systemd hears of reloads once it heard READY=1 (before, that READY=1 ends them too).
        if self.stage == Stage::Running && !self.reload_notified {
            self.reload_notified = true;
            self.systemd.reloading();
        }
        let mut new = match config::load_for_this_process(&self.options.config_path) {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.errors {
                    error!("reload rejected: {e}");
                }
                error!(
                    generation = self.pool.generation(),
                    "HUP: the new config is invalid; keeping the running one"
                );
                self.reload_rejected(format!("{} error(s) in the new config", errors.errors.len()));
                return;
            }
        };
        self.tickets.check_reload(&new.tickets);
        self.tickets.add_servers(&mut new);
        if let Err(e) = check_command(&new, self.options.in_process.is_some()) {
            error!("reload rejected: {e}; keeping the running one");
            self.reload_rejected(format!("{e} in the new config"));
            return;
        }
        if let Err(e) = self.rebind(&new) {
            error!("reload rejected: {e}; keeping the running config");
            self.reload_rejected(e.to_string());
            return;
        }
        // The new config's on_reload hooks run before its workers replace the old ones.
        let on_reload = new.hooks.on_reload.clone();
        if !on_reload.is_empty() {
            self.pending_reload = Some(new);
            self.start_hook_run(Point::OnReload, on_reload, vec![], now);
        } else {
            self.apply_reload(new);
        }
    }

    /// A HUP whose config was refused: nothing changed; a reload still rolling out goes on.
    fn reload_rejected(&mut self, why: String) {
        self.reload_failure = Some(format!("reload rejected: {why}"));
        if !self.pool.reloading() && self.pending_reload.is_none() {
            self.reload_settled();
        }
    }

    /// The reloads systemd was told of are over (done, undone or rejected).
    fn reload_settled(&mut self) {
        if std::mem::take(&mut self.reload_notified) {
            let status = self.status_line();
            self.systemd.ready(status);
        }
    }

    /// What `STATUS=` says: the counts, and what is under way.
    fn status_line(&self) -> String {
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
            Stage::Workers => format!("starting workers: {counts}"),
            Stage::Running if self.pool.reloading() || self.pending_reload.is_some() => {
                format!("reloading: {counts}")
            }
            Stage::Running => match &self.reload_failure {
                Some(why) => format!("{counts}; {why}"),
                None => counts,
            },
            _ => match &self.failure {
                Some(e) => format!("stopping: {e}"),
                None => "stopping".to_owned(),
            },
        }
    }

    fn apply_reload(&mut self, new: Config) {
        self.pool.reload(new.workers.count, Policy::from_config(&new));
        self.singletons.reconfigure(&new.singleton, Instant::now());
        let old = std::mem::replace(&mut self.config, new);
        // A reload superseding another keeps the last config that was fully rolled out.
        self.rollback_config.get_or_insert(old);
        info!(generation = self.pool.generation(), workers = self.pool.target(), "HUP: reloading");
    }

    /// Makes the listeners match `new`: an unchanged address keeps its socket (a retired one
    /// comes back), a new one is bound, a removed one is retired until the reload is over.
    fn rebind(&mut self, new: &Config) -> Result<(), BindError> {
        let held = |spec: &&config::Listen| {
            let mut all = self.listeners.iter().chain(&self.retired_listeners);
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
            .chain(std::mem::take(&mut self.retired_listeners))
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
        self.retired_listeners.extend(old.into_iter().flatten());
        Ok(())
    }

    fn reopen_logs(&mut self) {
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

    /// Kills whatever is left among the master's children: processes reparented to it (the
    /// master is a subreaper) after their parent, a singleton or a worker, exited. Returns
    /// whether any child is left (killed ones until they are reaped).
    fn kill_orphans(&mut self) -> bool {
        let mut left = children::of(std::process::id());
        // The watcher lives until the master exits.
        left.retain(|&p| Some(p) != self.watcher.pid());
        // A zombie (a spawn that failed after fork, say) only waits for the reaper.
        for &pid in left.iter().filter(|&&p| !children::is_zombie(p)) {
            if self.swept.insert(pid) {
                warn!(pid = pid.as_raw(), "killing a leftover process reparented to the master");
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        !left.is_empty()
    }
}

/// A fork that failed for want of resources (the process limit, memory, fds): it may succeed
/// a moment later, so the whole pool backs off instead of each slot counting a boot failure.
fn out_of_resources(e: &crate::spawn::SpawnError) -> bool {
    let crate::spawn::SpawnError::Fork(io) = e else { return false };
    matches!(io.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE))
}

/// Takes the elements matching `pred` out of `v`, keeping the order of both.
fn extract_if<T>(v: &mut Vec<T>, pred: impl Fn(&T) -> bool) -> Vec<T> {
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(v).into_iter().partition(|x| pred(x));
    *v = keep;
    out
}

fn log_exit(exit: &Exit) {
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

fn log_singleton_exit(name: &str, pid: Pid, exit: &singletons::Exit) {
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

/// "once", "twice", "3 times".
fn times(n: u32) -> String {
    match n {
        1 => "once".to_owned(),
        2 => "twice".to_owned(),
        n => format!("{n} times"),
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_failure_counts_its_attempts_in_words() {
        let boot = |attempts| MasterError::Boot {
            command: "./app".into(),
            slot: 0,
            attempts,
            last: ExitStatus::Code(1),
        };
        assert!(boot(1).to_string().contains("failed to boot once in a row"), "{}", boot(1));
        assert!(boot(2).to_string().contains("failed to boot twice in a row"), "{}", boot(2));
        assert!(boot(5).to_string().contains("failed to boot 5 times in a row"), "{}", boot(5));
    }
}
