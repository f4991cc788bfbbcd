//! `[metrics] http`: the metrics server run by a real master as a singleton, scraped over HTTP
//! and parsed by Prometheus' own Python parser (`prometheus_client`, from the tests' venv),
//! which fails the test on anything it cannot read; and the server alone (READY=1, a master
//! that cannot be asked, TERM).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{
    children_of, field, free_port, kill, python3, wait_dead, wait_until, Dir, KillOnDrop, Presup,
    DEADLINE,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// A worker that execs `sleep` (so its pid is the one the master started).
const WORKER: &str = "exec sleep 1000";

struct Response {
    code: u16,
    head: String,
    body: String,
}

fn get(port: u16, path: &str) -> Response {
    try_get(port, path).unwrap()
}

/// A GET, or the error of the connection (a server being replaced refuses it for a moment).
fn try_get(port: u16, path: &str) -> std::io::Result<Response> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{out:?}"));
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    Ok(Response { code, head: head.to_owned(), body: body.to_owned() })
}

/// `text` parsed by prometheus_client's text parser, as JSON: `[{name, type, help, samples:
/// [[name, labels, value]]}]`. Any parse error fails the test, and so do the mistakes the
/// parser lets pass (see below); the unit tests of the rendering read it back more strictly.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type, "help": f.documentation,
                "samples": [[s.name, s.labels, s.value] for s in f.samples]})
print(json.dumps(out))
"#;

fn parse(text: &str) -> Vec<Value> {
    let mut child = python3()
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client cannot parse the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families = serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap();
    // What the parser lets pass but Prometheus would not take: a family split in two (a sample
    // away from its family reads as one more family), or one without a TYPE ("unknown").
    let mut names = BTreeSet::new();
    for f in &families {
        assert!(names.insert(f["name"].as_str().unwrap()), "family {} twice in\n{text}", f["name"]);
        assert!(f["type"] == "gauge" || f["type"] == "counter", "{f}");
    }
    families
}

/// The samples named `name` of a parsed scrape: (labels, value).
fn samples(families: &[Value], name: &str) -> Vec<(serde_json::Map<String, Value>, f64)> {
    families
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .filter(|s| s[0] == name)
        .map(|s| (s[1].as_object().unwrap().clone(), s[2].as_f64().unwrap()))
        .collect()
}

fn value(families: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(families, name).into_iter().find_map(|(l, v)| {
        let same = l.len() == labels.len()
            && labels.iter().all(|(k, x)| l.get(*k) == Some(&Value::from(*x)));
        same.then_some(v)
    })
}

fn family<'a>(families: &'a [Value], name: &str) -> &'a Value {
    families.iter().find(|f| f["name"] == name).unwrap_or_else(|| panic!("no family {name}"))
}

/// The value of sample line `prefix` (name and labels as written) in a raw scrape: for cheap
/// polling; what the test checks is parsed with prometheus_client.
fn raw(body: &str, prefix: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `ready(body)`, then returns the scrape parsed.
fn scrape_until(port: u16, what: &str, ready: impl Fn(&str) -> bool) -> (String, Vec<Value>) {
    let body = wait_until(what, DEADLINE, || {
        let r = try_get(port, "/metrics").ok()?;
        (r.code == 200 && ready(&r.body)).then_some(r.body)
    });
    let parsed = parse(&body);
    (body, parsed)
}

/// The pids of the worker memory gauges of a parsed scrape.
fn memory_pids(families: &[Value], name: &str) -> BTreeSet<i32> {
    samples(families, name)
        .iter()
        .map(|(l, _)| l["pid"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn a_real_master_scraped_and_parsed_through_ttin_and_a_killed_worker() {
    let started = now_unix();
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let port = free_port();
    let mut presup = Presup::start(
        &dir,
        &format!(
            r#"graceful_timeout = "5s"
[metrics]
http = "127.0.0.1:{port}"
[workers]
command = ["./worker.sh"]
count = 2
min_uptime = "100ms"
"#
        ),
    );
    let master = presup.master_pid();
    let watcher = presup.watcher_pid();
    let server = field::<i32>(&presup.log.wait_for("singleton spawned"), "pid");
    // It runs no fixture script: recorded so that the harness checks it ends with the master.
    dir.record_pid(server);
    // Ready once bound (READY=1): from here on it accepts.
    presup.log.wait_for("singleton ready");
    let workers_of = |master: i32| -> BTreeSet<i32> {
        children_of(master).into_iter().filter(|&p| p != watcher && p != server).collect()
    };

    let (_, f) = scrape_until(port, "2 workers up", |b| {
        raw(b, r#"presup_workers{state="up"}"#) == Some(2.0)
    });
    let r = get(port, "/metrics");
    assert!(
        r.head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        r.head
    );
    assert_eq!(value(&f, "presup_up", &[]), Some(1.0));
    assert_eq!(value(&f, "presup_workers_target", &[]), Some(2.0));
    assert_eq!(value(&f, "presup_generation", &[]), Some(1.0));
    for state in ["starting", "stopping", "draining"] {
        assert_eq!(value(&f, "presup_workers", &[("state", state)]), Some(0.0), "{state}");
    }
    // The parser's view of the types (it names a counter family without `_total`).
    assert_eq!(family(&f, "presup_workers")["type"], "gauge");
    assert_eq!(family(&f, "presup_worker_restarts")["type"], "counter");
    assert_eq!(family(&f, "process_cpu_seconds")["type"], "counter");
    for fam in &f {
        assert!(!fam["help"].as_str().unwrap().is_empty(), "no HELP for {}", fam["name"]);
    }
    assert_eq!(value(&f, "presup_singleton_up", &[("name", "presup-metrics")]), Some(1.0));
    // The master's own process figures, read from /proc/<master pid> by the server.
    let start = value(&f, "process_start_time_seconds", &[]).unwrap();
    assert!(start >= started - 2.0 && start <= now_unix() + 1.0, "{start} vs {started}");
    let master_start = value(&f, "presup_master_start_time_seconds", &[]).unwrap();
    assert!((master_start - start).abs() < 2.0, "{master_start} vs {start}");
    assert!(value(&f, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(value(&f, "process_open_fds", &[]).unwrap() >= 3.0);
    assert!(value(&f, "process_max_fds", &[]).unwrap() >= 64.0);
    assert_eq!(memory_pids(&f, "presup_worker_resident_memory_bytes"), workers_of(master));

    // TTIN: a third worker, and its memory.
    kill(master, Signal::SIGTTIN);
    let (_, f) = scrape_until(port, "3 workers up with their memory", |b| {
        raw(b, r#"presup_workers{state="up"}"#) == Some(3.0)
            && b.lines()
                .filter(|l| l.starts_with("presup_worker_proportional_memory_bytes{"))
                .count()
                == 3
    });
    let workers = workers_of(master);
    assert_eq!(workers.len(), 3, "{workers:?}");
    assert_eq!(memory_pids(&f, "presup_worker_resident_memory_bytes"), workers);
    assert_eq!(memory_pids(&f, "presup_worker_proportional_memory_bytes"), workers);
    assert_eq!(value(&f, "presup_workers_target", &[]), Some(3.0));
    for (labels, v) in samples(&f, "presup_worker_proportional_memory_bytes") {
        let pid = &labels["pid"];
        let rss = samples(&f, "presup_worker_resident_memory_bytes")
            .into_iter()
            .find(|(l, _)| &l["pid"] == pid)
            .unwrap()
            .1;
        assert!(v > 0.0 && v <= rss, "pss {v} rss {rss} of {pid}");
    }

    // kill -9 the worker of slot 1: its restart counts.
    let victim = samples(&f, "presup_worker_resident_memory_bytes")
        .into_iter()
        .find(|(l, _)| l["slot"] == "1")
        .map(|(l, _)| l["pid"].as_str().unwrap().parse::<i32>().unwrap())
        .unwrap();
    assert_eq!(value(&f, "presup_worker_restarts_total", &[("slot", "1")]), Some(0.0));
    kill(victim, Signal::SIGKILL);
    wait_dead(victim);
    let (_, f) = scrape_until(port, "slot 1 restarted and up", |b| {
        raw(b, r#"presup_worker_restarts_total{slot="1"}"#) == Some(1.0)
            && raw(b, r#"presup_workers{state="up"}"#) == Some(3.0)
    });
    assert_eq!(value(&f, "presup_worker_restarts_total", &[("slot", "0")]), Some(0.0));
    assert_eq!(value(&f, "presup_worker_restarts_total", &[("slot", "2")]), Some(0.0));
    let pids = memory_pids(&f, "presup_worker_resident_memory_bytes");
    assert!(!pids.contains(&victim), "{pids:?}");
    let exits: f64 = samples(&f, "presup_worker_exits_total").iter().map(|(_, v)| v).sum();
    assert_eq!(exits, 1.0, "one worker exit, of some kind");

    // HUP: a new generation, the reload counted.
    kill(master, Signal::SIGHUP);
    let (_, f) = scrape_until(port, "the reload done", |b| {
        raw(b, r#"presup_reloads_total{result="done"}"#) == Some(1.0)
            && raw(b, r#"presup_workers{state="up"}"#) == Some(2.0)
            && raw(b, r#"presup_workers{state="draining"}"#) == Some(0.0)
            && raw(b, r#"presup_workers{state="stopping"}"#) == Some(0.0)
    });
    assert_eq!(value(&f, "presup_generation", &[]), Some(2.0));
    assert_eq!(
        value(&f, "presup_workers_target", &[]),
        Some(2.0),
        "a reload sets the config's count"
    );
    assert_eq!(value(&f, "presup_reloads_total", &[("result", "undone")]), Some(0.0));
    assert_eq!(memory_pids(&f, "presup_worker_resident_memory_bytes"), workers_of(master));
    // The metrics server may have been replaced by the reload: the one running now must end too.
    let last = presup.log.count("singleton spawned");
    let server_now = field::<i32>(&presup.log.wait_for_nth("singleton spawned", last), "pid");
    dir.record_pid(server_now);

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    wait_dead(server);
    wait_dead(server_now);
}

/// The server alone: READY=1 with its address once bound, 503 and `presup_up 0` (parsed) when
/// there is no master to ask, 404 elsewhere, exit 0 on TERM.
#[test]
fn the_server_alone_says_ready_answers_without_a_master_and_ends_on_term() {
    let dir = Dir::new();
    let notify = UnixDatagram::bind(dir.join("notify")).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let child = Command::new(common::bin())
        .args(["metrics-server", "--listen", "127.0.0.1:0", "--control"])
        .arg(dir.join("absent.sock"))
        .env("NOTIFY_SOCKET", dir.join("notify"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 from the metrics server");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    let port: u16 = message
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {message:?}"));

    let r = get(port, "/metrics");
    assert_eq!(r.code, 503);
    let f = parse(&r.body);
    assert_eq!(value(&f, "presup_up", &[]), Some(0.0));
    assert_eq!(family(&f, "presup_up")["type"], "gauge");
    assert!(r.body.contains("absent.sock"), "{}", r.body);
    assert_eq!(get(port, "/").code, 404);

    kill(child.id() as i32, Signal::SIGTERM);
    let status = wait_until("the server to exit", DEADLINE, || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("metrics server listening"), "{log}");
    assert!(log.contains("metrics server stopping"), "{log}");
}

/// A program built on `presup::prefork` is its own master: with `[metrics]` the master runs
/// `PROGRAM metrics-server ...`, which `prefork::main_with` must serve.
#[test]
fn a_prefork_program_serves_its_own_metrics() {
    let dir = Dir::new();
    let port = free_port();
    dir.write(
        "supervisor.toml",
        &format!(
            r#"graceful_timeout = "5s"
[metrics]
http = "127.0.0.1:{port}"
[[listen]]
name = "http"
address = "127.0.0.1:0"
[workers]
count = 2
ready = "notify"
boot_timeout = "30s"
"#
        ),
    );
    let mut presup = Presup::start_program(&dir, &common::example("preload"), &["--mb", "1"]);
    let server = field::<i32>(&presup.log.wait_for("singleton spawned"), "pid");
    dir.record_pid(server);
    presup.log.wait_for("singleton ready");
    let (_, f) = scrape_until(port, "2 forked workers up", |b| {
        raw(b, r#"presup_workers{state="up"}"#) == Some(2.0)
    });
    assert_eq!(value(&f, "presup_up", &[]), Some(1.0));
    assert_eq!(samples(&f, "presup_worker_proportional_memory_bytes").len(), 2);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    wait_dead(server);
}
