//! `presup status`, `reload`, `stop`, `scale` and `restart` against a real master, through its
//! control socket: what the CLI shows is checked against `/proc` and the master's log, and
//! what it asks for against what the master does. The CLI finds the master from `-c FILE`
//! (the runtime directories), except where a test says `control`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{alive, children_of, kill, wait_dead, wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;
use serde_json::Value;

/// A worker that sleeps (exec: the recorded pid is the worker's).
const WORKER: &str = "exec sleep 1000";

/// A worker of `ready = "notify"`: up once it has sent `READY=1` itself.
const NOTIFY_WORKER: &str = r#"exec python3 -c 'import os, socket, time
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
time.sleep(1000)'"#;

fn config(workers: &str, extra: &str) -> String {
    format!(
        "graceful_timeout = \"5s\"\n{extra}\n[workers]\ncommand = [\"./worker.sh\"]\nmin_uptime = \"100ms\"\n{workers}\n"
    )
}

const SINGLETON: &str =
    "[[singleton]]\nname = \"sched\"\ncommand = [\"./single.sh\"]\nmin_uptime = \"100ms\"\n";

/// Runs `presup -c DIR/supervisor.toml ARGS...`: exit code, stdout, stderr.
fn ctl(dir: &Dir, args: &[&str]) -> (i32, String, String) {
    ctl_as(dir, None, args)
}

/// Like [`ctl`], as `user` (through `setpriv`) when given.
fn ctl_as(dir: &Dir, user: Option<&nix::unistd::User>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = match user {
        None => Command::new(common::bin()),
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.gid))
                .arg("--clear-groups")
                .arg(common::bin());
            c
        }
    };
    let out = cmd
        .arg("-c")
        .arg(dir.join("supervisor.toml"))
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `presup status --json`, which must succeed.
fn status(dir: &Dir) -> Value {
    let (code, out, err) = ctl(dir, &["status", "--json"]);
    assert_eq!(code, 0, "status --json failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Polls `status --json` until `f` accepts it.
fn wait_status(dir: &Dir, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, DEADLINE, || Some(status(dir)).filter(|s| f(s)))
}

fn workers(s: &Value) -> &[Value] {
    s["workers"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The pids of the workers that are up in the master's current generation.
fn up_pids(s: &Value) -> BTreeSet<i64> {
    let generation = &s["master"]["generation"];
    workers(s)
        .iter()
        .filter(|w| w["state"] == "up" && &w["generation"] == generation)
        .map(|w| w["pid"].as_i64().unwrap())
        .collect()
}

/// Whether exactly `n` workers run, all up, in the current generation.
fn settled(s: &Value, n: usize) -> bool {
    workers(s).len() == n && up_pids(s).len() == n
}

/// The pid of the worker of `slot` (the only one).
fn slot_pid(s: &Value, slot: u64) -> i64 {
    let w: Vec<&Value> = workers(s).iter().filter(|w| w["slot"] == slot).collect();
    assert_eq!(w.len(), 1, "slot {slot}: {s:#}");
    w[0]["pid"].as_i64().unwrap()
}

fn singleton<'a>(s: &'a Value, name: &str) -> &'a Value {
    let all = s["singletons"].as_array().unwrap();
    all.iter().find(|x| x["name"] == name).unwrap_or_else(|| panic!("no {name}: {s:#}"))
}

/// The pids of every worker and singleton in a status.
fn listed_pids(s: &Value) -> BTreeSet<i32> {
    let singletons = s["singletons"].as_array().unwrap();
    workers(s)
        .iter()
        .chain(singletons)
        .filter_map(|x| x["pid"].as_i64())
        .map(|p| p as i32)
        .collect()
}

/// The master's children, but its watcher.
fn children(presup: &Presup) -> BTreeSet<i32> {
    let mut c = children_of(presup.master_pid());
    c.remove(&presup.watcher_pid());
    c
}

fn start(dir: &Dir, toml: &str) -> Presup {
    dir.script("worker.sh", WORKER);
    dir.script("single.sh", "exec sleep 1000");
    let presup = Presup::start(dir, toml);
    presup.log.wait_for("ready: all workers up");
    presup
}

#[test]
fn status_lists_exactly_the_live_children_and_counts_restarts() {
    let dir = Dir::new();
    let presup = start(&dir, &config("count = 3", SINGLETON));
    let s = wait_status(&dir, "3 workers and the singleton up", |s| {
        settled(s, 3) && singleton(s, "sched")["state"] == "up"
    });
    assert_eq!(listed_pids(&s), children(&presup), "{s:#}");
    assert_eq!(s["master"]["pid"], presup.master_pid());
    assert_eq!(s["master"]["generation"], 1);
    assert_eq!(s["master"]["workers_target"], 3);
    let canonical = std::fs::canonicalize(dir.join("supervisor.toml")).unwrap();
    assert_eq!(s["master"]["config"], canonical.display().to_string());
    for w in workers(&s) {
        assert_eq!(w["generation"], 1);
        // Read by the CLI from /proc/PID/smaps_rollup: a live sleep has some.
        let (rss, pss) = (w["rss_bytes"].as_u64().unwrap(), w["pss_bytes"].as_u64().unwrap());
        assert!(rss > 0 && pss > 0 && pss <= rss, "{w}");
    }
    assert!(singleton(&s, "sched")["rss_bytes"].as_u64().unwrap() > 0);
    let slots = s["slots"].as_array().unwrap();
    assert!(slots.iter().all(|x| x["restarts"] == 0 && x["last_exit"].is_null()), "{s:#}");

    // A worker killed: replaced in its slot, the restart and the exit counted there only.
    let old = slot_pid(&s, 1);
    kill(old as i32, Signal::SIGKILL);
    let s = wait_status(&dir, "slot 1 replaced", |s| {
        settled(s, 3) && slot_pid(s, 1) != old && s["slots"][1]["restarts"] == 1
    });
    wait_dead(old as i32);
    assert_eq!(listed_pids(&s), children(&presup), "{s:#}");
    let exit = &s["slots"][1]["last_exit"];
    assert_eq!(
        (&exit["signal"], &exit["status"]),
        (&"SIGKILL".into(), &"killed by SIGKILL".into())
    );
    assert_eq!((&s["slots"][0]["restarts"], &s["slots"][2]["restarts"]), (&0.into(), &0.into()));
    assert!(!listed_pids(&s).contains(&(old as i32)));
}

#[test]
fn the_table_shows_every_worker_and_the_master() {
    let dir = Dir::new();
    let presup = start(&dir, &config("count = 2", SINGLETON));
    let s = wait_status(&dir, "2 workers up", |s| settled(s, 2));
    let (code, out, err) = ctl(&dir, &["status"]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    assert!(first.starts_with(&format!("master  pid {}, presup ", presup.master_pid())), "{out}");
    assert!(out.contains("workers: 2 of 2 up"), "{out}");
    for slot in [0, 1] {
        let pid = slot_pid(&s, slot);
        let row = out.lines().find(|l| l.split_whitespace().nth(1) == Some(&pid.to_string()));
        let row = row.unwrap_or_else(|| panic!("no row for pid {pid}:\n{out}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[..4], &[slot.to_string().as_str(), &pid.to_string(), "1", "up"]);
        assert!(row.contains(" MiB") || row.contains(" KiB"), "memory shown: {row}");
    }
    let sched = singleton(&s, "sched")["pid"].as_i64().unwrap();
    assert!(
        out.lines().any(|l| l.trim_start().starts_with(&format!("sched  {sched}  up"))),
        "{out}"
    );
}

#[test]
fn scale_to_n_up_and_down() {
    let dir = Dir::new();
    let presup = start(&dir, &config("count = 1", ""));
    let (code, out, err) = ctl(&dir, &["scale", "3", "--wait"]);
    assert_eq!((code, out.as_str()), (0, "workers: 3 up\n"), "{err}");
    let s = status(&dir);
    assert!(settled(&s, 3), "{s:#}");
    assert_eq!(s["master"]["workers_target"], 3);
    assert_eq!(listed_pids(&s), children(&presup));

    let (code, out, err) = ctl(&dir, &["scale", "+1", "--wait"]);
    assert_eq!((code, out.as_str()), (0, "workers: 4 up\n"), "{err}");
    let s = status(&dir);
    assert!(settled(&s, 4), "{s:#}");
    let highest = slot_pid(&s, 3) as i32;

    // -1 as the argument, not an option; --wait returns once the surplus worker is gone.
    let (code, out, err) = ctl(&dir, &["scale", "-1", "--wait"]);
    assert_eq!((code, out.as_str()), (0, "workers: 3 up\n"), "{err}");
    let s = status(&dir);
    assert!(settled(&s, 3), "{s:#}");
    assert!(!alive(highest), "the highest slot's worker was stopped");
    assert_eq!(listed_pids(&s), children(&presup));

    // Usage errors: nothing is asked of the master.
    for bad in ["0", "x", "+0", "1025"] {
        let (code, _, err) = ctl(&dir, &["scale", bad]);
        assert_eq!(code, 2, "scale {bad}: {err}");
        assert!(err.starts_with("presup: scale: "), "{err}");
    }
    // The master's own bound: 3 - 5 workers.
    let (code, _, err) = ctl(&dir, &["scale", "-5"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("presup: ") && err.contains("-2"), "{err}");
    assert!(settled(&status(&dir), 3));
}

#[test]
fn reload_wait_says_done_rejected_or_undone() {
    let dir = Dir::new();
    dir.script("bad.sh", "exit 1");
    let presup = start(&dir, &config("count = 2", ""));
    let (code, out, err) = ctl(&dir, &["reload", "--wait"]);
    assert_eq!((code, out.as_str()), (0, "reload 1 done: generation 2\n"), "{err}");
    let s = status(&dir);
    assert_eq!(s["master"]["generation"], 2);
    assert!(settled(&s, 2), "{s:#}");
    assert!(workers(&s).iter().all(|w| w["generation"] == 2));
    let serving = up_pids(&s);

    // An invalid config: rejected, named, nothing changed.
    dir.write("supervisor.toml", &config("count = \"many\"", ""));
    let (code, out, err) = ctl(&dir, &["reload", "--wait"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.starts_with("presup: reload 2 rejected: "), "{err}");
    assert!(err.contains("workers.count"), "{err}");
    let s = status(&dir);
    assert_eq!((s["master"]["generation"].clone(), up_pids(&s)), (2.into(), serving.clone()));
    assert_eq!(s["last_reload"]["result"], "rejected");

    // Workers of the new generation that exit at once: undone, the old ones keep serving.
    // (The running config's path is the same: the CLI still finds its master.)
    dir.write(
        "supervisor.toml",
        "graceful_timeout = \"5s\"\n[workers]\ncommand = [\"./bad.sh\"]\nmin_uptime = \"100ms\"\ncount = 2\n",
    );
    let (code, _, err) = ctl(&dir, &["reload", "--wait"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("presup: reload 3 undone: slot "), "{err}");
    assert!(err.contains("before it was up"), "{err}");
    let s = wait_status(&dir, "the undone generation gone", |s| settled(s, 2));
    assert_eq!(up_pids(&s), serving);
    assert_eq!(s["master"]["generation"], 2);
    assert_eq!(listed_pids(&s), children(&presup));
}

#[test]
fn restart_of_a_slot_replaces_it_alone_new_up_before_old_stops() {
    let dir = Dir::new();
    dir.script("worker.sh", NOTIFY_WORKER);
    dir.script("single.sh", "exec sleep 1000");
    dir.write("supervisor.toml", &config("count = 3\nready = \"notify\"", ""));
    let presup = Presup::start_with(&dir, &[], &[]);
    presup.log.wait_for("ready: all workers up");
    let before = wait_status(&dir, "3 workers up", |s| settled(s, 3));
    let old: Vec<i64> = (0..3).map(|slot| slot_pid(&before, slot)).collect();

    let (code, out, err) = ctl(&dir, &["restart", "2", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let after = status(&dir);
    let new = slot_pid(&after, 2);
    assert_eq!(out, format!("slot 2 restarted: pid {} -> {new}\n", old[2]));
    assert_ne!(new, old[2]);
    assert_eq!((slot_pid(&after, 0), slot_pid(&after, 1)), (old[0], old[1]));
    assert!(after["restarts_done"].as_array().unwrap().contains(&1.into()), "{after:#}");
    wait_dead(old[2] as i32);

    // The master's log: the new worker spawned, then up, then the old one stopped.
    let lines = presup.log.lines();
    let at = |needle: &str| {
        lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}"))
    };
    let spawned = at(&format!("worker spawned slot=2 pid={new} "));
    let up = at(&format!("worker up (READY=1) slot=2 pid={new}"));
    let stopping = at(&format!("stopping worker slot=2 pid={} ", old[2]));
    assert!(spawned < up && up < stopping, "spawned {spawned}, up {up}, stopping {stopping}");
    assert_eq!(presup.log.count("worker spawned"), 4, "only slot 2 was replaced");

    // No such slot: the master says so.
    let (code, _, err) = ctl(&dir, &["restart", "7"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("presup: no slot 7"), "{err}");
}

#[test]
fn restart_of_a_singleton() {
    let dir = Dir::new();
    let _presup = start(&dir, &config("count = 1", SINGLETON));
    let before = wait_status(&dir, "the singleton up", |s| singleton(s, "sched")["state"] == "up");
    let old = singleton(&before, "sched")["pid"].as_i64().unwrap();
    let worker = slot_pid(&before, 0);
    let (code, out, err) = ctl(&dir, &["restart", "sched", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let after = status(&dir);
    let new = singleton(&after, "sched")["pid"].as_i64().unwrap();
    assert_ne!(new, old);
    assert_eq!(out, format!("singleton sched restarted: pid {old} -> {new}\n"));
    assert!(!alive(old as i32));
    assert_eq!(slot_pid(&after, 0), worker, "the worker untouched");
    let (code, _, err) = ctl(&dir, &["restart", "nope"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("presup: no singleton \"nope\""), "{err}");
}

#[test]
fn stop_wait_returns_once_the_master_is_gone() {
    let dir = Dir::new();
    let mut presup = start(&dir, &config("count = 2", ""));
    let master = presup.master_pid();
    let (code, out, err) = ctl(&dir, &["stop", "--wait"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("master pid {master} stopped (graceful stop)\n"));
    // Gone already when the CLI returned (a zombie until the test reaps it).
    assert!(!alive(master));
    assert_eq!(presup.wait_exit(), Some(0));
    // Nobody left to ask.
    let (code, _, err) = ctl(&dir, &["status"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("presup: no running presup master found for "), "{err}");
}

/// Whether this test may run: root, with the user `nobody` (as `tests/privileges.rs`).
fn root(test: &str) -> Option<nix::unistd::User> {
    let nobody = nix::unistd::User::from_name("nobody").ok().flatten();
    if !nix::unistd::Uid::effective().is_root() || nobody.is_none() {
        eprintln!("skipped {test}: needs root and the user nobody");
        return None;
    }
    nobody
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn another_user_is_refused() {
    let Some(nobody) = root("another_user_is_refused") else { return };
    let dir = Dir::new();
    // The socket where the config says, in a directory anyone may enter (not the runtime
    // directory, 0700): what stops another user is the socket's mode, then the master itself.
    chmod(dir.path(), 0o755);
    std::fs::create_dir(dir.join("ctl")).unwrap();
    chmod(&dir.join("ctl"), 0o755);
    let presup = start(&dir, &config("count = 1", "control = \"ctl/ctl.sock\""));
    let socket = dir.join("ctl/ctl.sock");
    let path = socket.to_str().unwrap();
    wait_status(&dir, "the worker up", |s| settled(s, 1));

    // The socket is 0600: the kernel refuses the connect (EACCES).
    let (code, out, err) = ctl_as(&dir, Some(&nobody), &["status", "--control", path]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.starts_with(&format!("presup: {path}: permission denied")), "{err}");

    // Opened to all: the connect succeeds and the master refuses by the peer's credentials.
    chmod(&socket, 0o666);
    for args in [&["status", "--control", path][..], &["stop", "--control", path]] {
        let (code, out, err) = ctl_as(&dir, Some(&nobody), args);
        assert_eq!((code, out.as_str()), (1, ""), "{args:?}: {err}");
        let refusal = format!(
            "presup: permission denied: uid {} is neither root nor the master's user",
            nobody.uid
        );
        assert!(err.starts_with(&refusal), "{err}");
    }
    let warn = presup.log.wait_for("a client of another user was refused");
    assert!(warn.contains("WARN") && warn.contains(&format!("uid={}", nobody.uid)), "{warn}");
    // Nothing was done: the master still runs its worker; root is still answered.
    let s = status(&dir);
    assert!(settled(&s, 1) && s["master"]["stage"] == "running", "{s:#}");
}

#[test]
fn status_shows_the_hooks_running_and_the_tickets() {
    let dir = Dir::new();
    // The first worker takes a turn of bucket 1 before it sleeps: the next is an hour away.
    dir.script(
        "worker.sh",
        &format!(
            "[ -e took ] || {{ \"{}\" ticket t --shard 1 && touch took; }} || exit 1\nexec sleep 1000",
            common::bin()
        ),
    );
    dir.script("single.sh", "exec sleep 1000");
    // The worker_exit hook runs until the test lets it end.
    dir.script("hook.sh", "while [ ! -e release ]; do sleep 0.02; done");
    let extra = "[hooks]\nworker_exit = [{ command = [\"./hook.sh\"], timeout = \"60s\" }]\n\
                 [tickets.t]\ninterval = \"1h\"\nbuckets = 2\ndaily_limit = 10\n";
    let toml = format!(
        "graceful_timeout = \"5s\"\n{extra}[workers]\ncommand = [\"./worker.sh\"]\nmin_uptime = \"100ms\"\n"
    );
    let presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    let s = wait_status(&dir, "the worker up", |s| settled(s, 1));
    let t = &s["tickets"][0];
    assert_eq!((&t["name"], &t["grants"], &t["daily_left"]), (&"t".into(), &1.into(), &9.into()));
    let wait = t["buckets"][1]["next_free_in_seconds"].as_f64().unwrap();
    assert!(wait > 3500.0 && wait <= 3600.1, "{t}");
    assert_eq!(t["buckets"][0]["next_free_in_seconds"].as_f64(), Some(0.0));

    kill(slot_pid(&s, 0) as i32, Signal::SIGKILL);
    let s = wait_status(&dir, "the worker_exit hook running", |s| {
        s["hooks"].as_array().is_some_and(|h| !h.is_empty())
    });
    let hook = &s["hooks"][0];
    assert_eq!(hook["point"], "worker_exit");
    assert!(hook["command"].as_str().unwrap().contains("hook.sh"), "{hook}");
    let pid = hook["pid"].as_i64().unwrap() as i32;
    assert!(children_of(presup.master_pid()).contains(&pid));
    let (code, out, err) = ctl(&dir, &["status"]);
    assert_eq!(code, 0, "{err}");
    let hooks = out.lines().position(|l| l == "hooks running:").unwrap_or_else(|| panic!("{out}"));
    let row: Vec<&str> = out.lines().nth(hooks + 2).unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], &["worker_exit", &pid.to_string()], "{out}");
    let ticket =
        out.lines().find(|l| l.trim_start().starts_with("t  ")).unwrap_or_else(|| panic!("{out}"));
    assert!(ticket.contains("9 of 10") && ticket.contains("1: in 59m"), "{ticket}");

    dir.write("release", "");
    wait_status(&dir, "the hook over", |s| s["hooks"].as_array().is_some_and(Vec::is_empty));
    wait_dead(pid);
}

#[test]
fn a_wait_gives_up_at_its_timeout_and_a_hung_master_is_an_error() {
    let dir = Dir::new();
    // Slot 0 becomes ready; any other slot never does.
    let ready = NOTIFY_WORKER.replacen(
        "exec ",
        "[ \"$PRESUP_WORKER_ID\" = 0 ] || exec sleep 1000\nexec ",
        1,
    );
    dir.script("worker.sh", &ready);
    dir.write("supervisor.toml", &config("count = 1\nready = \"notify\"", ""));
    let presup = Presup::start_with(&dir, &[], &[]);
    presup.log.wait_for("ready: all workers up");
    let started = std::time::Instant::now();
    let (code, out, err) = ctl(&dir, &["scale", "2", "--wait", "--timeout", "500ms"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(err, "presup: scale to 2 workers: not done after 500ms (--timeout)\n");
    assert!(started.elapsed() < DEADLINE);

    // A master that does not answer (stopped): the CLI gives up after its 10 s.
    let s = status(&dir);
    let socket = format!("{}/control.sock", s["master"]["runtime_dir"].as_str().unwrap());
    kill(presup.master_pid(), Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let (code, _, err) = ctl(&dir, &["status", "--control", &socket]);
    let took = started.elapsed();
    kill(presup.master_pid(), Signal::SIGCONT);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err, format!("presup: {socket}: no answer within 10s\n"));
    assert!(took >= std::time::Duration::from_secs(10) && took < DEADLINE, "{took:?}");
    // It answers again once it runs: the scale was taken, slot 1 still starting.
    let s = status(&dir);
    assert_eq!(s["master"]["workers_target"], 2, "{s:#}");
    assert_eq!(up_pids(&s).len(), 1, "{s:#}");
}

/// One raw request on the control socket at `path`: its answer line.
fn raw_request(path: &Path, request: &[u8]) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).unwrap();
    answer
}

#[test]
fn hostile_clients_never_delay_a_ttin_and_many_clients_leave_no_trace() {
    use std::io::{Read, Write};
    let dir = Dir::new();
    let presup = start(&dir, &config("count = 1", "control = \"ctl.sock\""));
    let master = presup.master_pid();
    let path = dir.join("ctl.sock");
    // Warm up (the allocator's first arenas, the first status), then the baseline.
    for _ in 0..20 {
        assert!(raw_request(&path, b"{\"v\":1,\"command\":\"status\"}\n").contains("\"ok\":true"));
    }
    let (fds, rss) = (common::open_fds(master), common::rss_kib(master));

    // A client that sends nothing, one that sends half a JSON document, one that pours 1 MiB
    // of garbage: none of them may hold up what the master does meanwhile.
    let mut silent = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut half = std::os::unix::net::UnixStream::connect(&path).unwrap();
    half.write_all(b"{\"v\":1,\"command\":\"sta").unwrap();
    let p = path.clone();
    let garbage = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let chunk = vec![b'#'; 64 * 1024];
        for _ in 0..16 {
            if s.write_all(&chunk).is_err() {
                break; // refused and closed once over the limit
            }
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    });
    presup.signal(Signal::SIGTTIN);
    let second = presup.worker_pid(1, 1);
    assert!(alive(second));
    // The TTIN was served while the silent client still waits for its 5 s timeout.
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let pending =
        matches!(silent.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(pending, "the silent client was already answered: the TTIN waited for it");
    assert!(garbage.join().unwrap().contains("over 65536 bytes"));
    // The silent and half clients are cut at their deadline, with an error.
    silent.set_nonblocking(false).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("timed out"), "{answer}");
    let mut answer = String::new();
    half.set_read_timeout(Some(DEADLINE)).unwrap();
    half.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("timed out"), "{answer}");

    // 200 clients one after the other: the master's fds and memory stay where they were.
    for _ in 0..200 {
        assert!(raw_request(&path, b"{\"v\":1,\"command\":\"status\"}\n").contains("\"ok\":true"));
    }
    let links = |pid: i32| -> Vec<String> {
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
        let mut v: Vec<String> = dir
            .flatten()
            .map(|e| format!("{:?} -> {:?}", e.file_name(), std::fs::read_link(e.path()).ok()))
            .collect();
        v.sort();
        v
    };
    common::wait_until_with(
        "the master's fds back to where they were",
        DEADLINE,
        || format!("{fds} before; now {:#?}", links(master)),
        // Not above: a leak grows it (the baseline may hold a transient fd of its own).
        || (common::open_fds(master) <= fds).then_some(()),
    );
    let after = common::rss_kib(master);
    assert!(after <= rss + 1024, "RSS grew from {rss} to {after} KiB over 200 clients");
    drop(presup);
}

#[test]
fn the_childrens_user_may_read_the_status_and_nothing_more() {
    let Some(nobody) = root("the_childrens_user_may_read_the_status_and_nothing_more") else {
        return;
    };
    let dir = Dir::new();
    chmod(dir.path(), 0o755);
    std::fs::create_dir(dir.join("ctl")).unwrap();
    chmod(&dir.join("ctl"), 0o755);
    let toml = "user = \"nobody\"\ncontrol = \"ctl/ctl.sock\"\n[workers]\ncommand = [\"sleep\", \"1000\"]\ncount = 1\nmin_uptime = \"100ms\"\n";
    let presup = Presup::start(&dir, toml);
    presup.log.wait_for("ready: all workers up");
    let socket = dir.join("ctl/ctl.sock");
    let path = socket.to_str().unwrap();
    // The socket is the children's group's (0660): the children's user gets the status...
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let (code, out, err) = ctl_as(&dir, Some(&nobody), &["status", "--json", "--control", path]);
    assert_eq!(code, 0, "{err}");
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["master"]["pid"].as_i64(), Some(i64::from(presup.master_pid())));
    // ... and may not steer the master.
    for args in [&["stop", "--control", path][..], &["scale", "2", "--control", path]] {
        let (code, _, err) = ctl_as(&dir, Some(&nobody), args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("may only ask for ping and status"), "{err}");
    }
    let s = status(&dir);
    assert_eq!(s["master"]["stage"], "running", "{s:#}");
    assert_eq!(s["master"]["workers_target"], 1);
    drop(presup);
}
