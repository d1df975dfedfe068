//! The leader race (`docs/patroni-compat.md` §4.3): whether this node may race at all (a free
//! key, or a silent holder past its fast-takeover promise), the rules that keep it out
//! (maintenance mode, backoffs), and the verdict: is it the healthiest node, so it takes the
//! lock now?

use pgvigil_api::values::failover_priority;
use pgvigil_api::{ClusterView, HistoryEntry, SyncValue};

use crate::actions::{Action, Decision, DemoteMode};
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
    if pre_promote_backoff(i) {
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

/// How this node may race for the lock, if at all.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Race {
    /// Nobody holds the key.
    Free,
    /// The holder promised the fast takeover and has been silent past its promise.
    TakeOver(Action),
}

pub(crate) fn race_kind(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed) -> Option<Race> {
    // Failsafe mode: a leader that vouched for itself to us within ttl still runs; we promised
    // it not to race (fast or not).
    if i.config.failsafe_mode && i.failsafe_leader.is_some() {
        return None;
    }
    let Some(leader) = &cluster.leader else {
        return Some(Race::Free);
    };
    let silence = i.silence?;
    let gone = i.config.fast_takeover
        && own.in_recovery
        && silence.leader == leader.name
        && silence.leader != i.config.name
        && silence.leader_revision == leader.mod_revision
        && silence.leader_gone(i.config.takeover_margin);
    gone.then(|| {
        Race::TakeOver(Action::TakeOver {
            from: leader.name.clone(),
            leader_revision: silence.leader_revision,
            heartbeat_revision: silence.heartbeat_revision,
            config_revision: cluster.config_revision(),
        })
    })
}

pub(crate) fn leader_race(i: &Inputs<'_>, cluster: &ClusterView, own: &Observed, race: Race) -> Decision {
    // Maintenance mode: nobody races, except the candidate an operator named in a switchover,
    // and only for a free key (a silent leader is the operator's business).
    if cluster.is_paused() && !(race == Race::Free && crate::failover::paused_candidate(i, cluster)) {
        if race == Race::Free && !own.in_recovery {
            return paused_primary_race(i, cluster);
        }
        return Decision::idle("cluster has no leader; paused, not racing");
    }
    // A leader that just let the key go (its PostgreSQL crashed, would not start, or was slow)
    // gives the others time to take it, as Patroni's demotion sleeps 2 s before it starts
    // PostgreSQL again: a tie on WAL would otherwise hand the key straight back to it.
    if let Some(since) = i.memory.released_lock_at
        && let waited = i.now.saturating_duration_since(since)
        && waited < crate::RELEASE_BACKOFF
        && own.in_recovery
    {
        return Decision::idle(format!(
            "not racing: I released the leader key {:.1} s ago; giving the others time to take it",
            waited.as_secs_f64()
        ))
        .recheck_in(crate::RELEASE_BACKOFF - waited);
    }
    match race_verdict(i, cluster, own) {
        RaceVerdict::NeedPeers => {
            Decision::new("asking peers before the leader race", vec![Action::QueryPeers])
        }
        RaceVerdict::Healthiest => match race {
            Race::Free => Decision::new(
                "acquiring session lock as the healthiest node",
                vec![Action::AcquireLock],
            ),
            Race::TakeOver(action) => {
                let (from, silent) = match (&action, i.silence) {
                    (Action::TakeOver { from, .. }, Some(s)) => (from.clone(), s.silent_for),
                    _ => (String::new(), Default::default()),
                };
                Decision::new(
                    format!(
                        "taking over from {from}: silent for {:.1} s, past its promise; I am the healthiest node",
                        silent.as_secs_f64()
                    ),
                    vec![action],
                )
            }
        },
        // Paused, a running primary is the operator's even when it may not race (the named
        // candidate of a switchover whose pre_promote refused): it loses the race, nothing else.
        RaceVerdict::NotHealthiest(reason) if !own.in_recovery && cluster.is_paused() => Decision::idle(
            format!("paused: not racing, leaving the running primary alone: {reason}"),
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

/// Maintenance mode, a free key, PostgreSQL running here as a primary: the primary the operator
/// runs is the leader, so it takes the key (Patroni's `is_healthiest_node` in pause; the system
/// ID was checked in `decide_role`, and a timeline behind the cluster's does not matter while
/// paused). It leaves the key to the candidate of a switchover an operator asked for, unless
/// that candidate is no member any more: then the request is dropped, as Patroni's primary does.
fn paused_primary_race(i: &Inputs<'_>, cluster: &ClusterView) -> Decision {
    if pre_promote_backoff(i) {
        return Decision::idle(
            "paused: backoff: skip leader race after pre_promote script failure and releasing the lock voluntarily",
        );
    }
    let request = cluster
        .pending_failover()
        .filter(|f| f.scheduled_at.is_none() && !i.config.nofailover());
    match request.map(|f| f.member.as_deref()) {
        None => Decision::new(
            "paused: acquiring session lock for the running primary",
            vec![Action::AcquireLock],
        ),
        Some(Some(candidate)) if cluster.member(candidate).is_none() => Decision::new(
            format!(
                "paused: removing failover key because failover candidate {candidate} is not running; \
                 acquiring session lock for the running primary"
            ),
            vec![Action::ClearFailover, Action::AcquireLock],
        ),
        Some(_) => Decision::idle("cluster has no leader; paused, a switchover is pending; not racing"),
    }
}

/// The `pre_promote` script refused a promotion less than `ttl` ago: this node gives the lock
/// up and stays out of the race meanwhile (Patroni's backoff after releasing the key).
pub(crate) fn pre_promote_backoff(i: &Inputs<'_>) -> bool {
    i.memory
        .pre_promote_failed_at
        .is_some_and(|at| i.now.saturating_duration_since(at) < i.config.ttl)
}
