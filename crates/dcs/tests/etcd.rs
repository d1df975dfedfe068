//! Integration tests of `Etcd3Dcs` against real etcd processes (`pgvigil-testkit`).

use std::time::{Duration, Instant};

use pgvigil_api::{FailoverValue, HistoryEntry, MemberData, StatusValue, SyncValue};
use pgvigil_dcs::{Dcs, DcsError, DcsEvent, Etcd3Dcs, EtcdOptions};
use pgvigil_testkit::{EtcdCluster, wait_until_async};
use serde_json::json;
use tokio::sync::broadcast;

/// Generous bound for conditions that normally hold within milliseconds.
const WAIT: Duration = Duration::from_secs(20);

fn start_etcd(members: usize) -> EtcdCluster {
    tokio::task::block_in_place(|| EtcdCluster::start(members)).expect("etcd starts")
}

async fn client(cluster: &EtcdCluster, name: &str, retry_timeout: Duration) -> Etcd3Dcs {
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
async fn raw(cluster: &EtcdCluster) -> etcd_client::Client {
    etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap()
}

async fn raw_get(c: &mut etcd_client::Client, key: &str) -> Option<etcd_client::KeyValue> {
    c.get(key, None).await.unwrap().kvs().first().cloned()
}

fn member(state: &str) -> MemberData {
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
async fn expect_event(rx: &mut broadcast::Receiver<DcsEvent>, want: DcsEvent) {
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
async fn wait_for_live_watch(writer: &Etcd3Dcs, events: &mut broadcast::Receiver<DcsEvent>) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_race_has_exactly_one_winner() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    a.refresh_lease(30).await.unwrap();
    b.refresh_lease(30).await.unwrap();
    for round in 0..5 {
        let (ra, rb) = tokio::join!(a.attempt_to_acquire_leader(), b.attempt_to_acquire_leader());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra ^ rb, "round {round}: exactly one must win, got a={ra} b={rb}");
        let (winner, loser) = if ra { (&a, &b) } else { (&b, &a) };
        let view = winner.get_cluster().await.unwrap();
        let leader = view.leader.expect("leader key exists");
        assert_eq!(leader.name, winner.member_name());
        assert_eq!(leader.lease, winner.current_lease().unwrap().id);
        // Acquiring again: the winner's write is recognised as its own, the loser still loses.
        assert!(winner.attempt_to_acquire_leader().await.unwrap());
        assert!(!loser.attempt_to_acquire_leader().await.unwrap());
        assert!(winner.delete_leader().await.unwrap());
    }
    // The leader value is the plain member name, not JSON.
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    let mut r = raw(&etcd).await;
    assert_eq!(
        raw_get(&mut r, "/service/batman/leader").await.unwrap().value(),
        b"pg-a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquiring_without_a_lease_grants_one_first() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    assert!(a.current_lease().is_none());
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    let lease = a.current_lease().expect("a lease was granted");
    assert_eq!(lease.ttl, 30, "default TTL before any refresh_lease");
    assert_eq!(a.get_cluster().await.unwrap().leader.unwrap().lease, lease.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_removes_leader_and_member_keys() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let observer = client(&etcd, "observer", Duration::from_secs(5)).await;
    let ttl = 2;
    a.refresh_lease(ttl).await.unwrap();
    a.touch_member(&member("running")).await.unwrap();
    assert!(a.attempt_to_acquire_leader().await.unwrap());

    // Keep-alives hold the keys well past the TTL.
    let kept_until = Instant::now() + Duration::from_secs(ttl * 2);
    while Instant::now() < kept_until {
        let lease = a.refresh_lease(ttl).await.unwrap();
        let view = observer.get_cluster().await.unwrap();
        assert_eq!(view.leader_name(), Some("pg-a"));
        assert_eq!(view.member("pg-a").expect("member key alive").lease, lease.id);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Then stop refreshing: both keys vanish, never before sent_at + ttl.
    let last = a.refresh_lease(ttl).await.unwrap();
    wait_until_async("leader and member keys to expire", WAIT, || async {
        let view = observer.get_cluster().await.ok()?;
        (view.leader.is_none() && view.member("pg-a").is_none()).then_some(())
    })
    .await
    .unwrap();
    assert!(
        Instant::now() >= last.expires_at(),
        "keys expired before sent_at + ttl"
    );

    // The next refresh notices that the lease is gone and grants a new one.
    let renewed = a.refresh_lease(ttl).await.unwrap();
    assert_ne!(renewed.id, last.id);
    assert!(renewed.sent_at > last.sent_at);
    // touch_member rewrites the key on the new lease even though the data did not change.
    a.touch_member(&member("running")).await.unwrap();
    let view = observer.get_cluster().await.unwrap();
    assert_eq!(view.member("pg-a").unwrap().lease, renewed.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_with_a_lost_lease_grant_a_new_one_and_retry() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let mut r = raw(&etcd).await;
    let first = a.refresh_lease(30).await.unwrap();
    a.touch_member(&member("running")).await.unwrap();

    // The lease disappears behind our back (expiry, or revoked by an operator).
    r.lease_revoke(first.id).await.unwrap();
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    let second = a.current_lease().unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!(second.ttl, 30, "the new lease keeps the TTL of the last refresh");
    let view = a.get_cluster().await.unwrap();
    assert_eq!(view.leader.as_ref().unwrap().lease, second.id);
    assert!(
        view.member("pg-a").is_none(),
        "the member key went with the revoked lease"
    );
    a.touch_member(&member("running")).await.unwrap();
    assert_eq!(
        a.get_cluster().await.unwrap().member("pg-a").unwrap().lease,
        second.id
    );

    // Same for update_leader (the key vanished with the lease: the nested branch re-creates it)
    // and take_leader.
    r.lease_revoke(second.id).await.unwrap();
    assert!(a.update_leader(None).await.unwrap());
    let third = a.current_lease().unwrap();
    assert_ne!(third.id, second.id);
    assert_eq!(a.get_cluster().await.unwrap().leader.unwrap().lease, third.id);
    r.lease_revoke(third.id).await.unwrap();
    a.take_leader().await.unwrap();
    let fourth = a.current_lease().unwrap();
    assert_ne!(fourth.id, third.id);
    assert_eq!(a.get_cluster().await.unwrap().leader.unwrap().lease, fourth.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_change_and_update_leader_move_the_key_to_the_new_lease() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    let first = a.refresh_lease(20).await.unwrap();
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    // Same TTL: the same lease is kept alive.
    let again = a.refresh_lease(20).await.unwrap();
    assert_eq!(again.id, first.id);
    assert!(again.sent_at >= first.sent_at);

    // A TTL change grants a new lease; the key still carries the old one.
    let second = a.refresh_lease(25).await.unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!(second.ttl, 25);
    let leader = a.get_cluster().await.unwrap().leader.unwrap();
    assert_eq!(leader.lease, first.id);

    assert!(a.update_leader(Some(leader.lease)).await.unwrap());
    let moved = a.get_cluster().await.unwrap().leader.unwrap();
    assert_eq!((moved.name.as_str(), moved.lease), ("pg-a", second.id));

    // Cached lease is already ours: nothing is written.
    assert!(a.update_leader(Some(second.id)).await.unwrap());
    assert_eq!(
        a.get_cluster().await.unwrap().leader.unwrap().mod_revision,
        moved.mod_revision
    );

    // The key vanished: the nested branch re-creates it.
    let mut r = raw(&etcd).await;
    r.delete("/service/batman/leader", None).await.unwrap();
    assert!(a.update_leader(Some(first.id)).await.unwrap());
    assert_eq!(a.get_cluster().await.unwrap().leader.unwrap().lease, second.id);

    // Someone else holds it: not ours, left alone.
    assert!(a.delete_leader().await.unwrap());
    assert!(b.attempt_to_acquire_leader().await.unwrap());
    assert!(!a.update_leader(Some(first.id)).await.unwrap());
    let leader = a.get_cluster().await.unwrap().leader.unwrap();
    assert_eq!(
        (leader.name.as_str(), leader.lease),
        ("pg-b", b.current_lease().unwrap().id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_leader_only_deletes_our_own_key() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    assert!(!a.delete_leader().await.unwrap(), "no key: nothing deleted");
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    assert!(!b.delete_leader().await.unwrap());
    assert_eq!(b.get_cluster().await.unwrap().leader_name(), Some("pg-a"));
    assert!(a.delete_leader().await.unwrap());
    assert!(b.get_cluster().await.unwrap().is_unlocked());
    assert!(!a.delete_leader().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_leader_overwrites_unconditionally() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    assert!(b.attempt_to_acquire_leader().await.unwrap());
    a.take_leader().await.unwrap();
    let leader = a.get_cluster().await.unwrap().leader.unwrap();
    assert_eq!(
        (leader.name.as_str(), leader.lease),
        ("pg-a", a.current_lease().unwrap().id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_on_config_failover_and_sync() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;

    // Some(0): only if absent.
    assert!(
        a.set_config(&json!({"ttl": 30, "loop_wait": 10}), Some(0))
            .await
            .unwrap()
    );
    assert!(!a.set_config(&json!({"ttl": 1}), Some(0)).await.unwrap());
    let rev = a.get_cluster().await.unwrap().config.unwrap().mod_revision;
    assert!(a.set_config(&json!({"ttl": 40}), Some(rev)).await.unwrap());
    assert!(
        !a.set_config(&json!({"ttl": 50}), Some(rev)).await.unwrap(),
        "stale revision"
    );
    let config = a.get_cluster().await.unwrap().config.unwrap();
    assert_eq!(config.value, json!({"ttl": 40}));
    assert!(a.set_config(&json!({"ttl": 60}), None).await.unwrap());
    assert_eq!(
        a.get_cluster().await.unwrap().config.unwrap().value,
        json!({"ttl": 60})
    );

    let failover = FailoverValue {
        leader: Some("pg-a".into()),
        member: Some("pg-b".into()),
        scheduled_at: None,
    };
    assert!(a.set_failover(&failover, None).await.unwrap());
    let rev = a.get_cluster().await.unwrap().failover.unwrap().mod_revision;
    assert!(
        !a.set_failover(&FailoverValue::default(), Some(rev - 1))
            .await
            .unwrap()
    );
    assert!(
        a.set_failover(&FailoverValue::default(), Some(rev))
            .await
            .unwrap()
    );
    assert!(a.get_cluster().await.unwrap().pending_failover().is_none());

    let sync = SyncValue {
        leader: Some("pg-a".into()),
        quorum: 1,
        sync_standby: Some("pg-b,pg-c".into()),
    };
    assert!(a.set_sync(&sync, Some(0)).await.unwrap());
    let stored = a.get_cluster().await.unwrap().sync.unwrap();
    assert_eq!(stored.value, sync);
    assert!(!a.delete_sync(Some(stored.mod_revision + 100)).await.unwrap());
    assert!(a.delete_sync(Some(stored.mod_revision)).await.unwrap());
    assert!(a.get_cluster().await.unwrap().sync.is_none());
    assert!(a.set_sync(&sync, None).await.unwrap());
    assert!(a.delete_sync(None).await.unwrap());
    assert!(a.get_cluster().await.unwrap().sync.is_none());

    // Compact JSON, as Patroni writes it.
    assert!(a.set_sync(&sync, None).await.unwrap());
    let mut r = raw(&etcd).await;
    let value = raw_get(&mut r, "/service/batman/sync").await.unwrap();
    assert_eq!(
        value.value_str().unwrap(),
        r#"{"leader":"pg-a","quorum":1,"sync_standby":"pg-b,pg-c"}"#
    );
    assert_eq!(
        raw_get(&mut r, "/service/batman/config")
            .await
            .unwrap()
            .value_str()
            .unwrap(),
        r#"{"ttl":60}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_race_has_one_winner_and_sysid_lifecycle() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    let (ra, rb) = tokio::join!(a.initialize_race(), b.initialize_race());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "exactly one wins: a={ra} b={rb}");
    let view = a.get_cluster().await.unwrap();
    assert_eq!(view.initialize.as_deref(), Some(""));
    assert_eq!(view.sysid(), None);
    assert!(!a.initialize_race().await.unwrap());

    // Failed bootstrap: the marker is removed and the race can be run again.
    a.cancel_initialization().await.unwrap();
    assert_eq!(a.get_cluster().await.unwrap().initialize, None);
    assert!(b.initialize_race().await.unwrap());
    b.set_initialize("7268616322854375442").await.unwrap();
    assert_eq!(
        a.get_cluster().await.unwrap().sysid(),
        Some("7268616322854375442")
    );
    // The marker carries no lease.
    let mut r = raw(&etcd).await;
    assert_eq!(
        raw_get(&mut r, "/service/batman/initialize")
            .await
            .unwrap()
            .lease(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_view_round_trips_everything_we_write() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    let data = MemberData {
        role: "primary".into(),
        pending_restart: Some(true),
        pending_restart_reason: Some(json!({"max_connections": {"old_value": "100", "new_value": "200"}})),
        checkpoint_after_promote: Some(false),
        ..member("running")
    };
    a.refresh_lease(30).await.unwrap();
    a.touch_member(&data).await.unwrap();
    b.touch_member(&member("starting")).await.unwrap();
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    let status = StatusValue {
        optime: 67419744,
        slots: serde_json::from_value(json!({"pg_b": 67419744, "perm": 67400000})).unwrap(),
        retain_slots: vec!["pg_b".into()],
    };
    a.set_status(&status).await.unwrap();
    let history = vec![HistoryEntry {
        parent_timeline: 1,
        switch_lsn: 25623960,
        reason: "no recovery target specified".into(),
        timestamp: Some("2024-09-23T16:57:57+02:00".into()),
        new_leader: Some("pg-a".into()),
    }];
    a.set_history(&history).await.unwrap();
    let failsafe = serde_json::from_value(json!({"pg-a": "http://127.0.0.1:8008/patroni"})).unwrap();
    a.set_failsafe(&failsafe).await.unwrap();

    let view = b.get_cluster().await.unwrap();
    assert!(view.revision > 0);
    assert_eq!(view.members.len(), 2);
    let ma = view.member("pg-a").unwrap();
    assert_eq!(ma.data, data);
    assert_eq!(ma.lease, a.current_lease().unwrap().id);
    assert_eq!(view.member("pg-b").unwrap().data, member("starting"));
    assert_eq!(view.leader_member().unwrap().name, "pg-a");
    assert_eq!(view.status, status);
    assert_eq!(view.history_entries(), history.as_slice());
    assert_eq!(view.timeline(), 2);
    assert_eq!(view.failsafe.as_ref(), Some(&failsafe));

    // Raw format: compact member JSON on our lease.
    let mut r = raw(&etcd).await;
    let raw_member = raw_get(&mut r, "/service/batman/members/pg-a").await.unwrap();
    assert_eq!(
        raw_member.value_str().unwrap(),
        serde_json::to_string(&data).unwrap()
    );
    assert!(!raw_member.value_str().unwrap().contains(' '));

    // Unchanged member data / status: no write.
    a.touch_member(&data).await.unwrap();
    a.set_status(&status).await.unwrap();
    let after = raw_get(&mut r, "/service/batman/members/pg-a").await.unwrap();
    assert_eq!(after.mod_revision(), raw_member.mod_revision());
    let status_rev = raw_get(&mut r, "/service/batman/status")
        .await
        .unwrap()
        .mod_revision();
    a.set_status(&status).await.unwrap();
    assert_eq!(
        raw_get(&mut r, "/service/batman/status")
            .await
            .unwrap()
            .mod_revision(),
        status_rev
    );
    // Changed data: written.
    a.touch_member(&member("stopped")).await.unwrap();
    assert_eq!(
        b.get_cluster().await.unwrap().member("pg-a").unwrap().data.state,
        "stopped"
    );

    // patronictl remove: everything goes; our next writes are not skipped as "unchanged".
    b.delete_cluster().await.unwrap();
    let view = a.get_cluster().await.unwrap();
    assert!(view.members.is_empty() && view.leader.is_none() && view.config.is_none());
    a.touch_member(&member("stopped")).await.unwrap();
    a.set_status(&status).await.unwrap();
    let view = b.get_cluster().await.unwrap();
    assert!(view.member("pg-a").is_some());
    assert_eq!(view.status.optime, status.optime);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_deletion_of_our_member_key_is_repaired() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let mut events = a.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    a.touch_member(&member("running")).await.unwrap();
    // Consume the event of our own write first, or it could pass for the deletion's below.
    expect_event(&mut events, DcsEvent::MembersChanged).await;
    let mut r = raw(&etcd).await;
    r.delete("/service/batman/members/pg-a", None).await.unwrap();
    // The watch sees the deletion (no get_cluster in between), so the next write is not skipped.
    expect_event(&mut events, DcsEvent::MembersChanged).await;
    a.touch_member(&member("running")).await.unwrap();
    let rewritten = raw_get(&mut r, "/service/batman/members/pg-a")
        .await
        .expect("member key rewritten");
    assert_eq!(rewritten.lease(), a.current_lease().unwrap().id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_changes_and_survives_idle_periods() {
    let etcd = start_etcd(1);
    // A short retry_timeout, so that the idle period below outlasts the per-request timeout.
    let a = client(&etcd, "pg-a", Duration::from_secs(2)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(2)).await;
    let mut events = b.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;

    assert!(a.attempt_to_acquire_leader().await.unwrap());
    expect_event(&mut events, DcsEvent::LeaderChanged).await;
    a.touch_member(&member("running")).await.unwrap();
    expect_event(&mut events, DcsEvent::MembersChanged).await;
    a.set_config(&json!({"ttl": 30}), None).await.unwrap();
    expect_event(&mut events, DcsEvent::ConfigChanged).await;
    a.set_status(&StatusValue::default()).await.unwrap();
    expect_event(&mut events, DcsEvent::StatusChanged).await;
    a.set_failover(&FailoverValue::default(), None).await.unwrap();
    expect_event(&mut events, DcsEvent::FailoverChanged).await;
    a.set_sync(&SyncValue::default(), None).await.unwrap();
    expect_event(&mut events, DcsEvent::SyncChanged).await;
    a.set_initialize("").await.unwrap();
    expect_event(&mut events, DcsEvent::Other).await;

    // The scenario itself: the watch stays idle longer than one request may take.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.delete_leader().await.unwrap());
    expect_event(&mut events, DcsEvent::LeaderChanged).await;
    // No restart happened meanwhile.
    while let Ok(e) = events.try_recv() {
        assert_ne!(e, DcsEvent::WatchRestarted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_leader_deletion_by_lease_expiry() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    a.refresh_lease(2).await.unwrap();
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    let mut events = b.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    assert_eq!(b.get_cluster().await.unwrap().leader_name(), Some("pg-a"));
    // a stops refreshing; etcd expires the lease and deletes the key.
    expect_event(&mut events, DcsEvent::LeaderChanged).await;
    assert!(b.get_cluster().await.unwrap().is_unlocked());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_restarts_after_etcd_comes_back() {
    let mut etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(2)).await;
    let mut events = a.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    tokio::task::block_in_place(|| etcd.stop_member(0));
    tokio::task::block_in_place(|| etcd.start_member(0)).unwrap();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    wait_for_live_watch(&a, &mut events).await;
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    expect_event(&mut events, DcsEvent::LeaderChanged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_lease_removes_our_keys_at_once() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    a.refresh_lease(60).await.unwrap();
    a.touch_member(&member("running")).await.unwrap();
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    assert!(a.delete_leader().await.unwrap());
    a.revoke_lease().await.unwrap();
    assert!(a.current_lease().is_none());
    let view = a.get_cluster().await.unwrap();
    assert!(view.member("pg-a").is_none(), "member key went with the lease");
    // Revoking again is a no-op.
    a.revoke_lease().await.unwrap();
}

/// Asserts that `op` fails with `Unavailable` within the deadline (plus scheduling slack).
async fn assert_unavailable<T: std::fmt::Debug>(
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

async fn assert_all_unavailable(a: &Etcd3Dcs, deadline: Duration) {
    assert_unavailable("get_cluster", deadline, a.get_cluster()).await;
    assert_unavailable("refresh_lease", deadline, a.refresh_lease(30)).await;
    assert_unavailable("update_leader", deadline, a.update_leader(None)).await;
    assert_unavailable(
        "attempt_to_acquire_leader",
        deadline,
        a.attempt_to_acquire_leader(),
    )
    .await;
    assert_unavailable("touch_member", deadline, a.touch_member(&member("x"))).await;
    assert_unavailable("set_config", deadline, a.set_config(&json!({}), Some(1))).await;
    assert_unavailable("delete_leader", deadline, a.delete_leader()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_etcd_gives_unavailable_within_the_deadline() {
    let mut etcd = start_etcd(1);
    let deadline = Duration::from_secs(2);
    let a = client(&etcd, "pg-a", deadline).await;
    a.refresh_lease(30).await.unwrap();
    tokio::task::block_in_place(|| etcd.stop_member(0));
    assert_all_unavailable(&a, deadline).await;
    // It recovers once etcd is back.
    tokio::task::block_in_place(|| etcd.start_member(0)).unwrap();
    wait_until_async("operations to succeed again", WAIT, || async {
        a.get_cluster().await.ok()
    })
    .await
    .unwrap();
    a.refresh_lease(30).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_etcd_gives_unavailable_within_the_deadline() {
    let mut etcd = start_etcd(1);
    let deadline = Duration::from_secs(2);
    let a = client(&etcd, "pg-a", deadline).await;
    a.refresh_lease(30).await.unwrap();
    let mut events = a.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    etcd.pause_member(0).unwrap();
    assert_all_unavailable(&a, deadline).await;
    etcd.resume_member(0).unwrap();
    wait_until_async("operations to succeed again", WAIT, || async {
        a.get_cluster().await.ok()
    })
    .await
    .unwrap();
    // The watch delivers changes made after the hang. (Nothing more precise can be asserted
    // about the leader key here: the writes that timed out during the hang were still queued
    // in etcd's socket and are applied after SIGCONT, in an unspecified order. A timed-out
    // write has an unknown outcome, which is what `Unavailable` means for writes.)
    wait_for_live_watch(&a, &mut events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_succeeds_before_etcd_is_up() {
    let mut etcd = start_etcd(1);
    tokio::task::block_in_place(|| etcd.stop_member(0));
    let deadline = Duration::from_secs(2);
    let a = client(&etcd, "pg-a", deadline).await;
    assert_unavailable("get_cluster before etcd is up", deadline, a.get_cluster()).await;
    tokio::task::block_in_place(|| etcd.start_member(0)).unwrap();
    wait_until_async("the first successful read", WAIT, || async {
        a.get_cluster().await.ok()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_tolerate_one_down_and_refuse_without_quorum() {
    let mut etcd = start_etcd(3);
    let deadline = Duration::from_secs(3);
    let a = client(&etcd, "pg-a", deadline).await;
    a.refresh_lease(30).await.unwrap();
    a.touch_member(&member("running")).await.unwrap();

    // One member down: every operation still succeeds (retried on the other endpoints).
    tokio::task::block_in_place(|| etcd.stop_member(0));
    for i in 0..10 {
        let started = Instant::now();
        assert!(
            a.get_cluster().await.unwrap().member("pg-a").is_some(),
            "read {i}"
        );
        a.refresh_lease(30).await.unwrap();
        a.set_status(&StatusValue {
            optime: i,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(started.elapsed() < deadline * 3);
    }
    assert!(a.attempt_to_acquire_leader().await.unwrap());

    // Majority down: the remaining member has no leader and must refuse (require_leader), not
    // serve its possibly stale data.
    tokio::task::block_in_place(|| etcd.stop_member(1));
    assert_unavailable("get_cluster without quorum", deadline, a.get_cluster()).await;
    assert_unavailable("refresh_lease without quorum", deadline, a.refresh_lease(30)).await;
    assert_unavailable("update_leader without quorum", deadline, a.update_leader(None)).await;

    tokio::task::block_in_place(|| etcd.start_member(1)).unwrap();
    wait_until_async("quorum to serve reads again", WAIT, || async {
        a.get_cluster().await.ok()
    })
    .await
    .unwrap();
    a.refresh_lease(30).await.unwrap();
}

/// A member that hangs (SIGSTOP: like a host cut off, its connections neither answer nor
/// close) costs at most an attempt: operations move to the next endpoint and stay there, so
/// a leader's lease renewals keep succeeding while the member hangs, and the watch moves with
/// them (a replica must see the leader key expire when the leader's host is the one that died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_left_for_the_next_endpoint() {
    let mut etcd = start_etcd(3);
    let deadline = Duration::from_secs(3);
    let a = client(&etcd, "pg-a", deadline).await;
    a.refresh_lease(30).await.unwrap();
    assert!(a.attempt_to_acquire_leader().await.unwrap());
    assert_eq!(a.endpoint_in_use(), etcd.endpoint(0));
    let mut events = a.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    etcd.pause_member(0).unwrap();
    a.refresh_lease(30).await.unwrap();
    let moved_to = a.endpoint_in_use().to_string();
    assert_ne!(moved_to, etcd.endpoint(0), "still on the hung member");
    // The watch stream was on the hung member too; it follows at once instead of staying
    // silent until HTTP/2 keep-alive gives up (10 s interval plus its timeout).
    let restarted = tokio::time::timeout(deadline * 2, async {
        loop {
            if let Ok(DcsEvent::WatchRestarted) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(restarted.is_ok(), "the watch did not follow to {moved_to}");
    wait_for_live_watch(&a, &mut events).await;
    for i in 0..20 {
        a.refresh_lease(30)
            .await
            .unwrap_or_else(|e| panic!("renewal {i} with member 0 hung: {e}"));
        assert!(
            a.update_leader(None).await.unwrap(),
            "update_leader {i}: we hold the lock"
        );
        let view = a.get_cluster().await.unwrap();
        assert_eq!(view.leader.as_ref().map(|l| l.name.as_str()), Some("pg-a"));
        assert_eq!(
            a.endpoint_in_use(),
            moved_to,
            "operation {i} switched endpoints again"
        );
    }
    etcd.resume_member(0).unwrap();
}
