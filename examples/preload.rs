//! presup as a library: a read-only table of `--mb N` megabytes (default 256), built once by
//! `preload` in the master and shared copy-on-write by every worker, served over HTTP on the
//! first listener of the config.
//!
//! ```sh
//! cargo run --release --example preload -- -c examples/preload.toml --mb 256
//! curl 127.0.0.1:8002/lookup/12345     # the table's entry 12345, from any worker
//! curl 127.0.0.1:8002/                 # slot, pid and generation of the worker that answered
//! ```
//!
//! Routes: `/lookup/N`; `/env/NAME` (the worker's environment); `/exit` (the worker function
//! returns); `/sleep/MS` (answers after MS milliseconds); `/marker` and `/poke` (which
//! writes the worker's pid into its own copy of the state: the other workers do not see it). `--per-worker` builds the table in
//! each worker instead (what the benchmark compares with), `--preload-log FILE` appends a line
//! each time `preload` runs, and `--leave-thread` leaves a thread running after `preload` (the
//! master must refuse to fork). `--drain-on-term` catches TERM with `signal-hook` in the worker
//! (as `tokio::signal` would): the request in hand is answered, then the worker returns 0.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use clap::Parser;
use presup::prefork::Context;

#[derive(Debug, Parser)]
#[command(name = "preload", about = "A prefork HTTP server with a preloaded table")]
struct Cli {
    #[command(flatten)]
    presup: presup::cli::Args,
    /// The table's size in megabytes.
    #[arg(long, default_value_t = 256)]
    mb: usize,
    /// Build the table in each worker instead of once in the master.
    #[arg(long)]
    per_worker: bool,
    /// Append `preload PID` to this file each time preload runs.
    #[arg(long)]
    preload_log: Option<PathBuf>,
    /// Leave a thread running after preload (the master refuses to fork).
    #[arg(long)]
    leave_thread: bool,
    /// Catch TERM in the worker (signal-hook): finish the request in hand, then exit 0.
    #[arg(long)]
    drain_on_term: bool,
}

/// The preloaded state: the table, and a marker each worker may write in its own copy.
struct State {
    table: Vec<u64>,
    marker: AtomicU64,
}

fn entry(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 7)
}

/// `mb` megabytes of u64 entries, every page written (so resident, and shared after fork).
fn build(mb: usize) -> Vec<u64> {
    (0..(mb << 20) as u64 / 8).map(entry).collect()
}

fn main() -> ExitCode {
    // The master runs this program itself as the HTTP server of a ticket with `http`.
    if let Some(code) = presup::prefork::ticket_server_if_asked() {
        return code;
    }
    let cli = Cli::parse();
    let (mb, per_worker, leave_thread) = (cli.mb, cli.per_worker, cli.leave_thread);
    let drain_on_term = cli.drain_on_term;
    let log = cli.preload_log.clone();
    let preload = move || {
        if let Some(path) = &log {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(f, "preload {}", std::process::id()).unwrap();
        }
        if leave_thread {
            std::thread::spawn(|| loop {
                std::thread::park();
            });
        }
        let table = if per_worker { Vec::new() } else { build(mb) };
        State { table, marker: AtomicU64::new(0) }
    };
    let worker = move |state: &State, ctx: Context<'_>| -> i32 {
        let term = Arc::new(AtomicBool::new(false));
        if drain_on_term {
            // A handler of the worker's own: TERM no longer ends it at once.
            let registered =
                signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone());
            if let Err(e) = registered {
                eprintln!("preload: cannot catch TERM: {e}");
                return 2;
            }
        }
        let own;
        let table = if per_worker {
            own = build(mb);
            &own
        } else {
            &state.table
        };
        serve(state, table, &ctx, &term)
    };
    presup::prefork::run(&cli.presup, preload, worker)
}

fn serve(state: &State, table: &[u64], ctx: &Context<'_>, term: &AtomicBool) -> i32 {
    let Some(name) = ctx.listener_names().next().map(str::to_owned) else {
        eprintln!("preload: the config has no [[listen]]");
        return 2;
    };
    let listener = match ctx.tcp_listener(&name) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("preload: listener {name}: {e}");
            return 2;
        }
    };
    let _ = ctx.ready();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // `/exit`: the worker function returns (presup's `_exit` ends the process).
        if let Ok(true) = answer(state, table, ctx, conn) {
            return 0;
        }
        // TERM came while this request was served (the next accept would wait for ever).
        if term.load(Ordering::Relaxed) {
            eprintln!("preload: TERM: the request in hand was answered; exiting");
            return 0;
        }
    }
    0
}

/// Answers one request; true if it asked the worker to exit.
fn answer(
    state: &State,
    table: &[u64],
    ctx: &Context<'_>,
    conn: TcpStream,
) -> std::io::Result<bool> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The rest of the head.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let pid = std::process::id();
    let (status, body) = if let Some(i) = path.strip_prefix("/lookup/") {
        match i.parse::<usize>().ok().and_then(|i| table.get(i)) {
            Some(v) => ("200 OK", format!("{v}\n")),
            None => ("404 Not Found", format!("no entry {i} (the table has {})\n", table.len())),
        }
    } else if let Some(name) = path.strip_prefix("/env/") {
        match std::env::var(name) {
            Ok(v) => ("200 OK", format!("{v}\n")),
            Err(_) => ("404 Not Found", format!("{name} is not set\n")),
        }
    } else if let Some(ms) = path.strip_prefix("/sleep/") {
        std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
        ("200 OK", format!("pid {pid} slept {ms} ms\n"))
    } else if path == "/exit" {
        ("200 OK", format!("pid {pid} exits\n"))
    } else if path == "/poke" {
        state.marker.store(pid.into(), Ordering::Relaxed);
        ("200 OK", format!("pid {pid} marker {pid}\n"))
    } else if path == "/marker" {
        ("200 OK", format!("pid {pid} marker {}\n", state.marker.load(Ordering::Relaxed)))
    } else {
        let (slot, generation) = (ctx.slot(), ctx.generation());
        (
            "200 OK",
            format!("slot {slot} pid {pid} generation {generation} entries {}\n", table.len()),
        )
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(path == "/exit")
}
