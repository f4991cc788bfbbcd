//! The configuration: `supervisor.toml` read, checked and resolved.
//!
//! [`load`] reads a file and returns either a fully resolved [`Config`] (defaults filled in,
//! relative paths made absolute against the config file's directory, `count = "auto"` and
//! `WEB_CONCURRENCY` applied) or every error found, each with its key path, line and column.
//! Nothing outside this module parses TOML; the README's configuration reference documents
//! every key.

mod schema;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use schema::parse_str;

/// A fully resolved configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The config file this was read from (absolute).
    #[serde(serialize_with = "lossy")]
    pub path: PathBuf,
    /// The directory children run in: `directory` if set (a presup addition), else the config
    /// file's directory. Relative paths in the file, `directory` included, are resolved against
    /// the config file's directory, never against this.
    #[serde(serialize_with = "lossy")]
    pub directory: PathBuf,
    #[serde(serialize_with = "lossy_opt")]
    pub pidfile: Option<PathBuf>,
    #[serde(with = "human")]
    pub graceful_timeout: Duration,
    /// Optional top-level privilege drop: every child runs as this user (and `group`), the
    /// master keeps its own.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Octal umask for children, e.g. `"022"` (printed back in octal).
    #[serde(serialize_with = "octal")]
    pub umask: Option<u32>,
    pub listen: Vec<Listen>,
    pub workers: Workers,
    pub hooks: Hooks,
    pub singleton: Vec<Singleton>,
    pub tickets: BTreeMap<String, Ticket>,
    /// The control socket (`presup status`, ...): `control.sock` in the master's runtime
    /// directory when unset.
    #[serde(serialize_with = "lossy_opt")]
    pub control: Option<PathBuf>,
    /// `[metrics]`: Prometheus' `/metrics`, served by a singleton the master runs.
    pub metrics: Option<Metrics>,
}

impl Singleton {
    /// A server of presup's own run as a singleton (the ticket and metrics servers: this
    /// program again, `command`): ready when it says `READY=1`, always restarted, TERM then
    /// SIGKILL after 5 s, its log on the master's stderr.
    pub fn presup_server(name: String, command: Vec<String>) -> Singleton {
        Singleton {
            name,
            command,
            // It says READY=1 once bound, so that its address may use port 0.
            ready: Ready::Notify,
            restart: Restart::Always,
            env: BTreeMap::new(),
            min_uptime: Duration::from_secs(1),
            boot_timeout: Duration::from_secs(10),
            stop_signal: Signal(nix::sys::signal::Signal::SIGTERM),
            stop_timeout: Duration::from_secs(5),
            // Its log goes to the master's stderr, reopened by no one.
            forward_signals: Vec::new(),
            restart_backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(30),
                reset: Duration::from_secs(10),
            },
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// The TCP address `/metrics` is served on.
    pub http: std::net::SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Listen {
    pub name: String,
    pub address: Address,
    pub backlog: u32,
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Tcp(std::net::SocketAddr),
    /// An absolute path (resolved against the config directory).
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workers {
    /// argv; empty only in library (preload) mode.
    pub command: Vec<String>,
    /// Resolved: `"auto"` is the CPU count, `WEB_CONCURRENCY` overrides when set.
    pub count: usize,
    pub env: BTreeMap<String, String>,
    pub ready: Ready,
    #[serde(with = "human")]
    pub min_uptime: Duration,
    #[serde(with = "human")]
    pub boot_timeout: Duration,
    #[serde(with = "human_opt")]
    pub watchdog: Option<Duration>,
    pub stop_signal: Signal,
    pub restart_backoff: Backoff,
    /// presup addition: a slot that fails to boot this many times in a row before the
    /// initial workers are all up stops the master with exit 3.
    pub boot_attempts: u32,
    /// Workers replaced at a time during a reload.
    pub reload_batch: usize,
    /// The signals the master passes on to the workers when it receives them (only USR1).
    pub forward_signals: Vec<Signal>,
    /// `command` runs once, as the *stem*, which loads the app and forks each worker when
    /// the master asks (`crate::stem`).
    pub preload: bool,
}

/// Exponential restart backoff, per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Backoff {
    #[serde(with = "human")]
    pub initial: Duration,
    #[serde(with = "human")]
    pub max: Duration,
    /// presup addition: a child that stayed up this long resets its slot's backoff.
    #[serde(with = "human")]
    pub reset: Duration,
}

/// When a child counts as up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ready {
    /// Up once alive for `min_uptime`.
    Spawn,
    /// Up at `READY=1` on the notification socket.
    Notify,
    /// Up once the Unix socket accepts a connection (singletons).
    UnixSocket(PathBuf),
    /// Up once the TCP address accepts a connection (singletons).
    Tcp(std::net::SocketAddr),
}

impl Serialize for Ready {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Ready::Spawn => s.serialize_str("spawn"),
            Ready::Notify => s.serialize_str("notify"),
            Ready::UnixSocket(p) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("unix_socket", &p.to_string_lossy())?;
                m.end()
            }
            Ready::Tcp(a) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("tcp", &a.to_string())?;
                m.end()
            }
        }
    }
}

/// A signal named in the config (`"TERM"`, `"SIGTERM"`, `"INT"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(pub nix::sys::signal::Signal);

impl Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str().trim_start_matches("SIG"))
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Hooks {
    pub on_starting: Vec<Hook>,
    pub when_ready: Vec<Hook>,
    pub on_reload: Vec<Hook>,
    pub worker_exit: Vec<Hook>,
    pub on_exit: Vec<Hook>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hook {
    pub command: Vec<String>,
    #[serde(with = "human")]
    pub timeout: Duration,
    pub retries: u32,
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Singleton {
    pub name: String,
    pub command: Vec<String>,
    pub ready: Ready,
    pub restart: Restart,
    pub env: BTreeMap<String, String>,
    #[serde(with = "human")]
    pub min_uptime: Duration,
    #[serde(with = "human")]
    pub boot_timeout: Duration,
    pub stop_signal: Signal,
    #[serde(with = "human")]
    pub stop_timeout: Duration,
    pub restart_backoff: Backoff,
    /// The signals the master passes on to this singleton when it receives them (only USR1).
    pub forward_signals: Vec<Signal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ticket {
    #[serde(with = "human")]
    pub interval: Duration,
    pub buckets: u32,
    pub daily_limit: Option<u64>,
    #[serde(with = "human")]
    pub daily_period: Duration,
    pub http: Option<std::net::SocketAddr>,
    /// Added to `interval` between two turns of a bucket, so that callers who wake up a little
    /// late still act `interval` apart (default: [`default_margin`]).
    #[serde(with = "human")]
    pub margin: Duration,
    /// Optional state file that survives a restart of the master.
    #[serde(serialize_with = "lossy_opt")]
    pub path: Option<PathBuf>,
}

/// The largest sizes a ticket file may have (8 bytes per bucket and per daily grant): larger
/// ones are a config error, and a ticket file whose header announces more is refused.
pub const MAX_BUCKETS: u32 = 1 << 16;
pub const MAX_DAILY_LIMIT: u64 = 1 << 20;

/// The `margin` of a ticket whose config does not set one: a twentieth of `interval`, at most
/// 50 ms (50 ms from an interval of 1 s up).
///
/// The margin is added to the spacing of a bucket's turns: they are reserved `interval +
/// margin` apart. A caller acts when it wakes up after its turn's instant, a little late and by
/// an amount that varies (scheduling, a busy event loop, the network to the ticket server); two
/// consecutive callers then act at least `interval` apart as long as the second one's delay is
/// no more than `margin` shorter than the first one's. Waiting `margin` longer on every turn
/// would not help: that delays both callers alike, and it is their difference that counts.
pub fn default_margin(interval: Duration) -> Duration {
    (interval / 20).min(Duration::from_millis(50))
}

/// How the workers of a config are started, which decides whether `[workers] command` is
/// needed: exec'd workers run it; workers forked from a program built on presup as a library
/// (preload) are that program, and need none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    Exec,
    Preload,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `workers.count` or `listen[1].address`; empty for syntax errors.
    pub key: String,
    /// 1-based line and column of the offending value or key, when known.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.key.is_empty(), self.line) {
            (true, 0) => write!(f, "{}", self.message),
            (true, _) => write!(f, "line {}, column {}: {}", self.line, self.column, self.message),
            (false, 0) => write!(f, "{}: {}", self.key, self.message),
            (false, _) => write!(
                f,
                "{}: line {}, column {}: {}",
                self.key, self.line, self.column, self.message
            ),
        }
    }
}

/// Everything wrong with a config file (never empty).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{}: {} error{}", self.path.display(), n, if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "\n  {}: {e}", self.path.display())?;
        }
        Ok(())
    }
}

/// [`load`] as the master does, at start and on HUP: with this process's `WEB_CONCURRENCY` and
/// CPU count.
pub fn load_for_this_process(path: &Path, launch: Launch) -> Result<Config, ConfigErrors> {
    let web_concurrency = std::env::var("WEB_CONCURRENCY").ok();
    load(path, web_concurrency.as_deref(), cpu_count(), launch)
}

/// Reads, parses, validates and resolves the config file at `path`.
///
/// `web_concurrency` is the value of `WEB_CONCURRENCY` (passed in so that tests and reloads
/// decide it explicitly); `cpus` is what `count = "auto"` means; `launch` says whether
/// `[workers] command` is needed.
pub fn load(
    path: &Path,
    web_concurrency: Option<&str>,
    cpus: usize,
    launch: Launch,
) -> Result<Config, ConfigErrors> {
    let fail = |message: String| ConfigErrors {
        path: path.to_path_buf(),
        errors: vec![ConfigError { key: String::new(), line: 0, column: 0, message }],
    };
    let abs = std::path::absolute(path).map_err(|e| fail(format!("cannot resolve path: {e}")))?;
    let text = read_file(&abs).map_err(fail)?;
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    if nix::unistd::geteuid().is_root() {
        unsafe_for_root(&abs, &dir).map_or(Ok(()), |m| Err(fail(m)))?;
    }
    parse_str(&text, &abs, &dir, web_concurrency, cpus, launch)
        .map_err(|errors| ConfigErrors { path: abs.clone(), errors })
}

/// The most workers a config (`count`, `WEB_CONCURRENCY`) or TTIN may ask for: 4 per CPU on a
/// 256-CPU machine, far under the kernel's default `pid_max` and a service's usual process
/// limit, while `count = 100000` is a typo that would only meet the process limit.
pub const MAX_WORKERS: usize = 1024;

/// The largest config file read: far above any real one, small enough to read at once.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file without ever blocking: it is opened non-blocking (a FIFO or a device
/// would otherwise block `open` until a writer appears) and must be a regular file of at most
/// [`MAX_CONFIG_BYTES`] in UTF-8.
fn read_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    let kind = meta.file_type();
    let what = match () {
        _ if kind.is_file() => None,
        _ if kind.is_dir() => Some("a directory"),
        _ if kind.is_fifo() => Some("a FIFO"),
        _ if kind.is_socket() => Some("a socket"),
        _ if kind.is_char_device() || kind.is_block_device() => Some("a device"),
        _ => Some("not a regular file"),
    };
    if let Some(what) = what {
        return Err(format!("cannot read: {what}; the config must be a regular file"));
    }
    let too_big = || format!("cannot read: larger than the limit of {MAX_CONFIG_BYTES} bytes");
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| format!("cannot read: not UTF-8 ({e})"))
}

/// Why a config file is not safe for a master running as root, as sshd's `StrictModes`: the
/// config says what runs as root, so nobody but its owner may change it. The file must not be
/// writable by group or others, nor its directory by others (unless sticky, like `/tmp`).
fn unsafe_for_root(file: &Path, dir: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode()).ok();
    let file_mode = mode(file)?;
    if file_mode & 0o022 != 0 {
        return Some(format!(
            "writable by group or others (mode {:04o}) while presup runs as root; refusing it (chmod go-w {})",
            file_mode & 0o7777,
            file.display()
        ));
    }
    let dir_mode = mode(dir)?;
    if dir_mode & 0o002 != 0 && dir_mode & 0o1000 == 0 {
        return Some(format!(
            "its directory {} is writable by others (mode {:04o}) while presup runs as root; refusing it (chmod o-w {})",
            dir.display(),
            dir_mode & 0o7777,
            dir.display()
        ));
    }
    None
}

/// The CPU count `count = "auto"` resolves to.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Prints a path as text, a byte that is not UTF-8 as U+FFFD (`presup check` prints the
/// config resolved even from a directory whose name is not UTF-8).
fn lossy<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

fn lossy_opt<S: serde::Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match path {
        Some(path) => lossy(path, s),
        None => s.serialize_none(),
    }
}

/// Prints a umask as it is written (`"0027"`).
fn octal<S: serde::Serializer>(mask: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match mask {
        Some(mask) => s.collect_str(&format_args!("{mask:04o}")),
        None => s.serialize_none(),
    }
}

/// Serde helpers printing durations the way they are written (`"250ms"`, `"30s"`).
mod human {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

mod human_opt {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}
