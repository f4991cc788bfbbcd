//! Fault injection: half a minute of random `kill -9` of workers and singletons, bursts of
//! HUP, TTIN and TTOU, hooks that hang and a worker that ignores TERM, all under HTTP load;
//! then the invariants: the master is alive and serves, the workers converge to the target, all
//! of the last generation, no zombie is left, the master's open fds and memory are back to
//! where they started, and after TERM no process is left.
//!
//! The chaos comes from a fixed-seed generator (`PRESUP_FAULT_SEED` picks another), so a
//! failure replays with the same sequence of actions.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{alive, environ, kill_if_alive as kill, open_fds, rss_kib, wait_until, Dir, Presup};
use nix::sys::signal::Signal;

/// A worker serving HTTP on fd 3, up at `READY=1`; the one in slot 1 ignores TERM (it needs
/// presup's SIGKILL).
const WORKER_PY: &str = r#"
import os, signal, socket
if os.environ["PRESUP_WORKER_ID"] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
listener = socket.socket(fileno=3)
# Up only now: TERM is ignored (slot 1) and the listener is ours (python3 may be a shim that
# takes a while to get here).
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
body = ("generation %s pid %d\n" % (os.environ["PRESUP_GENERATION"], os.getpid())).encode()
while True:
    conn, _ = listener.accept()
    try:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        conn.close()
"#;

const TARGET: usize = 4;

fn config(count: usize) -> String {
    format!(
        r#"graceful_timeout = "1s"

[[listen]]
name = "http"
address = "127.0.0.1:0"

[workers]
command = ["./worker.sh"]
count = {count}
ready = "notify"
boot_timeout = "20s"
restart_backoff = {{ initial = "10ms", max = "200ms", reset = "1s" }}

[[singleton]]
name = "sidecar"
command = ["./sidecar.sh"]
min_uptime = "50ms"
restart_backoff = {{ initial = "10ms", max = "200ms", reset = "1s" }}

# Hooks that hang: killed at their timeout, each time.
[[hooks.worker_exit]]
command = ["./hang.sh"]
timeout = "200ms"

[[hooks.on_reload]]
command = ["./hang.sh"]
timeout = "300ms"
"#
    )
}

/// xorshift64*, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The master's live children, with their `PRESUP_*` variables.
struct Child {
    pid: i32,
    state: char,
    env: Vec<(String, String)>,
}

impl Child {
    fn var(&self, key: &str) -> Option<&str> {
        common::var(&self.env, key)
    }

    /// A worker, not a `worker_exit` hook (which gets `PRESUP_WORKER_ID` too).
    fn is_worker(&self) -> bool {
        self.var("PRESUP_WORKER_ID").is_some() && self.var("PRESUP_HOOK").is_none()
    }
}

fn children(master: i32) -> Vec<Child> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{master}/task")) else { return out };
    for task in tasks.flatten() {
        let kids = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in kids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let Some(state) = common::state(pid) else { continue };
            let env = environ(pid).into_iter().filter(|(k, _)| k.starts_with("PRESUP_")).collect();
            out.push(Child { pid, state, env });
        }
    }
    out
}

fn workers(master: i32) -> Vec<Child> {
    children(master).into_iter().filter(Child::is_worker).collect()
}

#[test]
fn the_master_survives_half_a_minute_of_chaos_and_converges() {
    let dir = Dir::new();
    dir.write("worker.py", WORKER_PY);
    dir.script("worker.sh", "exec python3 worker.py");
    dir.script("sidecar.sh", "exec sleep 1000");
    dir.script("hang.sh", "exec sleep 1000");
    let mut presup = Presup::start(&dir, &config(TARGET));
    let master = presup.pid();
    let port = presup.port("http");
    presup.log.wait_for("ready: all workers up");
    // The baseline, once the master is settled: its fds and memory.
    let fds_before = open_fds(master);
    let rss_before = rss_kib(master);

    // HTTP load all along: answers and failures are counted (a worker killed mid-request
    // fails that request; the point is what the master does).
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, served) = (stop.clone(), served.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if common::http_get(port).is_ok() {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let seed = std::env::var("PRESUP_FAULT_SEED").ok().and_then(|s| s.parse().ok());
    let mut rng = Rng(seed.unwrap_or(0x00fa_017e_5eed));
    let chaos_for = Duration::from_secs(30);
    let begin = Instant::now();
    let mut actions = [0usize; 6];
    let mut target = TARGET;
    while begin.elapsed() < chaos_for {
        let action = rng.below(6) as usize;
        match action {
            0 | 1 => {
                let w = workers(master);
                if !w.is_empty() {
                    kill(w[rng.below(w.len() as u64) as usize].pid, Signal::SIGKILL);
                }
            }
            2 => {
                let sidecar =
                    children(master).into_iter().find(|c| c.var("PRESUP_SINGLETON").is_some());
                if let Some(s) = sidecar {
                    kill(s.pid, Signal::SIGKILL);
                }
            }
            3 => {
                for _ in 0..1 + rng.below(5) {
                    kill(master, Signal::SIGHUP);
                }
                // A reload applies the config's count again.
                target = TARGET;
            }
            4 if target < 8 => {
                kill(master, Signal::SIGTTIN);
                target += 1;
            }
            _ if target > 1 => {
                kill(master, Signal::SIGTTOU);
                target -= 1;
            }
            _ => {}
        }
        actions[action] += 1;
        std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
    }
    eprintln!(
        "chaos: {actions:?} (kill worker ×2, kill singleton, HUP burst, TTIN, TTOU); {} requests served",
        served.load(Ordering::Relaxed)
    );

    // Back to the config's count: one more reload, then everything must settle.
    let reloads = presup.log.count("HUP: reloading");
    kill(master, Signal::SIGHUP);
    let line = presup.log.wait_for_nth("HUP: reloading", reloads + 1);
    let generation: u64 = line
        .split("generation=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let watcher = presup.watcher_pid();
    let settled = wait_until("the workers to converge", Duration::from_secs(60), || {
        let kids = children(master);
        let w: Vec<&Child> = kids.iter().filter(|c| c.is_worker()).collect();
        let gen = generation.to_string();
        let converged = w.len() == TARGET
            && w.iter().all(|c| c.var("PRESUP_GENERATION") == Some(gen.as_str()))
            && kids.iter().all(|c| c.state != 'Z')
            // Only the workers, the singleton and the watcher: every hang hook was killed and
            // reaped.
            && kids.len() == TARGET + 2
            && kids.iter().any(|c| c.pid == watcher)
            && presup.log.count(&format!("reload done: every worker runs the new generation generation={generation}")) == 1;
        converged.then_some(w.iter().map(|c| c.pid).collect::<Vec<_>>())
    });
    let mut slots: Vec<String> =
        workers(master).iter().map(|c| c.var("PRESUP_WORKER_ID").unwrap().to_owned()).collect();
    slots.sort();
    assert_eq!(slots, ["0", "1", "2", "3"]);

    // The master serves, and is back to its baseline.
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let body = common::http_get(port).expect("the workers answer after the chaos");
    assert!(body.starts_with(&format!("generation {generation} ")), "{body}");
    assert!(settled.iter().all(|&p| alive(p)));
    let fds_after =
        wait_until("the master's fds back to the baseline", Duration::from_secs(10), || {
            let n = open_fds(master);
            (n == fds_before).then_some(n)
        });
    let rss_after = rss_kib(master);
    eprintln!("master fds {fds_before} → {fds_after}, RSS {rss_before} KiB → {rss_after} KiB");
    assert!(
        rss_after <= rss_before + 1024,
        "the master's RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // A TERM stops everything (slot 1 ignores it: presup's SIGKILL at graceful_timeout).
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(
        presup
            .log
            .lines()
            .iter()
            .any(|l| l.contains("presup's SIGKILL after the stop timeout, Shutdown")
                && l.contains("slot=1")),
        "{}",
        presup.log.text()
    );
    // The harness's drop checks that no recorded process is left.
}
