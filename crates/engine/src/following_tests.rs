//! Following the leader: re-pointing replicas, rejoining a former primary with or without
//! pg_rewind, waiting for the published history, pause, and the divergence rules themselves.

use pgvigil_api::ClusterView;
use pgvigil_api::cluster::Versioned;
use serde_json::json;

use crate::tests::{cluster, config, decide_with, history, running, stopped};
use crate::*;

#[test]
fn primary_that_lost_the_lock_demotes() {
    let d = decide_with(
        &config("a"),
        Some(&cluster(Some("bb"))),
        &running(false, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::Demote(DemoteMode::ImmediateNoLock)]);
}

#[test]
fn replica_repoints_to_a_new_leader() {
    let view = cluster(Some("bb"));
    let old = Some(("127.0.0.1", 5433)); // a's port
    let d = decide_with(
        &config("ccc"),
        Some(&view),
        &running(true, 1, 1000, old),
        &Memory::default(),
    );
    assert_eq!(
        d.actions,
        vec![Action::Follow {
            upstream: Some("bb".into())
        }]
    );
    let current = Some(("127.0.0.1", 5434)); // bb's port
    let d = decide_with(
        &config("ccc"),
        Some(&view),
        &running(true, 1, 1000, current),
        &Memory::default(),
    );
    assert!(d.actions.is_empty());
}

#[test]
fn replicatefrom_member_is_the_upstream_when_running() {
    let view = cluster(Some("a"));
    let mut cfg = config("ccc");
    cfg.tags.insert("replicatefrom".into(), json!("bb"));
    let d = decide_with(
        &cfg,
        Some(&view),
        &running(true, 1, 1000, Some(("127.0.0.1", 5433))),
        &Memory::default(),
    );
    assert_eq!(
        d.actions,
        vec![Action::Follow {
            upstream: Some("bb".into())
        }]
    );
}

/// Leader `bb` promoted at LSN 950: timeline 2, history [[1, 950]].
pub(crate) fn after_failover() -> ClusterView {
    let mut view = cluster(Some("bb"));
    view.members[1].data.timeline = Some(2);
    view.history = Some(Versioned {
        value: vec![history(1, 950)],
        mod_revision: 6,
    });
    view
}

#[test]
fn former_primary_clean_shutdown_follows_without_rewind() {
    let view = after_failover();
    let d = decide_with(
        &config("a"),
        Some(&view),
        &stopped(ControlState::ShutDown),
        &Memory::default(),
    );
    assert_eq!(
        d.actions,
        vec![Action::Start(StartAs::Replica {
            upstream: Some("bb".into())
        })]
    );
}

#[test]
fn crashed_former_primary_is_rewound_or_recloned() {
    let view = after_failover();
    let pg = stopped(ControlState::InProduction);
    let d = decide_with(&config("a"), Some(&view), &pg, &Memory::default());
    assert_eq!(d.actions, vec![Action::Rewind { source: "bb".into() }]);
    let memory = Memory {
        rewind_failed: true,
        ..Default::default()
    };
    assert_eq!(
        decide_with(&config("a"), Some(&view), &pg, &memory).actions,
        vec![Action::Reinitialize {
            source: "bb".into(),
            methods: vec!["basebackup".into()]
        }]
    );
    let mut cfg = config("a");
    cfg.use_pg_rewind = false;
    assert_eq!(
        decide_with(&cfg, Some(&view), &pg, &Memory::default()).actions,
        vec![Action::Reinitialize {
            source: "bb".into(),
            methods: vec!["basebackup".into()]
        }]
    );
}

#[test]
fn rewind_waits_for_the_post_promotion_checkpoint() {
    let mut view = after_failover();
    view.members[1].data.checkpoint_after_promote = Some(false);
    let d = decide_with(
        &config("a"),
        Some(&view),
        &stopped(ControlState::InProduction),
        &Memory::default(),
    );
    assert!(d.actions.is_empty());
    assert!(d.message.contains("Waiting for checkpoint"));
}

#[test]
fn running_replica_past_the_switch_point_is_rewound() {
    let view = after_failover();
    let d = decide_with(
        &config("ccc"),
        Some(&view),
        &running(true, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::Rewind { source: "bb".into() }]);
    // At or before the switch point it simply follows.
    let d = decide_with(
        &config("ccc"),
        Some(&view),
        &running(true, 1, 950, None),
        &Memory::default(),
    );
    assert_eq!(
        d.actions,
        vec![Action::Follow {
            upstream: Some("bb".into())
        }]
    );
}

/// Two failovers: `bb` leads on timeline 3, history [[1, 950], [2, 2000]]. A replica whose
/// walreceiver is between connections is judged by the timeline it reports: the runtime must
/// report the timeline its WAL continues on (the newest WAL segment's), not the last
/// restartpoint's, which can still be 1 long after the replica moved on to timeline 2.
#[test]
fn non_streaming_replica_is_judged_on_the_timeline_its_wal_is_on() {
    let mut view = after_failover();
    view.members[1].data.timeline = Some(3);
    view.history = Some(Versioned {
        value: vec![history(1, 950), history(2, 2000)],
        mod_revision: 7,
    });
    let decide_at = |timeline, lsn| {
        decide_with(
            &config("ccc"),
            Some(&view),
            &running(true, timeline, lsn, None),
            &Memory::default(),
        )
        .actions
    };
    let follow = vec![Action::Follow {
        upstream: Some("bb".into()),
    }];
    let rewind = vec![Action::Rewind { source: "bb".into() }];
    // On timeline 2 before its switch point: a prefix of the leader's history.
    assert_eq!(decide_at(2, 1500), follow);
    assert_eq!(decide_at(2, 2000), follow);
    // On timeline 2 past it (an asynchronous replica that got more than the promoted one):
    // diverged.
    assert_eq!(decide_at(2, 2500), rewind);
    // The same replica reported on timeline 1 looks diverged (past 950): what a stale
    // restartpoint timeline would cause, a needless stop and pg_rewind.
    assert_eq!(decide_at(1, 1500), rewind);
}

#[test]
fn unknown_history_means_wait() {
    let mut view = after_failover();
    view.history = Some(Versioned {
        value: vec![],
        mod_revision: 6,
    });
    let d = decide_with(
        &config("a"),
        Some(&view),
        &stopped(ControlState::InProduction),
        &Memory::default(),
    );
    assert!(d.actions.is_empty());
}

#[test]
fn stopped_replica_in_unlocked_cluster_starts_read_only() {
    let d = decide_with(
        &config("a"),
        Some(&cluster(None)),
        &stopped(ControlState::ShutDownInRecovery),
        &Memory::default(),
    );
    assert_eq!(
        d.actions,
        vec![Action::Start(StartAs::Replica { upstream: None })]
    );
}

#[test]
fn pause_leaves_postgres_alone() {
    let mut view = cluster(None);
    view.config = Some(Versioned {
        value: json!({"pause": true}),
        mod_revision: 2,
    });
    let d = decide_with(
        &config("a"),
        Some(&view),
        &stopped(ControlState::ShutDownInRecovery),
        &Memory::default(),
    );
    assert!(d.actions.is_empty());
    let d = decide_with(
        &config("a"),
        Some(&view),
        &running(true, 1, 1000, None),
        &Memory::default(),
    );
    assert!(d.actions.is_empty());
}

/// The interrupted promotion: `a` promoted from timeline 1 to 2 while its agent was shutting
/// down, stopped, and `bb` promoted from the same WAL onto timeline 2 as well. The histories
/// agree up to the switch (950) and then differ; `a`'s control data shows it was a primary on
/// timeline 2. pg_rewind would see one timeline and do nothing, so `a` is cloned again, with or
/// without `use_pg_rewind`, crashed or stopped cleanly.
#[test]
fn former_primary_on_the_leaders_timeline_is_recloned() {
    let view = after_failover();
    let on_timeline_2 = |state| {
        let mut pg = stopped(state);
        if let DataDir::Initialized(c) = &mut pg.data {
            c.checkpoint_timeline = 2;
            c.checkpoint_lsn = 1200;
        }
        pg
    };
    let reclone = vec![Action::Reinitialize {
        source: "bb".into(),
        methods: vec!["basebackup".into()],
    }];
    for state in [ControlState::ShutDown, ControlState::InProduction] {
        let pg = on_timeline_2(state);
        let d = decide_with(&config("a"), Some(&view), &pg, &Memory::default());
        assert_eq!(d.actions, reclone, "{state:?}");
        assert!(
            d.message.contains("pg_rewind cannot tell them apart"),
            "{}",
            d.message
        );
        let mut cfg = config("a");
        cfg.use_pg_rewind = false;
        assert_eq!(
            decide_with(&cfg, Some(&view), &pg, &Memory::default()).actions,
            reclone
        );
    }
    // A replica stopped on timeline 2 got its WAL from timeline 2's primary: it follows.
    let mut replica = on_timeline_2(ControlState::ShutDownInRecovery);
    if let DataDir::Initialized(c) = &mut replica.data {
        c.min_recovery_timeline = 2;
    }
    assert_eq!(
        decide_with(&config("a"), Some(&view), &replica, &Memory::default()).actions,
        vec![Action::Start(StartAs::Replica {
            upstream: Some("bb".into())
        })]
    );
    // A leader key that does not show a running primary yet proves nothing: wait.
    let mut early = view.clone();
    early.members[1].data.role = "replica".into();
    let d = decide_with(
        &config("a"),
        Some(&early),
        &on_timeline_2(ControlState::ShutDown),
        &Memory::default(),
    );
    assert!(d.actions.is_empty(), "{d:?}");
}

/// The same fork found later: `a` came back while nobody led and started read-only from its
/// data directory (a primary on timeline 2), then `bb` led on timeline 2. As a replica `a`
/// reports timeline 2 like any replica of `bb`; only the memory of what it started from shows
/// it holds its own history. Without that memory it simply follows.
#[test]
fn replica_started_from_a_former_primary_on_the_leaders_timeline_is_recloned() {
    let view = after_failover();
    let pg = running(true, 2, 1200, None);
    let memory = Memory {
        former_primary_timeline: Some(2),
        ..Default::default()
    };
    assert_eq!(
        decide_with(&config("a"), Some(&view), &pg, &memory).actions,
        vec![Action::Reinitialize {
            source: "bb".into(),
            methods: vec!["basebackup".into()],
        }]
    );
    let follow = vec![Action::Follow {
        upstream: Some("bb".into()),
    }];
    assert_eq!(
        decide_with(&config("a"), Some(&view), &pg, &Memory::default()).actions,
        follow
    );
    // A former primary of timeline 1 is judged by its position against the switch, as before.
    let old_primary = Memory {
        former_primary_timeline: Some(1),
        ..Default::default()
    };
    assert_eq!(
        decide_with(
            &config("a"),
            Some(&view),
            &running(true, 1, 900, None),
            &old_primary
        )
        .actions,
        follow
    );
}

// --- divergence, directly --------------------------------------------------------------------

/// The full-restart case CI met: node A promoted to timeline 2 and stopped; node B, which
/// never received timeline 2, reserved it and promoted to 3, then stopped; after the restart A
/// led again, reserved 3 and promoted to 4. Its history shows 3 as an empty line (it ends where
/// 2 ended). B's timeline 3 is not in it, whatever B's position: B must be rewound, not sent
/// streaming for a timeline the leader never had ("requested timeline 3 is not in this server's
/// history", forever).
#[test]
fn a_node_on_a_timeline_the_leader_only_reserved_is_rewound() {
    let h = [history(1, 500), history(2, 900), history(3, 900)];
    for local in [
        LocalEnd::CleanPrimary {
            timeline: 3,
            checkpoint_lsn: 600,
        },
        LocalEnd::CrashedPrimary { timeline: 3 },
        LocalEnd::Replica {
            timeline: 3,
            lsn: 450,
        },
    ] {
        assert_eq!(
            divergence(local, 4, Some(&h[..])),
            Divergence::RewindNeeded,
            "{local:?}"
        );
    }
    // A real timeline of the leader's history is still compared by position.
    assert_eq!(
        divergence(
            LocalEnd::Replica {
                timeline: 2,
                lsn: 800
            },
            4,
            Some(&h[..])
        ),
        Divergence::NoRewind
    );
}

#[test]
fn divergence_rules() {
    let h = [history(1, 950)];
    let some = Some(&h[..]);
    assert_eq!(
        divergence(LocalEnd::Replica { timeline: 2, lsn: 5 }, 2, some),
        Divergence::NoRewind
    );
    assert_eq!(
        divergence(LocalEnd::Replica { timeline: 3, lsn: 5 }, 2, some),
        Divergence::RewindNeeded
    );
    assert_eq!(
        divergence(
            LocalEnd::Replica {
                timeline: 1,
                lsn: 951
            },
            2,
            some
        ),
        Divergence::RewindNeeded
    );
    assert_eq!(
        divergence(
            LocalEnd::Replica {
                timeline: 1,
                lsn: 950
            },
            2,
            some
        ),
        Divergence::NoRewind
    );
    assert_eq!(
        divergence(
            LocalEnd::CleanPrimary {
                timeline: 1,
                checkpoint_lsn: 900
            },
            2,
            some
        ),
        Divergence::NoRewind
    );
    assert_eq!(
        divergence(
            LocalEnd::CleanPrimary {
                timeline: 1,
                checkpoint_lsn: 950
            },
            2,
            some
        ),
        Divergence::RewindNeeded
    );
    assert_eq!(
        divergence(LocalEnd::CrashedPrimary { timeline: 1 }, 2, some),
        Divergence::RewindNeeded
    );
    // A primary on the leader's own timeline: a second history under one timeline number.
    assert_eq!(
        divergence(
            LocalEnd::CleanPrimary {
                timeline: 2,
                checkpoint_lsn: 5
            },
            2,
            some
        ),
        Divergence::SameTimelineFork
    );
    assert_eq!(
        divergence(LocalEnd::CrashedPrimary { timeline: 2 }, 2, some),
        Divergence::SameTimelineFork
    );
    assert_eq!(
        divergence(LocalEnd::Replica { timeline: 1, lsn: 5 }, 2, None),
        Divergence::Unknown
    );
    assert_eq!(
        divergence(LocalEnd::Replica { timeline: 1, lsn: 5 }, 3, some),
        Divergence::Unknown
    );
    assert_eq!(
        divergence(LocalEnd::Replica { timeline: 1, lsn: 5 }, 0, some),
        Divergence::Unknown
    );
}
