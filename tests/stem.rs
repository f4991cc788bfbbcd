//! The stem (`[workers] preload = true`): the app is imported once, by the stem, and every
//! worker is forked from it through the `presup` Python package (`python/`), yet is the
//! master's own child, in the same pool as an exec'd worker.
//!
//! The fixture app (`app.py`, below) records each import in `imports` and each process in
//! `pids` (the harness checks none outlives the test), then calls `presup.stem()`, and each
//! worker serves `GET /` (who it is, as JSON), `GET /write/X` (a write to its own copy of the
//! preloaded state) on the listener with the standard library's HTTP server.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::{alive, kill, ppid, wait_dead, wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;

const APP: &str = r#"import http.server, json, os, sys, threading, time

VERSION = "one"
with open("imports", "a") as f:
    f.write(f"{os.getpid()} {VERSION}\n")
with open("pids", "a") as f:
    f.write(f"{os.getpid()}\n")
if os.environ.get("FAIL_AT_IMPORT"):
    raise RuntimeError("the new code is broken")
if os.environ.get("THREAD_BEFORE_STEM"):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
if os.environ.get("NEVER_READY"):
    time.sleep(3600)

# The preloaded state: built once, in the stem.
STATE = {"preloaded": list(range(100_000)), "mine": None}

import presup

worker = presup.stem(bind=os.environ.get("DEV_BIND"))
with open("pids", "a") as f:
    f.write(f"{os.getpid()}\n")


VARS = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "PRESUP_STEM_FD", "PRESUP_WORKER_ID",
        "PRESUP_PRIMARY", "PRESUP_GENERATION", "NOTIFY_SOCKET"]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/write/"):
            STATE["mine"] = self.path[len("/write/"):]
        body = json.dumps({
            "slot": worker.slot, "generation": worker.generation, "primary": worker.primary,
            "pid": os.getpid(), "version": VERSION, "preloaded": len(STATE["preloaded"]),
            "mine": STATE["mine"], "ppid": os.getppid(), "pgid": os.getpgid(0),
            "env": {k: os.environ.get(k) for k in VARS},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


listener = worker.listeners[0]
server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
server.socket = listener
server.serve_forever()
"#;

fn config(count: usize, extra_env: &str) -> String {
    format!(
        r#"graceful_timeout = "5s"
[[listen]]
name = "http"
address = "127.0.0.1:0"

[workers]
command = ["python3", "app.py"]
count = {count}
preload = true
min_uptime = "200ms"
boot_timeout = "20s"
env = {{ PYTHONUNBUFFERED = "1"{extra_env} }}
"#
    )
}

fn start(count: usize) -> (Dir, Presup, u16) {
    let dir = Dir::new();
    dir.write("app.py", APP);
    let p = Presup::start(&dir, &config(count, ""));
    let port = p.port("http");
    p.log.wait_for("ready: all workers up");
    (dir, p, port)
}

/// `GET path` on 127.0.0.1:`port`, as JSON.
fn get(port: u16, path: &str) -> std::io::Result<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(DEADLINE))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: t\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) =
        out.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(out.clone()))?;
    if !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("bad response: {out:?}")));
    }
    serde_json::from_str(body).map_err(std::io::Error::other)
}

/// The pids of the live workers the master knows, from the `/proc` of its children: every
/// child of the master except the watcher and the stems.
fn workers_of(p: &Presup, not: &BTreeSet<i32>) -> BTreeSet<i32> {
    let master = p.master_pid();
    common::children_of(master).into_iter().filter(|pid| !not.contains(pid)).collect()
}

fn imports(dir: &Dir) -> Vec<(i32, String)> {
    dir.lines("imports")
        .iter()
        .map(|l| {
            let (pid, version) = l.split_once(' ').unwrap();
            (pid.parse().unwrap(), version.to_owned())
        })
        .collect()
}

/// Requests until the answers came from `n` distinct workers; returns them by pid.
fn answers_from(port: u16, n: usize) -> std::collections::BTreeMap<i64, serde_json::Value> {
    let mut seen = std::collections::BTreeMap::new();
    wait_until(&format!("answers from {n} workers"), DEADLINE, || {
        if let Ok(v) = get(port, "/") {
            seen.insert(v["pid"].as_i64().unwrap(), v);
        }
        (seen.len() >= n).then_some(())
    });
    seen
}

#[test]
fn the_app_is_imported_once_and_every_worker_is_a_child_of_the_master() {
    let (dir, p, port) = start(3);
    let master = p.master_pid();
    let stem = common::pid_field(&p.log.wait_for("stem spawned"));
    let watcher = p.watcher_pid();

    // Three workers, each a child of the master (not of the stem), each its own group.
    let first: Vec<i32> = (0..3).map(|slot| p.worker_pid(slot, 1)).collect();
    for &w in &first {
        assert_eq!(ppid(w), Some(master), "worker {w} is the master's child");
        assert_eq!(nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(w))).unwrap().as_raw(), w);
    }
    assert_eq!(ppid(stem), Some(master));
    let answers = answers_from(port, 3);
    let slots: BTreeSet<i64> = answers.values().map(|v| v["slot"].as_i64().unwrap()).collect();
    assert_eq!(slots, [0, 1, 2].into());
    for v in answers.values() {
        assert_eq!(v["preloaded"], 100_000, "the preloaded state is there");
        assert_eq!(v["generation"], 1);
        assert_eq!(v["primary"].as_bool(), Some(v["slot"] == 0));
    }
    // The environment is a worker's (as the app sees it: a forked process's /proc/PID/environ
    // still shows the stem's), LISTEN_PID its own.
    for v in answers.values() {
        let env = &v["env"];
        assert_eq!(env["LISTEN_PID"].as_str(), Some(v["pid"].to_string().as_str()), "{v}");
        assert_eq!(
            (env["LISTEN_FDS"].as_str(), env["LISTEN_FDNAMES"].as_str()),
            (Some("1"), Some("http"))
        );
        assert!(env["PRESUP_STEM_FD"].is_null(), "the stem's own variable is not a worker's: {v}");
        assert!(env["NOTIFY_SOCKET"].is_string());
        let slot = v["slot"].as_i64().unwrap();
        assert_eq!(env["PRESUP_WORKER_ID"].as_str(), Some(slot.to_string().as_str()));
        assert_eq!(env["PRESUP_PRIMARY"].as_str(), Some(if slot == 0 { "1" } else { "0" }));
        assert_eq!(
            (v["ppid"].as_i64(), v["pgid"].as_i64()),
            (Some(i64::from(master)), v["pid"].as_i64())
        );
    }
    // A worker killed: forked again from the same stem, no new import.
    kill(first[1], Signal::SIGKILL);
    let again = p.worker_pid(1, 2);
    assert_eq!(ppid(again), Some(master));
    // Slot 0 (the primary) again only once its old process was reaped.
    kill(first[0], Signal::SIGKILL);
    let primary = p.worker_pid(0, 2);
    let log = p.log.text();
    let reaped = log.find(&format!("worker killed by SIGKILL slot=0 pid={} ", first[0])).unwrap();
    let spawned = log.find(&format!("worker spawned slot=0 pid={primary}")).unwrap();
    assert!(reaped < spawned, "the new primary started after the old one was reaped:\n{log}");
    // TTIN: one more, forked too.
    p.signal(Signal::SIGTTIN);
    let fourth = p.worker_pid(3, 1);
    assert_eq!(ppid(fourth), Some(master));
    answers_from(port, 4);
    assert_eq!(imports(&dir), vec![(stem, "one".to_owned())], "imported once, by the stem");
    // `presup status` shows the stem and the forks it served (3, two respawns, the TTIN).
    let (code, out, err) = common::run(&["status", "--json", "-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stems = status["stems"].as_array().unwrap();
    assert_eq!(stems.len(), 1, "{status:#}");
    assert_eq!(stems[0]["pid"].as_i64(), Some(i64::from(stem)));
    assert_eq!((stems[0]["state"].as_str(), stems[0]["forks"].as_u64()), (Some("ready"), Some(6)));
    let not: BTreeSet<i32> = [stem, watcher].into();
    wait_until("four live workers", DEADLINE, || {
        (workers_of(&p, &not) == [primary, again, first[2], fourth].into()).then_some(())
    });
    drop(p);
}

#[test]
fn a_worker_writes_to_its_own_copy_of_the_preloaded_state() {
    let (_dir, p, port) = start(2);
    let a = get(port, "/write/hello").unwrap();
    let writer = a["pid"].as_i64().unwrap();
    assert_eq!(a["mine"], "hello");
    // Another worker still sees the state as the stem built it.
    let other = wait_until("an answer from the other worker", DEADLINE, || {
        get(port, "/").ok().filter(|v| v["pid"].as_i64() != Some(writer))
    });
    assert_eq!(other["mine"], serde_json::Value::Null, "a write stays in its worker");
    assert_eq!(other["preloaded"], 100_000);
    drop(p);
}

#[test]
fn a_killed_stem_leaves_the_workers_serving_and_the_next_respawn_uses_the_new_stem() {
    let (dir, p, port) = start(2);
    let master = p.master_pid();
    let stem = common::pid_field(&p.log.wait_for("stem spawned"));
    let w0 = p.worker_pid(0, 1);
    let w1 = p.worker_pid(1, 1);
    kill(stem, Signal::SIGKILL);
    p.log.wait_for("stem exited (killed by SIGKILL); running workers keep serving");
    // The workers never stopped.
    assert!(alive(w0) && alive(w1));
    answers_from(port, 2);
    let second = common::pid_field(&p.log.wait_for_nth("stem spawned", 2));
    p.log.wait_for_nth("stem ready", 2);
    kill(w1, Signal::SIGKILL);
    let again = p.worker_pid(1, 2);
    assert_eq!(ppid(again), Some(master));
    let v = wait_until("an answer from the respawned worker", DEADLINE, || {
        get(port, "/").ok().filter(|v| v["pid"].as_i64() == Some(i64::from(again)))
    });
    assert_eq!(v["slot"], 1);
    let pids: Vec<i32> = imports(&dir).into_iter().map(|(pid, _)| pid).collect();
    assert_eq!(pids, vec![stem, second], "one import per stem");
    drop(p);
}

#[test]
fn hup_loads_the_new_code_in_a_new_stem_and_stops_the_old_one() {
    let (dir, p, port) = start(2);
    let old_stem = common::pid_field(&p.log.wait_for("stem spawned"));
    let old: Vec<i32> = (0..2).map(|s| p.worker_pid(s, 1)).collect();
    dir.write("app.py", &APP.replace(r#"VERSION = "one""#, r#"VERSION = "two""#));
    p.signal(Signal::SIGHUP);
    p.log.wait_for("reload done");
    let new_stem = common::pid_field(&p.log.wait_for_nth("stem spawned", 2));
    wait_dead(old_stem);
    for w in old {
        wait_dead(w);
    }
    // Every answer now comes from the new code, in generation 2.
    for _ in 0..10 {
        let v = get(port, "/").unwrap();
        assert_eq!((v["version"].as_str(), v["generation"].as_i64()), (Some("two"), Some(2)));
    }
    assert_eq!(imports(&dir), vec![(old_stem, "one".to_owned()), (new_stem, "two".to_owned())]);
    drop(p);
}

#[test]
fn hup_with_code_that_raises_at_import_is_undone_and_the_old_workers_still_answer() {
    let (dir, p, port) = start(2);
    let old_stem = common::pid_field(&p.log.wait_for("stem spawned"));
    let old: BTreeSet<i32> = (0..2).map(|s| p.worker_pid(s, 1)).collect();
    dir.write("supervisor.toml", &config(2, r#", FAIL_AT_IMPORT = "1""#));
    p.signal(Signal::SIGHUP);
    let undone = p.log.wait_for("reload to generation 2 undone");
    assert!(undone.contains("its stem failed"), "{undone}");
    // The traceback reached the log, and the old stem and workers serve on.
    p.log.wait_for("RuntimeError: the new code is broken");
    assert!(alive(old_stem));
    for _ in 0..6 {
        let v = get(port, "/").unwrap();
        assert!(old.contains(&(v["pid"].as_i64().unwrap() as i32)), "{v}");
        assert_eq!(v["generation"], 1);
    }
    // The old stem still forks: a killed worker comes back, generation 1.
    let w = *old.iter().next().unwrap();
    kill(w, Signal::SIGKILL);
    // Two workers at the start, none for the undone generation: the third is the respawn.
    let again = common::pid_field(&p.log.wait_for_nth("worker spawned slot=", 3));
    assert!(p.log.wait_for_nth("worker spawned slot=", 3).contains("generation=1"));
    assert_eq!(ppid(again), Some(p.master_pid()));
    answers_from(port, 2);
    drop(p);
}

#[test]
fn a_stem_that_starts_a_thread_before_stem_is_refused_with_exit_3() {
    let dir = Dir::new();
    dir.write("app.py", APP);
    let mut p = Presup::start(&dir, &config(2, r#", THREAD_BEFORE_STEM = "1""#));
    assert_eq!(p.wait_exit(), Some(3), "{}", p.log.text());
    let log = p.log.text();
    assert!(log.contains("2 threads"), "the count is named: {log}");
    assert!(log.contains("after presup.stem() returns"), "the fix is named: {log}");
    assert_eq!(p.log.count("worker spawned"), 0);
}

#[test]
fn a_stem_that_fails_at_import_or_is_never_ready_is_a_startup_failure() {
    let dir = Dir::new();
    dir.write("app.py", APP);
    let mut p = Presup::start(&dir, &config(2, r#", FAIL_AT_IMPORT = "1""#));
    assert_eq!(p.wait_exit(), Some(3), "{}", p.log.text());
    let log = p.log.text();
    assert!(log.contains("RuntimeError: the new code is broken"), "the traceback: {log}");
    assert!(log.contains("the stem `python3 app.py` could not start"), "{log}");
    assert!(log.contains("exited with code 1 before it was ready"), "{log}");

    let dir = Dir::new();
    dir.write("app.py", APP);
    let slow = config(2, r#", NEVER_READY = "1""#)
        .replace(r#"boot_timeout = "20s""#, r#"boot_timeout = "1s""#);
    let mut p = Presup::start(&dir, &slow);
    assert_eq!(p.wait_exit(), Some(3), "{}", p.log.text());
    assert!(p.log.text().contains("not ready within boot_timeout (1s)"), "{}", p.log.text());
}

#[test]
fn term_and_a_killed_master_leave_nothing_behind() {
    let (dir, mut p, _port) = start(3);
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(), Some(0), "{}", p.log.text());
    for pid in dir.pids() {
        assert!(!alive(pid), "{pid} outlived the master's TERM");
    }

    let (dir, p, _port) = start(3);
    let master = p.master_pid();
    // Each worker records its pid once stem() returned in it.
    let pids = wait_until("a stem and three workers recorded", DEADLINE, || {
        let pids = dir.pids();
        (pids.len() == 4).then_some(pids)
    });
    kill(master, Signal::SIGKILL);
    wait_until("every process gone after kill -9 of the master", Duration::from_secs(2), || {
        pids.iter().all(|&pid| !alive(pid)).then_some(())
    });
    drop(p);
}

#[test]
fn check_explains_preload() {
    let dir = Dir::new();
    dir.write("supervisor.toml", &config(4, ""));
    let (code, out, err) = common::run(&["check", "-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("runs once, as the stem"), "{out}");
    assert!(out.contains("preload = true"), "{out}");
    toml::from_str::<toml::Table>(&out).expect("still valid TOML");
}

#[test]
fn without_presup_the_app_runs_as_one_worker() {
    let dir = Dir::new();
    dir.write("app.py", APP);
    let port = common::free_port();
    let mut child = common::python3()
        .arg("app.py")
        .current_dir(dir.path())
        .env("DEV_BIND", format!("127.0.0.1:{port}"))
        .env_remove("PRESUP_STEM_FD")
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .unwrap();
    let v = wait_until("the app answers on its own", DEADLINE, || get(port, "/").ok());
    assert_eq!((v["slot"].as_i64(), v["primary"].as_bool()), (Some(0), Some(true)));
    assert_eq!(v["pid"].as_i64(), Some(i64::from(child.id())), "the same process");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn workers_that_say_ready_before_their_stem_answers_still_come_up() {
    // ready = "notify": each worker sends READY=1 at once, often before the master has read
    // the stem's answer naming it; eight at once make that race certain to be run.
    let dir = Dir::new();
    dir.write(
        "app.py",
        "import time, presup\nworker = presup.stem()\npresup.notify('READY=1')\ntime.sleep(3600)\n",
    );
    let toml = config(8, "").replace("min_uptime = \"200ms\"", "ready = \"notify\"");
    let mut p = Presup::start(&dir, &toml);
    p.log.wait_for("ready: all workers up");
    assert_eq!(p.log.count("boot_timeout"), 0, "{}", p.log.text());
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(), Some(0));
}

/// A stem that speaks the protocol by hand, with a flaw chosen by `FLAW`: `die` exits right
/// after its first answer (the answer is still unread in its socket when it is reaped);
/// `close` closes its socket after its first answer and lives on.
const HOSTILE_STEM: &str = r#"import json, os, socket, sys, time
with open("pids", "a") as f:
    f.write(f"{os.getpid()}\n")
s = socket.socket(fileno=int(os.environ["PRESUP_STEM_FD"]))
s.send(json.dumps({"v": 1, "type": "ready"}).encode())
answered = 0
while True:
    m = json.loads(s.recv(1 << 17))
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            s.close()
            with open("pids", "a") as f:
                f.write(f"{os.getpid()}\n")
            os.environ.clear()
            os.environ.update(m["env"])
            while os.getppid() != int(os.environ["PRESUP_MASTER_PID"]):
                time.sleep(0.001)
            time.sleep(3600)
            os._exit(0)
        os.setpgid(pid, pid)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.close(w)
    pid = int(os.read(r, 64))
    os.close(r)
    os.waitpid(middle, 0)
    s.send(json.dumps({"v": 1, "type": "forked", "id": m["id"], "pid": pid}).encode())
    answered += 1
    if os.environ["FLAW"] == "die":
        os._exit(0)
    if os.environ["FLAW"] == "close":
        s.close()
        time.sleep(3600)
"#;

#[test]
fn a_stem_that_dies_right_after_its_answer_leaves_one_accounted_worker() {
    let dir = Dir::new();
    dir.write("app.py", HOSTILE_STEM);
    let toml = config(1, r#", FLAW = "die""#);
    let mut p = Presup::start(&dir, &toml);
    let master = p.master_pid();
    // Its only worker was reported before the stem died: the pool has it, and slot 0 gets
    // no second process (the next stems fork nothing more: the slot is up).
    p.log.wait_for("ready: all workers up");
    let worker = p.worker_pid(0, 1);
    p.log.wait_for("stem exited (exited with code 0)");
    let others: Vec<i32> = common::children_of(master)
        .into_iter()
        .filter(|&pid| pid != worker && pid != p.watcher_pid())
        .filter(|&pid| {
            common::cmdline(pid).contains("app.py")
                && !p
                    .log
                    .text()
                    .contains(&format!("stem spawned: `python3 app.py` loads the app pid={pid}"))
        })
        .collect();
    assert!(others.is_empty(), "a worker nobody accounts for: {others:?}\n{}", p.log.text());
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(), Some(0));
}

#[test]
fn a_stem_that_closes_its_socket_is_killed_and_the_master_stays_responsive() {
    let dir = Dir::new();
    dir.write("app.py", HOSTILE_STEM);
    let mut p = Presup::start(&dir, &config(1, r#", FLAW = "close""#));
    p.log.wait_for("ready: all workers up");
    let first = p.worker_pid(0, 1);
    // The stem is killed for its closed socket and a new one starts...
    p.log.wait_for_nth("stem spawned", 2);
    // ... and the master still reaps and answers: a killed worker is forked again.
    kill(first, Signal::SIGKILL);
    let again = p.worker_pid(0, 2);
    assert_eq!(ppid(again), Some(p.master_pid()));
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(), Some(0), "{}", p.log.text());
}
