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
//!         |table: &'static Vec<u64>, ctx: presup::prefork::Context| -> std::io::Result<()> {
//!             let listener = ctx.tcp_listener("http")?;
//!             ctx.ready()?;
//!             for conn in listener.incoming() {
//!                 let mut conn = conn?;
//!                 let _ = conn.read(&mut [0u8; 1024]);
//!                 let body = table[7].to_string();
//!                 let _ = write!(conn, "HTTP/1.0 200 OK\r\n\r\n{body}");
//!             }
//!             Ok(())                                     // exit code 0; an Err prints, exits 1
//!         },
//!     )
//! }
//! ```
//!
//! The state and the [`Context`] live as long as the worker (it never frees them: it ends with
//! `_exit`), so the worker gets `&'static S` and a `'static`, `Clone + Send + Sync` context:
//! both go into axum's `State` or a `tokio::spawn`ed task as they are, without an `Arc`.
//!
//! Fork safety: `fork` copies only the calling thread, so a lock held by another thread at that
//! instant stays locked forever in the child. The master therefore refuses to fork (exit 3)
//! when `preload` leaves more than one thread running, and before `preload` when the program
//! already runs more than one (a `#[tokio::main]` around [`main`]). The master installs no
//! signal handler (it reads a `signalfd`), so the worker starts with default dispositions and
//! an empty mask, and a signal library there (`tokio::signal`, signal-hook) works as in any
//! process; the master's own fds (signalfd, notification socket and its directory's lock,
//! pidfile, watcher pipe, `cgroup.procs`, the tickets' locks) are closed before `worker`
//! runs. The worker ends with `_exit`, so none of the master's destructors or exit
//! handlers runs in it (a panic ends it with code 101). A worker
//! that dies is forked again from the master's preloaded state; `preload` never runs twice, and
//! a reload (HUP) does not rebuild it: restart the master for new code or data.

#![allow(unsafe_code)] // One block: borrowing a listener's fd, open for the worker's life.

use std::io;
use std::net::TcpListener;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::process::ExitCode;

use clap::FromArgMatches;

use crate::cli;

/// The worker function with the preloaded state inside: what the master forks into. It
/// returns the worker's exit code.
pub type WorkerFn = Box<dyn Fn(Context) -> i32>;

/// What a worker function may return: its exit code. `i32`, `u8`, `()` (0),
/// [`std::process::ExitCode`], or a `Result` of one of them whose error is printed to stderr
/// (exit code 1), so that `?` works in the worker.
pub trait WorkerExit {
    fn exit_code(self) -> i32;
}

impl WorkerExit for i32 {
    fn exit_code(self) -> i32 {
        self
    }
}

impl WorkerExit for u8 {
    fn exit_code(self) -> i32 {
        self.into()
    }
}

impl WorkerExit for () {
    fn exit_code(self) -> i32 {
        0
    }
}

impl WorkerExit for ExitCode {
    fn exit_code(self) -> i32 {
        // ExitCode hides its value but compares: it is one of the 256 codes a process has.
        (0..=u8::MAX).find(|&n| ExitCode::from(n) == self).map_or(1, i32::from)
    }
}

impl<T: WorkerExit, E: std::fmt::Display> WorkerExit for Result<T, E> {
    fn exit_code(self) -> i32 {
        match self {
            Ok(t) => t.exit_code(),
            Err(e) => {
                eprintln!("{}: worker {}: {e}", program_name(), std::process::id());
                1
            }
        }
    }
}

/// The program's name (its `argv[0]`'s file name), for messages.
pub fn program_name() -> String {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0).file_name().unwrap_or(argv0.as_os_str());
    name.to_string_lossy().into_owned()
}

/// A program's `preload` and `worker`, as the master runs them.
pub struct InProcess {
    preload: Option<Box<dyn FnOnce() -> WorkerFn>>,
    worker: Option<WorkerFn>,
}

impl InProcess {
    pub fn new<S: 'static, R: WorkerExit>(
        preload: impl FnOnce() -> S + 'static,
        worker: impl Fn(&'static S, Context) -> R + 'static,
    ) -> InProcess {
        let preload = move || {
            // The state lives as long as the master, and every worker forked from it.
            let state: &'static S = Box::leak(Box::new(preload()));
            Box::new(move |ctx: Context| worker(state, ctx).exit_code()) as WorkerFn
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
///
/// It is `'static`, `Clone`, `Send` and `Sync`: the worker never closes the listeners' fds, so
/// a clone may go anywhere in the worker (a tokio task, axum's `State`).
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) slot: usize,
    pub(crate) count: usize,
    pub(crate) generation: u64,
    pub(crate) listeners: Vec<(String, RawFd)>,
}

impl Context {
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

    fn listener_fd(&self, name: &str) -> io::Result<OwnedFd> {
        let (_, fd) = self.listeners.iter().find(|(n, _)| n == name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no [[listen]] named {name:?}"))
        })?;
        // SAFETY: `fd` is one of the master's listeners, open in the worker for its whole
        // life: the worker holds the master's copy of them until it ends with `_exit`, and
        // nothing in presup closes them there.
        let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
        fd.try_clone_to_owned()
    }

    /// The TCP listener `name` of the config: a new fd on the socket every worker shares.
    ///
    /// The socket's file status flags (`O_NONBLOCK`) belong to the socket, not to the fd, so
    /// they are shared by every worker and by the next generation after a reload: a worker
    /// that makes it non-blocking makes it non-blocking for all. Use [`Self::tcp_listener`]
    /// for a blocking accept loop and [`Self::async_tcp_listener`] for an async runtime, the
    /// same in every generation of a config.
    pub fn tcp_listener(&self, name: &str) -> io::Result<TcpListener> {
        Ok(TcpListener::from(self.listener_fd(name)?))
    }

    /// The TCP listener `name`, made non-blocking, as async runtimes want it:
    /// `tokio::net::TcpListener::from_std(ctx.async_tcp_listener("http")?)?` (the flag is the
    /// shared socket's, see [`Self::tcp_listener`]).
    pub fn async_tcp_listener(&self, name: &str) -> io::Result<TcpListener> {
        let l = self.tcp_listener(name)?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// The Unix listener `name` of the config (shared flags, as [`Self::tcp_listener`]).
    pub fn unix_listener(&self, name: &str) -> io::Result<UnixListener> {
        Ok(UnixListener::from(self.listener_fd(name)?))
    }

    /// The Unix listener `name`, made non-blocking (`tokio::net::UnixListener::from_std`).
    pub fn async_unix_listener(&self, name: &str) -> io::Result<UnixListener> {
        let l = self.unix_listener(name)?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// A handle for `READY=1`, `WATCHDOG=1` and `STATUS=` that any thread or task may keep.
    pub fn notifier(&self) -> Notifier {
        Notifier { _private: () }
    }

    /// Sends `message` (`KEY=VALUE` lines, systemd's sd_notify format) to the master.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        self.notifier().notify(message)
    }

    /// `READY=1`: with `ready = "notify"`, the worker is up only now.
    pub fn ready(&self) -> io::Result<()> {
        self.notifier().ready()
    }

    /// `WATCHDOG=1`: alive (with `[workers] watchdog`).
    pub fn watchdog(&self) -> io::Result<()> {
        self.notifier().watchdog()
    }
}

/// Sends the worker's notifications to the master's `NOTIFY_SOCKET` (`Clone + Send + Sync`).
#[derive(Debug, Clone)]
pub struct Notifier {
    _private: (),
}

impl Notifier {
    /// Sends `message` (`KEY=VALUE` lines, systemd's sd_notify format) to the master.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let path = std::env::var_os("NOTIFY_SOCKET")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "NOTIFY_SOCKET is not set"))?;
        UnixDatagram::unbound()?.send_to(message.as_bytes(), path).map(drop)
    }

    /// `READY=1`.
    pub fn ready(&self) -> io::Result<()> {
        self.notify("READY=1")
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `STATUS=text`: shown in the master's log.
    pub fn status(&self, text: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={text}"))
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
            crate::exit::Exit::Usage.into()
        }
    })
}

/// Runs the master with presup's own command line: `preload` once, then workers forked into
/// `worker`. Returns the exit code of the master (0 a clean stop, 1 failed while running, 2 a
/// usage or config error, 3 startup failed).
pub fn main<S: 'static, R: WorkerExit>(
    preload: impl FnOnce() -> S + 'static,
    worker: impl Fn(&'static S, Context) -> R + 'static,
) -> ExitCode {
    main_with::<NoOptions, S, R>(move |_| preload(), worker)
}

/// Like [`main`], with options of the program's own beside presup's (`-c`, `--log-level`...):
/// `A` is a `#[derive(clap::Args)]` struct, parsed from the same command line and handed to
/// `preload`.
///
/// ```no_run
/// #[derive(clap::Args)]
/// struct Options {
///     /// The table's size in megabytes.
///     #[arg(long, default_value_t = 64)]
///     mb: usize,
/// }
///
/// fn main() -> std::process::ExitCode {
///     presup::prefork::main_with(
///         |o: &Options| vec![0u8; o.mb << 20],
///         |table: &'static Vec<u8>, ctx: presup::prefork::Context| -> std::io::Result<()> {
///             let _listener = ctx.tcp_listener("http")?;
///             ctx.ready()?;
///             Ok(())
///         },
///     )
/// }
/// ```
pub fn main_with<A, S, R>(
    preload: impl FnOnce(&A) -> S + 'static,
    worker: impl Fn(&'static S, Context) -> R + 'static,
) -> ExitCode
where
    A: clap::Args + FromArgMatches + 'static,
    S: 'static,
    R: WorkerExit,
{
    if let Some(code) = ticket_server_if_asked() {
        return code;
    }
    // Once per process: the name lives as long as it.
    let name: &'static str = Box::leak(program_name().into_boxed_str());
    let command = clap::Command::new(name).about("A prefork program run by presup's master");
    let command = A::augment_args(<cli::Args as clap::Args>::augment_args(command));
    let parsed = command.try_get_matches().and_then(|m| {
        let presup = cli::Args::from_arg_matches(&m)?;
        Ok((presup, A::from_arg_matches(&m)?))
    });
    let (args, own) = match parsed {
        Ok(both) => both,
        Err(e) => {
            let _ = e.print();
            let exit =
                if e.use_stderr() { crate::exit::Exit::Usage } else { crate::exit::Exit::Clean };
            return exit.into();
        }
    };
    run(&args, move || preload(&own), worker)
}

/// No options of the program's own.
#[derive(clap::Args)]
struct NoOptions {}

/// Like [`main`], with options parsed by the program (flatten [`cli::Args`] into its parser,
/// and call [`ticket_server_if_asked`] before parsing).
pub fn run<S: 'static, R: WorkerExit>(
    args: &cli::Args,
    preload: impl FnOnce() -> S + 'static,
    worker: impl Fn(&'static S, Context) -> R + 'static,
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
