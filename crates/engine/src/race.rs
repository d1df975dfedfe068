//! The leader race: may this node take the lock now that nobody holds it (§4.3)?

use pgvigil_api::values::failover_priority;
use pgvigil_api::{ClusterView, HistoryEntry};

use crate::inputs::{Inputs, Observed};

#[derive(Clone, Debug, PartialEq)]
pub enum RaceVerdict {
    /// Take the lock.
    Healthiest,
    /// Stay out of the race, with the reason for the log.
    NotHealthiest(String),
    /// The peers' positions are needed first.
    NeedPeers,
}

/// The timeline the leader's published history leads to (1 for an empty history).
pub fn history_timeline(history: &[HistoryEntry]) -> u64 {
    pgvigil_api::values::cluster_timeline(history)
}

/// Patroni's `is_healthiest_node`, without the manual-failover and synchronous-mode branches.
///
/// Safety rests on two things: only a node within `maximum_lag_on_failover` of the last
/// published leader position may race, and a node defers to any reachable peer that is still a
/// primary or has more WAL (or the same WAL and a higher `failover_priority`). The lock itself is
/// a create-if-absent transaction, so two equally healthy nodes cannot both win.
pub fn race_verdict(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> RaceVerdict {
    let cfg = i.config;
    if cfg.nofailover() {
        return RaceVerdict::NotHealthiest("I am not allowed to promote (nofailover)".into());
    }
    let cluster_timeline = cluster.timeline();
    match crate::failover::race_override(i, cluster) {
        Some(crate::failover::RaceOverride::Win) => return RaceVerdict::Healthiest,
        Some(crate::failover::RaceOverride::StandAside(why)) => {
            if i.peers.is_none() && cluster.members.iter().any(|m| m.name != cfg.name) {
                return RaceVerdict::NeedPeers;
            }
            return RaceVerdict::NotHealthiest(why);
        }
        None => {}
    }
    if !own.in_recovery {
        // A running primary keeps its role unless it is on an older timeline than the cluster:
        // that is a frozen former leader coming back after someone else was promoted.
        if cluster_timeline > 0 && own.timeline < cluster_timeline {
            return RaceVerdict::NotHealthiest(format!(
                "my timeline {} is behind the cluster timeline {cluster_timeline}",
                own.timeline
            ));
        }
        return RaceVerdict::Healthiest;
    }
    let optime = cluster.status.optime;
    if optime > own.wal_position && optime - own.wal_position > cfg.maximum_lag_on_failover {
        return RaceVerdict::NotHealthiest(format!(
            "My wal position exceeds maximum replication lag ({} bytes behind {optime})",
            optime - own.wal_position
        ));
    }
    if cfg.check_timeline && cluster_timeline > 0 && own.timeline < cluster_timeline {
        return RaceVerdict::NotHealthiest(format!(
            "my timeline {} is behind the cluster timeline {cluster_timeline}",
            own.timeline
        ));
    }
    let others: Vec<_> = cluster
        .members
        .iter()
        .filter(|m| m.name != cfg.name && !m.data.api_url.is_empty())
        .collect();
    if others.is_empty() {
        return RaceVerdict::Healthiest;
    }
    let Some(peers) = i.peers else {
        return RaceVerdict::NeedPeers;
    };
    let my_priority = cfg.failover_priority();
    for peer in peers {
        let Some(status) = &peer.status else { continue };
        if status.is_primary() {
            return RaceVerdict::NotHealthiest(format!("Primary ({}) is still alive", peer.name));
        }
        let tags = cluster
            .member(&peer.name)
            .map(|m| &m.data.tags)
            .unwrap_or(&status.tags);
        if failover_priority(tags) <= 0 || status.watchdog_failed == Some(true) {
            continue;
        }
        let theirs = status.wal_position();
        if theirs > own.wal_position {
            return RaceVerdict::NotHealthiest(format!(
                "{} has more WAL ({theirs} > {})",
                peer.name, own.wal_position
            ));
        }
        if theirs == own.wal_position && failover_priority(tags) > my_priority {
            return RaceVerdict::NotHealthiest(format!(
                "{} has the same WAL position and a higher failover priority",
                peer.name
            ));
        }
    }
    RaceVerdict::Healthiest
}
