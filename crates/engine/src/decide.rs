//! One HA cycle's decision (`patroni-compat.md` §4.2), as a pure function.

use pgvigil_api::{ClusterView, Member, Role};

use crate::actions::{Action, Decision, DemoteMode, StartAs};
use crate::divergence::{Divergence, LocalEnd, divergence};
use crate::inputs::{ControlInfo, ControlState, DataDir, Inputs, Observed};
use crate::race::{RaceVerdict, race_verdict};

/// Decides what this node does now.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let Some(cluster) = i.cluster else {
        return dcs_unreachable(i);
    };
    let me = i.config.name.as_str();
    let holds_lock = cluster.leader_name() == Some(me);

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
        not_running(i, cluster, control, holds_lock)
    } else if let Some(own) = &i.pg.observed {
        if cluster.is_unlocked() {
            leader_race(i, cluster, own)
        } else if holds_lock {
            leading(i, cluster, own)
        } else {
            following(i, cluster, own)
        }
    } else {
        starting_up(i, holds_lock)
    };
    prelude.append(&mut decision.actions);
    decision.actions = prelude;
    decision
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
        // The lease guardian fences a primary before its lease can expire in any case; demoting
        // as soon as the DCS is unreadable only makes that happen earlier.
        Some(own) if !own.in_recovery => Decision::new(
            "demoted self because DCS is not accessible and I was a leader",
            vec![Action::Demote(DemoteMode::Offline)],
        ),
        _ => Decision::idle("DCS is not accessible"),
    }
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
        let source = clone_source(i, cluster, leader);
        let message = if source == leader.name {
            format!("trying to bootstrap from leader '{source}'")
        } else {
            format!("trying to bootstrap from replica '{source}'")
        };
        return Decision::new(message, vec![Action::CreateReplica { source }]);
    }
    if cluster.is_unlocked()
        && cluster.initialize.is_none()
        && i.config.can_bootstrap
        && !i.config.nofailover()
    {
        return Decision::new("bootstrapping a new cluster", vec![Action::Bootstrap]);
    }
    Decision::idle("waiting for leader to bootstrap")
}

/// A running replica tagged `clonefrom` (first by name, so the choice is reproducible), else
/// the leader.
fn clone_source(i: &Inputs<'_>, cluster: &ClusterView, leader: &Member) -> String {
    cluster
        .members
        .iter()
        .filter(|m| m.name != i.config.name && m.name != leader.name)
        .filter(|m| m.data.tag_bool("clonefrom") && m.data.state == "running" && !m.data.conn_url.is_empty())
        .map(|m| m.name.clone())
        .next()
        .unwrap_or_else(|| leader.name.clone())
}

fn not_running(i: &Inputs<'_>, cluster: &ClusterView, control: &ControlInfo, holds_lock: bool) -> Decision {
    let cfg = i.config;
    if cluster.is_paused() {
        if holds_lock {
            return Decision::new(
                "removed leader lock because postgres is not running",
                vec![Action::ReleaseLock],
            );
        }
        return Decision::idle("postgres is not running");
    }
    if holds_lock {
        if i.memory.start_failed {
            return Decision::new(
                "removed leader key after trying and failing to start postgres",
                vec![Action::ReleaseLock],
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
            return Decision::new(
                "released leader key: postgres did not come back within primary_start_timeout",
                vec![Action::ReleaseLock],
            );
        }
        return Decision::new(
            "starting primary after failure",
            vec![Action::Start(StartAs::Primary)],
        );
    }
    let Some(leader) = cluster.leader_member() else {
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
        None => {
            let upstream = upstream_for(i, cluster, leader);
            Decision::new(
                "starting as a secondary",
                vec![Action::Start(StartAs::Replica {
                    upstream: Some(upstream),
                })],
            )
        }
    }
}

/// Where a stopped data directory's WAL ends, from `pg_controldata`.
fn local_end(control: &ControlInfo) -> LocalEnd {
    match control.state {
        ControlState::ShutDown => LocalEnd::CleanPrimary {
            timeline: control.checkpoint_timeline,
            checkpoint_lsn: control.checkpoint_lsn,
        },
        ControlState::InProduction | ControlState::InCrashRecovery | ControlState::ShuttingDown => {
            LocalEnd::CrashedPrimary {
                timeline: control.checkpoint_timeline,
            }
        }
        _ => LocalEnd::Replica {
            timeline: control.min_recovery_timeline.max(control.checkpoint_timeline),
            lsn: control.min_recovery_lsn.max(control.checkpoint_lsn),
        },
    }
}

/// `Some(decision)` when the node must not simply follow the leader: it needs a rewind or
/// re-clone first, or must wait for the leader to publish enough to decide.
fn check_divergence(
    i: &Inputs<'_>,
    cluster: &ClusterView,
    leader: &Member,
    local: LocalEnd,
) -> Option<Decision> {
    let leader_timeline = leader.data.timeline.unwrap_or(0);
    match divergence(
        local,
        leader_timeline,
        cluster.history.as_ref().map(|h| h.value.as_slice()),
    ) {
        Divergence::NoRewind => None,
        Divergence::Unknown => Some(Decision::idle(format!(
            "waiting for leader ({}) to publish its timeline history before following it",
            leader.name
        ))),
        Divergence::RewindNeeded => {
            if leader.data.checkpoint_after_promote == Some(false) {
                return Some(Decision::idle(format!(
                    "Waiting for checkpoint on {} before rewind",
                    leader.name
                )));
            }
            let source = leader.name.clone();
            if i.config.use_pg_rewind && !i.memory.rewind_failed {
                Some(Decision::new(
                    format!("running pg_rewind from {source}"),
                    vec![Action::Rewind { source }],
                ))
            } else {
                Some(Decision::new(
                    format!("reinitializing from {source}: the data directory diverged from the leader"),
                    vec![Action::Reinitialize { source }],
                ))
            }
        }
    }
}

/// The member to stream from: the `replicatefrom` member when it runs, else the leader.
fn upstream_for(i: &Inputs<'_>, cluster: &ClusterView, leader: &Member) -> String {
    i.config
        .replicatefrom()
        .and_then(|name| cluster.member(name))
        .filter(|m| m.name != i.config.name && m.data.state == "running" && !m.data.conn_url.is_empty())
        .map_or_else(|| leader.name.clone(), |m| m.name.clone())
}

fn starting_up(i: &Inputs<'_>, holds_lock: bool) -> Decision {
    let timed_out = i
        .memory
        .primary_restart_since
        .is_some_and(|since| i.now.saturating_duration_since(since) >= i.config.primary_start_timeout);
    if holds_lock && timed_out {
        return Decision::new(
            "released leader key: postgres did not come back within primary_start_timeout",
            vec![Action::Demote(DemoteMode::ImmediateNoLock), Action::ReleaseLock],
        );
    }
    Decision::idle("PostgreSQL is still starting up")
}

fn leader_race(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Decision {
    if cluster.is_paused() {
        return Decision::idle("cluster has no leader; paused, not racing");
    }
    match race_verdict(i, cluster, own) {
        RaceVerdict::NeedPeers => {
            Decision::new("asking peers before the leader race", vec![Action::QueryPeers])
        }
        RaceVerdict::Healthiest => Decision::new(
            "acquiring session lock as the healthiest node",
            vec![Action::AcquireLock],
        ),
        RaceVerdict::NotHealthiest(reason) if !own.in_recovery => Decision::new(
            format!("demoting self because i am not the healthiest node: {reason}"),
            vec![Action::Demote(DemoteMode::ImmediateNoLock)],
        ),
        RaceVerdict::NotHealthiest(reason) => Decision::idle(format!(
            "following a different leader because i am not the healthiest node: {reason}"
        )),
    }
}

fn leading(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Decision {
    let me = &i.config.name;
    if own.in_recovery {
        if cluster.is_paused() {
            return Decision::new(
                "removed leader lock because postgres is not running as primary",
                vec![Action::ReleaseLock],
            );
        }
        return Decision::new(
            "promoted self to leader because I had the session lock",
            vec![Action::Promote],
        );
    }
    if let Some(mut decision) = crate::failover::leader_decision(i, cluster, own) {
        // Housekeeping continues while a request waits or is examined.
        if !decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::Switchover { .. } | Action::QueryPeers))
        {
            decision.actions.insert(0, Action::LeaderHousekeeping);
        }
        return decision;
    }
    Decision::new(
        format!("no action. I am ({me}), the leader with the lock"),
        vec![Action::LeaderHousekeeping],
    )
}

fn following(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Decision {
    let me = &i.config.name;
    let Some(leader) = cluster.leader_member() else {
        return Decision::idle("waiting for the leader to publish its member key");
    };
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
    if leader.data.conn_url.is_empty() || leader.data.role().is_none_or(|r| r != Role::Primary) {
        return Decision::idle(format!("waiting for leader ({}) to run as primary", leader.name));
    }
    if !own.streaming {
        let local = LocalEnd::Replica {
            timeline: own.timeline,
            lsn: own.wal_position,
        };
        if let Some(decision) = check_divergence(i, cluster, leader, local)
            && cluster.is_paused()
            && !decision.actions.is_empty()
        {
            return Decision::idle(format!(
                "paused: not touching PostgreSQL although {}",
                decision.message
            ));
        }
        if let Some(decision) = check_divergence(i, cluster, leader, local) {
            // A replica that is not streaming may simply be between connections; only act when
            // the published history proves it diverged.
            if !decision.actions.is_empty() || own.timeline < leader.data.timeline.unwrap_or(0) {
                return decision;
            }
        }
    }
    let upstream = upstream_for(i, cluster, leader);
    let wanted = cluster.member(&upstream).and_then(|m| m.data.host_port());
    if wanted.is_some() && own.upstream != wanted {
        return Decision::new(
            format!("following new leader ({upstream})"),
            vec![Action::Follow {
                upstream: Some(upstream),
            }],
        );
    }
    Decision::idle(format!(
        "no action. I am ({me}), a secondary, and following a leader ({})",
        leader.name
    ))
}
