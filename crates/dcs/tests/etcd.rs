//! Integration tests of `Etcd3Dcs` against real etcd processes (`pgvigil-testkit`): the keys
//! and values, compare-and-set, the watch, and what a failing etcd looks like. The leader
//! lock's transactions are in `lock.rs`.

mod support;

use std::time::{Duration, Instant};

use pgvigil_api::{FailoverValue, HistoryEntry, MemberData, StatusValue, SyncValue};
use pgvigil_dcs::{Dcs, DcsEvent, Etcd3Dcs, EtcdOptions, LockStore, TermOpening};
use pgvigil_testkit::wait_until_async;
use serde_json::json;
use support::*;

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
    let la = lease(&a, 30).await;
    a.touch_member(&data, la).await.unwrap();
    b.touch_member(&member("starting"), lease(&b, 30).await)
        .await
        .unwrap();
    a.open_term(TermOpening::Acquire, la, None).await.unwrap();
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
    assert_eq!(ma.lease, la);
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
    a.touch_member(&data, la).await.unwrap();
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
    a.touch_member(&member("stopped"), la).await.unwrap();
    assert_eq!(
        b.get_cluster().await.unwrap().member("pg-a").unwrap().data.state,
        "stopped"
    );

    // patronictl remove: everything goes; our next writes are not skipped as "unchanged".
    b.delete_cluster().await.unwrap();
    let view = a.get_cluster().await.unwrap();
    assert!(view.members.is_empty() && view.leader.is_none() && view.config.is_none());
    a.touch_member(&member("stopped"), la).await.unwrap();
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
    let la = lease(&a, 30).await;
    a.touch_member(&member("running"), la).await.unwrap();
    // Consume the event of our own write first, or it could pass for the deletion's below.
    expect_event(&mut events, DcsEvent::MembersChanged).await;
    let mut r = raw(&etcd).await;
    r.delete("/service/batman/members/pg-a", None).await.unwrap();
    // The watch sees the deletion (no get_cluster in between), so the next write is not skipped.
    expect_event(&mut events, DcsEvent::MembersChanged).await;
    a.touch_member(&member("running"), la).await.unwrap();
    let rewritten = raw_get(&mut r, "/service/batman/members/pg-a")
        .await
        .expect("member key rewritten");
    assert_eq!(rewritten.lease(), la);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_changes_and_survives_idle_periods() {
    let etcd = start_etcd(1);
    // A short retry_timeout, so that the idle period below outlasts the per-request timeout.
    let a = client(&etcd, "pg-a", Duration::from_secs(2)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(2)).await;
    let mut events = b.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;

    let (la, term) = acquire(&a, None).await;
    expect_event(&mut events, DcsEvent::LeaderChanged).await;
    a.touch_member(&member("running"), la).await.unwrap();
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
    assert!(a.release(term).await.unwrap());
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
    let short = lease(&a, 2).await;
    a.open_term(TermOpening::Acquire, short, None).await.unwrap();
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
    acquire(&a, None).await;
    expect_event(&mut events, DcsEvent::LeaderChanged).await;
}

async fn assert_all_unavailable(a: &Etcd3Dcs, deadline: Duration) {
    assert_unavailable("get_cluster", deadline, a.get_cluster()).await;
    assert_unavailable("touch_member", deadline, a.touch_member(&member("x"), 1)).await;
    assert_unavailable("set_config", deadline, a.set_config(&json!({}), Some(1))).await;
    assert_unavailable("set_status", deadline, a.set_status(&StatusValue::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_etcd_gives_unavailable_within_the_deadline() {
    let mut etcd = start_etcd(1);
    let deadline = Duration::from_secs(2);
    let a = client(&etcd, "pg-a", deadline).await;
    a.get_cluster().await.unwrap();
    tokio::task::block_in_place(|| etcd.stop_member(0));
    assert_all_unavailable(&a, deadline).await;
    // It recovers once etcd is back.
    tokio::task::block_in_place(|| etcd.start_member(0)).unwrap();
    wait_until_async("operations to succeed again", WAIT, || async {
        a.get_cluster().await.ok()
    })
    .await
    .unwrap();
    a.set_status(&StatusValue::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_etcd_gives_unavailable_within_the_deadline() {
    let mut etcd = start_etcd(1);
    let deadline = Duration::from_secs(2);
    let a = client(&etcd, "pg-a", deadline).await;
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
    let la = lease(&a, 30).await;
    a.touch_member(&member("running"), la).await.unwrap();

    // One member down: every operation still succeeds (retried on the other endpoints).
    tokio::task::block_in_place(|| etcd.stop_member(0));
    for i in 0..10 {
        let started = Instant::now();
        assert!(
            a.get_cluster().await.unwrap().member("pg-a").is_some(),
            "read {i}"
        );
        a.set_status(&StatusValue {
            optime: i,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(started.elapsed() < deadline * 3);
    }
    // The lock's single attempts go to the endpoint the retried operations moved to.
    assert!(a.keep_alive(la).await.unwrap());
    a.open_term(TermOpening::Acquire, la, None).await.unwrap();

    // Majority down: the remaining member has no leader and must refuse (require_leader), not
    // serve its possibly stale data.
    tokio::task::block_in_place(|| etcd.stop_member(1));
    assert_unavailable("get_cluster without quorum", deadline, a.get_cluster()).await;
    assert_unavailable("keep_alive without quorum", deadline, a.keep_alive(la)).await;

    tokio::task::block_in_place(|| etcd.start_member(1)).unwrap();
    wait_until_async("quorum to serve reads again", WAIT, || async {
        a.get_cluster().await.ok()
    })
    .await
    .unwrap();
    wait_until_async("keep-alives to succeed again", WAIT, || async {
        a.keep_alive(la).await.ok().filter(|alive| *alive)
    })
    .await
    .unwrap();
}

/// A member that hangs (SIGSTOP: like a host cut off, its connections neither answer nor
/// close) costs at most an attempt: operations move to the next endpoint and stay there, so
/// a leader's keep-alives and heartbeats keep succeeding while the member hangs, and the watch
/// moves with them (a replica must see the leader's heartbeats stop when the leader's host is
/// the one that died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_left_for_the_next_endpoint() {
    let mut etcd = start_etcd(3);
    let deadline = Duration::from_secs(3);
    let a = client(&etcd, "pg-a", deadline).await;
    let (la, term) = acquire(&a, None).await;
    assert_eq!(a.endpoint_in_use(), etcd.endpoint(0));
    let mut events = a.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    // Not the raft leader: the others keep answering (an election would send the client on).
    lead_elsewhere(&etcd, 0).await;
    etcd.pause_member(0).unwrap();
    // The lock's single attempt on the hung member fails within the attempt timeout...
    assert!(a.keep_alive(la).await.is_err());
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
    // ... and every later one goes to the member it moved to.
    for i in 0..20 {
        assert!(
            a.keep_alive(la)
                .await
                .unwrap_or_else(|e| panic!("renewal {i} with member 0 hung: {e}"))
        );
        assert_eq!(
            a.heartbeat(term, la, None).await.unwrap(),
            pgvigil_dcs::Written::Applied(0),
            "proof {i}: we hold the lock"
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

/// When the endpoint in use stops answering, the client moves to a member that answers, not
/// blindly to the next one in the list: that one may sit on a dead host and cost a whole
/// attempt, and the leader lock cannot afford two lost attempts in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_endpoint_is_left_for_a_member_that_answers_not_for_a_dead_one() {
    let mut etcd = start_etcd(3);
    // A "dead host": connections are accepted by the kernel, nothing ever answers.
    let dead_host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("127.0.0.1:{}", dead_host.local_addr().unwrap().port());
    let endpoints = vec![etcd.endpoint(0), dead.clone(), etcd.endpoint(1), etcd.endpoint(2)];
    let a = Etcd3Dcs::connect(EtcdOptions {
        endpoints,
        namespace: "/service".into(),
        scope: "batman".into(),
        member_name: "pg-a".into(),
        retry_timeout: Duration::from_secs(8),
        ..Default::default()
    })
    .await
    .unwrap();
    let (lease, _) = acquire(&a, None).await;
    lead_elsewhere(&etcd, 0).await;
    etcd.pause_member(0).unwrap();
    assert!(a.keep_alive(lease).await.is_err(), "member 0 is paused");
    let moved_to = a.endpoint_in_use().to_string();
    assert_ne!(moved_to, etcd.endpoint(0), "still on the paused member");
    assert_ne!(moved_to, dead, "moved to the endpoint that never answers");
    assert!(a.keep_alive(lease).await.unwrap(), "renewal on {moved_to}");
    etcd.resume_member(0).unwrap();
}

/// The agent lists its own host's etcd member first. After that member was away for a moment
/// (its host restarting), operations go back to it within half a minute instead of staying on
/// a remote member, which could die with another host and cost a replica its fast takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_return_to_the_first_endpoint_once_it_answers_again() {
    let mut etcd = start_etcd(3);
    let a = client(&etcd, "pg-a", Duration::from_secs(3)).await;
    a.get_cluster().await.unwrap();
    tokio::task::block_in_place(|| etcd.stop_member(0));
    a.get_cluster().await.unwrap();
    assert_ne!(a.endpoint_in_use(), etcd.endpoint(0));
    tokio::task::block_in_place(|| etcd.start_member(0)).unwrap();
    wait_until_async(
        "operations to return to the first endpoint",
        Duration::from_secs(90),
        || async {
            a.get_cluster().await.ok()?;
            (a.endpoint_in_use() == etcd.endpoint(0)).then_some(())
        },
    )
    .await
    .unwrap();
}
