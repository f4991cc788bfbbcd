//! The three examples of `examples/`, run end to end: each test copies an example into its own
//! temp dir (so `run/` and state files land there), moves its fixed ports to free ones, starts
//! the example's local stand-in (the Discord API, the mail sink) itself, and runs presup on it.
//!
//! The Python children append their pid to `$EXAMPLE_PIDS` (the harness's `pids` file, so that
//! nothing may outlive a test) and, in the flow example, their starts and stops to
//! `$EXAMPLE_EVENTS`: appends to one file, so the file's line order is the order of events.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    accept_queue, alive, children_of, field, kill, wait_dead, wait_until, Dir, KillOnDrop, Presup,
    DEADLINE,
};
use nix::sys::signal::Signal;

/// Copies `examples/<name>` (its files, not its `run/`) into the test's dir, with the helper
/// module the examples share (`examples/presup_child.py`) beside them, where Python finds it
/// first.
fn copy_example(dir: &Dir, name: &str) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(examples.join(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name().to_str().unwrap())).unwrap();
        }
    }
    std::fs::copy(examples.join("presup_child.py"), dir.join("presup_child.py")).unwrap();
}

/// Replaces `from` by `to` in the test's copy of the config; `from` must be there.
fn edit_config(dir: &Dir, from: &str, to: &str) {
    let toml = dir.read("supervisor.toml");
    assert!(toml.contains(from), "{from:?} is not in the example's supervisor.toml");
    dir.write("supervisor.toml", &toml.replace(from, to));
}

/// Starts presup on the test's copy, its Python children reporting to the test's files.
fn start(dir: &Dir) -> Presup {
    let pids = dir.join("pids").display().to_string();
    let events = dir.join("events").display().to_string();
    let env = [("EXAMPLE_PIDS", pids.as_str()), ("EXAMPLE_EVENTS", events.as_str())];
    Presup::start_with(dir, &[], &env)
}

/// A local stand-in server started by the test (`python3 SCRIPT --port 0`), killed and reaped
/// when dropped.
struct Helper {
    child: KillOnDrop,
    port: u16,
}

impl Helper {
    fn start(dir: &Dir, script: &str) -> Helper {
        let port_file = dir.join(&format!("{script}.port"));
        let child = common::python3()
            .arg(script)
            .args(["--port", "0", "--port-file"])
            .arg(&port_file)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn python3");
        let mut helper = Helper { child: KillOnDrop(child), port: 0 };
        helper.port = wait_until(&format!("{script} to write its port"), DEADLINE, || {
            if let Some(status) = helper.child.try_wait().unwrap() {
                panic!("{script} exited: {status}");
            }
            std::fs::read_to_string(&port_file).ok()?.trim().parse().ok()
        });
        helper
    }

    /// GET `path` from the helper; its body.
    fn get(&self, path: &str) -> String {
        let (status, body) = http(self.port, "GET", path).unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }
}

/// Sends an HTTP/1.0 request to 127.0.0.1:`port` (without reading the answer).
fn send_request(port: u16, method: &str, path: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: t\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )?;
    Ok(s)
}

/// Reads an HTTP response to its end: status and body.
fn read_response(mut s: TcpStream) -> std::io::Result<(u16, String)> {
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let bad = || std::io::Error::other(format!("bad response: {out:?}"));
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    read_response(send_request(port, method, path)?)
}

/// Every integer value of `"key": N` in a JSON text, in order (the helpers' answers are flat
/// objects or lists of them, so this is enough to read them).
fn json_ints(text: &str, key: &str) -> Vec<i64> {
    let needle = format!("\"{key}\": ");
    text.match_indices(&needle)
        .map(|(at, _)| {
            let rest = &text[at + needle.len()..];
            let end = rest.find(|c: char| !c.is_ascii_digit() && c != '-').unwrap_or(rest.len());
            rest[..end].parse().unwrap()
        })
        .collect()
}

/// A `worker spawned` line of the master's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spawned {
    slot: usize,
    pid: i32,
    generation: u64,
}

fn spawned(presup: &Presup) -> Vec<Spawned> {
    presup
        .log
        .lines()
        .iter()
        .filter(|l| l.contains("worker spawned"))
        .map(|l| Spawned {
            slot: field(l, "slot"),
            pid: field(l, "pid"),
            generation: field(l, "generation"),
        })
        .collect()
}

/// Waits until `n` workers of `generation` were spawned; returns them.
fn wait_spawned(presup: &Presup, generation: u64, n: usize) -> Vec<Spawned> {
    wait_until(&format!("{n} workers of generation {generation}"), DEADLINE, || {
        let s: Vec<Spawned> =
            spawned(presup).into_iter().filter(|s| s.generation == generation).collect();
        (s.len() >= n).then_some(s)
    })
}

/// Checks that every worker of `pids`, and no other process, serves on `port`, whatever the
/// kernel's choice of worker for each connection: opens one connection per worker, each with
/// a request short of its last line, and waits until none is left to accept. A worker reads
/// its request to the end before it accepts again, so each connection is then in the hands of
/// a different worker. Only then are the requests finished: each worker answers one, with its
/// pid.
fn wait_all_answer(port: u16, pids: &[i32]) {
    let requests: Vec<TcpStream> = pids
        .iter()
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n").unwrap();
            s
        })
        .collect();
    wait_until(&format!("{} workers to take a connection each", pids.len()), DEADLINE, || {
        (accept_queue(port) == 0).then_some(())
    });
    let mut seen = BTreeSet::new();
    for mut s in requests {
        s.write_all(b"\r\n").unwrap();
        let (status, body) = read_response(s).unwrap();
        assert_eq!(status, 200, "{body}");
        let pid =
            body.split_whitespace().skip_while(|w| *w != "pid").nth(1).and_then(|p| p.parse().ok());
        let pid: i32 = pid.unwrap_or_else(|| panic!("no pid in {body:?}"));
        assert!(pids.contains(&pid), "answered by pid {pid}, not one of {pids:?}: {body:?}");
        assert!(seen.insert(pid), "pid {pid} answered twice: {body:?}");
    }
}

// ----- interactions: run once, not once per worker (seed 000) -----

/// The stand-in's `(registrations, rejected)`.
fn registrations(discord: &Helper) -> (i64, i64) {
    let body = discord.get("/count");
    (json_ints(&body, "registrations")[0], json_ints(&body, "rejected")[0])
}

#[test]
fn interactions_registers_the_commands_once_for_4_workers_a_reload_and_restarts() {
    let dir = Dir::new();
    copy_example(&dir, "interactions");
    let discord = Helper::start(&dir, "discord_standin.py");
    let api = format!("127.0.0.1:{}", discord.port);
    edit_config(&dir, "127.0.0.1:8001", "127.0.0.1:0");
    edit_config(&dir, "127.0.0.1:8081", &api);
    let mut presup = start(&dir);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let first: Vec<i32> = wait_spawned(&presup, 1, 4).iter().map(|s| s.pid).collect();
    assert_eq!(first.len(), 4);
    wait_all_answer(port, &first);
    assert_eq!(registrations(&discord), (1, 0), "one registration for 4 workers");
    // It ran as the on_starting hook: to its end before the first worker started.
    let log = presup.log.lines();
    let hook_done = log.iter().position(|l| l.contains("hook exited with code 0"));
    let first_worker = log.iter().position(|l| l.contains("worker spawned"));
    assert!(hook_done.is_some() && hook_done < first_worker, "{}", presup.log.text());

    // A reload replaces every worker and registers nothing (no attempt at all: none rejected).
    presup.signal(Signal::SIGHUP);
    let second: Vec<i32> = wait_spawned(&presup, 2, 4).iter().map(|s| s.pid).collect();
    first.iter().for_each(|&pid| wait_dead(pid));
    wait_all_answer(port, &second);
    presup.log.wait_for("reload done");
    assert_eq!(registrations(&discord), (1, 0), "nothing registered on HUP");

    // Two workers SIGKILLed come back in their slots, and register nothing either.
    for &pid in &second[..2] {
        kill(pid, Signal::SIGKILL);
    }
    // The generation-2 workers now: the two not killed and the two replacements.
    let now: Vec<i32> = wait_spawned(&presup, 2, 6).iter().map(|s| s.pid).skip(2).collect();
    assert!(!now.contains(&second[0]) && !now.contains(&second[1]));
    wait_all_answer(port, &now);
    assert_eq!(registrations(&discord), (1, 0), "nothing registered when workers restart");

    // The stand-in does catch a second registration: by hand, now, it gets a 429.
    let out = common::python3()
        .args(["app.py", "register"])
        .env("DISCORD_API_BASE", format!("http://{api}/api/v10"))
        .env("DISCORD_APPLICATION_ID", "123456789012345678")
        .env("DISCORD_TOKEN", "stand-in-token")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("HTTP 429"), "{stderr}");
    assert_eq!(registrations(&discord), (1, 1));

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert_eq!(presup.log.count("hook started"), 1, "{}", presup.log.text());
}

// ----- scheduler: a singleton beside the workers (seed 001) -----

const TICK: &str = "0.3";

/// An email at the sink: the tick it reports, the pid that sent it, and how many times it was
/// sent again with the same `Idempotency-Key` (recognised, not delivered twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Email {
    tick: i64,
    pid: i32,
    repeats: i64,
}

/// Every email at the sink, in arrival order.
fn emails(sink: &Helper) -> Vec<Email> {
    let body = sink.get("/emails");
    let ticks = json_ints(&body, "tick");
    let pids = json_ints(&body, "pid");
    let repeats = json_ints(&body, "repeats");
    assert!(ticks.len() == pids.len() && ticks.len() == repeats.len(), "{body}");
    (0..ticks.len())
        .map(|i| Email { tick: ticks[i], pid: pids[i] as i32, repeats: repeats[i] })
        .collect()
}

fn wait_emails(sink: &Helper, what: &str, enough: impl Fn(&[Email]) -> bool) -> Vec<Email> {
    wait_until(what, DEADLINE, || Some(emails(sink)).filter(|e| enough(e)))
}

/// The process state letter of `/proc/PID/stat` (`T` when stopped).
/// SIGKILLs the scheduler `pid` at the worst moment: just after it sent a tick's email and
/// before it recorded that tick as sent. That moment lasts a few microseconds, so it is made:
/// the scheduler is frozen with SIGSTOP (it then writes nothing more), its state file, which
/// names the last tick it recorded, `last`, is set back to `last - 1`, exactly as a kill
/// between the send of `last` and its record leaves it, and the frozen process is SIGKILLed.
/// Returns `last`, whose email its successor must send again, and the sink recognise.
fn kill_between_send_and_record(dir: &Dir, pid: i32) -> i64 {
    kill(pid, Signal::SIGSTOP);
    wait_until("the scheduler to stop", DEADLINE, || {
        (common::state(pid) == Some('T')).then_some(())
    });
    let state = dir.read("run/scheduler.json");
    let last = json_ints(&state, "last_sent")[0];
    let earlier =
        state.replace(&format!("\"last_sent\": {last}"), &format!("\"last_sent\": {}", last - 1));
    assert_ne!(earlier, state, "{state}");
    // Atomically, as the scheduler writes it (its own `.tmp` may be half written).
    dir.write("run/scheduler.json.test", &earlier);
    std::fs::rename(dir.join("run/scheduler.json.test"), dir.join("run/scheduler.json")).unwrap();
    kill(pid, Signal::SIGKILL);
    last
}

#[test]
fn scheduler_sends_each_tick_exactly_once_across_a_kill_and_restart() {
    let dir = Dir::new();
    copy_example(&dir, "scheduler");
    let sink = Helper::start(&dir, "sink.py");
    edit_config(&dir, "127.0.0.1:8002", "127.0.0.1:0");
    edit_config(&dir, "127.0.0.1:8025", &format!("127.0.0.1:{}", sink.port));
    edit_config(&dir, "TICK = \"1.0\"", &format!("TICK = \"{TICK}\""));
    let mut presup = start(&dir);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let workers: Vec<i32> = wait_spawned(&presup, 1, 4).iter().map(|s| s.pid).collect();
    wait_all_answer(port, &workers);

    // One scheduler for 4 workers: one email per tick, all from the singleton.
    let before = wait_emails(&sink, "3 emails", |e| e.len() >= 3);
    let first = field::<i32>(&presup.log.wait_for("singleton spawned"), "pid");
    assert!(
        before.iter().all(|m| m.pid == first),
        "the emails come from the singleton: {before:?}"
    );
    let last = kill_between_send_and_record(&dir, first);
    wait_dead(first);
    let second = field::<i32>(&presup.log.wait_for_nth("singleton spawned", 2), "pid");
    let all = wait_emails(&sink, "3 emails from the restarted scheduler", |e| {
        e.iter().filter(|m| m.pid == second).count() >= 3
    });

    // Every tick from the first to the last arrived, each exactly once, in order.
    let ticks: Vec<i64> = all.iter().map(|m| m.tick).collect();
    let expected: Vec<i64> = (ticks[0]..=*ticks.last().unwrap()).collect();
    assert_eq!(ticks, expected, "a tick missing or repeated: {all:?}");
    // The restarted scheduler sent `last` again, and the sink knew it by its key. (So may it
    // have the tick after, if the first one was frozen between that send and its record.)
    let again: Vec<i64> = all.iter().filter(|m| m.repeats > 0).map(|m| m.tick).collect();
    assert!(again == [last] || again == [last, last + 1], "sent again: {again:?}; {all:?}");
    assert!(all.iter().all(|m| m.repeats <= 1), "{all:?}");
    // Two senders, one after the other, never both at once.
    let split = all.iter().position(|m| m.pid == second).unwrap();
    assert!(all[..split].iter().all(|m| m.pid == first), "{all:?}");
    assert!(all[split..].iter().all(|m| m.pid == second), "{all:?}");
    // The singleton's death touched no worker; no process was started but these six.
    assert!(workers.iter().all(|&pid| alive(pid)), "a worker died with the scheduler");
    assert_eq!(spawned(&presup).len(), 4);
    let started: BTreeSet<i32> = dir.pids().into_iter().collect();
    let expected: BTreeSet<i32> = workers.iter().copied().chain([first, second]).collect();
    assert_eq!(started, expected);

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

// ----- flow: a shared heavy process, ready first, stopped last, never orphaned (seed 003) -----

/// The lines of the events file: `(role, event, pid)`, in the order they were appended (each
/// line `TIME ROLE EVENT PID`; a last line still being written is left for the next read).
fn events(dir: &Dir) -> Vec<(String, String, i32)> {
    let text = dir.read("events");
    let complete = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
    complete
        .lines()
        .map(|l| match l.split_whitespace().collect::<Vec<&str>>()[..] {
            [_, role, event, pid] => (role.to_owned(), event.to_owned(), pid.parse().unwrap()),
            _ => panic!("a garbled line in the events file: {l:?}\n{text}"),
        })
        .collect()
}

/// The position of the first event `(role, event)`, of any pid.
fn position(events: &[(String, String, i32)], role: &str, event: &str) -> Option<usize> {
    events.iter().position(|e| e.0 == role && e.1 == event)
}

fn wait_event(dir: &Dir, role: &str, event: &str, n: usize) -> Vec<(String, String, i32)> {
    wait_until(&format!("{n} `{role} {event}` events"), DEADLINE, || {
        let e = events(dir);
        (e.iter().filter(|e| e.0 == role && e.1 == event).count() >= n).then_some(e)
    })
}

/// Appends a line to the events file, ordered with the children's lines (`O_APPEND`), in one
/// `write` so that lines appended at once by several clients do not interleave.
fn append_event(events: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(events).unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// A client that starts as soon as the listener is bound, before flow is ready: every request
/// must be answered 200 by flow (the first one waits in the listener's backlog until a worker,
/// started only once flow is ready, accepts it). It stops 10 requests after the master says
/// every worker is up. Its first request is marked in the events file once it is sent.
fn client(
    dir: &Dir,
    presup: &Presup,
    port: u16,
    id: usize,
) -> std::thread::JoinHandle<Vec<(u16, String)>> {
    let events = dir.join("events");
    let log = presup.log.clone();
    std::thread::spawn(move || {
        let end = Instant::now() + DEADLINE;
        let mut answers = Vec::new();
        let mut after_ready = 0;
        while after_ready < 10 {
            assert!(Instant::now() < end, "the workers never came up");
            let ready = log.count("ready: all workers up") > 0;
            let s = send_request(port, "GET", &format!("/?text=client{id}")).unwrap();
            if answers.is_empty() {
                append_event(&events, &format!("0 client sent {id}"));
            }
            answers.push(read_response(s).unwrap());
            after_ready += usize::from(ready);
        }
        answers
    })
}

/// Holds flow back before it loads its model, until [`open_gate`]: in the test's copy of the
/// config, flow's command first reads a line from the FIFO `gate`.
fn gate_flow(dir: &Dir) {
    edit_config(
        dir,
        r#"command = ["python3", "flow_server.py"]"#,
        r#"command = ["sh", "-c", "read go < gate && exec python3 flow_server.py"]"#,
    );
    nix::unistd::mkfifo(&dir.join("gate"), nix::sys::stat::Mode::S_IRWXU).unwrap();
}

/// Lets flow go on: once its `sh` has the FIFO open (an open for writing that would block
/// fails with ENXIO until then), writes it a line.
fn open_gate(dir: &Dir) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut gate = wait_until("flow to wait at its gate", DEADLINE, || {
        let mut open = std::fs::OpenOptions::new();
        open.write(true).custom_flags(libc::O_NONBLOCK).open(dir.join("gate")).ok()
    });
    gate.write_all(b"go\n").unwrap();
}

#[test]
fn flow_is_ready_before_the_workers_and_outlives_them() {
    let dir = Dir::new();
    copy_example(&dir, "flow");
    edit_config(&dir, "127.0.0.1:8003", "127.0.0.1:0");
    gate_flow(&dir);
    let mut presup = start(&dir);
    let port = presup.port("http"); // logged once bound, before the singleton starts
    let clients: Vec<_> = (0..4).map(|id| client(&dir, &presup, port, id)).collect();
    // Every client has a request waiting in the listener's backlog, flow has been started but
    // is not ready (it has not even begun to load), and no worker has been started.
    wait_event(&dir, "client", "sent", 4);
    presup.log.wait_for("singleton spawned");
    assert_eq!(presup.log.count("worker spawned"), 0, "{}", presup.log.text());
    open_gate(&dir);
    let answers: Vec<(u16, String)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();

    let e = wait_event(&dir, "worker", "start", 4);
    let flow = e.iter().find(|e| e.0 == "flow" && e.1 == "start").unwrap().2;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(body.contains(&format!("from flow pid {flow} via slot")), "{body}");
    }
    // The first requests were sent before flow was ready, and no worker started before it was.
    let ready = position(&e, "flow", "ready").unwrap();
    let sent: Vec<usize> =
        (0..e.len()).filter(|&i| e[i].0 == "client" && e[i].1 == "sent").collect();
    assert!(sent.iter().all(|&i| i < ready), "{e:?}");
    assert!(
        position(&e, "worker", "start").unwrap() > ready,
        "a worker started before flow was ready: {e:?}"
    );

    // A request still with flow when TERM comes is answered: flow is stopped only after the
    // last worker has exited.
    let requests = e.iter().filter(|e| e.1 == "request").count();
    let slow = std::thread::spawn(move || http(port, "GET", "/?text=slow&seconds=1").unwrap());
    wait_event(&dir, "flow", "request", requests + 1);
    presup.signal(Signal::SIGTERM);
    let (status, body) = slow.join().unwrap();
    assert_eq!((status, body.starts_with("SLOW from flow")), (200, true), "{body}");
    assert_eq!(presup.wait_exit(), Some(0));
    let e = events(&dir);
    let term = position(&e, "flow", "term").expect("flow was stopped with TERM");
    let stops: Vec<usize> =
        (0..e.len()).filter(|&i| e[i].0 == "worker" && e[i].1 == "stop").collect();
    assert_eq!(stops.len(), 4, "{e:?}");
    assert!(stops.iter().all(|&i| i < term), "flow got TERM before a worker was gone: {e:?}");
    assert!(position(&e, "flow", "stop").unwrap() > term);
    assert!(!dir.join("run/flow.sock").exists(), "flow removes its socket on stop");
}

#[test]
fn a_sigkilled_master_leaves_no_worker_or_singleton_behind() {
    let dir = Dir::new();
    copy_example(&dir, "flow");
    edit_config(&dir, "127.0.0.1:8003", "127.0.0.1:0");
    let mut presup = start(&dir);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let (status, body) = http(port, "GET", "/?text=hello").unwrap();
    assert_eq!(status, 200, "{body}");
    let e = wait_event(&dir, "worker", "start", 4);
    let children: Vec<i32> = e.iter().filter(|e| e.1 == "start").map(|e| e.2).collect();
    assert_eq!(children.len(), 5, "flow and 4 workers: {e:?}");
    assert!(children.iter().all(|&pid| alive(pid)));

    presup.signal(Signal::SIGKILL);
    wait_until("every child gone within 1s of the master", Duration::from_secs(1), || {
        children.iter().all(|&pid| !alive(pid)).then_some(())
    });
    assert_eq!(presup.wait_exit(), None);

    // The socket flow left behind does not stand in the way of the next start.
    assert!(dir.join("run/flow.sock").exists());
    let mut again = start(&dir);
    let port = again.port("http");
    again.log.wait_for("ready: all workers up");
    let (status, body) = http(port, "GET", "/?text=again").unwrap();
    assert_eq!((status, body.starts_with("AGAIN from flow")), (200, true), "{body}");
    again.signal(Signal::SIGTERM);
    assert_eq!(again.wait_exit(), Some(0));
}

#[test]
fn gunicorn_serves_from_presup_workers_reloads_and_leaves_nothing() {
    let dir = Dir::new();
    copy_example(&dir, "gunicorn");
    edit_config(&dir, "127.0.0.1:8004", "127.0.0.1:0");
    let mut presup = start(&dir);
    let port = presup.port("http");
    // Each presup worker is a gunicorn arbiter: READY=1 (ready = "notify") comes from it once
    // its app is imported; then its two sync workers accept on presup's socket.
    presup.log.wait_for("ready: all workers up");
    let arbiters = wait_spawned(&presup, 1, 2);
    let gunicorn_workers: Vec<i32> = arbiters
        .iter()
        .flat_map(|a| {
            wait_until("2 gunicorn workers", DEADLINE, || {
                let c = children_of(a.pid);
                (c.len() == 2).then_some(c)
            })
        })
        .collect();
    wait_all_answer(port, &gunicorn_workers);
    let body = common::http_get(port).unwrap();
    assert!(body.contains("generation 1"), "{body}");
    // gunicorn's post_fork records its workers, so the harness checks that none outlives presup.
    let recorded = dir.pids();
    assert!(gunicorn_workers.iter().all(|p| recorded.contains(p)), "{recorded:?}");

    // A rolling reload: two new arbiters, each up (READY=1) before an old one stops.
    presup.signal(Signal::SIGHUP);
    presup.log.wait_for("reload done");
    let body = common::http_get(port).unwrap();
    assert!(body.contains("generation 2"), "{body}");
    for a in &arbiters {
        wait_dead(a.pid);
    }

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    let log = presup.log.text();
    assert!(!log.contains("File exists"), "gunicorn's control sockets collided:\n{log}");
}
