//! [`Stage`]: where the master is in its life. On the way in, the `on_starting` hooks, the
//! singletons in file order, the workers, then running; on the way out, the workers, the
//! singletons in reverse order, the `on_exit` hooks (on every way out once the master reached
//! `on_starting`), then the sweep of the children reparented to the master.

/// Where the master is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    OnStarting,
    Singletons,
    Workers,
    Running,
    StoppingWorkers,
    StoppingSingletons,
    OnExit,
    /// Killing what was reparented to the master; done when no child is left.
    Sweep,
    Done,
}

impl Stage {
    pub(super) fn runs_singletons(self) -> bool {
        matches!(
            self,
            Stage::Singletons
                | Stage::Workers
                | Stage::Running
                | Stage::StoppingWorkers
                | Stage::StoppingSingletons
        )
    }

    pub(super) fn runs_workers(self) -> bool {
        matches!(self, Stage::Workers | Stage::Running | Stage::StoppingWorkers)
    }

    pub(super) fn stopping(self) -> bool {
        matches!(
            self,
            Stage::StoppingWorkers
                | Stage::StoppingSingletons
                | Stage::OnExit
                | Stage::Sweep
                | Stage::Done
        )
    }
}
