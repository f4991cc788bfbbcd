//! The master's startup, in the order it must happen: the sockets systemd passed, the watcher,
//! the signal handlers, the pidfile, the listeners, the preload, the notification socket and
//! the tickets; then the [`Master`] is assembled and its loop runs until the master stops.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use tracing::{error, info};

use super::children;
use super::groups::Groups;
use super::hooks::{HookRun, Point};
use super::log_limit::{self, LogLimit};
use super::pool::{Policy, Pool};
use super::reload::Reload;
use super::report::round_ms;
use super::singletons::Singletons;
use super::{InProcess, Master, MasterError, Options, Stage};
use crate::config::Config;
use crate::control::{self, Control};
use crate::environment::Environment;
use crate::listener::{self, BindError, Listener};
use crate::notify::NotifySocket;
use crate::pidfile::Pidfile;
use crate::signals::Signals;
use crate::spawn::Credentials;
use crate::systemd;
use crate::ticket::Tickets;
use crate::watcher::{Cgroup, Watcher};

/// Runs the master until it stops. `Ok` is a clean stop (exit 0). The error, if any, was
/// logged (here, or when the master began stopping because of it).
pub fn run(config: Config, options: Options) -> Result<(), MasterError> {
    let mut master = start(config, options).inspect_err(|e| error!("{e}"))?;
    info!(pid = std::process::id(), workers = master.pool.target(), "master started");
    let result = master.run_loop();
    if let Some(mut p) = master.pidfile.take() {
        p.remove();
    }
    result
}

/// What the startup acquires before the master exists.
struct Acquired {
    watcher: Watcher,
    systemd: systemd::Notifier,
    signals: Signals,
    credentials: Option<Credentials>,
    pidfile: Option<Pidfile>,
    listeners: Vec<Listener>,
    notify: NotifySocket,
    tickets: Tickets,
    control: Control,
}

fn start(mut config: Config, mut options: Options) -> Result<Master, MasterError> {
    // First, before any fd is opened: the sockets systemd passed, made close-on-exec.
    let inherited = systemd::inherited_listeners().map_err(BindError::from)?;
    // Every fork of the master follows a check that it runs one thread (the watcher's too).
    let threads = crate::spawn::thread_count();
    if options.in_process.is_some() && threads > 1 {
        return Err(MasterError::ThreadsBeforePreload(threads));
    }
    // Then, before any child: the watcher, which kills what a master killed with kill -9
    // leaves behind (forked before the preload and the signal handlers).
    let watcher = Watcher::start(children_cgroup()).map_err(MasterError::setup("watcher"))?;
    let systemd = systemd::Notifier::from_env(Instant::now());
    let signals = Signals::install().map_err(MasterError::setup("signal handlers"))?;
    nix::sys::prctl::set_child_subreaper(true).map_err(MasterError::setup("subreaper"))?;
    let credentials = Credentials::resolve(config.user.as_deref(), config.group.as_deref())
        .map_err(MasterError::setup("user"))?;
    let pidfile = config.pidfile.as_deref().map(Pidfile::acquire).transpose()?;
    let listeners = bind(&config, inherited)?;
    if let Some(in_process) = &mut options.in_process {
        preload(in_process)?;
    }
    // Children that dropped privileges must still reach the socket and the tickets.
    let owner = credentials.as_ref().map(|c| (c.uid.into(), c.gid.into()));
    let notify = NotifySocket::create(owner).map_err(MasterError::setup("notification socket"))?;
    // The tickets, before any child; their HTTP servers are singletons, started first.
    let tickets = Tickets::create(&config.tickets, notify.dir(), owner)
        .map_err(MasterError::setup("tickets"))?;
    tickets.add_servers(&mut config);
    // The control socket; with [metrics], its server reads it (a singleton, started first).
    let path = config.control.clone().unwrap_or_else(|| notify.dir().join(control::DEFAULT_NAME));
    let control = Control::bind(&path).map_err(MasterError::setup("control socket"))?;
    control::add_metrics_server(&mut config, control.path());
    let acquired = Acquired {
        watcher,
        systemd,
        signals,
        credentials,
        pidfile,
        listeners,
        notify,
        tickets,
        control,
    };
    Ok(assemble(config, options, acquired))
}

/// The cgroup the children are put in, if the master may make one.
fn children_cgroup() -> Option<Cgroup> {
    match Cgroup::create() {
        Ok(c) => {
            info!(path = %c.dir().display(), "children's cgroup created");
            Some(c)
        }
        Err(why) => {
            info!("no cgroup for the children ({why}): a process that leaves its process group (setsid) is not killed with a master killed by kill -9");
            None
        }
    }
}

/// The listeners of `config`: adopted from systemd, or bound.
fn bind(config: &Config, inherited: Vec<systemd::Inherited>) -> Result<Vec<Listener>, MasterError> {
    let mut listeners = Vec::new();
    for (l, inherited) in listener::bind_or_adopt(&config.listen, inherited)? {
        let address = l.local_addr().unwrap_or_else(|_| l.address.to_string());
        let from = if inherited { "systemd" } else { "presup" };
        info!(name = %l.name, %address, bound_by = %from, "listening");
        listeners.push(l);
    }
    Ok(listeners)
}

/// Runs the preload of a program built on [`crate::prefork`]; the master forks its workers
/// afterwards, so no thread may run before it or be left by it.
fn preload(in_process: &mut InProcess) -> Result<(), MasterError> {
    // (No thread ran before it: checked before the watcher's fork, see `start`.)
    info!("preload");
    let began = Instant::now();
    in_process.preload();
    let threads = crate::spawn::thread_count();
    if threads > 1 {
        return Err(MasterError::Threads(threads));
    }
    info!(took = %humantime::format_duration(round_ms(began.elapsed())), "preload finished");
    Ok(())
}

fn assemble(config: Config, options: Options, a: Acquired) -> Master {
    let mut own = Environment::default();
    own.set("NOTIFY_SOCKET", a.notify.path().display());
    own.set("PRESUP_MASTER_PID", std::process::id());
    for (var, path) in a.tickets.env() {
        own.set(var, path.display());
    }
    let now = Instant::now();
    let on_starting =
        HookRun::new(Point::OnStarting, config.hooks.on_starting.clone(), vec![], now);
    Master {
        pool: Pool::new(config.workers.count, Policy::from_config(&config)),
        stems: super::Stems::new(&config.workers),
        stem_channels: BTreeMap::new(),
        unclaimed: Vec::new(),
        control: Some(a.control),
        ledger: super::control_runs::Ledger::new(),
        singletons: Singletons::new(&config.singleton, now),
        runs: vec![on_starting],
        stage: Stage::OnStarting,
        reload: Reload::default(),
        systemd: a.systemd,
        children: children::Inheritance {
            inherited: Environment::inherited(std::env::vars()),
            own,
            credentials: a.credentials,
            cgroup_procs: a.watcher.cgroup().map(Cgroup::procs_fd),
            cgroup_dir: a.watcher.cgroup().map(Cgroup::dir_fd),
        },
        statuses: BTreeMap::new(),
        rejected_notifications: LogLimit::new(log_limit::REJECTED_EVERY),
        config,
        options,
        listeners: a.listeners,
        signals: a.signals,
        notify: a.notify,
        tickets: a.tickets,
        pidfile: a.pidfile,
        failure: None,
        swept: BTreeSet::new(),
        groups: Groups::default(),
        watcher: a.watcher,
    }
}
