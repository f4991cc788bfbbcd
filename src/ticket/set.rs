//! The master's side of the tickets: it makes one file per `[tickets.NAME]` before any child
//! starts, gives every child `PRESUP_TICKET_<NAME>`, adds a ticket-server singleton for each
//! ticket with `http`, and logs the tickets' state when asked (USR1).
//!
//! Tickets are fixed for the master's life: a reload that changes them is logged and the
//! running ones stay (a file already mapped by the children cannot change its sizes).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::Flock;
use nix::unistd::{Gid, Uid};
use tracing::{info, warn};

use super::file::{self, Found};
use super::{env_var, Params, Ticket, TicketError};
use crate::config;

/// The singleton name of ticket `name`'s HTTP server; `:` cannot appear in a configured
/// singleton's name, so it never collides with one.
pub fn server_name(name: &str) -> String {
    format!("ticket:{name}")
}

/// The tickets of a master.
pub struct Tickets {
    entries: Vec<Entry>,
    /// The program the ticket servers run: this one.
    exe: PathBuf,
}

struct Entry {
    name: String,
    spec: config::Ticket,
    ticket: Ticket,
    /// The state file's shared lock, held while the master runs (only with `path`).
    _lock: Option<Flock<File>>,
}

impl Tickets {
    /// Makes every ticket: in `runtime_dir` (private to the master), or at its `path`. Files
    /// are made readable and writable by `owner` when the children drop privileges.
    pub fn create(
        tickets: &BTreeMap<String, config::Ticket>,
        runtime_dir: &Path,
        owner: Option<(Uid, Gid)>,
    ) -> Result<Tickets, TicketError> {
        let boot = file::boot_id();
        let exe = std::env::current_exe().map_err(|e| io(Path::new("/proc/self/exe"), e))?;
        let mut entries = Vec::new();
        for (name, spec) in tickets {
            let p = params(spec);
            let (path, file, lock) = match &spec.path {
                None => {
                    let path = runtime_dir.join(format!("ticket.{name}"));
                    let file = file::create(&path, &p, boot).map_err(|source| io(&path, source))?;
                    (path, file, None)
                }
                Some(path) => {
                    let (lock, found) = file::persistent(path, &p, boot).map_err(|e| match e {
                        file::FileError::Io(source) => io(path, source),
                        file::FileError::Refused(why) => TicketError::Config {
                            name: name.clone(),
                            why: format!("state file {}: {why}", path.display()),
                        },
                    })?;
                    log_found(name, path, &found);
                    let file = lock.try_clone().map_err(|e| io(path, e))?;
                    (path.clone(), file, Some(lock))
                }
            };
            // Through the file made or checked, never the path again (it could be a symlink
            // by now, in a directory another user owns).
            if let Some((uid, gid)) = owner {
                nix::unistd::fchown(&file, Some(uid), Some(gid))
                    .map_err(|e| io(&path, e.into()))?;
            }
            let ticket = Ticket::from_file(&path, &file)?;
            info!(ticket = %name, path = %path.display(), buckets = p.buckets, "ticket ready");
            entries.push(Entry { name: name.clone(), spec: spec.clone(), ticket, _lock: lock });
        }
        Ok(Tickets { entries, exe })
    }

    /// The fds the master keeps open (the state files' locks), which a child forked without
    /// exec closes; a ticket's mapping keeps no fd.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.entries.iter().filter_map(|e| e._lock.as_ref()).map(|l| l.as_raw_fd()).collect()
    }

    /// `PRESUP_TICKET_<NAME>` and the path, for every ticket.
    pub fn env(&self) -> Vec<(String, PathBuf)> {
        self.entries.iter().map(|e| (env_var(&e.name), e.ticket.path().to_path_buf())).collect()
    }

    /// Puts the ticket-server singletons (one per ticket with `http`) first among `config`'s
    /// singletons: they start before the others (which may use them) and stop after them.
    pub fn add_servers(&self, config: &mut config::Config) {
        let servers = self.servers();
        config.singleton.retain(|s| !servers.iter().any(|t| t.name == s.name));
        config.singleton.splice(0..0, servers);
    }

    /// The ticket-server singletons (one per ticket with `http`), running this program.
    pub fn servers(&self) -> Vec<config::Singleton> {
        let exe = self.exe.display().to_string();
        let entries = self.entries.iter().filter_map(|e| Some((e, e.spec.http?)));
        entries
            .map(|(e, addr)| {
                let command = vec![
                    exe.clone(),
                    "ticket-server".into(),
                    e.name.clone(),
                    "--listen".into(),
                    addr.to_string(),
                ];
                config::Singleton::presup_server(server_name(&e.name), command)
            })
            .collect()
    }

    /// Warns if a new config changes the tickets: they stay as they are until a restart.
    pub fn check_reload(&self, new: &BTreeMap<String, config::Ticket>) {
        let running: BTreeMap<&String, &config::Ticket> =
            self.entries.iter().map(|e| (&e.name, &e.spec)).collect();
        let new: BTreeMap<&String, &config::Ticket> = new.iter().collect();
        if running != new {
            warn!("the new config changes [tickets]: tickets are not reloaded; the running ones stay until presup is restarted");
        }
    }

    /// Each ticket's state for `presup status` (README, "Control"): the next free instant of
    /// each bucket (seconds from now), the grants so far, the daily budget left.
    pub fn status_json(&self) -> Vec<serde_json::Value> {
        self.entries
            .iter()
            .map(|e| {
                let s = e.ticket.status();
                let buckets: Vec<serde_json::Value> = s
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(b, &at)| {
                        let secs = at.saturating_sub(s.now) as f64 / 1e9;
                        serde_json::json!({ "bucket": b, "next_free_in_seconds": secs })
                    })
                    .collect();
                serde_json::json!({
                    "name": e.name,
                    "interval_seconds": e.spec.interval.as_secs_f64(),
                    "buckets": buckets,
                    "grants": s.reservations,
                    "takeovers": s.takeovers,
                    "wait_seconds_total": null,
                    "daily_limit": e.spec.daily_limit,
                    "daily_left": s.daily.as_ref().map(|d| d.left),
                })
            })
            .collect()
    }

    /// Logs each ticket's budget left and the next free instant of each bucket.
    pub fn log_status(&self) {
        for e in &self.entries {
            let s = e.ticket.status();
            let in_ = |at: u64| -> String {
                match at.saturating_sub(s.now) {
                    0 => "free".into(),
                    ns => format!("in {}", humantime::format_duration(round_ms(ns))),
                }
            };
            let buckets: Vec<String> =
                s.buckets.iter().enumerate().map(|(b, &at)| format!("{b}: {}", in_(at))).collect();
            let buckets = buckets.join(", ");
            let (reservations, takeovers) = (s.reservations, s.takeovers);
            match &s.daily {
                Some(d) => info!(
                    ticket = %e.name, %buckets, daily_left = d.left, daily_next = %in_(d.next),
                    reservations, takeovers, "ticket status"
                ),
                None => info!(ticket = %e.name, %buckets, reservations, takeovers, "ticket status"),
            }
        }
    }
}

fn round_ms(ns: u64) -> Duration {
    Duration::from_millis(ns.div_ceil(1_000_000))
}

fn io(path: &Path, source: std::io::Error) -> TicketError {
    TicketError::Io { path: path.to_path_buf(), source }
}

fn log_found(name: &str, path: &Path, found: &Found) {
    let path = path.display();
    match found {
        Found::Nothing => info!(ticket = %name, %path, "state file created"),
        Found::Kept => {
            info!(ticket = %name, %path, "state file of this boot: its last grants are kept")
        }
        Found::OtherBoot => {
            info!(ticket = %name, %path, "state file of a previous boot: started afresh")
        }
        Found::CarriedOver { from } => warn!(
            ticket = %name, %path,
            "state file made with other settings ({from:?}): its last grants are carried over"
        ),
    }
}

/// A ticket's params from its config (whose sizes the config checked: within
/// [`config::MAX_BUCKETS`] and [`config::MAX_DAILY_LIMIT`]). The spacing of a bucket's turns
/// is `interval + margin`; the daily window is `daily_period` as configured.
pub fn params(spec: &config::Ticket) -> Params {
    let limit = spec.daily_limit.unwrap_or(0);
    let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
    Params {
        buckets: spec.buckets,
        interval_ns: ns(spec.interval.saturating_add(spec.margin)).max(1),
        daily_limit: limit,
        daily_period_ns: if limit > 0 { ns(spec.daily_period).max(1) } else { 0 },
    }
}
