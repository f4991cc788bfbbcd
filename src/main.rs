//! The `presup` command: the master (`presup -c FILE`) and its subcommands (`check`,
//! `ticket`, and the control socket's `status`, `reload`, `stop`, `scale`, `restart`). The options and
//! what running the master means live in [`presup::cli`], shared with programs built on
//! [`presup::prefork`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use presup::cli;
use presup::exit::Exit;

/// A prefork process supervisor: one master, N workers sharing the listeners.
#[derive(Debug, Parser)]
#[command(name = "presup", version, about)]
struct Cli {
    #[command(flatten)]
    args: cli::Args,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the config and print it resolved (exit 0), or print every error (exit 2).
    Check,
    /// Wait for a turn of ticket NAME (exit 0 once granted, 1 past --timeout), in a child of
    /// presup, which finds it through PRESUP_TICKET_<NAME>.
    Ticket(presup::ticket::cli::TicketArgs),
    /// The control socket's commands: status, reload, stop, scale, restart.
    #[command(flatten)]
    Control(presup::client::Command),
    /// The HTTP server of a ticket, run by the master (gateway-queue's protocol).
    #[command(hide = true)]
    TicketServer(presup::ticket::cli::ServerArgs),
    /// Prometheus' /metrics of the master on a control socket, run by the master.
    #[command(hide = true)]
    MetricsServer(presup::metrics::ServerArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let exit = if e.use_stderr() { Exit::Usage } else { Exit::Clean };
            return exit.into();
        }
    };
    match cli.command {
        Some(Command::Check) => cli::check(&cli.args),
        Some(Command::Ticket(t)) => t.run(),
        Some(Command::Control(c)) => presup::client::run(&cli.args.config, c),
        Some(Command::TicketServer(s)) => s.run(&cli.args.log_level, cli.args.log_format),
        Some(Command::MetricsServer(m)) => m.run(&cli.args.log_level, cli.args.log_format),
        None => cli::run(&cli.args, None),
    }
}
