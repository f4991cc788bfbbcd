//! The client side of the control socket: `presup status`, `reload`, `stop`, `scale` and
//! `restart`, each finding the master of `-c FILE` ([`discovery`]) or taking `--control PATH`,
//! sending one request per connection ([`request`]) and printing what a person needs
//! ([`render`]). The protocol is the one of `control-protocol.md` (issue 16), version 1.
//!
//! Exit codes: 0 done; 1 the command failed (the master said no, a reload was undone or
//! rejected, no master found, a timeout); 2 a usage error. What goes to stderr starts with
//! `presup: `; results go to stdout.

pub mod discovery;
pub mod render;
pub mod request;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::exit::Exit;
use crate::logs;
use crate::procstat::Stat;

use discovery::Found;
use request::RequestError;

/// How often `--wait` asks the master how far it got.
const POLL: Duration = Duration::from_millis(100);

/// The control subcommands of `presup`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show the master, its workers, singletons, stems, hooks, last reload and tickets
    /// (exit 1 when no master answers).
    Status(StatusArgs),
    /// Reload the config (as HUP); with --wait, exit 0 once done, 1 if undone or rejected.
    Reload(ReloadArgs),
    /// Stop the master (as TERM; --fast: as INT); with --wait, until it has exited.
    Stop(StopArgs),
    /// Set the number of workers: N, or +K / -K (as TTIN/TTOU; a reload sets the config's).
    Scale(ScaleArgs),
    /// Replace one worker (SLOT: the new one up before the old stops) or a singleton (NAME).
    Restart(RestartArgs),
}

/// Where the master is, beyond `-c FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The control socket; without it, the config's `control`, else the running master of
    /// the config found in the runtime directories.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// `--wait` and how long.
#[derive(Debug, Clone, clap::Args)]
pub struct Wait {
    /// Wait until it is done (and say how it went).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits at most (exit 1 past it).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// The master's STATUS object, with rss_bytes and pss_bytes added to each process.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub target: Target,
    /// A fast stop (as INT): children get QUIT, then SIGKILL after 1 s.
    #[arg(long)]
    pub fast: bool,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// The number of workers (1 to 1024), or +K / -K workers from the current number.
    #[arg(value_name = "N|+K|-K", allow_hyphen_values = true)]
    pub workers: String,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestartArgs {
    /// A worker's slot (a number), or a singleton's name.
    #[arg(value_name = "SLOT|SINGLETON")]
    pub what: String,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub wait: Wait,
}

/// What `scale` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(u32),
    By(i32),
}

/// The most workers a master runs (the config's bound).
const MAX_WORKERS: u32 = 1024;

/// Parses `N`, `+K` or `-K`.
pub fn parse_scale(text: &str) -> Result<Scale, String> {
    let bad = || format!("scale: {text:?} is not a number of workers (N, +K or -K)");
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => (0, text),
    };
    if !digits(rest) {
        return Err(bad());
    }
    let n: u32 = rest.parse().map_err(|_| bad())?;
    match sign {
        0 if (1..=MAX_WORKERS).contains(&n) => Ok(Scale::To(n)),
        0 => Err(format!("scale: {n} workers: a master runs 1 to {MAX_WORKERS}")),
        _ if (1..=MAX_WORKERS).contains(&n) => Ok(Scale::By(sign * n as i32)),
        _ => Err(format!("scale: {text}: K must be 1 to {MAX_WORKERS}")),
    }
}

/// What `restart` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    Slot(u32),
    Singleton(String),
}

/// A slot when `text` is all digits, else a singleton's name.
pub fn parse_restart(text: &str) -> Result<Restart, String> {
    if text.is_empty() {
        return Err("restart: name a slot or a singleton".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Restart::Slot)
            .map_err(|_| format!("restart: slot {text} is out of range"));
    }
    Ok(Restart::Singleton(text.to_owned()))
}

/// A failure: its message (printed after `presup: `) and exit code.
#[derive(Debug)]
struct Fail {
    exit: Exit,
    message: String,
}

impl Fail {
    fn failed(message: impl Into<String>) -> Fail {
        Fail { exit: Exit::Failed, message: message.into() }
    }
    fn usage(message: impl Into<String>) -> Fail {
        Fail { exit: Exit::Usage, message: message.into() }
    }
}

/// Runs a control subcommand against the master of `config` (`-c FILE`).
pub fn run(config: &Path, command: Command) -> ExitCode {
    let outcome = match command {
        Command::Status(a) => status(config, &a),
        Command::Reload(a) => reload(config, &a),
        Command::Stop(a) => stop(config, &a),
        Command::Scale(a) => scale(config, &a),
        Command::Restart(a) => restart(config, &a),
    };
    match outcome {
        Ok(()) => Exit::Clean.into(),
        Err(fail) => {
            logs::report(format_args!("presup: {}", fail.message));
            fail.exit.into()
        }
    }
}

/// Prints to stdout; a stdout closed early (`presup status | head -1`) is not an error.
fn print(text: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
}

fn locate(config: &Path, target: &Target) -> Result<Found, Fail> {
    discovery::find(config, target.control.as_deref()).map_err(Fail::failed)
}

/// Sends one request; the answer's fields when the master said yes.
fn call(
    found: &Found,
    command: &str,
    fields: Map<String, Value>,
) -> Result<Map<String, Value>, Fail> {
    let answer =
        request::send(&found.socket, command, fields).map_err(|e| connect_fail(found, &e))?;
    request::answer_result(answer).map_err(Fail::failed)
}

/// A request's failure, said for a person.
fn connect_fail(found: &Found, e: &RequestError) -> Fail {
    let socket = found.socket.display();
    let message = match e {
        RequestError::Connect { source, .. } => match source.raw_os_error() {
            Some(libc::ENOENT) => format!("{socket}: no such socket (is the master running?)"),
            Some(libc::ECONNREFUSED) => {
                format!("{socket}: nobody accepts on it (the master is gone?)")
            }
            Some(libc::EACCES) | Some(libc::EPERM) => format!(
                "{socket}: permission denied (the socket is another user's: run as root or as the master's user)"
            ),
            _ => e.to_string(),
        },
        _ => e.to_string(),
    };
    Fail::failed(message)
}

/// The STATUS object (without the memory of its processes: see [`render::add_memory`]).
fn fetch_status(found: &Found) -> Result<Value, Fail> {
    let answer = call(found, "status", Map::new())?;
    render::status_of(&answer)
        .cloned()
        .ok_or_else(|| Fail::failed("the master's status answer has no status object"))
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Polls `check` every [`POLL`] until it returns `Some`, or fails past `timeout`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>, Fail>,
) -> Result<T, Fail> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= end {
            let shown = humantime::format_duration(timeout);
            return Err(Fail::failed(format!("{what}: not done after {shown} (--timeout)")));
        }
        std::thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
    }
}

fn status(config: &Path, args: &StatusArgs) -> Result<(), Fail> {
    let found = locate(config, &args.target)?;
    let mut status = fetch_status(&found)?;
    render::add_memory(&mut status, render::memory);
    if args.json {
        print(&format!("{}\n", render::json(&status)));
    } else {
        print(&render::table(&status, now_unix()));
    }
    Ok(())
}

fn reload(config: &Path, args: &ReloadArgs) -> Result<(), Fail> {
    let found = locate(config, &args.target)?;
    let answer = call(&found, "reload", Map::new())?;
    let id = answer
        .get("reload")
        .and_then(Value::as_u64)
        .ok_or_else(|| Fail::failed("the master's reload answer has no reload id"))?;
    if !args.wait.wait {
        print(&format!("reload {id} requested\n"));
        return Ok(());
    }
    let outcome = wait_for(&format!("reload {id}"), args.wait.timeout, || {
        let status = fetch_status(&found).map_err(during(&format!("reload {id}")))?;
        let last = status.get("last_reload").filter(|r| r.is_object()).cloned();
        Ok(last.filter(|r| {
            r.get("id").and_then(Value::as_u64).is_some_and(|n| n >= id)
                && r.get("result").and_then(Value::as_str) != Some("in_progress")
        }))
    })?;
    let last_id = outcome.get("id").and_then(Value::as_u64).unwrap_or(id);
    let with = if last_id > id { format!(" (with reload {last_id})") } else { String::new() };
    match outcome.get("result").and_then(Value::as_str).unwrap_or("?") {
        "done" => {
            let generation = outcome.get("generation").and_then(Value::as_u64);
            let generation = generation.map(|g| g.to_string()).unwrap_or_else(|| "?".into());
            print(&format!("reload {id} done{with}: generation {generation}\n"));
            Ok(())
        }
        "undone" => {
            let why = outcome.get("why").and_then(Value::as_str).unwrap_or("no reason given");
            let why = render::clean(render::undone_why(why), 1000);
            Err(Fail::failed(format!("reload {id} undone{with}: {why}")))
        }
        "rejected" => {
            let errors = render::errors(&outcome);
            Err(Fail::failed(format!(
                "reload {id} rejected{with}: {}",
                render::clean(&errors, 4000)
            )))
        }
        other => Err(Fail::failed(format!("reload {id}: the master says {other:?}"))),
    }
}

/// A request that failed during the `--wait` for `what`, said as such (exit 1).
fn during(what: &str) -> impl Fn(Fail) -> Fail + '_ {
    move |fail| Fail::failed(format!("{what}: {}", fail.message))
}

fn stop(config: &Path, args: &StopArgs) -> Result<(), Fail> {
    let found = locate(config, &args.target)?;
    // The pid to wait for, named by the master itself (with its start time: never another
    // process that gets the pid later).
    let pid = match found.pid {
        Some(p) => Some(p),
        None if args.wait.wait => {
            let ping = call(&found, "ping", Map::new())?;
            ping.get("pid").and_then(Value::as_i64).map(|p| p as i32)
        }
        None => None,
    };
    let started = pid.and_then(Stat::read).map(|s| s.start_time);
    let mut fields = Map::new();
    fields.insert("fast".into(), args.fast.into());
    call(&found, "stop", fields)?;
    let how = if args.fast { "fast stop" } else { "graceful stop" };
    let shown = pid.map(|p| format!(" pid {p}")).unwrap_or_default();
    if !args.wait.wait {
        print(&format!("master{shown}: {how} requested\n"));
        return Ok(());
    }
    let Some(pid) = pid else {
        return Err(Fail::failed("stop --wait: the master did not say its pid"));
    };
    wait_for(&format!("stop of master pid {pid}"), args.wait.timeout, || {
        let same = Stat::read(pid).filter(|s| !s.gone() && Some(s.start_time) == started);
        Ok(same.is_none().then_some(()))
    })?;
    print(&format!("master pid {pid} stopped ({how})\n"));
    Ok(())
}

fn scale(config: &Path, args: &ScaleArgs) -> Result<(), Fail> {
    let wanted = parse_scale(&args.workers).map_err(Fail::usage)?;
    let found = locate(config, &args.target)?;
    let mut fields = Map::new();
    match wanted {
        Scale::To(n) => fields.insert("workers".into(), n.into()),
        Scale::By(k) => fields.insert("delta".into(), k.into()),
    };
    let answer = call(&found, "scale", fields)?;
    let target = answer
        .get("workers")
        .and_then(Value::as_i64)
        .ok_or_else(|| Fail::failed("the master's scale answer has no workers target"))?;
    if !args.wait.wait {
        print(&format!("workers: target {target}\n"));
        return Ok(());
    }
    wait_for(&format!("scale to {target} workers"), args.wait.timeout, || {
        let status = fetch_status(&found).map_err(during("scale"))?;
        let now_target = status["master"]["workers_target"].as_i64();
        if now_target != Some(target) {
            let now = now_target.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into());
            return Err(Fail::failed(format!(
                "scale: the workers' target is now {now}, not {target} (a reload or another scale meanwhile)"
            )));
        }
        Ok(scaled(&status, target).then_some(()))
    })?;
    print(&format!("workers: {target} up\n"));
    Ok(())
}

/// Whether `target` workers of the current generation are up and none is left above them.
fn scaled(status: &Value, target: i64) -> bool {
    let generation = status["master"]["generation"].as_i64();
    let workers = status["workers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let up = workers
        .iter()
        .filter(|w| w["state"] == "up" && w["generation"].as_i64() == generation)
        .count() as i64;
    let surplus = workers.iter().any(|w| w["slot"].as_i64().is_some_and(|s| s >= target));
    up == target && !surplus
}

fn restart(config: &Path, args: &RestartArgs) -> Result<(), Fail> {
    let what = parse_restart(&args.what).map_err(Fail::usage)?;
    let found = locate(config, &args.target)?;
    let before = fetch_status(&found)?;
    let old = pid_of(&before, &what, None);
    let mut fields = Map::new();
    let name = match &what {
        Restart::Slot(s) => {
            fields.insert("slot".into(), (*s).into());
            format!("slot {s}")
        }
        Restart::Singleton(n) => {
            fields.insert("singleton".into(), n.clone().into());
            format!("singleton {}", render::clean(n, 80))
        }
    };
    let answer = call(&found, "restart", fields)?;
    let id = answer
        .get("restart")
        .and_then(Value::as_u64)
        .ok_or_else(|| Fail::failed("the master's restart answer has no restart id"))?;
    let shown = |p: Option<i64>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    if !args.wait.wait {
        print(&format!("restart {id} of {name} requested (pid {})\n", shown(old)));
        return Ok(());
    }
    let new = wait_for(&format!("restart {id} of {name}"), args.wait.timeout, || {
        let status = fetch_status(&found).map_err(during("restart"))?;
        let done = status["restarts_done"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x.as_u64() == Some(id)));
        Ok(done.then(|| pid_of(&status, &what, old)))
    })?;
    print(&format!("{name} restarted: pid {} -> {}\n", shown(old), shown(new)));
    Ok(())
}

/// The pid of the up worker of a slot (not `not`, the one replaced; the newest generation
/// first), or of a singleton.
fn pid_of(status: &Value, what: &Restart, not: Option<i64>) -> Option<i64> {
    match what {
        Restart::Slot(slot) => {
            let workers = status["workers"].as_array()?;
            workers
                .iter()
                .filter(|w| w["slot"].as_u64() == Some(u64::from(*slot)) && w["state"] == "up")
                .filter(|w| not.is_none() || w["pid"].as_i64() != not)
                .max_by_key(|w| w["generation"].as_i64())
                .and_then(|w| w["pid"].as_i64())
        }
        Restart::Singleton(name) => {
            let singletons = status["singletons"].as_array()?;
            singletons.iter().find(|s| s["name"] == name.as_str())?["pid"].as_i64()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scale_takes_n_plus_k_and_minus_k() {
        assert_eq!(parse_scale("3"), Ok(Scale::To(3)));
        assert_eq!(parse_scale("1024"), Ok(Scale::To(1024)));
        assert_eq!(parse_scale("+1"), Ok(Scale::By(1)));
        assert_eq!(parse_scale("-2"), Ok(Scale::By(-2)));
        for bad in ["", "+", "-", "x", "3x", "1.5", "+-1", " 3", "--1", "+ 1"] {
            let err = parse_scale(bad).unwrap_err();
            assert!(err.contains("is not a number of workers"), "{bad:?}: {err}");
        }
        assert_eq!(parse_scale("0").unwrap_err(), "scale: 0 workers: a master runs 1 to 1024");
        assert!(parse_scale("1025").is_err());
        assert!(parse_scale("99999999999999").is_err());
        assert!(parse_scale("+0").is_err() && parse_scale("-0").is_err());
        assert!(parse_scale("-1025").is_err());
    }

    #[test]
    fn restart_takes_a_slot_or_a_name() {
        assert_eq!(parse_restart("2"), Ok(Restart::Slot(2)));
        assert_eq!(parse_restart("scheduler"), Ok(Restart::Singleton("scheduler".into())));
        assert_eq!(
            parse_restart("ticket:identify"),
            Ok(Restart::Singleton("ticket:identify".into()))
        );
        assert!(parse_restart("").is_err());
        assert!(parse_restart("99999999999").is_err());
    }

    #[test]
    fn scaled_means_up_in_this_generation_and_nothing_above() {
        let status = |workers: Value| json!({"master": {"generation": 2}, "workers": workers});
        let w = |slot: i64, generation: i64, state: &str| json!({"slot": slot, "pid": 100 + slot, "generation": generation, "state": state});
        assert!(scaled(&status(json!([w(0, 2, "up"), w(1, 2, "up")])), 2));
        assert!(!scaled(&status(json!([w(0, 2, "up"), w(1, 2, "starting")])), 2));
        assert!(!scaled(&status(json!([w(0, 2, "up"), w(1, 1, "up")])), 2), "old generation");
        assert!(!scaled(&status(json!([w(0, 2, "up"), w(1, 2, "stopping")])), 1), "surplus");
        assert!(scaled(&status(json!([w(0, 2, "up")])), 1));
    }

    #[test]
    fn the_restarted_pid_is_the_new_up_one() {
        let status = json!({
            "workers": [
                {"slot": 2, "pid": 10, "generation": 1, "state": "stopping"},
                {"slot": 2, "pid": 11, "generation": 1, "state": "up"},
                {"slot": 1, "pid": 12, "generation": 1, "state": "up"}],
            "singletons": [{"name": "scheduler", "pid": 13}, {"name": "flow", "pid": null}]
        });
        assert_eq!(pid_of(&status, &Restart::Slot(2), Some(10)), Some(11));
        assert_eq!(pid_of(&status, &Restart::Slot(2), Some(11)), None);
        assert_eq!(pid_of(&status, &Restart::Slot(3), None), None);
        assert_eq!(pid_of(&status, &Restart::Singleton("scheduler".into()), None), Some(13));
        assert_eq!(pid_of(&status, &Restart::Singleton("flow".into()), None), None);
    }
}
