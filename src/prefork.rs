//! Copy-on-write preload: presup as a library.
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
//! handlers runs in it (a panic ends it with code 101, after its message, with `panic = "abort"`
//! too: see the README). A worker
//! that dies is forked again from the master's preloaded state; `preload` never runs twice, and
//! a reload (HUP) does not rebuild it: restart the master for new code or data.

use std::process::ExitCode;

use clap::FromArgMatches;

use crate::cli;
pub use crate::worker::{program_name, Context, InProcess, Notifier, WorkerExit, WorkerFn};

/// When the master runs this program as one of its own servers, serves it and returns its exit
/// code: the HTTP server of a ticket (`PROGRAM ticket-server NAME --listen ADDR`, a singleton it
/// adds for each `[tickets.NAME]` with `http`) or the metrics server (`PROGRAM metrics-server
/// --listen ADDR --control PATH`, with `[metrics]`). [`main`] calls it first; a program that
/// parses its own command line must call it before parsing:
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
    struct TicketServer {
        #[command(flatten)]
        args: cli::Args,
        #[command(flatten)]
        server: crate::ticket::cli::ServerArgs,
    }
    #[derive(clap::Parser)]
    struct MetricsServer {
        #[command(flatten)]
        args: cli::Args,
        #[command(flatten)]
        server: crate::metrics::ServerArgs,
    }
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let which = argv.get(1).and_then(|a| a.to_str()).map(str::to_owned);
    let parsed = match which.as_deref() {
        Some("ticket-server") => {
            argv.remove(1);
            <TicketServer as clap::Parser>::try_parse_from(argv)
                .map(|s| s.server.run(&s.args.log_level, s.args.log_format))
        }
        Some("metrics-server") => {
            argv.remove(1);
            <MetricsServer as clap::Parser>::try_parse_from(argv)
                .map(|s| s.server.run(&s.args.log_level, s.args.log_format))
        }
        _ => return None,
    };
    Some(parsed.unwrap_or_else(|e| {
        let _ = e.print();
        crate::exit::Exit::Usage.into()
    }))
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
