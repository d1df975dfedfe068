//! etcd losing quorum on three hosts in network namespaces, with the checker running through
//! the router. Without `failsafe_mode` the primary goes read-only before its lease could
//! expire (as Patroni's does); with it, the primary keeps serving while every member accepts
//! its `POST /failsafe`, and goes read-only when one cannot be reached. When etcd is back the
//! cluster returns to normal.

mod faults_support;

use std::time::{Duration, Instant};

use faults_support::*;
use pgvigil_testkit::netcluster::Expect;
use pgvigil_testkit::{http, wait_until};

#[test]
fn etcd_quorum_loss_without_failsafe_makes_the_primary_read_only_until_etcd_returns() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (mut cluster, leader, checker) = start(options(""));
    let ttl = Duration::from_secs(cluster.options.ttl);

    // Two of three etcd members stop (the leader's own member keeps running, alone).
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    checker.mark("etcd lost quorum");
    for &i in &others {
        cluster.stop_etcd(i);
    }
    let fenced = wait_until(
        "the primary to stop accepting writes",
        ttl + Duration::from_secs(30),
        || (cluster.psql(leader, "SELECT pg_is_in_recovery()").ok().as_deref() != Some("f")).then_some(()),
    );
    check!(cluster, fenced);
    for i in 0..3 {
        if let Ok(v) = cluster.psql(i, "SELECT pg_is_in_recovery()") {
            assert_eq!(v, "t", "{} accepts writes without etcd", cluster.nodes[i].name);
        }
    }

    checker.mark("etcd quorum restored");
    for &i in &others {
        check!(cluster, cluster.spawn_etcd_member(i));
    }
    for &i in &others {
        check!(cluster, cluster.start_etcd(i));
    }
    check!(cluster, cluster.wait_healthy(HEALTHY));
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(90)));
    let report = checker.finish();
    check!(cluster, cluster.verify(&report, Expect::default()));
    // No write was acknowledged while etcd had no quorum (beyond the fencing margin).
    let lost_at = report.mark("etcd lost quorum").unwrap();
    let back_at = report.mark("etcd quorum restored").unwrap();
    let during = report
        .acks
        .iter()
        .filter(|a| a.sent > lost_at + ttl && a.acked < back_at)
        .count();
    assert_eq!(
        during, 0,
        "writes were acknowledged after the lease must have expired"
    );
}

#[test]
fn etcd_quorum_loss_with_failsafe_keeps_the_primary_while_every_member_answers() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (mut cluster, leader, checker) = start(options("    failsafe_mode: true\n"));
    let ttl = Duration::from_secs(cluster.options.ttl);
    // The leader publishes the failsafe key: every member.
    let published = wait_until("the failsafe key", Duration::from_secs(30), || {
        let r = http::get_from(cluster.nodes[leader].api_addr(), "/failsafe").ok()?;
        let doc = r.json().ok()?;
        (r.status == 200 && doc.as_object()?.len() == 3).then_some(())
    });
    check!(cluster, published);

    // etcd loses quorum; the primary asks the replicas over REST and keeps running, for longer
    // than its lease could have lasted.
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    checker.mark("etcd lost quorum (failsafe on)");
    for &i in &others {
        cluster.stop_etcd(i);
    }
    let acked_before = checker.acked();
    let until = Instant::now() + ttl + Duration::from_secs(10);
    while Instant::now() < until {
        let primary = cluster.psql(leader, "SELECT pg_is_in_recovery()").ok();
        assert_eq!(
            primary.as_deref(),
            Some("f"),
            "the primary stopped although every member answers\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        checker.acked() > acked_before + 100,
        "writes stopped during the etcd outage"
    );
    let status = check!(
        cluster,
        http::get_from(cluster.nodes[leader].api_addr(), "/patroni")
    );
    assert!(
        status.body.contains("\"failsafe_mode_is_active\":true"),
        "{}",
        status.body
    );

    // A replica becomes unreachable too: the primary can no longer confirm and goes read-only.
    let cut = others[0];
    checker.mark("a replica cut off: failsafe cannot confirm");
    check!(cluster, cluster.isolate(cut));
    let fenced = wait_until(
        "the primary to stop accepting writes",
        ttl + Duration::from_secs(30),
        || (cluster.psql(leader, "SELECT pg_is_in_recovery()").ok().as_deref() != Some("f")).then_some(()),
    );
    check!(cluster, fenced);

    // Everything comes back: the cluster returns to normal.
    checker.mark("partition healed, etcd restarted");
    check!(cluster, cluster.heal(cut));
    for &i in &others {
        check!(cluster, cluster.spawn_etcd_member(i));
    }
    for &i in &others {
        check!(cluster, cluster.start_etcd(i));
    }
    check!(cluster, cluster.wait_healthy(HEALTHY));
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(90)));
    let report = checker.finish();
    check!(cluster, cluster.verify(&report, Expect::default()));
}
