//! The `presup` command: parses the command line, loads the config, runs the master, and maps
//! every outcome to the exit codes of DESIGN.md §4 (0 clean stop, 1 the master failed while
//! running, 2 usage or config error, 3 startup failed). Errors are printed once, here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use presup::config;
use presup::logs::{self, Format, Sink};
use presup::master;

/// A prefork process supervisor: one master, N workers sharing the listeners.
#[derive(Debug, Parser)]
#[command(name = "presup", version, about)]
struct Cli {
    /// The config file.
    #[arg(short = 'c', long = "config", global = true, default_value = "supervisor.toml")]
    config: PathBuf,
    /// Log filter: error, warn, info, debug, trace (or a tracing filter like `presup=debug`).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: Format,
    /// Append the log to this file instead of stderr (USR1 reopens it).
    #[arg(long, global = true)]
    log_file: Option<PathBuf>,
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
    /// The HTTP server of a ticket, run by the master (gateway-queue's protocol).
    #[command(hide = true)]
    TicketServer(presup::ticket::cli::ServerArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match &cli.command {
        Some(Command::Ticket(t)) => return t.run(),
        Some(Command::TicketServer(s)) => return s.run(&cli.log_level, cli.log_format),
        _ => {}
    }
    let wc = std::env::var("WEB_CONCURRENCY").ok();
    let config = match config::load(&cli.config, wc.as_deref(), config::cpu_count()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("presup: {errors}");
            return ExitCode::from(2);
        }
    };
    if config.workers.count > 0 && config.workers.command.is_empty() {
        eprintln!("presup: {}: workers.command: missing required key", config.path.display());
        return ExitCode::from(2);
    }
    if let Some(Command::Check) = cli.command {
        return check(&config);
    }
    let sink = match &cli.log_file {
        None => Sink::stderr(),
        Some(path) => match Sink::file(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("presup: --log-file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    if let Err(e) = logs::init(&cli.log_level, cli.log_format, sink.clone()) {
        eprintln!("presup: {e}");
        return ExitCode::from(2);
    }
    let options = master::Options { config_path: config.path.clone(), log_sink: sink };
    match master::run(config, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("presup: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn check(config: &config::Config) -> ExitCode {
    match toml::to_string_pretty(config) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("presup: cannot print the resolved config: {e}");
            ExitCode::from(1)
        }
    }
}
