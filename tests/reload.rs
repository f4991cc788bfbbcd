//! Ready means ready: `ready = "notify"` gating startup and reload, a reload undone
//! when its workers cannot come up, the watchdog, a HUP storm, and `STOPPING=1`.
//!
//! The fixture workers are small Python programs (exec'd by a shell script that records the
//! pid, so the recorded pid is the worker's and the datagrams come from it). They write what
//! they do to `events` (`up SLOT PID GENERATION`, `ready ...`, `stop ...`) before they tell the
//! master, so the order of `events` follows cause and effect. Where a test must show that the
//! master did *not* do something, it first waits for a [`barrier`]: a datagram that the master
//! logs only after every decision due to the earlier events was taken and logged.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    alive, children_of, environ, kill, var, wait_dead, wait_until_with, Dir, Presup, DEADLINE,
};
use nix::sys::signal::Signal;

/// What every Python fixture worker starts with: helpers, and `up SLOT PID GENERATION` in
/// `events`. TERM is recorded as `stop SLOT PID GENERATION` before a clean exit.
const PRELUDE: &str = r#"import os, signal, socket, sys, time
SLOT = os.environ["PRESUP_WORKER_ID"]
GEN = os.environ["PRESUP_GENERATION"]
PID = os.getpid()

def event(*words):
    with open("events", "a") as f:
        f.write(" ".join(str(w) for w in words) + "\n")

def notify(message):
    # From this very process: the master attributes datagrams by the kernel's credentials.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(message.encode(), os.environ["NOTIFY_SOCKET"])
    s.close()

def wait_file(*names):
    while not any(os.path.exists(n) for n in names):
        time.sleep(0.005)

def claim(name):
    """True for the first process ever to claim `name`."""
    try:
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

def on_term(signum, frame):
    event("stop", SLOT, PID, GEN)
    sys.exit(0)

def forever():
    while True:
        time.sleep(1000)

signal.signal(signal.SIGTERM, on_term)
event("up", SLOT, PID, GEN)
"#;

/// Writes `worker.py` (the prelude, then `body`) and `worker.sh`, which execs it.
fn python_worker(dir: &Dir, body: &str) {
    dir.write("worker.py", &format!("{PRELUDE}\n{body}\n"));
    // No core file from the watchdog's SIGABRT.
    dir.script("worker.sh", "ulimit -c 0\nexec python3 ./worker.py");
}

fn notify_config(count: usize, extra: &str) -> String {
    format!(
        r#"graceful_timeout = "10s"
[workers]
command = ["./worker.sh"]
count = {count}
ready = "notify"
boot_timeout = "20s"
min_uptime = "100ms"
{extra}
"#
    )
}

// ---- events ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Up {
    slot: usize,
    pid: i32,
    generation: u64,
}

fn events(dir: &Dir) -> Vec<String> {
    dir.lines("events")
}

fn ups(dir: &Dir) -> Vec<Up> {
    events(dir)
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                ["up", slot, pid, generation, ..] => Some(Up {
                    slot: slot.parse().ok()?,
                    pid: pid.parse().ok()?,
                    generation: generation.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// What a failed wait shows besides the master's log: the fixtures' `events`.
fn context(dir: &Dir, _presup: &Presup) -> String {
    format!("events:\n{}", dir.read("events"))
}

/// Waits for an `up` event matching `f`.
fn wait_up(dir: &Dir, presup: &Presup, what: &str, f: impl Fn(&Up) -> bool) -> Up {
    wait_until_with(what, DEADLINE, || context(dir, presup), || ups(dir).into_iter().find(|u| f(u)))
}

/// Waits until `n` workers of `generation` have recorded `up`.
fn wait_generation(dir: &Dir, presup: &Presup, generation: u64, n: usize) -> Vec<Up> {
    let what = format!("{n} workers of generation {generation}");
    wait_until_with(
        &what,
        DEADLINE,
        || context(dir, presup),
        || {
            let u: Vec<Up> = ups(dir).into_iter().filter(|u| u.generation == generation).collect();
            (u.len() >= n).then_some(u)
        },
    )
}

/// Waits for the event line `line` exactly.
fn wait_event(dir: &Dir, presup: &Presup, line: &str) {
    wait_until_with(
        &format!("event {line:?}"),
        DEADLINE,
        || context(dir, presup),
        || events(dir).iter().any(|e| e == line).then_some(()),
    );
}

/// The position of the event line `line`.
fn at(events: &[String], line: &str) -> usize {
    events.iter().position(|e| e == line).unwrap_or_else(|| panic!("no {line:?} in {events:#?}"))
}

// ---- the master's log ----

/// Whether a log line is about `pid` (its `pid=` field, exactly).
fn about(line: &str, pid: i32) -> bool {
    let field = format!("pid={pid}");
    line.split_whitespace().any(|w| w == field)
}

/// Waits for a log line containing `needle` about `pid`.
fn wait_log(dir: &Dir, presup: &Presup, needle: &str, pid: i32) -> String {
    wait_until_with(
        &format!("{needle:?} for pid {pid}"),
        DEADLINE,
        || context(dir, presup),
        || presup.log.lines().into_iter().find(|l| l.contains(needle) && about(l, pid)),
    )
}

/// The `generation=` field of a log line.
fn generation_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("generation="))
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {line:?}"))
}

/// The master's notification socket, from the environment of a recorded worker.
fn notify_socket(dir: &Dir, presup: &Presup) -> PathBuf {
    wait_until_with(
        "a worker's NOTIFY_SOCKET",
        DEADLINE,
        || context(dir, presup),
        || {
            ups(dir).iter().find_map(|u| {
                // Empty while the worker is in the middle of an exec: the next poll reads it.
                var(&environ(u.pid), "NOTIFY_SOCKET").map(PathBuf::from)
            })
        },
    )
}

/// Sends a datagram to the master's notification socket from the test (not a child, so the
/// master only logs it) and waits for that log line. The master reads datagrams after the
/// signals of the same wake-up and takes every decision due before it sleeps again, so by
/// then it has acted on (and logged) every signal sent and notification logged before.
fn barrier(presup: &Presup, socket: &Path) {
    let needle = "notification from a process that is not a child";
    let n = presup.log.count(needle) + 1;
    UnixDatagram::unbound().unwrap().send_to(b"STATUS=barrier", socket).unwrap();
    presup.log.wait_for_nth(needle, n);
}

// ---- the tests ----

/// Startup waits for every worker's `READY=1`, and a reload stops the old worker of a slot
/// only once the new worker of that slot sent `READY=1` (slot 0 last, old gone before new).
#[test]
fn notify_workers_gate_startup_and_reload() {
    let dir = Dir::new();
    // Each worker sends READY=1 once `go-GEN` or `go-GEN-SLOT` exists. Unready for three times
    // the `min_uptime` of `notify_config` (after which a spawn-mode worker would be up, and
    // counted from after its spawn), it records `held SLOT PID GEN`: the period under test.
    python_worker(
        &dir,
        r#"start = time.monotonic()
held = False
while not any(os.path.exists(n) for n in (f"go-{GEN}", f"go-{GEN}-{SLOT}")):
    if not held and time.monotonic() - start >= 0.3:
        event("held", SLOT, PID, GEN)
        held = True
    time.sleep(0.005)
event("ready", SLOT, PID, GEN)
notify("READY=1")
forever()"#,
    );
    let presup = Presup::start(&dir, &notify_config(3, ""));
    let gen1 = wait_generation(&dir, &presup, 1, 3);
    let pid_in = |ups: &[Up], slot: usize| ups.iter().find(|u| u.slot == slot).unwrap().pid;
    let old: Vec<i32> = (0..3).map(|s| pid_in(&gen1, s)).collect();
    let socket = notify_socket(&dir, &presup);

    // Startup: slots 1 and 2 ready, slot 0 not yet: the boot is not over, however long slot
    // 0 takes (here three times the `min_uptime` that would make it up in spawn mode).
    for slot in [1, 2] {
        dir.write(&format!("go-1-{slot}"), "");
        wait_log(&dir, &presup, "worker up (READY=1)", old[slot]);
    }
    wait_event(&dir, &presup, &format!("held 0 {} 1", old[0]));
    barrier(&presup, &socket);
    assert_eq!(presup.log.count("ready: all workers up"), 0, "{}", presup.log.text());
    assert_eq!(presup.log.count("worker up (READY=1)"), 2);
    dir.write("go-1-0", "");
    presup.log.wait_for("ready: all workers up");
    let log = presup.log.lines();
    let booted = log.iter().position(|l| l.contains("ready: all workers up")).unwrap();
    for &pid in &old {
        let up = log.iter().position(|l| l.contains("worker up (READY=1)") && about(l, pid));
        assert!(up.is_some_and(|i| i < booted), "worker {pid} was not up before the boot ended");
    }

    // Reload: the new slot-1 worker starts; until it is ready, every old worker serves.
    presup.signal(Signal::SIGHUP);
    let new1 = wait_up(&dir, &presup, "slot 1 of generation 2", |u| u.generation == 2);
    assert_eq!(new1.slot, 1, "slot 1 is replaced first");
    wait_event(&dir, &presup, &format!("held 1 {} 2", new1.pid));
    barrier(&presup, &socket);
    assert!(old.iter().all(|&p| alive(p)), "an old worker died before its successor was ready");
    assert_eq!(presup.log.count("stopping worker"), 0, "{}", presup.log.text());
    assert_eq!(ups(&dir).iter().filter(|u| u.generation == 2).count(), 1, "reload_batch = 1");

    // Slot 1's new worker ready: its old one is stopped, and slot 2 is next; slot 0 untouched.
    dir.write("go-2-1", "");
    wait_event(&dir, &presup, &format!("stop 1 {} 1", old[1]));
    let new2 =
        wait_up(&dir, &presup, "slot 2 of generation 2", |u| u.generation == 2 && u.slot == 2);
    barrier(&presup, &socket);
    assert!(alive(old[2]) && alive(old[0]), "slot 2 or 0 stopped before its successor was ready");

    // Everything may come up now: the rollout completes.
    dir.write("go-2", "");
    let done = presup.log.wait_for("reload done");
    assert_eq!(generation_of(&done), 2, "{done}");
    let gen2 = wait_generation(&dir, &presup, 2, 3);
    for &pid in &old {
        wait_dead(pid);
    }
    let slots: BTreeSet<usize> = gen2.iter().map(|u| u.slot).collect();
    assert_eq!(slots, BTreeSet::from([0, 1, 2]));
    assert!(gen2.iter().all(|u| alive(u.pid)), "{gen2:?}");
    assert_eq!(pid_in(&gen2, 1), new1.pid);
    assert_eq!(pid_in(&gen2, 2), new2.pid);
    let e = events(&dir);
    for slot in [1, 2] {
        let ready_new = at(&e, &format!("ready {slot} {} 2", pid_in(&gen2, slot)));
        let stop_old = at(&e, &format!("stop {slot} {} 1", old[slot]));
        assert!(ready_new < stop_old, "slot {slot}: old stopped before the new was ready: {e:#?}");
    }
    // Slot 0 keeps the primary rule: its old worker is gone before the new one starts.
    let stop_old0 = at(&e, &format!("stop 0 {} 1", old[0]));
    let up_new0 = at(&e, &format!("up 0 {} 2", pid_in(&gen2, 0)));
    assert!(stop_old0 < up_new0, "{e:#?}");
}

/// A reload to a command that exits at once is undone: the generation-1 workers keep their
/// pids, keep answering, and the master keeps the old config; a later good reload works.
#[test]
fn a_reload_whose_workers_exit_at_once_is_undone_and_the_old_ones_keep_serving() {
    let dir = Dir::new();
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo/app.py");
    dir.script(
        "app.sh",
        &format!(
            "echo \"up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION\" >> events\nexec python3 {app}"
        ),
    );
    dir.script("bad.sh", "echo \"bad $PRESUP_WORKER_ID $$ $PRESUP_GENERATION\" >> events\nexit 1");
    let config = |command: &str, min_uptime: &str| {
        format!(
            "graceful_timeout = \"10s\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n[workers]\ncommand = [\"{command}\"]\ncount = 2\nmin_uptime = \"{min_uptime}\"\n"
        )
    };
    let good = config("./app.sh", "300ms");
    let presup = Presup::start(&dir, &good);
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    let gen1: BTreeSet<i32> = wait_generation(&dir, &presup, 1, 2).iter().map(|u| u.pid).collect();
    answering(&dir, &presup, port, &gen1, 1);

    // A minimum uptime far longer than the bad command lives: its exit is a boot failure
    // however slow the machine.
    dir.write("supervisor.toml", &config("./bad.sh", "10s"));
    presup.signal(Signal::SIGHUP);
    let undone = presup.log.wait_for("undone");
    assert!(undone.contains("exited with code 1"), "{undone}");
    assert!(undone.contains("generation 1 keeps serving"), "{undone}");
    let failed = generation_of(&presup.log.wait_for("HUP: reloading"));
    assert_eq!((failed, generation_of(&undone)), (2, 2), "{undone}");
    assert!(gen1.iter().all(|&p| alive(p)));
    answering(&dir, &presup, port, &gen1, 1);
    let now: BTreeSet<i32> = ups(&dir).iter().map(|u| u.pid).filter(|&p| alive(p)).collect();
    assert_eq!(now, gen1, "the workers are the generation-1 ones");

    // The old config is back: a worker killed now is replaced by the old command.
    let victim = ups(&dir).into_iter().find(|u| u.slot == 1).unwrap();
    kill(victim.pid, Signal::SIGKILL);
    let respawned =
        wait_up(&dir, &presup, "slot 1 respawned", |u| u.pid != victim.pid && u.slot == 1);
    assert_eq!(respawned.generation, 1);
    let serving: BTreeSet<i32> =
        gen1.iter().copied().filter(|&p| p != victim.pid).chain([respawned.pid]).collect();
    // Spawn readiness: up after min_uptime; wait until it answers too.
    answering(&dir, &presup, port, &serving, 1);

    // A good config again: a new generation, numbered after the undone one.
    dir.write("supervisor.toml", &good);
    presup.signal(Signal::SIGHUP);
    let reloading = presup.log.wait_for_nth("HUP: reloading", 2);
    assert_eq!(generation_of(&reloading), 3, "{reloading}");
    let done = presup.log.wait_for("reload done");
    assert_eq!(generation_of(&done), 3, "{done}");
    let gen3: BTreeSet<i32> = wait_generation(&dir, &presup, 3, 2).iter().map(|u| u.pid).collect();
    for &pid in &serving {
        wait_dead(pid);
    }
    answering(&dir, &presup, port, &gen3, 3);
    let bad = events(&dir).iter().filter(|e| e.starts_with("bad ")).count();
    assert_eq!(bad, 1, "the failed generation was tried once: {:#?}", events(&dir));
}

/// GETs until every pid of `pids` has answered; every answer must come from one of them, of
/// `generation`.
fn answering(dir: &Dir, presup: &Presup, port: u16, pids: &BTreeSet<i32>, generation: u64) {
    let mut seen = BTreeSet::new();
    wait_until_with(
        &format!("answers from {pids:?}"),
        DEADLINE,
        || context(dir, presup),
        || {
            let body = common::http_get(port).unwrap_or_else(|e| panic!("GET failed: {e}"));
            // "slot S pid P generation G"
            let f: Vec<&str> = body.split_whitespace().collect();
            let (pid, g): (i32, u64) = match f[..] {
                ["slot", _, "pid", pid, "generation", g] => {
                    (pid.parse().unwrap(), g.parse().unwrap())
                }
                _ => panic!("unexpected body {body:?}"),
            };
            assert!(
                pids.contains(&pid) && g == generation,
                "answered by pid {pid} of generation {g}; want one of {pids:?} of {generation}"
            );
            seen.insert(pid);
            (seen == *pids).then_some(())
        },
    );
}

/// A worker silent for longer than `watchdog` gets SIGABRT (and SIGKILL if it survives that),
/// logged as a watchdog stop, not a crash; its slot gets a new worker. A worker that pings is
/// left alone. Each worker gets `WATCHDOG_USEC` and its own pid as `WATCHDOG_PID`.
#[test]
fn the_watchdog_kills_a_silent_worker_and_its_slot_gets_a_new_one() {
    let dir = Dir::new();
    // The first worker of slots 0 and 1 pings three times, then falls silent (slot 1's traps
    // SIGABRT); every other worker pings every 50 ms, well within the 300 ms.
    python_worker(
        &dir,
        r#"event("env", SLOT, PID, os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID"))
silent = SLOT in ("0", "1") and claim(f"claimed-{SLOT}")
if silent and SLOT == "1":
    signal.signal(signal.SIGABRT, lambda signum, frame: event("abort", SLOT, PID))
notify("READY=1")
for i in range(3 if silent else 10**9):
    if i:
        time.sleep(0.05)
    notify("WATCHDOG=1")
event("silent", SLOT, PID)
forever()"#,
    );
    let presup = Presup::start(&dir, &notify_config(3, "watchdog = \"300ms\""));
    let first = wait_generation(&dir, &presup, 1, 3);
    let pid_in = |slot: usize| first.iter().find(|u| u.slot == slot).unwrap().pid;
    let (abrt, trapped, pinging) = (pid_in(0), pid_in(1), pid_in(2));

    // Slot 0: killed by SIGABRT, logged as the watchdog's doing; a new worker in slot 0.
    let exit = wait_log(&dir, &presup, "killed by SIGABRT", abrt);
    assert!(exit.to_lowercase().contains("watchdog"), "not logged as a watchdog stop: {exit}");
    let new0 = wait_up(&dir, &presup, "a new worker in slot 0", |u| u.slot == 0 && u.pid != abrt);
    wait_log(&dir, &presup, "worker up (READY=1)", new0.pid);

    // Slot 1: got SIGABRT, survived it, then presup's SIGKILL; a new worker in slot 1.
    wait_event(&dir, &presup, &format!("abort 1 {trapped}"));
    let exit = wait_log(&dir, &presup, "killed by SIGKILL", trapped);
    assert!(exit.to_lowercase().contains("watchdog"), "not logged as a watchdog stop: {exit}");
    assert!(exit.contains("presup's SIGKILL"), "{exit}");
    let new1 =
        wait_up(&dir, &presup, "a new worker in slot 1", |u| u.slot == 1 && u.pid != trapped);
    wait_log(&dir, &presup, "worker up (READY=1)", new1.pid);

    // The pinging worker has lived through all that (more than 2 s, many watchdog periods).
    assert!(alive(pinging));
    let about_pinging: Vec<String> =
        presup.log.lines().into_iter().filter(|l| about(l, pinging)).collect();
    assert!(
        about_pinging.iter().all(|l| !l.contains("killed") && !l.contains("exited")),
        "{about_pinging:#?}"
    );
    let e = events(&dir);
    for (slot, pid) in [(0, abrt), (1, trapped)] {
        let silent = e.contains(&format!("silent {slot} {pid}"));
        assert!(silent, "worker {pid} was killed before it fell silent: {e:#?}");
    }
    // The environment of every worker, replacements included.
    for u in ups(&dir) {
        assert!(
            e.contains(&format!("env {} {} 300000 {}", u.slot, u.pid, u.pid)),
            "WATCHDOG_USEC / WATCHDOG_PID of worker {u:?}: {e:#?}"
        );
    }
}

/// 50 HUPs in a row: once things settle, exactly N workers, all of the last generation, and
/// the master still stops cleanly.
#[test]
fn a_hup_storm_leaves_exactly_n_workers_of_the_last_generation() {
    let dir = Dir::new();
    dir.script(
        "worker.sh",
        "echo \"up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION\" >> events\nexec sleep 1000",
    );
    let toml = "graceful_timeout = \"10s\"\n[workers]\ncommand = [\"./worker.sh\"]\ncount = 4\nmin_uptime = \"100ms\"\n";
    let mut presup = Presup::start(&dir, toml);
    presup.log.wait_for("ready: all workers up");
    let socket = notify_socket(&dir, &presup);
    for i in 0..50u64 {
        presup.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(i % 6));
    }
    // Every HUP has been taken once the barrier sent after them is.
    barrier(&presup, &socket);
    let storm = Duration::from_secs(60);
    let last = wait_until_with(
        "the last reload done",
        storm,
        || context(&dir, &presup),
        || {
            let log = presup.log.lines();
            let reloading = log.iter().rposition(|l| l.contains("HUP: reloading"))?;
            let done = log.iter().rposition(|l| l.contains("reload done"))?;
            let generation = generation_of(&log[reloading]);
            (done > reloading && generation_of(&log[done]) == generation).then_some(generation)
        },
    );
    assert!((2..=51).contains(&last), "generation {last}");
    // Stopped workers of older generations may still be on their way out.
    let live = wait_until_with(
        "only the last generation alive",
        storm,
        || context(&dir, &presup),
        || {
            let live: Vec<Up> = ups(&dir).into_iter().filter(|u| alive(u.pid)).collect();
            live.iter().all(|u| u.generation == last).then_some(live)
        },
    );
    let slots: BTreeSet<usize> = live.iter().map(|u| u.slot).collect();
    assert_eq!(slots, BTreeSet::from([0, 1, 2, 3]), "{live:?}");
    assert_eq!(live.len(), 4, "{live:?}");
    // Nothing else among the master's children (a worker that never got to record itself)
    // but the watcher.
    let mut pids: BTreeSet<i32> = live.iter().map(|u| u.pid).collect();
    pids.insert(presup.watcher_pid());
    let children = wait_until_with(
        "the master's children to be its workers",
        storm,
        || context(&dir, &presup),
        || {
            let c = children_of(presup.master_pid());
            (c == pids).then_some(c)
        },
    );
    assert_eq!(children.len(), 5);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(pids.iter().all(|&p| !alive(p)));
}

/// `STOPPING=1`: the worker retires on its own; its slot gets a new worker at once (slot 0
/// only once the old one is gone), and the retiring one is not signalled.
#[test]
fn stopping_1_starts_the_replacement_while_the_old_worker_finishes_on_its_own() {
    let dir = Dir::new();
    // The first worker of each slot retires when `retire-SLOT` exists and exits 0 when
    // `finish-SLOT` exists.
    python_worker(
        &dir,
        r#"first = claim(f"claimed-{SLOT}")
notify("READY=1")
if first:
    wait_file(f"retire-{SLOT}")
    event("retiring", SLOT, PID)
    notify("STATUS=finishing\nSTOPPING=1")
    wait_file(f"finish-{SLOT}")
    event("bye", SLOT, PID)
    sys.exit(0)
forever()"#,
    );
    let presup = Presup::start(&dir, &notify_config(2, ""));
    presup.log.wait_for("ready: all workers up");
    let first = wait_generation(&dir, &presup, 1, 2);
    let pid_in = |slot: usize| first.iter().find(|u| u.slot == slot).unwrap().pid;
    let (old0, old1) = (pid_in(0), pid_in(1));
    let socket = notify_socket(&dir, &presup);

    // Slot 1: the replacement comes up while the old worker still runs.
    dir.write("retire-1", "");
    wait_log(&dir, &presup, "retiring (STOPPING=1)", old1);
    wait_log(&dir, &presup, "status=finishing", old1);
    let new1 = wait_up(&dir, &presup, "slot 1's replacement", |u| u.slot == 1 && u.pid != old1);
    assert_eq!(new1.generation, 1);
    wait_log(&dir, &presup, "worker up (READY=1)", new1.pid);
    assert!(alive(old1), "the retiring worker was stopped");
    dir.write("finish-1", "");
    wait_dead(old1);
    let exit = wait_log(&dir, &presup, "exited with code 0", old1);
    assert!(!exit.contains("SIGKILL"), "{exit}");
    assert!(alive(new1.pid) && alive(old0));

    // Slot 0 (the primary): no replacement while the old one lives, then one at once.
    dir.write("retire-0", "");
    wait_log(&dir, &presup, "retiring (STOPPING=1)", old0);
    barrier(&presup, &socket);
    assert!(
        ups(&dir).iter().all(|u| u.slot != 0 || u.pid == old0),
        "two live workers in slot 0: {:#?}",
        events(&dir)
    );
    dir.write("finish-0", "");
    let new0 = wait_up(&dir, &presup, "slot 0's replacement", |u| u.slot == 0 && u.pid != old0);
    wait_log(&dir, &presup, "worker up (READY=1)", new0.pid);
    let e = events(&dir);
    assert!(at(&e, &format!("bye 0 {old0}")) < at(&e, &format!("up 0 {} 1", new0.pid)), "{e:#?}");
    // Neither retiring worker got a stop signal: they finished on their own.
    for pid in [old0, old1] {
        assert!(
            !e.iter().any(|l| l.starts_with("stop ") && l.contains(&format!(" {pid} "))),
            "{e:#?}"
        );
    }
    assert_eq!(presup.log.count("stopping worker"), 0, "{}", presup.log.text());
}

/// A reload that removes a listener and is undone gets the listener back: the same socket,
/// still bound in the master, so a worker started after the undo has both listeners again.
#[test]
fn an_undone_reload_keeps_the_listener_it_removed() {
    let dir = Dir::new();
    dir.script(
        "app.sh",
        "echo \"up $PRESUP_WORKER_ID $$ $PRESUP_GENERATION\" >> events\necho \"$$ $LISTEN_FDNAMES\" >> names\nexec sleep 1000",
    );
    dir.script("bad.sh", "exit 1");
    let config = |command: &str, listen: &str| {
        format!(
            "graceful_timeout = \"10s\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n{listen}[workers]\ncommand = [\"{command}\"]\ncount = 2\nmin_uptime = \"10s\"\n"
        )
    };
    // A fixed port: binding it again while the old workers hold it would fail.
    let port = common::free_port();
    let admin = format!("[[listen]]\nname = \"admin\"\naddress = \"127.0.0.1:{port}\"\n");
    let first =
        config("./app.sh", &admin).replace("min_uptime = \"10s\"", "min_uptime = \"200ms\"");
    let presup = Presup::start(&dir, &first);
    presup.log.wait_for("ready: all workers up");
    let gen1 = wait_generation(&dir, &presup, 1, 2);
    dir.write("supervisor.toml", &config("./bad.sh", ""));
    presup.signal(Signal::SIGHUP);
    presup.log.wait_for("undone");
    // A worker killed now comes back with both listeners of the restored config.
    let victim = gen1.iter().find(|u| u.slot == 1).unwrap().pid;
    kill(victim, Signal::SIGKILL);
    let respawned = wait_up(&dir, &presup, "slot 1 respawned", |u| u.pid != victim && u.slot == 1);
    let names = common::wait_until("its listeners", DEADLINE, || {
        let lines = dir.lines("names");
        let prefix = format!("{} ", respawned.pid);
        lines.iter().find(|l| l.starts_with(&prefix)).cloned()
    });
    assert_eq!(names, format!("{} http:admin", respawned.pid));
    assert_eq!(presup.log.count("cannot restore the listeners"), 0);
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the admin listener is still open");
}
