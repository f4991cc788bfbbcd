//! A STATUS (and the memory figures read beside it) rendered in Prometheus' text exposition
//! format 0.0.4: one `# HELP` and one `# TYPE` line per family, then its samples. Pure: the
//! server reads the master and `/proc`, this only writes text.
//!
//! Every family is always written, with no sample when there is nothing to count (no
//! singletons, a ticket without a daily limit), so that its HELP and TYPE are there from the
//! first scrape on. A family never holds two samples with the same labels (a duplicate, which
//! a well-formed STATUS never has, is dropped rather than make the whole scrape invalid).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::procfs::{Memory, Process};
use super::status::Status;

/// The `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The worker states of STATUS; each is written, 0 when no worker is in it.
const WORKER_STATES: [&str; 4] = ["starting", "up", "stopping", "draining"];
const EXIT_KINDS: [&str; 4] = ["crash", "boot_failure", "stopped", "watchdog"];
const RELOAD_RESULTS: [&str; 3] = ["done", "undone", "rejected"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

type Labels = Vec<(&'static str, String)>;

/// One metric family and its samples.
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Vec<(Labels, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family { name, kind, help, samples: Vec::new() }
    }

    fn gauge(name: &'static str, help: &'static str) -> Family {
        Family::new(name, Kind::Gauge, help)
    }

    fn counter(name: &'static str, help: &'static str) -> Family {
        Family::new(name, Kind::Counter, help)
    }

    fn with(mut self, labels: Labels, value: f64) -> Family {
        self.add(labels, value);
        self
    }

    fn add(&mut self, labels: Labels, value: f64) {
        if !self.samples.iter().any(|(l, _)| *l == labels) {
            self.samples.push((labels, value));
        }
    }

    fn write(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(self.help));
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        for (labels, value) in &self.samples {
            out.push_str(self.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (name, v)) in labels.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    let _ = write!(out, "{sep}{name}=\"{}\"", escape_label(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", number(*value));
        }
    }
}

/// What one scrape knows: the master's STATUS, the memory of the pids it names (those that
/// could be read), the master's own process figures (if they could be read).
pub struct Scrape<'a> {
    pub status: &'a Status,
    pub memory: &'a BTreeMap<i32, Memory>,
    pub master: Option<Process>,
}

/// The exposition of a scrape.
pub fn render(scrape: &Scrape) -> String {
    let mut families = master_families(scrape.status);
    families.extend(worker_families(scrape.status, scrape.memory));
    families.extend(singleton_families(scrape.status, scrape.memory));
    families.extend(stem_families(scrape.status, scrape.memory));
    families.extend(counter_families(scrape.status));
    families.extend(ticket_families(scrape.status));
    families.extend(process_families(scrape.master));
    let mut out = String::with_capacity(64 * 1024);
    for f in &families {
        f.write(&mut out);
    }
    out
}

/// The exposition when the master could not be asked: `presup_up 0`, with why in a comment.
pub fn render_down(why: &str) -> String {
    let mut out = format!("# presup: {}\n", why.replace(['\n', '\r'], " "));
    up(0.0).write(&mut out);
    out
}

fn up(value: f64) -> Family {
    Family::gauge("presup_up", "Whether the master answered this scrape on its control socket.")
        .with(vec![], value)
}

fn master_families(s: &Status) -> Vec<Family> {
    let m = &s.master;
    let mut workers = Family::gauge("presup_workers", "Workers, by state.");
    for state in WORKER_STATES {
        let n = s.workers.iter().filter(|w| w.state == state).count();
        workers.add(vec![("state", state.into())], n as f64);
    }
    vec![
        up(1.0),
        Family::gauge("presup_build_info", "The master's version, as a label; always 1.")
            .with(vec![("version", m.version.clone())], 1.0),
        Family::gauge(
            "presup_master_start_time_seconds",
            "When the master started, seconds since the epoch.",
        )
        .with(vec![], m.started_unix),
        Family::gauge("presup_master_uptime_seconds", "Seconds since the master started.")
            .with(vec![], m.uptime_seconds),
        Family::gauge(
            "presup_generation",
            "The config generation: 1 at start, +1 per accepted reload.",
        )
        .with(vec![], m.generation as f64),
        Family::gauge("presup_workers_target", "The number of workers the master keeps.")
            .with(vec![], m.workers_target as f64),
        workers,
    ]
}

fn worker_families(s: &Status, memory: &BTreeMap<i32, Memory>) -> Vec<Family> {
    let mut restarts =
        Family::counter("presup_worker_restarts_total", "Restarts of the worker of each slot.");
    for slot in &s.slots {
        restarts.add(vec![("slot", slot.slot.to_string())], slot.restarts as f64);
    }
    let mut exits = Family::counter("presup_worker_exits_total", "Worker exits, by kind.");
    for kind in EXIT_KINDS {
        let n = s.counters.worker_exits.get(kind).copied().unwrap_or(0);
        exits.add(vec![("kind", kind.into())], n as f64);
    }
    let mut rss = Family::gauge(
        "presup_worker_resident_memory_bytes",
        "Each worker's resident set size (Rss of smaps_rollup).",
    );
    let mut pss = Family::gauge(
        "presup_worker_proportional_memory_bytes",
        "Each worker's proportional set size (Pss of smaps_rollup): shared pages divided among their sharers.",
    );
    for w in &s.workers {
        if let Some(m) = memory.get(&w.pid) {
            let labels: Labels = vec![("slot", w.slot.to_string()), ("pid", w.pid.to_string())];
            rss.add(labels.clone(), m.rss as f64);
            pss.add(labels, m.pss as f64);
        }
    }
    vec![restarts, exits, rss, pss]
}

fn singleton_families(s: &Status, memory: &BTreeMap<i32, Memory>) -> Vec<Family> {
    let mut up = Family::gauge("presup_singleton_up", "Whether each singleton is up (ready).");
    let mut restarts =
        Family::counter("presup_singleton_restarts_total", "Restarts of each singleton.");
    let mut rss = Family::gauge(
        "presup_singleton_resident_memory_bytes",
        "Each singleton's resident set size.",
    );
    let mut pss = Family::gauge(
        "presup_singleton_proportional_memory_bytes",
        "Each singleton's proportional set size.",
    );
    for one in &s.singletons {
        let labels: Labels = vec![("name", one.name.clone())];
        up.add(labels.clone(), f64::from(u8::from(one.state == "up")));
        restarts.add(labels.clone(), one.restarts as f64);
        if let Some(m) = one.pid.and_then(|pid| memory.get(&pid)) {
            rss.add(labels.clone(), m.rss as f64);
            pss.add(labels, m.pss as f64);
        }
    }
    vec![up, restarts, rss, pss]
}

fn stem_families(s: &Status, memory: &BTreeMap<i32, Memory>) -> Vec<Family> {
    let mut forks = Family::counter(
        "presup_stem_forks_total",
        "Workers forked by the stem of each generation (preload).",
    );
    let mut rss = Family::gauge(
        "presup_stem_resident_memory_bytes",
        "The resident set size of the stem of each generation.",
    );
    let mut pss = Family::gauge(
        "presup_stem_proportional_memory_bytes",
        "The proportional set size of the stem of each generation.",
    );
    for stem in &s.stems {
        let labels: Labels = vec![("generation", stem.generation.to_string())];
        forks.add(labels.clone(), stem.forks as f64);
        if let Some(m) = memory.get(&stem.pid) {
            rss.add(labels.clone(), m.rss as f64);
            pss.add(labels, m.pss as f64);
        }
    }
    vec![forks, rss, pss]
}

fn counter_families(s: &Status) -> Vec<Family> {
    let mut reloads = Family::counter("presup_reloads_total", "Reloads, by result.");
    for result in RELOAD_RESULTS {
        let n = s.counters.reloads.get(result).copied().unwrap_or(0);
        reloads.add(vec![("result", result.into())], n as f64);
    }
    let mut hooks = Family::counter("presup_hook_runs_total", "Hook runs, by point and result.");
    for h in &s.counters.hook_runs {
        hooks.add(vec![("point", h.point.clone()), ("result", h.result.clone())], h.count as f64);
    }
    vec![reloads, hooks]
}

fn ticket_families(s: &Status) -> Vec<Family> {
    let mut grants = Family::counter("presup_ticket_grants_total", "Turns granted by each ticket.");
    let mut wait = Family::counter(
        "presup_ticket_wait_seconds_total",
        "Seconds waited for the turns of each ticket.",
    );
    let mut daily =
        Family::gauge("presup_ticket_daily_remaining", "Turns left in each ticket's daily window.");
    let mut next = Family::gauge(
        "presup_ticket_next_free_seconds",
        "Seconds until each bucket's next free turn (0: free now).",
    );
    for t in &s.tickets {
        let labels: Labels = vec![("ticket", t.name.clone())];
        grants.add(labels.clone(), t.grants as f64);
        if let Some(w) = t.wait_seconds_total {
            wait.add(labels.clone(), w);
        }
        if let Some(left) = t.daily_left {
            daily.add(labels, left as f64);
        }
        for b in &t.buckets {
            let labels = vec![("ticket", t.name.clone()), ("bucket", b.bucket.to_string())];
            next.add(labels, b.next_free_in_seconds);
        }
    }
    vec![grants, wait, daily, next]
}

fn process_families(p: Option<Process>) -> Vec<Family> {
    let mut cpu = Family::counter(
        "process_cpu_seconds_total",
        "The master's user and system CPU time, seconds.",
    );
    let mut rss =
        Family::gauge("process_resident_memory_bytes", "The master's resident memory, bytes.");
    let mut vsz =
        Family::gauge("process_virtual_memory_bytes", "The master's virtual memory, bytes.");
    let mut fds = Family::gauge("process_open_fds", "The master's open file descriptors.");
    let mut max = Family::gauge("process_max_fds", "The master's limit on open file descriptors.");
    let mut start = Family::gauge(
        "process_start_time_seconds",
        "When the master started, seconds since the epoch.",
    );
    if let Some(p) = p {
        cpu.add(vec![], p.cpu_seconds);
        rss.add(vec![], p.resident_bytes as f64);
        vsz.add(vec![], p.virtual_bytes as f64);
        if let Some(n) = p.open_fds {
            fds.add(vec![], n as f64);
        }
        if let Some(n) = p.max_fds {
            max.add(vec![], n as f64);
        }
        start.add(vec![], p.start_time);
    }
    vec![cpu, rss, vsz, fds, max, start]
}

/// A sample value: integers without a fraction, `NaN`, `+Inf`, `-Inf` as the format spells them.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A label value: backslash, double quote and line feed escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests;
