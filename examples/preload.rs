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
//! returns); `/fail` (the worker function returns an error); `/panic` (the worker function
//! panics, after answering); `/sleep/MS` (answers after MS
//! milliseconds); `/marker` and `/poke` (which
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

use presup::prefork::Context;

/// The program's own options, beside presup's (`-c FILE`, `--log-level`...).
#[derive(Debug, Clone, clap::Args)]
struct Options {
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
    options: Options,
}

fn entry(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 7)
}

/// `mb` megabytes of u64 entries, every page written (so resident, and shared after fork).
fn build(mb: usize) -> Vec<u64> {
    (0..(mb << 20) as u64 / 8).map(entry).collect()
}

fn main() -> ExitCode {
    // For the tests: a thread started before presup (as a #[tokio::main] would start one).
    if std::env::var_os("PRELOAD_EXAMPLE_EARLY_THREAD").is_some() {
        std::thread::spawn(|| loop {
            std::thread::park();
        });
    }
    // presup's options and the program's own, from one command line; the master runs this
    // program itself as the HTTP server of a ticket with `http` (main_with handles that).
    presup::prefork::main_with(preload, worker)
}

/// Once, in the master: what every worker shares.
fn preload(options: &Options) -> State {
    if let Some(path) = &options.preload_log {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        writeln!(f, "preload {}", std::process::id()).unwrap();
    }
    if options.leave_thread {
        std::thread::spawn(|| loop {
            std::thread::park();
        });
    }
    let table = if options.per_worker { Vec::new() } else { build(options.mb) };
    State { table, marker: AtomicU64::new(0), options: options.clone() }
}

/// In every worker, forked from the master: serves until the listener fails or `/exit`.
fn worker(state: &'static State, ctx: Context) -> Result<(), String> {
    let term = Arc::new(AtomicBool::new(false));
    if state.options.drain_on_term {
        // A handler of the worker's own: TERM no longer ends it at once.
        signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())
            .map_err(|e| format!("cannot catch TERM: {e}"))?;
    }
    let own;
    let table = if state.options.per_worker {
        own = build(state.options.mb);
        &own
    } else {
        &state.table
    };
    serve(state, table, &ctx, &term)
}

fn serve(state: &State, table: &[u64], ctx: &Context, term: &AtomicBool) -> Result<(), String> {
    let name = ctx.listener_names().next().ok_or("the config has no [[listen]]")?;
    let listener = ctx.tcp_listener(name).map_err(|e| format!("listener {name}: {e}"))?;
    let _ = ctx.ready();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // `/exit`: the worker function returns (presup's `_exit` ends the process).
        match answer(state, table, ctx, conn, term) {
            Ok(Some(Ending::Exit)) => return Ok(()),
            Ok(Some(Ending::Fail)) => return Err("asked to fail".to_owned()),
            Ok(Some(Ending::Panic)) => panic!("asked to panic"),
            _ => {}
        }
        // TERM came while this request was served (the next accept would wait for ever).
        if term.load(Ordering::Relaxed) {
            eprintln!("preload: TERM: the request in hand was answered; exiting");
            return Ok(());
        }
    }
    Ok(())
}

/// How a request asks the worker function to end.
enum Ending {
    Exit,
    Fail,
    Panic,
}

/// Answers one request; whether it asked the worker function to end.
fn answer(
    state: &State,
    table: &[u64],
    ctx: &Context,
    conn: TcpStream,
    term: &AtomicBool,
) -> std::io::Result<Option<Ending>> {
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
    } else if path == "/until-term" {
        // Answered only once TERM came (within 30 s): a request that is in hand when it does.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !term.load(Ordering::Relaxed) && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ("200 OK", format!("pid {pid} answered after TERM\n"))
    } else if path == "/exit" {
        ("200 OK", format!("pid {pid} exits\n"))
    } else if path == "/fail" {
        ("200 OK", format!("pid {pid} fails\n"))
    } else if path == "/panic" {
        ("200 OK", format!("pid {pid} panics\n"))
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
    Ok(match path {
        "/exit" => Some(Ending::Exit),
        "/fail" => Some(Ending::Fail),
        "/panic" => Some(Ending::Panic),
        _ => None,
    })
}
