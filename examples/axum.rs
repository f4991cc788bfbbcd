//! axum on tokio in preload workers: a read-only table of `--mb N` megabytes (default 64)
//! built once by `preload` in the master, shared copy-on-write by every worker, served by
//! axum; on TERM (caught with `tokio::signal`) each worker drains, so that neither a reload
//! (HUP) nor a stop loses a request:
//!
//! 1. it stops accepting: new connections wait in the shared socket's backlog for the other
//!    workers (or the next generation's);
//! 2. each kept-alive connection gets one more answer, with `Connection: close`, and is closed
//!    by the server after it: the client opens its next connection elsewhere;
//! 3. once no request has been in flight for a moment (or after 10 s), it exits.
//!
//! axum's own `with_graceful_shutdown` closes idle kept-alive connections at once instead: a
//! client that sent its next request on one at that instant gets a read error (230 of 706k
//! requests over 10 HUPs in `bench/axum.py`; 0 with the drain above).
//!
//! ```sh
//! cargo run --release --example axum -- -c examples/axum.toml --mb 64
//! curl 127.0.0.1:8005/lookup/12345      # the table's entry 12345, from any worker
//! curl 127.0.0.1:8005/                  # slot, pid and generation of the worker
//! ```
//!
//! Routes: `/`, `/lookup/N`, `/sleep/MS` (answers after MS milliseconds: a request in flight).
//!
//! What it shows of `presup::prefork`:
//! - `main_with` parses `--mb` beside presup's own options (`-c`, `--log-level`...);
//! - the worker gets `&'static Table`, which goes into axum's `State` as it is (no `Arc`);
//! - the tokio runtime is built in the worker, after the fork (a runtime built before it, or
//!   `#[tokio::main]` around `main`, would be refused: `fork` copies only one thread);
//! - `ctx.async_tcp_listener` hands the shared socket to tokio, non-blocking;
//! - `tokio::signal` catches TERM in the worker as in any process.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::header::{HeaderValue, CONNECTION};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use presup::prefork::Context;
use tokio::signal::unix::{signal, SignalKind};

/// The program's own options.
#[derive(Debug, clap::Args)]
struct Options {
    /// The table's size in megabytes.
    #[arg(long, default_value_t = 64)]
    mb: usize,
}

/// The preloaded state.
struct Table {
    entries: Vec<u64>,
}

fn entry(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 7)
}

fn main() -> ExitCode {
    presup::prefork::main_with(
        |o: &Options| Table { entries: (0..(o.mb << 20) as u64 / 8).map(entry).collect() },
        worker,
    )
}

/// TERM came: the worker drains.
static DRAINING: AtomicBool = AtomicBool::new(false);
/// Requests being answered.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// One worker: a tokio runtime of its own, axum on the shared listener, a drain on TERM.
fn worker(table: &'static Table, ctx: Context) -> std::io::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(ctx.async_tcp_listener("http")?)?;
        let mut term = signal(SignalKind::terminate())?;
        let app = Router::new()
            .route("/", get(root))
            .route("/lookup/{i}", get(lookup))
            .route("/sleep/{ms}", get(sleep))
            .layer(axum::middleware::from_fn(count_and_close))
            .with_state((table, ctx.clone()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let server = axum::serve(Draining { listener, stopped }, app);
        tokio::spawn(async move { server.await });
        ctx.ready()?;
        term.recv().await;
        DRAINING.store(true, Ordering::SeqCst);
        let _ = stop.send(true);
        drain().await;
        Ok(())
    })
}

/// Counts the requests in flight and, once draining, closes each connection after its answer.
async fn count_and_close(request: Request, next: Next) -> Response {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let mut response = next.run(request).await;
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    if DRAINING.load(Ordering::SeqCst) {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Returns once no request has been in flight for 300 ms, or after 10 s.
async fn drain() {
    let (quiet, deadline) = (Duration::from_millis(300), Instant::now() + Duration::from_secs(10));
    let mut idle_since = Instant::now();
    while Instant::now() < deadline {
        if IN_FLIGHT.load(Ordering::SeqCst) > 0 {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= quiet {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The shared listener, until the drain begins: then it accepts nothing more.
struct Draining {
    listener: tokio::net::TcpListener,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl axum::serve::Listener for Draining {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let stopped = *self.stopped.borrow();
            if stopped {
                return std::future::pending().await;
            }
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => return conn,
                    // Another worker took it (the socket is shared), or a passing error.
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                },
                _ = self.stopped.changed() => {}
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

type Shared = (&'static Table, Context);

async fn root(State((table, ctx)): State<Shared>) -> String {
    let (slot, generation, pid) = (ctx.slot(), ctx.generation(), std::process::id());
    format!("slot {slot} pid {pid} generation {generation} entries {}\n", table.entries.len())
}

async fn lookup(State((table, _)): State<Shared>, Path(i): Path<usize>) -> String {
    match table.entries.get(i) {
        Some(v) => format!("{v}\n"),
        None => format!("no entry {i}\n"),
    }
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("pid {} slept {ms} ms\n", std::process::id())
}
