//! The `failover` key: the leader hands over or clears the request; the race honours the
//! named candidate and keeps the old leader out.

use pgvigil_api::ClusterView;
use pgvigil_api::cluster::Versioned;
use serde_json::Map;

use crate::tests::{cluster, config, peer, running};
use crate::*;

fn with_failover(mut view: ClusterView, leader: Option<&str>, member: Option<&str>) -> ClusterView {
    view.failover = Some(Versioned {
        value: pgvigil_api::FailoverValue {
            leader: leader.map(str::to_string),
            member: member.map(str::to_string),
            scheduled_at: None,
        },
        mod_revision: 9,
    });
    view
}

fn decide_full(
    cfg: &EngineConfig,
    view: &ClusterView,
    pg: &LocalPg,
    peers: Option<&[PeerReport]>,
    due_in: Option<f64>,
) -> Decision {
    decide(&crate::tests::inputs(
        cfg,
        Some(view),
        pg,
        &Memory::default(),
        peers,
        due_in,
    ))
}

#[test]
fn leader_hands_over_to_a_healthy_candidate() {
    let view = with_failover(cluster(Some("a")), Some("a"), Some("bb"));
    let pg = running(false, 1, 1000, None);
    let d = decide_full(&config("a"), &view, &pg, None, None);
    assert_eq!(d.actions, vec![Action::QueryPeers]);
    let peers = [peer("bb", "replica", 1000, Map::new())];
    let d = decide_full(&config("a"), &view, &pg, Some(&peers), None);
    assert_eq!(
        d.actions,
        vec![Action::StopForSwitchover {
            candidates: vec!["bb".into()]
        }]
    );
}

#[test]
fn unreachable_or_lagging_candidate_cancels_the_request() {
    let view = with_failover(cluster(Some("a")), Some("a"), Some("bb"));
    let pg = running(false, 1, 100_000_000, None);
    let unreachable = [PeerReport {
        name: "bb".into(),
        status: None,
    }];
    let d = decide_full(&config("a"), &view, &pg, Some(&unreachable), None);
    assert_eq!(
        d.actions,
        vec![
            crate::tests::housekeeping_a_at(100_000_000),
            Action::ClearFailover
        ]
    );
    let lagging = [peer("bb", "replica", 1000, Map::new())];
    let d = decide_full(&config("a"), &view, &pg, Some(&lagging), None);
    assert_eq!(
        d.actions,
        vec![
            crate::tests::housekeeping_a_at(100_000_000),
            Action::ClearFailover
        ]
    );
}

#[test]
fn switchover_to_any_member_needs_one_eligible() {
    let view = with_failover(cluster(Some("a")), Some("a"), None);
    let pg = running(false, 1, 1000, None);
    let peers = [
        PeerReport {
            name: "bb".into(),
            status: None,
        },
        peer("ccc", "replica", 1000, Map::new()),
    ];
    let d = decide_full(&config("a"), &view, &pg, Some(&peers), None);
    assert_eq!(
        d.actions,
        vec![Action::StopForSwitchover {
            candidates: vec!["ccc".into()]
        }]
    );
}

#[test]
fn request_for_another_leader_or_for_myself_is_cleared() {
    let pg = running(false, 1, 1000, None);
    let view = with_failover(cluster(Some("a")), Some("ccc"), Some("bb"));
    assert_eq!(
        decide_full(&config("a"), &view, &pg, None, None).actions,
        vec![crate::tests::housekeeping_a(), Action::ClearFailover]
    );
    let view = with_failover(cluster(Some("a")), None, Some("a"));
    assert_eq!(
        decide_full(&config("a"), &view, &pg, None, None).actions,
        vec![crate::tests::housekeeping_a(), Action::ClearFailover]
    );
}

#[test]
fn scheduled_switchover_waits_then_acts_and_stale_ones_are_cleared() {
    let view = with_failover(cluster(Some("a")), Some("a"), Some("bb"));
    let pg = running(false, 1, 1000, None);
    let d = decide_full(&config("a"), &view, &pg, None, Some(120.0));
    assert_eq!(d.actions, vec![crate::tests::housekeeping_a()]);
    assert!(d.message.starts_with("Awaiting switchover"), "{}", d.message);
    let d = decide_full(&config("a"), &view, &pg, None, Some(-1.0));
    assert_eq!(d.actions, vec![Action::QueryPeers]);
    let d = decide_full(&config("a"), &view, &pg, None, Some(-16.0));
    assert_eq!(
        d.actions,
        vec![crate::tests::housekeeping_a(), Action::ClearFailover]
    );
}

#[test]
fn named_candidate_wins_the_race_even_beyond_the_lag_limit() {
    let mut view = with_failover(cluster(None), Some("a"), Some("bb"));
    view.status.optime = 10_000_000;
    let d = decide_full(
        &config("bb"),
        &view,
        &running(true, 1, 1000, None),
        Some(&[]),
        None,
    );
    assert_eq!(d.actions, vec![Action::AcquireLock]);
}

#[test]
fn others_stand_aside_for_a_reachable_candidate_and_the_old_leader_never_races() {
    let view = with_failover(cluster(None), Some("a"), Some("bb"));
    let peers = [peer("bb", "replica", 900, Map::new())];
    let d = decide_full(
        &config("ccc"),
        &view,
        &running(true, 1, 1000, None),
        Some(&peers),
        None,
    );
    assert!(d.actions.is_empty(), "{d:?}");
    // The candidate is gone: the others race, but never the old leader.
    let gone = [PeerReport {
        name: "bb".into(),
        status: None,
    }];
    let d = decide_full(
        &config("ccc"),
        &view,
        &running(true, 1, 1000, None),
        Some(&gone),
        None,
    );
    assert_eq!(d.actions, vec![Action::AcquireLock]);
    let d = decide_full(
        &config("a"),
        &view,
        &running(true, 1, 1000, None),
        Some(&gone),
        None,
    );
    assert!(d.actions.is_empty(), "{d:?}");
}
