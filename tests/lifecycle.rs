//! Run once, run one: hooks, singletons, the primary worker, no orphans, privileges.

mod common;

use std::time::{Duration, Instant};

use common::{alive, kill, wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;

/// A worker that records `up SLOT PID` and, on TERM, `stop worker PID`.
const WORKER: &str = r#"echo "up $PRESUP_WORKER_ID $$" >> events
trap 'echo "stop worker $$" >> events; exit 0' TERM
while :; do sleep 1 & wait $!; done"#;

/// A singleton that records `start NAME PID` and, on TERM, `stop NAME PID`.
const SINGLETON: &str = r#"echo "start $PRESUP_SINGLETON $$" >> events
trap 'echo "stop $PRESUP_SINGLETON $$" >> events; exit 0' TERM
while :; do sleep 1 & wait $!; done"#;

/// A hook that records `hook POINT` and its extra variables.
const HOOK: &str = r#"echo "hook $PRESUP_HOOK ${PRESUP_WORKER_ID:-} ${PRESUP_WORKER_PID:-} ${PRESUP_EXIT_CODE:-} ${PRESUP_EXIT_SIGNAL:-}" >> events"#;

fn events(dir: &Dir) -> Vec<String> {
    dir.lines("events")
}

fn wait_events(dir: &Dir, what: &str, f: impl Fn(&[String]) -> bool) -> Vec<String> {
    wait_until(what, DEADLINE, || {
        let e = events(dir);
        f(&e).then_some(e)
    })
}

fn count(events: &[String], prefix: &str) -> usize {
    events.iter().filter(|e| e.starts_with(prefix)).count()
}

fn position(events: &[String], prefix: &str) -> usize {
    events
        .iter()
        .position(|e| e.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {events:#?}"))
}

fn last_position(events: &[String], prefix: &str) -> usize {
    events
        .iter()
        .rposition(|e| e.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {events:#?}"))
}

fn pid_of(event: &str) -> i32 {
    event.split_whitespace().last().unwrap().parse().unwrap()
}

fn hook(point: &str) -> String {
    format!("{point} = [{{ command = [\"./hook.sh\"], timeout = \"10s\" }}]")
}

fn fixtures(dir: &Dir) {
    dir.script("worker.sh", WORKER);
    dir.script("singleton.sh", SINGLETON);
    dir.script("hook.sh", HOOK);
}

fn singleton(name: &str) -> String {
    format!("[[singleton]]\nname = \"{name}\"\ncommand = [\"./singleton.sh\"]\nmin_uptime = \"100ms\"\nstop_timeout = \"5s\"\n")
}

fn config(count: usize, hooks: &[&str], singletons: &[&str]) -> String {
    let hooks: Vec<String> = hooks.iter().map(|h| hook(h)).collect();
    let singletons: Vec<String> = singletons.iter().map(|s| singleton(s)).collect();
    format!(
        "graceful_timeout = \"5s\"\n[workers]\ncommand = [\"./worker.sh\"]\ncount = {count}\nmin_uptime = \"100ms\"\n[hooks]\n{}\n{}",
        hooks.join("\n"),
        singletons.join("\n")
    )
}

#[test]
fn hooks_run_at_their_points_in_order_and_on_starting_only_once() {
    let dir = Dir::new();
    fixtures(&dir);
    let points = ["on_starting", "when_ready", "on_reload", "worker_exit", "on_exit"];
    let mut presup = Presup::start(&dir, &config(2, &points, &["sched", "flow"]));
    let e = wait_events(&dir, "when_ready", |e| count(e, "hook when_ready") == 1);
    // on_starting → singletons in file order → workers → when_ready.
    assert!(position(&e, "hook on_starting") < position(&e, "start sched"));
    assert!(position(&e, "start sched") < position(&e, "start flow"));
    assert!(position(&e, "start flow") < position(&e, "up "));
    assert!(last_position(&e, "up ") < position(&e, "hook when_ready"));
    // A killed worker: worker_exit with its slot, pid and signal.
    let victim = e.iter().find(|l| l.starts_with("up 1 ")).unwrap();
    let victim_pid = pid_of(victim);
    kill(victim_pid, Signal::SIGKILL);
    let e = wait_events(&dir, "worker_exit", |e| count(e, "hook worker_exit") == 1);
    let exit = &e[position(&e, "hook worker_exit")];
    assert_eq!(
        exit.split_whitespace().collect::<Vec<_>>(),
        ["hook", "worker_exit", "1", &victim_pid.to_string(), "SIGKILL"]
    );
    // HUP: on_reload, never on_starting again.
    wait_events(&dir, "the replacement", |e| count(e, "up ") == 3);
    presup.signal(Signal::SIGHUP);
    wait_events(&dir, "generation 2", |e| count(e, "up ") == 5);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    let e = events(&dir);
    assert_eq!(count(&e, "hook on_starting"), 1);
    assert_eq!(count(&e, "hook on_reload"), 1);
    assert_eq!(count(&e, "hook on_exit"), 1);
    // On the way out: workers, then singletons in reverse order, then on_exit.
    let flow_stop = position(&e, "stop flow");
    assert!(last_position(&e, "stop worker") < flow_stop, "{e:#?}");
    assert!(flow_stop < position(&e, "stop sched"));
    assert!(position(&e, "stop sched") < position(&e, "hook on_exit"));
    assert_eq!(position(&e, "hook on_exit"), e.len() - 1, "on_exit is last: {e:#?}");
    // worker_exit ran for the exits during the stop too, with PRESUP_EXIT_CODE.
    assert!(
        e.iter().any(|l| l.starts_with("hook worker_exit") && l.trim_end().ends_with(" 0")),
        "{e:#?}"
    );
}

/// `on_exit` waits for the hooks still running when the last child is gone: a slow
/// `worker_exit` of the stop ends before `on_exit` starts.
#[test]
fn on_exit_waits_for_a_slow_worker_exit_hook() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script("slow.sh", &format!("sleep 0.5\n{HOOK}"));
    let toml = config(1, &["on_starting", "on_exit"], &[]).replace(
        "[hooks]",
        "[hooks]\nworker_exit = [{ command = [\"./slow.sh\"], timeout = \"10s\" }]",
    );
    let mut presup = Presup::start(&dir, &toml);
    wait_events(&dir, "the worker", |e| count(e, "up ") == 1);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    let e = events(&dir);
    assert!(position(&e, "hook worker_exit") < position(&e, "hook on_exit"), "{e:#?}");
}

/// A TERM while `on_reload` runs drops the reload: no worker of the new generation starts.
#[test]
fn a_stop_during_on_reload_starts_nothing_new() {
    let dir = Dir::new();
    fixtures(&dir);
    // The hook holds the reload until the test has seen the TERM logged.
    dir.script("reload.sh", &format!("{HOOK}\nwhile [ ! -e go ]; do sleep 0.01; done"));
    let toml = config(2, &[], &[]).replace(
        "[hooks]",
        "[hooks]\non_reload = [{ command = [\"./reload.sh\"], timeout = \"10s\" }]",
    );
    let mut presup = Presup::start(&dir, &toml);
    wait_events(&dir, "the workers", |e| count(e, "up ") == 2);
    presup.signal(Signal::SIGHUP);
    wait_events(&dir, "on_reload", |e| count(e, "hook on_reload") == 1);
    presup.signal(Signal::SIGTERM);
    presup.log.wait_for("TERM: graceful stop");
    std::fs::write(dir.join("go"), "").unwrap();
    assert_eq!(presup.wait_exit(), Some(0));
    let e = events(&dir);
    assert_eq!(count(&e, "up "), 2, "a worker started after the TERM: {e:#?}");
    assert_eq!(count(&e, "stop worker"), 2, "{e:#?}");
}

/// `on_exit` runs on the way out even when no `on_starting` hook is configured.
#[test]
fn on_exit_runs_without_on_starting_hooks() {
    let dir = Dir::new();
    fixtures(&dir);
    let mut presup = Presup::start(&dir, &config(1, &["on_exit"], &[]));
    wait_events(&dir, "the worker", |e| count(e, "up ") == 1);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert_eq!(count(&events(&dir), "hook on_exit"), 1, "{:#?}", events(&dir));
}

/// A fast stop (INT) is fast for the singletons too: SIGQUIT, not their stop signal.
#[test]
fn int_stops_the_singletons_with_sigquit() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script(
        "quitter.sh",
        r#"echo "start $PRESUP_SINGLETON $$" >> events
trap 'echo "quit $$" >> events; exit 0' QUIT
trap 'echo "term $$" >> events; exit 0' TERM
while :; do sleep 1 & wait $!; done"#,
    );
    let toml = config(1, &[], &["s"]).replace("./singleton.sh", "./quitter.sh");
    let mut presup = Presup::start(&dir, &toml);
    wait_events(&dir, "the worker", |e| count(e, "up ") == 1);
    presup.signal(Signal::SIGINT);
    assert_eq!(presup.wait_exit(), Some(0));
    let e = events(&dir);
    assert_eq!((count(&e, "quit "), count(&e, "term ")), (1, 0), "{e:#?}");
}

/// Two HUPs while `on_reload` runs: the new workers wait for the second run to end too.
#[test]
fn a_second_hup_during_on_reload_waits_for_its_own_hook() {
    let dir = Dir::new();
    fixtures(&dir);
    // Each run records `reload waiting PID`, then waits for its own file go.PID.
    dir.script(
        "reload.sh",
        "echo \"reload waiting $$\" >> events\nwhile [ ! -e go.$$ ]; do sleep 0.01; done\necho \"reload done $$\" >> events",
    );
    let toml = config(1, &[], &[]).replace(
        "[hooks]",
        "[hooks]\non_reload = [{ command = [\"./reload.sh\"], timeout = \"10s\" }]",
    );
    let mut presup = Presup::start(&dir, &toml);
    wait_events(&dir, "the worker", |e| count(e, "up ") == 1);
    presup.signal(Signal::SIGHUP);
    let e = wait_events(&dir, "on_reload 1", |e| count(e, "reload waiting") == 1);
    let first = pid_of(&e[position(&e, "reload waiting")]);
    presup.signal(Signal::SIGHUP);
    let e = wait_events(&dir, "on_reload 2", |e| count(e, "reload waiting") == 2);
    let second = pid_of(&e[last_position(&e, "reload waiting")]);
    std::fs::write(dir.join(&format!("go.{first}")), "").unwrap();
    wait_events(&dir, "run 1 over", |e| count(e, "reload done") == 1);
    std::fs::write(dir.join(&format!("go.{second}")), "").unwrap();
    let e = wait_events(&dir, "the new worker", |e| count(e, "up ") == 2);
    let done2 = e.iter().position(|l| l == &format!("reload done {second}")).expect("run 2 done");
    assert!(done2 < last_position(&e, "up "), "{e:#?}");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

#[test]
fn on_starting_retries_then_succeeds() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script("flaky.sh", "echo attempt >> events\n[ $(grep -c attempt events) -ge 3 ]");
    let toml = config(1, &[], &[]).replace(
        "[hooks]",
        "[hooks]\non_starting = [{ command = [\"./flaky.sh\"], timeout = \"10s\", retries = 2 }]",
    );
    let presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    let e = events(&dir);
    assert_eq!(count(&e, "attempt"), 3);
    assert!(last_position(&e, "attempt") < position(&e, "up "));
}

#[test]
fn a_failing_on_starting_stops_everything_with_exit_3_and_runs_on_exit() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script("register.sh", "echo attempt >> events\nexit 4");
    let toml = config(2, &["on_exit"], &["sched"]).replace(
        "[hooks]",
        "[hooks]\non_starting = [{ command = [\"./register.sh\"], timeout = \"10s\", retries = 1 }]",
    );
    let mut presup = Presup::start(&dir, &toml);
    assert_eq!(presup.wait_exit(), Some(3));
    let log = presup.log.text();
    assert!(log.contains("on_starting hook `./register.sh` failed: exited with code 4"), "{log}");
    let e = events(&dir);
    assert_eq!(
        e,
        ["attempt", "attempt", "hook on_exit    "],
        "no singleton or worker ever started"
    );
}

#[test]
fn a_hook_past_its_timeout_is_killed() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script("slow.sh", "echo $$ > slow.pid\nexec sleep 1000");
    let toml = config(1, &[], &[]).replace(
        "[hooks]",
        "[hooks]\non_starting = [{ command = [\"./slow.sh\"], timeout = \"300ms\" }]",
    );
    let mut presup = Presup::start(&dir, &toml);
    assert_eq!(presup.wait_exit(), Some(3));
    assert!(
        presup.log.text().contains("failed: killed at its 300ms timeout"),
        "{}",
        presup.log.text()
    );
    let pid: i32 = dir.read("slow.pid").trim().parse().unwrap();
    assert!(!alive(pid));
}

#[test]
fn term_during_a_long_on_starting_stops_the_hook_and_the_master_cleanly() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script("slow.sh", "echo $$ > slow.pid\nexec sleep 1000");
    let toml = config(1, &["on_exit"], &[]).replace(
        "[hooks]",
        "[hooks]\non_starting = [{ command = [\"./slow.sh\"], timeout = \"60s\" }]",
    );
    let mut presup = Presup::start(&dir, &toml);
    let pid: i32 =
        wait_until("the hook to start", DEADLINE, || dir.read("slow.pid").trim().parse().ok());
    let start = Instant::now();
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!alive(pid));
    let e = events(&dir);
    assert_eq!(count(&e, "up "), 0);
    assert_eq!(count(&e, "hook on_exit"), 1);
}

#[test]
fn a_singleton_is_ready_before_any_worker_and_one_that_cannot_start_fails_the_boot() {
    let dir = Dir::new();
    fixtures(&dir);
    // The singleton takes a moment before its socket accepts; every worker checks it is there.
    dir.script(
        "flow.sh",
        "sleep 0.3\nexec python3 -c 'import socket,time; s=socket.socket(socket.AF_UNIX); s.bind(\"flow.sock\"); s.listen(); time.sleep(1000)'",
    );
    dir.script("worker.sh", &format!("[ -S flow.sock ] && echo sock-ok >> events\n{WORKER}"));
    let toml = format!(
        "{}[[singleton]]\nname = \"flow\"\ncommand = [\"./flow.sh\"]\nready = {{ unix_socket = \"flow.sock\" }}\n",
        config(3, &[], &[])
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    // Up after `min_uptime` is not yet past the shell's first lines on a loaded machine: each
    // worker records `sock-ok` (or not) before `up`.
    let e = wait_events(&dir, "3 workers up", |e| count(e, "up ") == 3);
    assert_eq!(count(&e, "sock-ok"), 3);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(
        !dir.join("flow.sock").exists()
            || std::os::unix::net::UnixStream::connect(dir.join("flow.sock")).is_err()
    );

    let dir = Dir::new();
    fixtures(&dir);
    dir.script("broken.sh", "exit 1");
    let toml = format!(
        "{}[[singleton]]\nname = \"flow\"\ncommand = [\"./broken.sh\"]\n",
        config(2, &["on_starting"], &[])
    );
    let mut presup = Presup::start(&dir, &toml);
    assert_eq!(presup.wait_exit(), Some(3));
    let log = presup.log.text();
    assert!(
        log.contains("singleton flow could not start: exited with code 1 before it was ready"),
        "{log}"
    );
    assert_eq!(count(&events(&dir), "up "), 0, "no worker started");
}

#[test]
fn a_dead_singleton_is_restarted_alone_and_never_twice_at_once() {
    let dir = Dir::new();
    fixtures(&dir);
    // Each instance checks that no earlier instance is still alive when it starts.
    dir.script(
        "singleton.sh",
        &format!("for p in $(cat instances 2>/dev/null); do [ -d /proc/$p ] && echo overlap >> events; done\necho $$ >> instances\n{SINGLETON}"),
    );
    let presup = Presup::start(&dir, &config(2, &[], &["sched"]));
    let e = wait_events(&dir, "workers", |e| count(e, "up ") == 2);
    let workers: Vec<i32> = e.iter().filter(|l| l.starts_with("up ")).map(|l| pid_of(l)).collect();
    for round in 1..=3 {
        let e = events(&dir);
        let current = pid_of(&e[last_position(&e, "start sched")]);
        kill(current, Signal::SIGKILL);
        wait_events(&dir, "the singleton's restart", |e| count(e, "start sched") == round + 1);
    }
    let e = events(&dir);
    let last = pid_of(&e[last_position(&e, "start sched")]);
    presup.log.wait_for(&format!("singleton ready singleton=sched pid={last}"));
    assert_eq!(count(&e, "overlap"), 0, "{e:#?}");
    assert_eq!(count(&e, "up "), 2, "the workers never noticed");
    assert!(workers.iter().all(|&p| alive(p)));
}

#[test]
fn the_primary_is_never_held_by_two_live_processes() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script(
        "worker.sh",
        &format!(
            "if [ \"$PRESUP_PRIMARY\" = 1 ]; then\n  for p in $(cat primaries 2>/dev/null); do [ -d /proc/$p ] && echo overlap >> events; done\n  echo $$ >> primaries\nfi\n{WORKER}"
        ),
    );
    let presup = Presup::start(&dir, &config(3, &[], &[]));
    wait_events(&dir, "workers", |e| count(e, "up ") == 3);
    for round in 1..=3 {
        let primary = pid_of(dir.lines("primaries").last().unwrap());
        if round == 2 {
            presup.signal(Signal::SIGHUP);
        } else {
            kill(primary, Signal::SIGKILL);
        }
        wait_until("a new primary", DEADLINE, || {
            (dir.lines("primaries").len() == round + 1).then_some(())
        });
    }
    assert_eq!(count(&events(&dir), "overlap"), 0);
    let live_primaries =
        dir.lines("primaries").iter().filter(|p| alive(p.trim().parse().unwrap())).count();
    assert_eq!(live_primaries, 1);
}

#[test]
fn nothing_survives_a_kill_9_of_the_master() {
    let dir = Dir::new();
    fixtures(&dir);
    let mut presup = Presup::start(&dir, &config(3, &[], &["sched", "flow"]));
    presup.log.wait_for("ready: all workers up");
    let pids = dir.pids();
    assert_eq!(pids.len(), 5);
    presup.signal(Signal::SIGKILL);
    presup.wait_exit();
    // Milliseconds on an idle machine; the deadline is for a loaded one.
    let killed = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            killed.elapsed() < DEADLINE,
            "still alive {DEADLINE:?} after the master's SIGKILL: {:?}",
            pids.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("every child gone {:?} after the master exited", killed.elapsed());
}

#[test]
fn grandchildren_of_a_singleton_in_their_own_group_are_gone_after_a_stop() {
    let dir = Dir::new();
    fixtures(&dir);
    // The singleton starts a daemon in a new session (its own process group) and forgets it.
    dir.script(
        "singleton.sh",
        &format!(
            "setsid sh -c 'echo $$ >> pids; echo $$ > grandchild; exec sleep 1000' &\n{SINGLETON}"
        ),
    );
    let mut presup = Presup::start(&dir, &config(1, &[], &["daemonizer"]));
    presup.log.wait_for("ready: all workers up");
    let grandchild: i32 =
        wait_until("the grandchild", DEADLINE, || dir.read("grandchild").trim().parse().ok());
    assert!(alive(grandchild));
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(!alive(grandchild));
    assert!(presup.log.text().contains("killing a leftover process reparented to the master"));
}

#[test]
fn children_run_with_the_configured_user_and_umask() {
    let dir = Dir::new();
    fixtures(&dir);
    let root = nix::unistd::Uid::effective().is_root();
    let user = if root {
        "nobody".to_owned()
    } else {
        nix::unistd::User::from_uid(nix::unistd::Uid::effective()).unwrap().unwrap().name
    };
    let expected_uid = nix::unistd::User::from_name(&user).unwrap().unwrap().uid.as_raw();
    // nobody cannot write into the test's dir: record through a world-writable one.
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.script(
        "worker.sh",
        "echo \"$(id -u) $(umask)\" > shared/who.$PRESUP_WORKER_ID\nexec sleep 1000",
    );
    // The harness's pid record needs a writable file too.
    std::fs::write(dir.join("pids"), "").unwrap();
    std::fs::set_permissions(dir.join("pids"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let toml = format!("user = \"{user}\"\numask = \"027\"\n{}", config(2, &[], &[]));
    let presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    for slot in 0..2 {
        let who = wait_until("the worker's record", DEADLINE, || {
            Some(std::fs::read_to_string(shared.join(format!("who.{slot}"))).ok()?)
                .filter(|s| s.ends_with('\n'))
        });
        assert_eq!(who.trim(), format!("{expected_uid} 0027"));
    }

    let toml = format!("user = \"no-such-user-presup\"\n{}", config(1, &[], &[]));
    dir.write("supervisor.toml", &toml);
    let (code, _, err) = common::run(&["check"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("no such user \"no-such-user-presup\""), "{err}");
}

/// Sends `READY=1` to the master from the calling process (as every sd_notify library does).
const NOTIFY_READY: &str = "import os, socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])";

#[test]
fn notify_readiness_counts_only_the_datagrams_of_the_child_itself() {
    let dir = Dir::new();
    fixtures(&dir);
    // A grandchild's READY=1 is not the worker's; the worker's own comes once `go` exists.
    let worker = format!(
        "python3 -c \"{NOTIFY_READY}\"\necho grandchild-sent >> events\nexec python3 -c \"import os, socket, time\nwhile not os.path.exists('go'): time.sleep(0.01)\n{NOTIFY_READY}\ntime.sleep(1000)\""
    );
    dir.script("worker.sh", &worker);
    let toml = config(1, &[], &[]).replace("min_uptime", "ready = \"notify\"\nmin_uptime");
    let presup = Presup::start(&dir, &toml);
    presup.log.wait_for("notification from a process that is not a child; ignored");
    assert_eq!(presup.log.count("worker up (READY=1)"), 0);
    assert_eq!(presup.log.count("ready: all workers up"), 0);
    dir.write("go", "");
    presup.log.wait_for("worker up (READY=1)");
    presup.log.wait_for("ready: all workers up");
}

#[test]
fn a_notify_singleton_is_ready_at_ready_1_and_a_tcp_one_when_its_port_accepts() {
    let dir = Dir::new();
    fixtures(&dir);
    dir.script("notifier.sh", &format!("echo \"start $PRESUP_SINGLETON $$\" >> events\nexec python3 -c \"import time\ntime.sleep(0.2)\n{NOTIFY_READY}\ntime.sleep(1000)\""));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    dir.script(
        "server.sh",
        &format!("echo \"start $PRESUP_SINGLETON $$\" >> events\nexec python3 -c \"import socket, time\ntime.sleep(0.2)\ns = socket.create_server(('127.0.0.1', {port}))\ntime.sleep(1000)\""),
    );
    let toml = format!(
        "{}[[singleton]]\nname = \"a\"\ncommand = [\"./notifier.sh\"]\nready = \"notify\"\n[[singleton]]\nname = \"b\"\ncommand = [\"./server.sh\"]\nready = {{ tcp = \"127.0.0.1:{port}\" }}\n",
        config(1, &[], &[])
    );
    let presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    let log = presup.log.lines();
    let at = |needle: &str| {
        log.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}"))
    };
    assert!(at("singleton ready singleton=a") < at("singleton spawned singleton=b"));
    assert!(at("singleton ready singleton=b") < at("worker spawned"));
}

/// A master with singletons and no workers stays without: TTIN and TTOU are ignored.
#[test]
fn ttin_and_ttou_leave_a_master_without_workers_alone() {
    let dir = Dir::new();
    fixtures(&dir);
    let toml = format!("graceful_timeout = \"5s\"\n{}", singleton("s"));
    let mut presup = Presup::start(&dir, &toml);
    wait_events(&dir, "the singleton", |e| count(e, "start s ") == 1);
    presup.signal(Signal::SIGTTOU);
    presup.log.wait_for_nth("no workers (count = 0); ignored", 1);
    presup.signal(Signal::SIGTTIN);
    presup.log.wait_for_nth("no workers (count = 0); ignored", 2);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert_eq!(presup.log.count("worker spawned"), 0);
    assert_eq!(presup.log.count("cannot start worker"), 0);
    assert_eq!(count(&events(&dir), "up "), 0);
}

/// The runtime directories under `base` (what each master made there).
fn runtime_dirs(base: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(base).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs
}

#[test]
fn a_master_removes_the_runtime_directory_a_killed_master_left_and_keeps_a_live_ones() {
    let base = tempfile::tempdir().unwrap();
    let env = [("RUNTIME_DIRECTORY", base.path().to_str().unwrap())];
    let start = |dir: &Dir| {
        let script = dir.script("worker.sh", "exec sleep 60");
        let toml = format!("[workers]\ncommand = [\"{}\"]\ncount = 1\n", script.display());
        dir.write("supervisor.toml", &toml);
        let presup = Presup::start_with(dir, &[], &env);
        presup.log.wait_for("ready: all workers up");
        presup
    };
    let (killed_dir, live_dir, next_dir) = (Dir::new(), Dir::new(), Dir::new());
    let mut killed = start(&killed_dir);
    let left = runtime_dirs(base.path());
    assert_eq!(left.len(), 1, "{left:?}");
    let live = start(&live_dir);
    let kept: Vec<_> = runtime_dirs(base.path()).into_iter().filter(|d| *d != left[0]).collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    killed.signal(Signal::SIGKILL);
    assert_eq!(killed.wait_exit(), None);
    assert!(left[0].exists(), "a master killed with -9 cannot remove its directory");

    let next = start(&next_dir);
    let line = next.log.wait_for("removed the runtime directory of a master that is gone");
    assert!(line.contains(&left[0].display().to_string()), "{line}");
    assert!(!left[0].exists());
    assert!(kept[0].join("notify").exists(), "the live master's directory was removed");
    assert_eq!(runtime_dirs(base.path()).len(), 2);
    for mut presup in [live, next] {
        presup.signal(Signal::SIGTERM);
        assert_eq!(presup.wait_exit(), Some(0));
    }
    assert_eq!(runtime_dirs(base.path()), Vec::<std::path::PathBuf>::new());
}
