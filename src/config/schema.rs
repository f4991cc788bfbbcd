//! The schema: `supervisor.toml` text to a [`Config`], with every error found.
//!
//! The text is parsed into toml's span-carrying tree ([`DeTable`]) and read section by section
//! with the [`walker`], which records each problem (unknown key, wrong type, bad value) with
//! its key path and position and carries on, so one pass reports them all. Each section below
//! is its keys, their readers and their defaults; the readers of presup's own value types
//! (addresses, signals, commands...) follow. Checks that compare values with each other run
//! last, in [`super::validate`].

mod walker;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal::SIGTERM;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use self::walker::{all, Item, Table, Walker};
use super::validate::{self, Origins};
use super::{
    default_margin, Address, Backoff, Config, ConfigError, Hook, Hooks, Launch, Listen, Metrics,
    Ready, Restart, Signal, Singleton, Ticket, Workers, MAX_BUCKETS, MAX_DAILY_LIMIT, MAX_WORKERS,
};

const SEC: Duration = Duration::from_secs(1);

/// The longest Unix socket path `bind` takes: `sun_path` is 108 bytes with the NUL.
const SUN_PATH_MAX: usize = 107;

const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(30),
    reset: Duration::from_secs(10),
};

#[rustfmt::skip]
mod keys {
    pub const TOP: &[&str] = &["pidfile", "graceful_timeout", "directory", "user", "group",
        "umask", "listen", "workers", "hooks", "singleton", "tickets", "control", "metrics"];
    pub const METRICS: &[&str] = &["http"];
    pub const LISTEN: &[&str] = &["name", "address", "backlog"];
    pub const WORKERS: &[&str] = &["command", "count", "env", "ready", "min_uptime",
        "boot_timeout", "watchdog", "stop_signal", "restart_backoff", "boot_attempts",
        "reload_batch", "forward_signals", "preload"];
    pub const HOOK_POINTS: &[&str] = &["on_starting", "when_ready", "on_reload", "worker_exit",
        "on_exit"];
    pub const HOOK: &[&str] = &["command", "timeout", "retries", "env"];
    pub const SINGLETON: &[&str] = &["name", "command", "ready", "restart", "env", "min_uptime",
        "boot_timeout", "stop_signal", "stop_timeout", "restart_backoff", "forward_signals"];
    pub const TICKET: &[&str] = &["interval", "buckets", "daily_limit", "daily_period", "http",
        "path", "margin"];
    pub const BACKOFF: &[&str] = &["initial", "max", "reset"];
    pub const PROBE: &[&str] = &["unix_socket", "tcp"];
}

/// Parses and checks a config file's text. `path` is the file (recorded in the result), `dir`
/// the directory relative paths are resolved against; `web_concurrency` and `cpus` as for
/// [`super::load`], and `launch` whether `[workers] command` is needed. On failure: every
/// error found, in file order, positionless ones last.
pub fn parse_str(
    text: &str,
    path: &Path,
    dir: &Path,
    web_concurrency: Option<&str>,
    cpus: usize,
    launch: Launch,
) -> Result<Config, Vec<ConfigError>> {
    let doc = DeTable::parse(text).map_err(|e| vec![syntax_error(text, &e)])?;
    let root = Spanned::new(doc.span(), DeValue::Table(doc.into_inner()));
    let w = Walker::new(text, dir);
    let top = w.item(String::new(), &root).table(keys::TOP).expect("a document is a table");
    let (config, origins) = read_config(&top, path, web_concurrency, cpus, launch);
    for problem in validate::check(&config, &origins) {
        w.error_at_key(&problem.key, problem.message);
    }
    let errors = w.into_errors();
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map_or((0, 0), |s| walker::line_column(text, s.start));
    let message = e.message().to_owned();
    ConfigError { key: String::new(), line, column, message }
}

// ---- Sections ----

fn read_config(
    t: &Table,
    path: &Path,
    web_concurrency: Option<&str>,
    cpus: usize,
    launch: Launch,
) -> (Config, Origins) {
    let graceful_timeout = t.get_or("graceful_timeout", Item::duration, 30 * SEC);
    let listen = t.tables("listen", keys::LISTEN, read_listen);
    let read_singleton = |s: &Table| read_singleton(s, graceful_timeout);
    let singleton = t.tables("singleton", keys::SINGLETON, read_singleton);
    let has_singletons = t.map.get("singleton").and_then(|v| v.get_ref().as_array());
    let has_singletons = has_singletons.is_some_and(|a| !a.is_empty());
    let tickets = read_tickets(t);
    // A ticket's HTTP server is a singleton the master runs: a child, as a [[singleton]] is.
    let other_children = has_singletons || tickets.values().any(|t| t.http.is_some());
    let hooks = t.get("hooks", |v| v.table(keys::HOOK_POINTS));
    let origins = Origins {
        listen: listen.iter().map(|(at, _)| at.clone()).collect(),
        singleton: singleton.iter().map(|(at, _)| at.clone()).collect(),
    };
    let config = Config {
        path: path.to_path_buf(),
        directory: t.get("directory", Item::path).unwrap_or_else(|| t.w.dir.to_path_buf()),
        pidfile: t.get("pidfile", Item::path),
        graceful_timeout,
        user: t.get("user", Item::string),
        group: t.get("group", Item::string),
        umask: t.get("umask", Item::umask),
        listen: listen.into_iter().map(|(_, l)| l).collect(),
        workers: read_workers(t, web_concurrency, cpus, other_children, launch),
        hooks: hooks.map_or_else(Hooks::default, |h| read_hooks(&h)),
        singleton: singleton.into_iter().map(|(_, s)| s).collect(),
        tickets,
        control: t.get("control", |v| v.str().and_then(|s| v.unix_path(s))),
        metrics: t
            .get("metrics", |v| v.table(keys::METRICS))
            .and_then(|m| Some(Metrics { http: m.require("http", Item::socket_addr)? })),
    };
    (config, origins)
}

fn read_listen(t: &Table) -> Option<Listen> {
    let name = t.require("name", Item::name);
    let address = t.require("address", Item::address);
    let backlog = t.get_or("backlog", |v| v.u32(1..=65535), 1024);
    Some(Listen { name: name?, address: address?, backlog })
}

/// `[workers]`; when it is left out (allowed with other children: a singleton, or a ticket's
/// HTTP server), no command and no workers. A config with nothing at all to run is refused,
/// and so is one with exec'd workers (`launch`) and no command to run.
fn read_workers(
    top: &Table,
    web_concurrency: Option<&str>,
    cpus: usize,
    other_children: bool,
    launch: Launch,
) -> Workers {
    let item = top.opt("workers");
    if item.is_none() && !other_children {
        let message = "missing table [workers] (it may be left out only with a [[singleton]] \
                       or a ticket with `http`)";
        top.w.error("workers", top.span.clone(), message.to_owned());
    }
    let empty = DeTable::new();
    let (t, count) = match item.and_then(|v| v.table(keys::WORKERS)) {
        Some(t) => {
            let count = worker_count(&t, web_concurrency, cpus, other_children);
            (t, count)
        }
        None => (Table { path: "workers".to_owned(), map: &empty, ..top.clone() }, 0),
    };
    if launch == Launch::Exec && count > 0 {
        // Exec'd workers run the command; a program built on presup::prefork forks itself.
        t.require("command", |_| Some(()));
    }
    Workers {
        command: t.get("command", Item::command).unwrap_or_default(),
        count,
        env: t.get("env", Item::env).unwrap_or_default(),
        ready: t.get_or("ready", |v| read_ready(v, false), Ready::Spawn),
        min_uptime: t.get_or("min_uptime", Item::duration, SEC),
        boot_timeout: t.get_or("boot_timeout", Item::nonzero_duration, 30 * SEC),
        watchdog: t.get("watchdog", Item::nonzero_duration),
        stop_signal: t.get_or("stop_signal", Item::signal, Signal(SIGTERM)),
        restart_backoff: t.get_or("restart_backoff", Item::backoff, DEFAULT_BACKOFF),
        boot_attempts: t.get_or("boot_attempts", |v| v.u32(1..=u32::MAX), 5),
        reload_batch: t.get_or("reload_batch", |v| v.u32(1..=u32::MAX), 1) as usize,
        forward_signals: t.get("forward_signals", Item::forwarded).unwrap_or_default(),
        preload: read_preload(&t, launch),
    }
}

/// `preload = true`: `command` runs once, as the stem, and the workers are forked from it. A
/// program built on presup::prefork forks its workers from itself and has no stem.
fn read_preload(t: &Table, launch: Launch) -> bool {
    let Some(item) = t.opt("preload") else { return false };
    let preload = item.bool().unwrap_or(false);
    if preload && launch == Launch::Preload {
        let message = "preload = true starts `command` once as a stem; a program built on \
                       presup::prefork preloads in itself and has no `command`: remove the key";
        item.error(message.to_owned());
    }
    preload
}

/// `count` (default 1; `"auto"` is `cpus`), overridden by `WEB_CONCURRENCY` when set.
fn worker_count(
    t: &Table,
    web_concurrency: Option<&str>,
    cpus: usize,
    other_children: bool,
) -> usize {
    let item = t.opt("count");
    let count = match &item {
        None => 1,
        Some(v) if v.value().as_str() == Some("auto") => cpus.clamp(1, MAX_WORKERS),
        Some(v) if v.value().is_integer() => {
            v.u32(0..=MAX_WORKERS as u32).map_or(1, |n| n as usize)
        }
        Some(v) => v.expected("a positive integer or \"auto\"").unwrap_or(1),
    };
    if let Some(text) = web_concurrency {
        return match text.parse::<usize>() {
            Ok(n) if (1..=MAX_WORKERS).contains(&n) => n,
            _ => {
                let message =
                    format!("expected an integer from 1 to {MAX_WORKERS}, found {text:?}");
                t.w.error_at_key("WEB_CONCURRENCY", message);
                count
            }
        };
    }
    if let (0, Some(v), false) = (count, &item, other_children) {
        let message = "count 0 with no singleton nor ticket with `http` leaves nothing to run";
        v.error(message.to_owned());
    }
    count
}

fn read_hooks(t: &Table) -> Hooks {
    let point = |key| t.tables(key, keys::HOOK, read_hook).into_iter().map(|(_, h)| h).collect();
    Hooks {
        on_starting: point("on_starting"),
        when_ready: point("when_ready"),
        on_reload: point("on_reload"),
        worker_exit: point("worker_exit"),
        on_exit: point("on_exit"),
    }
}

fn read_hook(t: &Table) -> Option<Hook> {
    let command = t.require("command", Item::command);
    let timeout = t.get_or("timeout", Item::nonzero_duration, 60 * SEC);
    let retries = t.get_or("retries", |v| v.u32(0..=u32::MAX), 0);
    let env = t.get("env", Item::env).unwrap_or_default();
    Some(Hook { command: command?, timeout, retries, env })
}

fn read_singleton(t: &Table, graceful_timeout: Duration) -> Option<Singleton> {
    let name = t.require("name", Item::name);
    let command = t.require("command", Item::command);
    let restart = match t.get("restart", |v| v.one_of(&["always", "on-failure", "never"])) {
        Some("on-failure") => Restart::OnFailure,
        Some("never") => Restart::Never,
        _ => Restart::Always,
    };
    // The required fields last: every field is read (its errors reported) before `?` returns.
    Some(Singleton {
        ready: t.get_or("ready", |v| read_ready(v, true), Ready::Spawn),
        restart,
        env: t.get("env", Item::env).unwrap_or_default(),
        min_uptime: t.get_or("min_uptime", Item::duration, SEC),
        boot_timeout: t.get_or("boot_timeout", Item::nonzero_duration, 30 * SEC),
        stop_signal: t.get_or("stop_signal", Item::signal, Signal(SIGTERM)),
        stop_timeout: t.get_or("stop_timeout", Item::duration, graceful_timeout),
        restart_backoff: t.get_or("restart_backoff", Item::backoff, DEFAULT_BACKOFF),
        forward_signals: t.get("forward_signals", Item::forwarded).unwrap_or_default(),
        name: name?,
        command: command?,
    })
}

/// `"spawn"`, `"notify"`, and for singletons `{ unix_socket = "path" }` or `{ tcp = "addr" }`.
fn read_ready(v: &Item, singleton: bool) -> Option<Ready> {
    match (v.value(), singleton) {
        (DeValue::String(_), _) => {
            let spawn = v.one_of(&["spawn", "notify"])? == "spawn";
            return Some(if spawn { Ready::Spawn } else { Ready::Notify });
        }
        (DeValue::Table(_), true) => {}
        (DeValue::Table(_), false) => {
            let message = "workers take \"spawn\" or \"notify\" ({ unix_socket } and { tcp } are \
                           for singletons)";
            return v.fail(message.to_owned());
        }
        _ => {
            let what = "\"spawn\", \"notify\", { unix_socket = \"...\" } or { tcp = \"...\" }";
            return v.expected(what);
        }
    }
    let t = v.table(keys::PROBE)?;
    match (t.opt("unix_socket"), t.opt("tcp")) {
        (Some(path), None) => path.unix_path(path.str()?).map(Ready::UnixSocket),
        (None, Some(addr)) => addr.socket_addr().map(Ready::Tcp),
        _ => v.fail("expected exactly one of unix_socket or tcp".to_owned()),
    }
}

fn read_tickets(top: &Table) -> BTreeMap<String, Ticket> {
    let Some(tickets) = top.get("tickets", Item::map) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, item) in tickets.entries() {
        let name: &str = key.get_ref();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            let message = format!(
                "invalid ticket name {name:?}: use only letters, digits and '_' (it becomes \
                 PRESUP_TICKET_<NAME>)"
            );
            top.w.error(&item.path, key.span(), message);
        }
        if let Some(ticket) = item.table(keys::TICKET).and_then(|t| read_ticket(&t)) {
            out.insert(name.to_owned(), ticket);
        }
    }
    out
}

fn read_ticket(t: &Table) -> Option<Ticket> {
    let interval = t.require("interval", Item::nonzero_duration);
    Some(Ticket {
        // The sizes a ticket file may have: a config error (exit 2), not a failed start.
        buckets: t.get_or("buckets", |v| v.u32(1..=MAX_BUCKETS), 1),
        daily_limit: t.get("daily_limit", |v| v.int(1..=MAX_DAILY_LIMIT)),
        daily_period: t.get_or("daily_period", Item::nonzero_duration, 24 * 3600 * SEC),
        http: t.get("http", Item::socket_addr),
        path: t.get("path", Item::path),
        margin: t.get("margin", Item::duration).unwrap_or(default_margin(interval?)),
        interval: interval?,
    })
}

// ---- presup's value types ----

impl Item<'_> {
    /// argv: a non-empty array of strings whose program is not empty.
    fn command(&self) -> Option<Vec<String>> {
        let argv = all(self.array()?.iter().map(Item::string))?;
        match argv.first() {
            Some(program) if !program.is_empty() => Some(argv),
            _ => self.fail("empty command".to_owned()),
        }
    }

    /// Environment variables: string values, names without `=`.
    fn env(&self) -> Option<BTreeMap<String, String>> {
        let t = self.map()?;
        let pairs = t.entries().map(|(key, v)| {
            let name: &str = key.get_ref();
            if name.is_empty() || name.contains(['=', '\0']) {
                let message = format!("invalid environment variable name {name:?}");
                self.w.error(&v.path, key.span(), message);
                return None;
            }
            Some((name.to_owned(), v.string()?))
        });
        all(pairs).map(BTreeMap::from_iter)
    }

    /// A listener or singleton name: it goes into `LISTEN_FDNAMES` (`:`-separated) and logs.
    fn name(&self) -> Option<String> {
        let valid = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
        match self.str()? {
            "" => self.fail("empty name".to_owned()),
            s if s.chars().all(valid) => Some(s.to_owned()),
            s => {
                self.fail(format!("invalid name {s:?}: use only letters, digits, '_', '.' and '-'"))
            }
        }
    }

    /// A path, absolute against the config file's directory.
    fn path(&self) -> Option<PathBuf> {
        match self.str()? {
            "" => self.fail("empty path".to_owned()),
            s => Some(absolute(self.w.dir, s)),
        }
    }

    /// `"TERM"`, `"SIGTERM"`, `"term"`...
    fn signal(&self) -> Option<Signal> {
        let s = self.str()?;
        let upper = s.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
        let unknown = |_| self.error(format!("unknown signal {s:?}"));
        name.parse().map(Signal).map_err(unknown).ok()
    }

    /// `["USR1"]`: the signals the master passes on. Only USR1 may be: the master acts on the
    /// others itself (TERM, HUP...), and a child stops when it should with its `stop_signal`.
    fn forwarded(&self) -> Option<Vec<Signal>> {
        let signals = all(self.array()?.iter().map(|v| {
            let signal = v.signal()?;
            if signal.0 != nix::sys::signal::Signal::SIGUSR1 {
                return v.fail(format!(
                    "{} cannot be forwarded: only USR1 is (the master acts on the other signals itself)",
                    signal.0.as_str()
                ));
            }
            Some(signal)
        }))?;
        Some(signals)
    }

    /// `"022"`: one to four octal digits, at most 0o777.
    fn umask(&self) -> Option<u32> {
        let DeValue::String(s) = self.value() else {
            return self.expected("a string of octal digits like \"022\"");
        };
        let octal = (1..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
        match u32::from_str_radix(s, 8) {
            Ok(mask) if octal && mask <= 0o777 => Some(mask),
            _ => self.fail(format!(
                "invalid umask {:?}: expected octal digits like \"022\" or \"0027\"",
                s.as_ref()
            )),
        }
    }

    /// `{ initial, max, reset }`, each optional; `initial` must be positive and at most `max`.
    fn backoff(&self) -> Option<Backoff> {
        let t = self.table(keys::BACKOFF)?;
        let d = DEFAULT_BACKOFF;
        let b = Backoff {
            initial: t.get_or("initial", Item::nonzero_duration, d.initial),
            max: t.get_or("max", Item::duration, d.max),
            reset: t.get_or("reset", Item::duration, d.reset),
        };
        if b.initial > b.max {
            let initial = humantime::format_duration(b.initial);
            let max = humantime::format_duration(b.max);
            self.error(format!("initial ({initial}) is longer than max ({max})"));
        }
        Some(b)
    }

    /// A listener address: `"host:port"`, `"[v6]:port"` or `"unix:path"`.
    fn address(&self) -> Option<Address> {
        let s = self.str()?;
        match s.strip_prefix("unix:") {
            Some(path) => self.unix_path(path).map(Address::Unix),
            None => self.tcp(s).map(Address::Tcp),
        }
    }

    /// A TCP address only: `"host:port"` or `"[v6]:port"`.
    fn socket_addr(&self) -> Option<SocketAddr> {
        match self.str()? {
            s if s.starts_with("unix:") => {
                self.fail(format!("expected a TCP \"host:port\", found {s:?}"))
            }
            s => self.tcp(s),
        }
    }

    fn tcp(&self, s: &str) -> Option<SocketAddr> {
        let invalid = |why| self.error(format!("invalid address {s:?}: {why}"));
        parse_socket_addr(s).map_err(invalid).ok()
    }

    /// A Unix socket path, made absolute and checked against `sun_path`'s size.
    fn unix_path(&self, s: &str) -> Option<PathBuf> {
        if s.is_empty() {
            return self.fail("empty unix socket path".to_owned());
        }
        let path = absolute(self.w.dir, s);
        let n = path.as_os_str().len();
        if n > SUN_PATH_MAX {
            let path = path.display();
            return self.fail(format!(
                "unix socket path {path} is {n} bytes long, over the limit of {SUN_PATH_MAX}"
            ));
        }
        Some(path)
    }
}

/// `dir.join(path)` without `.` components or doubled slashes.
fn absolute(dir: &Path, path: &str) -> PathBuf {
    dir.join(path).components().collect()
}

/// `"127.0.0.1:8000"`, `"[::1]:8000"`, or `"localhost:8000"` (127.0.0.1); no name lookups.
fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("expected \"host:port\" or \"[ipv6]:port\"".to_owned());
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("invalid port {port:?}"));
    };
    match host {
        "localhost" => Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        _ if host.parse::<IpAddr>().is_ok() => {
            Err("an IPv6 address goes in brackets, e.g. \"[::1]:8000\"".to_owned())
        }
        _ => Err(format!("the host must be an IP address or \"localhost\", not {host:?}")),
    }
}
