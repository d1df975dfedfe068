//! Shared by the `Etcd3Dcs` tests against real etcd processes (`pgvigil-testkit`).

#![allow(dead_code)]

use std::time::{Duration, Instant};

use pgvigil_api::{MemberData, StatusValue};
use pgvigil_dcs::{Dcs, DcsError, DcsEvent, Etcd3Dcs, EtcdOptions, LockStore, TermOpening, Written};
use pgvigil_testkit::EtcdCluster;
use serde_json::json;
use tokio::sync::broadcast;

/// Generous bound for conditions that normally hold within milliseconds.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn start_etcd(members: usize) -> EtcdCluster {
    tokio::task::block_in_place(|| EtcdCluster::start(members)).expect("etcd starts")
}

pub async fn client(cluster: &EtcdCluster, name: &str, retry_timeout: Duration) -> Etcd3Dcs {
    Etcd3Dcs::connect(EtcdOptions {
        endpoints: cluster.endpoints(),
        namespace: "/service".into(),
        scope: "batman".into(),
        member_name: name.into(),
        retry_timeout,
        ..Default::default()
    })
    .await
    .expect("connect never contacts etcd")
}

/// A plain etcd client, to check the raw stored values.
pub async fn raw(cluster: &EtcdCluster) -> etcd_client::Client {
    etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap()
}

pub async fn raw_get(c: &mut etcd_client::Client, key: &str) -> Option<etcd_client::KeyValue> {
    c.get(key, None).await.unwrap().kvs().first().cloned()
}

pub fn member(state: &str) -> MemberData {
    MemberData {
        conn_url: "postgres://127.0.0.1:5432/postgres".into(),
        api_url: "http://127.0.0.1:8008/patroni".into(),
        state: state.into(),
        role: "replica".into(),
        version: pgvigil_api::PATRONI_COMPAT_VERSION.into(),
        xlog_location: Some(67419744),
        timeline: Some(3),
        tags: serde_json::from_value(json!({"clonefrom": true, "failover_priority": 2})).unwrap(),
        ..Default::default()
    }
}

/// Receives events until one equals `want`, bounded by [`WAIT`].
pub async fn expect_event(rx: &mut broadcast::Receiver<DcsEvent>, want: DcsEvent) {
    let result = tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) if e == want => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    })
    .await;
    assert!(result.is_ok(), "no {want:?} event within {WAIT:?}");
}

/// Waits until the watch of `events` delivers a change made after this call started: writes
/// `status` with a fresh optime and waits briefly for `StatusChanged`, repeatedly, bounded by
/// [`WAIT`]. Use after faults, when the watch may be in the middle of reconnecting.
pub async fn wait_for_live_watch(writer: &Etcd3Dcs, events: &mut broadcast::Receiver<DcsEvent>) {
    let deadline = Instant::now() + WAIT;
    let mut optime = 1_000_000;
    while Instant::now() < deadline {
        optime += 1;
        let status = StatusValue {
            optime,
            ..Default::default()
        };
        if writer.set_status(&status).await.is_err() {
            continue;
        }
        let delivered = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match events.recv().await {
                    Ok(DcsEvent::StatusChanged) => return true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        if delivered == Ok(true) {
            return;
        }
    }
    panic!("the watch delivered no fresh event within {WAIT:?}");
}

/// A new lease of `ttl` seconds.
pub async fn lease(store: &Etcd3Dcs, ttl: u64) -> i64 {
    store.grant(Duration::from_secs(ttl)).await.expect("lease grant")
}

/// Acquires the free key on a new 30 s lease (with the heartbeat `hb`, if any); returns the
/// lease and the term's revision.
pub async fn acquire(store: &Etcd3Dcs, hb: Option<&str>) -> (i64, i64) {
    let lease = lease(store, 30).await;
    match store.open_term(TermOpening::Acquire, lease, hb).await.unwrap() {
        Written::Applied(revision) => (lease, revision),
        Written::Refused => panic!("the leader key was not free"),
    }
}

/// Asserts that `op` fails with `Unavailable` within the deadline (plus scheduling slack).
pub async fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    deadline: Duration,
    op: impl std::future::Future<Output = Result<T, DcsError>>,
) {
    let started = Instant::now();
    let result = tokio::time::timeout(deadline * 3, op).await;
    let elapsed = started.elapsed();
    let result = result.unwrap_or_else(|_| panic!("{what}: hung for {elapsed:?}"));
    match result {
        Err(e @ DcsError::Unavailable(_)) => eprintln!("{what} after {elapsed:?}: {e}"),
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(
        elapsed <= deadline + Duration::from_millis(1500),
        "{what}: took {elapsed:?}, deadline {deadline:?}"
    );
}

/// Makes sure member `i` is not etcd's raft leader (moving leadership to another member if it
/// is), so pausing it does not start an election: during one the other members answer "no
/// leader", and a client moves on from them too.
pub async fn lead_elsewhere(cluster: &EtcdCluster, i: usize) {
    let mut direct = etcd_client::Client::connect([cluster.endpoint(i)], None)
        .await
        .unwrap();
    let status = direct.status().await.unwrap();
    let me = status.header().map(|h| h.member_id()).unwrap();
    if status.leader() != me {
        return;
    }
    let target = (i + 1) % cluster.len();
    let mut other = etcd_client::Client::connect([cluster.endpoint(target)], None)
        .await
        .unwrap();
    let target_id = other
        .status()
        .await
        .unwrap()
        .header()
        .map(|h| h.member_id())
        .unwrap();
    direct.move_leader(target_id).await.unwrap();
    let moved = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(s) = other.status().await
                && s.leader() == target_id
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(moved.is_ok(), "etcd leadership did not move off member {i}");
}
