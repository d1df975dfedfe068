//! The `nostream` tag (`docs/patroni-compat.md` §3.7, §5.7): such a member follows no upstream
//! (it recovers from the archive with its `restore_command`), whatever `replicatefrom` says,
//! yet it is rewound like any replica, may win a leader race, and is never a synchronous
//! standby (it has no walsender on the primary).

use serde_json::{Map, json};

use crate::following_tests::after_failover;
use crate::sync::{SyncInput, SyncMode, WalSender, candidates};
use crate::tests::{cluster, config, decide_with, peer, running, stopped};
use crate::*;

fn nostream(name: &str) -> EngineConfig {
    let mut cfg = config(name);
    cfg.tags.insert("nostream".into(), json!(true));
    cfg
}

/// A running replica in archive recovery: no WAL receiver, no upstream.
fn archive_replica() -> LocalPg {
    running(true, 1, 1000, None)
}

#[test]
fn a_stopped_nostream_replica_starts_without_an_upstream() {
    let view = cluster(Some("bb"));
    let pg = stopped(ControlState::ShutDownInRecovery);
    assert_eq!(
        decide_with(&nostream("ccc"), Some(&view), &pg, &Memory::default()).actions,
        vec![Action::Start(StartAs::Replica { upstream: None })]
    );
    // Without the tag the same node streams from the leader.
    assert_eq!(
        decide_with(&config("ccc"), Some(&view), &pg, &Memory::default()).actions,
        vec![Action::Start(StartAs::Replica {
            upstream: Some("bb".into())
        })]
    );
}

#[test]
fn a_nostream_replica_in_archive_recovery_is_left_alone() {
    let view = cluster(Some("bb"));
    let d = decide_with(
        &nostream("ccc"),
        Some(&view),
        &archive_replica(),
        &Memory::default(),
    );
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(
        d.message,
        "no action. I am (ccc), a secondary, and following a leader (bb)"
    );
    // Without the tag, the same replica is pointed at the leader.
    assert_eq!(
        decide_with(
            &config("ccc"),
            Some(&view),
            &archive_replica(),
            &Memory::default()
        )
        .actions,
        vec![Action::Follow {
            upstream: Some("bb".into())
        }]
    );
}

#[test]
fn a_nostream_replica_that_streams_stops_streaming() {
    // Tagged while it streamed from the leader (a's port is 5433, bb's 5434).
    let view = cluster(Some("bb"));
    let pg = running(true, 1, 1000, Some(("127.0.0.1", 5434)));
    assert_eq!(
        decide_with(&nostream("ccc"), Some(&view), &pg, &Memory::default()).actions,
        vec![Action::Follow { upstream: None }]
    );
}

#[test]
fn nostream_wins_over_replicatefrom() {
    let view = cluster(Some("a"));
    let mut cfg = nostream("ccc");
    cfg.tags.insert("replicatefrom".into(), json!("bb"));
    let d = decide_with(&cfg, Some(&view), &archive_replica(), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(
        decide_with(
            &cfg,
            Some(&view),
            &stopped(ControlState::ShutDownInRecovery),
            &Memory::default()
        )
        .actions,
        vec![Action::Start(StartAs::Replica { upstream: None })]
    );
}

#[test]
fn a_diverged_nostream_node_is_rewound_from_the_leader() {
    // Leader bb promoted at 950 onto timeline 2; we crashed as the primary of timeline 1.
    let view = after_failover();
    let d = decide_with(
        &nostream("a"),
        Some(&view),
        &stopped(ControlState::InProduction),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::Rewind { source: "bb".into() }]);
}

#[test]
fn a_nostream_member_may_win_a_leader_race() {
    // Patroni does not exclude nostream members from failover: only their position counts.
    let peers = [peer("bb", "replica", 900, Map::new())];
    let pg = archive_replica();
    let d = decide(&crate::tests::inputs(
        &nostream("a"),
        Some(&cluster(None)),
        &pg,
        &Memory::default(),
        Some(&peers),
        None,
    ));
    assert_eq!(d.actions, vec![Action::AcquireLock]);
}

#[test]
fn a_nostream_member_is_never_a_synchronous_standby() {
    let mut view = cluster(Some("a"));
    view.members[2].data.tags.insert("nostream".into(), json!(true));
    // Only bb has a walsender on the primary; ccc recovers from the archive.
    let senders = [WalSender {
        application_name: "bb".into(),
        state: "streaming".into(),
        sync_state: "async".into(),
        lsn: 900,
    }];
    let input = SyncInput {
        me: "a",
        mode: SyncMode::On,
        strict: false,
        node_count: 1,
        maximum_lag_on_syncnode: -1,
        cluster: &view,
        current_guc: "",
        walsenders: &senders,
        guc_changed_at: 0,
        primary_lsn: 0,
    };
    assert_eq!(candidates(&input), vec!["bb".to_string()]);
}
