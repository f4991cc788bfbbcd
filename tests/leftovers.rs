//! Nothing left behind: what is left of a child's process group when the child exits, and
//! what is left of everything when the master is killed with `kill -9`.
//!
//! The children are `sh -c "sleep N; true"` (the shell forks `sleep` and waits), each marked by
//! a variable (`LEFTOVER_MARK`, the test's directory) so that the test finds its processes,
//! grandchildren included, in `/proc/*/environ`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    alive, cmdline, environ, kill, kill_if_alive, pid_field, wait_until, Dir, Presup, DEADLINE,
};
use nix::sys::signal::Signal;

/// The pids of every live process whose environment holds all of `vars`.
fn processes_with(vars: &[String]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let env = environ(pid);
            let has = |v: &String| env.iter().any(|(k, x)| v.split_once('=') == Some((k, x)));
            vars.iter().all(has) && alive(pid)
        })
        .collect()
}

/// The process's start time, in clock ticks since boot.
fn start_time(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    after.split_whitespace().nth(19).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// How many of `pids` were alive at one instant: checked newest first, so that an older
/// process found alive after a newer one was alive at the newer one's check as well.
fn alive_together(pids: &[i32]) -> Vec<i32> {
    let mut by_age: Vec<(u64, i32)> = pids.iter().map(|&p| (start_time(p), p)).collect();
    by_age.sort_by(|a, b| b.cmp(a));
    by_age.into_iter().filter(|&(_, p)| alive(p)).map(|(_, p)| p).collect()
}

/// The process group of `pid`.
fn pgid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    after.split_whitespace().nth(2).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Samples `/proc` in a thread until stopped, recording the largest set of processes holding
/// all of `vars` alive at one instant in distinct process groups (one child's group is one
/// instance: the shell and its `sleep`).
struct Sampler {
    stop: Arc<AtomicBool>,
    worst: Arc<Mutex<Vec<(i32, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(vars: Vec<String>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(Mutex::new(Vec::new()));
        let (s, w) = (stop.clone(), worst.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let found: Vec<(i32, i32)> =
                    processes_with(&vars).into_iter().map(|p| (p, pgid(p))).collect();
                let pids: Vec<i32> = found.iter().map(|f| f.0).collect();
                let together = alive_together(&pids);
                let mut groups: Vec<i32> =
                    found.iter().filter(|f| together.contains(&f.0)).map(|f| f.1).collect();
                groups.sort();
                groups.dedup();
                let mut worst = w.lock().unwrap();
                if groups.len() > worst.len() {
                    *worst = groups.iter().map(|&g| (g, cmdline(g))).collect();
                }
            }
        });
        Sampler { stop, worst, thread: Some(thread) }
    }

    /// Stops sampling; returns the largest set of groups seen alive at once (by leader).
    fn finish(mut self) -> Vec<(i32, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.worst.lock().unwrap().clone()
    }
}

/// The shell's `sleep`: its child, once it has exec'd (it runs as a copy of `sh` before).
fn only_child(parent: i32) -> i32 {
    wait_until("the shell's sleep", DEADLINE, || {
        let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        let kid = kids.split_whitespace().next().and_then(|p| p.parse().ok())?;
        cmdline(kid).starts_with("sleep ").then_some(kid)
    })
}

/// Kills whatever the test's children left, whatever happened (the old code leaves them).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in processes_with(std::slice::from_ref(&self.0)) {
            kill_if_alive(pid, Signal::SIGKILL);
        }
    }
}

fn mark(dir: &Dir) -> String {
    format!("LEFTOVER_MARK={}", dir.path().display())
}

#[test]
fn a_dead_workers_group_is_killed_before_its_slot_restarts_and_the_primary_stays_one() {
    let dir = Dir::new();
    let mark = mark(&dir);
    let _cleanup = Cleanup(mark.clone());
    let toml = format!(
        "[workers]\ncommand = [\"sh\", \"-c\", \"sleep 1001; true\"]\ncount = 2\nmin_uptime = \"100ms\"\nenv = {{ LEFTOVER_MARK = \"{}\" }}\n",
        dir.path().display()
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    let shell = pid_field(&presup.log.wait_for("worker spawned slot=0"));
    let sleep = only_child(shell);
    assert!(cmdline(sleep).starts_with("sleep 1001"), "{}", cmdline(sleep));
    let sampler = Sampler::start(vec![mark.clone(), "PRESUP_PRIMARY=1".to_owned()]);
    kill(shell, Signal::SIGKILL);
    presup.log.wait_for_nth("worker spawned slot=0", 2);
    assert!(!alive(sleep), "the old primary's sleep {sleep} survives beside its replacement");
    let replacement = pid_field(&presup.log.wait_for_nth("worker spawned slot=0", 2));
    only_child(replacement);
    let worst = sampler.finish();
    assert!(worst.len() <= 1, "two live processes with PRESUP_PRIMARY=1 at once: {worst:?}");
    let killed = presup.log.wait_for("killed what was left of its process group");
    assert!(killed.contains(&sleep.to_string()), "{killed}");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert_eq!(processes_with(std::slice::from_ref(&mark)), Vec::<i32>::new());
}

#[test]
fn a_dead_singletons_group_is_killed_before_it_restarts() {
    let dir = Dir::new();
    let mark = mark(&dir);
    let _cleanup = Cleanup(mark.clone());
    let toml = format!(
        "[[singleton]]\nname = \"sched\"\ncommand = [\"sh\", \"-c\", \"sleep 1001; true\"]\nmin_uptime = \"100ms\"\nenv = {{ LEFTOVER_MARK = \"{}\" }}\n",
        dir.path().display()
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("singleton ready");
    let shell = pid_field(&presup.log.wait_for("singleton spawned"));
    let sleep = only_child(shell);
    let sampler = Sampler::start(vec![mark.clone(), "PRESUP_SINGLETON=sched".to_owned()]);
    kill(shell, Signal::SIGKILL);
    let line = presup.log.wait_for_nth("singleton spawned", 2);
    assert!(!alive(sleep), "the old instance's sleep {sleep} survives beside the new one");
    only_child(pid_field(&line));
    let worst = sampler.finish();
    assert!(worst.len() <= 1, "two instances of the singleton at once: {worst:?}");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert_eq!(processes_with(std::slice::from_ref(&mark)), Vec::<i32>::new());
}

#[test]
fn what_a_finished_hook_leaves_in_its_group_is_killed() {
    let dir = Dir::new();
    let mark = mark(&dir);
    let _cleanup = Cleanup(mark.clone());
    let toml = format!(
        "[workers]\ncommand = [\"sleep\", \"1000\"]\nmin_uptime = \"100ms\"\n[hooks]\non_starting = [{{ command = [\"sh\", \"-c\", \"sleep 1002 & echo $! > bg\"], env = {{ LEFTOVER_MARK = \"{}\" }} }}]\n",
        dir.path().display()
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    let bg: i32 = wait_until("the hook's sleep", DEADLINE, || dir.read("bg").trim().parse().ok());
    wait_until("the hook's sleep gone", DEADLINE, || (!alive(bg)).then_some(()));
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

/// The `sleep` processes of the test, by their first argument.
fn sleeps(mark: &str) -> Vec<(i32, String)> {
    let mut found: Vec<(i32, String)> = processes_with(&[mark.to_owned()])
        .into_iter()
        .map(|p| (p, cmdline(p)))
        .filter(|(_, c)| c.starts_with("sleep "))
        .collect();
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found
}

#[test]
fn a_kill_9_of_the_master_takes_every_group_member_and_with_a_cgroup_setsid_daemons_too() {
    let dir = Dir::new();
    let mark = mark(&dir);
    let _cleanup = Cleanup(mark.clone());
    let d = dir.path().display();
    let toml = format!(
        r#"[workers]
command = ["sh", "-c", "setsid sleep 1013 & sleep 1011; true"]
min_uptime = "100ms"
env = {{ LEFTOVER_MARK = "{d}" }}
[[singleton]]
name = "sched"
command = ["sh", "-c", "sleep 1012; true"]
min_uptime = "100ms"
env = {{ LEFTOVER_MARK = "{d}" }}
[hooks]
when_ready = [{{ command = ["sh", "-c", "sleep 1014; true"], timeout = "60s", env = {{ LEFTOVER_MARK = "{d}" }} }}]
"#
    );
    let mut presup = Presup::start(&dir, &toml);
    let watcher = pid_field(&presup.log.wait_for("watcher started"));
    let cgroup = presup.log.wait_for("children");
    let with_cgroup = cgroup.contains("children's cgroup created");
    let found = wait_until("the four sleeps", DEADLINE, || {
        let s = sleeps(&mark);
        (s.len() == 4).then_some(s)
    });
    let names: Vec<&str> = found.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(names, ["sleep 1011", "sleep 1012", "sleep 1013", "sleep 1014"]);
    let daemon = found[2].0;
    let in_groups: Vec<i32> = [0, 1, 3].iter().map(|&i| found[i].0).collect();
    presup.signal(Signal::SIGKILL);
    let killed = std::time::Instant::now();
    loop {
        let mut left: Vec<i32> = in_groups.iter().copied().filter(|&p| alive(p)).collect();
        left.extend([watcher].iter().filter(|&&p| alive(p)));
        if with_cgroup && alive(daemon) {
            left.push(daemon);
        }
        if left.is_empty() {
            eprintln!("every process gone {:?} after the master's SIGKILL", killed.elapsed());
            break;
        }
        assert!(
            killed.elapsed() < DEADLINE,
            "alive {DEADLINE:?} after the master's SIGKILL (watcher {watcher}): {:?}",
            left.iter().map(|&p| (p, cmdline(p))).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    if with_cgroup {
        let path = cgroup.split("path=").nth(1).unwrap().trim().to_owned();
        wait_until("the cgroup removed", DEADLINE, || {
            (!std::path::Path::new(&path).exists()).then_some(())
        });
        eprintln!("the cgroup removed {:?} after the master's SIGKILL", killed.elapsed());
    } else {
        eprintln!(
            "SKIPPED the setsid daemon's assertion: no cgroup for the children here ({cgroup})"
        );
    }
    presup.wait_exit();
}

#[test]
fn a_clean_stop_ends_the_watcher_and_removes_the_cgroup() {
    let dir = Dir::new();
    let toml = "[workers]\ncommand = [\"sleep\", \"1000\"]\nmin_uptime = \"100ms\"\n";
    let mut presup = Presup::start(&dir, toml);
    let watcher = pid_field(&presup.log.wait_for("watcher started"));
    let cgroup = presup.log.wait_for("children");
    presup.log.wait_for("ready: all workers up");
    assert!(alive(watcher));
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(!alive(watcher), "the watcher outlived a clean stop");
    if let Some(path) = cgroup.split("path=").nth(1) {
        assert!(!std::path::Path::new(path.trim()).exists(), "{path} left behind");
    }
}

#[test]
fn a_killed_watcher_is_replaced_and_the_new_one_knows_every_group() {
    let dir = Dir::new();
    let mark = mark(&dir);
    let _cleanup = Cleanup(mark.clone());
    let toml = format!(
        "[workers]\ncommand = [\"sh\", \"-c\", \"sleep 1041; true\"]\nmin_uptime = \"100ms\"\nenv = {{ LEFTOVER_MARK = \"{}\" }}\n",
        dir.path().display()
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    let first = presup.watcher_pid();
    let sleep = only_child(pid_field(&presup.log.wait_for("worker spawned slot=0")));
    kill(first, Signal::SIGKILL);
    // Logged once the table is written to the new watcher's pipe.
    let line = presup.log.wait_for_nth("watcher started", 2);
    assert!(line.contains("replayed=1 unsent=0"), "{line}");
    let second = pid_field(&line);
    assert_ne!(first, second);
    presup.signal(Signal::SIGKILL);
    let killed = std::time::Instant::now();
    wait_until("the sleep and the new watcher gone", DEADLINE, || {
        (!alive(sleep) && !alive(second)).then_some(())
    });
    eprintln!(
        "the sleep and the new watcher gone {:?} after the master's SIGKILL",
        killed.elapsed()
    );
    presup.wait_exit();
}

#[test]
fn a_fast_stop_during_a_graceful_one_hastens_a_draining_group() {
    let dir = Dir::new();
    let mark = mark(&dir);
    let _cleanup = Cleanup(mark.clone());
    // The shell exits on TERM; its `sleep` ignores it and drains for the whole grace.
    let toml = format!(
        "graceful_timeout = \"60s\"\n[workers]\ncommand = [\"sh\", \"-c\", \"(trap '' TERM; exec sleep 1051) & wait\"]\nmin_uptime = \"100ms\"\nenv = {{ LEFTOVER_MARK = \"{}\" }}\n",
        dir.path().display()
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    wait_until("the worker's sleep", DEADLINE, || (sleeps(&mark).len() == 1).then_some(()));
    presup.signal(Signal::SIGTERM);
    presup.log.wait_for("gets SIGKILL at the end of its stop timeout");
    let began = std::time::Instant::now();
    presup.signal(Signal::SIGINT);
    assert_eq!(presup.wait_exit(), Some(0), "{}", presup.log.text());
    eprintln!("the master exited {:?} after the INT", began.elapsed());
    assert!(presup.log.text().contains("fast stop: SIGQUIT to what is left of a process group"));
    assert_eq!(processes_with(std::slice::from_ref(&mark)), Vec::<i32>::new());
}

/// The worker forks a helper that moves to a group of its own, after forking a child that stays
/// in the worker's group; the child outlives the worker's stop a little and is reaped by the
/// helper, not by the master: the group empties without the master noticing.
const EMPTIED_UNNOTICED: &str = r#"
import os, signal, time
if os.fork() == 0:
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.3), os._exit(0)))
        while True:
            time.sleep(1000)
    os.setpgid(0, 0)
    open("moved", "w").write(str(child))
    os.waitpid(child, 0)
    time.sleep(1000)
signal.pause()
"#;

#[test]
fn a_group_that_empties_unnoticed_is_not_signalled_at_the_end_of_its_grace() {
    let dir = Dir::new();
    let mark = mark(&dir);
    let _cleanup = Cleanup(mark.clone());
    dir.write("worker.py", EMPTIED_UNNOTICED);
    let toml = format!(
        "graceful_timeout = \"3s\"\n[workers]\ncommand = [\"python3\", \"{d}/worker.py\"]\nmin_uptime = \"100ms\"\nenv = {{ LEFTOVER_MARK = \"{d}\" }}\n",
        d = dir.path().display()
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    wait_until("the helper's own group", DEADLINE, || dir.read("moved").parse::<i32>().ok());
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    let log = presup.log.text();
    if !log.contains("gets SIGKILL at the end of its stop timeout") {
        eprintln!("the child exited before the worker was reaped: nothing was draining");
    }
    assert!(!log.contains("what was left of the process group of a"), "{log}");
    assert!(!log.contains("still has processes"), "{log}");
    assert_eq!(processes_with(std::slice::from_ref(&mark)), Vec::<i32>::new());
}

/// A `presup-<pid>` cgroup beside where the master makes its own, whose pid is dead, with a
/// `sleep` in it: what a master and its watcher both killed (`pkill -9 presup`) leave.
struct StaleCgroup {
    dir: std::path::PathBuf,
    sleep: std::process::Child,
}

impl StaleCgroup {
    fn make() -> Result<StaleCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2")?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (mount, root) = mounts
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let fields: Vec<&str> = left.split_whitespace().collect();
                right.starts_with("cgroup2 ").then(|| (fields[4].to_owned(), fields[3].to_owned()))
            })
            .ok_or("no cgroup2 mount")?;
        let rel = path.strip_prefix(root.as_str()).unwrap_or(path).trim_start_matches('/');
        let parent = std::path::Path::new(&mount).join(rel);
        let mut gone = std::process::Command::new("true").spawn().map_err(|e| e.to_string())?;
        gone.wait().map_err(|e| e.to_string())?;
        let dir = parent.join(format!("presup-{}", gone.id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !dir.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err("no cgroup.kill (Linux 5.14)".into());
        }
        let sleep = std::process::Command::new("sleep").arg("1071").spawn().unwrap();
        let stale = StaleCgroup { dir, sleep };
        std::fs::write(stale.dir.join("cgroup.procs"), stale.sleep.id().to_string())
            .map_err(|e| format!("{}/cgroup.procs: {e}", stale.dir.display()))?;
        Ok(stale)
    }
}

impl Drop for StaleCgroup {
    fn drop(&mut self) {
        let _ = self.sleep.kill();
        let _ = self.sleep.wait();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_dead_masters_cgroup_is_killed_and_removed_at_startup() {
    let mut stale = match StaleCgroup::make() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED: cannot make a stale cgroup here ({why})");
            return;
        }
    };
    let dir = Dir::new();
    let mut presup = Presup::start(&dir, "[workers]\ncommand = [\"sleep\", \"1000\"]\n");
    presup.log.wait_for("master started");
    if presup.log.count("children's cgroup created") == 0 {
        let why = presup.log.wait_for("no cgroup for the children");
        eprintln!("SKIPPED: the master makes no cgroup here ({why})");
        presup.signal(Signal::SIGTERM);
        presup.wait_exit();
        return;
    }
    presup.log.wait_for("ready: all workers up");
    // Any master starting beside it may have swept it: this one or another test's.
    let status =
        wait_until("the stale cgroup's sleep killed", DEADLINE, || stale.sleep.try_wait().unwrap());
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    wait_until("the stale cgroup removed", DEADLINE, || (!stale.dir.exists()).then_some(()));
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}
