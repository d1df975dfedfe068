//! Decisions that used to live in the runtime: the clone source, operator
//! restarts and reinitializations, and the hand-over after a planned switchover.

use std::time::{Duration, Instant};

use serde_json::{Map, json};

use crate::operator::{SWITCHOVER_WAIT, clone_source, version_num};
use crate::tests::{cluster, config, housekeeping_a, inputs, peer, running, stopped};
use crate::*;

fn mem() -> Memory {
    Memory::default()
}

#[test]
fn the_clone_source_is_a_running_clonefrom_replica_else_the_leader() {
    let mut view = cluster(Some("a"));
    let leader = view.member("a").unwrap().clone();
    assert_eq!(clone_source("ccc", &view, &leader), "a");
    view.members[1].data.tags.insert("clonefrom".into(), json!(true));
    assert_eq!(clone_source("ccc", &view, &leader), "bb");
    view.members[1].data.state = "stopped".into();
    assert_eq!(clone_source("ccc", &view, &leader), "a");
}

#[test]
fn versions_compare_as_numbers() {
    assert_eq!(version_num("15.10"), Some(150010));
    assert_eq!(version_num("9.6.24"), Some(90624));
    assert_eq!(version_num("150010"), Some(150010));
    assert_eq!(version_num("15"), None);
    assert_eq!(version_num("x"), None);
}

fn restart(r: RestartRequest) -> OperatorRequest {
    OperatorRequest::Restart(r)
}

fn decide_request(name: &str, view: &ClusterView, pg: &LocalPg, request: &OperatorRequest) -> Decision {
    let mut cfg = config(name);
    cfg.replica_methods = vec![
        ReplicaMethod {
            name: "restore".into(),
            no_leader: true,
        },
        ReplicaMethod::basebackup(),
    ];
    let memory = mem();
    let mut i = inputs(&cfg, Some(view), pg, &memory, None, None);
    i.request = Some(request);
    decide(&i)
}

use pgvigil_api::ClusterView;

#[test]
fn a_restart_request_restarts_when_its_filters_match() {
    let view = cluster(Some("a"));
    let replica = running(true, 1, 1000, Some(("127.0.0.1", 5433)));
    let any = restart(RestartRequest {
        timeout: Some(30),
        ..Default::default()
    });
    assert_eq!(
        decide_request("bb", &view, &replica, &any).actions,
        vec![Action::Restart { timeout: Some(30) }]
    );
    let refused = |d: Decision| matches!(d.actions.as_slice(), [Action::AnswerRequest { status: 503, message }] if message == "restart conditions are not satisfied");
    let primaries_only = restart(RestartRequest {
        role: Some("primary".into()),
        ..Default::default()
    });
    assert!(refused(decide_request("bb", &view, &replica, &primaries_only)));
    let older = restart(RestartRequest {
        postgres_version: Some("15.9".into()),
        ..Default::default()
    });
    assert!(refused(decide_request("bb", &view, &replica, &older)));
    let newer = restart(RestartRequest {
        postgres_version: Some("15.11".into()),
        ..Default::default()
    });
    assert_eq!(
        decide_request("bb", &view, &replica, &newer).actions,
        vec![Action::Restart { timeout: None }]
    );
    let pending = restart(RestartRequest {
        restart_pending: true,
        ..Default::default()
    });
    assert!(refused(decide_request("bb", &view, &replica, &pending)));
    let mut with_pending = replica.clone();
    with_pending.observed.as_mut().unwrap().pending_restart = true;
    assert_eq!(
        decide_request("bb", &view, &with_pending, &pending).actions,
        vec![Action::Restart { timeout: None }]
    );
}

#[test]
fn a_restart_request_waits_for_its_time_and_is_void_when_overtaken_or_down() {
    let view = cluster(Some("a"));
    let leader = running(false, 1, 1000, None);
    let later = restart(RestartRequest {
        not_yet_due: true,
        ..Default::default()
    });
    assert_eq!(
        decide_request("a", &view, &leader, &later).actions,
        vec![housekeeping_a()]
    );
    let overtaken = restart(RestartRequest {
        overtaken: true,
        ..Default::default()
    });
    assert!(matches!(
        decide_request("a", &view, &leader, &overtaken).actions.as_slice(),
        [Action::AnswerRequest { status: 409, .. }]
    ));
    let now = restart(RestartRequest::default());
    assert_eq!(
        decide_request("a", &view, &leader, &now).actions,
        vec![Action::Restart { timeout: None }]
    );
    let down = stopped(ControlState::ShutDownInRecovery);
    assert_eq!(
        decide_request("bb", &view, &down, &now).actions,
        vec![Action::AnswerRequest {
            status: 503,
            message: "postgres is not running".into()
        }]
    );
}

#[test]
fn a_request_waits_while_postgresql_has_something_else_to_do_and_a_lockless_primary_is_not_restarted() {
    let view = cluster(Some("a"));
    // A replica that must follow the leader first.
    let elsewhere = running(true, 1, 1000, Some(("127.0.0.1", 9999)));
    let now = restart(RestartRequest::default());
    let d = decide_request("bb", &view, &elsewhere, &now);
    assert!(matches!(d.actions.as_slice(), [Action::Follow { .. }]), "{d:?}");
    // A primary without the lock: demoted, not restarted.
    let stale = running(false, 1, 1000, None);
    assert_eq!(
        decide_request("bb", &view, &stale, &now).actions,
        vec![Action::Demote(DemoteMode::ImmediateNoLock)]
    );
}

#[test]
fn reinitialize_requests_pick_the_source_by_the_clone_rule_and_refuse_on_the_leader() {
    let mut view = cluster(Some("a"));
    view.members[1].data.tags.insert("clonefrom".into(), json!(true));
    let replica = running(true, 1, 1000, Some(("127.0.0.1", 5433)));
    let from_leader = OperatorRequest::Reinitialize { from_leader: true };
    let any = OperatorRequest::Reinitialize { from_leader: false };
    // `from_leader` means pg_basebackup from the leader, whatever methods are configured
    // (Patroni's `clone_from_leader`); otherwise the configured methods in order.
    assert_eq!(
        decide_request("ccc", &view, &replica, &from_leader).actions,
        vec![Action::Reinitialize {
            source: "a".into(),
            methods: vec!["basebackup".into()]
        }]
    );
    assert_eq!(
        decide_request("ccc", &view, &replica, &any).actions,
        vec![Action::Reinitialize {
            source: "bb".into(),
            methods: vec!["restore".into(), "basebackup".into()]
        }]
    );
    let leader = running(false, 1, 1000, None);
    assert_eq!(
        decide_request("a", &view, &leader, &any).actions,
        vec![Action::AnswerRequest {
            status: 503,
            message: "I am the leader, can not reinitialize".into()
        }]
    );
    // Without a leader (paused, so that no race comes first): refused.
    let mut leaderless = cluster(None);
    leaderless.config.as_mut().unwrap().value = json!({"pause": true});
    assert!(matches!(
        decide_request("ccc", &leaderless, &replica, &any).actions.as_slice(),
        [Action::AnswerRequest { status: 503, message }] if message.contains("no leader")
    ));
}

#[test]
fn after_a_switchover_stop_the_lock_goes_once_a_candidate_has_the_checkpoint_or_after_the_wait() {
    let view = cluster(Some("a"));
    let pg = stopped(ControlState::ShutDown);
    let cfg = config("a");
    let since = Instant::now();
    let memory = Memory {
        switchover: Some(SwitchoverStop {
            since,
            shutdown_lsn: 900,
            candidates: vec!["bb".into()],
        }),
        ..Default::default()
    };
    let decide_at = |now: Instant, peers: Option<&[PeerReport]>| {
        let mut i = inputs(&cfg, Some(&view), &pg, &memory, peers, None);
        i.now = now;
        decide(&i)
    };
    assert_eq!(decide_at(since, None).actions, vec![Action::QueryPeers]);
    let behind = [
        peer("bb", "replica", 800, Map::new()),
        peer("ccc", "replica", 950, Map::new()),
    ];
    let d = decide_at(since + Duration::from_secs(1), Some(&behind));
    assert!(
        d.actions.is_empty(),
        "ccc is not a candidate of this request: {d:?}"
    );
    assert!(d.recheck_in.is_some());
    let release = vec![Action::PublishPosition { optime: 900 }, Action::ReleaseLock];
    let ready = [peer("bb", "replica", 901, Map::new())];
    assert_eq!(
        decide_at(since + Duration::from_secs(1), Some(&ready)).actions,
        release
    );
    assert_eq!(decide_at(since + SWITCHOVER_WAIT, Some(&behind)).actions, release);
    // The stop never restarts PostgreSQL as a primary meanwhile.
    assert!(
        !decide_at(since + Duration::from_secs(2), Some(&behind))
            .actions
            .contains(&Action::Start(StartAs::Primary))
    );
}

/// Found by the extended property test: a paused leader whose PostgreSQL is slow to come back
/// must not be stopped and lose the lock (the operator decides in maintenance mode).
#[test]
fn a_paused_leader_slow_to_start_keeps_postgres_and_the_lock() {
    let mut view = cluster(Some("a"));
    view.config.as_mut().unwrap().value = json!({"pause": true});
    let mut cfg = config("a");
    cfg.paused = true;
    let pg = LocalPg {
        observed: None,
        ..running(false, 1, 1000, None)
    };
    let memory = Memory {
        primary_restart_since: Some(Instant::now() - Duration::from_secs(3600)),
        ..Default::default()
    };
    let d = decide(&inputs(&cfg, Some(&view), &pg, &memory, None, None));
    assert!(d.actions.is_empty(), "{d:?}");
    cfg.paused = false;
    view.config.as_mut().unwrap().value = json!({});
    let peers = [peer("bb", "replica", 1000, Map::new())];
    let d = decide(&inputs(&cfg, Some(&view), &pg, &memory, Some(&peers), None));
    assert_eq!(
        d.actions,
        vec![Action::Demote(DemoteMode::ImmediateNoLock), Action::ReleaseLock]
    );
}
