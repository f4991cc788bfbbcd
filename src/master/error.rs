//! [`MasterError`]: why the master could not start or failed while running, with its cause,
//! and the exit code ([`Exit`]) each means.

use super::report::times;
use crate::exit::Exit;
use crate::listener::BindError;
use crate::master::stop::ExitStatus;
use crate::pidfile::PidfileError;

/// Why the master could not start (exit 3) or failed while running (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("worker command `{command}` failed to boot {} in a row in slot {slot}; last: {last}", times(*attempts))]
    Boot { command: String, slot: usize, attempts: u32, last: ExitStatus },
    #[error("on_starting hook `{command}` failed: {status}")]
    Hook { command: String, status: String },
    #[error("the stem `{command}` could not start: {why}")]
    Stem { command: String, why: String },
    #[error("singleton {name} could not start: {why}")]
    Singleton { name: String, why: String },
    #[error("cannot set up the master: {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("preload left {0} threads running; the master refuses to fork: fork() copies only the calling thread, so a lock another thread holds stays locked forever in the workers. Join the threads before preload returns, or start them in the worker function")]
    Threads(usize),
    #[error("the program runs {0} threads before preload; the master refuses to fork: fork() copies only the calling thread, so a lock another thread holds stays locked forever in the workers. The usual cause is an async runtime started before presup: a #[tokio::main] around presup::prefork::main, or a runtime built at startup. Call presup::prefork::main from a plain fn main, and build the runtime in the worker function")]
    ThreadsBeforePreload(usize),
    #[error("the master failed: {what}: {source}")]
    Runtime {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
}

impl MasterError {
    /// What the program exits with.
    pub fn exit(&self) -> Exit {
        match self {
            MasterError::Runtime { .. } => Exit::Failed,
            _ => Exit::Startup,
        }
    }

    /// A [`MasterError::Setup`] of `what`, keeping its cause.
    pub(super) fn setup<E>(what: &'static str) -> impl FnOnce(E) -> MasterError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        move |e| MasterError::Setup { what, source: Box::new(e) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_failure_counts_its_attempts_in_words() {
        let boot = |attempts| MasterError::Boot {
            command: "./app".into(),
            slot: 0,
            attempts,
            last: ExitStatus::Code(1),
        };
        assert!(boot(1).to_string().contains("failed to boot once in a row"), "{}", boot(1));
        assert!(boot(2).to_string().contains("failed to boot twice in a row"), "{}", boot(2));
        assert!(boot(5).to_string().contains("failed to boot 5 times in a row"), "{}", boot(5));
    }
}
