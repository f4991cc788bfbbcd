//! The master running exec'd workers: environment, listeners, restarts, backoff, boot
//! failures, stop, TTIN/TTOU, HUP, USR1.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{alive, environ, kill, var as get, wait_dead, wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;

/// A worker that records `up SLOT PID GENERATION` and then sleeps (exec, so the recorded pid
/// is the worker's).
const WORKER: &str = r#"echo "up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION" >> events
exec sleep 1000"#;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Up {
    slot: usize,
    pid: i32,
    generation: u64,
}

fn ups(dir: &Dir) -> Vec<Up> {
    dir.lines("events")
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"up")).then(|| Up {
                slot: f[1].parse().unwrap(),
                pid: f[2].parse().unwrap(),
                generation: f[3].parse().unwrap(),
            })
        })
        .collect()
}

fn wait_ups(dir: &Dir, n: usize) -> Vec<Up> {
    wait_until(&format!("{n} workers recorded"), DEADLINE, || {
        let u = ups(dir);
        (u.len() >= n).then_some(u)
    })
}

fn config(workers: &str, extra: &str) -> String {
    format!(
        r#"graceful_timeout = "5s"
{extra}
[workers]
command = ["./worker.sh"]
min_uptime = "100ms"
{workers}
"#
    )
}

/// Whether `pid` runs `sleep` and is blocked in it (state S): done starting up.
fn asleep_in_sleep(pid: i32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim() == "sleep" && common::state(pid) == Some('S')
}

/// fd number → link target, for a live process.
fn fds_of(pid: i32) -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let n: i32 = e.file_name().to_str()?.parse().ok()?;
            Some((n, std::fs::read_link(e.path()).ok()?.display().to_string()))
        })
        .collect();
    v.sort();
    v
}

/// The environment of a fixture worker, once its shell has exec'd `sleep` (during the exec
/// the kernel shows an empty environment).
fn env_of(pid: i32) -> Vec<(String, String)> {
    wait_until("the worker to exec sleep", DEADLINE, || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().filter(|c| c.trim() == "sleep")
    });
    environ(pid)
}

#[test]
fn workers_get_their_environment_and_only_the_listeners() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let toml = config(
        // The config's env cannot override presup's own variables (checked below).
        "count = 3\nenv = { APP_ENV = \"test\", PRESUP_MASTER_PID = \"1\", PRESUP_WORKER_ID = \"9\", NOTIFY_SOCKET = \"/elsewhere/notify\" }",
        "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n[[listen]]\nname = \"admin\"\naddress = \"unix:admin.sock\"\nbacklog = 8\n",
    );
    dir.write("supervisor.toml", &toml);
    let systemd = [
        ("NOTIFY_SOCKET", "/nonexistent/notify"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_PID", "1"),
        ("LISTEN_FDNAMES", "x"),
        ("WATCHDOG_USEC", "1000000"),
        ("WATCHDOG_PID", "1"),
    ];
    let presup = Presup::start_with(&dir, &[], &systemd);
    let ups = wait_ups(&dir, 3);
    let slots: BTreeSet<usize> = ups.iter().map(|u| u.slot).collect();
    assert_eq!(slots, BTreeSet::from([0, 1, 2]));
    let master_sockets: BTreeSet<String> = fds_of(presup.pid())
        .into_iter()
        .map(|f| f.1)
        .filter(|t| t.starts_with("socket:"))
        .collect();
    for u in &ups {
        let env = env_of(u.pid);
        assert_eq!(get(&env, "PRESUP_WORKER_ID"), Some(u.slot.to_string().as_str()));
        assert_eq!(get(&env, "PRESUP_WORKER_COUNT"), Some("3"));
        assert_eq!(get(&env, "PRESUP_GENERATION"), Some("1"));
        assert_eq!(get(&env, "PRESUP_PRIMARY"), Some(if u.slot == 0 { "1" } else { "0" }));
        assert_eq!(get(&env, "PRESUP_MASTER_PID"), Some(presup.pid().to_string().as_str()));
        assert_eq!(get(&env, "APP_ENV"), Some("test"));
        assert_eq!(get(&env, "LISTEN_FDS"), Some("2"));
        assert_eq!(get(&env, "LISTEN_FDNAMES"), Some("http:admin"));
        assert_eq!(get(&env, "LISTEN_PID"), Some(u.pid.to_string().as_str()));
        for var in ["WATCHDOG_USEC", "WATCHDOG_PID"] {
            assert_eq!(get(&env, var), None, "{var} leaked to the worker");
        }
        // NOTIFY_SOCKET is the master's own socket, never the one systemd gave the master.
        let notify = get(&env, "NOTIFY_SOCKET").expect("NOTIFY_SOCKET");
        assert!(notify.contains("/presup-") && notify.ends_with("/notify"), "{notify}");
        // Sampled once the worker sleeps: while `exec sleep` starts, the loader and the locale
        // briefly hold files of their own open.
        wait_until("the worker asleep in sleep(1)", DEADLINE, || {
            asleep_in_sleep(u.pid).then_some(())
        });
        let fds = fds_of(u.pid);
        let numbers: Vec<i32> = fds.iter().map(|f| f.0).collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4], "fds of worker {}: {fds:?}", u.pid);
        for (n, target) in &fds[3..] {
            assert!(
                master_sockets.contains(target),
                "fd {n} ({target}) is not one of the master's listeners"
            );
        }
        assert_ne!(fds[3].1, fds[4].1);
    }
    assert!(dir.join("admin.sock").exists());
}

#[test]
fn workers_answer_on_the_shared_socket() {
    let dir = Dir::new();
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo/app.py");
    let toml = format!(
        "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n[workers]\ncommand = [\"python3\", \"{app}\"]\ncount = 2\nmin_uptime = \"100ms\"\n"
    );
    let presup = Presup::start(&dir, &toml);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let body = common::http_get(port).unwrap();
    assert!(body.starts_with("slot ") && body.contains(" generation 1"), "{body:?}");
}

#[test]
fn a_killed_worker_comes_back_in_its_slot() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let presup = Presup::start(&dir, &config("count = 2", ""));
    let first = wait_ups(&dir, 2);
    let victim = first.iter().find(|u| u.slot == 1).unwrap().clone();
    kill(victim.pid, Signal::SIGKILL);
    let after = wait_ups(&dir, 3);
    let new = &after[2];
    assert_eq!((new.slot, new.generation), (1, 1));
    assert_ne!(new.pid, victim.pid);
    let line = presup.log.wait_for("killed by SIGKILL");
    assert!(line.contains("slot=1") && !line.contains("presup's SIGKILL"), "{line}");
    presup.log.wait_for("restart scheduled in 0s");
}

#[test]
fn backoff_grows_while_a_slot_crashes_and_resets_after_a_healthy_run() {
    let dir = Dir::new();
    dir.script(
        "worker.sh",
        r#"if [ "$PRESUP_WORKER_ID" = 1 ] && [ -e crash ]; then exit 1; fi
echo "up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION" >> events
if [ -e healing ]; then sleep 1.2; echo "healthy $$" >> events; fi
exec sleep 1000"#,
    );
    let backoff = r#"restart_backoff = { initial = "50ms", max = "400ms", reset = "1s" }"#;
    let presup = Presup::start(&dir, &config(&format!("count = 2\n{backoff}"), ""));
    let first = wait_ups(&dir, 2);
    presup.log.wait_for("ready: all workers up");
    dir.write("crash", "");
    kill(first.iter().find(|u| u.slot == 1).unwrap().pid, Signal::SIGKILL);
    presup.log.wait_for_nth("restart scheduled in 400ms", 2);
    let delays: Vec<String> = presup
        .log
        .lines()
        .iter()
        .filter_map(|l| {
            l.split("restart scheduled in ")
                .nth(1)
                .map(|r| r.split_whitespace().next().unwrap().to_owned())
        })
        .take(6)
        .collect();
    assert_eq!(delays, ["0s", "50ms", "100ms", "200ms", "400ms", "400ms"]);
    // Healed, it stays up past `reset` (the worker says so once it has run 1.2 s, counted from
    // after its spawn); its next death restarts at once.
    dir.write("healing", "");
    std::fs::remove_file(dir.join("crash")).unwrap();
    let healed = wait_until("slot 1 up again", DEADLINE, || {
        ups(&dir).into_iter().skip(2).find(|u| u.slot == 1)
    });
    let healthy = format!("healthy {}", healed.pid);
    wait_until("the healed worker's healthy run", DEADLINE, || {
        dir.lines("events").contains(&healthy).then_some(())
    });
    let before = presup.log.count("restart scheduled in");
    kill(healed.pid, Signal::SIGKILL);
    let line = presup.log.wait_for_nth("restart scheduled in", before + 1);
    assert!(line.contains("restart scheduled in 0s"), "{line}");
}

#[test]
fn a_crash_looping_command_ends_startup_with_exit_3_and_bounded_spawns() {
    let dir = Dir::new();
    dir.script("worker.sh", "exit 7");
    let mut presup = Presup::start(&dir, &config("count = 2", ""));
    assert_eq!(presup.wait_exit(), Some(3));
    let log = presup.log.text();
    assert!(
        log.contains("worker command `./worker.sh` failed to boot 5 times in a row in slot"),
        "{log}"
    );
    assert!(log.contains("last: exited with code 7"), "{log}");
    let spawns = dir.pids().len();
    assert!((5..=10).contains(&spawns), "{spawns} spawns for 2 slots × 5 attempts");
}

#[test]
fn a_command_that_cannot_execute_is_reported_with_its_path_and_error() {
    let dir = Dir::new();
    // Executable, but neither a binary nor a script (a directory is a config error instead).
    let junk = dir.write("junk", "\u{7f}not an executable format\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (command, error) in
        [("./missing", "No such file or directory"), ("./junk", "Exec format error")]
    {
        let toml = config("count = 1\nboot_attempts = 2", "").replace("./worker.sh", command);
        let mut presup = Presup::start(&dir, &toml);
        assert_eq!(presup.wait_exit(), Some(3));
        let path = dir.join(command).display().to_string();
        let expected = format!("cannot execute {path}: {error}");
        assert!(
            presup.log.text().contains(&expected),
            "want {expected:?} in:\n{}",
            presup.log.text()
        );
    }
    let toml =
        config("count = 1\nboot_attempts = 1", "").replace("./worker.sh", "no-such-program-presup");
    let mut presup = Presup::start(&dir, &toml);
    assert_eq!(presup.wait_exit(), Some(3));
    assert!(presup.log.text().contains("no-such-program-presup: command not found in PATH"));
}

#[test]
fn term_stops_gracefully_and_sigkills_a_worker_that_ignores_it_at_graceful_timeout() {
    let dir = Dir::new();
    dir.script(
        "worker.sh",
        r#"if [ "$PRESUP_WORKER_ID" = 1 ]; then trap '' TERM; fi
echo "up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION" >> events
exec sleep 1000"#,
    );
    let toml =
        config("count = 2", "").replace("graceful_timeout = \"5s\"", "graceful_timeout = \"1s\"");
    let mut presup = Presup::start(&dir, &toml);
    let ups = wait_ups(&dir, 2);
    presup.log.wait_for("ready: all workers up");
    let start = Instant::now();
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900), "SIGKILL came before graceful_timeout: {took:?}");
    let log = presup.log.text();
    let killed =
        log.lines().find(|l| l.contains("presup's SIGKILL")).unwrap_or_else(|| panic!("{log}"));
    assert!(killed.contains("slot=1"), "{killed}");
    assert!(log.contains("killed by SIGTERM (stopped: Shutdown)"), "{log}");
    for u in ups {
        assert!(!alive(u.pid));
    }
}

#[test]
fn int_is_a_fast_stop() {
    let dir = Dir::new();
    dir.script("worker.sh", &format!("trap '' TERM\n{WORKER}"));
    let mut presup = Presup::start(&dir, &config("count = 2", "").replace("\"5s\"", "\"60s\""));
    wait_ups(&dir, 2);
    let start = Instant::now();
    presup.signal(Signal::SIGINT);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(start.elapsed() < Duration::from_secs(30), "fast stop waited for graceful_timeout");
    assert!(presup.log.text().contains("killed by SIGQUIT"), "{}", presup.log.text());
}

#[test]
fn ttin_adds_a_worker_ttou_removes_the_highest_never_below_one() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let presup = Presup::start(&dir, &config("count = 2", ""));
    let first = wait_ups(&dir, 2);
    presup.signal(Signal::SIGTTIN);
    let third = wait_ups(&dir, 3)[2].clone();
    assert_eq!(third.slot, 2);
    assert_eq!(get(&env_of(third.pid), "PRESUP_WORKER_COUNT"), Some("3"));
    presup.signal(Signal::SIGTTOU);
    wait_dead(third.pid);
    presup.signal(Signal::SIGTTOU);
    let slot1 = first.iter().find(|u| u.slot == 1).unwrap().pid;
    wait_dead(slot1);
    presup.signal(Signal::SIGTTOU);
    let line = presup.log.wait_for_nth("TTOU: one worker fewer", 3);
    assert!(line.contains("workers=1"), "never below one: {line}");
    let slot0 = first.iter().find(|u| u.slot == 0).unwrap().pid;
    // The last TTOU was ignored: stop the master and check slot 0 lived until then.
    assert!(alive(slot0));
    assert_eq!(ups(&dir).len(), 3);
}

#[test]
fn hup_with_a_bad_config_keeps_the_workers_and_a_good_one_brings_generation_2() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let good = config("count = 2", "");
    let presup = Presup::start(&dir, &good);
    let first = wait_ups(&dir, 2);
    presup.log.wait_for("ready: all workers up");
    dir.write("supervisor.toml", &good.replace("count = 2", "count = \"many\""));
    presup.signal(Signal::SIGHUP);
    let line = presup.log.wait_for("reload rejected");
    assert!(line.contains("workers.count") && line.contains("line "), "{line}");
    presup.log.wait_for("keeping the running one");
    assert!(first.iter().all(|u| alive(u.pid)));
    assert_eq!(ups(&dir).len(), 2);

    dir.write("supervisor.toml", &good);
    presup.signal(Signal::SIGHUP);
    let all = wait_until("generation 2 in every slot", DEADLINE, || {
        let u = ups(&dir);
        let gen2: BTreeSet<usize> =
            u.iter().filter(|u| u.generation == 2).map(|u| u.slot).collect();
        (gen2.len() == 2).then_some(u)
    });
    for old in &first {
        wait_dead(old.pid);
    }
    let gen2: Vec<&Up> = all.iter().filter(|u| u.generation == 2).collect();
    assert!(gen2.iter().all(|u| alive(u.pid)));
}

#[test]
fn usr1_is_forwarded_to_the_workers_that_ask_for_it() {
    let dir = Dir::new();
    dir.script(
        "worker.sh",
        r#"trap 'echo "usr1 $PRESUP_WORKER_ID" >> events' USR1
echo "up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION" >> events
while :; do sleep 1 & wait $!; done"#,
    );
    let presup = Presup::start(&dir, &config("count = 2\nforward_signals = [\"USR1\"]", ""));
    wait_ups(&dir, 2);
    // Forwarded to workers that are up (one still starting might not have its handler yet).
    presup.log.wait_for("ready: all workers up");
    presup.signal(Signal::SIGUSR1);
    wait_until("both workers got USR1", DEADLINE, || {
        (dir.lines("events").iter().filter(|l| l.starts_with("usr1")).count() == 2).then_some(())
    });
}

#[test]
fn usr1_reopens_the_log_and_leaves_children_that_do_not_handle_it_alone() {
    let dir = Dir::new();
    // USR1's default action ends a process: these die of it if it reaches them.
    dir.script(
        "worker.sh",
        "echo \"up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION\" >> events\n\
         exec python3 -c 'import time; time.sleep(1000)'",
    );
    dir.script(
        "single.sh",
        "trap 'echo usr1 >> single-events' USR1\nwhile :; do sleep 1 & wait $!; done",
    );
    let extra = "[[singleton]]\nname = \"logger\"\ncommand = [\"./single.sh\"]\nforward_signals = [\"USR1\"]\n";
    let presup = Presup::start(&dir, &format!("{}\n{extra}", config("count = 2", "")));
    let ups = wait_ups(&dir, 2);
    presup.log.wait_for("ready: all workers up");
    presup.signal(Signal::SIGUSR1);
    let line = presup.log.wait_for("USR1: log reopened");
    assert!(line.contains("forwarded_to=1"), "{line}");
    // The singleton that asked for it got it; the workers, which did not, are still the same.
    wait_until("the singleton to get USR1", DEADLINE, || {
        (dir.read("single-events").trim() == "usr1").then_some(())
    });
    presup.signal(Signal::SIGTTIN);
    wait_ups(&dir, 3);
    for up in &ups {
        assert!(common::alive(up.pid), "worker {} died of USR1:\n{}", up.pid, presup.log.text());
    }
    assert_eq!(presup.log.count("SIGUSR1"), 0, "{}", presup.log.text());
}

#[test]
fn a_second_master_on_the_same_pidfile_is_refused() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let toml = config("count = 1", "pidfile = \"presup.pid\"");
    let mut first = Presup::start(&dir, &toml);
    first.log.wait_for("ready: all workers up");
    let pid = dir.read("presup.pid");
    assert_eq!(pid.trim(), first.pid().to_string());
    let mut second = Presup::start_with(&dir, &[], &[]);
    assert_eq!(second.wait_exit(), Some(3));
    let expected = format!("another presup master (pid {}) holds it", first.pid());
    assert!(second.log.text().contains(&expected), "{}", second.log.text());
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait_exit(), Some(0));
    assert!(!dir.join("presup.pid").exists(), "pidfile removed on stop");
}

#[test]
fn a_bind_failure_exits_3_naming_the_address() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let toml = config("count = 1", &format!("[[listen]]\nname = \"http\"\naddress = \"{addr}\""));
    let mut presup = Presup::start(&dir, &toml);
    assert_eq!(presup.wait_exit(), Some(3));
    let want = format!("cannot bind {addr}: Address already in use");
    assert!(presup.log.text().contains(&want), "{}", presup.log.text());
    assert!(dir.pids().is_empty(), "no worker started");
}
