//! A mixed cluster: two pgvigil members and one real Patroni 4.1.5 member (the postgres user's
//! copy that `scripts/install-deps.sh` puts in /opt/pgvigil/patroni-agent), default timings.
//! With a Patroni member in the cluster no pgvigil leader promises the fast takeover, so a dead
//! leader is replaced when its lease expires, as Patroni does: a dead pgvigil leader is replaced
//! (by either kind), and a dead Patroni leader is replaced by a pgvigil member.

mod faults_support;

use std::path::Path;
use std::time::Duration;

use faults_support::*;
use pgvigil_testkit::netcluster::{AgentKind, Expect, NetCluster};
use pgvigil_testkit::{http, wait_until};

const PATRONI: &str = "/opt/pgvigil/patroni-agent/bin/patroni";
const PATRONI_HOST: usize = 2;

/// Hands leadership to `candidate` with a switchover through the leader's REST API.
fn switch_to(cluster: &NetCluster, candidate: usize) {
    let leader = check!(cluster, cluster.wait_healthy(HEALTHY));
    if leader == candidate {
        return;
    }
    let body = format!(
        r#"{{"leader":"{}","candidate":"{}"}}"#,
        cluster.nodes[leader].name, cluster.nodes[candidate].name
    );
    let api = cluster.nodes[leader].api_addr();
    let answer = http::request_within(
        api,
        "POST",
        "/switchover",
        Some(&body),
        None,
        Duration::from_secs(90),
    );
    check!(cluster, answer);
    let moved = wait_until("the switchover", FAILOVER, || {
        (cluster.leader()? == candidate).then_some(())
    });
    check!(cluster, moved);
    check!(cluster, cluster.wait_healthy(HEALTHY));
}

/// Kills the leader host and waits for a new leader; no member may have taken the key over.
fn leader_host_dies(
    cluster: &mut NetCluster,
    checker: &pgvigil_testkit::checker::Checker,
    what: &str,
) -> usize {
    let old = check!(cluster, cluster.wait_healthy(HEALTHY));
    checker.mark(what);
    check!(cluster, cluster.kill_host(old));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    for i in (0..3).filter(|&i| i != PATRONI_HOST) {
        assert!(
            !took_over(cluster, i),
            "{} took the key over although a Patroni member is in the cluster",
            cluster.nodes[i].name
        );
    }
    check!(cluster, checker.wait_for_acks(30, Duration::from_secs(60)));
    check!(cluster, cluster.restart_host(old));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    new
}

#[test]
fn a_mixed_cluster_fails_over_by_lease_expiry_in_both_directions() {
    if !can_run() {
        return;
    }
    if !Path::new(PATRONI).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{PATRONI} is missing: scripts/install-deps.sh installs it"
        );
        eprintln!("skipped: {PATRONI} is missing (scripts/install-deps.sh installs it)");
        return;
    }
    let _serial = serial();
    let mut options = defaults(false);
    options.agent_overrides = vec![(PATRONI_HOST, AgentKind::Patroni(PATRONI.into()))];
    let (mut cluster, _, checker) = start(options);

    // A pgvigil leader dies.
    switch_to(&cluster, 0);
    leader_host_dies(&mut cluster, &checker, "pgvigil leader host died");
    // The Patroni leader dies: a pgvigil member takes over once its lease expired.
    switch_to(&cluster, PATRONI_HOST);
    let new = leader_host_dies(&mut cluster, &checker, "Patroni leader host died");
    assert_ne!(new, PATRONI_HOST);

    let report = checker.finish();
    let expect = Expect {
        zero_loss: false,
        ..Expect::default()
    };
    check!(cluster, cluster.verify(&report, expect));
    for mark in ["pgvigil leader host died", "Patroni leader host died"] {
        eprintln!("write gap after \"{mark}\": {:?}", report.gap_after_mark(mark));
    }
}
