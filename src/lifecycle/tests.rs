//! The lifecycle without processes, sockets or sleeps: inputs in, effects out, time passed by hand.

use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn policy() -> Policy {
    Policy {
        watchdog: 10 * SECOND,
        readiness_timeout: 30 * SECOND,
        drain_timeout: 30 * SECOND,
        signal_first: false,
        stop_signal: Signal::SIGTERM,
        stop_timeout: 10 * SECOND,
        max_draining: 3,
        health_interval: SECOND,
        health_failures: 3,
        health_successes: 2,
        watch_settle: Duration::from_secs(2),
        max_lifetime: None,
        canary: None,
    }
}

/// The policy with no watchdog window: the previous worker drains at the switch.
fn without_watchdog() -> Policy {
    Policy {
        watchdog: Duration::ZERO,
        ..policy()
    }
}

/// A machine, its clock, and what it asked for since the last look.
struct Run {
    machine: Machine,
    now: Time,
}

impl Run {
    fn new(policy: Policy) -> Run {
        Run {
            machine: Machine::new("web".into(), policy),
            now: Time::from_origin(Duration::from_secs(1000)),
        }
    }

    fn step(&mut self, input: Input) -> Vec<Effect> {
        self.machine.step(input, self.now)
    }

    /// Lets `wait` pass and steps the machine at every deadline on the way, like the driver's timer.
    fn pass(&mut self, wait: Duration) -> Vec<Effect> {
        let end = self.now + wait;
        let mut effects = Vec::new();
        while let Some(next) = self.machine.next_deadline().filter(|&n| n <= end) {
            self.now = next.max(self.now);
            effects.extend(self.step(Input::Tick));
        }
        self.now = end;
        effects.extend(self.step(Input::Tick));
        effects
    }

    /// Asks for an upgrade.
    fn request(&mut self, trigger: Trigger, waiter: Option<WaiterId>) -> Vec<Effect> {
        self.step(Input::Upgrade { trigger, waiter })
    }

    /// Answers the spawn of `generation`: its process runs.
    fn spawned(&mut self, generation: u64) -> Vec<Effect> {
        self.step(Input::Spawned {
            generation,
            pid: pid(generation),
            worker: format!("127.0.0.1:{}", 10000 + generation),
        })
    }

    /// Reports the exit of worker `generation`.
    fn exited(&mut self, generation: u64, status: &str) -> Vec<Effect> {
        self.step(Input::Exited {
            generation,
            status: status.into(),
        })
    }

    /// Answers the spawn of `generation` and its readiness.
    fn ready(&mut self, generation: u64) -> Vec<Effect> {
        let mut effects = self.spawned(generation);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::WaitReady { generation: g, .. } if *g == generation)),
            "{effects:?}"
        );
        effects.extend(self.step(Input::Ready { generation }));
        effects
    }

    /// A service whose first worker (generation 1) serves.
    fn serving(policy: Policy) -> Run {
        let mut run = Run::new(policy);
        let effects = run.request(Trigger::Start, None);
        assert_eq!(spawns(&effects), [1]);
        run.ready(1);
        run
    }

    /// Upgrades to the next generation, up to its switch.
    fn upgrade(&mut self, waiter: Option<WaiterId>) -> (u64, Vec<Effect>) {
        let mut effects = self.request(Trigger::Api, waiter);
        let generation = *spawns(&effects).first().expect("an upgrade starts");
        effects.extend(self.ready(generation));
        (generation, effects)
    }

    fn active(&self) -> Option<u64> {
        self.machine.active.as_ref().map(|a| a.generation)
    }

    fn draining(&self) -> Vec<u64> {
        self.machine.draining.iter().map(|d| d.generation).collect()
    }
}

fn pid(generation: u64) -> u32 {
    u32::try_from(100 + generation).expect("small")
}

/// What `pick` finds in each of `effects`, in order.
fn pick<T>(effects: &[Effect], pick: impl Fn(&Effect) -> Option<T>) -> Vec<T> {
    effects.iter().filter_map(pick).collect()
}

fn spawns(effects: &[Effect]) -> Vec<u64> {
    pick(effects, |e| match e {
        Effect::Spawn { generation } => Some(*generation),
        _ => None,
    })
}

fn events(effects: &[Effect]) -> Vec<String> {
    pick(effects, |e| match e {
        Effect::Event(event) => serde_json::to_value(event).ok()?["event"].as_str().map(str::to_owned),
        _ => None,
    })
}

fn finished(effects: &[Effect]) -> Vec<UpgradeRecord> {
    pick(effects, |e| match e {
        Effect::Event(Event::UpgradeFinished(record)) => Some(record.clone()),
        _ => None,
    })
}

fn replies(effects: &[Effect]) -> Vec<(WaiterId, Result<UpgradeRecord, ActionError>)> {
    pick(effects, |e| match e {
        Effect::Reply { waiter, outcome } => Some((*waiter, outcome.clone())),
        _ => None,
    })
}

/// The stop of worker `generation` with the default signal.
fn term(generation: u64) -> Effect {
    Effect::Stop {
        generation,
        signal: Signal::SIGTERM,
    }
}

/// The error a record carries, or "".
fn error_of(record: &UpgradeRecord) -> &str {
    record.error.as_deref().unwrap_or_default()
}

fn has(effects: &[Effect], wanted: &Effect) -> bool {
    effects.contains(wanted)
}

/// The position of `wanted` in `effects`.
fn at(effects: &[Effect], wanted: &Effect) -> usize {
    effects
        .iter()
        .position(|e| e == wanted)
        .unwrap_or_else(|| panic!("no {wanted:?} in {effects:?}"))
}

#[test]
fn the_first_worker_is_spawned_probed_and_routed_and_the_service_starts_accepting() {
    let mut run = Run::new(policy());
    let effects = run.request(Trigger::Start, None);
    assert_eq!(spawns(&effects), [1]);
    assert_eq!(run.machine.phase(), Phase::Spawning);
    run.now = run.now + Duration::from_millis(50);
    let effects = run.spawned(1);
    assert_eq!(run.machine.phase(), Phase::WaitingReady);
    assert!(has(
        &effects,
        &Effect::WaitReady {
            generation: 1,
            deadline: run.now + 30 * SECOND
        }
    ));
    run.now = run.now + Duration::from_millis(250);
    let effects = run.step(Input::Ready { generation: 1 });
    assert!(at(&effects, &Effect::Route) < at(&effects, &Effect::Accept));
    assert!(has(&effects, &Effect::Started(Ok(()))));
    let record = &finished(&effects)[0];
    assert_eq!(
        (record.result, record.new_generation, record.new_pid),
        (UpgradeResult::Success, 1, Some(101))
    );
    assert_eq!(
        (record.duration_ms, record.phases.spawn_ms, record.phases.ready_ms),
        (300, Some(50), Some(250))
    );
    let ready = Event::Ready {
        generation: 1,
        pid: 101,
        ready_ms: 250,
    };
    assert!(has(&effects, &Effect::Event(ready)), "from the spawn: {effects:?}");
    assert!(has(&effects, &Effect::Count(Count::Ready(Duration::from_millis(300)))));
    assert_eq!(run.machine.phase(), Phase::Idle);
    assert_eq!(run.active(), Some(1));
}

#[test]
fn an_upgrade_goes_spawn_ready_switch_watch_drain_stop() {
    let mut run = Run::serving(policy());
    // 1–3: spawn, wait ready, switch; the previous worker is kept warm, not drained.
    let (generation, effects) = run.upgrade(Some(7));
    assert_eq!(generation, 2);
    assert_eq!(
        events(&effects),
        ["upgrade_started", "spawned", "ready", "switched", "watching"]
    );
    assert!(has(&effects, &Effect::Route));
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Drain { .. })),
        "{effects:?}"
    );
    assert!(replies(&effects).is_empty(), "the outcome waits for the window");
    assert_eq!(run.machine.phase(), Phase::Watching);
    assert_eq!(run.active(), Some(2));
    // 4: the window closes: the upgrade succeeded, the previous worker drains.
    let effects = run.pass(10 * SECOND);
    assert!(has(
        &effects,
        &Effect::Drain {
            generation: 1,
            settle: false
        }
    ));
    let (waiter, outcome) = replies(&effects).remove(0);
    let record = outcome.expect("a record");
    assert_eq!(
        (waiter, record.result, record.old_generation),
        (7, UpgradeResult::Success, Some(1))
    );
    assert_eq!(record.phases.watch_ms, Some(10_000));
    assert_eq!(run.machine.phase(), Phase::Idle);
    // 5: its last connection closes: it is told to stop, and forgotten once reaped.
    let effects = run.step(Input::Closed { generation: 1 });
    assert!(has(&effects, &term(1)));
    let effects = run.exited(1, "exit code 0");
    assert!(has(&effects, &Effect::Forget { generation: 1 }));
    assert_eq!(events(&effects), ["worker_stopped"]);
    assert!(run.draining().is_empty());
}

#[test]
fn requests_during_an_upgrade_and_its_window_fold_into_one_follow_up() {
    let mut run = Run::serving(policy());
    let effects = run.request(Trigger::Signal, Some(1));
    assert_eq!(spawns(&effects), [2]);
    for waiter in 2..=5 {
        let effects = run.request(Trigger::Signal, Some(waiter));
        assert!(spawns(&effects).is_empty(), "coalesced: {effects:?}");
    }
    run.ready(2);
    let effects = run.request(Trigger::Api, Some(6));
    assert!(spawns(&effects).is_empty(), "the window is open: {effects:?}");
    let effects = run.pass(10 * SECOND);
    assert_eq!(replies(&effects).iter().map(|(w, _)| *w).collect::<Vec<_>>(), [1]);
    assert_eq!(spawns(&effects), [3], "one follow-up for five requests");
    let effects = run.ready(3);
    assert!(replies(&effects).is_empty());
    let effects = run.pass(10 * SECOND);
    let told: Vec<WaiterId> = replies(&effects).iter().map(|(w, _)| *w).collect();
    assert_eq!(told, [2, 3, 4, 5, 6]);
    assert_eq!(
        finished(&effects)[0].trigger,
        Trigger::Api,
        "the last request names the trigger"
    );
    assert!(spawns(&effects).is_empty());
}

#[test]
fn an_operator_rolls_back_while_the_previous_worker_is_warm_and_not_after() {
    let mut run = Run::serving(policy());
    run.upgrade(Some(1));
    run.pass(2 * SECOND);
    let effects = run.step(Input::Rollback { reply: 9 });
    assert_eq!(run.active(), Some(1), "traffic went back");
    assert!(
        at(&effects, &Effect::Route)
            < at(
                &effects,
                &Effect::Drain {
                    generation: 2,
                    settle: false
                }
            )
    );
    let outcome = replies(&effects);
    assert_eq!(outcome.len(), 2, "the upgrade's waiter and the rollback's: {outcome:?}");
    let (waiter, record) = &outcome[1];
    let record = record.clone().expect("rolled back");
    assert_eq!((*waiter, record.result), (9, UpgradeResult::RolledBack));
    assert!(record.error.unwrap_or_default().contains("rollback requested"));
    assert_eq!(record.phases.watch_ms, Some(2000));
    let effects = run.step(Input::Rollback { reply: 10 });
    let (_, refused) = replies(&effects).remove(0);
    assert!(
        matches!(&refused, Err(ActionError::Conflict(m)) if m.contains("nothing to roll back to")),
        "{refused:?}"
    );
}

#[test]
fn failed_health_checks_in_the_window_roll_back_and_fewer_do_not() {
    let mut run = Run::serving(policy());
    run.upgrade(None);
    for round in 1..=3 {
        let effects = run.pass(SECOND);
        assert!(
            has(&effects, &Effect::Probe { generation: 2 }),
            "round {round}: {effects:?}"
        );
        let effects = run.step(Input::Probed {
            generation: 2,
            ok: false,
        });
        if round < 3 {
            assert_eq!(run.active(), Some(2), "round {round}: one bad probe changes nothing");
            assert!(events(&effects).is_empty());
        } else {
            assert_eq!(
                events(&effects),
                ["unhealthy", "rolled_back", "drain_started", "upgrade_finished"]
            );
            let record = &finished(&effects)[0];
            assert_eq!(record.result, UpgradeResult::RolledBack);
            assert!(error_of(record).contains("failed 3 health checks"));
        }
    }
    assert_eq!(run.active(), Some(1));
    assert!(run.machine.active.as_ref().is_some_and(|a| a.healthy));
}

#[test]
fn a_new_worker_that_exits_in_the_window_is_rolled_back() {
    let mut run = Run::serving(policy());
    run.upgrade(None);
    let effects = run.exited(2, "exit code 1");
    assert_eq!(run.active(), Some(1));
    let record = &finished(&effects)[0];
    assert_eq!(record.result, UpgradeResult::RolledBack);
    assert!(error_of(record).contains("exited (exit code 1)"));
    // The dead worker drains what it left and is forgotten without a signal: it has no process.
    let effects = run.step(Input::Closed { generation: 2 });
    assert!(!effects.iter().any(|e| matches!(e, Effect::Stop { .. })), "{effects:?}");
    assert!(has(&effects, &Effect::Forget { generation: 2 }));
    assert!(run.draining().is_empty());
}

#[test]
fn a_warm_worker_that_dies_ends_the_window_as_a_success() {
    let mut run = Run::serving(policy());
    run.upgrade(Some(3));
    let effects = run.exited(1, "killed by SIGKILL");
    let (_, record) = replies(&effects).remove(0);
    assert_eq!(record.expect("record").result, UpgradeResult::Success);
    assert_eq!(run.machine.phase(), Phase::Idle);
    assert_eq!(run.active(), Some(2));
}

#[test]
fn a_worker_never_ready_is_discarded_and_the_old_one_serves_on() {
    let mut run = Run::serving(policy());
    let effects = run.request(Trigger::Api, Some(4));
    assert_eq!(spawns(&effects), [2]);
    run.spawned(2);
    run.now = run.now + 30 * SECOND;
    let effects = run.step(Input::NotReady {
        generation: 2,
        error: "not ready after 30s (last probe: connect: connection refused)".into(),
    });
    assert!(has(&effects, &Effect::Discard { generation: 2 }));
    let (_, record) = replies(&effects).remove(0);
    let record = record.expect("record");
    assert_eq!(record.result, UpgradeResult::Failed);
    assert_eq!(
        record.error.as_deref(),
        Some(
            "service `web`: upgrade to generation 2 failed: worker pid 102: not ready after 30s (last probe: \
             connect: connection refused)"
        )
    );
    assert_eq!(record.phases.ready_ms, None);
    assert_eq!(run.active(), Some(1));
    assert!(run.machine.restart.is_none(), "a healthy worker serves: no restart");
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Route)),
        "the route never changed"
    );
}

#[test]
fn a_worker_exiting_while_it_starts_fails_the_upgrade_at_once_and_a_first_failure_fails_the_start() {
    let mut run = Run::new(policy());
    run.request(Trigger::Start, None);
    run.spawned(1);
    let effects = run.exited(1, "exit code 3");
    let Some(Effect::Started(Err(error))) = effects.iter().find(|e| matches!(e, Effect::Started(_))) else {
        panic!("{effects:?}")
    };
    assert!(error.contains("exited while starting: exit code 3"), "{error}");
    assert!(has(&effects, &Effect::Discard { generation: 1 }));
    assert_eq!(
        run.machine.restart.map(|r| r.trigger),
        Some(Trigger::Restart),
        "nothing serves: it tries again"
    );
}

#[test]
fn a_spawn_that_fails_is_recorded_with_its_reason() {
    let mut run = Run::serving(policy());
    run.request(Trigger::Api, Some(1));
    let effects = run.step(Input::SpawnFailed {
        generation: 2,
        error: "cannot run `nope`: No such file or directory".into(),
    });
    let (_, record) = replies(&effects).remove(0);
    let record = record.expect("record");
    assert_eq!((record.result, record.new_pid), (UpgradeResult::Failed, None));
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Discard { .. })),
        "no process to kill"
    );
}

#[test]
fn a_drain_waits_for_its_connections_then_stops_the_worker_and_kills_it_after_stop_timeout() {
    let mut run = Run::serving(without_watchdog());
    let (_, effects) = run.upgrade(None);
    assert!(
        at(&effects, &Effect::Route)
            < at(
                &effects,
                &Effect::Drain {
                    generation: 1,
                    settle: false
                }
            )
    );
    // Progress every second, no signal while connections are open.
    let effects = run.pass(3 * SECOND);
    assert_eq!(events(&effects), ["drain_progress"; 3]);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Stop { .. } | Effect::Cut { .. }))
    );
    let effects = run.step(Input::Closed { generation: 1 });
    assert!(has(&effects, &term(1)));
    let effects = run.pass(10 * SECOND);
    assert!(has(&effects, &Effect::Kill { generation: 1 }));
    assert_eq!(events(&effects), ["stop_timeout"]);
    let effects = run.exited(1, "killed by SIGKILL");
    let Some(Effect::Event(Event::WorkerStopped {
        status, cut, drain_ms, ..
    })) = effects
        .iter()
        .find(|e| matches!(e, Effect::Event(Event::WorkerStopped { .. })))
    else {
        panic!("{effects:?}")
    };
    assert_eq!((status.as_str(), *cut, *drain_ms), ("killed by SIGKILL", 0, 13_000));
    assert!(has(&effects, &Effect::Count(Count::Drained(13 * SECOND))));
}

#[test]
fn connections_are_cut_only_at_the_drain_timeout() {
    let mut run = Run::serving(without_watchdog());
    run.upgrade(None);
    let effects = run.pass(29 * SECOND);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Cut { .. })), "{effects:?}");
    let effects = run.pass(SECOND);
    assert!(at(&effects, &Effect::Cut { generation: 1 }) < at(&effects, &term(1)));
    let effects = run.step(Input::Cut {
        generation: 1,
        connections: 4,
    });
    assert_eq!(events(&effects), ["drain_cut"]);
    let effects = run.exited(1, "exit code 0");
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Event(Event::WorkerStopped { cut: 4, .. }))),
        "{effects:?}"
    );
}

#[test]
fn with_drain_policy_signal_the_worker_is_told_once_it_holds_every_connection() {
    let mut policy = without_watchdog();
    policy.signal_first = true;
    let mut run = Run::serving(policy);
    let (_, effects) = run.upgrade(None);
    assert!(has(
        &effects,
        &Effect::Drain {
            generation: 1,
            settle: true
        }
    ));
    assert!(!effects.iter().any(|e| matches!(e, Effect::Stop { .. })));
    let effects = run.step(Input::Settled { generation: 1 });
    assert!(has(&effects, &term(1)));
    let effects = run.step(Input::Closed { generation: 1 });
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Stop { .. })),
        "signalled once: {effects:?}"
    );
    let effects = run.exited(1, "exit code 0");
    assert!(has(&effects, &Effect::Forget { generation: 1 }));
}

#[test]
fn past_max_draining_an_upgrade_waits_for_a_slot_and_never_cuts() {
    let mut policy = without_watchdog();
    policy.max_draining = 2;
    let mut run = Run::serving(policy);
    run.upgrade(None);
    run.upgrade(None);
    assert_eq!(run.draining(), [1, 2]);
    let effects = run.request(Trigger::Api, Some(5));
    assert!(spawns(&effects).is_empty(), "{effects:?}");
    assert_eq!(events(&effects), ["upgrade_waiting"]);
    let Some(Effect::Event(Event::UpgradeWaiting {
        draining,
        max_draining,
        until_ms,
        ..
    })) = effects.first()
    else {
        panic!("{effects:?}")
    };
    assert_eq!(
        (draining.as_slice(), *max_draining, *until_ms),
        ([1, 2].as_slice(), 2, 40_000)
    );
    assert_eq!(run.machine.phase(), Phase::WaitingForDrain);
    // More requests fold into the waiting one, and nothing is cut meanwhile.
    let effects = run.request(Trigger::Signal, Some(6));
    assert!(effects.is_empty(), "{effects:?}");
    let effects = run.pass(20 * SECOND);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Cut { .. } | Effect::Spawn { .. }))
    );
    // Generation 2 finishes first: its slot goes to the waiting upgrade.
    run.step(Input::Closed { generation: 2 });
    let effects = run.exited(2, "exit code 0");
    assert_eq!(spawns(&effects), [4]);
    let effects = run.ready(4);
    let told: Vec<WaiterId> = replies(&effects).iter().map(|(w, _)| *w).collect();
    assert_eq!(told, [5, 6]);
    assert_eq!(run.draining(), [1, 3]);
    assert!(run.machine.live_draining().count() <= 2);
}

#[test]
fn a_dead_worker_takes_no_drain_slot() {
    let mut policy = without_watchdog();
    policy.max_draining = 1;
    let mut run = Run::serving(policy);
    run.upgrade(None);
    assert_eq!(run.draining(), [1]);
    // The active worker dies: the replacement does not wait for generation 1.
    let effects = run.exited(2, "exit code 1");
    assert!(has(&effects, &Effect::Route), "connections wait for the replacement");
    assert_eq!(run.active(), None);
    let effects = run.pass(Duration::from_millis(100));
    assert_eq!(spawns(&effects), [3]);
}

#[test]
fn restarts_back_off_doubling_to_the_maximum_and_reset_after_a_stable_run() {
    let mut run = Run::serving(policy());
    let mut expected = RESTART_BACKOFF_MIN;
    let mut generation = 1;
    for _ in 0..10 {
        let effects = run.exited(generation, "exit code 1");
        let wait = effects
            .iter()
            .find_map(|e| match e {
                Effect::Event(Event::RestartScheduled { in_ms, reason }) => Some((*in_ms, *reason)),
                _ => None,
            })
            .expect("a restart");
        assert_eq!(wait, (millis(expected), Trigger::Restart));
        let effects = run.pass(expected - Duration::from_millis(1));
        assert!(spawns(&effects).is_empty(), "not before the backoff");
        let effects = run.pass(Duration::from_millis(1));
        assert!(has(&effects, &Effect::Count(Count::Restart(Trigger::Restart))));
        generation = spawns(&effects)[0];
        run.ready(generation);
        expected = (expected * 2).min(RESTART_BACKOFF_MAX);
    }
    assert_eq!(expected, RESTART_BACKOFF_MAX);
    // A worker that ran well for long starts the backoff afresh.
    run.pass(RESTART_STABLE_AFTER);
    let effects = run.exited(generation, "exit code 1");
    assert!(has(
        &effects,
        &Effect::Event(Event::RestartScheduled {
            in_ms: millis(RESTART_BACKOFF_MIN),
            reason: Trigger::Restart
        })
    ));
}

#[test]
fn health_falls_after_failures_in_a_row_and_rises_after_successes_in_a_row() {
    let mut run = Run::serving(policy());
    let probe = |run: &mut Run, ok| {
        let effects = run.pass(SECOND);
        assert!(has(&effects, &Effect::Probe { generation: 1 }), "{effects:?}");
        run.step(Input::Probed { generation: 1, ok })
    };
    for ok in [false, false, true, false, false] {
        probe(&mut run, ok);
        assert!(
            run.machine.active.as_ref().is_some_and(|a| a.healthy),
            "never three in a row"
        );
    }
    let effects = probe(&mut run, false);
    assert_eq!(events(&effects), ["unhealthy", "restart_scheduled"]);
    assert_eq!(run.machine.restart.map(|r| r.trigger), Some(Trigger::Unhealthy));
    // The replacement is due in 100 ms; the next probe comes first only if it is sooner. Recover instead.
    run.machine.restart = None;
    probe(&mut run, true);
    assert!(
        !run.machine.active.as_ref().is_some_and(|a| a.healthy),
        "one success is not enough"
    );
    let effects = probe(&mut run, true);
    assert_eq!(events(&effects), ["healthy"]);
    // A probe of a generation that no longer serves changes nothing.
    let effects = run.step(Input::Probed {
        generation: 9,
        ok: false,
    });
    assert!(effects.is_empty());
}

#[test]
fn an_unhealthy_worker_is_replaced_through_an_upgrade() {
    let mut policy = policy();
    policy.health_failures = 1;
    let mut run = Run::serving(policy);
    run.pass(SECOND);
    run.step(Input::Probed {
        generation: 1,
        ok: false,
    });
    let effects = run.pass(RESTART_BACKOFF_MIN);
    assert_eq!(spawns(&effects), [2]);
    assert!(has(&effects, &Effect::Count(Count::Restart(Trigger::Unhealthy))));
    let effects = run.ready(2);
    assert_eq!(run.active(), Some(2));
    assert!(has(&effects, &Effect::Route));
}

#[test]
fn shutdown_abandons_the_upgrade_in_flight_and_drains_every_worker() {
    let mut run = Run::serving(policy());
    run.upgrade(Some(1));
    run.request(Trigger::Api, Some(2));
    let effects = run.step(Input::Shutdown);
    assert!(at(&effects, &Effect::StopAccepting) < at(&effects, &Effect::Route));
    assert!(has(
        &effects,
        &Effect::Drain {
            generation: 1,
            settle: false
        }
    ));
    assert!(has(
        &effects,
        &Effect::Drain {
            generation: 2,
            settle: false
        }
    ));
    let Some(Effect::Abandon { waiters }) = effects.iter().find(|e| matches!(e, Effect::Abandon { .. })) else {
        panic!("{effects:?}")
    };
    assert_eq!(waiters, &[2, 1]);
    assert_eq!(run.machine.phase(), Phase::ShuttingDown);
    let effects = run.request(Trigger::Api, Some(3));
    assert_eq!(effects, [Effect::Abandon { waiters: vec![3] }]);
    for generation in [1, 2] {
        run.step(Input::Closed { generation });
        run.exited(generation, "exit code 0");
    }
    assert!(run.machine.is_stopped());
    assert_eq!(run.machine.phase(), Phase::Stopped);
}

#[test]
fn shutdown_while_spawning_kills_the_candidate() {
    let mut run = Run::serving(policy());
    run.request(Trigger::Api, None);
    run.spawned(2);
    let effects = run.step(Input::Shutdown);
    assert!(has(&effects, &Effect::Discard { generation: 2 }));
    // A spawn that completes after the shutdown is discarded too.
    let mut run = Run::serving(policy());
    run.request(Trigger::Api, None);
    run.step(Input::Shutdown);
    let effects = run.spawned(2);
    assert_eq!(effects, [Effect::Discard { generation: 2 }]);
}

#[test]
fn the_state_round_trips_and_goes_on_the_same_way() {
    let mut policy = policy();
    policy.max_draining = 1;
    policy.stop_signal = Signal::SIGQUIT;
    let mut run = Run::serving(policy);
    run.upgrade(Some(1));
    run.pass(10 * SECOND);
    run.request(Trigger::Signal, Some(2));
    run.pass(SECOND);
    let text = serde_json::to_string(&run.machine).expect("serialise");
    let back: Machine = serde_json::from_str(&text).expect("deserialise");
    assert_eq!(back, run.machine);
    let mut copy = Run {
        machine: back,
        now: run.now,
    };
    for input in [
        Input::Closed { generation: 1 },
        Input::Exited {
            generation: 1,
            status: "exit code 0".into(),
        },
        Input::Tick,
    ] {
        let ours = run.step(input.clone());
        let theirs = copy.step(input);
        assert_eq!(finished(&ours).len(), finished(&theirs).len());
        assert_eq!(spawns(&ours), spawns(&theirs));
    }
    assert_eq!(copy.machine.candidate.as_ref().map(|c| c.generation), Some(3));
    assert!(text.contains("\"SIGQUIT\""), "signals by name: {text}");
}

#[test]
fn a_machine_is_busy_for_a_hand_over_while_an_upgrade_or_a_replacement_is_in_flight() {
    let mut run = Run::serving(policy());
    assert_eq!(run.machine.busy(), None);
    let effects = run.request(Trigger::Api, None);
    assert_eq!(spawns(&effects), [2]);
    assert!(
        run.machine
            .busy()
            .is_some_and(|b| b.contains("generation 2 is starting"))
    );
    run.ready(2);
    assert!(run.machine.busy().is_some_and(|b| b.contains("watchdog window")));
    run.pass(10 * SECOND);
    assert_eq!(run.machine.busy(), None, "{:?}", run.machine.phase());
    // The active worker dies: until its replacement serves, connections could not park.
    run.exited(2, "killed by SIGKILL");
    assert!(run.machine.busy().is_some_and(|b| b.contains("replaced")));
}

#[test]
fn an_adopted_machine_sets_up_its_waits_again_and_forgets_the_old_callers() {
    let mut run = Run::serving(without_watchdog());
    // Generation 1 drains with a connection open; generation 2 serves, with a probe in flight.
    run.upgrade(None);
    assert_eq!(run.draining(), [1]);
    let effects = run.pass(SECOND);
    assert!(has(&effects, &Effect::Probe { generation: 2 }), "{effects:?}");
    // A follow-up waits with a caller of the old image.
    run.machine.follow_up = Some(FollowUp {
        trigger: Trigger::Api,
        waiters: vec![7],
        waiting_since: None,
        release: None,
    });
    // Through the state, as a re-exec carries it.
    let text = serde_json::to_string(&run.machine).expect("serialise");
    let mut adopted: Machine = serde_json::from_str(&text).expect("deserialise");
    let effects = adopted.adopted(run.now);
    assert_eq!(effects.first(), Some(&Effect::Route), "the route first: {effects:?}");
    assert!(has(
        &effects,
        &Effect::Drain {
            generation: 1,
            settle: false
        }
    ));
    assert_eq!(effects.last(), Some(&Effect::Accept));
    assert!(adopted.follow_up.as_ref().is_some_and(|f| f.waiters.is_empty()));
    // The probe that ran in the old image is due again at once; the drain's deadline is where it was.
    assert_eq!(adopted.active.as_ref().and_then(|a| a.next_probe), Some(run.now));
    assert_eq!(adopted.draining[0].deadline, run.machine.draining[0].deadline);
    let effects = adopted.step(Input::Tick, run.now);
    assert!(has(&effects, &Effect::Probe { generation: 2 }), "{effects:?}");
    // The drain still ends with its last connection.
    let effects = adopted.step(Input::Closed { generation: 1 }, run.now);
    assert!(has(&effects, &term(1)), "{effects:?}");
}

#[test]
fn an_adopted_candidate_is_waited_for_or_spawned_again() {
    let mut run = Run::serving(policy());
    run.request(Trigger::Api, Some(3));
    // Spawned in the old image but not yet known to be: the new driver starts it again.
    let mut spawning = run.machine.clone();
    let effects = spawning.adopted(run.now);
    assert!(has(&effects, &Effect::Spawn { generation: 2 }), "{effects:?}");
    assert!(spawning.candidate.as_ref().is_some_and(|c| c.waiters.is_empty()));
    // Running and not yet ready: its readiness is waited for again, by the same deadline.
    run.spawned(2);
    let deadline = run
        .machine
        .candidate
        .as_ref()
        .and_then(|c| c.process)
        .map(|p| p.deadline);
    let mut waiting = run.machine.clone();
    let effects = waiting.adopted(run.now);
    assert!(
        has(
            &effects,
            &Effect::WaitReady {
                generation: 2,
                deadline: deadline.expect("a deadline")
            }
        ),
        "{effects:?}"
    );
}

#[test]
fn a_release_change_upgrades_once_the_paths_have_settled_and_changes_meanwhile_restart_the_wait() {
    let mut run = Run::serving(without_watchdog());
    run.step(Input::Changed);
    // A copy still in progress: more changes push the upgrade back, each by the whole settle time.
    assert!(spawns(&run.pass(SECOND)).is_empty());
    run.step(Input::Changed);
    assert!(spawns(&run.pass(SECOND + SECOND / 2)).is_empty(), "settling again");
    let effects = run.pass(SECOND);
    assert_eq!(spawns(&effects), [2], "one upgrade for the burst");
    assert_eq!(
        pick(&effects, |e| match e {
            Effect::Event(Event::UpgradeStarted { trigger, .. }) => Some(*trigger),
            _ => None,
        }),
        [Trigger::Watch]
    );
    // A change while that upgrade runs is one more upgrade after it, not a second one at once.
    run.step(Input::Changed);
    assert!(spawns(&run.pass(3 * SECOND)).is_empty(), "joins the upgrade in flight");
    let mut effects = run.ready(2);
    let record = finished(&effects).pop().expect("a record");
    assert_eq!(record.trigger, Trigger::Watch);
    effects.extend(run.pass(SECOND));
    assert_eq!(spawns(&effects), [3], "the follow-up");
}

#[test]
fn a_worker_past_its_lifetime_is_replaced_with_a_jitter_and_retried_if_that_fails() {
    let policy = Policy {
        max_lifetime: Some(3600 * SECOND),
        ..without_watchdog()
    };
    let due = policy
        .recycle_at("web", 1, Time::from_origin(Duration::ZERO))
        .expect("a lifetime")
        .since(Time::from_origin(Duration::ZERO));
    assert!(due >= 3600 * SECOND && due < 3960 * SECOND, "{due:?}");
    assert_eq!(
        policy.recycle_at("web", 1, Time::from_origin(Duration::ZERO)),
        policy.recycle_at("web", 1, Time::from_origin(Duration::ZERO))
    );
    let others: std::collections::HashSet<_> = ["api", "web", "mail", "db"]
        .iter()
        .map(|name| policy.recycle_at(name, 1, Time::from_origin(Duration::ZERO)))
        .collect();
    assert!(others.len() > 1, "services started together do not recycle together");

    let mut run = Run::serving(policy);
    let started = run.now;
    assert!(spawns(&run.pass(3599 * SECOND)).is_empty(), "not before its lifetime");
    while spawns(&run.pass(SECOND)).is_empty() {
        assert!(
            run.now.since(started) < 3961 * SECOND,
            "recycled within its lifetime and jitter"
        );
    }
    let first = run.now;
    // The new worker never gets ready: the old one serves on and is tried again a minute later.
    run.spawned(2);
    let effects = run.step(Input::NotReady {
        generation: 2,
        error: "no".into(),
    });
    assert_eq!(finished(&effects).pop().map(|r| r.trigger), Some(Trigger::Recycle));
    assert_eq!(run.active(), Some(1));
    while spawns(&run.pass(SECOND)).is_empty() {
        assert!(run.now.since(first) < 62 * SECOND, "retried");
    }
    assert!(run.now.since(first) >= RECYCLE_RETRY, "not before a minute");
    run.ready(3);
    assert_eq!(run.active(), Some(3));
}

#[test]
fn the_prepare_time_is_recorded_apart() {
    let mut run = Run::serving(without_watchdog());
    run.request(Trigger::Api, None);
    run.step(Input::Prepared {
        generation: 2,
        ms: 1234,
    });
    let record = finished(&run.ready(2)).pop().expect("a record");
    assert_eq!(record.phases.prepare_ms, Some(1234));
}

#[test]
fn automatic_upgrades_outside_the_window_wait_for_it_and_an_operators_does_not() {
    let mut run = Run::serving(without_watchdog());
    let opens = run.now + 3600 * SECOND;
    run.step(Input::Window(Some(WindowFacts {
        open: false,
        changes: opens,
    })));
    run.step(Input::Changed);
    let effects = run.pass(10 * SECOND);
    assert!(spawns(&effects).is_empty(), "deferred");
    assert_eq!(events(&effects), ["deferred"]);
    assert_eq!(run.machine.deferred, Some(Trigger::Watch));
    // More changes meanwhile: still one deferred upgrade, told once.
    run.step(Input::Changed);
    assert!(events(&run.pass(10 * SECOND)).is_empty());
    // An operator's upgrade runs at once, window or not; the deferred one still waits.
    let (generation, _) = run.upgrade(None);
    assert_eq!(generation, 2);
    assert_eq!(run.machine.deferred, Some(Trigger::Watch));
    // The window opens: the deferred upgrade runs.
    run.now = opens;
    let effects = run.step(Input::Window(Some(WindowFacts {
        open: true,
        changes: opens + 7200 * SECOND,
    })));
    assert_eq!(spawns(&effects), [3]);
    assert_eq!(run.machine.deferred, None);
    let record = finished(&run.ready(3)).pop().expect("a record");
    assert_eq!(record.trigger, Trigger::Watch);
    // Without a window again, nothing waits.
    run.step(Input::Window(None));
    run.step(Input::Changed);
    assert_eq!(spawns(&run.pass(3 * SECOND)), [4]);
}

#[test]
fn an_earlier_release_starts_again_as_a_new_generation_unless_an_upgrade_is_in_flight() {
    let mut run = Run::serving(without_watchdog());
    run.upgrade(None);
    let effects = run.step(Input::Redeploy { from: 1, waiter: 9 });
    assert_eq!(spawns(&effects), [3]);
    let candidate = run.machine.candidate.clone().expect("a candidate");
    assert_eq!((candidate.trigger, candidate.release), (Trigger::Rollback, Some(1)));
    // Another while it runs is refused, with the reason.
    let effects = run.step(Input::Redeploy { from: 1, waiter: 10 });
    let (waiter, outcome) = replies(&effects).remove(0);
    assert_eq!(waiter, 10);
    assert!(
        matches!(&outcome, Err(ActionError::Conflict(why)) if why.contains("an upgrade is in flight")),
        "{outcome:?}"
    );
    let effects = run.ready(3);
    let (waiter, outcome) = replies(&effects).remove(0);
    let record = outcome.expect("a record");
    assert_eq!(
        (waiter, record.trigger, record.new_generation),
        (9, Trigger::Rollback, 3)
    );
    // An upgrade after it runs the configured command again.
    run.request(Trigger::Api, None);
    assert_eq!(run.machine.candidate.as_ref().and_then(|c| c.release), None);
}

fn canary_policy() -> Policy {
    Policy {
        canary: Some(crate::config::Canary {
            steps: vec![500, 2500, 5000],
            step_time: 30 * SECOND,
            sticky: true,
            max_error_rate: 100,
            min_connections: 20,
        }),
        ..policy()
    }
}

fn tally(connections: u64, failed: u64) -> Tally {
    Tally { connections, failed }
}

fn shares(effects: &[Effect]) -> Vec<u16> {
    pick(effects, |e| match e {
        Effect::Event(Event::CanaryStep { share, .. }) => Some(*share),
        _ => None,
    })
}

#[test]
fn a_canary_rises_step_by_step_then_takes_everything_and_the_window_runs_on() {
    let mut run = Run::serving(canary_policy());
    let (generation, effects) = run.upgrade(None);
    assert_eq!(generation, 2);
    assert_eq!(shares(&effects), [500]);
    assert!(has(&effects, &Effect::Route));
    assert_eq!(
        run.machine
            .watch
            .as_ref()
            .and_then(|w| w.canary.as_ref())
            .map(|c| c.share),
        Some(500)
    );
    // Judged at once and every 200 ms after; good workers keep it going.
    assert!(has(&effects, &Effect::Judge { new: 2, previous: 1 }));
    assert!(has(
        &run.pass(CANARY_JUDGE_EVERY),
        &Effect::Judge { new: 2, previous: 1 }
    ));
    run.step(Input::Judged {
        new: tally(0, 0),
        previous: tally(1000, 2),
    });
    let effects = run.pass(30 * SECOND);
    assert_eq!(shares(&effects), [2500]);
    run.step(Input::Judged {
        new: tally(300, 1),
        previous: tally(1700, 4),
    });
    let effects = run.pass(60 * SECOND);
    assert_eq!(shares(&effects), [5000, 10_000]);
    // Then the watchdog window, as after any switch, and the previous worker drains.
    assert!(run.machine.watch.as_ref().is_some_and(|w| w.canary.is_none()));
    let effects = run.pass(10 * SECOND);
    assert!(has(
        &effects,
        &Effect::Drain {
            generation: 1,
            settle: false
        }
    ));
    let record = finished(&effects).pop().expect("a record");
    assert_eq!(record.result, UpgradeResult::Success);
}

#[test]
fn a_canary_failing_on_live_traffic_is_rolled_back_at_once_with_the_rates() {
    let mut run = Run::serving(canary_policy());
    run.upgrade(None);
    run.step(Input::Judged {
        new: tally(0, 0),
        previous: tally(500, 1),
    });
    // Too few connections to judge yet.
    let effects = run.step(Input::Judged {
        new: tally(10, 5),
        previous: tally(600, 1),
    });
    assert!(finished(&effects).is_empty());
    let effects = run.step(Input::Judged {
        new: tally(40, 8),
        previous: tally(900, 2),
    });
    let record = finished(&effects).pop().expect("rolled back");
    assert_eq!(record.result, UpgradeResult::RolledBack);
    let error = error_of(&record);
    assert!(
        error.contains("8 of 40 connections ended badly on its side (20.0%)"),
        "{error}"
    );
    assert!(error.contains("1 of 400 (0.2%)"), "{error}");
    assert_eq!(run.active(), Some(1), "back on the previous worker");
    assert!(has(&effects, &Effect::Route));
}

#[test]
fn a_canary_is_promoted_or_aborted_and_goes_across_a_reexec() {
    let mut run = Run::serving(canary_policy());
    run.upgrade(None);
    run.pass(30 * SECOND);
    // Through the state, as a re-exec carries it: the step and its deadline go on.
    let text = serde_json::to_string(&run.machine).expect("serialise");
    let adopted: Machine = serde_json::from_str(&text).expect("deserialise");
    assert_eq!(
        adopted.watch.as_ref().and_then(|w| w.canary.as_ref()).map(|c| c.step),
        Some(1)
    );
    run.machine = adopted;
    let effects = run.step(Input::Promote { reply: 3 });
    assert_eq!(shares(&effects), [10_000]);
    assert!(replies(&effects).iter().any(|(w, o)| *w == 3 && o.is_ok()));
    let effects = run.step(Input::Promote { reply: 4 });
    assert!(
        replies(&effects).iter().any(|(w, o)| *w == 4 && o.is_err()),
        "nothing left to promote"
    );
    // The next upgrade's canary is aborted by a rollback: back to the previous worker.
    run.pass(10 * SECOND);
    run.upgrade(None);
    assert!(run.machine.watch.as_ref().is_some_and(|w| w.canary.is_some()));
    let effects = run.step(Input::Rollback { reply: 5 });
    let (_, outcome) = replies(&effects).remove(0);
    assert_eq!(outcome.expect("a record").result, UpgradeResult::RolledBack);
    assert_eq!(run.active(), Some(2));
}
