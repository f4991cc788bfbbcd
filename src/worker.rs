//! The worker side of preload: what a program built on presup as a library hands the master
//! ([`InProcess`]: its `preload` and `worker` functions) and what a forked worker is given
//! ([`Context`], [`Notifier`]) and returns ([`WorkerExit`]).
//!
//! It sits below the master, which forks into a [`WorkerFn`]; `presup::prefork` re-exports it
//! beside the entry points that run the master from the command line.

#![allow(unsafe_code)] // One block: borrowing a listener's fd, open for the worker's life.

use std::io;
use std::net::TcpListener;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::process::ExitCode;

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
