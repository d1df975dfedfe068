//! One HA cycle's decision (`docs/patroni-compat.md` §4.2), as a pure function.

use pgvigil_api::{ClusterView, Member, PgState, Role};

use crate::actions::{Action, Decision, DemoteMode, StartAs};
use crate::divergence::{LocalEnd, check_divergence, local_end};
use crate::inputs::{ControlInfo, DataDir, Inputs, LockState, Observed, OperatorRequest};
use crate::race::{leader_race, pre_promote_backoff, race_kind};
use crate::slots::{self, SlotNode};

/// Decides what this node does now.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let mut decision = decide_role(i);
    if config_may_be_applied(i, &decision) {
        decision.actions.insert(0, Action::ApplyConfig);
    }
    decision
}

/// Whether a changed PostgreSQL configuration may be written and reloaded now. Never on a
/// primary without the lock: a reload can shorten `synchronous_standby_names` and release
/// commits that only this node has, after another node was promoted (they would be
/// acknowledged, then lost in the rewind). Such a primary is stopped or demoted first; the
/// configuration follows once it runs as a replica. Nor while the decision stops, rewinds or
/// hands PostgreSQL over anyway.
fn config_may_be_applied(i: &Inputs<'_>, decision: &Decision) -> bool {
    let Some(own) = i.pg.observed.as_ref().filter(|_| i.pg.postmaster_alive) else {
        return false;
    };
    if !own.in_recovery && !i.lock.is_held() {
        return false;
    }
    i.config_pending
        && !decision.actions.iter().any(|a| {
            matches!(
                a,
                Action::Demote(_)
                    | Action::DemoteCluster
                    | Action::Rewind { .. }
                    | Action::Reinitialize { .. }
                    | Action::StopForSwitchover { .. }
                    | Action::Restart { .. }
                    | Action::ReleaseLock
                    | Action::Fatal(_)
            )
        })
}

fn decide_role(i: &Inputs<'_>) -> Decision {
    let Some(cluster) = i.cluster else {
        return dcs_unreachable(i);
    };
    let holds_lock = i.lock.is_held();

    let control = match &i.pg.data {
        DataDir::Empty => return empty_data_dir(i, cluster, holds_lock),
        DataDir::Invalid(why) => {
            let actions = if holds_lock {
                vec![Action::ReleaseLock]
            } else {
                Vec::new()
            };
            return Decision::new(
                format!("data directory is not usable ({why}); reinitialize this member"),
                actions,
            );
        }
        DataDir::Initialized(control) => control,
    };

    let mut prelude = Vec::new();
    let own_sysid =
        i.pg.observed
            .as_ref()
            .map_or(control.sysid.as_str(), |o| o.sysid.as_str());
    if let Some(sysid) = cluster.sysid() {
        if sysid != own_sysid {
            return Decision::new(
                "system ID mismatch",
                vec![Action::Fatal(format!(
                    "system ID mismatch: the data directory belongs to cluster {own_sysid}, \
                     the DCS says {sysid}; remove or reinitialize this member's data"
                ))],
            );
        }
    } else if cluster.initialize.is_none() && (cluster.is_unlocked() || holds_lock) {
        if i.pg.observed.as_ref().is_some_and(|o| o.in_recovery) && cluster.is_unlocked() {
            return Decision::new(
                "no initialize key",
                vec![Action::Fatal(
                    "No initialize key in DCS and PostgreSQL is running as replica, aborting start".into(),
                )],
            );
        }
        // An existing primary adopted by a fresh DCS, or a leader repairing a lost key.
        prelude.push(Action::WriteInitialize);
    }

    let mut decision = if !i.pg.postmaster_alive {
        match i.request {
            Some(OperatorRequest::Restart(r)) if !r.not_yet_due => Decision::new(
                "restart requested, but postgres is not running",
                vec![Action::AnswerRequest {
                    status: 503,
                    message: "postgres is not running".into(),
                }],
            ),
            _ => not_running(i, cluster, control),
        }
    } else if let Some(stop) = i.memory.switchover.as_ref().filter(|_| i.lock.is_held()) {
        // A switchover stopped PostgreSQL and the lock has not gone yet: nothing may run it as
        // a primary meanwhile. (Only an outside start gets here.)
        Decision::new(
            "switchover in progress: stopping postgres again",
            vec![Action::StopForSwitchover {
                candidates: stop.candidates.clone(),
            }],
        )
    } else if let Some(own) = &i.pg.observed {
        let decision = match i.lock {
            LockState::Held { .. } => leading(i, cluster, own),
            LockState::Unproven => adopting(cluster, own),
            LockState::Lapsed => lapsed(i, own),
            LockState::NotHeld => match race_kind(i, cluster, own) {
                Some(race) => leader_race(i, cluster, own, race),
                None => following(i, cluster, own),
            },
        };
        // An operator's request is taken up when nothing else is to be done with PostgreSQL.
        let quiet = decision.actions.iter().all(|a| {
            matches!(
                a,
                Action::LeaderHousekeeping { .. }
                    | Action::ManageSlots(_)
                    | Action::ApplyConfig
                    | Action::WriteInitialize
            )
        });
        match quiet
            .then(|| crate::operator::request_decision(i, cluster, own, i.lock.is_held()))
            .flatten()
        {
            Some(request) => request,
            None => decision,
        }
    } else {
        starting_up(i, cluster, holds_lock)
    };
    prelude.append(&mut decision.actions);
    decision.actions = prelude;
    decision
}

/// The leader to follow: the key's holder, or with the key gone, a leader that confirmed
/// itself over failsafe within ttl.
fn effective_leader<'c>(i: &Inputs<'_>, cluster: &'c ClusterView) -> Option<&'c Member> {
    match cluster.leader_name() {
        Some(name) => cluster.member(name),
        None if i.config.failsafe_mode => i.failsafe_leader.and_then(|name| cluster.member(name)),
        None => None,
    }
}

fn dcs_unreachable(i: &Inputs<'_>) -> Decision {
    if i.config.paused {
        // Maintenance mode: the operator, not the agent, decides what PostgreSQL does.
        return Decision::idle("DCS is not accessible; paused, leaving PostgreSQL alone");
    }
    match &i.pg.observed {
        Some(own) if !own.in_recovery && i.memory.failsafe_confirmed => Decision::idle(
            "continue to run as a leader because failsafe mode is enabled and all members are accessible",
        ),
        // The leader lock has its own connection and proves itself without this read; its
        // fence stops PostgreSQL at the deadline in any case.
        Some(own) if !own.in_recovery && i.lock.is_held() => Decision::idle(
            "could not read the cluster, but the leader lock is still proven; continuing as the leader",
        ),
        Some(own) if !own.in_recovery => Decision::new(
            "demoted self because DCS is not accessible and I was a leader",
            vec![Action::Demote(DemoteMode::Offline)],
        ),
        _ => Decision::idle("DCS is not accessible"),
    }
}

/// The key names us but no term of ours carries it: prove it before anything else. A
/// primary keeps running meanwhile but nothing about it changes (no configuration either).
fn adopting(cluster: &ClusterView, own: &Observed) -> Decision {
    let revision = cluster.leader.as_ref().map_or(0, |l| l.mod_revision);
    let role = if own.in_recovery { "replica" } else { "primary" };
    Decision::new(
        format!("the leader key names me; adopting it before acting (PostgreSQL runs as {role})"),
        vec![Action::AdoptLock {
            leader_revision: revision,
        }],
    )
}

/// Our term's deadline passed while etcd could not confirm it: the fence has stopped (or is
/// stopping) PostgreSQL. A primary still running goes down; the term may be proven again.
fn lapsed(i: &Inputs<'_>, own: &Observed) -> Decision {
    if !own.in_recovery && !i.config.paused {
        return Decision::new(
            "demoting self: the leader lock could not be proven in time",
            vec![Action::Demote(DemoteMode::ImmediateNoLock)],
        );
    }
    Decision::idle("the leader lock could not be proven in time; waiting for etcd")
}

fn empty_data_dir(i: &Inputs<'_>, cluster: &ClusterView, holds_lock: bool) -> Decision {
    if holds_lock {
        return Decision::new(
            "released leader key: data directory is empty",
            vec![Action::ReleaseLock],
        );
    }
    if cluster.is_paused() {
        return Decision::idle("running with empty data directory");
    }
    if let Some(leader) = cluster.leader_member() {
        if leader.data.conn_url.is_empty() {
            return Decision::idle(format!(
                "waiting for leader ({}) to publish its address",
                leader.name
            ));
        }
        let source = crate::operator::clone_source(&i.config.name, cluster, leader);
        let message = if source == leader.name {
            format!("trying to bootstrap from leader '{source}'")
        } else {
            format!("trying to bootstrap from replica '{source}'")
        };
        let methods = i.config.replica_plan(true, false);
        return Decision::new(
            message,
            vec![Action::CreateReplica {
                source: Some(source),
                methods,
            }],
        );
    }
    if cluster.is_unlocked()
        && cluster.initialize.is_none()
        && i.config.can_bootstrap
        && !i.config.nofailover()
    {
        // A standby cluster's first node clones the remote primary instead of running initdb
        // and becomes its standby leader (Patroni's `bootstrap_standby_leader`).
        if let Some(sc) = &i.config.standby_cluster {
            return Decision::new(
                "trying to bootstrap a new standby leader",
                vec![Action::BootstrapStandby {
                    methods: sc.bootstrap_methods(),
                }],
            );
        }
        return Decision::new("bootstrapping a new cluster", vec![Action::Bootstrap]);
    }
    // No leader to clone from (no key, or a key without a member): a method that restores
    // from a backup (`no_leader`) may still create the data directory, unless another node is
    // bootstrapping a new cluster right now (Patroni's `bootstrap (without leader)`). The result starts as a replica without an
    // upstream and races for the lock only under the usual rules (lag against the last leader
    // position), never because it was restored.
    let methods = i.config.replica_plan(false, false);
    let bootstrapping_elsewhere = cluster.initialize.as_deref() == Some("");
    if !methods.is_empty() && !bootstrapping_elsewhere {
        return Decision::new(
            "trying to bootstrap (without leader)",
            vec![Action::CreateReplica {
                source: None,
                methods,
            }],
        );
    }
    if i.config.standby_cluster.is_some() {
        return Decision::idle("waiting for standby_leader to bootstrap");
    }
    Decision::idle("waiting for leader to bootstrap")
}

fn not_running(i: &Inputs<'_>, cluster: &ClusterView, control: &ControlInfo) -> Decision {
    let cfg = i.config;
    let holds_lock = i.lock.is_held();
    match i.lock {
        LockState::Unproven => {
            let revision = cluster.leader.as_ref().map_or(0, |l| l.mod_revision);
            return Decision::new(
                "the leader key names me; adopting it before starting postgres",
                vec![Action::AdoptLock {
                    leader_revision: revision,
                }],
            );
        }
        LockState::Lapsed => {
            return Decision::idle("postgres is not running; the leader lock is waiting for etcd");
        }
        _ => {}
    }
    if holds_lock && let Some(stop) = &i.memory.switchover {
        // A switchover stopped PostgreSQL (also in maintenance mode, where the operator asked
        // for it by naming the candidate): hand over first.
        return crate::operator::switchover_handover(i, cluster, stop);
    }
    if cluster.is_paused() {
        // Maintenance mode: PostgreSQL is down because the operator stopped it, so it is
        // reported `stopped`, not `crashed` (Patroni's `_run_cycle`).
        let decision = if holds_lock {
            Decision::new(
                "removed leader lock because postgres is not running",
                vec![Action::ReleaseLock],
            )
        } else {
            Decision::idle("postgres is not running")
        };
        return decision.report(PgState::Stopped);
    }
    if holds_lock {
        if i.watchdog_failed {
            return Decision::new(
                "removed leader key: watchdog could not be activated",
                vec![Action::ReleaseLock],
            );
        }
        if i.memory.start_failed {
            return Decision::new(
                "removed leader key after trying and failing to start postgres",
                vec![Action::ReleaseLock],
            );
        }
        if cfg.standby_cluster.is_some() {
            // Never as a primary in a standby cluster; a former primary's data may have to be
            // rewound against the remote first.
            if control.state.was_primary() {
                return Decision::new(
                    "demoting to a standby cluster: cannot be a real primary in a standby cluster",
                    vec![Action::DemoteCluster],
                );
            }
            return Decision::new(
                "starting as a standby leader because i had the session lock",
                vec![Action::Start(StartAs::Remote)],
            );
        }
        if !control.state.was_primary() {
            return Decision::new(
                "starting as readonly because i had the session lock",
                vec![Action::Start(StartAs::Replica { upstream: None })],
            );
        }
        let timed_out = i
            .memory
            .primary_restart_since
            .is_some_and(|since| i.now.saturating_duration_since(since) >= cfg.primary_start_timeout);
        if cfg.primary_start_timeout.is_zero() || timed_out {
            // Failing over is preferred to restarting in place, but only when someone can take
            // over (Patroni's `recover`); otherwise the primary comes back here.
            match crate::failover::failover_possible(i, cluster) {
                None => {
                    return Decision::new(
                        "primary crashed: asking the members whether one can take over",
                        vec![Action::QueryPeers],
                    );
                }
                Some(true) if cfg.primary_start_timeout.is_zero() => {
                    return Decision::new(
                        "stopped PostgreSQL to fail over after a crash",
                        vec![Action::ReleaseLock],
                    );
                }
                Some(true) => {
                    return Decision::new(
                        "released leader key: postgres did not come back within primary_start_timeout",
                        vec![Action::ReleaseLock],
                    );
                }
                Some(false) => {
                    return Decision::new(
                        "starting primary after failure: no other member can take over",
                        vec![Action::Start(StartAs::Primary)],
                    );
                }
            }
        }
        return Decision::new(
            "starting primary after failure",
            vec![Action::Start(StartAs::Primary)],
        );
    }
    let Some(leader) = effective_leader(i, cluster) else {
        if cluster.is_unlocked() && cfg.standby_cluster.is_some() {
            // Nobody leads the standby cluster: keep up with the remote meanwhile (Patroni's
            // "standby cluster is unhealthy"); the race follows in the next cycle.
            return Decision::new(
                "trying to follow a remote member because standby cluster is unhealthy",
                vec![Action::Start(StartAs::Remote)],
            );
        }
        if cluster.is_unlocked() {
            // Start read-only; the next cycle races with whatever WAL we have.
            return Decision::new(
                "starting as a secondary",
                vec![Action::Start(StartAs::Replica { upstream: None })],
            );
        }
        return Decision::idle("waiting for the leader to publish its member key");
    };
    let local = local_end(control);
    match check_divergence(i, cluster, leader, local) {
        Some(decision) => decision,
        None => Decision::new(
            "starting as a secondary",
            vec![Action::Start(StartAs::Replica {
                upstream: upstream_for(i, cluster, leader),
            })],
        ),
    }
}

/// The member to stream from: none with `nostream` (the node recovers from the archive only,
/// Patroni's `_get_node_to_follow`), else the `replicatefrom` member when it runs, else the
/// leader.
fn upstream_for(i: &Inputs<'_>, cluster: &ClusterView, leader: &Member) -> Option<String> {
    if i.config.nostream() {
        return None;
    }
    Some(
        i.config
            .replicatefrom()
            .and_then(|name| cluster.member(name))
            .filter(|m| m.name != i.config.name && m.data.state == "running" && !m.data.conn_url.is_empty())
            .map_or_else(|| leader.name.clone(), |m| m.name.clone()),
    )
}

fn starting_up(i: &Inputs<'_>, cluster: &ClusterView, holds_lock: bool) -> Decision {
    let timed_out = i
        .memory
        .primary_restart_since
        .is_some_and(|since| i.now.saturating_duration_since(since) >= i.config.primary_start_timeout);
    // Maintenance mode: the operator, not the agent, decides what a slow start means.
    if holds_lock && timed_out && !i.config.paused {
        // Patroni's `handle_starting_instance`: give up on the start only for someone who can
        // take over; a slow primary is better than none.
        return match crate::failover::failover_possible(i, cluster) {
            None => Decision::new(
                "primary start has timed out: asking the members whether one can take over",
                vec![Action::QueryPeers],
            ),
            Some(true) => Decision::new(
                "stopped PostgreSQL because of startup timeout",
                vec![Action::Demote(DemoteMode::ImmediateNoLock), Action::ReleaseLock],
            ),
            Some(false) => Decision::idle(
                "primary start has timed out, but continuing to wait because failover is not possible",
            ),
        };
    }
    if cluster.is_paused() {
        // Maintenance mode: Patroni's `handle_starting_instance` reports a postmaster that
        // runs as `running` (and one that does not as `stopped`), never `starting`.
        return Decision::idle("PostgreSQL is still starting up").report(PgState::Running);
    }
    Decision::idle("PostgreSQL is still starting up")
}

fn leading(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Decision {
    let me = &i.config.name;
    if let Some(sc) = &i.config.standby_cluster {
        return crate::standby::standby_leading(i, cluster, own, sc);
    }
    // Paused, a running primary is the operator's; a replica holding the key (the candidate of
    // a switchover) still never promotes without the watchdog it requires.
    if i.watchdog_failed && (!cluster.is_paused() || own.in_recovery) {
        return if own.in_recovery {
            Decision::new(
                "not promoting self because watchdog could not be activated",
                vec![Action::ReleaseLock],
            )
        } else {
            Decision::new(
                "demoting self because watchdog could not be activated",
                vec![Action::Demote(DemoteMode::ImmediateNoLock), Action::ReleaseLock],
            )
        };
    }
    if own.in_recovery {
        // Maintenance mode: a lock holder that is not a primary lets the key go, unless an
        // operator's switchover named it and it took the key to promote.
        if cluster.is_paused() && !crate::failover::paused_candidate(i, cluster) {
            return Decision::new(
                "removed leader lock because postgres is not running as primary",
                vec![Action::ReleaseLock],
            );
        }
        if pre_promote_backoff(i) {
            // Patroni clears the failover key when it takes the lock; a switchover whose
            // candidate refused must not keep the others standing aside for it.
            let mut actions = Vec::new();
            if cluster.pending_failover().is_some() {
                actions.push(Action::ClearFailover);
            }
            actions.push(Action::ReleaseLock);
            return Decision::new(
                "Promotion cancelled because the pre-promote script failed; releasing the leader key",
                actions,
            );
        }
        return Decision::new(
            "promoted self to leader because I had the session lock",
            vec![Action::Promote],
        );
    }
    if let Some(decision) = leader_request(i, cluster, own) {
        return decision;
    }
    Decision::new(
        format!("no action. I am ({me}), the leader with the lock"),
        vec![housekeeping(i, cluster, own)],
    )
}

/// The leader's handling of a pending failover key (switchover), if any.
pub(crate) fn leader_request(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Option<Decision> {
    let mut decision = crate::failover::leader_decision(i, cluster, own)?;
    // Housekeeping continues while a request waits or is examined.
    if !decision
        .actions
        .iter()
        .any(|a| matches!(a, Action::StopForSwitchover { .. } | Action::QueryPeers))
    {
        decision.actions.insert(0, housekeeping(i, cluster, own));
    }
    Some(decision)
}

/// The facts about this node that the slot rules (§5.8) look at.
fn slot_node<'a>(i: &'a Inputs<'_>, cluster: &ClusterView, own: &'a Observed) -> SlotNode<'a> {
    SlotNode {
        me: &i.config.name,
        nofailover: i.config.nofailover(),
        nostream: i.config.nostream(),
        replicatefrom: i.config.replicatefrom(),
        primary: !own.in_recovery,
        standby_leader: own.in_recovery && i.config.standby_cluster.is_some() && i.lock.is_held(),
        server_version: own.server_version,
        wal_position: own.wal_position,
        paused: cluster.is_paused(),
        slots: &own.slots,
    }
}

pub(crate) fn housekeeping(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Action {
    let node = slot_node(i, cluster, own);
    let seen = i.memory.retained_slots_seen.as_ref();
    Action::LeaderHousekeeping {
        slots: slots::plan(&i.config.slots, cluster, &node),
        published: slots::published(&i.config.slots, cluster, &node, seen, i.now),
    }
}

/// A replica's slot upkeep, when there is something to do (or a leader's retention clock to
/// forget), then the logical slots to copy from the primary.
fn replica_slots(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Vec<Action> {
    let node = slot_node(i, cluster, own);
    let plan = slots::plan(&i.config.slots, cluster, &node);
    let copy = slots::to_copy(&i.config.slots, cluster, &node, &plan);
    let manage =
        (!plan.is_empty() || i.memory.retained_slots_seen.is_some()).then_some(Action::ManageSlots(plan));
    let copy = (!copy.is_empty()).then_some(Action::CopyLogicalSlots(copy));
    manage.into_iter().chain(copy).collect()
}

fn following(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Decision {
    let me = &i.config.name;
    let Some(leader) = effective_leader(i, cluster) else {
        return Decision::idle("waiting for the leader to publish its member key");
    };
    if leader.name == *me {
        // A read from before our release or loss of the key; the next read shows the truth.
        return Decision::idle("the leader key still names me, but it is not mine any more");
    }
    if !own.in_recovery {
        if cluster.is_paused() {
            return Decision::idle(format!(
                "continue to run as primary: the lock belongs to {}",
                leader.name
            ));
        }
        return Decision::new(
            format!("demoting self because the lock belongs to {}", leader.name),
            vec![Action::Demote(DemoteMode::ImmediateNoLock)],
        );
    }
    // A standby cluster's replicas cascade from its standby leader as others follow a primary.
    let leads = |r: Role| matches!(r, Role::Primary | Role::StandbyLeader);
    if leader.data.conn_url.is_empty() || leader.data.role().is_none_or(|r| !leads(r)) {
        return Decision::idle(format!("waiting for leader ({}) to run as primary", leader.name));
    }
    if !own.streaming {
        let leader_timeline = leader.data.timeline.unwrap_or(0);
        let local = match i.memory.former_primary_timeline {
            // Started read-only from a former primary's data directory (no leader then), on
            // the timeline the leader now leads: judged as the primary it was.
            Some(t) if t == own.timeline && t == leader_timeline => LocalEnd::CrashedPrimary { timeline: t },
            _ => LocalEnd::Replica {
                timeline: own.timeline,
                lsn: own.wal_position,
            },
        };
        if let Some(decision) = check_divergence(i, cluster, leader, local) {
            if cluster.is_paused() && !decision.actions.is_empty() {
                return Decision::idle(format!(
                    "paused: not touching PostgreSQL although {}",
                    decision.message
                ));
            }
            // A replica that is not streaming may simply be between connections; only act when
            // the published history proves it diverged.
            if !decision.actions.is_empty() || own.timeline < leader_timeline {
                return decision;
            }
        }
    }
    match upstream_for(i, cluster, leader) {
        Some(upstream) => {
            let wanted = cluster.member(&upstream).and_then(|m| m.data.host_port());
            if wanted.is_some() && own.upstream != wanted {
                return Decision::new(
                    format!("following new leader ({upstream})"),
                    vec![Action::Follow {
                        upstream: Some(upstream),
                    }],
                );
            }
        }
        // `nostream`: a WAL receiver (or a `primary_conninfo` from before the tag) must go.
        None if own.upstream.is_some() => {
            return Decision::new(
                "not streaming (nostream): recovering from the archive only",
                vec![Action::Follow { upstream: None }],
            );
        }
        None => {}
    }
    Decision::new(
        format!(
            "no action. I am ({me}), a secondary, and following a leader ({})",
            leader.name
        ),
        replica_slots(i, cluster, own),
    )
}
