//! presup as a library (`examples/preload.rs`): `preload` runs once in the master however many
//! workers start and restart, every worker sees the state, a write in one worker is not seen by
//! another, a preload that leaves a thread running ends in exit 3, and TERM, HUP and hooks
//! behave as in exec mode.

mod common;

use std::path::PathBuf;

use common::{wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;

/// The example program, built (or found up to date) by cargo here.
fn example() -> String {
    common::example("preload")
}

/// The preload example built with `panic = "abort"`, as the release profile has it (the
/// `abort-test` profile: the dev profile with the release profile's panic strategy).
fn example_with_panic_abort() -> String {
    let bin = PathBuf::from(common::bin());
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet", "--all-features", "--profile", "abort-test"]);
    cargo.args(["--example", "preload"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    assert!(cargo.status().unwrap().success(), "cargo build --profile abort-test failed");
    let target = bin.parent().unwrap().parent().unwrap();
    target.join("abort-test").join("examples").join("preload").display().to_string()
}

fn config(count: usize, extra: &str) -> String {
    format!(
        "graceful_timeout = \"5s\"\n{extra}\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n[workers]\ncount = {count}\nready = \"notify\"\nboot_timeout = \"30s\"\n"
    )
}

/// Starts the example (`presup.pid()` is the master) with an 8 MB table.
fn start(dir: &Dir, toml: &str, extra: &[&str]) -> Presup {
    dir.write("supervisor.toml", toml);
    let log = dir.join("preloads").display().to_string();
    let mut args = vec!["--mb", "8", "--preload-log", &log];
    args.extend_from_slice(extra);
    Presup::start_program(dir, &example(), &args)
}

/// The same entry function as the example's.
fn entry(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 7)
}

fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{out}");
    body.trim().to_owned()
}

/// `pid P ...` → P.
fn pid_of(body: &str) -> i32 {
    let words: Vec<&str> = body.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "pid").unwrap();
    words[at + 1].parse().unwrap()
}

/// Records every worker the log names in the harness's `pids`, so that none may outlive the
/// test (forked workers run no fixture script that would record itself).
fn record_workers(dir: &Dir, presup: &Presup) {
    let pids: String = presup
        .log
        .lines()
        .iter()
        .filter(|l| l.contains("worker spawned"))
        .map(|l| format!("{}\n", common::pid_field(l)))
        .collect();
    std::fs::write(dir.join("pids"), format!("{}{pids}", dir.read("pids"))).unwrap();
}

#[test]
fn preload_runs_once_every_worker_shares_it_and_a_write_stays_in_its_worker() {
    let dir = Dir::new();
    let presup = start(&dir, &config(3, ""), &[]);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    assert_eq!(dir.lines("preloads"), [format!("preload {}", presup.pid())]);

    // Every worker serves from the table the master built.
    let want = entry(123_456).to_string();
    let mut seen = std::collections::BTreeSet::new();
    wait_until("all three workers answering a lookup", DEADLINE, || {
        assert_eq!(get(port, "/lookup/123456"), want);
        seen.insert(pid_of(&get(port, "/")));
        (seen.len() == 3).then_some(())
    });

    // A write in one worker (its copy-on-write page) is not seen by the others.
    let poked = pid_of(&get(port, "/poke"));
    let mut others = std::collections::BTreeSet::new();
    wait_until("the two other workers answering /marker", DEADLINE, || {
        let body = get(port, "/marker");
        let (pid, marker) = (pid_of(&body), body.rsplit(' ').next().unwrap().to_owned());
        if pid == poked {
            assert_eq!(marker, poked.to_string(), "{body}");
        } else {
            assert_eq!(marker, "0", "a write in {poked} was seen by {pid}: {body}");
            others.insert(pid);
        }
        (others.len() == 2).then_some(())
    });

    // A killed worker is forked again from the preloaded master: no second preload.
    common::kill(poked, Signal::SIGKILL);
    presup.log.wait_for_nth("worker spawned", 4);
    let line = presup.log.wait_for_nth("worker up (READY=1)", 4);
    let new = common::pid_field(&line);
    wait_until("the new worker answering", DEADLINE, || {
        let body = get(port, "/");
        (pid_of(&body) == new).then_some(())
    });
    assert_eq!(dir.lines("preloads").len(), 1, "preload ran again");
    record_workers(&dir, &presup);
}

#[test]
fn a_preload_that_leaves_a_thread_running_ends_in_exit_3() {
    let dir = Dir::new();
    let mut presup = start(&dir, &config(2, ""), &["--leave-thread"]);
    assert_eq!(presup.wait_exit(), Some(3));
    let log = presup.log.text();
    assert!(log.contains("preload left 2 threads running; the master refuses to fork"), "{log}");
    assert!(log.contains("Join the threads before preload returns"), "{log}");
    assert_eq!(presup.log.count("worker spawned"), 0);
}

#[test]
fn a_program_already_running_threads_before_preload_ends_in_exit_3_naming_the_cause() {
    let dir = Dir::new();
    dir.write("supervisor.toml", &config(2, ""));
    let log = dir.join("preloads").display().to_string();
    let args = ["--mb", "8", "--preload-log", &log];
    let env = [("PRELOAD_EXAMPLE_EARLY_THREAD", "1")];
    let mut presup = Presup::launch_program(&dir, &example(), &args, &env);
    assert_eq!(presup.wait_exit(), Some(3));
    let log = presup.log.text();
    assert!(log.contains("the program runs 2 threads before preload"), "{log}");
    assert!(log.contains("#[tokio::main] around presup::prefork::main"), "{log}");
    assert!(dir.read("preloads").is_empty(), "preload ran");
}

#[test]
fn a_worker_returning_an_error_prints_it_and_exits_1_and_boot_failures_name_the_program() {
    let dir = Dir::new();
    let presup = start(&dir, &config(1, ""), &[]);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let pid = pid_of(&get(port, "/fail"));
    let line = presup.log.wait_for("worker exited with code 1");
    assert!(line.contains(&format!("pid={pid} ")), "{line}");
    presup.log.wait_for(&format!("preload: worker {pid}: asked to fail"));
    record_workers(&dir, &presup);
    drop(presup);

    // No [[listen]]: every worker fails at once; the message names the program.
    let dir = Dir::new();
    let toml = "[workers]\ncount = 1\nready = \"notify\"\nboot_attempts = 2\n";
    let mut presup = start(&dir, toml, &[]);
    assert_eq!(presup.wait_exit(), Some(3));
    let log = presup.log.text();
    assert!(log.contains("worker command `preload` failed to boot twice in a row"), "{log}");
    assert!(log.contains("the config has no [[listen]]"), "{log}");
}

/// `/panic` in a worker of `program`: the panic's message and location are printed, the
/// worker exits with code 101 (not SIGABRT) and is replaced.
fn a_panicking_worker_exits_101(program: &str) {
    let dir = Dir::new();
    dir.write("supervisor.toml", &config(1, ""));
    let log = dir.join("preloads").display().to_string();
    let presup = Presup::start_program(&dir, program, &["--mb", "8", "--preload-log", &log]);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let pid = pid_of(&get(port, "/panic"));
    let line = presup.log.wait_for("worker exited with code 101");
    assert!(line.contains(&format!("pid={pid} ")), "{line}");
    let text = presup.log.text();
    assert!(text.contains("panicked at examples/preload.rs:"), "{text}");
    assert!(text.contains("asked to panic"), "{text}");
    assert!(!text.contains("SIGABRT"), "{text}");
    presup.log.wait_for_nth("worker up (READY=1)", 2);
    record_workers(&dir, &presup);
}

#[test]
fn a_panicking_worker_prints_where_and_exits_101() {
    a_panicking_worker_exits_101(&example());
}

#[test]
fn a_panicking_worker_exits_101_with_panic_abort_too() {
    let began = std::time::Instant::now();
    let program = example_with_panic_abort();
    eprintln!("the example built with panic = \"abort\" in {:?}", began.elapsed());
    a_panicking_worker_exits_101(&program);
}

#[test]
fn term_hup_and_hooks_behave_as_in_exec_mode() {
    let dir = Dir::new();
    dir.script("hook.sh", "echo \"$PRESUP_HOOK\" >> hooks");
    let hooks = "[hooks]\non_starting = [{ command = [\"./hook.sh\"] }]\non_reload = [{ command = [\"./hook.sh\"] }]\non_exit = [{ command = [\"./hook.sh\"] }]\n";
    let ticket =
        format!("[tickets.t]\ninterval = \"1s\"\npath = \"{}\"\n", dir.join("t.ticket").display());
    let mut presup = start(&dir, &config(2, &format!("{hooks}{ticket}")), &[]);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    assert_eq!(dir.lines("hooks"), ["on_starting"]);
    // The workers see the variables of an exec'd worker.
    let body = get(port, "/");
    assert!(body.contains("generation 1") && body.contains("entries 1048576"), "{body}");
    // The watcher's pipe (its only fd) reaches no forked worker, nor the master's
    // cgroup.procs: a worker forked without exec closes them.
    let fds = |pid: i32| -> Vec<String> {
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
        dir.flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|l| l.display().to_string())
            .collect()
    };
    let watcher = fds(presup.watcher_pid());
    let worker = fds(pid_of(&body));
    assert!(
        worker.iter().all(|l| !watcher.contains(l) && !l.ends_with("cgroup.procs")),
        "{worker:?}"
    );
    // Nor the runtime directory's lock, nor the ticket's state file and its lock.
    let master = fds(presup.pid());
    let runtime = master.iter().find(|l| l.contains(&format!("presup-{}-", presup.pid())));
    assert!(runtime.is_some(), "the master holds its runtime directory: {master:?}");
    assert!(master.iter().any(|l| l.contains("t.ticket")), "{master:?}");
    assert!(worker.iter().all(|l| Some(l) != runtime && !l.contains("t.ticket")), "{worker:?}");
    let env = |name: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET /env/{name} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        head.starts_with("HTTP/1.0 200").then(|| body.trim().to_owned())
    };
    assert_eq!(env("PRESUP_MASTER_PID"), Some(presup.pid().to_string()));
    assert_eq!(env("PRESUP_GENERATION").as_deref(), Some("1"));
    assert_eq!(env("PRESUP_WORKER_COUNT").as_deref(), Some("2"));
    assert!(env("NOTIFY_SOCKET").is_some_and(|p| p.contains(&format!("presup-{}-", presup.pid()))));
    assert_eq!(env("LISTEN_FDS"), None, "no fds at 3.. in a forked worker");

    presup.signal(Signal::SIGHUP);
    presup.log.wait_for("reload done: every worker");
    let mut generations = std::collections::BTreeSet::new();
    wait_until("both workers at generation 2", DEADLINE, || {
        let body = get(port, "/");
        assert!(body.contains("generation 2"), "an old worker still answers: {body}");
        generations.insert(pid_of(&body));
        (generations.len() == 2).then_some(())
    });
    assert_eq!(dir.lines("hooks"), ["on_starting", "on_reload"]);
    assert_eq!(dir.lines("preloads").len(), 1, "HUP does not rebuild the preloaded state");

    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert_eq!(dir.lines("hooks"), ["on_starting", "on_reload", "on_exit"]);
    record_workers(&dir, &presup);
}

#[test]
fn a_ticket_with_http_is_served_by_the_program_itself() {
    let dir = Dir::new();
    let ticket = "[tickets.identify]\ninterval = \"50ms\"\nhttp = \"127.0.0.1:0\"\n";
    let mut presup = start(&dir, &config(1, ticket), &[]);
    presup.log.wait_for("ready: all workers up");
    // The master ran this program as `PROGRAM ticket-server identify --listen ...`.
    let line = presup.log.wait_for("ticket server listening");
    let address = line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    let body = get(port, "/?shard=3");
    assert!(body.contains("\"message\""), "{body}");
    // The workers find the ticket too.
    let http = presup.port("http");
    assert!(get(http, "/env/PRESUP_TICKET_IDENTIFY").contains("ticket.identify"));
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    record_workers(&dir, &presup);
}

#[test]
fn a_worker_that_returns_runs_none_of_the_masters_destructors() {
    let dir = Dir::new();
    let toml = format!("pidfile = \"presup.pid\"\n{}", config(2, ""));
    let presup = start(&dir, &toml, &[]);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let notify = PathBuf::from(get(port, "/env/NOTIFY_SOCKET"));
    // The worker function returns: the process ends with `_exit`, so the master's Drop impls
    // (which remove the runtime directory and the pidfile) never run in it.
    let gone = pid_of(&get(port, "/exit"));
    let line = presup.log.wait_for("worker exited with code 0");
    assert!(line.contains(&format!("pid={gone} ")), "{line}");
    presup.log.wait_for_nth("worker up (READY=1)", 3);
    assert!(notify.exists(), "the master's notification socket was removed by a worker");
    assert!(dir.join("presup.pid").exists(), "the pidfile was removed by a worker");
    assert_eq!(dir.lines("preloads").len(), 1);
    record_workers(&dir, &presup);
}

#[test]
fn a_worker_catching_term_with_a_signal_library_finishes_its_request_and_exits_0() {
    // The master never installs a signal handler (it reads a signalfd), so a library in the
    // forked worker finds the registry of a fresh process and really installs TERM's handler.
    let dir = Dir::new();
    let mut presup = start(&dir, &config(1, ""), &["--drain-on-term"]);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let worker = pid_of(&get(port, "/"));
    wait_until("the worker to catch TERM", DEADLINE, || {
        let status = std::fs::read_to_string(format!("/proc/{worker}/status")).ok()?;
        let caught = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?.trim().to_owned();
        let mask = u64::from_str_radix(&caught, 16).ok()?;
        (mask & (1 << (libc::SIGTERM - 1)) != 0).then_some(())
    });
    use std::io::Read;
    // In the worker's hands once nothing waits in the backlog; it answers only after TERM
    // (however late this thread gets to send it), then the worker returns 0.
    let mut request = in_flight(port, "/until-term");
    presup.signal(Signal::SIGTERM);
    let mut answer = String::new();
    request.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.contains("answered after TERM"),
        "{answer}"
    );
    assert_eq!(presup.wait_exit(), Some(0));
    let log = presup.log.text();
    assert!(log.contains("worker exited with code 0 (stopped: Shutdown)"), "{log}");
}

/// Sends `GET path` on a new connection and waits until a worker has taken it (nothing left in
/// the listener's backlog); the answer is read later.
fn in_flight(port: u16, path: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    wait_until("a worker to take the request", DEADLINE, || {
        (common::accept_queue(port) == 0).then_some(())
    });
    s
}

fn answer(mut s: std::net::TcpStream) -> String {
    use std::io::Read;
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[test]
fn axum_workers_serve_the_preloaded_table_and_drain_on_hup_and_term() {
    let dir = Dir::new();
    dir.write("supervisor.toml", &config(2, ""));
    let mut presup = Presup::start_program(&dir, &common::example("axum"), &["--mb", "8"]);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    assert_eq!(get(port, "/lookup/123456"), entry(123_456).to_string());
    // A reload: the old worker holding a request finishes it before it exits.
    let slow = in_flight(port, "/sleep/1500");
    presup.signal(Signal::SIGHUP);
    presup.log.wait_for("reload done");
    assert!(answer(slow).contains("slept 1500 ms"));
    record_workers(&dir, &presup);
    // A stop: the same.
    let slow = in_flight(port, "/sleep/1500");
    presup.signal(Signal::SIGTERM);
    assert!(answer(slow).contains("slept 1500 ms"));
    assert_eq!(presup.wait_exit(), Some(0));
    let log = presup.log.text();
    assert!(!log.contains("killed by SIGTERM"), "a worker did not catch TERM:\n{log}");
    assert_eq!(log.matches("worker exited with code 0 (stopped: Shutdown)").count(), 2, "{log}");
}
