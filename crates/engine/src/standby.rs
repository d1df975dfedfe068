//! A standby cluster's lock holder (`docs/patroni-compat.md` §4.11). The other standby-cluster
//! rules (the bootstrap from the remote, a stopped lock holder, replicas cascading from the
//! standby leader) sit in `decide.rs` where their normal-cluster counterparts are.

use pgvigil_api::ClusterView;

use crate::actions::{Action, Decision};
use crate::inputs::{Inputs, Observed, StandbyCluster};

/// The lock holder of a standby cluster (§4.11, Patroni's `enforce_follow_remote_member`): a
/// replica of the remote primary that never promotes. No watchdog (it accepts no writes), no
/// synchronous standbys. A switchover hands the key over as a primary's does (stop, wait for
/// a candidate past the stop's checkpoint, release); the candidate then follows the remote.
/// When the section goes away the next cycle takes `leading`'s normal path and promotes.
pub(crate) fn standby_leading(
    i: &Inputs<'_>,
    cluster: &ClusterView,
    own: &Observed,
    sc: &StandbyCluster,
) -> Decision {
    let me = &i.config.name;
    if !own.in_recovery {
        if cluster.is_paused() {
            return Decision::idle("paused: continue to run as primary although this is a standby cluster");
        }
        return Decision::new(
            "demoting to a standby cluster: cannot be a real primary in a standby cluster",
            vec![Action::DemoteCluster],
        );
    }
    let follows_remote = match &sc.remote {
        Some(remote) => own.upstream.as_ref() == Some(remote),
        None => own.upstream.is_none(),
    };
    if !follows_remote && !cluster.is_paused() {
        return Decision::new(
            "promoted self to a standby leader because i had the session lock",
            vec![Action::FollowRemote],
        );
    }
    if let Some(decision) = crate::decide::leader_request(i, cluster, own) {
        return decision;
    }
    Decision::new(
        format!("no action. I am ({me}), the standby leader with the lock"),
        vec![crate::decide::housekeeping(i, cluster, own)],
    )
}
