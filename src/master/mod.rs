//! The master: one thread, one `poll` loop, one reaper.
//!
//! [`run`] does the startup of DESIGN.md §2 (pidfile, listeners, then the workers) and then
//! loops: step the [`pool`] and perform its actions, poll with the nearest deadline as the
//! timeout (none when idle: an idle master sleeps until a signal arrives), drain the signals,
//! reap. Decisions live in [`pool`]; this module only performs them and logs.

pub mod hooks;
pub mod pool;
pub mod singletons;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::config::{self, Config};
use crate::environment::{Environment, WorkerVars};
use crate::listener::{self, BindError, Listener};
use crate::logs::Sink;
use crate::notify::{Message, NotifySocket};
use crate::pidfile::{Pidfile, PidfileError};
use crate::signals::{Event, Signals};
use crate::spawn::{Command, SpawnError};
use pool::{Action, Cause, Exit, ExitStatus, Policy, Pool, StopWhy};

/// Why the master could not start (exit 3) or failed while running (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("worker command `{command}` failed to boot {attempts} times in a row in slot {slot}; last: {last}")]
    Boot { command: String, slot: usize, attempts: u32, last: ExitStatus },
    #[error("cannot set up the master: {0}")]
    Setup(String),
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

/// How the master was started: where its config lives and how to re-read it.
pub struct Options {
    pub config_path: PathBuf,
    pub log_sink: Sink,
}

/// Runs the master until it stops. `Ok` is a clean stop (exit 0).
pub fn run(config: Config, options: Options) -> Result<(), MasterError> {
    let signals =
        Signals::install().map_err(|e| MasterError::Setup(format!("signal handlers: {e}")))?;
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| MasterError::Setup(format!("subreaper: {e}")))?;
    let pidfile = config.pidfile.as_deref().map(Pidfile::acquire).transpose()?;
    let listeners = listener::bind_all(&config.listen)?;
    for l in &listeners {
        info!(name = %l.name, address = %l.local_addr().unwrap_or_else(|_| l.address.to_string()), "listening");
    }
    let notify = NotifySocket::create()
        .map_err(|e| MasterError::Setup(format!("notification socket: {e}")))?;
    let mut base_env = Environment::inherited(std::env::vars());
    base_env.set("NOTIFY_SOCKET", notify.path().display());
    let pool = Pool::new(config.workers.count, Policy::from_config(&config));
    let mut master = Master {
        base_env,
        notify,
        statuses: BTreeMap::new(),
        master_pid: std::process::id(),
        config,
        options,
        listeners,
        pool,
        signals,
        pidfile,
        failure: None,
    };
    info!(pid = master.master_pid, workers = master.pool.target(), "master started");
    let result = master.run_loop();
    if let Some(mut p) = master.pidfile.take() {
        p.remove();
    }
    result
}

struct Master {
    config: Config,
    options: Options,
    listeners: Vec<Listener>,
    pool: Pool,
    signals: Signals,
    notify: NotifySocket,
    /// The last `STATUS=` each worker sent.
    statuses: BTreeMap<Pid, String>,
    pidfile: Option<Pidfile>,
    base_env: Environment,
    master_pid: u32,
    /// Set when the boot failed: the master stops its workers, then exits with it.
    failure: Option<MasterError>,
}

impl Master {
    fn run_loop(&mut self) -> Result<(), MasterError> {
        loop {
            self.perform_due_actions();
            if self.pool.is_done() {
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

    /// Steps the pool until it has nothing more to do right now.
    fn perform_due_actions(&mut self) {
        loop {
            let actions = self.pool.step(Instant::now());
            if actions.is_empty() {
                return;
            }
            for action in actions {
                self.perform(action);
            }
        }
    }

    /// Sleeps in `poll` until a signal or the pool's next deadline.
    fn wait(&mut self) -> Result<(), MasterError> {
        let timeout = match self.pool.next_deadline() {
            None => PollTimeout::NONE,
            Some(at) => {
                let d = at.saturating_duration_since(Instant::now());
                // Round up, so that a deadline is never polled for before it is due.
                let ms = d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(MasterError::Runtime(format!("poll: {e}"))),
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Spawn { slot, generation } => self.spawn_worker(slot, generation),
            Action::Signal { pid, slot, signal, why } => {
                debug!(slot, pid = pid.as_raw(), signal = signal.as_str(), why = ?why, "signalling worker");
                if why == StopWhy::Retired || why == StopWhy::Surplus {
                    info!(slot, pid = pid.as_raw(), signal = signal.as_str(), reason = ?why, "stopping worker");
                }
                // The group is gone if every process in it died: the reaper will tell.
                let _ = killpg(pid, signal);
            }
            Action::Booted => {
                info!(
                    workers = self.pool.target(),
                    generation = self.pool.generation(),
                    "ready: all workers up"
                );
            }
            Action::BootFailed { slot, attempts, last } => {
                let command = self.config.workers.command.join(" ");
                let e = MasterError::Boot { command, slot, attempts, last };
                error!("{e}; stopping");
                self.failure = Some(e);
            }
        }
    }

    fn spawn_worker(&mut self, slot: usize, generation: u64) {
        let now = Instant::now();
        let fds: Vec<RawFd> = self.listeners.iter().map(AsRawFd::as_raw_fd).collect();
        match self.worker_command(slot, generation).and_then(|c| c.spawn(&fds)) {
            Ok(pid) => {
                info!(slot, pid = pid.as_raw(), generation, "worker spawned");
                self.pool.spawned(slot, generation, pid, now);
            }
            Err(e) => {
                error!(slot, generation, "cannot start worker: {e}");
                self.pool.spawn_failed(slot, e.to_string(), now);
            }
        }
    }

    fn worker_command(&self, slot: usize, generation: u64) -> Result<Command, SpawnError> {
        let names: Vec<String> = self.listeners.iter().map(|l| l.name.clone()).collect();
        let mut env = self.base_env.clone();
        env.extend(&self.config.workers.env).worker(&WorkerVars {
            slot,
            count: self.pool.target(),
            generation,
            master_pid: self.master_pid,
            listener_names: &names,
        });
        let w = &self.config.workers;
        Command::prepare(
            &w.command,
            &env.to_vec(),
            &self.config.directory,
            !names.is_empty(),
            self.config.umask,
        )
    }

    fn on_signal(&mut self, event: Event, count: u32) {
        let now = Instant::now();
        match event {
            Event::Chld => self.reap(),
            Event::Term => {
                info!("TERM: graceful stop");
                self.pool.stop(false, now);
            }
            Event::Int | Event::Quit => {
                info!(signal = ?event, "fast stop");
                self.pool.stop(true, now);
            }
            Event::Hup => self.reload(),
            Event::Ttin => {
                self.pool.set_target(self.pool.target() + count as usize);
                info!(workers = self.pool.target(), "TTIN: one worker more");
            }
            Event::Ttou => {
                self.pool.set_target(self.pool.target().saturating_sub(count as usize));
                info!(workers = self.pool.target(), "TTOU: one worker fewer");
            }
            Event::Usr1 => self.reopen_logs(),
            Event::Usr2 => warn!("USR2 (binary upgrade) is not supported yet; ignored"),
        }
    }

    /// Datagrams on the notification socket, attributed by the kernel to their sender.
    fn on_notify(&mut self, pid: Pid, messages: Vec<Message>) {
        let Some(slot) = self.pool.workers().find(|(p, _)| *p == pid).map(|(_, w)| w.slot) else {
            debug!(pid = pid.as_raw(), "notification from a process that is not a child; ignored");
            return;
        };
        for m in messages {
            match m {
                Message::Ready => {
                    if self.pool.notified_ready(pid, Instant::now()) {
                        info!(slot, pid = pid.as_raw(), "worker up (READY=1)");
                    }
                }
                Message::Status(status) => {
                    info!(slot, pid = pid.as_raw(), %status, "worker status");
                    self.statuses.insert(pid, status);
                }
                Message::Watchdog | Message::Stopping => {
                    debug!(slot, pid = pid.as_raw(), ?m, "notification")
                }
            }
        }
    }

    /// The one place that calls `waitpid`: reaps every child that has ended.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid: {e}");
                    return;
                }
            };
            let (pid, status) = status;
            self.statuses.remove(&pid);
            match self.pool.exited(pid, status.clone(), Instant::now()) {
                Some(exit) => log_exit(&exit),
                None => {
                    debug!(pid = pid.as_raw(), "reaped a process that is not a worker ({status})")
                }
            }
        }
    }

    /// HUP: re-read the config; keep everything as it is if it is invalid.
    fn reload(&mut self) {
        if matches!(self.pool.phase(), pool::Phase::Stopping { .. }) {
            return;
        }
        let wc = std::env::var("WEB_CONCURRENCY").ok();
        let new = match config::load(&self.options.config_path, wc.as_deref(), config::cpu_count())
        {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.errors {
                    error!("reload rejected: {e}");
                }
                error!(
                    generation = self.pool.generation(),
                    "HUP: the new config is invalid; keeping the running one"
                );
                return;
            }
        };
        if let Err(e) = self.rebind(&new) {
            error!("reload rejected: {e}; keeping the running config");
            return;
        }
        self.pool.reload(new.workers.count, Policy::from_config(&new));
        self.config = new;
        info!(generation = self.pool.generation(), workers = self.pool.target(), "HUP: reloading");
    }

    /// Makes the listeners match `new`: an unchanged address keeps its socket, a new one is
    /// bound, a removed one is closed (workers that hold it keep it until they exit).
    fn rebind(&mut self, new: &Config) -> Result<(), BindError> {
        let is_new =
            |spec: &&config::Listen| !self.listeners.iter().any(|l| l.address == spec.address);
        // Bind first: a failure leaves the running listeners untouched.
        let fresh: Vec<Listener> =
            new.listen.iter().filter(is_new).map(Listener::bind).collect::<Result<_, _>>()?;
        let mut fresh = fresh.into_iter();
        let mut old: Vec<Option<Listener>> =
            std::mem::take(&mut self.listeners).into_iter().map(Some).collect();
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
        Ok(())
    }

    fn reopen_logs(&mut self) {
        if let Err(e) = self.options.log_sink.reopen() {
            error!("USR1: cannot reopen the log file: {e}");
        }
        info!("USR1: log reopened, forwarded to the workers");
        for (pid, _) in self.pool.workers() {
            let _ = kill(pid, Signal::SIGUSR1);
        }
    }
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

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
