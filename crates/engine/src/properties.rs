//! Properties that must hold for every situation, checked over 10 000 generated ones of three
//! decisions each: the engine never promotes or starts a primary without the lock (nor during a
//! switchover hand-over), never lets a `nofailover` member take the lock, never races or takes
//! over when it must not, never applies configuration to or restarts a primary without the
//! lock, never bootstraps over existing data, and in classic synchronous mode never lets a
//! member outside `/sync` take the lock. The generator covers the lock as `Leadership` holds
//! it, a silent leader, failsafe, the engine's memory (restart timers, start and rewind
//! failures, a switchover stop), scheduled failovers and pending operator requests.

use std::time::{Duration, Instant};

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
        // A restore method that works without a leader, then pg_basebackup: the empty-node
        // rules see both paths.
        replica_methods: vec![
            ReplicaMethod {
                name: "restore".into(),
                no_leader: true,
            },
            ReplicaMethod::basebackup(),
        ],
        synchronous_mode: [SyncMode::Off, SyncMode::On, SyncMode::Quorum][s.mode as usize],
        paused: s.paused,
        failsafe_mode: false,
        fast_takeover: true,
        takeover_margin: Duration::from_millis(500),
        slots: Default::default(),
        standby_cluster: None,
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
            server_version: 150010,
            pending_restart: false,
            slots: Vec::new(),
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

/// The engine's memory, a scheduled failover's due time and a pending operator request,
/// generated too.
#[derive(Clone, Debug)]
struct Extras {
    restarted_ago_ms: Option<u64>,
    start_failed: bool,
    rewind_failed: bool,
    failsafe_confirmed: bool,
    switchover_ago_ms: Option<u64>,
    pre_promote_failed_ago_ms: Option<u64>,
    failover_due_in: Option<f64>,
    /// 0 none, 1 restart now, 2 restart not due, 3 restart of a primary, 4 reinit.
    request: u8,
    former_primary_timeline: Option<u64>,
}

fn extras() -> impl Strategy<Value = Extras> {
    (
        prop::option::of(0u64..400_000),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u64..20_000),
        prop::option::of(prop::sample::select(vec![-100.0, -5.0, 0.0, 5.0])),
        0u8..5,
        prop::option::of(0u64..60_000),
        prop::option::of(1u64..4),
    )
        .prop_map(|e| Extras {
            restarted_ago_ms: e.0,
            start_failed: e.1,
            rewind_failed: e.2,
            failsafe_confirmed: e.3,
            switchover_ago_ms: e.4,
            failover_due_in: e.5,
            request: e.6,
            pre_promote_failed_ago_ms: e.7,
            former_primary_timeline: e.8,
        })
}

fn lock_of(code: u8) -> LockState {
    match code {
        0 => LockState::Held {
            valid_for: Duration::from_secs(5),
        },
        1 => LockState::Unproven,
        2 => LockState::Lapsed,
        _ => LockState::NotHeld,
    }
}

/// One node's state between decisions, as the runtime would leave it after performing them.
#[derive(Clone, Debug)]
struct State {
    view: ClusterView,
    pg: LocalPg,
    lock: LockState,
    memory: Memory,
}

/// The effect of a decision's actions, as far as the properties care: the lock and whether
/// PostgreSQL runs as a primary or a replica.
fn apply(state: &mut State, actions: &[Action], me: &str, now: Instant) {
    for action in actions {
        match action {
            Action::AcquireLock | Action::TakeOver { .. } | Action::AdoptLock { .. } => {
                state.lock = lock_of(0);
                state.view.leader = Some(Leader {
                    name: me.into(),
                    lease: 9,
                    mod_revision: 9,
                });
            }
            Action::ReleaseLock => {
                state.lock = LockState::NotHeld;
                state.view.leader = None;
                state.memory.switchover = None;
            }
            Action::Promote | Action::Start(StartAs::Primary) => set_running(&mut state.pg, false),
            Action::Start(StartAs::Replica { .. }) | Action::Rewind { .. } => {
                set_running(&mut state.pg, true)
            }
            Action::Demote(_) => {
                state.pg.postmaster_alive = false;
                state.pg.observed = None;
            }
            Action::StopForSwitchover { candidates } => {
                state.pg.postmaster_alive = false;
                state.pg.observed = None;
                state.memory.switchover = Some(SwitchoverStop {
                    since: now,
                    shutdown_lsn: 1,
                    candidates: candidates.clone(),
                });
            }
            _ => {}
        }
    }
}

fn set_running(pg: &mut LocalPg, in_recovery: bool) {
    if !matches!(pg.data, DataDir::Initialized(_)) {
        return;
    }
    pg.postmaster_alive = true;
    pg.observed = Some(Observed {
        in_recovery,
        sysid: "7268616322854375442".into(),
        timeline: 1,
        wal_position: 0,
        streaming: false,
        upstream: None,
        server_version: 150010,
        pending_restart: false,
        slots: Vec::new(),
    });
}

/// The single-decision safety rules.
fn check_decision(
    s: &Situation,
    f: &LockFacts,
    config: &EngineConfig,
    state: &State,
    silence: Option<&Silence>,
    decision: &Decision,
    now: Instant,
) -> Result<(), TestCaseError> {
    // A promotion pre_promote refused less than ttl ago: no promotion, no race (docs/patroni-compat.md §5.6).
    let backoff = state
        .memory
        .pre_promote_failed_at
        .is_some_and(|at| now.saturating_duration_since(at) < config.ttl);
    let lock = state.lock;
    let held = lock.is_held();
    let pg = &state.pg;
    let view_leader = state.view.leader.as_ref().map(|l| l.name.clone());
    let replica = pg.observed.as_ref().is_some_and(|o| o.in_recovery);
    let paused = state.view.is_paused() && s.dcs_up;
    for action in &decision.actions {
        match action {
            Action::Promote | Action::Start(StartAs::Primary) => {
                prop_assert!(held, "{action:?} without the lock: {decision:?}");
                prop_assert!(
                    !(backoff && *action == Action::Promote),
                    "promoting after pre_promote refused: {decision:?}"
                );
                prop_assert!(
                    !f.watchdog_failed,
                    "{action:?} with a failed required watchdog: {decision:?}"
                );
                prop_assert!(
                    state.memory.switchover.is_none(),
                    "{action:?} during a switchover hand-over: {decision:?}"
                );
            }
            Action::AcquireLock => {
                prop_assert!(!backoff, "racing after pre_promote refused: {decision:?}");
                prop_assert!(
                    s.dcs_up && view_leader.is_none(),
                    "racing for a held lock: {decision:?}"
                );
                prop_assert!(lock == LockState::NotHeld, "racing with {lock:?}: {decision:?}");
                // Paused, a running primary takes the free key (Patroni's `is_healthiest_node`),
                // also one tagged nofailover.
                let paused_primary =
                    paused && pg.postmaster_alive && pg.observed.as_ref().is_some_and(|o| !o.in_recovery);
                prop_assert!(
                    !s.nofailover || paused_primary,
                    "nofailover member racing: {decision:?}"
                );
                // The other exception: the candidate an operator named in a switchover.
                let named = s.failover.and_then(|f| f.1) == Some(s.me);
                prop_assert!(
                    !paused || named || paused_primary,
                    "racing while paused: {decision:?}"
                );
                prop_assert!(
                    !(f.failsafe_mode && f.failsafe_leader.is_some()),
                    "racing against a failsafe leader: {decision:?}"
                );
                let named_candidate = s.failover.and_then(|f| f.1) == Some(s.me);
                if config.synchronous_mode == SyncMode::On && s.in_recovery && !named_candidate {
                    prop_assert!(
                        s.sync_members[s.me] || s.me == 0,
                        "non-sync member racing in sync mode: {decision:?}"
                    );
                }
            }
            Action::TakeOver { from, .. } => {
                prop_assert!(!backoff, "taking over after pre_promote refused: {decision:?}");
                let silent = silence.expect("a takeover needs a silence");
                prop_assert!(
                    f.fast_takeover && lock == LockState::NotHeld && replica,
                    "{decision:?}"
                );
                prop_assert!(
                    view_leader.as_deref() == Some(from.as_str()) && silent.leader == *from,
                    "{decision:?}"
                );
                prop_assert!(from != NAMES[s.me], "taking over from myself: {decision:?}");
                prop_assert!(
                    silent.silent_for >= Duration::from_millis(4000),
                    "taking over too early: {decision:?}"
                );
                prop_assert!(!s.nofailover && !paused, "{decision:?}");
                prop_assert!(
                    !(f.failsafe_mode && f.failsafe_leader.is_some()),
                    "taking over from a failsafe leader: {decision:?}"
                );
            }
            Action::AdoptLock { .. } => {
                prop_assert!(
                    lock == LockState::Unproven,
                    "adopting with {lock:?}: {decision:?}"
                );
            }
            Action::ApplyConfig => {
                prop_assert!(f.config_pending && pg.postmaster_alive, "{decision:?}");
                prop_assert!(
                    replica || held,
                    "configuration applied to a primary without the lock: {decision:?}"
                );
            }
            Action::Restart { .. } => {
                prop_assert!(pg.postmaster_alive, "restart of a stopped postgres: {decision:?}");
                prop_assert!(
                    replica || held,
                    "restart of a primary without the lock: {decision:?}"
                );
            }
            Action::Reinitialize { .. } => {
                prop_assert!(!held, "the leader reinitialized itself: {decision:?}");
            }
            Action::StopForSwitchover { candidates } => {
                prop_assert!(
                    held && !candidates.is_empty() && !candidates.iter().any(|c| c == NAMES[s.me]),
                    "{decision:?}"
                );
            }
            Action::CreateReplica { source, methods } => {
                prop_assert!(matches!(pg.data, DataDir::Empty), "{decision:?}");
                prop_assert!(!held, "the lock holder cloned itself: {decision:?}");
                match source {
                    Some(_) => prop_assert_eq!(methods, &vec!["restore".to_string(), "basebackup".into()]),
                    None => prop_assert_eq!(methods, &vec!["restore".to_string()]),
                }
            }
            Action::Bootstrap => {
                prop_assert!(matches!(pg.data, DataDir::Empty) && !s.initialized && view_leader.is_none());
            }
            _ => {}
        }
        if paused {
            // Exceptions, both asked for by an operator's switchover: the named candidate
            // promotes once it holds the key, and the old primary that stopped for it starts
            // again as a replica as it lets the key go.
            let named = s.failover.and_then(|f| f.1) == Some(s.me);
            let handed_over = state.memory.switchover.is_some()
                && decision.actions.contains(&Action::ReleaseLock)
                && *action == Action::Start(StartAs::Replica { upstream: None });
            prop_assert!(
                !matches!(
                    action,
                    Action::Promote | Action::Start(_) | Action::Demote(_) | Action::Rewind { .. }
                ) || (named && *action == Action::Promote && held)
                    || handed_over,
                "PostgreSQL touched while paused: {decision:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    /// Three decisions in a row, each on the state the previous ones left (the lock taken or
    /// released, PostgreSQL promoted, started or stopped), every one checked.
    #[test]
    fn safety_invariants(s in situation(), f in lock_facts(), e in extras()) {
        let (mut config, view, pg, peers) = build(&s);
        config.fast_takeover = f.fast_takeover;
        config.failsafe_mode = f.failsafe_mode;
        let silence = f.silence.map(|(l, ms)| Silence {
            leader: NAMES[l].into(),
            leader_revision: 1,
            heartbeat_revision: 2,
            promise: Duration::from_millis(3500),
            silent_for: Duration::from_millis(ms),
        });
        let now = Instant::now() + Duration::from_secs(1000);
        let memory = Memory {
            primary_restart_since: e.restarted_ago_ms.map(|ms| now - Duration::from_millis(ms)),
            start_failed: e.start_failed,
            rewind_failed: e.rewind_failed,
            failsafe_confirmed: e.failsafe_confirmed,
            switchover: e.switchover_ago_ms.map(|ms| SwitchoverStop {
                since: now - Duration::from_millis(ms),
                shutdown_lsn: 500,
                candidates: vec![NAMES[(s.me + 1) % 3].into()],
            }),
            released_lock_at: e.restarted_ago_ms.filter(|_| e.start_failed).map(|ms| now - Duration::from_millis(ms)),
            pre_promote_failed_at: e.pre_promote_failed_ago_ms.map(|ms| now - Duration::from_millis(ms)),
            former_primary_timeline: e.former_primary_timeline,
            retained_slots_seen: None,
        };
        let request = match e.request {
            1 => Some(OperatorRequest::Restart(RestartRequest::default())),
            2 => Some(OperatorRequest::Restart(RestartRequest { not_yet_due: true, ..Default::default() })),
            3 => Some(OperatorRequest::Restart(RestartRequest { role: Some("primary".into()), ..Default::default() })),
            4 => Some(OperatorRequest::Reinitialize { from_leader: false }),
            _ => None,
        };
        let mut state = State { view, pg, lock: lock_of(f.lock), memory };
        for step in 0..3 {
            let at = now + Duration::from_secs(step);
            let mut inputs = crate::tests::inputs(&config, s.dcs_up.then_some(&state.view), &state.pg, &state.memory, peers.as_deref(), e.failover_due_in);
            inputs.now = at;
            inputs.lock = state.lock;
            inputs.silence = silence.as_ref();
            inputs.failsafe_leader = f.failsafe_leader.map(|i| NAMES[i]);
            inputs.watchdog_failed = f.watchdog_failed;
            inputs.config_pending = f.config_pending;
            inputs.request = request.as_ref();
            let decision = decide(&inputs);
            check_decision(&s, &f, &config, &state, silence.as_ref(), &decision, at)?;
            apply(&mut state, &decision.actions, NAMES[s.me], at);
        }
    }
}
