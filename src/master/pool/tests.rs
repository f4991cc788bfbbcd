//! The pool's decisions, stepped with made-up instants.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn policy() -> Policy {
    Policy {
        notify: false,
        min_uptime: ms(1000),
        boot_timeout: ms(30_000),
        stop_signal: Signal::SIGTERM,
        graceful_timeout: ms(30_000),
        backoff: config::Backoff { initial: ms(100), max: ms(30_000), reset: ms(10_000) },
        boot_attempts: 5,
        reload_batch: 1,
        watchdog: None,
    }
}

/// A pool and a pid counter, with helpers that play the master's part.
struct Sim {
    pool: Pool,
    next_pid: i32,
    t0: Instant,
}

impl Sim {
    fn new(n: usize, policy: Policy) -> Sim {
        Sim { pool: Pool::new(n, policy), next_pid: 100, t0: Instant::now() }
    }

    fn at(&self, ms_: u64) -> Instant {
        self.t0 + ms(ms_)
    }

    /// Steps at `t` and performs every spawn; returns the actions and the new pids by slot.
    fn step(&mut self, t: u64) -> (Vec<Action>, Vec<(usize, Pid)>) {
        let now = self.at(t);
        let actions = self.pool.step(now);
        let mut spawned = Vec::new();
        for a in &actions {
            if let Action::Spawn { slot, generation } = *a {
                let pid = Pid::from_raw(self.next_pid);
                self.next_pid += 1;
                self.pool.spawned(slot, generation, pid, now);
                spawned.push((slot, pid));
            }
        }
        (actions, spawned)
    }

    fn pid_in(&self, slot: usize, generation: u64) -> Pid {
        self.pool
            .workers()
            .find(|(_, w)| w.slot == slot && w.generation == generation && w.live())
            .map(|(p, _)| p)
            .unwrap_or_else(|| panic!("no live worker of generation {generation} in slot {slot}"))
    }

    fn live_in_slot(&self, slot: usize) -> usize {
        self.pool.workers().filter(|(_, w)| w.slot == slot).count()
    }

    /// Boots `n` workers: spawned at 0, up at min_uptime.
    fn booted(n: usize) -> Sim {
        let mut sim = Sim::new(n, policy());
        sim.step(0);
        let (actions, _) = sim.step(1000);
        assert_eq!(actions, vec![Action::Booted]);
        sim
    }
}

fn signals(actions: &[Action]) -> Vec<(Pid, Signal, StopCause)> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Signal { pid, signal, why, .. } => Some((pid, signal, why)),
            _ => None,
        })
        .collect()
}

#[test]
fn boot_spawns_every_slot_primary_last_and_is_over_at_min_uptime() {
    let mut sim = Sim::new(4, policy());
    let (_, spawned) = sim.step(0);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 0]);
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(1000)));
    assert_eq!(sim.step(999).0, vec![]);
    assert_eq!(sim.step(1000).0, vec![Action::Booted]);
    assert_eq!(sim.pool.stage(), Stage::Running);
    assert_eq!(sim.pool.up_count(), 4);
    // Idle: nothing to wake up for.
    assert_eq!(sim.pool.next_deadline(), None);
}

#[test]
fn killed_worker_comes_back_in_its_slot_with_growing_then_reset_backoff() {
    let mut sim = Sim::booted(2);
    let victim = sim.pid_in(1, 1);
    let exit = sim.pool.exited(victim, ExitStatus::Signal(Signal::SIGKILL), sim.at(5000)).unwrap();
    assert_eq!((exit.slot, exit.cause, exit.restart_in), (1, Cause::Crash, Some(ms(0))));
    let (_, spawned) = sim.step(5000);
    assert_eq!(spawned.len(), 1);
    assert_eq!(spawned[0].0, 1);
    // It dies again soon after coming up: 100 ms, then 200 ms.
    sim.step(6000);
    let exit = sim.pool.exited(spawned[0].1, ExitStatus::Code(1), sim.at(6500)).unwrap();
    assert_eq!(exit.restart_in, Some(ms(100)));
    assert_eq!(sim.step(6599).1, vec![]);
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(6600)));
    let (_, again) = sim.step(6600);
    sim.step(7600);
    let exit = sim.pool.exited(again[0].1, ExitStatus::Code(1), sim.at(8000)).unwrap();
    assert_eq!(exit.restart_in, Some(ms(200)));
    // A healthy run (10 s) resets it: the next death restarts at once.
    let (_, third) = sim.step(8200);
    sim.step(9200);
    let exit = sim.pool.exited(third[0].1, ExitStatus::Code(1), sim.at(18_200)).unwrap();
    assert_eq!(exit.restart_in, Some(ms(0)));
}

#[test]
fn crash_loop_at_boot_fails_after_bounded_attempts() {
    let mut sim = Sim::new(2, policy());
    let mut spawns = 0;
    let mut t = 0;
    let failed = loop {
        let (actions, spawned) = sim.step(t);
        spawns += spawned.len();
        if let Some(f) = actions.iter().find(|a| matches!(a, Action::BootFailed { .. })) {
            break f.clone();
        }
        for (_, pid) in spawned {
            sim.pool.exited(pid, ExitStatus::Code(3), sim.at(t + 10));
        }
        t = sim
            .pool
            .next_deadline()
            .map(|d| (d - sim.t0).as_millis() as u64)
            .unwrap_or(t + 10)
            .max(t + 10);
        assert!(t < 60_000, "no fork storm, no endless loop");
    };
    assert_eq!(failed, Action::BootFailed { slot: 0, attempts: 5, last: ExitStatus::Code(3) });
    assert!(spawns <= 10, "at most boot_attempts per slot, got {spawns}");
    assert_eq!(sim.pool.stage(), Stage::Stopping { fast: false });
    assert!(sim.pool.is_done());
}

#[test]
fn crash_loop_after_boot_keeps_retrying_at_backoff() {
    let mut sim = Sim::booted(2);
    let mut t = 2000;
    let mut pid = sim.pid_in(1, 1);
    let mut delays = Vec::new();
    for _ in 0..12 {
        let exit = sim.pool.exited(pid, ExitStatus::Code(1), sim.at(t)).unwrap();
        delays.push(exit.restart_in.unwrap().as_millis() as u64);
        t += exit.restart_in.unwrap().as_millis() as u64;
        let (actions, spawned) = sim.step(t);
        assert!(!actions.iter().any(|a| matches!(a, Action::BootFailed { .. })));
        pid = spawned[0].1;
        t += 10;
    }
    assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
    assert_eq!(sim.pool.stage(), Stage::Running);
}

#[test]
fn graceful_stop_signals_then_kills_at_the_timeout() {
    let mut sim = Sim::booted(2);
    sim.pool.stop(false, sim.at(2000));
    let (actions, spawned) = sim.step(2000);
    assert!(spawned.is_empty());
    let sent = signals(&actions);
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|s| s.1 == Signal::SIGTERM && s.2 == StopCause::Shutdown));
    // One obeys; the other ignores TERM and is killed at 2 s + 30 s.
    let exit = sim.pool.exited(sent[0].0, ExitStatus::Code(0), sim.at(2100)).unwrap();
    assert_eq!(exit.cause, Cause::Stopped { why: StopCause::Shutdown, killed: false });
    assert_eq!(exit.restart_in, None);
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(32_000)));
    assert_eq!(
        signals(&sim.step(32_000).0),
        vec![(sent[1].0, Signal::SIGKILL, StopCause::Shutdown)]
    );
    assert!(!sim.pool.is_done());
    let exit =
        sim.pool.exited(sent[1].0, ExitStatus::Signal(Signal::SIGKILL), sim.at(32_001)).unwrap();
    assert_eq!(exit.cause, Cause::Stopped { why: StopCause::Shutdown, killed: true });
    assert!(sim.pool.is_done());
}

#[test]
fn fast_stop_during_graceful_stop_quits_and_shortens_the_grace() {
    let mut sim = Sim::booted(1);
    sim.pool.stop(false, sim.at(2000));
    let pid = signals(&sim.step(2000).0)[0].0;
    sim.pool.stop(true, sim.at(3000));
    assert_eq!(signals(&sim.step(3000).0), vec![(pid, Signal::SIGQUIT, StopCause::Shutdown)]);
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(4000)));
    // A third signal changes nothing.
    sim.pool.stop(true, sim.at(3500));
    assert_eq!(sim.step(3500).0, vec![]);
}

#[test]
fn ttin_adds_a_slot_ttou_stops_the_highest() {
    let mut sim = Sim::booted(2);
    sim.pool.set_target(3);
    let (_, spawned) = sim.step(2000);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [2]);
    sim.pool.set_target(1);
    let sent = signals(&sim.step(2100).0);
    let slots: Vec<usize> =
        sent.iter().map(|s| sim.pool.workers().find(|(p, _)| *p == s.0).unwrap().1.slot).collect();
    assert_eq!(slots, [2, 1]);
    assert!(sent.iter().all(|s| s.2 == StopCause::Surplus));
    sim.pool.set_target(0);
    assert_eq!(sim.pool.target(), 1, "never below one worker");
}

#[test]
fn reload_replaces_one_slot_at_a_time_new_up_before_old_stopped_primary_last() {
    let mut sim = Sim::booted(3);
    let old: Vec<Pid> = (0..3).map(|s| sim.pid_in(s, 1)).collect();
    sim.pool.reload(3, policy());
    // Slot 1 first: a new worker starts beside the old one.
    let (actions, spawned) = sim.step(2000);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [1]);
    assert!(signals(&actions).is_empty());
    // Once it is up, the old one in slot 1 is stopped and slot 2 starts.
    let (actions, spawned) = sim.step(3000);
    assert_eq!(signals(&actions), vec![(old[1], Signal::SIGTERM, StopCause::Retired)]);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [2]);
    // Slot 2 up: its old worker stops; only now is the old primary stopped, and no new
    // primary is spawned while the old one lives.
    let (actions, spawned) = sim.step(4000);
    assert_eq!(
        signals(&actions),
        vec![
            (old[2], Signal::SIGTERM, StopCause::Retired),
            (old[0], Signal::SIGTERM, StopCause::Retired)
        ]
    );
    assert!(spawned.is_empty());
    assert_eq!(sim.live_in_slot(0), 1);
    let (_, spawned) = sim.step(4500);
    assert!(spawned.is_empty(), "old primary not gone yet");
    sim.pool.exited(old[0], ExitStatus::Code(0), sim.at(4600));
    let (_, spawned) = sim.step(4600);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [0]);
    // Slot 0's new worker up: the reload is done, a live worker of generation 2 in each slot.
    let (actions, _) = sim.step(5600);
    assert!(actions.iter().any(|a| matches!(a, Action::ReloadDone { generation: 2 })));
    for slot in 0..3 {
        sim.pid_in(slot, 2); // panics when the slot has none
    }
}

#[test]
fn reload_batch_replaces_several_slots_at_once() {
    let mut sim = Sim::booted(4);
    sim.pool.reload(4, Policy { reload_batch: 2, ..policy() });
    let (_, spawned) = sim.step(2000);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn primary_is_never_two_processes_when_slot_0_is_killed() {
    let mut sim = Sim::booted(2);
    let p0 = sim.pid_in(0, 1);
    sim.pool.exited(p0, ExitStatus::Signal(Signal::SIGKILL), sim.at(3000));
    let (_, spawned) = sim.step(3000);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [0]);
    assert_eq!(sim.live_in_slot(0), 1);
}

#[test]
fn notify_mode_is_up_at_ready_and_killed_at_boot_timeout() {
    let mut sim = Sim::new(2, Policy { notify: true, ..policy() });
    let (_, spawned) = sim.step(0);
    assert_eq!(sim.step(1000).0, vec![], "min_uptime does not count in notify mode");
    assert!(sim.pool.notified_ready(spawned[0].1, sim.at(1500)));
    assert!(!sim.pool.notified_ready(Pid::from_raw(4242), sim.at(1500)));
    assert_eq!(sim.step(1500).0, vec![]);
    let sent = signals(&sim.step(30_000).0);
    assert_eq!(sent, vec![(spawned[1].1, Signal::SIGKILL, StopCause::BootTimeout)]);
    let exit =
        sim.pool.exited(spawned[1].1, ExitStatus::Signal(Signal::SIGKILL), sim.at(30_001)).unwrap();
    assert_eq!(exit.cause, Cause::BootFailure);
    let retry = sim.step(30_001).1[0].1;
    assert!(sim.pool.notified_ready(retry, sim.at(30_100)));
    assert_eq!(sim.step(30_100).0, vec![Action::Booted]);
}

#[test]
fn unknown_pids_are_not_workers() {
    let mut sim = Sim::booted(1);
    assert_eq!(sim.pool.exited(Pid::from_raw(1), ExitStatus::Code(0), sim.at(5000)), None);
    assert_eq!(sim.step(5000).0, vec![]);
}

#[test]
fn a_reload_is_done_once_every_slot_runs_the_new_generation() {
    let mut sim = Sim::booted(2);
    let old: Vec<Pid> = (0..2).map(|s| sim.pid_in(s, 1)).collect();
    sim.pool.reload(2, policy());
    assert!(sim.pool.reloading());
    sim.step(2000);
    sim.step(3000);
    for &p in &old {
        sim.pool.exited(p, ExitStatus::Code(0), sim.at(3100));
    }
    sim.step(3100);
    let (actions, _) = sim.step(4100);
    assert_eq!(actions, vec![Action::ReloadDone { generation: 2 }]);
    assert!(!sim.pool.reloading());
}

#[test]
fn a_new_worker_that_fails_to_come_up_rolls_the_reload_back() {
    let mut sim = Sim::booted(3);
    let old: Vec<Pid> = (0..3).map(|s| sim.pid_in(s, 1)).collect();
    sim.pool.reload(3, Policy { min_uptime: ms(500), ..policy() });
    // Slot 1 is replaced fine; slot 2's new worker dies before it is up.
    sim.step(2000);
    let (actions, spawned) = sim.step(2500);
    assert_eq!(signals(&actions), vec![(old[1], Signal::SIGTERM, StopCause::Retired)]);
    sim.pool.exited(old[1], ExitStatus::Code(0), sim.at(2600));
    let gen2_slot1 = sim.pid_in(1, 2);
    sim.pool.exited(spawned[0].1, ExitStatus::Code(1), sim.at(2700));
    let (actions, spawned) = sim.step(2700);
    assert_eq!(
        actions[0],
        Action::RolledBack { failed: 2, to: 1, slot: 2, status: ExitStatus::Code(1) }
    );
    assert_eq!(sim.pool.generation(), 1);
    assert!(!sim.pool.reloading());
    // The old workers of slots 0 and 2 were never touched; slot 1 gets a generation-1 worker
    // with the old policy (min_uptime 1 s), and the generation-2 one there retires then.
    assert!(sim.pool.workers().any(|(p, w)| p == old[0] && w.live()));
    assert!(sim.pool.workers().any(|(p, w)| p == old[2] && w.live()));
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [1]);
    assert_eq!(signals(&sim.step(3699).0), vec![]);
    assert_eq!(signals(&sim.step(3700).0), vec![(gen2_slot1, Signal::SIGTERM, StopCause::Retired)]);
    // The next reload is generation 3: a rolled-back number is never reused.
    sim.pool.reload(3, policy());
    assert_eq!(sim.pool.generation(), 3);
}

#[test]
fn a_reload_during_a_reload_supersedes_it_and_rolls_back_to_the_settled_one() {
    let mut sim = Sim::booted(2);
    let old1 = sim.pid_in(1, 1);
    sim.pool.reload(2, policy());
    let (_, spawned) = sim.step(2000);
    let gen2 = spawned[0].1;
    sim.pool.reload(2, policy());
    assert_eq!(sim.pool.generation(), 3);
    // Slot 1 gets a generation-3 worker; it fails before it is up.
    let (_, spawned) = sim.step(2100);
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [1]);
    sim.pool.exited(spawned[0].1, ExitStatus::Code(1), sim.at(2200));
    let (actions, _) = sim.step(2200);
    // Back to 1, the last settled generation, not to 2.
    assert_eq!(
        actions[0],
        Action::RolledBack { failed: 3, to: 1, slot: 1, status: ExitStatus::Code(1) }
    );
    assert_eq!(sim.pool.generation(), 1);
    // The superseded generation-2 worker is retired beside the generation-1 one that serves.
    assert_eq!(signals(&actions), vec![(gen2, Signal::SIGTERM, StopCause::Retired)]);
    assert!(sim.pool.workers().any(|(p, w)| p == old1 && w.live()));
}

#[test]
fn a_silent_worker_gets_sigabrt_then_sigkill_and_is_restarted() {
    let mut sim = Sim::new(1, Policy { watchdog: Some(ms(500)), ..policy() });
    sim.step(0);
    sim.step(1000);
    let pid = sim.pid_in(0, 1);
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(1500)));
    sim.pool.watchdog_ping(pid, sim.at(1400));
    assert_eq!(sim.step(1500).0, vec![]);
    assert_eq!(signals(&sim.step(1900).0), vec![(pid, Signal::SIGABRT, StopCause::Watchdog)]);
    assert_eq!(signals(&sim.step(3900).0), vec![(pid, Signal::SIGKILL, StopCause::Watchdog)]);
    let exit = sim.pool.exited(pid, ExitStatus::Signal(Signal::SIGKILL), sim.at(3901)).unwrap();
    assert_eq!(exit.cause, Cause::Stopped { why: StopCause::Watchdog, killed: true });
    assert_eq!(exit.restart_in, Some(ms(0)));
    assert_eq!(sim.step(3901).1.len(), 1);
}

#[test]
fn stopping_1_starts_the_replacement_at_once_except_for_the_primary() {
    let mut sim = Sim::booted(2);
    let p1 = sim.pid_in(1, 1);
    assert!(sim.pool.retiring(p1, sim.at(2000)));
    let (actions, spawned) = sim.step(2000);
    assert!(signals(&actions).is_empty(), "it stops by itself");
    assert_eq!(spawned.iter().map(|s| s.0).collect::<Vec<_>>(), [1]);
    let p0 = sim.pid_in(0, 1);
    assert!(sim.pool.retiring(p0, sim.at(2100)));
    assert!(sim.step(2100).1.is_empty(), "the primary's successor waits for it to be gone");
    let exit = sim.pool.exited(p0, ExitStatus::Code(0), sim.at(2200)).unwrap();
    assert_eq!(exit.group_grace, None, "no signal reached its group: what is left dies at once");
    assert_eq!(sim.step(2200).1.iter().map(|s| s.0).collect::<Vec<_>>(), [0]);
    // One that lingers is killed at graceful_timeout.
    assert_eq!(signals(&sim.step(32_000).0), vec![(p1, Signal::SIGKILL, StopCause::Retiring)]);
}

#[test]
fn a_fork_out_of_resources_pauses_every_slot_with_one_shared_backoff() {
    let mut sim = Sim::new(1000, policy());
    // The master performs the first spawn; it fails with EAGAIN: the pool pauses.
    let actions = sim.pool.step(sim.at(0));
    assert_eq!(actions.len(), 1000);
    assert_eq!(sim.pool.fork_failed(sim.at(0)), ms(100));
    assert!(sim.pool.forks_paused(sim.at(0)));
    // The other 999 spawns of that step are skipped by the master; nothing is due before the
    // pause ends, in any slot, and no slot counts a boot failure.
    assert_eq!(sim.pool.step(sim.at(1)), vec![]);
    assert_eq!(sim.pool.step(sim.at(99)), vec![]);
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(100)));
    assert!(!sim.pool.forks_paused(sim.at(100)));
    // Failures in a row double the pause, up to the backoff's max.
    assert_eq!(sim.pool.step(sim.at(100)).len(), 1000);
    assert_eq!(sim.pool.fork_failed(sim.at(100)), ms(200));
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(300)));
    for _ in 0..20 {
        sim.pool.fork_failed(sim.at(300));
    }
    assert_eq!(sim.pool.next_deadline(), Some(sim.at(30_300)));
    // A fork that succeeds ends the pause: the rest of the slots are spawned at once.
    let (actions, spawned) = sim.step(30_300);
    assert_eq!((actions.len(), spawned.len()), (1000, 1000));
    assert!(!sim.pool.forks_paused(sim.at(30_300)));
    assert_eq!(sim.step(31_300).0, vec![Action::Booted]);
}

#[test]
fn ttin_never_raises_the_target_above_the_bound() {
    let mut sim = Sim::booted(2);
    sim.pool.set_target(usize::MAX);
    assert_eq!(sim.pool.target(), config::MAX_WORKERS);
}

#[test]
fn a_slot_waits_for_the_process_group_of_its_last_worker() {
    let mut sim = Sim::booted(3);
    // Slot 0 and slot 2 die on their own; their groups still have members (being killed).
    let (primary, other) = (sim.pid_in(0, 1), sim.pid_in(2, 1));
    for pid in [primary, other] {
        let exit = sim.pool.exited(pid, ExitStatus::Signal(Signal::SIGKILL), sim.at(5000)).unwrap();
        assert_eq!(exit.group_grace, None, "not stopping: the rest is killed at once");
        sim.pool.group_outlives(&exit, sim.at(5000));
    }
    assert_eq!(sim.step(5000).1, vec![], "no new worker beside the leftovers");
    assert_eq!(sim.pool.next_deadline(), None, "waits for an event, not a timer");
    assert!(sim.pool.workers().all(|(p, w)| w.live() || p == primary || p == other));
    assert_eq!(sim.pool.group_gone(other), Some(2));
    assert_eq!(sim.step(5001).1.iter().map(|s| s.0).collect::<Vec<_>>(), [2]);
    assert_eq!(sim.pool.group_gone(other), None, "once");
    // The primary rule counts the draining group.
    assert_eq!(sim.step(5002).1, vec![]);
    assert_eq!(sim.pool.group_gone(primary), Some(0));
    assert_eq!(sim.step(5003).1.iter().map(|s| s.0).collect::<Vec<_>>(), [0]);
}

#[test]
fn a_stopped_worker_gives_its_group_the_rest_of_its_grace_and_stop_waits_for_it() {
    let mut sim = Sim::booted(1);
    sim.pool.stop(false, sim.at(2000));
    let pid = signals(&sim.step(2000).0)[0].0;
    let exit = sim.pool.exited(pid, ExitStatus::Code(0), sim.at(2100)).unwrap();
    assert_eq!(exit.group_grace, Some(sim.at(32_000)));
    sim.pool.group_outlives(&exit, sim.at(2100));
    assert!(!sim.pool.is_done(), "the group is still draining");
    assert_eq!(sim.step(2200).0, vec![]);
    sim.pool.group_gone(pid);
    assert!(sim.pool.is_done());
}

#[test]
fn a_restarted_slot_gets_its_new_worker_up_before_the_old_one_stops() {
    let mut sim = Sim::booted(3);
    let old = sim.pid_in(2, 1);
    assert!(sim.pool.restart_slot(2));
    assert!(!sim.pool.restart_slot(3), "no slot 3");
    let (actions, spawned) = sim.step(2000);
    assert_eq!(spawned.len(), 1);
    let (slot, new) = spawned[0];
    assert_eq!(slot, 2);
    assert!(signals(&actions).is_empty(), "the old one serves until the new one is up");
    assert_eq!(sim.live_in_slot(2), 2);
    let (actions, spawned) = sim.step(3000);
    assert!(spawned.is_empty());
    assert_eq!(signals(&actions), vec![(old, Signal::SIGTERM, StopCause::Retired)]);
    assert_eq!(sim.pool.slot_up(2), Some(new));
    // The other slots were not touched.
    assert_eq!(sim.live_in_slot(0) + sim.live_in_slot(1), 2);
}

#[test]
fn a_restarted_primary_stops_before_its_replacement_starts() {
    let mut sim = Sim::booted(2);
    let old = sim.pid_in(0, 1);
    assert!(sim.pool.restart_slot(0));
    let (actions, spawned) = sim.step(2000);
    assert!(spawned.is_empty(), "never two primaries");
    assert_eq!(signals(&actions), vec![(old, Signal::SIGTERM, StopCause::Retired)]);
    sim.pool.exited(old, ExitStatus::Signal(Signal::SIGTERM), sim.at(2100));
    let (_, spawned) = sim.step(2100);
    assert_eq!(spawned.len(), 1);
    assert_eq!(spawned[0].0, 0);
}

#[test]
fn a_slot_asked_of_a_stem_is_not_asked_again_until_answered() {
    let mut sim = Sim::new(2, policy());
    sim.pool.hold_spawns(true);
    assert!(sim.pool.step(sim.at(0)).is_empty(), "held: the stem is not ready");
    assert_eq!(sim.pool.next_deadline(), None, "nothing to wake up for while held");
    sim.pool.hold_spawns(false);
    let actions = sim.pool.step(sim.at(1));
    let slots: Vec<usize> =
        actions.iter().filter_map(|a| matches!(a, Action::Spawn { .. }).then_some(0)).collect();
    assert_eq!(slots.len(), 2);
    sim.pool.requested(0, 1);
    sim.pool.requested(1, 1);
    assert!(sim.pool.step(sim.at(2)).is_empty(), "each slot asked once");
    sim.pool.stop(false, sim.at(3));
    assert!(!sim.pool.is_done(), "a worker may still come");
    sim.pool.request_lost(0);
    sim.pool.spawned(1, 1, Pid::from_raw(7), sim.at(4));
    sim.pool.step(sim.at(4));
    sim.pool.exited(Pid::from_raw(7), ExitStatus::Signal(Signal::SIGTERM), sim.at(5));
    assert!(sim.pool.is_done());
}
