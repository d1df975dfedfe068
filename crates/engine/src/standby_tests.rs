//! Standby clusters (`docs/patroni-compat.md` §4.11): the lock holder is a standby leader that
//! follows the remote primary and never promotes; the others cascade from it.

use std::time::Duration;

use pgvigil_api::ClusterView;
use serde_json::json;

use crate::tests::{cluster, config, decide_with, empty, inputs, running, stopped};
use crate::*;

const REMOTE: (&str, u16) = ("10.0.0.9", 5433);

fn standby_config(name: &str) -> EngineConfig {
    EngineConfig {
        standby_cluster: Some(StandbyCluster {
            remote: Some((REMOTE.0.into(), REMOTE.1)),
            replica_methods: Vec::new(),
        }),
        ..config(name)
    }
}

/// [`cluster`] with `leader` published as the standby leader.
fn standby_view(leader: Option<&str>) -> ClusterView {
    let mut view = cluster(leader);
    for m in &mut view.members {
        if Some(m.name.as_str()) == leader {
            m.data.role = "standby_leader".into();
        }
    }
    view
}

#[test]
fn the_first_node_of_a_standby_cluster_clones_the_remote_instead_of_running_initdb() {
    let view = ClusterView::default();
    let d = decide_with(&standby_config("a"), Some(&view), &empty(), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::BootstrapStandby {
            methods: vec!["basebackup".into()]
        }]
    );
    // The section's create_replica_methods, in order.
    let mut cfg = standby_config("a");
    cfg.standby_cluster.as_mut().unwrap().replica_methods = vec!["restore".into(), "basebackup".into()];
    let d = decide_with(&cfg, Some(&view), &empty(), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::BootstrapStandby {
            methods: vec!["restore".into(), "basebackup".into()]
        }]
    );
    // Another node is bootstrapping: wait for it.
    let busy = ClusterView {
        initialize: Some(String::new()),
        ..Default::default()
    };
    let d = decide_with(&standby_config("a"), Some(&busy), &empty(), &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(d.message, "waiting for standby_leader to bootstrap");
}

#[test]
fn the_other_nodes_clone_the_standby_leader() {
    let view = standby_view(Some("a"));
    let d = decide_with(&standby_config("bb"), Some(&view), &empty(), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::CreateReplica {
            source: Some("a".into()),
            methods: vec!["basebackup".into()]
        }]
    );
}

#[test]
fn the_lock_holder_follows_the_remote_and_never_promotes() {
    let view = standby_view(Some("a"));
    // It just took the key while following the old standby leader: point it at the remote.
    let pg = running(true, 1, 1000, Some(("127.0.0.1", 5434)));
    let d = decide_with(&standby_config("a"), Some(&view), &pg, &Memory::default());
    assert_eq!(d.actions, vec![Action::FollowRemote]);
    // Following the remote: housekeeping only.
    let pg = running(true, 1, 1000, Some(REMOTE));
    let d = decide_with(&standby_config("a"), Some(&view), &pg, &Memory::default());
    assert!(
        matches!(d.actions.as_slice(), [Action::LeaderHousekeeping { .. }]),
        "{d:?}"
    );
    assert_eq!(d.message, "no action. I am (a), the standby leader with the lock");
    // Archive recovery only: no upstream is right.
    let mut cfg = standby_config("a");
    cfg.standby_cluster.as_mut().unwrap().remote = None;
    let pg = running(true, 1, 1000, None);
    let d = decide_with(&cfg, Some(&view), &pg, &Memory::default());
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::Promote | Action::FollowRemote)),
        "{d:?}"
    );
}

#[test]
fn removing_the_section_promotes_the_standby_leader() {
    let view = standby_view(Some("a"));
    let pg = running(true, 1, 1000, Some(REMOTE));
    let d = decide_with(&config("a"), Some(&view), &pg, &Memory::default());
    assert_eq!(d.actions, vec![Action::Promote]);
}

#[test]
fn adding_the_section_demotes_the_primary_to_a_standby_leader() {
    let view = cluster(Some("a"));
    let pg = running(false, 1, 1000, None);
    let d = decide_with(&standby_config("a"), Some(&view), &pg, &Memory::default());
    assert_eq!(d.actions, vec![Action::DemoteCluster]);
    // Paused, the operator's primary is left alone.
    let mut paused = cluster(Some("a"));
    paused.config.as_mut().unwrap().value = json!({"pause": true});
    let d = decide_with(&standby_config("a"), Some(&paused), &pg, &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn a_stopped_lock_holder_starts_as_standby_leader_a_former_primary_after_demote_cluster() {
    let view = standby_view(Some("a"));
    let cfg = standby_config("a");
    let replica = stopped(ControlState::ShutDownInRecovery);
    let d = decide_with(&cfg, Some(&view), &replica, &Memory::default());
    assert_eq!(d.actions, vec![Action::Start(StartAs::Remote)]);
    for state in [ControlState::ShutDown, ControlState::InProduction] {
        let d = decide_with(&cfg, Some(&view), &stopped(state), &Memory::default());
        assert_eq!(d.actions, vec![Action::DemoteCluster], "{state:?}");
    }
}

#[test]
fn without_a_standby_leader_a_stopped_member_follows_the_remote_until_the_race() {
    let view = standby_view(None);
    let d = decide_with(
        &standby_config("bb"),
        Some(&view),
        &stopped(ControlState::ShutDownInRecovery),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::Start(StartAs::Remote)]);
}

#[test]
fn replicas_cascade_from_the_standby_leader() {
    let view = standby_view(Some("a"));
    let a = view.member("a").unwrap().data.host_port().unwrap();
    // A former standby leader that lost the key still follows the remote: it follows the new
    // one instead.
    let pg = running(true, 1, 1000, Some(REMOTE));
    let d = decide_with(&standby_config("bb"), Some(&view), &pg, &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::Follow {
            upstream: Some("a".into())
        }]
    );
    let pg = running(true, 1, 1000, Some((&a.0, a.1)));
    let d = decide_with(&standby_config("bb"), Some(&view), &pg, &Memory::default());
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(d.message.contains("following a leader (a)"), "{d:?}");
}

#[test]
fn a_standby_leader_whose_lock_lapsed_is_not_demoted() {
    let view = standby_view(Some("a"));
    let cfg = standby_config("a");
    let pg = running(true, 1, 1000, Some(REMOTE));
    let memory = Memory::default();
    let mut i = inputs(&cfg, Some(&view), &pg, &memory, None, None);
    i.lock = LockState::Lapsed;
    let d = decide(&i);
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn a_silent_standby_leader_is_taken_over_like_a_primary() {
    let view = standby_view(Some("a"));
    let cfg = standby_config("bb");
    let pg = running(true, 1, 1000, Some(("127.0.0.1", 5433)));
    let memory = Memory::default();
    let silence = Silence {
        leader: "a".into(),
        leader_revision: 3,
        heartbeat_revision: 7,
        silent_for: Duration::from_secs(5),
        promise: Duration::from_millis(3500),
    };
    let peers = [crate::tests::peer("ccc", "replica", 900, Default::default())];
    let mut i = inputs(&cfg, Some(&view), &pg, &memory, Some(&peers), None);
    i.silence = Some(&silence);
    let d = decide(&i);
    assert!(
        matches!(d.actions.as_slice(), [Action::TakeOver { from, .. }] if from == "a"),
        "{d:?}"
    );
}

#[test]
fn the_standby_leader_keeps_slots_for_the_members_streaming_from_it() {
    let view = standby_view(Some("a"));
    let mut cfg = standby_config("a");
    cfg.slots = crate::slots::SlotsConfig {
        member_slots_ttl: Duration::ZERO,
        ..Default::default()
    };
    let pg = running(true, 1, 1000, Some(REMOTE));
    let d = decide_with(&cfg, Some(&view), &pg, &Memory::default());
    let Some(Action::LeaderHousekeeping { slots, .. }) = d.actions.first() else {
        panic!("{d:?}");
    };
    assert_eq!(slots.create_physical, vec!["bb".to_string(), "ccc".to_string()]);
}

#[test]
fn permanent_slots_apply_by_cluster_type() {
    let permanent = json!({"all": null, "p": {"cluster_type": "primary"}, "s": {"cluster_type": "standby"},
        "cdc": {"database": "postgres", "plugin": "test_decoding"}});
    let permanent = permanent.as_object().unwrap();
    let names = |standby| {
        crate::slots::permanent_for_cluster(permanent, standby)
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(names(false), ["all", "cdc", "p"]);
    assert_eq!(
        names(true),
        ["all", "s"],
        "only physical slots in a standby cluster"
    );
}

#[test]
fn a_switchover_inside_the_standby_cluster_hands_the_key_over() {
    let mut view = standby_view(Some("a"));
    view.failover = Some(pgvigil_api::cluster::Versioned {
        value: pgvigil_api::FailoverValue {
            leader: Some("a".into()),
            member: Some("bb".into()),
            scheduled_at: None,
        },
        mod_revision: 9,
    });
    let cfg = standby_config("a");
    let pg = running(true, 1, 1000, Some(REMOTE));
    let memory = Memory::default();
    let d = decide(&inputs(&cfg, Some(&view), &pg, &memory, None, None));
    assert_eq!(d.actions, vec![Action::QueryPeers]);
    let peers = [crate::tests::peer("bb", "replica", 1000, Default::default())];
    let d = decide(&inputs(&cfg, Some(&view), &pg, &memory, Some(&peers), None));
    assert_eq!(
        d.actions,
        vec![Action::StopForSwitchover {
            candidates: vec!["bb".into()]
        }]
    );
}
