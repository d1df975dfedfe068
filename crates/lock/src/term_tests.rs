//! The timing argument of [`super`], one rule per test. Holes 1-6 refer to the leadership
//! issue's list of what the lease guardian got wrong; each test here fails on a core that
//! repeats that mistake.

use std::time::Duration;

use super::*;

fn t(secs: f64) -> BootInstant {
    BootInstant::from_nanos((secs * 1e9) as u64)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A core holding a term on lease 1 (TTL 30) opened at `start`, with `promise`.
fn leading(start: f64, promise: Option<f64>) -> LockCore {
    let mut core = LockCore::new();
    core.lease_granted(1, secs(30.0), t(start));
    core.term_started(TermStart::Acquired, 100, 1, promise.map(secs), t(start));
    core
}

#[test]
fn lease_only_term_lasts_ttl_minus_margin_from_the_last_keep_alive_sent() {
    let mut core = leading(10.0, None);
    assert_eq!(core.term_deadline(), Some(t(37.0)));
    core.keep_alive_ok(1, t(20.0));
    assert_eq!(core.term_deadline(), Some(t(47.0)));
    // An answer to an older request never moves the deadline back.
    core.keep_alive_ok(1, t(15.0));
    assert_eq!(core.term_deadline(), Some(t(47.0)));
    assert_eq!(
        core.lock_state(t(46.0), true),
        LockState::Held { valid_for: secs(1.0) }
    );
    assert_eq!(core.lock_state(t(47.0), true), LockState::Lapsed);
}

/// Hole 1: a keep-alive answered "lease not found" followed by a new grant must not extend the
/// deadline of a key that went away with the old lease.
#[test]
fn a_new_grant_never_renews_the_lease_that_carries_the_key() {
    let mut core = leading(0.0, None);
    core.lease_granted(2, secs(30.0), t(40.0));
    assert_eq!(core.term().map(|t| t.lease), Some(1));
    assert_eq!(
        core.term_deadline(),
        Some(t(27.0)),
        "the grant of lease 2 proves nothing"
    );
    assert!(!core.lock_state(t(40.0), true).is_held());
    // The agent resumes after a stall longer than TTL: etcd says lease 1 is gone.
    core.lease_gone(1, t(41.0));
    assert_eq!(core.term(), None);
    assert_eq!(core.ended(), Some(TermEnd::Lost));
    assert!(
        core.fence_deadline().is_some_and(|d| d <= t(41.0)),
        "fence at once"
    );
    assert_eq!(
        core.current_lease().map(|l| l.id),
        Some(2),
        "member key goes on the new lease"
    );
}

/// Hole 2: the deadline uses the TTL the carrying lease was granted with, not the current
/// dynamic `ttl`; a TTL change keeps the old lease until a compare-and-swap moved the key.
#[test]
fn ttl_change_counts_the_old_lease_until_the_key_moves() {
    let mut core = leading(0.0, None);
    core.keep_alive_ok(1, t(10.0));
    // ttl raised from 30 to 60: a new lease is granted, the key is still on lease 1.
    core.lease_granted(2, secs(60.0), t(11.0));
    assert_eq!(core.term_deadline(), Some(t(37.0)), "still 30 s from lease 1");
    let kept: Vec<i64> = core.leases_to_keep().iter().map(|l| l.id).collect();
    assert_eq!(kept, vec![1, 2], "both leases kept alive until the move");
    core.term_started(TermStart::Moved, 140, 2, None, t(12.0));
    assert_eq!(core.term_deadline(), Some(t(11.0 + 60.0 - 6.0)));
    assert_eq!(core.drop_unused_leases(), vec![1]);
}

/// Hole 3: an error or timeout is not a proof. Only accepted writes move the deadline; a
/// refused one ends the term at once.
#[test]
fn only_accepted_heartbeats_count_and_a_refused_one_ends_the_term() {
    let mut core = leading(0.0, Some(3.5));
    assert_eq!(core.term_deadline(), Some(t(3.5)));
    core.heartbeat_ok(100, t(0.5));
    core.heartbeat_ok(100, t(1.0));
    assert_eq!(core.term_deadline(), Some(t(4.5)));
    // Heartbeats of an older term do not count.
    core.heartbeat_ok(99, t(2.0));
    assert_eq!(core.term_deadline(), Some(t(4.5)));
    // Nothing accepted for a while (errors are simply not reported as successes)...
    assert_eq!(core.lock_state(t(4.5), true), LockState::Lapsed);
    // ... then a refusal: the key changed, somebody took over.
    assert!(!core.heartbeat_refused(100, t(5.0)));
    assert_eq!(core.lock_state(t(5.0), true), LockState::Unproven);
    assert_eq!(core.lock_state(t(5.0), false), LockState::NotHeld);
    assert_eq!(core.fence_deadline(), Some(t(4.5)));
}

#[test]
fn fast_takeover_deadline_is_the_earlier_of_lease_and_promise() {
    let mut core = leading(0.0, Some(3.5));
    core.heartbeat_ok(100, t(20.0));
    // T2 = 23.5, T1 = 27: the promise binds.
    assert_eq!(core.term_deadline(), Some(t(23.5)));
    core.heartbeat_ok(100, t(25.0));
    // T2 = 28.5, T1 = 27 without a keep-alive: the lease binds.
    assert_eq!(core.term_deadline(), Some(t(27.0)));
    core.keep_alive_ok(1, t(24.0));
    assert_eq!(core.term_deadline(), Some(t(28.5)));
}

#[test]
fn failsafe_confirmation_extends_both_proofs_until_it_runs_out() {
    let mut core = leading(0.0, Some(3.5));
    core.failsafe_confirmed(t(2.0), secs(30.0));
    assert_eq!(
        core.term_deadline(),
        Some(t(29.0)),
        "the round lifts T1 (27) and T2 (3.5)"
    );
    core.failsafe_confirmed(t(10.0), secs(30.0));
    assert_eq!(core.term_deadline(), Some(t(37.0)));
    assert!(core.failsafe_holds(t(36.9)));
    assert!(!core.failsafe_holds(t(37.0)));
    core.failsafe_over();
    assert_eq!(core.term_deadline(), Some(t(3.5)));
}

#[test]
fn a_move_whose_answer_was_lost_is_adopted_from_a_read_with_its_earliest_send_time() {
    let mut core = leading(0.0, Some(3.5));
    core.heartbeat_ok(100, t(9.0));
    core.lease_granted(2, secs(30.0), t(9.5));
    core.term_start_unknown(TermStart::Moved, 2, Some(secs(3.5)), 100, t(10.0));
    core.term_start_unknown(TermStart::Moved, 2, Some(secs(3.5)), 100, t(11.0));
    // The old term's heartbeat is refused: read before deciding.
    assert!(core.heartbeat_refused(100, t(11.5)));
    core.leader_key_read("me", Some(("me", 2, 130)), t(11.6));
    let term = core.term().copied().expect("the move was applied");
    assert_eq!((term.revision, term.lease, term.started), (130, 2, t(10.0)));
    assert_eq!(core.term_deadline(), Some(t(13.5)));
}

#[test]
fn a_read_showing_someone_else_loses_the_term_and_forgets_the_pending_write() {
    let mut core = leading(0.0, Some(3.5));
    core.term_start_unknown(TermStart::Moved, 1, Some(secs(3.5)), 100, t(1.0));
    core.leader_key_read("me", Some(("other", 7, 150)), t(2.0));
    assert_eq!(core.term(), None);
    assert_eq!(core.pending(), None);
    assert_eq!(core.ended(), Some(TermEnd::Lost));
    assert_eq!(core.fence_deadline(), Some(t(2.0)));
    core.primary_gone();
    assert_eq!(core.fence_deadline(), None);
}

#[test]
fn a_retried_acquire_counts_from_its_first_attempt() {
    let mut core = LockCore::new();
    core.lease_granted(1, secs(30.0), t(0.0));
    core.term_start_unknown(TermStart::Acquired, 1, Some(secs(3.5)), 0, t(1.0));
    core.term_started(TermStart::Acquired, 120, 1, Some(secs(3.5)), t(2.0));
    assert_eq!(core.term().map(|t| t.started), Some(t(1.0)));
    assert_eq!(core.term_deadline(), Some(t(4.5)));
}

#[test]
fn release_fences_whatever_is_left_at_once() {
    let mut core = leading(0.0, Some(3.5));
    core.released(t(1.0));
    assert_eq!(
        core.lock_state(t(1.0), true),
        LockState::NotHeld,
        "a stale view is not a claim"
    );
    assert_eq!(core.fence_deadline(), Some(t(1.0)));
}

/// Hole 6: the watchdog is fed only when the reset it schedules comes before the deadline.
#[test]
fn watchdog_feed_must_not_push_the_reset_past_the_deadline() {
    let mut core = leading(0.0, None);
    // Deadline 27; timeout 25 (ttl 30, safety_margin 5).
    assert!(core.may_feed_watchdog(t(1.9), secs(25.0)));
    assert!(!core.may_feed_watchdog(t(2.1), secs(25.0)), "a reply 2.1 s late");
    core.keep_alive_ok(1, t(10.0));
    assert!(core.may_feed_watchdog(t(11.0), secs(25.0)));
}

#[test]
fn permit_needs_the_deadline_ahead_by_the_slack() {
    let core = leading(0.0, Some(3.5));
    assert!(core.permits_primary(t(3.0), secs(0.4)));
    assert!(!core.permits_primary(t(3.2), secs(0.4)));
    assert!(!LockCore::new().permits_primary(t(0.0), secs(0.0)));
}

#[test]
fn a_gone_current_lease_is_not_offered_for_the_member_key() {
    let mut core = LockCore::new();
    core.lease_granted(1, secs(30.0), t(0.0));
    core.lease_gone(1, t(1.0));
    assert_eq!(core.current_lease(), None);
    assert!(core.leases_to_keep().is_empty());
}
