//! The ticket: real processes racing for turns, killed while they wait, the master's
//! side (the environment, the CLI, USR1, a state file across restarts) and the HTTP endpoint
//! with real clients, hanging up included.
//!
//! Racing processes are a helper program, `tests/helpers/ticket_child.rs` (built as the
//! example `ticket_child`), so that each takes turns through the Rust API and records the
//! instant of each grant.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, wait_until, Dir, KillOnDrop, Presup, DEADLINE};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use presup::config;
use presup::ticket::{self, Ticket, Tickets};

const MS: u64 = 1_000_000;

/// Racing processes (`tests/helpers/ticket_child.rs`), killed and reaped when dropped.
struct Racers {
    program: String,
    children: Vec<KillOnDrop>,
}

impl Racers {
    fn new() -> Racers {
        Racers { program: common::example("ticket_child"), children: vec![] }
    }

    fn spawn(&mut self, path: &Path, shard: u64, count: u64, out: &Path) {
        let child = Command::new(&self.program)
            .env("TICKET_CHILD", path)
            .env("TICKET_SHARD", shard.to_string())
            .env("TICKET_COUNT", count.to_string())
            .env("TICKET_OUT", out)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(KillOnDrop(child));
    }

    /// Waits for every racer to exit 0.
    fn wait_all(&mut self, deadline: Duration) {
        let end = Instant::now() + deadline;
        for c in &mut self.children {
            loop {
                if let Some(status) = c.try_wait().unwrap() {
                    assert!(status.success(), "a racer failed: {status}");
                    break;
                }
                assert!(Instant::now() < end, "racers still running after {deadline:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A ticket file made as the master makes it, in `dir`.
fn make_ticket(dir: &Path, spec: config::Ticket) -> (Tickets, PathBuf) {
    let tickets = Tickets::create(&BTreeMap::from([("t".to_owned(), spec)]), dir, None).unwrap();
    let path = tickets.env()[0].1.clone();
    (tickets, path)
}

fn spec(interval: Duration, buckets: u32, daily: Option<(u64, Duration)>) -> config::Ticket {
    config::Ticket {
        interval,
        buckets,
        daily_limit: daily.map(|d| d.0),
        daily_period: daily.map_or(Duration::from_secs(86400), |d| d.1),
        http: None,
        margin: ticket::default_margin(interval),
        path: None,
    }
}

/// The grants recorded in `out`: `(bucket, at, returned)`.
fn grants(out: &Path) -> Vec<(u32, u64, u64)> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (f[0] as u32, f[1], f[2])
        })
        .collect()
}

/// Per bucket, the grant instants in order, checked at least `interval` apart (exactly: the
/// instants are the ticket's own arithmetic) and never returned before their instant.
fn by_bucket(grants: &[(u32, u64, u64)], interval: u64) -> BTreeMap<u32, Vec<u64>> {
    let mut out: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for &(b, at, returned) in grants {
        assert!(returned >= at, "returned at {returned}, before its grant at {at}");
        out.entry(b).or_default().push(at);
    }
    for (b, ats) in &mut out {
        ats.sort_unstable();
        for w in ats.windows(2) {
            assert!(w[1] - w[0] >= interval, "bucket {b}: grants {} ns apart", w[1] - w[0]);
        }
    }
    out
}

#[test]
fn sixteen_processes_share_four_buckets_exactly() {
    let dir = Dir::new();
    // Turns 20 ms apart plus the default margin, 1 ms: 21 ms.
    let spacing = 21 * MS;
    let (_tickets, path) = make_ticket(dir.path(), spec(Duration::from_millis(20), 4, None));
    let out = dir.join("grants");
    let mut racers = Racers::new();
    for p in 0..16 {
        racers.spawn(&path, p, 100, &out);
    }
    racers.wait_all(Duration::from_secs(60));
    let all = grants(&out);
    assert_eq!(all.len(), 1600);
    let buckets = by_bucket(&all, spacing);
    assert_eq!(buckets.len(), 4);
    // 400 turns per bucket, back to back: the ideal is 399 spacings from first to last.
    let ideal = 399 * spacing;
    for (b, ats) in &buckets {
        assert_eq!(ats.len(), 400);
        let took = ats[399] - ats[0];
        assert!(took <= ideal + ideal / 10, "bucket {b}: {took} ns for 400 turns, ideal {ideal}");
    }
    let first = all.iter().map(|g| g.1).min().unwrap();
    let last = all.iter().map(|g| g.2).max().unwrap();
    assert!(last - first <= ideal + ideal / 10, "{} ns in all, ideal {ideal}", last - first);
}

#[test]
fn the_daily_limit_holds_while_processes_are_killed_as_they_wait() {
    let dir = Dir::new();
    let (interval, limit, period) = (5 * MS, 20, 400 * MS);
    let daily = Some((limit, Duration::from_nanos(period)));
    let (_tickets, path) = make_ticket(dir.path(), spec(Duration::from_nanos(interval), 2, daily));
    let out = dir.join("grants");
    let mut racers = Racers::new();
    for p in 0..6 {
        racers.spawn(&path, p, u64::MAX, &out);
    }
    // For 1.2 s, SIGKILL one racer every 30 ms (in a reservation, or asleep until its turn)
    // and start another.
    let mut seed = 7u64;
    let end = Instant::now() + Duration::from_millis(1200);
    let mut killed = 0;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(30));
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let i = (seed >> 33) as usize % racers.children.len();
        let mut c = racers.children.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
        killed += 1;
        racers.spawn(&path, seed % 7, u64::MAX, &out);
    }
    drop(racers);
    let all = grants(&out);
    by_bucket(&all, interval);
    let mut ats: Vec<u64> = all.iter().map(|g| g.1).collect();
    ats.sort_unstable();
    for (i, &start) in ats.iter().enumerate() {
        let n = ats[i..].iter().take_while(|&&at| at < start + period).count();
        assert!(n as u64 <= limit, "{n} grants in a window of {period} ns");
    }
    // More than one budget's worth: the racers waited for the window to move (turns reserved
    // by killed racers count as spent, so not much more).
    assert!(all.len() as u64 > limit, "{} grants", all.len());
    // Nothing is left locked or wedged: a new process gets its turn.
    let ticket = Ticket::open(&path).unwrap();
    let status = ticket.status();
    eprintln!("{killed} racers killed; {} grants; {status:?}", all.len());
    ticket.acquire_timeout(0, Duration::from_secs(5)).expect("a turn within the daily window");
}

/// `presup ticket` run by the test, with the ticket of a running master.
fn cli(path: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(common::bin())
        .arg("ticket")
        .args(args)
        .env("PRESUP_TICKET_T", path)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn children_and_their_children_reach_the_ticket_and_usr1_logs_it() {
    let dir = Dir::new();
    // A worker's grandchild, started by Python's subprocess (which closes inherited fds),
    // takes a turn with the CLI and records where the ticket is.
    let bin = common::bin();
    let script = dir.script(
        "worker.sh",
        &format!(
            "trap '' USR1\npython3 -c 'import subprocess, os\n\
             subprocess.run([\"{bin}\", \"ticket\", \"t\", \"--shard\", os.environ[\"PRESUP_WORKER_ID\"]], check=True)\n\
             open(\"granted\", \"a\").write(os.environ[\"PRESUP_TICKET_T\"] + \"\\n\")'\nexec sleep 60"
        ),
    );
    let toml = format!(
        "[workers]\ncommand = [\"{}\"]\ncount = 2\nmin_uptime = \"100ms\"\n\n\
         [tickets.t]\ninterval = \"1h\"\nbuckets = 2\ndaily_limit = 5\n",
        script.display()
    );
    let presup = Presup::start(&dir, &toml);
    let paths = wait_until("both workers granted", DEADLINE, || {
        let lines = dir.lines("granted");
        (lines.len() == 2).then_some(lines)
    });
    assert_eq!(paths[0], paths[1]);
    let path = PathBuf::from(&paths[0]);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    // Both buckets are spent for an hour: a turn within 100 ms is refused at once (exit 1),
    // an unknown ticket is a usage error (exit 2).
    let (code, err) = cli(&path, &["t", "--shard", "3", "--timeout", "100ms"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("after the timeout of 100ms"), "{err}");
    let (code, err) = cli(&path, &["other"]);
    assert_eq!((code, err.contains("PRESUP_TICKET_OTHER is not set")), (Some(2), true), "{err}");
    presup.signal(Signal::SIGUSR1);
    let line = presup.log.wait_for("ticket status");
    assert!(line.contains("ticket=t") && line.contains("daily_left=3"), "{line}");
    // An hour plus the default margin (50 ms) from each grant: about an hour from now.
    let about_an_hour =
        |b: u32| ["59m", "1h "].iter().any(|t| line.contains(&format!("{b}: in {t}")));
    assert!(about_an_hour(0) && about_an_hour(1), "{line}");
}

#[test]
fn a_state_file_keeps_the_last_grants_across_a_restart_of_the_master() {
    let dir = Dir::new();
    let bin = common::bin();
    let script = dir.script(
        "worker.sh",
        &format!("\"{bin}\" ticket t && echo granted >> granted\nexec sleep 60"),
    );
    let toml = format!(
        "[workers]\ncommand = [\"{}\"]\ncount = 1\nmin_uptime = \"100ms\"\n\n\
         [tickets.t]\ninterval = \"700ms\"\npath = \"t.ticket\"\n",
        script.display()
    );
    let state = dir.join("t.ticket");
    let next_free = || Ticket::open(&state).unwrap().status().buckets[0];
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("state file created");
    wait_until("a grant", DEADLINE, || (dir.lines("granted").len() == 1).then_some(()));
    let first = next_free() - 700 * MS;
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    drop(presup);
    // Restarted at once: the new worker's turn comes a full interval after the last one.
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("state file of this boot: its last grants are kept");
    wait_until("a second grant", DEADLINE, || (dir.lines("granted").len() == 2).then_some(()));
    let second = next_free() - 700 * MS;
    assert!(second >= first + 700 * MS, "granted {} ns after the last", second - first);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    drop(presup);
    // A state of another boot (its boot id, at bytes 40..56 of the header, differs) is
    // forgotten: CLOCK_MONOTONIC restarted with the machine.
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[40..56].fill(0x5a);
    std::fs::write(&state, &bytes).unwrap();
    let presup = Presup::start(&dir, &toml);
    presup.log.wait_for("state file of a previous boot: started afresh");
    wait_until("a third grant", DEADLINE, || (dir.lines("granted").len() == 3).then_some(()));
}

/// The ticket server's port, from its log line.
fn server_port(presup: &Presup) -> u16 {
    let line = presup.log.wait_for("ticket server listening");
    let addr = line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// A real HTTP client (Python's urllib) asking `url`; returns its status and body.
fn urllib(method: &str, url: &str) -> (u16, String) {
    let code = format!(
        "import urllib.request as u, sys\n\
         r = u.urlopen(u.Request('{url}', method='{method}', data=b'x' if '{method}' == 'POST' else None), timeout=20)\n\
         sys.stdout.write(str(r.status) + ' ' + r.read().decode())"
    );
    let out = common::python3().args(["-c", &code]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, body) = text.split_once(' ').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

#[test]
fn the_http_endpoint_speaks_gateway_queue_and_survives_clients_that_hang_up() {
    let dir = Dir::new();
    let script = dir.script("worker.sh", "echo \"$PRESUP_TICKET_T\" > path\nexec sleep 60");
    let toml = format!(
        "[workers]\ncommand = [\"{}\"]\ncount = 1\nmin_uptime = \"100ms\"\n\n\
         [tickets.t]\ninterval = \"300ms\"\nbuckets = 2\nhttp = \"127.0.0.1:0\"\n",
        script.display()
    );
    let presup = Presup::start(&dir, &toml);
    let port = server_port(&presup);
    let base = format!("http://127.0.0.1:{port}");
    let message = r#"{"message": "You're free to connect now! :)"}"#;
    assert_eq!(urllib("GET", &format!("{base}/?shard=0")), (200, message.to_owned()));
    // Any method and path; without a shard, bucket 0, logged.
    assert_eq!(urllib("POST", &format!("{base}/gateway/queue")), (200, message.to_owned()));
    presup.log.wait_for("request without shard: bucket 0");
    // Three clients of bucket 0 at once: the last is answered two intervals after the first
    // grant at the earliest (grants come after the requests, so this bound is exact).
    let started = Instant::now();
    std::thread::scope(|s| {
        for shard in [2, 4, 6] {
            let url = format!("{base}/?shard={shard}");
            s.spawn(move || assert_eq!(urllib("GET", &url).0, 200));
        }
    });
    assert!(started.elapsed() >= Duration::from_millis(600), "{:?}", started.elapsed());
    // Twenty clients of bucket 1 ask and hang up at once.
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /?shard=1 HTTP/1.1\r\nHost: q\r\n\r\n").unwrap();
    }
    // Nothing is wedged: every connection thread ends (the server is back to its one thread)
    // and at most one turn of bucket 1 was taken, not twenty.
    let server = presup.log.wait_for("singleton spawned singleton=ticket:t");
    let pid = common::pid_field(&server);
    let threads = || std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    wait_until("the server's threads to end", DEADLINE, || (threads() == 1).then_some(()));
    let path = wait_until("the worker's record", DEADLINE, || {
        let path = dir.read("path");
        (!path.trim().is_empty()).then(|| PathBuf::from(path.trim()))
    });
    let ticket = Ticket::open(&path).unwrap();
    let status = ticket.status();
    // One turn: 300 ms plus the default margin (15 ms).
    assert!(status.buckets[1] <= status.now + 315 * MS, "{status:?}");
    // Two requests on one kept-alive connection, the second waiting its turn.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(
        b"GET /?shard=3 HTTP/1.1\r\n\r\nHEAD /?shard=5 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert_eq!(answer.matches(message).count(), 1, "HEAD has no body: {answer}");
    // A client that hangs up while it is the head of the queue, its turn reserved: the turn
    // is given back. (The test first reserves five turns of bucket 0, 1.5 s of them, so that
    // the hang-up surely comes before the turn.)
    for _ in 0..5 {
        ticket.reserve(0, None).unwrap();
    }
    let after_mine = ticket.status().buckets[0];
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /?shard=0 HTTP/1.1\r\n\r\n").unwrap();
    // Hang up once the server has reserved its turn (bucket 0's next free instant moves on).
    wait_until("the server's reservation", DEADLINE, || {
        (ticket.status().buckets[0] > after_mine).then_some(())
    });
    drop(s);
    let line = presup.log.wait_for("client hung up while waiting");
    assert!(line.contains("its turn given back"), "{line}");
}

#[test]
fn consecutive_http_grants_of_a_bucket_are_an_interval_apart_at_the_client() {
    let dir = Dir::new();
    let script = dir.script("worker.sh", "exec sleep 60");
    // 1 s turns: the default margin is 50 ms.
    let toml = format!(
        "[workers]\ncommand = [\"{}\"]\ncount = 1\n\n\
         [tickets.t]\ninterval = \"1s\"\nbuckets = 2\nhttp = \"127.0.0.1:0\"\n",
        script.display()
    );
    let presup = Presup::start(&dir, &toml);
    let port = server_port(&presup);
    // One kept-alive client asks for bucket 0's turns one after the other, as a shard does
    // when it reconnects, each request sent as soon as the previous answer is in.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut received = Vec::new();
    let first_sent = Instant::now();
    for shard in [0, 2, 4, 6] {
        s.write_all(format!("GET /?shard={shard} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 512];
        while !answer.ends_with(b"}") {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "the server closed the connection");
            answer.extend_from_slice(&chunk[..n]);
        }
        received.push(Instant::now());
        assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&answer));
    }
    let interval = Duration::from_secs(1);
    let gaps: Vec<Duration> = received.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("answers apart: {gaps:?}");
    // The instants the test sees are late by its own scheduling, never early: the last answer
    // is at least three intervals after the first request was sent, whatever the load. Each gap
    // may look shorter than it was by how late the test saw the answer before it, so each is
    // checked within a scheduling tolerance (the grants themselves are interval + margin apart).
    let total = *received.last().unwrap() - first_sent;
    assert!(total >= 3 * interval, "four answers within {total:?}");
    let tolerance = Duration::from_millis(100);
    for w in received.windows(2) {
        assert!(w[1] - w[0] + tolerance >= interval, "answers {:?} apart", w[1] - w[0]);
    }
    // The margin (50 ms here) is what keeps a shard that acts a little after its answer (its
    // event loop, the way to Discord) an interval apart at the gateway: grants are interval +
    // margin apart. Measured at the client, the gaps say so only on a quiet machine, so that
    // part is checked exactly by the reservation's unit tests, not here.
}

/// `presup ticket-server t` run by the test itself on the loopback (as the master runs it),
/// with ticket `t`'s file made in `dir`; killed and reaped when dropped.
struct Server {
    child: KillOnDrop,
    log: common::Log,
    port: u16,
    _tickets: Tickets,
}

impl Server {
    /// `max_fds`: the server's RLIMIT_NOFILE, soft and hard (so that it cannot raise it).
    #[allow(unsafe_code)] // pre_exec: a limit set in the forked child, before its exec.
    fn start(dir: &Dir, interval: Duration, args: &[&str], max_fds: Option<u64>) -> Server {
        let (tickets, path) = make_ticket(dir.path(), spec(interval, 2, None));
        let mut cmd = Command::new(common::bin());
        cmd.args(["ticket-server", "t", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("PRESUP_TICKET_T", &path)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = max_fds {
            use nix::sys::resource::{setrlimit, Resource};
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let log = common::Log::default();
        log.clone().follow(child.stderr.take().unwrap());
        let line = log.wait_for("ticket server listening");
        let addr = line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Server { child: KillOnDrop(child), log, port, _tickets: tickets }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    /// The server's CPU time so far (utime + stime, in clock ticks).
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

/// Sends `GET /?shard=N` on `s` and reads the answer's status line (`None`: closed first).
fn ask(s: &mut TcpStream, shard: u64) -> Option<String> {
    s.write_all(format!("GET /?shard={shard} HTTP/1.1\r\n\r\n").as_bytes()).ok()?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 512];
    while !answer.ends_with(b"}") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.lines().next().map(str::to_owned)
}

/// Whether the server closed `s` (EOF, or reset) within the stream's read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn idle_connections_cannot_lock_out_the_http_endpoint_nor_make_it_spin_out_of_fds() {
    // The test holds 1100 connections: it needs the fds (root may raise its hard limit).
    use nix::sys::resource::{getrlimit, setrlimit, Resource::RLIMIT_NOFILE};
    let (soft, hard) = getrlimit(RLIMIT_NOFILE).unwrap();
    if soft < 4096 && setrlimit(RLIMIT_NOFILE, 4096.max(hard), 4096.max(hard)).is_err() {
        eprintln!("skipped: cannot raise this test's fd limit to 4096 (soft {soft}, hard {hard})");
        return;
    }
    let dir = Dir::new();
    // The server under the 1024-fd limit systemd gives services: it cannot raise it, so it
    // holds at most 1024 - 64 connections. A long request timeout: nothing is closed for
    // being slow during the test, only to make room.
    let server =
        Server::start(&dir, Duration::from_millis(100), &["--request-timeout", "1h"], Some(1024));
    assert!(server.log.wait_for("ticket server listening").contains("max_connections=960"));
    let mut idle: Vec<TcpStream> = (0..1100).map(|_| server.connect()).collect();
    // A real request behind them is accepted, room made for it, and answered at once.
    let mut real = server.connect();
    let asked = Instant::now();
    assert_eq!(ask(&mut real, 0).as_deref(), Some("HTTP/1.1 200 OK"));
    eprintln!("answered in {:?} behind 1100 idle connections", asked.elapsed());
    // The connections idle the longest made room: the first 1100 + 1 - 960 of them.
    for (i, s) in idle.iter_mut().enumerate().take(141) {
        assert!(closed(s), "idle connection {i} is still open");
    }
    // With 960 connections held, no busy loop: over a second, a few ticks of CPU at most
    // (a generous bound, 30% of one core; a spinning accept takes all of it).
    let (before, started) = (server.cpu_ticks(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let ticks = server.cpu_ticks() - before;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as u64;
    let allowed = (started.elapsed().as_secs_f64() * hz as f64 * 0.3) as u64;
    eprintln!("{ticks} ticks of CPU in {:?} (allowed {allowed})", started.elapsed());
    assert!(ticks <= allowed, "{ticks} ticks of CPU in {:?}", started.elapsed());
    // The newer idle connections are still served (they were not closed needlessly).
    let last = idle.last_mut().unwrap();
    assert_eq!(ask(last, 1).as_deref(), Some("HTTP/1.1 200 OK"));
}

#[test]
fn a_connection_without_a_request_is_cut_after_the_request_timeout_one_waiting_is_not() {
    let dir = Dir::new();
    let server = Server::start(&dir, Duration::from_secs(2), &["--request-timeout", "500ms"], None);
    let connected = Instant::now();
    let mut silent = server.connect();
    let mut slow = server.connect();
    slow.write_all(b"GET /?shard=1 HTTP/1.1\r\n").unwrap();
    let mut waiting = server.connect();
    // Bucket 0's first turn is now; the second, 2 s later: four request timeouts of waiting.
    assert_eq!(ask(&mut waiting, 0).as_deref(), Some("HTTP/1.1 200 OK"));
    assert_eq!(ask(&mut waiting, 2).as_deref(), Some("HTTP/1.1 200 OK"));
    assert!(connected.elapsed() >= Duration::from_secs(2), "{:?}", connected.elapsed());
    // Meanwhile the silent connection and the one whose head never ended were closed.
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed(&mut silent), "a connection with no request stayed open");
    assert!(closed(&mut slow), "a connection with half a request stayed open");
    // A prompt client is not cut: a new connection asks within the timeout.
    let mut prompt = server.connect();
    assert_eq!(ask(&mut prompt, 1).as_deref(), Some("HTTP/1.1 200 OK"));
}

/// The stand-in gateway of examples/sharded-bot, killed when dropped.
struct Gateway {
    _child: KillOnDrop,
    port: u16,
}

impl Gateway {
    fn start(dir: &Dir, args: &[&str]) -> Gateway {
        let port_file = dir.join("gateway.port");
        let _ = std::fs::remove_file(&port_file);
        let child = common::python3()
            .args(["gateway.py", "--port", "0", "--port-file"])
            .arg(&port_file)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let port = wait_until("the gateway's port", DEADLINE, || {
            std::fs::read_to_string(&port_file).ok()?.trim().parse().ok()
        });
        Gateway { _child: KillOnDrop(child), port }
    }

    /// `(identifies, violations, live shards)`.
    fn stats(&self) -> (u64, u64, usize) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"STATS\n").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
        let num = |key: &str| -> u64 {
            let rest = line.split(&format!("\"{key}\": ")).nth(1).unwrap();
            rest.split([',', '}']).next().unwrap().trim().parse().unwrap()
        };
        let live = line.split("\"live\": [").nth(1).unwrap().split(']').next().unwrap();
        (
            num("identifies"),
            num("violations"),
            live.split(',').filter(|s| !s.trim().is_empty()).count(),
        )
    }
}

#[test]
fn the_sharded_bot_example_identifies_32_shards_without_a_violation_through_kills() {
    let dir = Dir::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sharded-bot");
    for name in ["supervisor.toml", "bot.py", "gateway.py"] {
        std::fs::copy(src.join(name), dir.join(name)).unwrap();
    }
    // 250 ms turns instead of 1 s; the gateway allows 100 ms of jitter on arrival.
    let gateway = Gateway::start(&dir, &["--interval", "0.25", "--buckets", "2", "--slack", "0.1"]);
    let http = free_port();
    let toml = dir
        .read("supervisor.toml")
        .replace("interval = \"1s\"", "interval = \"250ms\"")
        .replace("127.0.0.1:8090", &format!("127.0.0.1:{}", gateway.port))
        .replace("127.0.0.1:8091", &format!("127.0.0.1:{http}"));
    dir.write("supervisor.toml", &toml);
    let pids = dir.join("pids").display().to_string();
    let events = dir.join("events").display().to_string();
    let env = [
        ("PRESUP", common::bin()),
        ("EXAMPLE_PIDS", pids.as_str()),
        ("EXAMPLE_EVENTS", events.as_str()),
    ];
    let presup = Presup::start_with(&dir, &[], &env);
    let all_live = |identifies: u64| {
        wait_until("32 live shards", Duration::from_secs(30), || {
            let (n, violations, live) = gateway.stats();
            assert_eq!(violations, 0, "the gateway refused an IDENTIFY");
            (live == 32 && n >= identifies).then_some(n)
        })
    };
    let first = all_live(32);
    // Workers 1 (HTTP) and 2 (CLI) are killed with their children; their 16 shards identify
    // again. The new worker 1 is killed too while its shards wait for their turns.
    for slot in [1, 2] {
        nix::sys::signal::killpg(Pid::from_raw(presup.worker_pid(slot, 1)), Signal::SIGKILL)
            .unwrap();
    }
    let again = presup.worker_pid(1, 2);
    // Its 8 shards queue behind the 8 of worker 2 (2 buckets, 250 ms turns): once all 8 ask
    // the ticket server, they wait for about a second.
    let mine = format!(" {again}");
    wait_until("worker 1's shards waiting", DEADLINE, || {
        (dir.lines("events").iter().filter(|l| l.ends_with(&mine)).count() == 8).then_some(())
    });
    let hung_up_before = presup.log.count("client hung up while waiting");
    nix::sys::signal::killpg(Pid::from_raw(again), Signal::SIGKILL).unwrap();
    presup.log.wait_for_nth("client hung up while waiting", hung_up_before + 1);
    presup.worker_pid(1, 3);
    let second = all_live(first + 16);
    let (_, violations, _) = gateway.stats();
    assert_eq!(violations, 0);
    // The same bot without the ticket: the gateway refuses its IDENTIFYs.
    let _rogue = KillOnDrop(
        common::python3()
            .arg("bot.py")
            .current_dir(dir.path())
            .env("BOT_NO_TICKET", "1")
            .env("GATEWAY", format!("127.0.0.1:{}", gateway.port))
            .env("SHARD_COUNT", "8")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("refused IDENTIFYs", DEADLINE, || (gateway.stats().1 > 0).then_some(()));
    eprintln!("identifies: {first} at start, {second} after the kills");
}

/// Whatever is left in `dir` whose name holds `.new-` (a state file's temporary).
fn temporaries(dir: &Path) -> Vec<String> {
    let names = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name());
    names.map(|n| n.to_string_lossy().into_owned()).filter(|n| n.contains(".new-")).collect()
}

#[test]
fn a_ticket_on_a_full_filesystem_is_exit_3_naming_the_file_and_leaves_nothing_behind() {
    let dir = Dir::new();
    let full = match common::Tmpfs::mount(&dir.join("full"), "64k") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: cannot mount a small tmpfs to fill ({why}); run as root");
            return;
        }
    };
    full.fill();
    let script = dir.script("worker.sh", "exec sleep 60");
    let workers = format!("[workers]\ncommand = [\"{}\"]\ncount = 1\n", script.display());
    // A ticket `path` on the full filesystem (its state file is written through a temporary).
    let state = full.path.join("t.ticket");
    let toml =
        format!("{workers}\n[tickets.t]\ninterval = \"1s\"\npath = \"{}\"\n", state.display());
    let mut presup = Presup::start(&dir, &toml);
    assert_eq!(presup.wait_exit(), Some(3), "log:\n{}", presup.log.text());
    let text = presup.log.text();
    assert!(text.contains(&format!("ticket {}", state.display())), "{text}");
    assert!(text.contains("no space left on device"), "{text}");
    assert_eq!(temporaries(&full.path), Vec::<String>::new());
    assert!(!state.exists(), "the state file made for the attempt is left behind");
    drop(presup);
    // A ticket in the master's runtime directory, on the full filesystem.
    let runtime = full.path.to_str().unwrap();
    dir.write("supervisor.toml", &format!("{workers}\n[tickets.t]\ninterval = \"1s\"\n"));
    let mut presup = Presup::start_with(&dir, &[], &[("RUNTIME_DIRECTORY", runtime)]);
    assert_eq!(presup.wait_exit(), Some(3), "log:\n{}", presup.log.text());
    let text = presup.log.text();
    assert!(
        text.contains("/ticket.t: cannot allocate") && text.contains("no space left"),
        "{text}"
    );
    let left: Vec<_> =
        std::fs::read_dir(&full.path).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("filler")], "left behind");
}

/// `examples/twilight_shards.rs`, built (with the twilight feature) or found up to date.
fn twilight_example() -> String {
    common::example("twilight_shards")
}

/// `(shard, pid, ns)` of each `granted` line.
fn twilight_grants(dir: &Dir) -> Vec<(u32, i32, u64)> {
    let lines = dir.lines("events");
    let granted = lines.iter().filter_map(|l| l.strip_prefix("granted "));
    granted
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn twilight_s_queue_on_a_ticket_spaces_each_bucket_across_workers_and_a_kill() {
    let dir = Dir::new();
    let program = twilight_example();
    // 4 workers x 4 shards, 2 buckets, 1 s turns. The margin (200 ms here, 50 ms by default)
    // absorbs the shards' wake-up jitter, so that what the gateway would see keeps the rule.
    let toml = format!(
        "graceful_timeout = \"5s\"\n[tickets.identify]\ninterval = \"1s\"\nbuckets = 2\nmargin = \"200ms\"\n[workers]\ncommand = [\"{program}\"]\ncount = 4\nmin_uptime = \"100ms\"\n"
    );
    dir.write("supervisor.toml", &toml);
    let events = dir.join("events").display().to_string();
    let presup = Presup::start_with(&dir, &[], &[("TWILIGHT_EVENTS", events.as_str())]);
    let workers: Vec<i32> = (0..4).map(|slot| presup.worker_pid(slot, 1)).collect();
    std::fs::write(dir.join("pids"), workers.iter().map(|p| format!("{p}\n")).collect::<String>())
        .unwrap();
    // Kill worker 1 in the middle: once every worker has queued its shards and the first turns
    // went out (its own shards wait behind others' in both buckets).
    wait_until("every worker's shards queued and 2 turns granted", DEADLINE, || {
        let queued = dir.lines("events").iter().filter(|l| l.starts_with("enqueued")).count();
        (queued == 4 && twilight_grants(&dir).len() >= 2).then_some(())
    });
    let victim = workers[1];
    common::kill(victim, Signal::SIGKILL);
    let again = presup.worker_pid(1, 2);
    dir.record_pid(again);
    // Every shard identifies: those of the killed worker from its replacement.
    let grants = wait_until("16 shards granted", Duration::from_secs(60), || {
        let g = twilight_grants(&dir);
        let live: std::collections::BTreeSet<u32> =
            g.iter().filter(|(_, pid, _)| *pid != victim).map(|(s, _, _)| *s).collect();
        (live.len() == 16).then_some(g)
    });
    let mut per_bucket: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (shard, _, ns) in &grants {
        per_bucket.entry(shard % 2).or_default().push(*ns);
    }
    for (bucket, mut at) in per_bucket {
        at.sort_unstable();
        for pair in at.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= 1000 * MS, "bucket {bucket}: two turns {gap} ns apart: {at:?}");
        }
    }
    drop(presup);
}

#[cfg(feature = "twilight-0.18")]
#[test]
fn a_twilight_shard_that_drops_its_receiver_gives_its_turn_back() {
    use twilight_gateway_queue_018::Queue as _;
    let dir = Dir::new();
    let (_tickets, path) = make_ticket(dir.path(), spec(Duration::from_secs(30), 1, None));
    let queue = presup::ticket::twilight::Queue::new(Ticket::open(&path).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        // The first turn is now; the second, 30 s later, is given up before it comes.
        queue.enqueue(0).await.expect("the first turn");
        let before = queue.ticket().status().buckets[0];
        let second = queue.enqueue(0);
        let reserved = queue.ticket().status().buckets[0];
        assert!(reserved > before, "enqueue reserves at once");
        drop(second);
        let deadline = Instant::now() + DEADLINE;
        while queue.ticket().status().buckets[0] != before {
            assert!(Instant::now() < deadline, "the turn was not given back");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    // Without a runtime, a thread waits for the turn instead.
    let third = queue.enqueue(0);
    let reserved = queue.ticket().status().buckets[0];
    drop(third);
    wait_until("the turn given back without a runtime", DEADLINE, || {
        (queue.ticket().status().buckets[0] < reserved).then_some(())
    });
}
