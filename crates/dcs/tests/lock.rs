//! The leader lock's etcd transactions ([`LockStore`]) against a real etcd: every write of a
//! term succeeds only while the leader key is at the term's revision, a takeover only while
//! nothing it compared has changed, and the heartbeat is written in the same revision as the
//! key that starts a term.

mod support;

use std::time::{Duration, Instant};

use pgvigil_dcs::{Dcs, DcsEvent, Etcd3Dcs, KeyState, LockKeyEvent, LockStore, TermOpening, Written};
use pgvigil_testkit::wait_until_async;
use serde_json::json;
use support::*;

const HB: &str = r#"{"leader":"pg-a","fences_within_ms":3500}"#;

fn applied(w: Written) -> i64 {
    match w {
        Written::Applied(revision) => revision,
        Written::Refused => panic!("refused"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_has_exactly_one_winner_and_writes_key_and_heartbeat_together() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    let (la, lb) = (lease(&a, 30).await, lease(&b, 30).await);
    for round in 0..5 {
        let (ra, rb) = tokio::join!(
            a.open_term(TermOpening::Acquire, la, Some(HB)),
            b.open_term(TermOpening::Acquire, lb, None)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let a_won = matches!(ra, Written::Applied(_));
        assert!(
            a_won ^ matches!(rb, Written::Applied(_)),
            "round {round}: {ra:?} {rb:?}"
        );
        let (winner, revision) = if a_won {
            (&a, applied(ra))
        } else {
            (&b, applied(rb))
        };
        let view = winner.get_cluster().await.unwrap();
        let leader = view.leader.expect("leader key exists");
        assert_eq!(leader.name, winner.member_name());
        assert_eq!(leader.lease, if a_won { la } else { lb });
        assert_eq!(leader.mod_revision, revision);
        if a_won {
            let hb = view.heartbeat.expect("the heartbeat is written with the key");
            assert_eq!((hb.value.as_str(), hb.mod_revision), (HB, revision));
        } else {
            assert!(
                view.heartbeat.is_none(),
                "a term without a promise has no heartbeat"
            );
        }
        assert!(winner.release(revision).await.unwrap());
        let view = a.get_cluster().await.unwrap();
        assert!(view.leader.is_none() && view.heartbeat.is_none());
    }
    // The leader value is the plain member name, not JSON.
    let (_, _) = acquire(&a, None).await;
    let mut r = raw(&etcd).await;
    assert_eq!(
        raw_get(&mut r, "/service/batman/leader").await.unwrap().value(),
        b"pg-a"
    );
    let key = a.read_leader().await.unwrap().unwrap();
    assert_eq!(key.value, "pg-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_release_only_at_the_term_revision() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let (lease, term) = acquire(&a, Some(HB)).await;
    let hb1 = applied(a.heartbeat(term, lease, Some(HB)).await.unwrap());
    let hb2 = applied(a.heartbeat(term, lease, Some(HB)).await.unwrap());
    assert!(hb2 > hb1 && hb1 > term, "each heartbeat is a new revision");
    // A proof without a promise writes nothing.
    assert_eq!(a.heartbeat(term, lease, None).await.unwrap(), Written::Applied(0));
    let view = a.get_cluster().await.unwrap();
    assert_eq!(view.heartbeat.unwrap().mod_revision, hb2);
    assert_eq!(
        view.leader.unwrap().mod_revision,
        term,
        "heartbeats leave the key alone"
    );
    // Somebody rewrites the key (even with our value): our term is over.
    let mut r = raw(&etcd).await;
    r.put("/service/batman/leader", "pg-a", None).await.unwrap();
    assert_eq!(
        a.heartbeat(term, lease, Some(HB)).await.unwrap(),
        Written::Refused
    );
    assert_eq!(a.heartbeat(term, lease, None).await.unwrap(), Written::Refused);
    assert!(
        !a.release(term).await.unwrap(),
        "release refused after the key changed"
    );
    assert!(a.get_cluster().await.unwrap().leader.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_compares_the_key_the_heartbeat_and_the_config() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    a.set_config(&json!({"ttl": 30}), None).await.unwrap();
    let (la, term) = acquire(&a, Some(HB)).await;
    let seen = b.get_cluster().await.unwrap();
    let takeover = |view: &pgvigil_api::ClusterView| TermOpening::TakeOver {
        leader_revision: view.leader.as_ref().unwrap().mod_revision,
        heartbeat_revision: view.heartbeat.as_ref().unwrap().mod_revision,
        config_revision: view.config_revision(),
    };
    let lb = lease(&b, 30).await;
    // The leader heartbeats after b looked: b's takeover is refused.
    applied(a.heartbeat(term, la, Some(HB)).await.unwrap());
    assert_eq!(
        b.open_term(takeover(&seen), lb, None).await.unwrap(),
        Written::Refused
    );
    // A config change (a pause, say) after b looked: refused too.
    let seen = b.get_cluster().await.unwrap();
    a.set_config(&json!({"ttl": 30, "pause": true}), None)
        .await
        .unwrap();
    assert_eq!(
        b.open_term(takeover(&seen), lb, None).await.unwrap(),
        Written::Refused
    );
    // Nothing changed since b looked: the key is b's, in one revision with b's heartbeat.
    let seen = b.get_cluster().await.unwrap();
    let hb_b = r#"{"leader":"pg-b","fences_within_ms":3500}"#;
    let revision = applied(b.open_term(takeover(&seen), lb, Some(hb_b)).await.unwrap());
    let view = a.get_cluster().await.unwrap();
    assert_eq!(view.leader.as_ref().unwrap().name, "pg-b");
    assert_eq!(view.leader.as_ref().unwrap().lease, lb);
    assert_eq!(view.heartbeat.as_ref().unwrap().mod_revision, revision);
    // The old leader's heartbeats and release fail from now on; its lease still lives.
    assert_eq!(a.heartbeat(term, la, Some(HB)).await.unwrap(), Written::Refused);
    assert!(!a.release(term).await.unwrap());
    assert!(
        a.keep_alive(la).await.unwrap(),
        "a keep-alive proves nothing about the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_puts_our_key_on_another_lease_or_promise_and_refuses_anything_else() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    let (_, term) = acquire(&a, Some(HB)).await;
    // ttl changed: a new lease, the key moves to it and loses its promise.
    let second = lease(&a, 45).await;
    let moved = applied(
        a.open_term(
            TermOpening::Move {
                leader_revision: term,
            },
            second,
            None,
        )
        .await
        .unwrap(),
    );
    let view = b.get_cluster().await.unwrap();
    assert_eq!(view.leader.as_ref().unwrap().lease, second);
    assert!(view.heartbeat.is_none(), "no promise, no heartbeat");
    // A move compares the revision: the old one is refused.
    assert_eq!(
        a.open_term(
            TermOpening::Move {
                leader_revision: term
            },
            second,
            Some(HB)
        )
        .await
        .unwrap(),
        Written::Refused
    );
    // b can never move a's key, even at the right revision.
    let lb = lease(&b, 30).await;
    assert_eq!(
        b.open_term(
            TermOpening::Move {
                leader_revision: moved
            },
            lb,
            None
        )
        .await
        .unwrap(),
        Written::Refused
    );
    // Adoption after a restart: a new client of the same member moves the key it finds.
    let a2 = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let found = a2.read_leader().await.unwrap().unwrap();
    let l2 = lease(&a2, 30).await;
    applied(
        a2.open_term(
            TermOpening::Move {
                leader_revision: found.mod_revision,
            },
            l2,
            Some(HB),
        )
        .await
        .unwrap(),
    );
    assert_eq!(a2.read_leader().await.unwrap().unwrap().lease, l2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_removes_key_heartbeat_and_member_no_earlier_than_the_ttl() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let observer = client(&etcd, "observer", Duration::from_secs(5)).await;
    let ttl = 2;
    let lease = lease(&a, ttl).await;
    a.touch_member(&member("running"), lease).await.unwrap();
    applied(a.open_term(TermOpening::Acquire, lease, Some(HB)).await.unwrap());
    // Keep-alives hold the keys well past the TTL.
    let kept_until = Instant::now() + Duration::from_secs(ttl * 2);
    while Instant::now() < kept_until {
        assert!(a.keep_alive(lease).await.unwrap());
        let view = observer.get_cluster().await.unwrap();
        assert_eq!(view.leader_name(), Some("pg-a"));
        assert_eq!(view.member("pg-a").expect("member key alive").lease, lease);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sent = Instant::now();
    assert!(a.keep_alive(lease).await.unwrap());
    wait_until_async("leader, heartbeat and member keys to expire", WAIT, || async {
        let view = observer.get_cluster().await.ok()?;
        (view.leader.is_none() && view.heartbeat.is_none() && view.member("pg-a").is_none()).then_some(())
    })
    .await
    .unwrap();
    assert!(
        sent.elapsed() >= Duration::from_secs(ttl),
        "expired before sent + ttl"
    );
    // etcd now says the lease does not exist (a normal answer, not an error).
    assert!(!a.keep_alive(lease).await.unwrap());
    // A member write on a gone lease fails (once our read saw the key gone, the write is not
    // skipped as unchanged); on a new lease it goes through.
    a.get_cluster().await.unwrap();
    assert!(a.touch_member(&member("running"), lease).await.is_err());
    let new = support::lease(&a, 30).await;
    a.touch_member(&member("running"), new).await.unwrap();
    assert_eq!(
        observer
            .get_cluster()
            .await
            .unwrap()
            .member("pg-a")
            .unwrap()
            .lease,
        new
    );
    // Revoking removes what it carries at once.
    a.revoke(new).await.unwrap();
    assert!(observer.get_cluster().await.unwrap().member("pg-a").is_none());
    a.revoke(new).await.unwrap();
}

/// A replica's liveness tracker needs every heartbeat with its revision, re-writes of the same
/// value included, and the key deletions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_reports_every_write_of_the_leader_and_heartbeat_keys() {
    let etcd = start_etcd(1);
    let a = client(&etcd, "pg-a", Duration::from_secs(5)).await;
    let b = client(&etcd, "pg-b", Duration::from_secs(5)).await;
    let mut keys = b.subscribe_lock_keys();
    let mut events = b.subscribe();
    expect_event(&mut events, DcsEvent::WatchRestarted).await;
    let (lease, term) = acquire(&a, Some(HB)).await;
    let hbs = [
        applied(a.heartbeat(term, lease, Some(HB)).await.unwrap()),
        applied(a.heartbeat(term, lease, Some(HB)).await.unwrap()),
    ];
    assert!(a.release(term).await.unwrap());
    let mut seen = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while seen.len() < 6 {
            seen.push(keys.recv().await.unwrap());
        }
    })
    .await;
    assert!(result.is_ok(), "only {seen:?}");
    let state = |value: Option<&str>, revision| KeyState {
        value: value.map(str::to_string),
        revision,
    };
    assert_eq!(seen[0], LockKeyEvent::Leader(state(Some("pg-a"), term)));
    assert_eq!(seen[1], LockKeyEvent::Heartbeat(state(Some(HB), term)));
    assert_eq!(seen[2], LockKeyEvent::Heartbeat(state(Some(HB), hbs[0])));
    assert_eq!(seen[3], LockKeyEvent::Heartbeat(state(Some(HB), hbs[1])));
    let deleted = seen[4..].to_vec();
    assert!(deleted.iter().all(|e| match e {
        LockKeyEvent::Leader(s) | LockKeyEvent::Heartbeat(s) => s.value.is_none() && s.revision > hbs[1],
    }));
}

async fn assert_lock_unavailable(a: &Etcd3Dcs, deadline: Duration) {
    assert_unavailable("grant", deadline, a.grant(Duration::from_secs(30))).await;
    assert_unavailable("keep_alive", deadline, a.keep_alive(1)).await;
    assert_unavailable("open_term", deadline, a.open_term(TermOpening::Acquire, 1, None)).await;
    assert_unavailable("heartbeat", deadline, a.heartbeat(1, 1, Some(HB))).await;
    assert_unavailable("release", deadline, a.release(1)).await;
    assert_unavailable("read_leader", deadline, a.read_leader()).await;
}

/// Lock operations are single attempts: against a stopped or hung etcd each fails within the
/// attempt timeout, so the leadership driver stays in charge of its own timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_operations_fail_within_one_attempt_when_etcd_is_gone_or_hung() {
    let mut etcd = start_etcd(1);
    let attempt = Duration::from_secs(1);
    let a = Etcd3Dcs::connect(pgvigil_dcs::EtcdOptions {
        endpoints: etcd.endpoints(),
        namespace: "/service".into(),
        scope: "batman".into(),
        member_name: "pg-a".into(),
        retry_timeout: Duration::from_secs(10),
        attempt_timeout: Some(attempt),
        ..Default::default()
    })
    .await
    .unwrap();
    acquire(&a, None).await;
    etcd.pause_member(0).unwrap();
    assert_lock_unavailable(&a, attempt).await;
    etcd.resume_member(0).unwrap();
    tokio::task::block_in_place(|| etcd.stop_member(0));
    assert_lock_unavailable(&a, attempt).await;
}
