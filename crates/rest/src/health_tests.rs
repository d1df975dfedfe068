//! Table-driven tests of the health-check rules (`docs/patroni-compat.md` §2.3) and probes (§2.4).

use std::time::{Duration, Instant};

use pgvigil_api::ClusterView;
use pgvigil_api::rest::XlogInfo;
use serde_json::json;

use super::*;

const MB: u64 = 1024 * 1024;

fn view(optime: u64) -> ClusterView {
    let mut view = ClusterView::default();
    view.status.optime = optime;
    view
}

/// A streaming replica, 10 MB behind the DCS optime, async, not the leader.
fn replica(now: Instant) -> NodeSnapshot {
    let mut s = NodeSnapshot::initial("batman", "pg1");
    s.status.state = "running".into();
    s.status.role = "replica".into();
    s.status.replication_state = Some("streaming".into());
    s.status.xlog = Some(XlogInfo {
        received_location: Some(20 * MB),
        replayed_location: Some(10 * MB),
        ..Default::default()
    });
    s.status.cluster_unlocked = None;
    s.cluster = Some(view(20 * MB));
    s.next_run = now;
    s
}

fn primary(now: Instant) -> NodeSnapshot {
    let mut s = replica(now);
    s.status.role = "primary".into();
    s.status.replication_state = None;
    s.status.xlog = Some(XlogInfo {
        location: Some(20 * MB),
        ..Default::default()
    });
    s.leader_until = Some(now + Duration::from_secs(20));
    s
}

fn standby_leader(now: Instant) -> NodeSnapshot {
    let mut s = replica(now);
    s.status.role = "standby_leader".into();
    s.standby_cluster = true;
    s.leader_until = Some(now + Duration::from_secs(20));
    s
}

fn q(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.replace('+', " "))
        })
        .collect()
}

/// `"/path?query"` → code, against one snapshot.
fn check(label: &str, snap: &NodeSnapshot, now: Instant, cases: &[(&str, u16)]) {
    for (url, expected) in cases {
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let got = health_code(path, &q(query), snap, now);
        assert_eq!(got, *expected, "{label}: GET {url}");
    }
}

#[test]
fn path_table_on_a_primary() {
    let now = Instant::now();
    check(
        "primary",
        &primary(now),
        now,
        &[
            ("/", 200),
            ("/primary", 200),
            ("/master", 200),
            ("/read-write", 200),
            ("/leader", 200),
            ("/standby-leader", 503),
            ("/standby_leader", 503),
            ("/replica", 503),
            ("/read-only", 200),
            ("/health", 200),
            ("/sync", 503),
            ("/synchronous", 503),
            ("/async", 503),
            ("/asynchronous", 503),
            ("/quorum", 503),
            ("/read-only-sync", 200),
            ("/read-only-synchronous", 200),
            ("/read-only-quorum", 200),
            ("/unknown", 503),
            ("/patroni", 503),
            // substring matching, first rule wins
            ("/health/primary", 200),
            ("/x/leader/y", 200),
        ],
    );
}

#[test]
fn path_table_on_replicas() {
    let now = Instant::now();
    let async_replica = replica(now);
    check(
        "async replica",
        &async_replica,
        now,
        &[
            ("/", 503),
            ("/primary", 503),
            ("/master", 503),
            ("/read-write", 503),
            ("/leader", 503),
            ("/standby-leader", 503),
            ("/replica", 200),
            ("/foo/replica", 200),
            ("/read-only", 200),
            ("/health", 200),
            ("/sync", 503),
            ("/synchronous", 503),
            ("/async", 200),
            ("/asynchronous", 200),
            ("/quorum", 503),
            ("/read-only-sync", 503),
            ("/read-only-quorum", 503),
            ("/async/", 503),
            ("/replicaleader", 503),
        ],
    );

    let mut sync = replica(now);
    sync.status.sync_standby = Some(true);
    check(
        "sync replica",
        &sync,
        now,
        &[
            ("/sync", 200),
            ("/synchronous", 200),
            ("/async", 503),
            ("/quorum", 503),
            ("/read-only-sync", 200),
            ("/read-only-synchronous", 200),
            ("/read-only-quorum", 503),
            ("/sync?lag=1MB", 503),
        ],
    );

    let mut quorum = replica(now);
    quorum.status.quorum_standby = Some(true);
    check(
        "quorum replica",
        &quorum,
        now,
        &[
            ("/quorum", 200),
            ("/read-only-quorum", 200),
            ("/sync", 503),
            ("/async", 503),
            ("/read-only-sync", 503),
        ],
    );

    // Without a (fresh) DCS view the exact-path rules are not evaluated.
    let mut stale = sync.clone();
    stale.cluster = None;
    stale.wal_receiver_latest_end_lsn = Some(20 * MB);
    check(
        "stale sync replica",
        &stale,
        now,
        &[
            ("/sync", 503),
            ("/async", 503),
            ("/read-only-sync", 503),
            ("/replica", 200),
            ("/replica?lag=1MB", 503),
            ("/read-only", 200),
            ("/health", 200),
        ],
    );

    let mut starting = replica(now);
    starting.status.state = "starting".into();
    check(
        "starting replica",
        &starting,
        now,
        &[
            ("/replica", 503),
            ("/read-only", 503),
            ("/health", 503),
            ("/async", 503),
        ],
    );

    let mut noload = replica(now);
    noload.tags.insert("noloadbalance".into(), json!(true));
    check(
        "noloadbalance replica",
        &noload,
        now,
        &[
            ("/replica", 503),
            ("/read-only", 503),
            ("/async", 503),
            ("/health", 200),
        ],
    );
    let mut noload_primary = primary(now);
    noload_primary.tags.insert("noloadbalance".into(), json!(true));
    check(
        "noloadbalance primary",
        &noload_primary,
        now,
        &[("/read-only", 200)],
    );
}

#[test]
fn leader_primary_standby_leader_derivations() {
    let now = Instant::now();
    check(
        "standby leader",
        &standby_leader(now),
        now,
        &[
            ("/standby-leader", 200),
            ("/standby_leader", 200),
            ("/leader", 200),
            ("/primary", 503),
            ("/", 503),
            ("/replica", 503),
            ("/read-only", 200),
            ("/read-only-sync", 200),
            ("/read-only-quorum", 200),
        ],
    );

    // The lock holder of a standby cluster still reporting `replica`.
    let mut s = standby_leader(now);
    s.status.role = "replica".into();
    check(
        "standby cluster leader (replica role)",
        &s,
        now,
        &[("/standby-leader", 200), ("/replica", 503)],
    );

    // The lease timer ran out: nothing leader-ish answers 200.
    let mut expired = primary(now);
    expired.leader_until = Some(now - Duration::from_millis(1));
    check(
        "expired leader",
        &expired,
        now,
        &[("/primary", 503), ("/leader", 503), ("/read-only", 503)],
    );
    expired.leader_until = None;
    check(
        "never leader",
        &expired,
        now,
        &[("/primary", 503), ("/health", 200)],
    );

    // Paused with no DCS view: trust the local role.
    let mut paused = primary(now);
    paused.leader_until = None;
    paused.cluster = None;
    paused.status.pause = Some(true);
    check(
        "paused primary, DCS stale",
        &paused,
        now,
        &[
            ("/primary", 200),
            ("/leader", 200),
            ("/standby-leader", 503),
            ("/read-only", 200),
        ],
    );
    paused.status.role = "standby_leader".into();
    check(
        "paused standby leader, DCS stale",
        &paused,
        now,
        &[("/primary", 503), ("/leader", 200), ("/standby-leader", 200)],
    );
    paused.status.role = "replica".into();
    check(
        "paused replica, DCS stale",
        &paused,
        now,
        &[("/primary", 503), ("/leader", 503), ("/replica", 200)],
    );

    // Paused but with a view: the lease timer decides.
    let mut paused_with_view = primary(now);
    paused_with_view.leader_until = None;
    paused_with_view.status.pause = Some(true);
    check(
        "paused primary with view",
        &paused_with_view,
        now,
        &[("/primary", 503)],
    );

    // Not paused and no view: the lease timer decides.
    let mut stale_leader = primary(now);
    stale_leader.cluster = None;
    check(
        "stale leader",
        &stale_leader,
        now,
        &[("/primary", 200), ("/sync", 503)],
    );
}

#[test]
fn lag_units_and_bad_values() {
    let now = Instant::now();
    let snap = replica(now); // 10 MB behind
    check(
        "lag",
        &snap,
        now,
        &[
            ("/replica?lag=10MB", 200),
            ("/replica?lag=9MB", 503),
            ("/replica?lag=10485760", 200),
            ("/replica?lag=10485759", 503),
            ("/replica?lag=10240kB", 200),
            ("/replica?lag=10239kB", 503),
            ("/replica?lag=1GB", 200),
            ("/replica?lag=1TB", 200),
            ("/replica?lag=1.5MB", 503),
            ("/replica?lag=0xA00000", 200),
            ("/replica?lag=0", 503),
            ("/replica?lag=-1", 503),
            // unparsable or blank → unlimited, like Patroni
            ("/replica?lag=abc", 200),
            ("/replica?lag=10mb", 200),
            ("/replica?lag=", 200),
            ("/replica?lag=&lag=1MB", 503),
            ("/async?lag=1MB", 503),
            ("/read-only?lag=1MB", 503),
            ("/health?lag=1MB", 200),
        ],
    );
    // The WAL receiver's latest_end_lsn can be ahead of the DCS optime.
    let mut ahead = replica(now);
    ahead.cluster = Some(view(10 * MB));
    check("no lag", &ahead, now, &[("/replica?lag=0", 200)]);
    ahead.wal_receiver_latest_end_lsn = Some(12 * MB);
    check(
        "receiver ahead",
        &ahead,
        now,
        &[("/replica?lag=1MB", 503), ("/replica?lag=2MB", 200)],
    );
    // Unknown leader position: never lagging.
    let mut unknown = replica(now);
    unknown.cluster = Some(view(0));
    check("unknown optime", &unknown, now, &[("/replica?lag=0", 200)]);
}

#[test]
fn replication_state_filter() {
    let now = Instant::now();
    let mut snap = replica(now);
    check(
        "streaming",
        &snap,
        now,
        &[
            ("/replica?replication_state=streaming", 200),
            ("/replica?replication_state=in+archive+recovery", 503),
            ("/replica?replication_state=", 200),
        ],
    );
    snap.status.replication_state = Some("in archive recovery".into());
    check(
        "archive",
        &snap,
        now,
        &[
            ("/replica?replication_state=in+archive+recovery", 200),
            ("/replica?replication_state=streaming", 503),
            ("/async?replication_state=streaming", 503),
        ],
    );
}

#[test]
fn tag_filters() {
    let now = Instant::now();
    let mut snap = replica(now);
    snap.tags =
        serde_json::from_value(json!({"dc": "east", "clonefrom": true, "weight": 1.4, "n": 1, "nil": null}))
            .unwrap();
    check(
        "replica tags",
        &snap,
        now,
        &[
            ("/replica?tag_dc=east", 200),
            ("/replica?tag_dc=west", 503),
            ("/replica?tag_dc=East", 503),
            ("/replica?tag_missing=x", 503),
            ("/replica?tag_nil=null", 503),
            ("/replica?tag_clonefrom=true", 200),
            ("/replica?tag_clonefrom=True", 503),
            ("/replica?tag_weight=1.4", 200),
            ("/replica?tag_n=1", 200),
            ("/replica?tag_dc=", 200),
            ("/replica?tag_dc=east&tag_dc=west", 200),
            ("/replica?tag_dc=east&tag_n=2", 503),
            ("/read-only?tag_dc=west", 503),
            ("/health?tag_dc=west", 503),
            ("/async?tag_dc=west", 503),
            ("/async?tag_dc=east", 200),
            // tags never turn a 503 into a 200
            ("/primary?tag_dc=east", 503),
        ],
    );
    let mut p = primary(now);
    p.tags = snap.tags.clone();
    check(
        "primary tags",
        &p,
        now,
        &[
            ("/primary?tag_dc=west", 200),
            ("/leader?tag_dc=west", 200),
            ("/read-only?tag_dc=west", 503),
            ("/read-only-sync?tag_dc=west", 503),
            ("/read-only-sync?tag_dc=east", 200),
        ],
    );
    check(
        "standby leader ignores tags",
        &standby_leader(now),
        now,
        &[("/standby-leader?tag_x=y", 200)],
    );
}

#[test]
fn liveness() {
    let now = Instant::now();
    let r = replica(now); // next_run = now, ttl 30 → threshold 60 s
    check(
        "replica",
        &r,
        now + Duration::from_secs(59),
        &[("/liveness", 200)],
    );
    check(
        "replica",
        &r,
        now + Duration::from_secs(61),
        &[("/liveness", 503)],
    );
    let p = primary(now); // running primary → threshold 30 s
    check(
        "primary",
        &p,
        now + Duration::from_secs(29),
        &[("/liveness", 200)],
    );
    check(
        "primary",
        &p,
        now + Duration::from_secs(31),
        &[("/liveness", 503)],
    );
    let mut paused = p.clone();
    paused.paused = true;
    check(
        "paused",
        &paused,
        now + Duration::from_secs(3600),
        &[("/liveness", 200)],
    );
    let mut stopped_primary = p.clone();
    stopped_primary.status.state = "stopped".into();
    check(
        "stopped primary",
        &stopped_primary,
        now + Duration::from_secs(31),
        &[("/liveness", 200)],
    );
}

#[test]
fn readiness() {
    let now = Instant::now();
    let mut leader = primary(now);
    leader.status.state = "stopped".into();
    check("leader", &leader, now, &[("/readiness", 200)]);

    let mut r = replica(now); // apply lag 10 MB, write lag 0
    r.maximum_lag_on_failover = MB;
    check(
        "replica",
        &r,
        now,
        &[
            ("/readiness", 503),
            ("/readiness?mode=write", 200),
            ("/readiness?mode=apply", 503),
            ("/readiness?lag=10MB", 200),
            ("/readiness?lag=10485759", 503),
            ("/readiness?lag=abc", 503),
        ],
    );
    r.maximum_lag_on_failover = 10 * MB;
    check(
        "replica, generous maximum",
        &r,
        now,
        &[("/readiness", 200), ("/readiness?lag=abc", 200)],
    );

    let mut archive = r.clone();
    archive.status.replication_state = Some("in archive recovery".into());
    check("archive replica", &archive, now, &[("/readiness", 503)]);
    let mut stopped = r.clone();
    stopped.status.state = "stopped".into();
    check("stopped replica", &stopped, now, &[("/readiness", 503)]);

    let mut stale = r.clone();
    stale.cluster = None;
    check("stale, no receiver", &stale, now, &[("/readiness", 503)]);
    stale.failsafe_active = true;
    check("stale, failsafe", &stale, now, &[("/readiness", 200)]);
    stale.failsafe_active = false;
    stale.wal_receiver_latest_end_lsn = Some(30 * MB);
    check(
        "stale, receiver ahead",
        &stale,
        now,
        &[("/readiness", 503), ("/readiness?lag=20MB", 200)],
    );
    assert_eq!(
        readiness_failure(&[], &stale, now).as_deref(),
        Some("Replication apply lag 20971520 exceeds maximum allowable 10485760")
    );
}

#[test]
fn byte_sizes_like_patroni_parse_int() {
    let cases: &[(&str, Option<i128>)] = &[
        ("1", Some(1)),
        ("10MB", Some(10 * 1024 * 1024)),
        ("1kB", Some(1024)),
        ("1GB", Some(1 << 30)),
        ("1TB", Some(1 << 40)),
        ("100B", Some(100)),
        ("1.5MB", Some(1_572_864)),
        (".5kB", Some(512)),
        (" 5 MB ", Some(5 * 1024 * 1024)),
        ("0x10", Some(16)),
        ("010", Some(8)),
        ("0", Some(0)),
        ("-1", Some(-1)),
        ("+7", Some(7)),
        ("1e3", Some(1000)),
        ("2.5", Some(2)),
        ("3.5", Some(4)),
        ("0.0001TB", Some(0)),
        ("abc", None),
        ("", None),
        ("10mb", None),
        ("10 XB", None),
        ("1.MB", None),
        ("08", None),
        ("0x", None),
        ("-.5", None),
        ("1e999", None),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_bytes(text), *expected, "parse_bytes({text:?})");
    }
}

#[test]
fn query_helpers() {
    let query = q("lag=&lag=5&x=1");
    assert_eq!(query_first(&query, "lag"), Some("5"));
    assert_eq!(query_first(&query, "y"), None);
    assert_eq!(first_segment("/patroni/x"), "patroni");
    assert_eq!(first_segment("//cluster"), "cluster");
    assert_eq!(first_segment("/"), "");
}

/// A lock proof that says what the test set.
struct FixedProof(std::sync::Mutex<Option<Instant>>);

impl crate::snapshot::LockProof for FixedProof {
    fn held_until(&self) -> Option<Instant> {
        *self.0.lock().unwrap()
    }
}

#[test]
fn leadership_is_asked_of_the_live_proof_not_the_snapshot() {
    let now = Instant::now();
    let proof = std::sync::Arc::new(FixedProof(std::sync::Mutex::new(Some(
        now + Duration::from_secs(3),
    ))));
    // The snapshot is from an HA cycle long ago: its own deadline has passed, but heartbeats
    // kept the lock proven since. A healthy leader between two cycles stays the primary.
    let mut snap = primary(now);
    snap.leader_until = Some(now - Duration::from_secs(5));
    snap.live_lock = Some(crate::snapshot::LiveLock(proof.clone()));
    check(
        "proven since the snapshot",
        &snap,
        now,
        &[("/primary", 200), ("/leader", 200)],
    );
    // The proof ran out (etcd unreachable): 503 at once, even though the snapshot still says
    // leader until later.
    *proof.0.lock().unwrap() = Some(now - Duration::from_millis(1));
    snap.leader_until = Some(now + Duration::from_secs(20));
    check(
        "proof ran out",
        &snap,
        now,
        &[("/primary", 503), ("/leader", 503)],
    );
    *proof.0.lock().unwrap() = None;
    check(
        "lock gone",
        &snap,
        now,
        &[("/primary", 503), ("/read-write", 503)],
    );
}
