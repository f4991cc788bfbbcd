//! Singleton decisions, stepped with made-up instants.

use super::*;
use std::collections::BTreeMap;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn spec(name: &str, ready: Ready, restart: Restart) -> config::Singleton {
    config::Singleton {
        name: name.into(),
        command: vec!["x".into()],
        ready,
        restart,
        env: BTreeMap::new(),
        min_uptime: ms(1000),
        boot_timeout: ms(30_000),
        stop_signal: config::Signal(Signal::SIGTERM),
        stop_timeout: ms(10_000),
        restart_backoff: config::Backoff { initial: ms(100), max: ms(30_000), reset: ms(10_000) },
        forward_signals: vec![],
    }
}

fn spawns(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| if let Action::Spawn { index } = a { Some(*index) } else { None })
        .collect()
}

fn pid(n: i32) -> Pid {
    Pid::from_raw(n)
}

#[test]
fn boot_starts_them_in_order_each_ready_before_the_next() {
    let t = Instant::now();
    let sock = Ready::UnixSocket("/run/flow.sock".into());
    let mut s = Singletons::new(
        &[spec("flow", sock, Restart::Always), spec("sched", Ready::Notify, Restart::Always)],
        t,
    );
    assert_eq!(spawns(&s.step(t)), [0]);
    s.spawned(0, pid(10), t);
    assert_eq!(s.step(t), vec![], "the second waits for the first");
    assert_eq!(s.next_deadline(), Some(t + ms(5)));
    assert_eq!(s.step(t + ms(5)), vec![Action::Probe { index: 0 }]);
    s.probed(0, false, t + ms(6));
    assert_eq!(s.next_deadline(), Some(t + ms(16)));
    assert_eq!(s.step(t + ms(16)), vec![Action::Probe { index: 0 }]);
    s.probed(0, true, t + ms(17));
    assert_eq!(
        s.step(t + ms(17)),
        vec![Action::Up { index: 0, pid: pid(10) }, Action::Spawn { index: 1 }]
    );
    s.spawned(1, pid(11), t + ms(17));
    assert!(!s.notified_ready(pid(10)), "READY=1 only counts in notify mode");
    assert!(s.notified_ready(pid(11)));
    assert_eq!(s.step(t + ms(20)), vec![Action::Up { index: 1, pid: pid(11) }, Action::Booted]);
    assert_eq!(s.stage(), Stage::Running);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn a_singleton_that_dies_or_times_out_at_boot_fails_the_boot() {
    let t = Instant::now();
    let mut s = Singletons::new(&[spec("a", Ready::Notify, Restart::Always)], t);
    s.step(t);
    s.spawned(0, pid(10), t);
    let late = t + ms(30_000);
    assert_eq!(
        s.step(late),
        vec![Action::Signal { index: 0, pid: pid(10), signal: Signal::SIGKILL }]
    );
    s.exited(pid(10), ExitStatus::Signal(Signal::SIGKILL), late);
    assert_eq!(
        s.step(late),
        vec![Action::BootFailed {
            index: 0,
            why: "not ready within its boot_timeout (30s)".into()
        }]
    );

    let mut s = Singletons::new(&[spec("a", Ready::Spawn, Restart::Always)], t);
    s.step(t);
    s.spawned(0, pid(10), t);
    s.exited(pid(10), ExitStatus::Code(2), t + ms(10));
    assert_eq!(
        s.step(t + ms(10)),
        vec![Action::BootFailed { index: 0, why: "exited with code 2 before it was ready".into() }]
    );
}

#[test]
fn restart_policy_and_backoff_with_one_instance_at_a_time() {
    let t = Instant::now();
    let mut s = Singletons::new(
        &[
            spec("always", Ready::Spawn, Restart::Always),
            spec("onfail", Ready::Spawn, Restart::OnFailure),
            spec("never", Ready::Spawn, Restart::Never),
        ],
        t,
    );
    let mut now = t;
    for i in 0..3 {
        s.step(now);
        s.spawned(i, pid(10 + i as i32), now);
        now += ms(1000);
        s.step(now);
    }
    assert_eq!(s.stage(), Stage::Running);
    // Each exits cleanly.
    let e = s.exited(pid(10), ExitStatus::Code(0), now).unwrap();
    assert_eq!(e.restart_in, Some(ms(0)));
    assert_eq!(s.exited(pid(11), ExitStatus::Code(0), now).unwrap().restart_in, None);
    assert_eq!(s.exited(pid(12), ExitStatus::Code(1), now).unwrap().restart_in, None);
    assert_eq!(spawns(&s.step(now)), [0]);
    s.spawned(0, pid(20), now);
    assert_eq!(spawns(&s.step(now)), Vec::<usize>::new(), "never two instances");
    // It dies again before a healthy run: backoff.
    let e = s.exited(pid(20), ExitStatus::Signal(Signal::SIGKILL), now + ms(50)).unwrap();
    assert_eq!(e.restart_in, Some(ms(100)));
    assert_eq!(s.entries()[1].life, Life::Finished);
}

#[test]
fn stop_goes_in_reverse_order_each_gone_before_the_previous() {
    let t = Instant::now();
    let mut s = Singletons::new(
        &[spec("a", Ready::Spawn, Restart::Always), spec("b", Ready::Spawn, Restart::Always)],
        t,
    );
    s.step(t);
    s.spawned(0, pid(10), t);
    s.step(t + ms(1000));
    s.spawned(1, pid(11), t + ms(1000));
    s.step(t + ms(2000));
    let now = t + ms(3000);
    s.stop(false, now);
    assert_eq!(
        s.step(now),
        vec![Action::Signal { index: 1, pid: pid(11), signal: Signal::SIGTERM }]
    );
    assert_eq!(s.step(now), vec![]);
    assert_eq!(s.next_deadline(), Some(now + ms(10_000)));
    assert_eq!(
        s.step(now + ms(10_000)),
        vec![Action::Signal { index: 1, pid: pid(11), signal: Signal::SIGKILL }]
    );
    let e = s.exited(pid(11), ExitStatus::Signal(Signal::SIGKILL), now + ms(10_001)).unwrap();
    assert!(e.stopped && e.restart_in.is_none());
    assert_eq!(
        s.step(now + ms(10_001)),
        vec![Action::Signal { index: 0, pid: pid(10), signal: Signal::SIGTERM }]
    );
    assert!(!s.is_done());
    s.exited(pid(10), ExitStatus::Code(0), now + ms(10_002));
    assert!(s.is_done());
}

/// Boots `specs` (spawn mode, up at once) with pids 10, 11, ...
fn booted(specs: &[config::Singleton], t: Instant) -> Singletons {
    let mut s = Singletons::new(specs, t);
    for i in 0..specs.len() {
        assert_eq!(spawns(&s.step(t)), [i]);
        s.spawned(i, pid(10 + i as i32), t);
        s.step(t + ms(1000));
    }
    s.step(t + ms(1000));
    assert_eq!(s.stage(), Stage::Running);
    s
}

#[test]
fn a_reload_restarts_the_changed_starts_the_new_and_stops_the_removed() {
    let t = Instant::now();
    let (a, b, c) = (
        spec("a", Ready::Spawn, Restart::Always),
        spec("b", Ready::Spawn, Restart::Always),
        spec("c", Ready::Spawn, Restart::Always),
    );
    let mut s = booted(&[a.clone(), b.clone()], t);
    let t1 = t + ms(5000);
    let mut b2 = b.clone();
    b2.command = vec!["y".into()];
    // a unchanged, b changed, c new.
    s.reconfigure(&[a.clone(), b2.clone(), c.clone()], t1);
    let actions = s.step(t1);
    assert_eq!(
        actions,
        vec![
            Action::Signal { index: 1, pid: pid(11), signal: Signal::SIGTERM },
            Action::Spawn { index: 2 }
        ],
        "b is stopped, c starts; a is left alone"
    );
    assert_eq!(s.configured_count(), 3);
    s.spawned(2, pid(12), t1);
    // Exactly one instance of b: the new one starts only once the old one is reaped.
    assert_eq!(spawns(&s.step(t1 + ms(10))), Vec::<usize>::new());
    let exit = s.exited(pid(11), ExitStatus::Code(0), t1 + ms(20)).unwrap();
    assert!(exit.stopped);
    assert_eq!(exit.restart_in, Some(ms(0)));
    assert_eq!(spawns(&s.step(t1 + ms(20))), [1]);
    assert_eq!(s.entries()[1].spec.command, ["y"]);

    // A reload without b: it stops and stays stopped; the indexes of the others do not move.
    s.spawned(1, pid(21), t1 + ms(20));
    s.step(t1 + ms(2000));
    let t2 = t1 + ms(5000);
    s.reconfigure(&[a.clone(), c.clone()], t2);
    assert_eq!(
        s.step(t2),
        vec![Action::Signal { index: 1, pid: pid(21), signal: Signal::SIGTERM }]
    );
    s.exited(pid(21), ExitStatus::Signal(Signal::SIGTERM), t2);
    assert_eq!(s.step(t2 + ms(10_000)), vec![]);
    assert_eq!(s.configured_count(), 2);
    assert_eq!(s.index_of(pid(12)), Some(2));
    // Brought back by the next reload.
    s.reconfigure(&[a, b, c], t2 + ms(1));
    assert_eq!(spawns(&s.step(t2 + ms(1))), [1]);
}

#[test]
fn a_reload_changing_a_singleton_that_is_stopping_waits_for_it() {
    let t = Instant::now();
    let a = spec("a", Ready::Spawn, Restart::Always);
    let mut s = booted(std::slice::from_ref(&a), t);
    let mut a2 = a.clone();
    a2.command = vec!["two".into()];
    let mut a3 = a.clone();
    a3.command = vec!["three".into()];
    s.reconfigure(std::slice::from_ref(&a2), t);
    assert_eq!(s.step(t), vec![Action::Signal { index: 0, pid: pid(10), signal: Signal::SIGTERM }]);
    // A second reload while it stops: the latest definition wins, still one instance.
    s.reconfigure(std::slice::from_ref(&a3), t);
    assert_eq!(s.step(t), vec![]);
    s.exited(pid(10), ExitStatus::Code(0), t + ms(5));
    assert_eq!(spawns(&s.step(t + ms(5))), [0]);
    assert_eq!(s.entries()[0].spec.command, ["three"]);
    // Stopping the master drops a pending replacement.
    s.spawned(0, pid(30), t + ms(5));
    s.reconfigure(std::slice::from_ref(&a), t + ms(10));
    s.step(t + ms(10));
    s.stop(false, t + ms(11));
    s.exited(pid(30), ExitStatus::Code(0), t + ms(12));
    assert!(s.is_done());
    assert_eq!(s.step(t + ms(20)), vec![]);
}

#[test]
fn a_singleton_restarts_only_once_the_group_of_its_last_process_is_empty() {
    let t = Instant::now();
    let mut s = Singletons::new(&[spec("sched", Ready::Spawn, Restart::Always)], t);
    s.step(t);
    s.spawned(0, pid(10), t);
    s.step(t + ms(1000));
    let e = s.exited(pid(10), ExitStatus::Signal(Signal::SIGKILL), t + ms(20_000)).unwrap();
    assert_eq!((e.restart_in, e.group_grace), (Some(ms(0)), None));
    s.group_outlives(0, pid(10));
    assert_eq!(s.step(t + ms(20_000)), vec![], "no instance beside the leftovers");
    assert_eq!(s.next_deadline(), None, "waits for the reaper");
    assert_eq!(s.group_gone(pid(11)), None);
    assert_eq!(s.group_gone(pid(10)), Some(0));
    assert_eq!(spawns(&s.step(t + ms(20_001))), [0]);
    s.spawned(0, pid(12), t + ms(20_001));
    // A stop: the group gets the rest of stop_timeout, and the stop waits for it.
    s.stop(false, t + ms(21_000));
    s.step(t + ms(21_000));
    let e = s.exited(pid(12), ExitStatus::Code(0), t + ms(21_100)).unwrap();
    assert_eq!(e.group_grace, Some(t + ms(31_000)));
    s.group_outlives(0, pid(12));
    assert!(!s.is_done());
    s.group_gone(pid(12));
    assert!(s.is_done());
}
