//! Whether a node can follow the leader as it is, or must be rewound first.
//!
//! A node can stream from the leader only if its WAL is a prefix of the leader's history. The
//! leader publishes its timeline switches in the `history` key (`[parent_tl, switch_lsn, ...]`),
//! so the check needs no replication connection: find the switch away from our timeline and
//! compare our position with it (`docs/patroni-compat.md` §5.5).
//!
//! One case the timeline numbers alone do not settle: two nodes promoted from the same parent
//! timeline both end up on the same timeline number with two different histories (a promotion
//! that finished while its agent was shutting down, then another node promoted from the same
//! WAL). Their history files are identical, so neither the `history` key nor pg_rewind can tell
//! them apart (pg_rewind does nothing when source and target are on one timeline); only the
//! fact that this data directory was itself a primary on the leader's timeline shows it.

use pgvigil_api::{ClusterView, HistoryEntry, Member, Role};

use crate::actions::{Action, Decision};
use crate::inputs::{ControlInfo, ControlState, Inputs};

/// Where the local WAL ends, as far as we can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalEnd {
    /// A replica (running or stopped in recovery) that has WAL up to this position.
    Replica { timeline: u64, lsn: u64 },
    /// A primary that shut down cleanly; its WAL ends with the shutdown checkpoint record that
    /// starts at `checkpoint_lsn`.
    CleanPrimary { timeline: u64, checkpoint_lsn: u64 },
    /// A primary that crashed or was killed: it may have written anything past its last
    /// checkpoint, so only pg_rewind can tell.
    CrashedPrimary { timeline: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Divergence {
    /// Following the leader works without touching the data directory.
    NoRewind,
    RewindNeeded,
    /// This data directory was a primary on the leader's own timeline: a second history under
    /// the same timeline number. pg_rewind cannot repair it (it compares timelines, and sees
    /// one), so the data directory must be cloned again.
    SameTimelineFork,
    /// Not enough information yet (the leader's timeline or history is not published): wait.
    Unknown,
}

/// Decides whether `local` must be rewound to follow a leader on `leader_timeline` whose
/// published history is `history`.
pub fn divergence(local: LocalEnd, leader_timeline: u64, history: Option<&[HistoryEntry]>) -> Divergence {
    let local_timeline = match local {
        LocalEnd::Replica { timeline, .. }
        | LocalEnd::CleanPrimary { timeline, .. }
        | LocalEnd::CrashedPrimary { timeline } => timeline,
    };
    if leader_timeline == 0 || local_timeline == 0 {
        return Divergence::Unknown;
    }
    if local_timeline == leader_timeline {
        // Same timeline: a replica received its WAL from that timeline's primary, so it is a
        // prefix of the leader's. A primary on the leader's timeline wrote its own WAL there,
        // and another node leads on that timeline: every promotion starts a new timeline, so
        // the leader cannot have continued our history on ours; it promoted separately from
        // the same parent and wrote a different one.
        return match local {
            LocalEnd::Replica { .. } => Divergence::NoRewind,
            LocalEnd::CleanPrimary { .. } | LocalEnd::CrashedPrimary { .. } => Divergence::SameTimelineFork,
        };
    }
    if local_timeline > leader_timeline {
        return Divergence::RewindNeeded;
    }
    let Some(history) = history else {
        return Divergence::Unknown;
    };
    if crate::race::history_timeline(history) < leader_timeline {
        // The leader has not published the switch to its current timeline yet.
        return Divergence::Unknown;
    }
    let Some(k) = history.iter().position(|h| h.parent_timeline == local_timeline) else {
        return Divergence::RewindNeeded;
    };
    let switch = &history[k];
    // A timeline the leader's history holds no WAL of: it ends where it began, a number a
    // promotion reserved because it was started elsewhere (the agent's `fill_skipped`). Whatever
    // we wrote or received on it is not in the leader's history, whatever the positions say
    // (ours began at our own fork, not where the leader's empty line puts it).
    if k > 0 && history[k - 1].switch_lsn == switch.switch_lsn {
        return Divergence::RewindNeeded;
    }
    let diverged = match local {
        LocalEnd::Replica { lsn, .. } => lsn > switch.switch_lsn,
        // The new timeline starts right after our shutdown checkpoint record when the candidate
        // received it, so the record itself starts strictly before the switch point.
        LocalEnd::CleanPrimary { checkpoint_lsn, .. } => checkpoint_lsn >= switch.switch_lsn,
        LocalEnd::CrashedPrimary { .. } => true,
    };
    if diverged {
        Divergence::RewindNeeded
    } else {
        Divergence::NoRewind
    }
}

/// Where a stopped data directory's WAL ends, from `pg_controldata`.
pub(crate) fn local_end(control: &ControlInfo) -> LocalEnd {
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
pub(crate) fn check_divergence(
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
        Divergence::SameTimelineFork => {
            // The rule rests on the leader's key describing a running primary; a key that
            // predates its promotion can still show the timeline it is leaving.
            if leader.data.role().is_none_or(|r| r != Role::Primary) {
                return Some(Decision::idle(format!(
                    "waiting for leader ({}) to run as primary before comparing histories",
                    leader.name
                )));
            }
            let source = leader.name.clone();
            Some(Decision::new(
                format!(
                    "reinitializing from {source}: this data directory was a primary on timeline {}, \
                     the timeline {source} leads with another history; pg_rewind cannot tell them apart",
                    leader.data.timeline.unwrap_or(0)
                ),
                vec![Action::Reinitialize {
                    source,
                    methods: i.config.replica_plan(true, false),
                }],
            ))
        }
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
                    vec![Action::Reinitialize {
                        source,
                        methods: i.config.replica_plan(true, false),
                    }],
                ))
            }
        }
    }
}
