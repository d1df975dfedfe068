//! What operators ask for: restart and reinitialize requests, and the hand-over after a planned
//! switchover stopped the old primary (`docs/patroni-compat.md` §4.5, §5.10).

use std::time::Duration;

use pgvigil_api::{ClusterView, Member};

use crate::actions::{Action, Decision, StartAs};
use crate::inputs::{Inputs, Observed, OperatorRequest, RestartRequest, SwitchoverStop};

/// How long a stopped switchover leader waits for a candidate to receive its shutdown
/// checkpoint before it lets the lock go anyway (Patroni waits as long).
pub const SWITCHOVER_WAIT: Duration = Duration::from_secs(10);

/// The member to clone from: a running replica tagged `clonefrom` (first by name, so the
/// choice is reproducible), else the leader. One rule for new replicas and reinitialize.
pub fn clone_source(me: &str, cluster: &ClusterView, leader: &Member) -> String {
    cluster
        .members
        .iter()
        .filter(|m| m.name != me && m.name != leader.name)
        .filter(|m| m.data.tag_bool("clonefrom") && m.data.state == "running" && !m.data.conn_url.is_empty())
        .map(|m| m.name.clone())
        .next()
        .unwrap_or_else(|| leader.name.clone())
}

/// `X.Y[.Z]` or a `server_version_num` → comparable number (150010 for 15.10).
pub fn version_num(text: &str) -> Option<u32> {
    let parts: Vec<u32> = text
        .split('.')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [num] if *num >= 10_000 => Some(*num),
        [major, minor] if *major >= 10 => Some(major * 10000 + minor),
        [major, minor, patch] => Some(major * 10000 + minor * 100 + patch),
        _ => None,
    }
}

/// The decision about a pending request, when PostgreSQL runs and nothing else is to be done
/// this cycle. `None`: the request waits (scheduled for later).
pub fn request_decision(
    i: &Inputs<'_>,
    cluster: &ClusterView,
    own: &Observed,
    holds_lock: bool,
) -> Option<Decision> {
    let request = i.request?;
    let refuse = |status: u16, message: &str| {
        Some(Decision::new(
            message.to_string(),
            vec![Action::AnswerRequest {
                status,
                message: message.to_string(),
            }],
        ))
    };
    match request {
        OperatorRequest::Restart(r) => {
            if r.not_yet_due {
                return None;
            }
            if r.overtaken {
                return refuse(
                    409,
                    "scheduled restart cancelled: PostgreSQL was restarted meanwhile",
                );
            }
            if !restart_conditions_met(r, own) {
                return refuse(503, "restart conditions are not satisfied");
            }
            if !own.in_recovery && !holds_lock {
                return refuse(
                    503,
                    "a primary is restarted only by the holder of the leader lock",
                );
            }
            Some(Decision::new(
                "restarting postgres as requested",
                vec![Action::Restart { timeout: r.timeout }],
            ))
        }
        OperatorRequest::Reinitialize { from_leader } => {
            let Some(leader) = cluster.leader_member() else {
                return refuse(503, "Cluster has no leader, can not reinitialize");
            };
            if holds_lock || leader.name == i.config.name {
                return refuse(503, "I am the leader, can not reinitialize");
            }
            let source = if *from_leader {
                leader.name.clone()
            } else {
                clone_source(&i.config.name, cluster, leader)
            };
            Some(Decision::new(
                format!("reinitializing from {source} as requested"),
                vec![Action::Reinitialize {
                    source,
                    methods: i.config.replica_plan(true, *from_leader),
                }],
            ))
        }
    }
}

/// Patroni's restart filters: role, an older server version, a pending restart.
fn restart_conditions_met(r: &RestartRequest, own: &Observed) -> bool {
    if let Some(wanted) = &r.role {
        let matches = match wanted.as_str() {
            "primary" | "master" => !own.in_recovery,
            "replica" => own.in_recovery,
            // A standby cluster's leader (not implemented yet): never this node.
            _ => false,
        };
        if !matches {
            return false;
        }
    }
    if let Some(wanted) = &r.postgres_version {
        match version_num(wanted) {
            Some(w) if w > own.server_version => {}
            _ => return false,
        }
    }
    !r.restart_pending || own.pending_restart
}

/// After a switchover stopped this leader's PostgreSQL: release the lock once a candidate has
/// WAL past the shutdown checkpoint (it then has every commit acknowledged before the stop),
/// or after [`SWITCHOVER_WAIT`] without one (then the race decides, as in Patroni).
///
/// In maintenance mode nothing else would start PostgreSQL again, so the old primary starts as a
/// replica right after letting go (Patroni's demotion follows through to the start) and follows
/// the new leader once it runs.
pub fn switchover_handover(i: &Inputs<'_>, cluster: &ClusterView, stop: &SwitchoverStop) -> Decision {
    let release = |why: String| {
        let mut actions = vec![
            Action::PublishPosition {
                optime: stop.shutdown_lsn,
            },
            Action::ReleaseLock,
        ];
        if cluster.is_paused() {
            actions.push(Action::Start(StartAs::Replica { upstream: None }));
        }
        Decision::new(why, actions)
    };
    let Some(peers) = i.peers else {
        return Decision::new(
            "switchover: asking the candidates whether they have the shutdown checkpoint",
            vec![Action::QueryPeers],
        );
    };
    let ready = peers.iter().find(|p| {
        stop.candidates.contains(&p.name)
            && p.status
                .as_ref()
                .is_some_and(|s| s.wal_position() > stop.shutdown_lsn)
    });
    if let Some(candidate) = ready {
        return release(format!(
            "switchover: {} has the shutdown checkpoint; releasing the leader lock",
            candidate.name
        ));
    }
    let waited = i.now.saturating_duration_since(stop.since);
    if waited >= SWITCHOVER_WAIT {
        return release(format!(
            "switchover: no candidate confirmed the shutdown checkpoint within {} s; releasing the leader lock anyway",
            SWITCHOVER_WAIT.as_secs()
        ));
    }
    Decision::idle("switchover: waiting for a candidate to receive the shutdown checkpoint")
        .recheck_in(Duration::from_millis(100))
}
