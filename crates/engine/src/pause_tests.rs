//! Maintenance mode (`docs/patroni-compat.md` §4.8): a PostgreSQL found down is `stopped`, and the
//! one thing the agents still do on their own is a switchover an operator asked for by naming its
//! candidate.

use std::time::{Duration, Instant};

use pgvigil_api::cluster::Versioned;
use pgvigil_api::{ClusterView, FailoverValue, PgState};
use serde_json::{Map, json};

use crate::tests::{cluster, config, inputs, peer, running, stopped};
use crate::*;

fn paused(leader: Option<&str>) -> ClusterView {
    let mut view = cluster(leader);
    view.config.as_mut().unwrap().value = json!({"pause": true});
    view
}

fn paused_config(name: &str) -> EngineConfig {
    EngineConfig {
        paused: true,
        ..config(name)
    }
}

fn with_request(mut view: ClusterView, leader: Option<&str>, candidate: Option<&str>) -> ClusterView {
    view.failover = Some(Versioned {
        value: FailoverValue {
            leader: leader.map(Into::into),
            member: candidate.map(Into::into),
            scheduled_at: None,
        },
        mod_revision: 7,
    });
    view
}

/// What member `name` decides in maintenance mode, with nothing remembered and no peers asked.
fn paused_decide(name: &str, view: &ClusterView, pg: &LocalPg) -> Decision {
    decide(&inputs(
        &paused_config(name),
        Some(view),
        pg,
        &Memory::default(),
        None,
        None,
    ))
}

#[test]
fn postgres_found_down_while_paused_is_reported_stopped_not_crashed() {
    // A replica stopped by hand.
    let pg = stopped(ControlState::ShutDownInRecovery);
    let d = paused_decide("bb", &paused(Some("a")), &pg);
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(d.report, Some(PgState::Stopped), "{d:?}");
    // The leader's: it lets the key go, and is `stopped` too.
    let pg = stopped(ControlState::InProduction);
    let d = paused_decide("a", &paused(Some("a")), &pg);
    assert_eq!(d.actions, vec![Action::ReleaseLock], "{d:?}");
    assert_eq!(d.report, Some(PgState::Stopped), "{d:?}");
    // Outside maintenance mode the observation (`crashed`) stands and the agent recovers.
    let d = decide(&inputs(
        &config("a"),
        Some(&cluster(Some("a"))),
        &pg,
        &Memory::default(),
        None,
        None,
    ));
    assert_eq!(d.report, None, "{d:?}");
    assert_eq!(d.actions, vec![Action::Start(StartAs::Primary)]);
}

#[test]
fn a_paused_leader_stops_for_a_switchover_only_to_a_named_candidate() {
    let cfg = paused_config("a");
    let pg = running(false, 1, 1000, None);
    let peers = [peer("bb", "replica", 1000, Map::new())];
    let leader_decides = |view: &ClusterView| {
        decide(&inputs(
            &cfg,
            Some(view),
            &pg,
            &Memory::default(),
            Some(&peers),
            None,
        ))
    };
    let d = leader_decides(&with_request(paused(Some("a")), Some("a"), Some("bb")));
    assert_eq!(
        d.actions,
        vec![Action::StopForSwitchover {
            candidates: vec!["bb".into()]
        }],
        "{d:?}"
    );
    let d = leader_decides(&with_request(paused(Some("a")), Some("a"), None));
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::StopForSwitchover { .. })),
        "{d:?}"
    );
}

#[test]
fn a_paused_leader_hands_over_after_its_switchover_stop_and_comes_back_as_a_replica() {
    let cfg = paused_config("a");
    let pg = stopped(ControlState::ShutDown);
    let memory = Memory {
        switchover: Some(SwitchoverStop {
            since: Instant::now() - Duration::from_secs(1),
            shutdown_lsn: 900,
            candidates: vec!["bb".into()],
        }),
        ..Default::default()
    };
    let view = with_request(paused(Some("a")), Some("a"), Some("bb"));
    let d = decide(&inputs(&cfg, Some(&view), &pg, &memory, None, None));
    assert_eq!(d.actions, vec![Action::QueryPeers], "{d:?}");
    let peers = [peer("bb", "replica", 1000, Map::new())];
    let d = decide(&inputs(&cfg, Some(&view), &pg, &memory, Some(&peers), None));
    assert_eq!(
        d.actions,
        vec![
            Action::PublishPosition { optime: 900 },
            Action::ReleaseLock,
            Action::Start(StartAs::Replica { upstream: None }),
        ],
        "{d:?}"
    );
    // Outside maintenance mode the next cycle starts it (following whoever leads by then).
    let view = with_request(cluster(Some("a")), Some("a"), Some("bb"));
    let d = decide(&inputs(
        &config("a"),
        Some(&view),
        &pg,
        &memory,
        Some(&peers),
        None,
    ));
    assert_eq!(
        d.actions,
        vec![Action::PublishPosition { optime: 900 }, Action::ReleaseLock],
        "{d:?}"
    );
}

#[test]
fn only_the_named_candidate_takes_the_free_lock_while_paused() {
    let pg = running(true, 1, 1000, None);
    let view = with_request(paused(None), Some("a"), Some("bb"));
    let d = paused_decide("bb", &view, &pg);
    assert_eq!(d.actions, vec![Action::AcquireLock], "{d:?}");
    // Anyone else stays put.
    let d = paused_decide("ccc", &view, &pg);
    assert!(d.actions.is_empty(), "{d:?}");
    // No request, a scheduled one (it cannot be written while paused), or a candidate that may
    // not promote: nobody races.
    let none = paused(None);
    let d = paused_decide("bb", &none, &pg);
    assert!(d.actions.is_empty(), "{d:?}");
    let mut scheduled = view.clone();
    scheduled.failover.as_mut().unwrap().value.scheduled_at = Some("2026-12-04T23:00:00+00:00".into());
    let d = paused_decide("bb", &scheduled, &pg);
    assert!(d.actions.is_empty(), "{d:?}");
    let mut cfg = paused_config("bb");
    cfg.tags = json!({"nofailover": true}).as_object().unwrap().clone();
    let d = decide(&inputs(&cfg, Some(&view), &pg, &Memory::default(), None, None));
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn the_named_candidate_promotes_once_it_holds_the_key_while_paused() {
    let pg = running(true, 1, 1000, None);
    let view = with_request(paused(Some("bb")), Some("a"), Some("bb"));
    let d = paused_decide("bb", &view, &pg);
    assert_eq!(d.actions, vec![Action::Promote], "{d:?}");
    // Without the request a paused lock holder that is not a primary lets the key go.
    let d = paused_decide("bb", &paused(Some("bb")), &pg);
    assert_eq!(d.actions, vec![Action::ReleaseLock], "{d:?}");
    // Promoted: the request is done.
    let primary = running(false, 2, 1000, None);
    let d = paused_decide("bb", &view, &primary);
    assert!(d.actions.contains(&Action::ClearFailover), "{d:?}");
}

#[test]
fn a_running_primary_takes_the_free_key_while_paused() {
    // Patroni's `is_healthiest_node` in pause: the primary the operator runs is the leader,
    // even one tagged `nofailover`.
    let pg = running(false, 1, 1000, None);
    let d = paused_decide("a", &paused(None), &pg);
    assert_eq!(d.actions, vec![Action::AcquireLock], "{d:?}");
    let mut cfg = paused_config("a");
    cfg.tags = json!({"nofailover": true}).as_object().unwrap().clone();
    let d = decide(&inputs(
        &cfg,
        Some(&paused(None)),
        &pg,
        &Memory::default(),
        None,
        None,
    ));
    assert_eq!(d.actions, vec![Action::AcquireLock], "{d:?}");
    // A replica still never races while paused.
    let d = paused_decide("a", &paused(None), &running(true, 1, 1000, None));
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn a_paused_primary_leaves_the_free_key_to_a_named_switchover_candidate() {
    let pg = running(false, 1, 1000, None);
    let d = paused_decide("a", &with_request(paused(None), Some("a"), Some("bb")), &pg);
    assert!(d.actions.is_empty(), "{d:?}");
    // A request without a candidate: nobody races (Patroni's `manual_failover_process_no_leader`).
    let d = paused_decide("a", &with_request(paused(None), Some("a"), None), &pg);
    assert!(d.actions.is_empty(), "{d:?}");
    // A candidate that is no member any more: the request is dropped and the primary leads.
    let d = paused_decide("a", &with_request(paused(None), Some("a"), Some("gone")), &pg);
    assert_eq!(
        d.actions,
        vec![Action::ClearFailover, Action::AcquireLock],
        "{d:?}"
    );
    // Right after a pre_promote refusal it stays out of the race like everyone else.
    let memory = Memory {
        pre_promote_failed_at: Some(Instant::now()),
        ..Default::default()
    };
    let d = decide(&inputs(
        &paused_config("a"),
        Some(&paused(None)),
        &pg,
        &memory,
        None,
        None,
    ));
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn a_paused_postgres_still_starting_is_reported_running() {
    // Patroni's `handle_starting_instance` in pause: `running` while the postmaster runs.
    let pg = LocalPg {
        observed: None,
        ..running(true, 1, 1000, None)
    };
    let d = paused_decide("bb", &paused(Some("a")), &pg);
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(d.report, Some(PgState::Running), "{d:?}");
    // Outside maintenance mode the observation (`starting`) stands.
    let d = decide(&inputs(
        &config("bb"),
        Some(&cluster(Some("a"))),
        &pg,
        &Memory::default(),
        None,
        None,
    ));
    assert_eq!(d.report, None, "{d:?}");
}
