//! Crash recovery with the values as a Patroni user writes them (`docs/patroni-compat.md` §3.3,
//! §3.7, §4.7), on a real cluster: `master_start_timeout: 0` (the legacy name) makes a leader whose
//! postmaster was killed fail over at once instead of restarting in place, and the member keys
//! keep tags as written, both halves of a contradiction included.

use std::process::Command;
use std::time::{Duration, Instant};

use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::wait_until;
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(180);

/// The member key of `name` as stored in etcd.
fn member_key(cluster: &TestCluster, name: &str) -> Value {
    let out = Command::new("etcdctl")
        .arg(format!("--endpoints={}", cluster.etcd.endpoints().join(",")))
        .args(["get", "--print-value-only"])
        .arg(format!("/service/{}/members/{name}", cluster.scope))
        .output()
        .expect("etcdctl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "member key of {name}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn killed_leader_postmaster_with_master_start_timeout_0_fails_over_at_once_and_tags_stay_as_written() {
    let options = ClusterOptions {
        extra_dcs: "    master_start_timeout: 0\n".into(),
        extra_node_yaml: vec![
            "tags:\n  failover_priority: '1'\n".into(),
            "tags:\n  nofailover: true\n  failover_priority: '2'\n".into(),
            String::new(),
        ],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let old = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    assert_ne!(old, 1, "a nofailover member bootstrapped the cluster");

    // Tags as written: a quoted priority stays a string; a contradiction keeps both, and the
    // agent says which one wins.
    let tags = |i: usize| member_key(&cluster, &cluster.nodes[i].name)["tags"].clone();
    assert_eq!(tags(0), json!({"failover_priority": "1"}));
    assert_eq!(tags(1), json!({"nofailover": true, "failover_priority": "2"}));
    let log = std::fs::read_to_string(&cluster.nodes[1].log).unwrap();
    assert!(
        log.contains("conflicting nofailover: true and failover_priority: 2; nofailover wins"),
        "{log}"
    );

    // The leader's postmaster dies: the lock goes at once to a member that can take over.
    let killed = Instant::now();
    cluster.kill_postgres(old).unwrap();
    let new = wait_until("another member to lead", Duration::from_secs(60), || {
        cluster.leader().filter(|&l| l != old)
    });
    let new = new.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let took = killed.elapsed();
    eprintln!("failover after the leader's postmaster was killed: {took:?}");
    assert_ne!(new, 1, "the nofailover member was promoted");
    assert!(
        took < Duration::from_secs(cluster.options.ttl),
        "the failover took {took:?}, as long as waiting for the lease"
    );
    let log = std::fs::read_to_string(&cluster.nodes[old].log).unwrap();
    assert!(
        log.contains("stopped PostgreSQL to fail over after a crash"),
        "{log}"
    );

    // The old leader follows the new one.
    let leader = cluster.wait_healthy(HEALTHY).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(leader, new);
    assert_eq!(cluster.psql(old, "SELECT pg_is_in_recovery()").unwrap(), "t");
}

/// With nobody allowed to take over, `primary_start_timeout: 0` does not leave the cluster without
/// a primary: the crashed one is started again in place, keeping the lock.
#[test]
fn killed_leader_postmaster_without_a_possible_failover_restarts_in_place() {
    let replica_tags = "tags:\n  nofailover: true\n".to_string();
    let options = ClusterOptions {
        extra_dcs: "    primary_start_timeout: 0\n".into(),
        extra_node_yaml: vec![String::new(), replica_tags.clone(), replica_tags],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    assert_eq!(leader, 0, "only node1 may lead");
    let before = cluster.psql(leader, "SELECT pg_postmaster_start_time()").unwrap();

    cluster.kill_postgres(leader).unwrap();
    let back = wait_until(
        "the leader's PostgreSQL to run again",
        Duration::from_secs(60),
        || {
            let now = cluster.psql(leader, "SELECT pg_postmaster_start_time()").ok()?;
            (now != before).then_some(())
        },
    );
    back.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    assert_eq!(
        cluster.wait_healthy(HEALTHY).unwrap_or_else(|e| panic!("{e}")),
        leader
    );
    assert_eq!(cluster.psql(leader, "SELECT pg_is_in_recovery()").unwrap(), "f");
    let log = std::fs::read_to_string(&cluster.nodes[leader].log).unwrap();
    assert!(
        log.contains("starting primary after failure: no other member can take over"),
        "{log}"
    );
}
