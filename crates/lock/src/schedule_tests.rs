//! The driver's schedule, one rule per test, with hand-fed answers and explicit times.

use std::time::Duration;

use super::*;
use crate::term::LockState;

fn t(secs: f64) -> BootInstant {
    BootInstant::from_nanos((secs * 1e9) as u64)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn settings(promise: Option<f64>) -> LockSettings {
    LockSettings {
        ttl: secs(30.0),
        renew_every: secs(10.0),
        heartbeat_interval: secs(0.5),
        promise: promise.map(secs),
        failsafe_mode: false,
    }
}

/// A scheduler and its core, with the shell's part done by hand.
struct Harness {
    s: Scheduler,
    core: LockCore,
    settings: LockSettings,
}

impl Harness {
    fn new(promise: Option<f64>) -> Harness {
        Harness {
            s: Scheduler::new("me", t(0.0)),
            core: LockCore::new(),
            settings: settings(promise),
        }
    }

    fn poll(&mut self, now: f64) -> Step {
        self.s.poll(&mut self.core, t(now), &self.settings, true)
    }

    fn answer(&mut self, id: OpId, result: OpResult, now: f64) -> Step {
        self.s
            .on_result(&mut self.core, id, result, t(now), &self.settings)
    }

    /// Polls at `now`, which must start exactly one op.
    fn only_op(&mut self, now: f64) -> (OpId, Op) {
        let step = self.poll(now);
        assert_eq!(step.ops.len(), 1, "{step:?}");
        step.ops.into_iter().next().unwrap()
    }

    /// A lease (7) granted and a term (revision 100) opened, both sent at 0.
    fn leading(promise: Option<f64>) -> Harness {
        let mut h = Harness::new(promise);
        let request = h.s.open(TermOpening::Acquire);
        let (grant, op) = h.only_op(0.0);
        assert_eq!(op, Op::Grant { ttl: secs(30.0) });
        let step = h.answer(grant, OpResult::Grant(Ok(7)), 0.0);
        assert!(step.notices.contains(&Notice::WakeLoop));
        let (open, op) = h.only_op(0.0);
        assert!(
            matches!(
                op,
                Op::Open {
                    how: TermOpening::Acquire,
                    lease: 7,
                    ..
                }
            ),
            "{op:?}"
        );
        let step = h.answer(open, OpResult::Written(Ok(Written::Applied(100))), 0.02);
        assert!(step.notices.contains(&Notice::Reply {
            request,
            answer: Ok(true)
        }));
        h
    }

    fn heartbeats(step: &Step) -> Vec<OpId> {
        step.ops
            .iter()
            .filter(|(_, op)| matches!(op, Op::Heartbeat { .. }))
            .map(|(id, _)| *id)
            .collect()
    }
}

#[test]
fn an_open_waits_for_the_first_lease_and_a_failed_grant_answers_it() {
    let mut h = Harness::new(Some(3.5));
    let request = h.s.open(TermOpening::Acquire);
    let (grant, _) = h.only_op(0.0);
    // No second grant while one is in flight.
    assert!(h.poll(0.2).ops.is_empty());
    let step = h.answer(grant, OpResult::Grant(Err("etcd down".into())), 0.3);
    assert!(step.notices.contains(&Notice::Reply {
        request,
        answer: Err("no etcd lease: etcd down".into())
    }));
    // Retried after RETRY, not before.
    assert!(h.poll(0.5).ops.is_empty());
    assert_eq!(h.s.next_wakeup(), t(0.8));
    let (_, op) = h.only_op(0.8);
    assert_eq!(op, Op::Grant { ttl: secs(30.0) });
}

#[test]
fn an_opened_term_heartbeats_every_h_pipelined_up_to_the_limit() {
    let mut h = Harness::leading(Some(3.5));
    let first = h.poll(0.02);
    let hb = Harness::heartbeats(&first);
    assert_eq!(
        hb.len(),
        1,
        "a heartbeat at once after the term opened: {first:?}"
    );
    let value = first.ops.iter().find_map(|(_, op)| match op {
        Op::Heartbeat { term, lease, value } => Some((*term, *lease, value.clone())),
        _ => None,
    });
    let promise = HeartbeatValue::new("me", secs(3.5), secs(0.5)).to_json();
    assert_eq!(value, Some((100, 7, Some(promise))));
    // Unanswered heartbeats do not hold back the next ones...
    let mut sent = 1;
    for i in 1..10 {
        let now = 0.02 + 0.5 * f64::from(i);
        sent += Harness::heartbeats(&h.poll(now)).len();
    }
    // ... up to the pipeline limit (those of one attempt timeout); with it full no timer is
    // set into the past.
    assert_eq!(sent, Scheduler::heartbeat_pipeline(secs(0.5)));
    assert!(h.s.next_wakeup() > t(4.52));
}

/// With a short H the pipeline holds every heartbeat of one attempt timeout: lost ones (each
/// answered only by its timeout) must not stop the next ones for 2 s when F is shorter.
#[test]
fn a_short_heartbeat_interval_keeps_heartbeats_going_through_an_attempt_timeout() {
    assert_eq!(Scheduler::heartbeat_pipeline(secs(0.5)), 5);
    assert_eq!(Scheduler::heartbeat_pipeline(secs(0.064)), 32);
    assert_eq!(Scheduler::heartbeat_pipeline(secs(1.0)), MAX_HEARTBEATS_IN_FLIGHT);
    let mut h = Harness::leading(Some(1.5));
    h.settings.heartbeat_interval = secs(0.1);
    // Nothing answered for 2 s: a heartbeat still goes out every H.
    let mut sent = 0;
    for i in 1..=20u64 {
        let now = BootInstant::from_nanos(i * 100_000_000);
        sent += Harness::heartbeats(&h.s.poll(&mut h.core, now, &h.settings, true)).len();
    }
    assert_eq!(sent, 20);
}

#[test]
fn only_answered_heartbeats_move_the_deadline_from_their_send_time() {
    let mut h = Harness::leading(Some(3.5));
    assert_eq!(h.core.term_deadline(), Some(t(3.5)));
    let hb = Harness::heartbeats(&h.poll(1.0));
    let step = h.answer(hb[0], OpResult::Written(Ok(Written::Applied(101))), 2.9);
    assert!(step.notices.contains(&Notice::Proved));
    assert_eq!(
        h.core.term_deadline(),
        Some(t(4.5)),
        "sent at 1.0, answered at 2.9"
    );
    let hb = Harness::heartbeats(&h.poll(3.0));
    h.answer(hb[0], OpResult::Written(Err("timeout".into())), 5.0);
    assert_eq!(h.core.term_deadline(), Some(t(4.5)), "a timeout proves nothing");
    assert_eq!(h.core.lock_state(t(5.0), true), LockState::Lapsed);
}

#[test]
fn a_refused_heartbeat_loses_the_term_and_wakes_the_loop() {
    let mut h = Harness::leading(Some(3.5));
    let hb = Harness::heartbeats(&h.poll(1.0));
    let step = h.answer(hb[0], OpResult::Written(Ok(Written::Refused)), 1.1);
    assert!(step.notices.contains(&Notice::LockLost), "{step:?}");
    assert!(step.notices.contains(&Notice::WakeLoop));
    assert_eq!(h.core.term(), None);
    assert_eq!(h.core.fence_deadline(), Some(t(1.1)));
}

fn keep_alives(step: &Step) -> Vec<OpId> {
    step.ops
        .iter()
        .filter(|(_, op)| matches!(op, Op::KeepAlive { lease: 7 }))
        .map(|(id, _)| *id)
        .collect()
}

#[test]
fn keep_alives_run_every_renew_interval_from_the_last_accepted_send() {
    let mut h = Harness::leading(None);
    // Lease granted (sent) at 0: first keep-alive due at 10.
    assert!(keep_alives(&h.poll(9.9)).is_empty());
    let ka = keep_alives(&h.poll(10.0));
    let step = h.answer(ka[0], OpResult::KeepAlive(Ok(true)), 10.2);
    assert!(step.notices.contains(&Notice::Proved));
    assert_eq!(h.core.lease(7).map(|l| l.renewed), Some(t(10.0)));
    assert!(keep_alives(&h.poll(19.9)).is_empty());
    assert_eq!(keep_alives(&h.poll(20.0)).len(), 1);
}

/// A keep-alive lost on the way is followed by another after RETRY, not after the attempt's
/// timeout: with `ttl: 10` (deadline 8 s after the last accepted keep-alive, one every 3.3 s)
/// two lost ones in a row used to fence a healthy leader.
#[test]
fn an_unanswered_keep_alive_is_followed_by_another_every_retry() {
    let mut h = Harness::leading(None);
    let first = keep_alives(&h.poll(10.0));
    assert_eq!(first.len(), 1);
    assert!(keep_alives(&h.poll(10.4)).is_empty());
    assert_eq!(h.s.next_wakeup(), t(10.5));
    let second = keep_alives(&h.poll(10.5));
    assert_eq!(second.len(), 1, "no answer yet: another one");
    let third = keep_alives(&h.poll(11.0));
    // The second is accepted; the others time out later: the schedule follows the accepted one.
    h.answer(second[0], OpResult::KeepAlive(Ok(true)), 11.1);
    h.answer(first[0], OpResult::KeepAlive(Err("timed out".into())), 12.0);
    h.answer(third[0], OpResult::KeepAlive(Err("timed out".into())), 13.0);
    assert_eq!(h.core.lease(7).map(|l| l.renewed), Some(t(10.5)));
    assert!(
        keep_alives(&h.poll(20.4)).is_empty(),
        "the next one 10 s after 10.5"
    );
    assert_eq!(keep_alives(&h.poll(20.5)).len(), 1);
    // A failure answered early brings the next one no later than RETRY after it.
    let mut h2 = Harness::leading(None);
    let ka = keep_alives(&h2.poll(10.0));
    h2.answer(ka[0], OpResult::KeepAlive(Err("unavailable".into())), 10.1);
    assert_eq!(h2.s.poll(&mut h2.core, t(10.1), &h2.settings, true).ops.len(), 0);
    assert_eq!(h2.s.next_wakeup(), t(10.5));
    // At most MAX_KEEP_ALIVES_IN_FLIGHT wait at once.
    let mut sent = 1;
    for i in 1..20 {
        sent += keep_alives(&h.poll(20.5 + 0.5 * f64::from(i))).len();
    }
    assert_eq!(sent, MAX_KEEP_ALIVES_IN_FLIGHT);
}

#[test]
fn a_gone_lease_ends_the_term_and_a_new_lease_is_granted() {
    let mut h = Harness::leading(Some(3.5));
    let ka = h
        .poll(10.0)
        .ops
        .into_iter()
        .find(|(_, op)| matches!(op, Op::KeepAlive { .. }))
        .map(|(id, _)| id)
        .unwrap();
    let step = h.answer(ka, OpResult::KeepAlive(Ok(false)), 10.1);
    assert!(step.notices.contains(&Notice::LeaseGone { lease: 7 }));
    assert!(step.notices.contains(&Notice::WakeLoop));
    assert_eq!(h.core.term(), None);
    let step = h.poll(10.1);
    assert!(
        step.ops.contains(&(step.ops[0].0, Op::Grant { ttl: secs(30.0) })),
        "{step:?}"
    );
}

#[test]
fn a_stalled_loop_stops_every_proof() {
    let mut h = Harness::leading(Some(3.5));
    let step = h.s.poll(&mut h.core, t(1.0), &h.settings, false);
    assert!(step.ops.is_empty(), "{step:?}");
    assert_eq!(step.notices, vec![Notice::LoopStalled]);
    let step = h.s.poll(&mut h.core, t(1.5), &h.settings, false);
    assert!(
        step.ops.is_empty() && step.notices.is_empty(),
        "said once: {step:?}"
    );
    // The deadline passes meanwhile: the HA loop is told once.
    let step = h.s.poll(&mut h.core, t(12.0), &h.settings, false);
    assert_eq!(step.notices, vec![Notice::WakeLoop]);
    assert!(step.ops.is_empty(), "no keep-alive either: {step:?}");
    // Back: proofs resume.
    let step = h.poll(12.5);
    assert_eq!(Harness::heartbeats(&step).len(), 1, "{step:?}");
}

#[test]
fn the_loop_is_woken_once_when_the_deadline_passes() {
    let mut h = Harness::leading(Some(3.5));
    // Heartbeats go unanswered.
    for i in 0..7 {
        h.poll(0.5 * f64::from(i));
    }
    assert_eq!(h.s.next_wakeup(), t(3.5), "the deadline is the next wake-up");
    assert!(h.poll(3.5).notices.contains(&Notice::WakeLoop));
    assert!(!h.poll(3.6).notices.contains(&Notice::WakeLoop));
}

#[test]
fn an_open_with_an_unknown_outcome_reads_the_key_and_adopts_it_from_its_first_send() {
    let mut h = Harness::new(Some(3.5));
    let request = h.s.open(TermOpening::Acquire);
    let (grant, _) = h.only_op(0.0);
    h.answer(grant, OpResult::Grant(Ok(7)), 0.0);
    let (open, _) = h.only_op(1.0);
    let step = h.answer(open, OpResult::Written(Err("timeout".into())), 3.0);
    assert!(matches!(
        step.notices.as_slice(),
        [Notice::Reply { request: r, answer: Err(_) }] if *r == request
    ));
    let read = step.ops.iter().find(|(_, op)| *op == Op::ReadLeader).unwrap().0;
    // A failed read is retried; the write stays pending.
    let step = h.answer(read, OpResult::Read(Err("unavailable".into())), 3.1);
    assert!(step.ops.is_empty());
    let (read, op) = h.only_op(3.6);
    assert_eq!(op, Op::ReadLeader);
    let key = LeaderKey {
        value: "me".into(),
        lease: 7,
        mod_revision: 120,
    };
    h.answer(read, OpResult::Read(Ok(Some(key))), 3.7);
    let term = h.core.term().copied().expect("adopted");
    assert_eq!((term.revision, term.started), (120, t(1.0)));
    assert_eq!(h.core.term_deadline(), Some(t(4.5)));
}

#[test]
fn a_ttl_change_moves_the_term_to_a_new_lease_and_revokes_the_old_one() {
    let mut h = Harness::leading(None);
    h.settings.ttl = secs(60.0);
    let step = h.poll(1.0);
    let (grant, _) = step
        .ops
        .iter()
        .find(|(_, op)| *op == Op::Grant { ttl: secs(60.0) })
        .cloned()
        .expect("a lease with the new ttl");
    h.answer(grant, OpResult::Grant(Ok(8)), 1.1);
    let step = h.poll(1.1);
    assert!(step.notices.contains(&Notice::Moving {
        from_lease: 7,
        to_lease: 8,
        promise: None
    }));
    let (mv, op) = step
        .ops
        .iter()
        .find(|(_, op)| matches!(op, Op::Open { .. }))
        .cloned()
        .unwrap();
    assert_eq!(
        op,
        Op::Open {
            how: TermOpening::Move { leader_revision: 100 },
            lease: 8,
            heartbeat: None
        }
    );
    // Only one move at a time.
    assert!(
        !h.poll(1.2)
            .ops
            .iter()
            .any(|(_, op)| matches!(op, Op::Open { .. }))
    );
    let step = h.answer(mv, OpResult::Written(Ok(Written::Applied(130))), 1.3);
    assert!(step.ops.iter().any(|(_, op)| *op == Op::Revoke { lease: 7 }));
    assert_eq!(h.core.term().map(|t| (t.revision, t.lease)), Some((130, 8)));
}

#[test]
fn a_refused_move_of_our_own_term_reads_the_key() {
    let mut h = Harness::leading(None);
    h.settings.promise = Some(secs(3.5));
    let (mv, op) = h
        .poll(1.0)
        .ops
        .into_iter()
        .find(|(_, op)| matches!(op, Op::Open { .. }))
        .unwrap();
    assert!(
        matches!(
            op,
            Op::Open {
                heartbeat: Some(_),
                ..
            }
        ),
        "{op:?}"
    );
    let step = h.answer(mv, OpResult::Written(Ok(Written::Refused)), 1.1);
    assert!(step.ops.iter().any(|(_, op)| *op == Op::ReadLeader), "{step:?}");
    assert!(step.notices.iter().all(|n| !matches!(n, Notice::Reply { .. })));
}

#[test]
fn release_answers_at_once_without_a_term_and_ends_the_term_with_one() {
    let mut h = Harness::new(None);
    let request = h.s.release();
    let step = h.poll(0.0);
    assert!(step.notices.contains(&Notice::Reply {
        request,
        answer: Ok(false)
    }));
    let mut h = Harness::leading(None);
    let request = h.s.release();
    let step = h.poll(2.0);
    let (id, _) = step
        .ops
        .iter()
        .find(|(_, op)| *op == Op::Release { term: 100 })
        .cloned()
        .unwrap();
    let step = h.answer(id, OpResult::Released(Ok(true)), 2.1);
    assert!(step.notices.contains(&Notice::Released));
    assert!(step.notices.contains(&Notice::Reply {
        request,
        answer: Ok(true)
    }));
    assert_eq!(h.core.term(), None);
    assert_eq!(h.core.fence_deadline(), Some(t(2.0)), "fence at the send time");
}

#[test]
fn failsafe_rounds_start_only_after_proofs_stop_and_extend_the_deadline() {
    let mut h = Harness::leading(Some(3.5));
    h.settings.failsafe_mode = true;
    let failsafe = |step: &Step| {
        step.ops
            .iter()
            .find(|(_, op)| *op == Op::Failsafe)
            .map(|(id, _)| *id)
    };
    assert!(
        failsafe(&h.poll(1.0)).is_none(),
        "the opening write is a proof at 0"
    );
    let id = failsafe(&h.poll(1.5)).expect("no proof for 1.5 s");
    assert!(failsafe(&h.poll(2.0)).is_none(), "one round at a time");
    let step = h.answer(id, OpResult::Failsafe(true), 2.1);
    assert!(step.notices.contains(&Notice::Proved));
    assert!(step.notices.contains(&Notice::WakeLoop));
    assert_eq!(h.core.term_deadline(), Some(t(1.5 + 27.0)));
    assert!(failsafe(&h.poll(2.4)).is_none(), "at most every second");
    assert!(failsafe(&h.poll(2.5)).is_some());
}

#[test]
fn answers_to_unknown_ops_change_nothing() {
    let mut h = Harness::leading(Some(3.5));
    let before = h.core.term_deadline();
    let step = h.answer(OpId(999), OpResult::Written(Ok(Written::Applied(5))), 1.0);
    assert!(step.ops.is_empty() && step.notices.is_empty());
    assert_eq!(h.core.term_deadline(), before);
}
