//! The command line the `presup` binary and every program built on [`crate::prefork`] share:
//! `-c FILE`, `--log-level`, `--log-format`, `--log-file`, and what running the master means
//! (load the config, start the log, run, map the outcome to an exit code of [`Exit`]: 0 a clean
//! stop, 1 the master failed while running, 2 usage or config error, 3 startup failed).
//! Errors before the log starts are printed here; the master logs its own, once.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config;
use crate::logs::{self, Format, Sink};
use crate::master::{self, Exit, InProcess};

/// The options every presup program takes; `#[command(flatten)]` them into a program's own
/// `clap` parser to add options of its own.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The config file.
    #[arg(short = 'c', long = "config", global = true, default_value = "supervisor.toml")]
    pub config: PathBuf,
    /// Log filter: error, warn, info, debug, trace (or a tracing filter like `presup=debug`).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: Format,
    /// Append the log to this file instead of stderr (USR1 reopens it).
    #[arg(long, global = true)]
    pub log_file: Option<PathBuf>,
}

/// Loads the config named by `args`: every error printed, `Err` holding exit code 2.
/// `in_process` says whether workers are forked from this program (no `[workers] command`).
pub fn load(args: &Args, in_process: bool) -> Result<config::Config, ExitCode> {
    let launch = if in_process { config::Launch::Preload } else { config::Launch::Exec };
    match config::load_for_this_process(&args.config, launch) {
        Ok(c) => Ok(c),
        Err(errors) => {
            logs::report(format_args!("presup: {errors}"));
            Err(Exit::Usage.into())
        }
    }
}

/// `presup check`: validates the config and prints it resolved (exit 0), or every error (2).
pub fn check(args: &Args) -> ExitCode {
    let config = match load(args, false) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match toml::to_string_pretty(&config) {
        Ok(mut text) => {
            if config.workers.preload {
                text.insert_str(0, &preload_note(&config));
            }
            // A stdout that cannot be written (`presup check | head -1`) is not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            Exit::Clean.into()
        }
        Err(e) => {
            logs::report(format_args!("presup: cannot print the resolved config: {e}"));
            Exit::Failed.into()
        }
    }
}

/// What `preload = true` means for this config, as TOML comments above the resolved config.
fn preload_note(config: &config::Config) -> String {
    let command = config.workers.command.join(" ");
    let n = config.workers.count;
    format!(
        "# preload = true: `{command}` runs once, as the stem: it loads the app, then calls\n\
         # presup.stem() (the `presup` Python package), and each of the {n} workers is forked\n\
         # from it, sharing the loaded app copy-on-write. A worker that dies is forked again in\n\
         # milliseconds; HUP starts a new stem with the new code and replaces the workers from\n\
         # it (undone if the new stem fails to load). Threads must start after stem() returns.\n"
    )
}

/// Runs the master in the foreground until it stops; workers are exec'd from `[workers]
/// command`, or forked from this program when `in_process` is given.
pub fn run(args: &Args, in_process: Option<InProcess>) -> ExitCode {
    let config = match load(args, in_process.is_some()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let sink = match &args.log_file {
        None => Sink::stderr(),
        Some(path) => match Sink::file(path) {
            Ok(s) => s,
            Err(e) => {
                logs::report(format_args!("presup: --log-file {}: {e}", path.display()));
                return Exit::Usage.into();
            }
        },
    };
    if let Err(e) = logs::init(&args.log_level, args.log_format, sink.clone()) {
        logs::report(format_args!("presup: {e}"));
        return Exit::Usage.into();
    }
    let options = master::Options { config_path: config.path.clone(), log_sink: sink, in_process };
    match master::run(config, options) {
        Ok(()) => Exit::Clean.into(),
        Err(e) => {
            // The master logged it; with the log in a file, the terminal hears it too.
            if args.log_file.is_some() {
                logs::report(format_args!("presup: {e}"));
            }
            e.exit().into()
        }
    }
}
