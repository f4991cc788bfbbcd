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
use std::path::{Path, PathBuf};
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
    edit_file(&dir.join("supervisor.toml"), from, to);
}

/// Replaces `from` by `to` in the test's copy of a file; `from` must be there.
fn edit_file(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} is not in {}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
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

// ----- the stem examples: `preload = true`, the app imported once, by the stem (issue 15) -----

/// Lays out `examples/<name>` for each of `names` in the test's dir as they are in the
/// repository (an example may run another's files by path, `../scheduler/scheduler.py`), with
/// what they share: `examples/presup_child.py`, and the Python client `python/presup/`, which
/// presup_child puts on the path. Returns the first example's directory.
fn lay_out_examples(dir: &Dir, names: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in names {
        copy_dir(&root.join("examples").join(name), &dir.join(&format!("examples/{name}")));
    }
    let shared = "examples/presup_child.py";
    std::fs::copy(root.join(shared), dir.join(shared)).unwrap();
    copy_dir(&root.join("python/presup"), &dir.join("python/presup"));
    dir.join(&format!("examples/{}", names[0]))
}

/// Copies the directory `from` to `to` with its subdirectories, leaving out what running an
/// example leaves behind (`run/`, `__pycache__/`, `presup.pid`).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (name, kind) = (entry.file_name(), entry.file_type().unwrap());
        if kind.is_dir() && name != "run" && name != "__pycache__" {
            copy_dir(&entry.path(), &to.join(&name));
        } else if kind.is_file() && name != "presup.pid" {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// Starts presup on the laid-out `example`'s config, its Python children reporting to the
/// test's files.
fn start_example(dir: &Dir, example: &Path) -> Presup {
    let pids = dir.join("pids").display().to_string();
    let events = dir.join("events").display().to_string();
    let env = [("EXAMPLE_PIDS", pids.as_str()), ("EXAMPLE_EVENTS", events.as_str())];
    Presup::start_config(dir, &example.join("supervisor.toml"), &env)
}

/// The pids of the events `(role, event)`, in order.
fn event_pids(dir: &Dir, role: &str, event: &str) -> Vec<i32> {
    events(dir).into_iter().filter(|e| e.0 == role && e.1 == event).map(|e| e.2).collect()
}

/// Waits until `n` workers (`worker start` events) are alive; returns them.
fn wait_live_workers(dir: &Dir, n: usize) -> Vec<i32> {
    wait_until(&format!("{n} live workers"), DEADLINE, || {
        let live: Vec<i32> =
            event_pids(dir, "worker", "start").into_iter().filter(|&p| alive(p)).collect();
        (live.len() == n).then_some(live)
    })
}

/// The one stem that `event` (`import`, `model`) says was started; fails on two.
fn the_stem(dir: &Dir, event: &str) -> i32 {
    match event_pids(dir, "stem", event)[..] {
        [stem] => stem,
        ref stems => panic!("stems: {stems:?} (one expected): {:?}", events(dir)),
    }
}

/// Checks that `worker` was forked as the stem protocol says: a child of the master (the
/// stem's middle process is gone), in a process group of its own, and not the stem itself.
fn assert_forked(presup: &Presup, stem: i32, worker: i32) {
    assert_ne!(worker, stem, "the stem itself serves");
    assert_eq!(common::ppid(worker), Some(presup.pid()), "worker {worker}: not the master's child");
    let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(worker))).unwrap();
    assert_eq!(pgid.as_raw(), worker, "worker {worker} is not in a process group of its own");
}

/// The pid an answer names (`... pid 4242 ...`).
fn answer_pid(body: &str) -> i32 {
    let pid = body.split_whitespace().skip_while(|w| *w != "pid").nth(1);
    pid.and_then(|p| p.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

/// GETs `path` from each of `workers` in turn, the others frozen (SIGSTOP) meanwhile, so that
/// only the one left can accept the connection; checks that it answers 200, naming its pid.
/// Threaded and async servers (waitress, uvicorn) take any connection that comes while their
/// process runs, so holding a connection in each, as [`wait_all_answer`] does, would not say
/// who answers next. Returns the answers, in the order of `workers`.
fn each_answers(port: u16, workers: &[i32], path: &str) -> Vec<String> {
    let mut answers = Vec::new();
    for &worker in workers {
        let others: Vec<i32> = workers.iter().copied().filter(|&p| p != worker).collect();
        others.iter().for_each(|&p| kill(p, Signal::SIGSTOP));
        for &p in &others {
            wait_until("a worker to stop", DEADLINE, || {
                (common::state(p) == Some('T')).then_some(())
            });
        }
        let answer = http(port, "GET", path);
        others.iter().for_each(|&p| kill(p, Signal::SIGCONT));
        let (status, body) = answer.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(answer_pid(&body), worker, "{body:?} is not worker {worker}'s");
        answers.push(body);
    }
    answers
}

/// The value of the word after `key` in an answer (`slot 2 pid ...` gives `2` for `slot`).
fn answer_word<'a>(body: &'a str, key: &str) -> &'a str {
    let word = body.split_whitespace().skip_while(|w| *w != key).nth(1);
    word.unwrap_or_else(|| panic!("no {key} in {body:?}"))
}

/// Sends a JSON POST to 127.0.0.1:`port`; its status and body.
fn post_json(port: u16, path: &str, json: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        json.len()
    );
    s.write_all(format!("{head}{json}").as_bytes()).unwrap();
    read_response(s).unwrap()
}

/// Runs the laid-out `example`'s `app.py` without presup (`presup.stem(bind=...)` then binds
/// the address itself), its `bind` address moved to a free port; GETs `path` from it once it
/// listens, checks the answer names its own pid, and kills it. Returns the answer.
fn run_alone(dir: &Dir, example: &Path, bind: &str, path: &str, env: &[(&str, &str)]) -> String {
    let port = common::free_port();
    edit_file(&example.join("app.py"), bind, &format!("127.0.0.1:{port}"));
    let mut python = common::python3();
    python.arg("app.py").current_dir(example).env("EXAMPLE_PIDS", dir.join("pids"));
    for var in ["PRESUP_STEM_FD", "PRESUP_WORKER_ID", "LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET"] {
        python.env_remove(var);
    }
    python.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::null());
    let mut app = KillOnDrop(python.spawn().expect("spawn python3"));
    let (status, body) = wait_until("app.py alone to answer", DEADLINE, || {
        if let Some(status) = app.try_wait().unwrap() {
            panic!("app.py exited: {status}");
        }
        http(port, "GET", path).ok()
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer_pid(&body), app.id() as i32, "{body}");
    body
}

#[test]
fn interactions_stem_imports_the_bot_once_and_forks_4_waitress_workers() {
    let dir = Dir::new();
    let example = lay_out_examples(&dir, &["interactions-stem", "interactions"]);
    let discord = Helper::start(&dir, "examples/interactions/discord_standin.py");
    let api = format!("127.0.0.1:{}", discord.port);
    let config = example.join("supervisor.toml");
    edit_file(&config, "127.0.0.1:8006", "127.0.0.1:0");
    edit_file(&config, "127.0.0.1:8081", &api);
    let mut presup = start_example(&dir, &example);
    let port = presup.port("http");
    let workers = wait_live_workers(&dir, 4);
    let stem = the_stem(&dir, "import");
    assert_eq!(common::ppid(stem), Some(presup.pid()));
    workers.iter().for_each(|&w| assert_forked(&presup, stem, w));
    // Each of the 4 answers, each in its own slot, and the bot's commands work.
    let answers = each_answers(port, &workers, "/");
    let slots: BTreeSet<&str> = answers.iter().map(|a| answer_word(a, "slot")).collect();
    assert_eq!(slots, BTreeSet::from(["0", "1", "2", "3"]), "{answers:?}");
    assert!(answers.iter().all(|a| answer_word(a, "generation") == "1"), "{answers:?}");
    let ping = r#"{"type": 2, "data": {"name": "ping"}}"#;
    assert_eq!(
        post_json(port, "/interactions", ping),
        (200, r#"{"data":{"content":"pong"},"type":4}"#.to_owned() + "\n")
    );
    // Registered once, by the hook, which ended before the stem was started.
    assert_eq!(registrations(&discord), (1, 0));
    let log = presup.log.lines();
    let hook_done = log.iter().position(|l| l.contains("hook exited with code 0"));
    let stem_started = log.iter().position(|l| l.contains("stem spawned"));
    assert!(hook_done.is_some() && hook_done < stem_started, "{}", presup.log.text());

    // A worker SIGKILLed is forked again from the same stem: the bot is not imported again.
    kill(workers[1], Signal::SIGKILL);
    wait_dead(workers[1]);
    let now = wait_live_workers(&dir, 4);
    assert!(!now.contains(&workers[1]));
    now.iter().for_each(|&w| assert_forked(&presup, stem, w));
    each_answers(port, &now, "/");
    assert_eq!(event_pids(&dir, "stem", "import"), [stem], "the bot was imported again");

    // A reload starts a new stem, which imports the bot (new code) and forks generation 2;
    // the old stem and its workers go; nothing is registered.
    presup.signal(Signal::SIGHUP);
    presup.log.wait_for("reload done");
    let stems = event_pids(&dir, "stem", "import");
    assert_eq!(stems.len(), 2, "one new stem: {stems:?}");
    wait_dead(stem);
    now.iter().for_each(|&w| wait_dead(w));
    let second = wait_live_workers(&dir, 4);
    second.iter().for_each(|&w| assert_forked(&presup, stems[1], w));
    let answers = each_answers(port, &second, "/");
    assert!(answers.iter().all(|a| answer_word(a, "generation") == "2"), "{answers:?}");
    assert_eq!(registrations(&discord), (1, 0), "nothing registered on HUP");

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(second.iter().chain(&stems).all(|&p| !alive(p)));
}

#[test]
fn interactions_stem_runs_alone_as_one_waitress_worker() {
    let dir = Dir::new();
    let example = lay_out_examples(&dir, &["interactions-stem", "interactions"]);
    let body = run_alone(&dir, &example, "127.0.0.1:8006", "/", &[]);
    assert!(body.starts_with("slot ? pid "), "{body}");
}

/// `(slot, primary)` of each answer of the FastAPI example.
fn slots_and_primaries(answers: &[String]) -> BTreeSet<(String, String)> {
    let pair =
        |a: &String| (answer_word(a, "slot").to_owned(), answer_word(a, "primary").to_owned());
    answers.iter().map(pair).collect()
}

#[test]
fn fastapi_stem_forks_uvicorn_workers_beside_one_scheduler() {
    let dir = Dir::new();
    let example = lay_out_examples(&dir, &["fastapi-stem", "scheduler"]);
    let sink = Helper::start(&dir, "examples/scheduler/sink.py");
    let config = example.join("supervisor.toml");
    edit_file(&config, "127.0.0.1:8007", "127.0.0.1:0");
    edit_file(&config, "127.0.0.1:8025", &format!("127.0.0.1:{}", sink.port));
    edit_file(&config, "TICK = \"1.0\"", &format!("TICK = \"{TICK}\""));
    let mut presup = start_example(&dir, &example);
    let port = presup.port("http");
    let workers = wait_live_workers(&dir, 4);
    let stem = the_stem(&dir, "import");
    workers.iter().for_each(|&w| assert_forked(&presup, stem, w));
    let answers = each_answers(port, &workers, "/");
    let expected: BTreeSet<(String, String)> =
        [("0", "1"), ("1", "0"), ("2", "0"), ("3", "0")].map(|(s, p)| (s.into(), p.into())).into();
    assert_eq!(slots_and_primaries(&answers), expected, "{answers:?}");
    // The app's lifespan ran in each worker (on its own event loop), not in the stem.
    let lifespans: BTreeSet<i32> = event_pids(&dir, "worker", "lifespan").into_iter().collect();
    assert_eq!(lifespans, workers.iter().copied().collect());

    // One scheduler for 4 workers: every email from the singleton, one per tick.
    let scheduler = field::<i32>(&presup.log.wait_for("singleton spawned"), "pid");
    assert!(scheduler != stem && !workers.contains(&scheduler));
    let before = wait_emails(&sink, "3 emails", |e| e.len() >= 3);
    assert!(before.iter().all(|m| m.pid == scheduler), "{before:?}");

    // A worker SIGKILLed is forked again from the stem; the scheduler goes on untouched.
    kill(workers[2], Signal::SIGKILL);
    wait_dead(workers[2]);
    let now = wait_live_workers(&dir, 4);
    now.iter().for_each(|&w| assert_forked(&presup, stem, w));
    assert_eq!(slots_and_primaries(&each_answers(port, &now, "/")), expected);
    assert_eq!(event_pids(&dir, "stem", "import"), [stem], "the app was imported again");
    let n = before.len();
    let all = wait_emails(&sink, "3 more emails", |e| e.len() >= n + 3);
    assert!(all.iter().all(|m| m.pid == scheduler && m.repeats == 0), "{all:?}");
    let ticks: Vec<i64> = all.iter().map(|m| m.tick).collect();
    assert_eq!(ticks, (ticks[0]..ticks[0] + ticks.len() as i64).collect::<Vec<i64>>());
    assert_eq!(presup.log.count("singleton spawned"), 1);

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

#[test]
fn fastapi_stem_runs_alone_as_one_uvicorn_worker() {
    let dir = Dir::new();
    let example = lay_out_examples(&dir, &["fastapi-stem", "scheduler"]);
    let body = run_alone(&dir, &example, "127.0.0.1:8007", "/", &[]);
    assert!(
        body.starts_with("slot 0 pid ") && body.ends_with("generation 1 primary 1\n"),
        "{body}"
    );
}

/// A field of `/proc/PID/smaps_rollup`, in kB.
fn smaps_kb(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")));
    let value = line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok());
    value.unwrap_or_else(|| panic!("no {field} in /proc/{pid}/smaps_rollup:\n{text}"))
}

/// The model of examples/model-stem: `MODEL_MB` megabytes (the config's).
const MODEL_KB: u64 = 200 * 1_000_000 / 1024;

#[test]
fn model_stem_loads_the_model_once_and_its_4_workers_share_it() {
    let dir = Dir::new();
    let example = lay_out_examples(&dir, &["model-stem"]);
    let config = example.join("supervisor.toml");
    edit_file(&config, "127.0.0.1:8008", "127.0.0.1:0");
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(toml.contains("MODEL_MB = \"200\""), "the model's size is not MODEL_KB's: {toml}");
    let mut presup = start_example(&dir, &example);
    let port = presup.port("http");
    let workers = wait_live_workers(&dir, 4);
    let stem = the_stem(&dir, "model");
    workers.iter().for_each(|&w| assert_forked(&presup, stem, w));
    // Every worker reads the whole model for a prediction, and they all agree.
    let answers = each_answers(port, &workers, "/predict?i=7");
    let predictions: BTreeSet<&str> =
        answers.iter().map(|a| a.split(", slot").next().unwrap()).collect();
    assert_eq!(predictions.len(), 1, "{answers:?}");
    assert!(answers[0].starts_with("item 7: nearest "), "{answers:?}");
    // Each worker has the whole model in its memory (RSS), yet its own pages (private) are far
    // fewer than the model's: the model's pages are the stem's, shared, not copied.
    for &w in &workers {
        let (rss, private) =
            (smaps_kb(w, "Rss"), smaps_kb(w, "Private_Clean") + smaps_kb(w, "Private_Dirty"));
        assert!(rss > MODEL_KB, "worker {w}: RSS {rss} kB, less than the model ({MODEL_KB} kB)");
        assert!(
            private < MODEL_KB / 4,
            "worker {w}: {private} kB of its own (model {MODEL_KB} kB)"
        );
    }
    let pss: u64 = workers.iter().chain([&stem]).map(|&p| smaps_kb(p, "Pss")).sum();
    assert!(pss < 2 * MODEL_KB, "stem and 4 workers: {pss} kB of PSS for a {MODEL_KB} kB model");

    // A worker SIGKILLed is forked again, with the model already there: not loaded again.
    kill(workers[0], Signal::SIGKILL);
    wait_dead(workers[0]);
    let now = wait_live_workers(&dir, 4);
    now.iter().for_each(|&w| assert_forked(&presup, stem, w));
    let again = each_answers(port, &now, "/predict?i=7");
    assert!(again.iter().all(|a| a.starts_with(predictions.first().unwrap())), "{again:?}");
    assert_eq!(event_pids(&dir, "stem", "model"), [stem], "the model was loaded again");

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

#[test]
fn model_stem_refuses_to_fork_beside_openblas_threads() {
    let dir = Dir::new();
    let example = lay_out_examples(&dir, &["model-stem"]);
    // This machine must have the CPUs for OpenBLAS to start a second thread (it caps its pool
    // at the CPU count), or there is nothing to refuse.
    let out = common::python3()
        .args(["-c", "import numpy, os; print(len(os.listdir('/proc/self/task')))"])
        .env("OPENBLAS_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2", "OpenBLAS started no thread");
    let config = example.join("supervisor.toml");
    edit_file(&config, "127.0.0.1:8008", "127.0.0.1:0");
    edit_file(&config, "OPENBLAS_NUM_THREADS = \"1\"", "OPENBLAS_NUM_THREADS = \"2\"");
    edit_file(&config, "OMP_NUM_THREADS = \"1\"", "OMP_NUM_THREADS = \"2\"");
    edit_file(&config, "MODEL_MB = \"200\"", "MODEL_MB = \"8\"");
    let mut presup = start_example(&dir, &example);
    assert_eq!(presup.wait_exit(), Some(3), "{}", presup.log.text());
    let log = presup.log.text();
    assert!(log.contains("OPENBLAS_NUM_THREADS=1") && log.contains("thread"), "{log}");
    assert_eq!(event_pids(&dir, "stem", "model").len(), 1, "the stem loaded its model");
    assert!(event_pids(&dir, "worker", "start").is_empty(), "a worker was forked: {log}");
}

#[test]
fn model_stem_runs_alone_as_one_worker() {
    let dir = Dir::new();
    let example = lay_out_examples(&dir, &["model-stem"]);
    let body = run_alone(&dir, &example, "127.0.0.1:8008", "/predict?i=7", &[("MODEL_MB", "8")]);
    assert!(body.starts_with("item 7: nearest ") && body.contains("slot 0 pid"), "{body}");
}
