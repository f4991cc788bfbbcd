//! The ticket's cost, in one run: an uncontended turn through the shared mapping (the Rust
//! API, without and with a daily limit), against one HTTP round trip to the ticket server
//! (gateway-queue's protocol, kept-alive and one connection per request), and a run of the
//! `presup ticket` CLI.
//!
//!     cargo bench --bench ticket
//!
//! Every turn is free when asked (an interval of 1 ns), so what is measured is the way in,
//! not a wait. Under `cargo test`/`nextest` (no `--bench` argument) it does nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use presup::ticket::Ticket;

const CONFIG: &str = r#"
[[singleton]]
name = "idle"
command = ["sleep", "3600"]

[tickets.free]
interval = "1ns"
path = "free.ticket"
http = "127.0.0.1:0"

[tickets.daily]
interval = "1ns"
daily_limit = 1000000
daily_period = "1ns"
path = "daily.ticket"
"#;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("supervisor.toml"), CONFIG).unwrap();
    let mut master = Command::new(env!("CARGO_BIN_EXE_presup"))
        .args(["-c", "supervisor.toml"])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(master.stderr.take().unwrap()).lines();
    let port: u16 = loop {
        let line = log.next().expect("presup exited").unwrap();
        if let Some(rest) = line.split("ticket server listening").nth(1) {
            let addr = rest.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
            break addr.rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || log.for_each(drop));
    println!("presup ticket benchmark ({} CPUs)", std::thread::available_parallelism().unwrap());
    for name in ["free", "daily"] {
        let ticket = Ticket::open(&dir.path().join(format!("{name}.ticket"))).unwrap();
        let n = 2_000_000;
        let per = time(n, |i| {
            ticket.acquire(i % 4);
        });
        let what = if name == "free" { "" } else { " (daily limit: under the lock)" };
        println!("  acquire, uncontended{what}: {:>10.0} ns", per.as_nanos() as f64);
    }
    let mut kept = TcpStream::connect(("127.0.0.1", port)).unwrap();
    kept.set_nodelay(true).unwrap();
    let per = time(20_000, |i| round_trip(&mut kept, i, true));
    println!("  HTTP round trip, kept alive:  {:>10.1} µs", per.as_nanos() as f64 / 1000.0);
    let per = time(5_000, |i| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        round_trip(&mut s, i, false);
    });
    println!("  HTTP round trip, new connection: {:>7.1} µs", per.as_nanos() as f64 / 1000.0);
    let path = dir.path().join("free.ticket");
    let per = time(200, |i| {
        let status = Command::new(env!("CARGO_BIN_EXE_presup"))
            .args(["ticket", "free", "--shard", &i.to_string()])
            .env("PRESUP_TICKET_FREE", &path)
            .status()
            .unwrap();
        assert!(status.success());
    });
    println!("  presup ticket (the CLI, a process): {:>5.2} ms", per.as_nanos() as f64 / 1e6);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    master.wait().unwrap();
}

/// The mean time of `f` over `n` calls, after `n / 10` to warm up.
fn time(n: u64, mut f: impl FnMut(u64)) -> Duration {
    for i in 0..n / 10 {
        f(i);
    }
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed() / n as u32
}

/// One `GET /?shard=i`, its whole answer read.
fn round_trip(s: &mut TcpStream, i: u64, keep_alive: bool) {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let request =
        format!("GET /?shard={i} HTTP/1.1\r\nHost: q\r\nConnection: {connection}\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed early");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return;
            }
        }
    }
}
