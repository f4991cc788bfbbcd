//! The ticket's subcommands: `presup ticket NAME --shard N [--timeout D]`, for scripts and
//! any language, and the hidden `presup ticket-server NAME --listen ADDR` that the master runs
//! as the singleton `ticket:NAME`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use super::{server, Ticket};
use crate::exit::Exit;
use crate::logs::{self, Format, Sink};

/// `presup ticket`: waits for a turn of ticket NAME.
#[derive(Debug, Clone, clap::Args)]
pub struct TicketArgs {
    /// The ticket's name, as in `[tickets.NAME]` (found through PRESUP_TICKET_<NAME>).
    pub name: String,
    /// The shard that wants a turn: its bucket is `shard % buckets`.
    #[arg(long, default_value_t = 0)]
    pub shard: u64,
    /// Give up (exit 1, nothing reserved) if the turn would come later than this ("30s").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

impl TicketArgs {
    /// Blocks until granted: exit 0; 1 if the turn would come after `--timeout`; 2 if there is
    /// no such ticket.
    pub fn run(&self) -> ExitCode {
        let ticket = match Ticket::from_env(&self.name) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("presup: {e}");
                return Exit::Usage.into();
            }
        };
        match self.timeout {
            None => {
                ticket.acquire(self.shard);
                Exit::Clean.into()
            }
            Some(timeout) => match ticket.acquire_timeout(self.shard, timeout) {
                Ok(_) => Exit::Clean.into(),
                Err(e) => {
                    let (name, shard) = (&self.name, self.shard);
                    let wait = humantime::format_duration(Duration::from_millis(
                        e.wait().as_millis() as u64,
                    ));
                    let timeout = humantime::format_duration(timeout);
                    eprintln!("presup: ticket {name}, shard {shard}: the turn would come in {wait}, after the timeout of {timeout}");
                    Exit::Failed.into()
                }
            },
        }
    }
}

/// `presup ticket-server`: ticket NAME over HTTP (run by the master).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    pub name: String,
    /// Where to listen, "127.0.0.1:5000" (port 0: any free port, logged).
    #[arg(long)]
    pub listen: SocketAddr,
    /// How long a new connection may take to send its request, and any request to arrive
    /// from its first byte (for tests: the master never sets it).
    #[arg(long, hide = true, value_parser = humantime::parse_duration, default_value = "10s")]
    pub request_timeout: Duration,
}

impl ServerArgs {
    pub fn run(&self, log_level: &str, log_format: Format) -> ExitCode {
        if let Err(e) = logs::init(log_level, log_format, Sink::stderr()) {
            eprintln!("presup: {e}");
            return Exit::Usage.into();
        }
        match server::run(&self.name, self.listen, self.request_timeout) {
            Ok(()) => Exit::Clean.into(),
            Err(e) => {
                tracing::error!("{e}");
                Exit::Failed.into()
            }
        }
    }
}
