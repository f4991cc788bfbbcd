//! Copy-on-write preload: presup as a library (DESIGN.md §8).
//!
//! A Rust program hands presup a `preload` function, run once in the master before any fork,
//! and a `worker` function, run in each worker after `fork` without `exec`, given the preloaded
//! state by reference (shared copy-on-write: pages are copied only when a worker writes them)
//! and a [`Context`]. Everything else is the `presup` binary's: the same command line
//! ([`crate::cli::Args`]) and `supervisor.toml`, hooks, singletons, tickets, signals,
//! restarts, reloads and systemd; `[workers] command` is not needed.
//!
//! ```no_run
//! use std::io::{Read, Write};
//!
//! fn main() -> std::process::ExitCode {
//!     presup::prefork::main(
//!         || vec![42u64; 1 << 20],                    // once, in the master
//!         |table: &Vec<u64>, ctx: presup::prefork::Context| {
//!             let listener = ctx.tcp_listener("http").expect("a [[listen]] named http");
//!             ctx.ready().ok();
//!             for conn in listener.incoming() {
//!                 let mut conn = conn.unwrap();
//!                 let _ = conn.read(&mut [0u8; 1024]);
//!                 let body = table[7].to_string();
//!                 let _ = write!(conn, "HTTP/1.0 200 OK\r\n\r\n{body}");
//!             }
//!             0                                          // the worker's exit code
//!         },
//!     )
//! }
//! ```
//!
//! Fork safety: `fork` copies only the calling thread, so a lock held by another thread at that
//! instant stays locked forever in the child. The master therefore refuses to fork (exit 3)
//! when `preload` leaves more than one thread running. In the worker, the master's signal
//! handlers are reset to their defaults and its own fds (notification socket, signal pipe,
//! pidfile) are closed before `worker` runs; the worker ends with `_exit`, so none of the
//! master's destructors or exit handlers runs in it (a panic ends it with code 101). A worker
//! that dies is forked again from the master's preloaded state; `preload` never runs twice, and
//! a reload (HUP) does not rebuild it: restart the master for new code or data.

use std::io;
use std::net::TcpListener;
use std::os::fd::BorrowedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::process::ExitCode;

use clap::FromArgMatches;

use crate::cli;

/// The worker function with the preloaded state inside: what the master forks into.
pub type WorkerFn = Box<dyn Fn(Context<'_>) -> i32>;

/// A program's `preload` and `worker`, as the master runs them.
pub struct InProcess {
    preload: Option<Box<dyn FnOnce() -> WorkerFn>>,
    worker: Option<WorkerFn>,
}

impl InProcess {
    pub fn new<S: 'static>(
        preload: impl FnOnce() -> S + 'static,
        worker: impl Fn(&S, Context<'_>) -> i32 + 'static,
    ) -> InProcess {
        let preload = move || {
            let state = preload();
            Box::new(move |ctx: Context<'_>| worker(&state, ctx)) as WorkerFn
        };
        InProcess { preload: Some(Box::new(preload)), worker: None }
    }

    /// Runs `preload` (once: later calls do nothing).
    pub(crate) fn preload(&mut self) {
        if let Some(preload) = self.preload.take() {
            self.worker = Some(preload());
        }
    }

    /// The worker function, once `preload` has run.
    pub(crate) fn worker(&self) -> Option<&WorkerFn> {
        self.worker.as_ref()
    }
}

/// What a worker is told: its slot and generation, the listeners, a way to notify the master.
/// Its environment also holds the variables of an exec'd worker (`PRESUP_WORKER_ID`,
/// `PRESUP_TICKET_<NAME>`, `NOTIFY_SOCKET`...), except `LISTEN_*`: the listeners stay at the
/// master's fd numbers and are reached by name here.
pub struct Context<'a> {
    pub(crate) slot: usize,
    pub(crate) count: usize,
    pub(crate) generation: u64,
    pub(crate) listeners: Vec<(String, BorrowedFd<'a>)>,
}

impl Context<'_> {
    /// The slot, `0..count`.
    pub fn slot(&self) -> usize {
        self.slot
    }
    pub fn count(&self) -> usize {
        self.count
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Slot 0: at no instant do two live workers hold it.
    pub fn primary(&self) -> bool {
        self.slot == 0
    }

    /// The listener names, in config order.
    pub fn listener_names(&self) -> impl Iterator<Item = &str> {
        self.listeners.iter().map(|(n, _)| n.as_str())
    }

    fn listener_fd(&self, name: &str) -> io::Result<std::os::fd::OwnedFd> {
        let (_, fd) = self.listeners.iter().find(|(n, _)| n == name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no [[listen]] named {name:?}"))
        })?;
        fd.try_clone_to_owned()
    }

    /// The TCP listener `name` of the config (a new fd on the shared socket).
    pub fn tcp_listener(&self, name: &str) -> io::Result<TcpListener> {
        Ok(TcpListener::from(self.listener_fd(name)?))
    }

    /// The Unix listener `name` of the config.
    pub fn unix_listener(&self, name: &str) -> io::Result<UnixListener> {
        Ok(UnixListener::from(self.listener_fd(name)?))
    }

    /// Sends `message` (`KEY=VALUE` lines, systemd's sd_notify format) to the master.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let path = std::env::var_os("NOTIFY_SOCKET")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "NOTIFY_SOCKET is not set"))?;
        UnixDatagram::unbound()?.send_to(message.as_bytes(), path).map(drop)
    }

    /// `READY=1`: with `ready = "notify"`, the worker is up only now.
    pub fn ready(&self) -> io::Result<()> {
        self.notify("READY=1")
    }

    /// `WATCHDOG=1`: alive (with `[workers] watchdog`).
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }
}

/// When the master runs this program as the HTTP server of a ticket (`PROGRAM ticket-server
/// NAME --listen ADDR`, a singleton it adds for each `[tickets.NAME]` with `http`), serves it
/// and returns its exit code. [`main`] calls it first; a program that parses its own command
/// line must call it before parsing:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     if let Some(code) = presup::prefork::ticket_server_if_asked() {
///         return code;
///     }
///     // parse the program's own options (flattening presup::cli::Args), then prefork::run
/// #   std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn ticket_server_if_asked() -> Option<ExitCode> {
    #[derive(clap::Parser)]
    struct Server {
        #[command(flatten)]
        args: cli::Args,
        #[command(flatten)]
        server: crate::ticket::cli::ServerArgs,
    }
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).map_or(true, |a| a != "ticket-server") {
        return None;
    }
    argv.remove(1);
    Some(match <Server as clap::Parser>::try_parse_from(argv) {
        Ok(s) => s.server.run(&s.args.log_level, s.args.log_format),
        Err(e) => {
            let _ = e.print();
            ExitCode::from(2)
        }
    })
}

/// Runs the master with presup's own command line: `preload` once, then workers forked into
/// `worker`. Returns the exit code of DESIGN.md §4.
pub fn main<S: 'static>(
    preload: impl FnOnce() -> S + 'static,
    worker: impl Fn(&S, Context<'_>) -> i32 + 'static,
) -> ExitCode {
    if let Some(code) = ticket_server_if_asked() {
        return code;
    }
    let command = <cli::Args as clap::Args>::augment_args(
        clap::Command::new("presup").about("A prefork program run by presup's master"),
    );
    let args = match command.try_get_matches().and_then(|m| cli::Args::from_arg_matches(&m)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    run(&args, preload, worker)
}

/// Like [`main`], with options parsed by the program (flatten [`cli::Args`] into its parser).
pub fn run<S: 'static>(
    args: &cli::Args,
    preload: impl FnOnce() -> S + 'static,
    worker: impl Fn(&S, Context<'_>) -> i32 + 'static,
) -> ExitCode {
    cli::run(args, Some(InProcess::new(preload, worker)))
}

/// How many threads this process has (from `/proc/self/status`).
pub(crate) fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}
