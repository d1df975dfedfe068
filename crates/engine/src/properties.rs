//! Properties that must hold for every situation, checked over thousands of generated ones:
//! the engine never promotes or starts a primary without the lock, never lets a `nofailover`
//! member take the lock, never bootstraps over existing data, and in classic synchronous mode
//! never lets a member outside `/sync` take the lock.

use std::time::Duration;

use pgvigil_api::cluster::{Leader, Member, Versioned};
use pgvigil_api::rest::{StatusDocument, XlogInfo};
use pgvigil_api::{ClusterView, HistoryEntry, MemberData, StatusValue, SyncValue};
use proptest::prelude::*;
use serde_json::{Map, json};

use crate::sync::SyncMode;
use crate::*;

const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Debug)]
struct Situation {
    me: usize,
    leader: Option<usize>,
    initialized: bool,
    data: u8,
    alive: bool,
    answers: bool,
    in_recovery: bool,
    own_lsn: u64,
    own_timeline: u64,
    cluster_timeline: u64,
    optime: u64,
    nofailover: bool,
    paused: bool,
    mode: u8,
    sync_members: Vec<bool>,
    peers: Option<Vec<Option<(bool, u64)>>>,
    dcs_up: bool,
    failover: Option<(Option<usize>, Option<usize>)>,
}

/// What the leader lock, the liveness tracker and the runtime's gates say, generated
/// independently of the view (the engine must stay safe when they disagree with it).
#[derive(Clone, Debug)]
struct LockFacts {
    /// 0 held, 1 unproven, 2 lapsed, 3 not held.
    lock: u8,
    /// The silent leader and for how long (ms); the promise is 3500 ms, the margin 500.
    silence: Option<(usize, u64)>,
    fast_takeover: bool,
    failsafe_mode: bool,
    failsafe_leader: Option<usize>,
    watchdog_failed: bool,
    config_pending: bool,
}

fn lock_facts() -> impl Strategy<Value = LockFacts> {
    (
        0u8..4,
        prop::option::of((0usize..3, 0u64..8000)),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0usize..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|f| LockFacts {
            lock: f.0,
            silence: f.1,
            fast_takeover: f.2,
            failsafe_mode: f.3,
            failsafe_leader: f.4,
            watchdog_failed: f.5,
            config_pending: f.6,
        })
}

fn situation() -> impl Strategy<Value = Situation> {
    (
        (
            0usize..3,
            prop::option::of(0usize..3),
            any::<bool>(),
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            0u64..3000,
            1u64..4,
            1u64..4,
            0u64..3000,
            any::<bool>(),
            any::<bool>(),
            0u8..3,
        ),
        (
            prop::collection::vec(any::<bool>(), 3),
            prop::option::of(prop::collection::vec(
                prop::option::of((any::<bool>(), 0u64..3000)),
                3,
            )),
            any::<bool>(),
            prop::option::of((prop::option::of(0usize..3), prop::option::of(0usize..3))),
        ),
    )
        .prop_map(|(a, b, c)| Situation {
            me: a.0,
            leader: a.1,
            initialized: a.2,
            data: a.3,
            alive: a.4,
            answers: a.5,
            in_recovery: a.6,
            own_lsn: b.0,
            own_timeline: b.1,
            cluster_timeline: b.2,
            optime: b.3,
            nofailover: b.4,
            paused: b.5,
            mode: b.6,
            sync_members: c.0,
            peers: c.1,
            dcs_up: c.2,
            failover: c.3,
        })
}

fn build(s: &Situation) -> (EngineConfig, ClusterView, LocalPg, Option<Vec<PeerReport>>) {
    let me = NAMES[s.me];
    let mut tags = Map::new();
    if s.nofailover {
        tags.insert("nofailover".into(), json!(true));
    }
    let config = EngineConfig {
        name: me.into(),
        tags,
        ttl: Duration::from_secs(30),
        loop_wait: Duration::from_secs(10),
        maximum_lag_on_failover: 1000,
        primary_start_timeout: Duration::from_secs(300),
        check_timeline: false,
        use_pg_rewind: true,
        can_bootstrap: true,
        synchronous_mode: [SyncMode::Off, SyncMode::On, SyncMode::Quorum][s.mode as usize],
        paused: s.paused,
        failsafe_mode: false,
        fast_takeover: true,
        takeover_margin: Duration::from_millis(500),
    };
    let members = NAMES
        .iter()
        .map(|n| Member {
            name: n.to_string(),
            data: MemberData {
                conn_url: format!("postgres://127.0.0.1:{}/postgres", 5432 + n.len()),
                api_url: format!("http://127.0.0.1:8008/{n}"),
                state: "running".into(),
                role: if Some(*n) == s.leader.map(|l| NAMES[l]) {
                    "primary"
                } else {
                    "replica"
                }
                .into(),
                timeline: Some(s.cluster_timeline),
                ..Default::default()
            },
            lease: 1,
        })
        .collect();
    let sync_names: Vec<&str> = NAMES
        .iter()
        .zip(&s.sync_members)
        .filter(|(_, m)| **m)
        .map(|(n, _)| *n)
        .collect();
    let history: Vec<HistoryEntry> = (1..s.cluster_timeline)
        .map(|tl| HistoryEntry {
            parent_timeline: tl,
            switch_lsn: tl * 500,
            reason: "x".into(),
            timestamp: None,
            new_leader: None,
        })
        .collect();
    let view = ClusterView {
        revision: 1,
        initialize: s.initialized.then(|| "7268616322854375442".to_string()),
        config: Some(Versioned {
            value: json!({"pause": s.paused}),
            mod_revision: 1,
        }),
        leader: s.leader.map(|l| Leader {
            name: NAMES[l].into(),
            lease: 1,
            mod_revision: 1,
        }),
        members,
        history: Some(Versioned {
            value: history,
            mod_revision: 1,
        }),
        status: StatusValue {
            optime: s.optime,
            ..Default::default()
        },
        failover: s.failover.map(|(l, m)| Versioned {
            value: pgvigil_api::FailoverValue {
                leader: l.map(|i| NAMES[i].to_string()),
                member: m.map(|i| NAMES[i].to_string()),
                scheduled_at: None,
            },
            mod_revision: 1,
        }),
        sync: (s.mode > 0).then(|| Versioned {
            value: SyncValue {
                leader: Some("a".into()),
                quorum: 1,
                sync_standby: (!sync_names.is_empty()).then(|| sync_names.join(",")),
            },
            mod_revision: 1,
        }),
        failsafe: None,
        heartbeat: None,
    };
    let data = match s.data {
        0 => DataDir::Empty,
        1 => DataDir::Invalid("x".into()),
        _ => DataDir::Initialized(ControlInfo {
            sysid: "7268616322854375442".into(),
            state: if s.in_recovery {
                ControlState::ShutDownInRecovery
            } else {
                ControlState::InProduction
            },
            checkpoint_lsn: s.own_lsn,
            checkpoint_timeline: s.own_timeline,
            min_recovery_lsn: s.own_lsn,
            min_recovery_timeline: s.own_timeline,
        }),
    };
    let running = s.data == 2 && s.alive;
    let pg = LocalPg {
        data,
        postmaster_alive: running,
        observed: (running && s.answers).then(|| Observed {
            in_recovery: s.in_recovery,
            sysid: "7268616322854375442".into(),
            timeline: s.own_timeline,
            wal_position: s.own_lsn,
            streaming: false,
            upstream: None,
        }),
    };
    let peers = s.peers.as_ref().map(|answers| {
        NAMES
            .iter()
            .zip(answers)
            .filter(|(n, _)| **n != me)
            .map(|(n, a)| PeerReport {
                name: n.to_string(),
                status: a.map(|(primary, lsn)| StatusDocument {
                    state: "running".into(),
                    role: if primary { "primary" } else { "replica" }.into(),
                    xlog: Some(if primary {
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
                    }),
                    ..Default::default()
                }),
            })
            .collect()
    });
    (config, view, pg, peers)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn safety_invariants(s in situation(), f in lock_facts()) {
        let (mut config, view, pg, peers) = build(&s);
        config.fast_takeover = f.fast_takeover;
        config.failsafe_mode = f.failsafe_mode;
        let lock = match f.lock {
            0 => LockState::Held { valid_for: Duration::from_secs(5) },
            1 => LockState::Unproven,
            2 => LockState::Lapsed,
            _ => LockState::NotHeld,
        };
        let silence = f.silence.map(|(l, ms)| Silence {
            leader: NAMES[l].into(),
            leader_revision: 1,
            heartbeat_revision: 2,
            promise: Duration::from_millis(3500),
            silent_for: Duration::from_millis(ms),
        });
        let memory = Memory::default();
        let mut inputs = crate::tests::inputs(&config, s.dcs_up.then_some(&view), &pg, &memory, peers.as_deref(), None);
        inputs.lock = lock;
        inputs.silence = silence.as_ref();
        inputs.failsafe_leader = f.failsafe_leader.map(|i| NAMES[i]);
        inputs.watchdog_failed = f.watchdog_failed;
        inputs.config_pending = f.config_pending;
        let decision = decide(&inputs);
        let held = lock.is_held();
        let replica = pg.observed.as_ref().is_some_and(|o| o.in_recovery);
        for action in &decision.actions {
            match action {
                Action::Promote | Action::Start(StartAs::Primary) => {
                    prop_assert!(held, "{action:?} without the lock: {decision:?}");
                    prop_assert!(!f.watchdog_failed, "{action:?} with a failed required watchdog: {decision:?}");
                }
                Action::AcquireLock => {
                    prop_assert!(s.dcs_up && s.leader.is_none(), "racing for a held lock: {decision:?}");
                    prop_assert!(lock == LockState::NotHeld, "racing with {lock:?}: {decision:?}");
                    prop_assert!(!s.nofailover, "nofailover member racing: {decision:?}");
                    prop_assert!(!s.paused, "racing while paused: {decision:?}");
                    prop_assert!(!(f.failsafe_mode && f.failsafe_leader.is_some()), "racing against a failsafe leader: {decision:?}");
                    let named_candidate = s.failover.and_then(|f| f.1) == Some(s.me);
                    if config.synchronous_mode == SyncMode::On && s.in_recovery && !named_candidate {
                        prop_assert!(s.sync_members[s.me] || s.me == 0, "non-sync member racing in sync mode: {decision:?}");
                    }
                }
                Action::TakeOver { from, .. } => {
                    let silent = silence.as_ref().expect("a takeover needs a silence");
                    prop_assert!(f.fast_takeover && lock == LockState::NotHeld && replica, "{decision:?}");
                    prop_assert!(s.leader.map(|l| NAMES[l]) == Some(from.as_str()) && silent.leader == *from, "{decision:?}");
                    prop_assert!(from != NAMES[s.me], "taking over from myself: {decision:?}");
                    prop_assert!(silent.silent_for >= Duration::from_millis(4000), "taking over too early: {decision:?}");
                    prop_assert!(!s.nofailover && !s.paused, "{decision:?}");
                    prop_assert!(!(f.failsafe_mode && f.failsafe_leader.is_some()), "taking over from a failsafe leader: {decision:?}");
                }
                Action::AdoptLock { .. } => {
                    prop_assert!(lock == LockState::Unproven, "adopting with {lock:?}: {decision:?}");
                }
                Action::ApplyConfig => {
                    prop_assert!(f.config_pending && pg.postmaster_alive, "{decision:?}");
                    prop_assert!(replica || held, "configuration applied to a primary without the lock: {decision:?}");
                }
                Action::Bootstrap => {
                    prop_assert!(matches!(pg.data, DataDir::Empty) && !s.initialized && s.leader.is_none());
                }
                _ => {}
            }
            if s.paused {
                prop_assert!(
                    !matches!(action, Action::Promote | Action::Start(_) | Action::Demote(_) | Action::Rewind { .. } | Action::Reinitialize { .. }),
                    "PostgreSQL touched while paused: {decision:?}"
                );
            }
        }
    }
}
