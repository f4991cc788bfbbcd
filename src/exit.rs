//! [`Exit`], the one table of the exit codes of `presup`, its subcommands and every program
//! built on [`crate::prefork`]. Only `main` (and the entry points it returns from) ends the
//! process; everything below returns one of these.

/// The exit codes of `presup`, `presup check` and every program built on
/// [`crate::prefork`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A clean stop; `presup check` of a valid config; `--help`.
    Clean = 0,
    /// The master failed while running; `presup check` could not print; `presup ticket`'s
    /// turn would come after its `--timeout`; a ticket server failed.
    Failed = 1,
    /// A usage error, an invalid config, a log that cannot start, no such ticket.
    Usage = 2,
    /// The master could not start (a bind, the pidfile, a boot failure, a failed
    /// `on_starting` hook, a singleton that could not start).
    Startup = 3,
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> std::process::ExitCode {
        std::process::ExitCode::from(exit as u8)
    }
}
