//! The rules that depend on the leader lock as `Leadership` holds it: the fast takeover, a key
//! that names us without a term (adoption), a lapsed term, and configuration changes on a
//! primary without the lock (the restart/sync-safety issue).

use std::time::Duration;

use serde_json::{Map, json};

use crate::tests::{cluster, config, inputs, peer, running, stopped};
use crate::*;
use pgvigil_api::ClusterView;

fn mem() -> &'static Memory {
    static MEMORY: std::sync::OnceLock<Memory> = std::sync::OnceLock::new();
    MEMORY.get_or_init(Memory::default)
}

fn silence(leader: &str, silent_for: f64) -> Silence {
    Silence {
        leader: leader.into(),
        leader_revision: 3,
        heartbeat_revision: 8,
        promise: Duration::from_millis(3500),
        silent_for: Duration::from_secs_f64(silent_for),
    }
}

fn replica() -> LocalPg {
    running(true, 1, 1000, Some(("127.0.0.1", 5433)))
}

fn takeover() -> Action {
    Action::TakeOver {
        from: "a".into(),
        leader_revision: 3,
        heartbeat_revision: 8,
        config_revision: 2,
    }
}

fn decide_silent(
    cfg: &EngineConfig,
    view: &ClusterView,
    pg: &LocalPg,
    s: &Silence,
    peers: &[PeerReport],
) -> Decision {
    let mut i = inputs(cfg, Some(view), pg, mem(), Some(peers), None);
    i.silence = Some(s);
    decide(&i)
}

#[test]
fn a_replica_takes_over_from_a_leader_silent_past_its_promise_and_margin() {
    let view = cluster(Some("a"));
    let peers = [peer("ccc", "replica", 900, Map::new())];
    let cfg = config("bb");
    let d = decide_silent(&cfg, &view, &replica(), &silence("a", 4.0), &peers);
    assert_eq!(d.actions, vec![takeover()], "{d:?}");
    assert!(d.message.contains("taking over from a"), "{}", d.message);
    // Within promise + margin (3.5 + 0.5): the leader may still be fencing itself.
    let d = decide_silent(&cfg, &view, &replica(), &silence("a", 3.9), &peers);
    assert!(!d.actions.contains(&takeover()), "{d:?}");
    assert!(d.message.contains("following a leader"), "{}", d.message);
}

#[test]
fn takeover_needs_the_peers_and_defers_to_a_healthier_one() {
    let view = cluster(Some("a"));
    let cfg = config("bb");
    let s = silence("a", 10.0);
    let pg = replica();
    let mut i = inputs(&cfg, Some(&view), &pg, mem(), None, None);
    i.silence = Some(&s);
    assert_eq!(decide(&i).actions, vec![Action::QueryPeers]);
    let ahead = [peer("ccc", "replica", 2000, Map::new())];
    let d = decide_silent(&cfg, &view, &replica(), &s, &ahead);
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.message.contains("ccc has more WAL"), "{}", d.message);
}

#[test]
fn no_takeover_from_a_silence_that_does_not_match_the_key_or_when_not_allowed() {
    let view = cluster(Some("a"));
    let peers = [peer("ccc", "replica", 900, Map::new())];
    let cfg = config("bb");
    // The silence is of another leader, or of an older write of the key.
    for s in [
        silence("ccc", 10.0),
        Silence {
            leader_revision: 2,
            ..silence("a", 10.0)
        },
    ] {
        let d = decide_silent(&cfg, &view, &replica(), &s, &peers);
        assert!(
            d.actions.iter().all(|a| !matches!(a, Action::TakeOver { .. })),
            "{d:?}"
        );
    }
    // Fast takeover switched off.
    let mut off = config("bb");
    off.fast_takeover = false;
    assert!(
        decide_silent(&off, &view, &replica(), &silence("a", 10.0), &peers)
            .actions
            .is_empty()
    );
    // nofailover.
    let mut nf = config("bb");
    nf.tags.insert("nofailover".into(), json!(true));
    assert!(
        decide_silent(&nf, &view, &replica(), &silence("a", 10.0), &peers)
            .actions
            .is_empty()
    );
    // Paused.
    let mut paused = cluster(Some("a"));
    paused.config.as_mut().unwrap().value = json!({"pause": true});
    assert!(
        decide_silent(&cfg, &paused, &replica(), &silence("a", 10.0), &peers)
            .actions
            .is_empty()
    );
    // A primary never takes over: it is a stale one and goes down.
    let primary = running(false, 1, 1000, None);
    let d = decide_silent(&cfg, &view, &primary, &silence("a", 10.0), &peers);
    assert_eq!(d.actions, vec![Action::Demote(DemoteMode::ImmediateNoLock)]);
}

#[test]
fn a_leader_that_vouched_over_failsafe_is_neither_raced_nor_taken_over() {
    let mut cfg = config("bb");
    cfg.failsafe_mode = true;
    let peers = [peer("ccc", "replica", 900, Map::new())];
    // The key is gone (etcd lost it) but `a` confirmed itself to us within ttl: follow it.
    let mut view = cluster(None);
    view.members[0].data.role = "primary".into();
    // Streaming from bb until now.
    let pg = running(true, 1, 1000, Some(("127.0.0.1", 5434)));
    let mut i = inputs(&cfg, Some(&view), &pg, mem(), Some(&peers), None);
    i.failsafe_leader = Some("a");
    let d = decide(&i);
    assert!(!d.actions.contains(&Action::AcquireLock), "{d:?}");
    assert_eq!(
        d.actions,
        vec![Action::Follow {
            upstream: Some("a".into())
        }]
    );
    // With the key present and `a` silent: no takeover either.
    let view = cluster(Some("a"));
    let s = silence("a", 10.0);
    let mut i = inputs(&cfg, Some(&view), &pg, mem(), Some(&peers), None);
    i.failsafe_leader = Some("a");
    i.silence = Some(&s);
    assert!(
        decide(&i)
            .actions
            .iter()
            .all(|a| !matches!(a, Action::TakeOver { .. }))
    );
}

#[test]
fn a_key_naming_us_without_a_term_is_adopted_before_anything_else() {
    let view = cluster(Some("a"));
    let cfg = config("a");
    for pg in [
        running(false, 1, 1000, None),
        replica(),
        stopped(ControlState::InProduction),
    ] {
        let mut i = inputs(&cfg, Some(&view), &pg, mem(), None, None);
        i.lock = LockState::Unproven;
        i.config_pending = true;
        let d = decide(&i);
        let replica = pg.observed.as_ref().is_some_and(|o| o.in_recovery);
        let expected = if replica {
            vec![Action::ApplyConfig, Action::AdoptLock { leader_revision: 3 }]
        } else {
            vec![Action::AdoptLock { leader_revision: 3 }]
        };
        assert_eq!(d.actions, expected, "{pg:?}: {d:?}");
    }
}

#[test]
fn a_lapsed_term_takes_a_primary_down_and_starts_nothing() {
    let view = cluster(Some("a"));
    let cfg = config("a");
    let primary = running(false, 1, 1000, None);
    let mut i = inputs(&cfg, Some(&view), &primary, mem(), None, None);
    i.lock = LockState::Lapsed;
    assert_eq!(
        decide(&i).actions,
        vec![Action::Demote(DemoteMode::ImmediateNoLock)]
    );
    let down = stopped(ControlState::InProduction);
    let mut i = inputs(&cfg, Some(&view), &down, mem(), None, None);
    i.lock = LockState::Lapsed;
    assert!(decide(&i).actions.is_empty());
}

/// The restart/sync-safety issue: a primary without the lock is demoted first and its
/// configuration is left alone, whatever changed.
#[test]
fn primary_without_the_lock_is_demoted_first_and_gets_no_config_action() {
    let cfg = config("a");
    let primary = running(false, 1, 1000, None);
    for (view, lock) in [
        (cluster(Some("bb")), LockState::NotHeld),
        (cluster(Some("a")), LockState::Unproven),
        (cluster(Some("a")), LockState::Lapsed),
    ] {
        let mut i = inputs(&cfg, Some(&view), &primary, mem(), None, None);
        i.lock = lock;
        i.config_pending = true;
        let d = decide(&i);
        assert!(!d.actions.contains(&Action::ApplyConfig), "{lock:?}: {d:?}");
    }
    let view = cluster(Some("bb"));
    let mut i = inputs(&cfg, Some(&view), &primary, mem(), None, None);
    i.config_pending = true;
    assert_eq!(
        decide(&i).actions,
        vec![Action::Demote(DemoteMode::ImmediateNoLock)]
    );
    // Paused: the primary keeps running without the lock, and still gets no configuration.
    let mut paused = cluster(Some("bb"));
    paused.config.as_mut().unwrap().value = json!({"pause": true});
    let mut i = inputs(&cfg, Some(&paused), &primary, mem(), None, None);
    i.config_pending = true;
    assert!(decide(&i).actions.is_empty());
    // Etcd unreachable and no proof of the lock.
    let mut i = inputs(&cfg, None, &primary, mem(), None, None);
    i.config_pending = true;
    assert_eq!(decide(&i).actions, vec![Action::Demote(DemoteMode::Offline)]);
}

#[test]
fn configuration_changes_apply_to_replicas_and_to_a_primary_holding_the_lock() {
    let replica_view = cluster(Some("a"));
    let cfg = config("bb");
    let pg = replica();
    let mut i = inputs(&cfg, Some(&replica_view), &pg, mem(), None, None);
    i.config_pending = true;
    assert_eq!(decide(&i).actions.first(), Some(&Action::ApplyConfig));
    let cfg = config("a");
    let primary = running(false, 1, 1000, None);
    let mut i = inputs(&cfg, Some(&replica_view), &primary, mem(), None, None);
    i.config_pending = true;
    assert_eq!(
        decide(&i).actions,
        vec![Action::ApplyConfig, crate::tests::housekeeping_a()]
    );
    // Nothing pending, nothing applied.
    i.config_pending = false;
    assert_eq!(decide(&i).actions, vec![crate::tests::housekeeping_a()]);
}

#[test]
fn a_required_watchdog_that_cannot_be_armed_keeps_the_node_from_leading() {
    let view = cluster(Some("a"));
    let cfg = config("a");
    let primary = running(false, 1, 1000, None);
    let mut i = inputs(&cfg, Some(&view), &primary, mem(), None, None);
    i.watchdog_failed = true;
    assert_eq!(
        decide(&i).actions,
        vec![Action::Demote(DemoteMode::ImmediateNoLock), Action::ReleaseLock]
    );
    let pg = replica();
    let mut i = inputs(&cfg, Some(&view), &pg, mem(), None, None);
    i.watchdog_failed = true;
    assert_eq!(decide(&i).actions, vec![Action::ReleaseLock]);
    i.watchdog_failed = false;
    assert_eq!(decide(&i).actions, vec![Action::Promote]);
}

#[test]
fn a_failed_cluster_read_does_not_demote_a_leader_whose_lock_is_proven() {
    let cfg = config("a");
    let primary = running(false, 1, 1000, None);
    let mut i = inputs(&cfg, None, &primary, mem(), None, None);
    i.lock = LockState::Held {
        valid_for: Duration::from_secs(3),
    };
    let d = decide(&i);
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.message.contains("leader lock is still proven"), "{}", d.message);
}
