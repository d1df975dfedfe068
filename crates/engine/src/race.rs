//! The leader race: may this node take the lock now that nobody holds it (`docs/patroni-compat.md`
//! §4.3)?

use pgvigil_api::values::failover_priority;
use pgvigil_api::{ClusterView, HistoryEntry, SyncValue};

use crate::inputs::{Inputs, Observed, PeerReport};
use crate::sync::SyncMode;

/// How long a node that let the leader key go on purpose stays out of the race.
pub const RELEASE_BACKOFF: std::time::Duration = std::time::Duration::from_secs(2);

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
    if crate::decide::pre_promote_backoff(i) {
        return RaceVerdict::NotHealthiest(
            "backoff: skip leader race after pre_promote script failure and releasing the lock voluntarily"
                .into(),
        );
    }
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
    // Failsafe mode: a member the last leader did not list never knew to answer its posts.
    if cfg.failsafe_mode
        && let Some(failsafe) = cluster.failsafe.as_ref().filter(|m| !m.is_empty())
        && !failsafe.contains_key(&cfg.name)
    {
        return RaceVerdict::NotHealthiest("I am not a member of the failsafe key".into());
    }
    // Synchronous modes: in classic mode only a member PostgreSQL waited for may take over.
    let sync = cluster
        .sync
        .as_ref()
        .map(|s| &s.value)
        .filter(|s| s.leader.as_deref().is_some_and(|l| !l.is_empty()));
    if cfg.synchronous_mode == SyncMode::On
        && let Some(sync) = sync
        && !sync.contains(&cfg.name)
        && sync.leader.as_deref() != Some(cfg.name.as_str())
    {
        return RaceVerdict::NotHealthiest("I am not a synchronous standby".into());
    }
    let others: Vec<_> = cluster
        .members
        .iter()
        .filter(|m| m.name != cfg.name && !m.data.api_url.is_empty())
        .collect();
    if others.is_empty() {
        // Alone: in quorum mode we still need the voters' proof (there is nobody to ask, so only
        // a quorum of 0 or having been the sync leader qualifies).
        if cfg.synchronous_mode == SyncMode::Quorum
            && let Some(sync) = sync
        {
            return quorum_verdict(i, sync, own, &[]);
        }
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
        // Classic synchronous mode: only the standbys PostgreSQL waited for can have commits
        // we lack; an asynchronous one ahead of us is no reason to stand aside.
        if cfg.synchronous_mode == SyncMode::On
            && let Some(sync) = sync
            && !sync.contains(&peer.name)
            && sync.leader.as_deref() != Some(peer.name.as_str())
        {
            continue;
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
    if cfg.synchronous_mode == SyncMode::Quorum
        && let Some(sync) = sync
    {
        return quorum_verdict(i, sync, own, peers);
    }
    RaceVerdict::Healthiest
}

/// Quorum mode: commits were acknowledged by `numsync` of the voters, and `numsync + quorum`
/// is the number of voters, so a candidate that sees `quorum` other voters not ahead of it
/// shares at least one voter with every acknowledging set: it has every acknowledged commit.
fn quorum_verdict(i: &Inputs<'_>, sync: &SyncValue, own: &Observed, peers: &[PeerReport]) -> RaceVerdict {
    let me = i.config.name.as_str();
    let mut voters = sync.members();
    if let Some(leader) = &sync.leader {
        voters.push(leader.clone());
    }
    let mut votes = 0;
    let mut someone_ahead = false;
    for peer in peers
        .iter()
        .filter(|p| p.name != me && voters.iter().any(|v| v.eq_ignore_ascii_case(&p.name)))
    {
        let Some(status) = &peer.status else { continue };
        let theirs = status.wal_position();
        if theirs > own.wal_position {
            someone_ahead = true;
        } else if theirs > 0 {
            votes += 1;
        }
    }
    if votes >= sync.quorum as usize && (sync.contains(me) || sync.leader.as_deref() == Some(me)) {
        return RaceVerdict::Healthiest;
    }
    if !someone_ahead && sync.leader.as_deref() == Some(me) {
        return RaceVerdict::Healthiest;
    }
    RaceVerdict::NotHealthiest(format!(
        "only {votes} of the {} quorum voters I need confirm my position",
        sync.quorum
    ))
}
