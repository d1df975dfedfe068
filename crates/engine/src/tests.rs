//! One test per rule of the engine. Each builds the facts of a situation by hand and asserts the
//! exact decision.

use std::time::{Duration, Instant};

use pgvigil_api::cluster::{Leader, Member, Versioned};
use pgvigil_api::rest::{StatusDocument, XlogInfo};
use pgvigil_api::{ClusterView, HistoryEntry, MemberData, StatusValue};
use serde_json::{Map, Value, json};

use crate::*;

const SYSID: &str = "7268616322854375442";

pub(crate) fn config(name: &str) -> EngineConfig {
    EngineConfig {
        name: name.into(),
        tags: Map::new(),
        ttl: Duration::from_secs(30),
        loop_wait: Duration::from_secs(10),
        maximum_lag_on_failover: 1_048_576,
        primary_start_timeout: Duration::from_secs(300),
        check_timeline: false,
        use_pg_rewind: true,
        can_bootstrap: true,
        replica_methods: Vec::new(),
        synchronous_mode: crate::sync::SyncMode::Off,
        paused: false,
        failsafe_mode: false,
        fast_takeover: true,
        takeover_margin: Duration::from_millis(500),
        // Slot rules have their own tests (`slots_tests.rs`); elsewhere a replica with nothing
        // to do stays idle.
        slots: crate::slots::SlotsConfig {
            use_slots: false,
            ..Default::default()
        },
        standby_cluster: None,
    }
}

/// The `now` of every decision in these tests.
pub(crate) fn test_now() -> Instant {
    static NOW: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *NOW.get_or_init(Instant::now)
}

fn member(name: &str, role: &str, timeline: u64, lsn: u64) -> Member {
    Member {
        name: name.into(),
        data: MemberData {
            conn_url: format!("postgres://127.0.0.1:{}/postgres", 5432 + name.len() as u16),
            api_url: format!("http://127.0.0.1:8008/{name}/patroni"),
            state: "running".into(),
            role: role.into(),
            version: "4.1.5".into(),
            timeline: Some(timeline),
            xlog_location: Some(lsn),
            ..Default::default()
        },
        lease: 1,
    }
}

/// An initialized cluster of three members `a`, `bb`, `ccc` (distinct ports by name length).
pub(crate) fn cluster(leader: Option<&str>) -> ClusterView {
    ClusterView {
        revision: 10,
        initialize: Some(SYSID.into()),
        config: Some(Versioned {
            value: json!({"ttl": 30}),
            mod_revision: 2,
        }),
        leader: leader.map(|n| Leader {
            name: n.into(),
            lease: 1,
            mod_revision: 3,
        }),
        members: vec![
            member(
                "a",
                if leader == Some("a") { "primary" } else { "replica" },
                1,
                1000,
            ),
            member(
                "bb",
                if leader == Some("bb") {
                    "primary"
                } else {
                    "replica"
                },
                1,
                1000,
            ),
            member(
                "ccc",
                if leader == Some("ccc") {
                    "primary"
                } else {
                    "replica"
                },
                1,
                1000,
            ),
        ],
        history: Some(Versioned {
            value: vec![],
            mod_revision: 4,
        }),
        status: StatusValue {
            optime: 1000,
            ..Default::default()
        },
        ..Default::default()
    }
}

pub(crate) fn control(state: ControlState) -> DataDir {
    DataDir::Initialized(ControlInfo {
        sysid: SYSID.into(),
        state,
        checkpoint_lsn: 900,
        checkpoint_timeline: 1,
        min_recovery_lsn: 0,
        min_recovery_timeline: 0,
    })
}

pub(crate) fn running(in_recovery: bool, timeline: u64, lsn: u64, upstream: Option<(&str, u16)>) -> LocalPg {
    LocalPg {
        data: control(if in_recovery {
            ControlState::InArchiveRecovery
        } else {
            ControlState::InProduction
        }),
        postmaster_alive: true,
        observed: Some(Observed {
            in_recovery,
            sysid: SYSID.into(),
            timeline,
            wal_position: lsn,
            streaming: upstream.is_some(),
            upstream: upstream.map(|(h, p)| (h.to_string(), p)),
            server_version: 150010,
            pending_restart: false,
            slots: Vec::new(),
        }),
    }
}

pub(crate) fn stopped(state: ControlState) -> LocalPg {
    LocalPg {
        data: control(state),
        postmaster_alive: false,
        observed: None,
    }
}

pub(crate) fn decide_with(
    cfg: &EngineConfig,
    cluster: Option<&ClusterView>,
    pg: &LocalPg,
    memory: &Memory,
) -> Decision {
    decide(&inputs(cfg, cluster, pg, memory, None, None))
}

/// The inputs of one decision, with the lock as a view naming `cfg.name` implies (held) and no
/// silence, failsafe leader, watchdog failure or pending configuration: the tests of those
/// set them explicitly.
pub(crate) fn inputs<'a>(
    cfg: &'a EngineConfig,
    cluster: Option<&'a ClusterView>,
    pg: &'a LocalPg,
    memory: &'a Memory,
    peers: Option<&'a [PeerReport]>,
    failover_due_in: Option<f64>,
) -> Inputs<'a> {
    Inputs {
        now: test_now(),
        config: cfg,
        cluster,
        lock: lock_from_view(cfg, cluster),
        silence: None,
        failsafe_leader: None,
        watchdog_failed: false,
        config_pending: false,
        request: None,
        pg,
        memory,
        peers,
        failover_due_in,
    }
}

/// Held when the view names `cfg.name`, as if `Leadership` had proven it.
pub(crate) fn lock_from_view(cfg: &EngineConfig, cluster: Option<&ClusterView>) -> LockState {
    if cluster.and_then(ClusterView::leader_name) == Some(cfg.name.as_str()) {
        LockState::Held {
            valid_for: Duration::from_secs(20),
        }
    } else {
        LockState::NotHeld
    }
}

/// The housekeeping of leader `a` in [`cluster`] (at position 1000, slots off): it publishes
/// its own position under its slot name and retains that slot.
pub(crate) fn housekeeping_a() -> Action {
    housekeeping_a_at(1000)
}

pub(crate) fn housekeeping_a_at(lsn: u64) -> Action {
    Action::LeaderHousekeeping {
        slots: crate::slots::SlotPlan::default(),
        published: crate::slots::PublishedSlots {
            slots: [("a".to_string(), lsn)].into(),
            retain_slots: vec!["a".into()],
            seen: [("a".to_string(), test_now())].into(),
        },
    }
}

pub(crate) fn peer(name: &str, role: &str, lsn: u64, tags: Map<String, Value>) -> PeerReport {
    let xlog = if role == "primary" {
        XlogInfo {
            location: Some(lsn),
            ..Default::default()
        }
    } else {
        XlogInfo {
            received_location: Some(lsn),
            replayed_location: Some(lsn),
            ..Default::default()
        }
    };
    PeerReport {
        name: name.into(),
        status: Some(StatusDocument {
            state: "running".into(),
            role: role.into(),
            xlog: Some(xlog),
            tags,
            ..Default::default()
        }),
    }
}

fn race(cfg: &EngineConfig, cluster: &ClusterView, own_lsn: u64, peers: &[PeerReport]) -> Decision {
    let pg = running(true, 1, own_lsn, None);
    decide(&crate::tests::inputs(
        cfg,
        Some(cluster),
        &pg,
        &Memory::default(),
        Some(peers),
        None,
    ))
}

// --- bootstrap and cloning -------------------------------------------------------------------

#[test]
fn empty_node_of_a_new_cluster_bootstraps() {
    let view = ClusterView::default();
    let pg = LocalPg {
        data: DataDir::Empty,
        postmaster_alive: false,
        observed: None,
    };
    let d = decide_with(&config("a"), Some(&view), &pg, &Memory::default());
    assert_eq!(d.actions, vec![Action::Bootstrap]);
}

#[test]
fn bootstrap_in_progress_elsewhere_means_wait() {
    let view = ClusterView {
        initialize: Some(String::new()),
        ..Default::default()
    };
    let pg = LocalPg {
        data: DataDir::Empty,
        postmaster_alive: false,
        observed: None,
    };
    let d = decide_with(&config("a"), Some(&view), &pg, &Memory::default());
    assert!(d.actions.is_empty());
    assert_eq!(d.message, "waiting for leader to bootstrap");
}

#[test]
fn nofailover_or_no_bootstrap_section_never_bootstraps() {
    let view = ClusterView::default();
    let pg = LocalPg {
        data: DataDir::Empty,
        postmaster_alive: false,
        observed: None,
    };
    let mut cfg = config("a");
    cfg.tags.insert("nofailover".into(), json!(true));
    assert!(
        decide_with(&cfg, Some(&view), &pg, &Memory::default())
            .actions
            .is_empty()
    );
    let mut cfg = config("a");
    cfg.can_bootstrap = false;
    assert!(
        decide_with(&cfg, Some(&view), &pg, &Memory::default())
            .actions
            .is_empty()
    );
}

#[test]
fn empty_node_clones_from_leader_or_clonefrom_replica() {
    let view = cluster(Some("a"));
    let pg = LocalPg {
        data: DataDir::Empty,
        postmaster_alive: false,
        observed: None,
    };
    let d = decide_with(&config("ccc"), Some(&view), &pg, &Memory::default());
    let clone = |source: &str| Action::CreateReplica {
        source: Some(source.into()),
        methods: vec!["basebackup".into()],
    };
    assert_eq!(d.actions, vec![clone("a")]);

    let mut view = cluster(Some("a"));
    view.members[1].data.tags.insert("clonefrom".into(), json!(true));
    let d = decide_with(&config("ccc"), Some(&view), &pg, &Memory::default());
    assert_eq!(d.actions, vec![clone("bb")]);
}

fn with_methods(methods: &[(&str, bool)]) -> EngineConfig {
    let mut cfg = config("ccc");
    cfg.replica_methods = methods
        .iter()
        .map(|(name, no_leader)| ReplicaMethod {
            name: name.to_string(),
            no_leader: *no_leader,
        })
        .collect();
    cfg
}

pub(crate) fn empty() -> LocalPg {
    LocalPg {
        data: DataDir::Empty,
        postmaster_alive: false,
        observed: None,
    }
}

#[test]
fn a_replica_is_created_with_the_configured_methods_in_order() {
    let cfg = with_methods(&[("wal_g", false), ("restore", true), ("basebackup", false)]);
    let d = decide_with(&cfg, Some(&cluster(Some("a"))), &empty(), &Memory::default());
    assert_eq!(
        d.actions,
        vec![Action::CreateReplica {
            source: Some("a".into()),
            methods: vec!["wal_g".into(), "restore".into(), "basebackup".into()],
        }]
    );
    // Without basebackup listed there is no fallback to it (Patroni's order is the list).
    let cfg = with_methods(&[("wal_g", false)]);
    let d = decide_with(&cfg, Some(&cluster(Some("a"))), &empty(), &Memory::default());
    assert!(
        matches!(&d.actions[..], [Action::CreateReplica { methods, .. }] if methods == &["wal_g".to_string()]),
        "{d:?}"
    );
}

#[test]
fn without_a_leader_only_no_leader_methods_create_a_replica() {
    let cfg = with_methods(&[("wal_g", false), ("restore", true), ("basebackup", false)]);
    let d = decide_with(&cfg, Some(&cluster(None)), &empty(), &Memory::default());
    assert_eq!(d.message, "trying to bootstrap (without leader)");
    assert_eq!(
        d.actions,
        vec![Action::CreateReplica {
            source: None,
            methods: vec!["restore".into()],
        }]
    );
    // Also before the cluster exists, on a node that may not bootstrap it.
    let mut nofailover = cfg.clone();
    nofailover.tags.insert("nofailover".into(), json!(true));
    let d = decide_with(
        &nofailover,
        Some(&ClusterView::default()),
        &empty(),
        &Memory::default(),
    );
    assert!(
        matches!(&d.actions[..], [Action::CreateReplica { source: None, .. }]),
        "{d:?}"
    );
    // A node that may bootstrap does so instead (bootstrap comes first, as in Patroni).
    let d = decide_with(&cfg, Some(&ClusterView::default()), &empty(), &Memory::default());
    assert_eq!(d.actions, vec![Action::Bootstrap]);
}

#[test]
fn no_restore_without_a_leader_while_another_node_bootstraps_or_without_no_leader_methods() {
    let cfg = with_methods(&[("restore", true)]);
    let bootstrapping = ClusterView {
        initialize: Some(String::new()),
        ..Default::default()
    };
    let d = decide_with(&cfg, Some(&bootstrapping), &empty(), &Memory::default());
    assert_eq!(d.message, "waiting for leader to bootstrap");
    assert!(d.actions.is_empty());
    let cfg = with_methods(&[("wal_g", false), ("basebackup", false)]);
    let d = decide_with(&cfg, Some(&cluster(None)), &empty(), &Memory::default());
    assert_eq!(d.message, "waiting for leader to bootstrap");
    assert!(d.actions.is_empty());
}

// --- sysid -----------------------------------------------------------------------------------

#[test]
fn foreign_data_directory_is_fatal() {
    let mut view = cluster(Some("a"));
    view.initialize = Some("1111111111111111111".into());
    let d = decide_with(
        &config("bb"),
        Some(&view),
        &running(true, 1, 10, None),
        &Memory::default(),
    );
    assert!(matches!(d.actions.as_slice(), [Action::Fatal(m)] if m.contains("system ID mismatch")));
}

#[test]
fn existing_primary_adopts_an_empty_dcs() {
    let view = ClusterView::default();
    let d = decide_with(
        &config("a"),
        Some(&view),
        &running(false, 1, 10, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::WriteInitialize, Action::AcquireLock]);
    let d = decide_with(
        &config("a"),
        Some(&view),
        &running(true, 1, 10, None),
        &Memory::default(),
    );
    assert!(matches!(d.actions.as_slice(), [Action::Fatal(_)]));
}

// --- leader race -----------------------------------------------------------------------------

#[test]
fn race_asks_peers_first() {
    let d = decide_with(
        &config("a"),
        Some(&cluster(None)),
        &running(true, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::QueryPeers]);
}

#[test]
fn healthiest_replica_takes_the_lock() {
    let peers = [
        peer("bb", "replica", 900, Map::new()),
        PeerReport {
            name: "ccc".into(),
            status: None,
        },
    ];
    assert_eq!(
        race(&config("a"), &cluster(None), 1000, &peers).actions,
        vec![Action::AcquireLock]
    );
}

#[test]
fn replica_beyond_lag_limit_does_not_race() {
    let mut view = cluster(None);
    view.status.optime = 10_000_000;
    let d = race(&config("a"), &view, 1000, &[]);
    assert!(d.actions.is_empty());
    assert!(
        d.message.contains("exceeds maximum replication lag"),
        "{}",
        d.message
    );
}

#[test]
fn peer_ahead_wins() {
    let peers = [peer("bb", "replica", 2000, Map::new())];
    let d = race(&config("a"), &cluster(None), 1000, &peers);
    assert!(d.actions.is_empty());
    assert!(d.message.contains("bb has more WAL"));
}

#[test]
fn nofailover_peer_ahead_does_not_block() {
    let mut view = cluster(None);
    view.members[1].data.tags.insert("nofailover".into(), json!(true));
    let peers = [peer("bb", "replica", 2000, Map::new())];
    assert_eq!(
        race(&config("a"), &view, 1000, &peers).actions,
        vec![Action::AcquireLock]
    );
}

#[test]
fn alive_primary_blocks_the_race() {
    let peers = [peer("bb", "primary", 500, Map::new())];
    let d = race(&config("a"), &cluster(None), 1000, &peers);
    assert!(d.actions.is_empty());
    assert!(d.message.contains("Primary (bb) is still alive"));
}

#[test]
fn failover_priority_breaks_ties() {
    let mut view = cluster(None);
    view.members[1]
        .data
        .tags
        .insert("failover_priority".into(), json!(5));
    let peers = [peer("bb", "replica", 1000, Map::new())];
    assert!(race(&config("a"), &view, 1000, &peers).actions.is_empty());
    // Lower priority peer at the same position does not block.
    view.members[1]
        .data
        .tags
        .insert("failover_priority".into(), json!(1));
    let mut cfg = config("a");
    cfg.tags.insert("failover_priority".into(), json!(2));
    assert_eq!(race(&cfg, &view, 1000, &peers).actions, vec![Action::AcquireLock]);
}

#[test]
fn nofailover_node_never_races() {
    let mut cfg = config("a");
    cfg.tags.insert("failover_priority".into(), json!(0));
    let d = race(&cfg, &cluster(None), 5000, &[]);
    assert!(d.actions.is_empty());
}

#[test]
fn stale_primary_on_old_timeline_demotes_instead_of_racing() {
    let mut view = cluster(None);
    view.history = Some(Versioned {
        value: vec![history(1, 800)],
        mod_revision: 5,
    });
    let d = decide_with(
        &config("a"),
        Some(&view),
        &running(false, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::Demote(DemoteMode::ImmediateNoLock)]);
}

#[test]
fn primary_without_leader_retakes_the_lock() {
    let d = decide_with(
        &config("a"),
        Some(&cluster(None)),
        &running(false, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::AcquireLock]);
}

// --- holding the lock ------------------------------------------------------------------------

#[test]
fn lock_holder_in_recovery_promotes() {
    let d = decide_with(
        &config("a"),
        Some(&cluster(Some("a"))),
        &running(true, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::Promote]);
}

#[test]
fn healthy_leader_does_housekeeping() {
    let d = decide_with(
        &config("a"),
        Some(&cluster(Some("a"))),
        &running(false, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![housekeeping_a()]);
    assert_eq!(d.message, "no action. I am (a), the leader with the lock");
}

#[test]
fn crashed_leader_restarts_in_place_then_gives_up_after_timeout() {
    let cfg = config("a");
    let view = cluster(Some("a"));
    let pg = stopped(ControlState::InProduction);
    let d = decide_with(&cfg, Some(&view), &pg, &Memory::default());
    assert_eq!(d.actions, vec![Action::Start(StartAs::Primary)]);

    // Timed out: the lock goes once a replica answered that it can take over
    // (`crash_tests.rs` has the rest of that rule).
    let memory = Memory {
        primary_restart_since: Some(Instant::now() - Duration::from_secs(301)),
        ..Default::default()
    };
    let peers = [peer("bb", "replica", 1000, Map::new())];
    assert_eq!(
        decide(&inputs(&cfg, Some(&view), &pg, &memory, Some(&peers), None)).actions,
        vec![Action::ReleaseLock]
    );

    let memory = Memory {
        start_failed: true,
        ..Default::default()
    };
    assert_eq!(
        decide_with(&cfg, Some(&view), &pg, &memory).actions,
        vec![Action::ReleaseLock]
    );

    let mut cfg = config("a");
    cfg.primary_start_timeout = Duration::ZERO;
    assert_eq!(
        decide(&inputs(
            &cfg,
            Some(&view),
            &pg,
            &Memory::default(),
            Some(&peers),
            None
        ))
        .actions,
        vec![Action::ReleaseLock]
    );
}

#[test]
fn lost_dcs_demotes_a_primary_only() {
    let d = decide_with(
        &config("a"),
        None,
        &running(false, 1, 1000, None),
        &Memory::default(),
    );
    assert_eq!(d.actions, vec![Action::Demote(DemoteMode::Offline)]);
    let d = decide_with(
        &config("a"),
        None,
        &running(true, 1, 1000, None),
        &Memory::default(),
    );
    assert!(d.actions.is_empty());
}

pub(crate) fn history(parent: u64, lsn: u64) -> HistoryEntry {
    HistoryEntry {
        parent_timeline: parent,
        switch_lsn: lsn,
        reason: "x".into(),
        timestamp: None,
        new_leader: None,
    }
}
