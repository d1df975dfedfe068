//! A leader whose PostgreSQL crashed or is slow to start (`docs/patroni-compat.md` §4.7): fail over
//! at once with `primary_start_timeout: 0`, give up after the timeout, but only for a member that
//! can take over (Patroni's `is_failover_possible`); otherwise the primary comes back in place.

use std::time::{Duration, Instant};

use pgvigil_api::SyncValue;
use pgvigil_api::cluster::Versioned;
use serde_json::{Map, json};

use crate::sync::SyncMode;
use crate::tests::{cluster, config, history, inputs, peer, running, stopped};
use crate::*;

/// `a` holds the lock and its PostgreSQL crashed; `primary_start_timeout: 0`.
fn crashed_a(peers: Option<&[PeerReport]>) -> Decision {
    let mut cfg = config("a");
    cfg.primary_start_timeout = Duration::ZERO;
    crashed_with(&cfg, &cluster(Some("a")), peers)
}

fn crashed_with(
    cfg: &EngineConfig,
    view: &pgvigil_api::ClusterView,
    peers: Option<&[PeerReport]>,
) -> Decision {
    let pg = stopped(ControlState::InProduction);
    decide(&inputs(cfg, Some(view), &pg, &Memory::default(), peers, None))
}

fn replica(name: &str, lsn: u64) -> PeerReport {
    peer(name, "replica", lsn, Map::new())
}

#[test]
fn a_crash_with_primary_start_timeout_0_asks_the_members_first() {
    let d = crashed_a(None);
    assert_eq!(d.actions, vec![Action::QueryPeers], "{d:?}");
}

#[test]
fn a_crash_with_primary_start_timeout_0_fails_over_when_a_replica_can_take_over() {
    let d = crashed_a(Some(&[replica("bb", 1000), replica("ccc", 1000)]));
    assert_eq!(d.actions, vec![Action::ReleaseLock], "{d:?}");
    assert_eq!(d.message, "stopped PostgreSQL to fail over after a crash");
}

#[test]
fn a_crash_with_primary_start_timeout_0_restarts_in_place_when_nobody_can_take_over() {
    let start = vec![Action::Start(StartAs::Primary)];
    // Unreachable.
    let gone = PeerReport {
        name: "bb".into(),
        status: None,
    };
    assert_eq!(crashed_a(Some(&[gone])).actions, start);
    // Lagging past maximum_lag_on_failover behind the last published position.
    let mut view = cluster(Some("a"));
    view.status.optime = 10_000_000;
    let mut cfg = config("a");
    cfg.primary_start_timeout = Duration::ZERO;
    let d = crashed_with(&cfg, &view, Some(&[replica("bb", 1000), replica("ccc", 1000)]));
    assert_eq!(d.actions, start, "{d:?}");
    // Not allowed to promote (by its answer or by its member key), or its watchdog failed.
    let nofailover = peer(
        "bb",
        "replica",
        1000,
        json!({"nofailover": true}).as_object().unwrap().clone(),
    );
    assert_eq!(crashed_a(Some(&[nofailover])).actions, start);
    let mut watchdog = replica("bb", 1000);
    watchdog.status.as_mut().unwrap().watchdog_failed = Some(true);
    assert_eq!(crashed_a(Some(&[watchdog])).actions, start);
    let mut view = cluster(Some("a"));
    for m in view.members.iter_mut().filter(|m| m.name != "a") {
        m.data.tags = json!({"failover_priority": 0}).as_object().unwrap().clone();
    }
    // Nobody may promote: no need to ask anyone.
    assert_eq!(crashed_with(&cfg, &view, None).actions, start);
    // With check_timeline, a member behind the cluster's timeline does not count.
    let mut view = cluster(Some("a"));
    view.history = Some(Versioned {
        value: vec![history(1, 500)],
        mod_revision: 5,
    });
    cfg.check_timeline = true;
    let mut behind = replica("bb", 1000);
    behind.status.as_mut().unwrap().timeline = Some(1);
    assert_eq!(crashed_with(&cfg, &view, Some(&[behind])).actions, start);
    let mut current = replica("bb", 1000);
    current.status.as_mut().unwrap().timeline = Some(2);
    assert_eq!(
        crashed_with(&cfg, &view, Some(&[current])).actions,
        vec![Action::ReleaseLock]
    );
}

#[test]
fn a_lone_leader_restarts_in_place_without_asking() {
    let mut view = cluster(Some("a"));
    view.members.retain(|m| m.name == "a");
    let mut cfg = config("a");
    cfg.primary_start_timeout = Duration::ZERO;
    let d = crashed_with(&cfg, &view, None);
    assert_eq!(d.actions, vec![Action::Start(StartAs::Primary)], "{d:?}");
}

#[test]
fn in_synchronous_mode_only_a_synchronous_standby_can_take_over_after_a_crash() {
    let mut view = cluster(Some("a"));
    view.sync = Some(Versioned {
        value: SyncValue {
            leader: Some("a".into()),
            quorum: 0,
            sync_standby: Some("bb".into()),
        },
        mod_revision: 6,
    });
    let mut cfg = config("a");
    cfg.primary_start_timeout = Duration::ZERO;
    cfg.synchronous_mode = SyncMode::On;
    let gone = PeerReport {
        name: "bb".into(),
        status: None,
    };
    let d = crashed_with(&cfg, &view, Some(&[gone, replica("ccc", 1000)]));
    assert_eq!(d.actions, vec![Action::Start(StartAs::Primary)], "{d:?}");
    let d = crashed_with(&cfg, &view, Some(&[replica("bb", 1000), replica("ccc", 1000)]));
    assert_eq!(d.actions, vec![Action::ReleaseLock], "{d:?}");

    // Quorum mode: more than `quorum` healthy voters.
    view.sync.as_mut().unwrap().value = SyncValue {
        leader: Some("a".into()),
        quorum: 1,
        sync_standby: Some("bb,ccc".into()),
    };
    cfg.synchronous_mode = SyncMode::Quorum;
    let d = crashed_with(&cfg, &view, Some(&[replica("bb", 1000)]));
    assert_eq!(d.actions, vec![Action::Start(StartAs::Primary)], "{d:?}");
    let d = crashed_with(&cfg, &view, Some(&[replica("bb", 1000), replica("ccc", 1000)]));
    assert_eq!(d.actions, vec![Action::ReleaseLock], "{d:?}");
}

#[test]
fn a_primary_start_past_the_timeout_is_abandoned_only_for_someone_who_can_take_over() {
    let cfg = config("a");
    let view = cluster(Some("a"));
    let pg = LocalPg {
        observed: None,
        ..running(false, 1, 1000, None)
    };
    let memory = Memory {
        primary_restart_since: Some(Instant::now() - Duration::from_secs(301)),
        ..Default::default()
    };
    let decide_with_peers =
        |peers: Option<&[PeerReport]>| decide(&inputs(&cfg, Some(&view), &pg, &memory, peers, None));
    assert_eq!(decide_with_peers(None).actions, vec![Action::QueryPeers]);
    let d = decide_with_peers(Some(&[replica("bb", 1000)]));
    assert_eq!(
        d.actions,
        vec![Action::Demote(DemoteMode::ImmediateNoLock), Action::ReleaseLock],
        "{d:?}"
    );
    assert_eq!(d.message, "stopped PostgreSQL because of startup timeout");
    let gone = PeerReport {
        name: "bb".into(),
        status: None,
    };
    let d = decide_with_peers(Some(&[gone]));
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(
        d.message,
        "primary start has timed out, but continuing to wait because failover is not possible"
    );
}

/// A crashed primary whose start fails lets the lock go; once another member leads, it rewinds
/// against it (its WAL may have diverged) and follows, never starting as a primary again.
#[test]
fn a_crashed_primary_that_fails_to_start_demotes_and_follows_the_new_leader() {
    let cfg = config("a");
    let pg = stopped(ControlState::InProduction);
    let failed = Memory {
        start_failed: true,
        ..Default::default()
    };
    let d = decide(&inputs(&cfg, Some(&cluster(Some("a"))), &pg, &failed, None, None));
    assert_eq!(d.actions, vec![Action::ReleaseLock], "{d:?}");

    let mut view = cluster(Some("bb"));
    view.members[1].data.timeline = Some(2);
    view.history = Some(Versioned {
        value: vec![history(1, 1000)],
        mod_revision: 5,
    });
    let d = decide(&inputs(&cfg, Some(&view), &pg, &failed, None, None));
    assert_eq!(d.actions, vec![Action::Rewind { source: "bb".into() }], "{d:?}");
    // Once rewound (a clean replica data directory), it starts following the new leader.
    let rewound = stopped(ControlState::ShutDownInRecovery);
    let d = decide(&inputs(
        &cfg,
        Some(&view),
        &rewound,
        &Memory::default(),
        None,
        None,
    ));
    assert_eq!(
        d.actions,
        vec![Action::Start(StartAs::Replica {
            upstream: Some("bb".into())
        })],
        "{d:?}"
    );
}

/// A leader that let the key go after a crash stays out of the race for a moment, so a replica
/// with the same WAL takes over instead of the key coming straight back (Patroni's demotion
/// sleeps 2 s before starting PostgreSQL again).
#[test]
fn a_leader_that_released_the_key_gives_the_others_time_to_take_it() {
    let cfg = config("a");
    let view = cluster(None);
    let pg = running(true, 1, 1000, None);
    let now = Instant::now();
    let memory = |ago: Duration| Memory {
        released_lock_at: Some(now - ago),
        ..Default::default()
    };
    let peers = [replica("bb", 1000), replica("ccc", 1000)];
    let decide_after = |ago: Duration| {
        let memory = memory(ago);
        let mut i = inputs(&cfg, Some(&view), &pg, &memory, Some(&peers), None);
        i.now = now;
        decide(&i)
    };
    let d = decide_after(Duration::from_millis(500));
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(d.recheck_in, Some(Duration::from_millis(1500)), "{d:?}");
    let d = decide_after(RELEASE_BACKOFF);
    assert_eq!(d.actions, vec![Action::AcquireLock], "{d:?}");
}
