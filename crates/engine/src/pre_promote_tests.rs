//! `pre_promote` (`docs/patroni-compat.md` §5.6): a refused promotion gives the lock up, and the
//! node stays out of the race for `ttl`, as Patroni's backoff after releasing the key.

use std::time::{Duration, Instant};

use pgvigil_api::ClusterView;
use pgvigil_api::cluster::Versioned;
use serde_json::Map;

use crate::tests::{cluster, config, inputs, peer, running};
use crate::*;

fn refused(ago: Duration, now: Instant) -> Memory {
    Memory {
        pre_promote_failed_at: Some(now - ago),
        ..Default::default()
    }
}

fn decide_at(view: &ClusterView, memory: &Memory, now: Instant, peers: Option<&[PeerReport]>) -> Decision {
    let cfg = config("a");
    let pg = running(true, 1, 1000, None);
    let mut i = inputs(&cfg, Some(view), &pg, memory, peers, None);
    i.now = now;
    decide(&i)
}

fn switchover_to_a(mut view: ClusterView) -> ClusterView {
    view.failover = Some(Versioned {
        value: pgvigil_api::FailoverValue {
            leader: Some("bb".into()),
            member: Some("a".into()),
            scheduled_at: None,
        },
        mod_revision: 9,
    });
    view
}

#[test]
fn a_refused_promotion_releases_the_lock_instead_of_promoting() {
    let now = Instant::now() + Duration::from_secs(1000);
    let view = cluster(Some("a"));
    let d = decide_at(&view, &refused(Duration::from_secs(1), now), now, None);
    assert_eq!(d.actions, vec![Action::ReleaseLock], "{}", d.message);
    assert!(d.message.contains("pre-promote script failed"), "{}", d.message);

    // The switchover that made us leader is cleared first, as Patroni clears it on taking the
    // lock: the others must not stand aside for a candidate that refused.
    let d = decide_at(
        &switchover_to_a(view.clone()),
        &refused(Duration::from_secs(1), now),
        now,
        None,
    );
    assert_eq!(d.actions, vec![Action::ClearFailover, Action::ReleaseLock]);

    // Without a refusal (or once it is older than ttl) the leader promotes, running the script again.
    let d = decide_at(&view, &Memory::default(), now, None);
    assert_eq!(d.actions, vec![Action::Promote]);
    let d = decide_at(&view, &refused(Duration::from_secs(31), now), now, None);
    assert_eq!(d.actions, vec![Action::Promote]);
}

#[test]
fn a_refused_node_stays_out_of_the_race_for_ttl() {
    let now = Instant::now() + Duration::from_secs(1000);
    let view = cluster(None);
    let peers = [
        peer("bb", "replica", 900, Map::new()),
        peer("ccc", "replica", 900, Map::new()),
    ];
    let d = decide_at(&view, &refused(Duration::from_secs(5), now), now, Some(&peers));
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert!(d.message.contains("backoff"), "{}", d.message);

    // Even a switchover naming us does not override the backoff (Patroni checks it first).
    let named = switchover_to_a(view.clone());
    let d = decide_at(&named, &refused(Duration::from_secs(5), now), now, Some(&peers));
    assert!(d.actions.is_empty(), "{:?}", d.actions);

    // After ttl the node races again as the healthiest.
    let d = decide_at(&view, &refused(Duration::from_secs(30), now), now, Some(&peers));
    assert_eq!(d.actions, vec![Action::AcquireLock]);
}
