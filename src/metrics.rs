//! The metrics server: Prometheus' `/metrics` for a master, run by the master as a singleton
//! (`presup metrics-server --listen ADDR --control PATH`) when the config has `[metrics] http`.
//!
//! Each scrape asks the master for its STATUS on the control socket (protocol v1, `status`,
//! within [`CONTROL_TIMEOUT`]), reads the memory of the pids it names and the master's own
//! `process_*` figures in `/proc` itself (the master never reads `/proc` for it), and renders
//! it all in the text exposition format 0.0.4 ([`exposition`]). A master that does not answer
//! makes a `503` whose body still says `presup_up 0`.
//!
//! What a client may hold is bounded: one request per connection (answered `connection:
//! close`), its head at most 8 KiB and complete within 10 s, at most [`MAX_CONNECTIONS`] at once
//! (one thread each; more are answered `503` at once). TERM or INT ends the server (exit 0):
//! they are read from a `signalfd` polled with the listener, never handled in signal context.

mod exposition;
mod http;
mod procfs;
mod status;

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tracing::{debug, info, warn};

use crate::exit::Exit;
use crate::logs::{self, Format, Sink};

pub use exposition::CONTENT_TYPE;

/// How long a scrape waits for the master's STATUS.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection's request head must be complete within this of its accept.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

/// `presup metrics-server`: `/metrics` of the master on the control socket PATH.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Where to listen, "127.0.0.1:9100" (port 0: any free port, logged).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The master's control socket.
    #[arg(long)]
    pub control: PathBuf,
}

impl ServerArgs {
    pub fn run(&self, log_level: &str, log_format: Format) -> ExitCode {
        if let Err(e) = logs::init(log_level, log_format, Sink::stderr()) {
            logs::report(format_args!("presup: {e}"));
            return Exit::Usage.into();
        }
        let server = Server::new(self.control.clone(), CONTROL_TIMEOUT, REQUEST_TIMEOUT);
        match server.run(self.listen) {
            Ok(()) => Exit::Clean.into(),
            Err(e) => {
                tracing::error!("{e}");
                Exit::Failed.into()
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot read the listener's address: {0}")]
    Address(#[source] io::Error),
    #[error("cannot read signals: {0}")]
    Signals(#[source] nix::Error),
    #[error("cannot wait for connections: {0}")]
    Poll(#[source] nix::Error),
}

/// The server's settings and what its connection threads share.
pub struct Server {
    control: PathBuf,
    control_timeout: Duration,
    request_timeout: Duration,
    /// Connections being served.
    active: AtomicUsize,
    /// Whether the last scrape found the master down (so that only the first failure warns).
    down: AtomicBool,
}

impl Server {
    pub fn new(
        control: PathBuf,
        control_timeout: Duration,
        request_timeout: Duration,
    ) -> Arc<Server> {
        Arc::new(Server {
            control,
            control_timeout,
            request_timeout,
            active: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        })
    }

    /// Binds `addr` and serves on it ([`Server::run_on`]).
    pub fn run(self: Arc<Self>, addr: SocketAddr) -> Result<(), MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        self.run_on(listener)
    }

    /// Says READY=1 and serves on `listener` until TERM or INT. The signals are blocked in the
    /// calling thread, and the connection threads it starts inherit that: in the binary, call
    /// it before any other thread exists.
    pub fn run_on(self: Arc<Self>, listener: TcpListener) -> Result<(), MetricsError> {
        let mut signals = stop_signals().map_err(MetricsError::Signals)?;
        let bound = listener.local_addr().map_err(MetricsError::Address)?;
        let _ = listener.set_nonblocking(true);
        info!(address = %bound, control = %self.control.display(), "metrics server listening");
        crate::notify::tell(&format!("READY=1\nSTATUS=metrics on http://{bound}/metrics"));
        loop {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(MetricsError::Poll(e)),
            }
            let signalled = fds[1].revents().is_some_and(|r| !r.is_empty());
            if signalled && stop_asked(&mut signals) {
                info!("metrics server stopping");
                return Ok(());
            }
            while let Ok((stream, _)) = listener.accept() {
                Arc::clone(&self).admit(stream);
            }
        }
    }

    /// Serves `stream` on a thread of its own, or answers 503 if every connection is taken.
    fn admit(self: Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nonblocking(false);
        if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_nonblocking(true);
            let _ = http::respond(&stream, 503, "text/plain", "too many connections\n", false);
            debug!("connection refused: every connection is busy");
            return;
        }
        let server = Arc::clone(&self);
        let spawned = std::thread::Builder::new()
            .name("metrics-connection".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                server.serve(&stream);
                server.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start a connection thread: {e}");
        }
    }

    /// Answers the one request of `stream`.
    pub fn serve(&self, stream: &TcpStream) {
        let _ = stream.set_write_timeout(Some(self.request_timeout));
        let Some(request) = http::read_request(stream, self.request_timeout) else { return };
        let (code, body) = match request {
            http::Request::Scrape { head_only } => {
                let (code, body) = self.scrape();
                let _ = http::respond(stream, code, CONTENT_TYPE, &body, head_only);
                return;
            }
            http::Request::NotFound => (404, "not found: metrics are at /metrics\n".to_owned()),
            http::Request::MethodNotAllowed => (405, "method not allowed\n".to_owned()),
            http::Request::Malformed(why) => (400, format!("{why}\n")),
        };
        if http::respond(stream, code, "text/plain", &body, false).is_ok() {
            http::drain(stream);
        }
    }

    /// The status code and body of a scrape now.
    pub fn scrape(&self) -> (u16, String) {
        match status::fetch(&self.control, self.control_timeout) {
            Ok(status) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    info!("the master answers again on its control socket");
                }
                (200, render(&status))
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::SeqCst) {
                    warn!("scrape: {e}");
                } else {
                    debug!("scrape: {e}");
                }
                (503, exposition::render_down(&e.to_string()))
            }
        }
    }
}

/// The exposition of `status`, with the memory of the pids it names and the master's process
/// figures read now.
fn render(status: &status::Status) -> String {
    let pids = status.workers.iter().map(|w| w.pid);
    let pids = pids.chain(status.singletons.iter().filter_map(|s| s.pid));
    let pids = pids.chain(status.stems.iter().map(|s| s.pid));
    let memory: BTreeMap<i32, procfs::Memory> =
        pids.filter(|&p| p > 0).filter_map(|p| Some((p, procfs::Memory::read(p)?))).collect();
    let master =
        (status.master.pid > 0).then(|| procfs::Process::read(status.master.pid)).flatten();
    exposition::render(&exposition::Scrape { status, memory: &memory, master })
}

/// Blocks TERM and INT (and HUP and USR1, which the master may forward and which mean nothing
/// here) in this thread and returns the `signalfd` that receives them.
fn stop_signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1] {
        mask.add(s);
    }
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// Drains `signals`; whether TERM or INT was among them.
fn stop_asked(signals: &mut SignalFd) -> bool {
    let mut stop = false;
    while let Ok(Some(info)) = signals.read_signal() {
        let n = info.ssi_signo as i32;
        stop |= n == Signal::SIGTERM as i32 || n == Signal::SIGINT as i32;
    }
    stop
}

#[cfg(test)]
mod tests;
