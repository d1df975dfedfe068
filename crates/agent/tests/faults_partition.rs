//! Network faults on three hosts in network namespaces, with the checker running through the
//! router: the leader host cut off from the other two; a replica host cut off and healed; delay
//! and loss on the leader's link. Every scenario ends with the checker's assertions. The first
//! runs with TLS on for PostgreSQL, the REST APIs and etcd.

mod faults_support;

use std::time::{Duration, Instant};

use faults_support::*;
use pgvigil_testkit::netcluster::{Expect, NetOptions};
use pgvigil_testkit::netns::Impairment;
use pgvigil_testkit::wait_until;

#[test]
fn isolated_leader_demotes_before_its_lease_expires_and_majority_elects() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    // With TLS everywhere (etcd client certificates, HTTPS REST with verify_client: required,
    // PostgreSQL hostssl ... clientcert=verify-ca): the failover, the old leader's rewind and
    // the rejoin all go through the TLS set-up.
    let (cluster, old, checker) = start(NetOptions {
        tls: true,
        ..options("")
    });

    // The leader host loses the other two (its etcd member is in the minority); the client
    // and the sampler still reach it, so a second primary would be seen.
    checker.mark("leader host cut off");
    check!(cluster, cluster.isolate(old));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));
    assert_not_primary(&cluster, old, "the cut-off leader still runs as a primary");
    // No tick with two primaries: the old one stopped before the new one was promoted.
    heal_and_verify(&cluster, checker, old, new);
}

/// The same cut-off with default timings and no synchronous replication: the member that
/// takes the key over (no lease expiry) accepts writes only after the old primary stopped.
#[test]
fn isolated_leader_without_synchronous_replication_stops_before_another_accepts_writes() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (cluster, old, checker) = start(defaults(false));
    checker.mark("leader host cut off");
    check!(cluster, cluster.isolate(old));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    assert!(
        took_over(&cluster, new),
        "{} took the key over from the silent leader",
        cluster.nodes[new].name
    );
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));
    assert_not_primary(&cluster, old, "the cut-off leader still runs as a primary");
    heal_and_verify(&cluster, checker, old, new);
}

#[test]
fn replica_cut_off_and_a_slow_lossy_leader_link_cause_no_failover() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (cluster, leader, checker) = start(options(""));
    let timeline = cluster
        .psql(leader, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap()[..8]
        .to_string();
    let ttl = Duration::from_secs(cluster.options.ttl);

    // A replica host cut off for longer than ttl: its member key expires; writes go on (a
    // synchronous standby that vanished is replaced or dropped); then it rejoins.
    let replica = a_replica(&cluster, leader);
    checker.mark("replica host cut off");
    check!(cluster, cluster.isolate(replica));
    let gone = wait_until(
        "the cut-off replica to leave /cluster",
        ttl + Duration::from_secs(30),
        || {
            let doc = cluster.cluster_doc()?;
            let members = doc.get("members")?.as_array()?;
            let name = cluster.nodes[replica].name.as_str();
            (!members
                .iter()
                .any(|m| m["name"] == name && m["state"] == "streaming"))
            .then_some(())
        },
    );
    check!(cluster, gone);
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));
    checker.mark("replica host healed");
    check!(cluster, cluster.heal(replica));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    assert_eq!(
        cluster.leader(),
        Some(leader),
        "a replica's partition moved the leader"
    );

    // 200 ms added to everything the leader sends, 2% of it lost, for two ttl periods.
    checker.mark("200 ms delay and 2% loss on the leader's link");
    let imp = Impairment {
        delay: Duration::from_millis(200),
        jitter: Duration::from_millis(20),
        loss: 0.02,
    };
    check!(cluster, cluster.impair(leader, imp));
    let until = Instant::now() + 2 * ttl;
    let acked_before = checker.acked();
    while Instant::now() < until {
        if let Some(l) = cluster.leader() {
            assert_eq!(
                l,
                leader,
                "false failover under latency\n{}",
                cluster.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        checker.acked() > acked_before,
        "no write acknowledged under latency"
    );
    check!(cluster, cluster.lab.clear_impairment(leader));
    checker.mark("link restored");
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));

    let report = checker.finish();
    let end = check!(cluster, cluster.verify(&report, Expect::default()));
    assert_eq!(end, leader, "the leader changed");
    let now = cluster
        .psql(leader, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap()[..8]
        .to_string();
    assert_eq!(now, timeline, "the timeline changed: a failover happened");
}
