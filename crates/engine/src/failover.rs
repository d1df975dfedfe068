//! Manual failover and switchover (`docs/patroni-compat.md` §4.3, §4.5): what the leader does with a
//! pending `failover` key, and how the key steers the race when the leader is gone.

use pgvigil_api::values::failover_priority;
use pgvigil_api::{ClusterView, FailoverValue};

use crate::actions::{Action, Decision};
use crate::inputs::{Inputs, Observed};
use crate::sync::SyncMode;

/// Whether a scheduled request should act now.
enum Due {
    Now,
    Later(f64),
    Stale,
}

fn due(i: &Inputs<'_>) -> Due {
    match i.failover_due_in {
        None => Due::Now,
        Some(secs) if secs > 0.0 => Due::Later(secs),
        // More than 1.5 * loop_wait late: nobody acted in time, so the request is void.
        Some(secs) if -secs > 1.5 * i.config.loop_wait.as_secs_f64() => Due::Stale,
        Some(_) => Due::Now,
    }
}

/// The request is for a future time: the race ignores it until then.
pub fn is_future(i: &Inputs<'_>) -> bool {
    matches!(due(i), Due::Later(_))
}

/// The leader's handling of a pending request. `None` when there is nothing to do.
pub fn leader_decision(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Option<Decision> {
    let f = cluster.pending_failover()?;
    let me = i.config.name.as_str();
    let clear = |why: String| Some(Decision::new(why, vec![Action::ClearFailover]));
    match due(i) {
        Due::Later(secs) => {
            let at = f.scheduled_at.as_deref().unwrap_or("?");
            return Some(Decision::idle(format!(
                "Awaiting switchover at {at} (in {secs:.0} seconds)"
            )));
        }
        Due::Stale => return clear("Found a stale failover value, cleaning up".into()),
        Due::Now => {}
    }
    if f.leader.as_deref().is_some_and(|l| !l.is_empty() && l != me) {
        return clear(format!(
            "Failover requested from {} but I ({me}) am the leader; clearing the request",
            f.leader.as_deref().unwrap_or("")
        ));
    }
    if f.member.as_deref() == Some(me) {
        return clear(format!(
            "Failover candidate {me} is already the leader; clearing the request"
        ));
    }
    if cluster.is_paused() && f.member.is_none() {
        return clear("Switchover in pause mode needs a specific candidate".into());
    }
    let Some(peers) = i.peers else {
        return Some(Decision::new(
            "checking switchover candidates",
            vec![Action::QueryPeers],
        ));
    };
    // Classic synchronous mode: only a standby PostgreSQL waited for may take over.
    let sync_only = i.config.synchronous_mode == crate::sync::SyncMode::On;
    let sync = cluster.sync.as_ref().map(|s| &s.value);
    let eligible: Vec<String> = candidates(i, cluster, f)
        .into_iter()
        .filter(|name| {
            if sync_only && !sync.is_some_and(|s| s.contains(name)) {
                return false;
            }
            let Some(status) = peers
                .iter()
                .find(|p| p.name == *name)
                .and_then(|p| p.status.as_ref())
            else {
                return false;
            };
            let tags = cluster.member(name).map(|m| &m.data.tags).unwrap_or(&status.tags);
            failover_priority(tags) > 0
                && status.watchdog_failed != Some(true)
                && !status.is_primary()
                && own.wal_position.saturating_sub(status.wal_position()) <= i.config.maximum_lag_on_failover
        })
        .collect();
    let kind = if f.leader.is_some() {
        "switchover"
    } else {
        "manual failover"
    };
    if !eligible.is_empty() {
        Some(Decision::new(
            format!("{kind}: demoting myself"),
            vec![Action::StopForSwitchover { candidates: eligible }],
        ))
    } else {
        clear(format!(
            "{kind}: no good candidates have been found; clearing the request"
        ))
    }
}

/// The members a request may hand over to: the named candidate, or every other member.
pub fn candidates(i: &Inputs<'_>, cluster: &ClusterView, f: &FailoverValue) -> Vec<String> {
    match f.member.as_deref().filter(|m| !m.is_empty()) {
        Some(m) => vec![m.to_string()],
        None => cluster
            .members
            .iter()
            .filter(|m| m.name != i.config.name)
            .map(|m| m.name.clone())
            .collect(),
    }
}

/// How a pending request steers the race when the lock is free. `None`: race as usual.
pub enum RaceOverride {
    /// We are the requested candidate: take the lock regardless of the lag limit.
    Win,
    /// Let somebody else win, for this reason.
    StandAside(String),
}

pub fn race_override(i: &Inputs<'_>, cluster: &ClusterView) -> Option<RaceOverride> {
    let f = cluster.pending_failover()?;
    if is_future(i) {
        return None;
    }
    let me = i.config.name.as_str();
    if let Some(candidate) = f.member.as_deref().filter(|m| !m.is_empty()) {
        if candidate == me {
            return Some(RaceOverride::Win);
        }
        // The candidate decides while it is reachable and allowed to promote.
        let reachable = i
            .peers
            .and_then(|peers| peers.iter().find(|p| p.name == candidate))
            .and_then(|p| p.status.as_ref())
            .is_some_and(|s| s.watchdog_failed != Some(true));
        let allowed = cluster
            .member(candidate)
            .is_some_and(|m| failover_priority(&m.data.tags) > 0);
        if reachable && allowed || i.peers.is_none() {
            return Some(RaceOverride::StandAside(format!(
                "the failover candidate is {candidate}"
            )));
        }
    }
    if f.leader.as_deref() == Some(me) {
        return Some(RaceOverride::StandAside(
            "I am the leader this switchover moves away from".into(),
        ));
    }
    None
}

/// Patroni's `is_failover_possible` (`docs/patroni-compat.md` §4.7): whether another member could
/// take over from this leader now. A candidate is another member with an API address that may
/// promote (only a synchronous standby while synchronous mode has a `sync` key); it counts when
/// it answered, is not `nofailover` or `watchdog_failed`, is within `maximum_lag_on_failover` of
/// the last published leader position and, with `check_timeline`, not behind the cluster's
/// timeline. Quorum mode needs more than `quorum` of them. `None`: the peers' answers are needed
/// first (ask with [`Action::QueryPeers`]).
pub fn failover_possible(i: &Inputs<'_>, cluster: &ClusterView) -> Option<bool> {
    let me = i.config.name.as_str();
    let mode = i.config.synchronous_mode;
    let sync = cluster
        .sync
        .as_ref()
        .map(|s| &s.value)
        .filter(|s| mode != SyncMode::Off && s.leader.as_deref().is_some_and(|l| !l.is_empty()));
    let candidates: Vec<&str> = cluster
        .members
        .iter()
        .filter(|m| m.name != me && !m.data.api_url.is_empty() && failover_priority(&m.data.tags) > 0)
        .filter(|m| sync.is_none_or(|s| s.contains(&m.name)))
        .map(|m| m.name.as_str())
        .collect();
    if candidates.is_empty() {
        return Some(false);
    }
    let peers = i.peers?;
    let cluster_timeline = cluster.timeline();
    let healthy = candidates
        .iter()
        .filter_map(|name| peers.iter().find(|p| p.name == *name)?.status.as_ref())
        .filter(|status| {
            failover_priority(&status.tags) > 0
                && status.watchdog_failed != Some(true)
                && cluster.status.optime.saturating_sub(status.wal_position())
                    <= i.config.maximum_lag_on_failover
                && (!i.config.check_timeline || status.timeline.is_some_and(|t| t >= cluster_timeline))
        })
        .count();
    Some(match sync {
        Some(s) if mode == SyncMode::Quorum => healthy > s.quorum as usize,
        _ => healthy > 0,
    })
}

/// Maintenance mode: the one member that may take a free lock and promote is the candidate an
/// operator named in an unscheduled switchover (Patroni's `manual_failover_process_no_leader`);
/// a scheduled one cannot be written while paused.
pub fn paused_candidate(i: &Inputs<'_>, cluster: &ClusterView) -> bool {
    !i.config.nofailover()
        && cluster
            .pending_failover()
            .is_some_and(|f| f.scheduled_at.is_none() && f.member.as_deref() == Some(i.config.name.as_str()))
}
