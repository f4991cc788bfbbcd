//! What children leave behind, the master's side: the rest of a reaped child's process group
//! (killed now or at the end of its grace, its slot or singleton released once it is empty,
//! decided by [`super::groups`]), and at the very end the processes reparented to the master.

use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::children;
use super::groups::{self, Groups, Owner};
use super::Master;

impl Master {
    /// The leader `pgid` of a child's process group was reaped: kills what is left of the
    /// group, now or (a stop under way) at `grace`. Returns whether the group outlives it.
    ///
    /// The pid was freed by the reaping; while the group has members its number stays taken
    /// (it is their pgid), and once it is empty the kernel hands pids out cyclically, so the
    /// number cannot name another group an instant later.
    pub(super) fn group_ended(
        &mut self,
        pgid: Pid,
        owner: Owner,
        grace: Option<Instant>,
        now: Instant,
    ) -> bool {
        if killpg(pgid, None) == Err(Errno::ESRCH) {
            self.watcher.forget(pgid);
            return false;
        }
        // Listed before the kill, which soon turns them into zombies.
        let left = children::group_members(pgid);
        let pids: Vec<i32> = left.iter().map(|p| p.as_raw()).collect();
        let kill = Groups::kill_now(grace, now);
        if kill {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let who = self.owner_name(owner);
        if kill && !pids.is_empty() {
            warn!(
                pgid = pgid.as_raw(),
                ?pids,
                "{who} exited; killed what was left of its process group"
            );
        } else if !pids.is_empty() {
            info!(pgid = pgid.as_raw(), ?pids, "{who} exited; the rest of its process group gets SIGKILL at the end of its stop timeout");
        }
        self.groups.outlived(pgid, owner, grace, now);
        true
    }
    /// A draining group is empty (or given up on): its slot or singleton may start again.
    pub(super) fn release_group(&mut self, pgid: Pid, owner: Owner, why: &str) {
        self.watcher.forget(pgid);
        match owner {
            Owner::Worker { .. } => {
                self.pool.group_gone(pgid);
            }
            Owner::Singleton { .. } => {
                self.singletons.group_gone(pgid);
            }
            Owner::Hook | Owner::Stem | Owner::Other => {}
        }
        debug!(pgid = pgid.as_raw(), "the process group of a {} {why}", self.owner_name(owner));
    }
    /// A signal to a draining group, some time after its leader was reaped. The master
    /// notices a group emptied only when it reaps something, and a group can empty without
    /// that (its last member reaped by a parent that left the group). So it is checked right
    /// before the signal: found empty, it is released (and forgotten by the watcher) instead
    /// of signalled. Its number could then name another group only if the kernel, which hands
    /// pids out cyclically, went round all of them since the group emptied, or in the
    /// microseconds between the two calls. Returns whether the group had members.
    pub(super) fn signal_draining(&mut self, pgid: Pid, signal: Signal) -> bool {
        if killpg(pgid, None) == Err(Errno::ESRCH) {
            if let Some(owner) = self.groups.gone(pgid) {
                self.release_group(pgid, owner, "is empty");
            }
            return false;
        }
        let _ = killpg(pgid, signal);
        true
    }
    pub(super) fn step_groups(&mut self, now: Instant) -> bool {
        let actions = self.groups.step(now);
        let busy = !actions.is_empty();
        for action in actions {
            match action {
                groups::Action::Kill { pgid, owner } => {
                    let pids: Vec<i32> =
                        children::group_members(pgid).iter().map(|p| p.as_raw()).collect();
                    if !self.signal_draining(pgid, Signal::SIGKILL) {
                        continue;
                    }
                    let who = self.owner_name(owner);
                    warn!(pgid = pgid.as_raw(), ?pids, "killed what was left of the process group of a {who} (its stop timeout is over)");
                }
                groups::Action::GiveUp { pgid, owner } => {
                    let pids: Vec<i32> =
                        children::group_members(pgid).iter().map(|p| p.as_raw()).collect();
                    let who = self.owner_name(owner);
                    error!(pgid = pgid.as_raw(), ?pids, "the process group of a {who} still has processes {}s after SIGKILL (not ours to signal, or not our descendants); no longer waiting for it", groups::DRAIN_GIVE_UP.as_secs());
                    self.release_group(pgid, owner, "is given up on");
                }
            }
        }
        busy
    }
    /// Kills whatever is left among the master's children: processes reparented to it (the
    /// master is a subreaper) after their parent, a singleton or a worker, exited. Returns
    /// whether any child is left (killed ones until they are reaped).
    pub(super) fn kill_orphans(&mut self) -> bool {
        let mut left = children::of(std::process::id());
        // The watcher lives until the master exits.
        left.retain(|&p| Some(p) != self.watcher.pid());
        // A zombie (a spawn that failed after fork, say) only waits for the reaper.
        for &pid in left.iter().filter(|&&p| !children::is_zombie(p)) {
            if self.swept.insert(pid) {
                warn!(pid = pid.as_raw(), "killing a leftover process reparented to the master");
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        !left.is_empty()
    }
}
