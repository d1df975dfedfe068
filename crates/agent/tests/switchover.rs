//! Planned switchover, driven through the `failover` key exactly as the REST API and
//! patronictl write it: the leader hands over cleanly, the old leader follows without a rewind,
//! and no acknowledged write is lost.

use std::time::{Duration, Instant};

use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::load::WriteLoad;
use pgvigil_testkit::wait_until;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");

#[test]
fn switchover_hands_over_without_rewind_or_lost_writes() {
    let cluster = TestCluster::start(AGENT.as_ref(), ClusterOptions::default()).unwrap();
    let old = cluster.wait_healthy(Duration::from_secs(180)).unwrap();
    cluster
        .psql(old, "CREATE TABLE acked(id bigint primary key)")
        .unwrap();
    let candidate = (0..3).find(|&i| i != old).unwrap();

    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.pg_port).collect();
    let load = WriteLoad::start(ports, "acked", Duration::from_millis(20));
    wait_until("writes flowing", Duration::from_secs(30), || {
        (load.acked_count() > 20).then_some(())
    })
    .unwrap();

    let asked_at = Instant::now();
    cluster.request_switchover(&cluster.nodes[old].name, Some(&cluster.nodes[candidate].name));
    let r = wait_until("the candidate to lead", Duration::from_secs(60), || {
        (cluster.leader() == Some(candidate)
            && cluster.psql(candidate, "SELECT pg_is_in_recovery()").ok()? == "f")
            .then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    eprintln!("switchover took {:?}", asked_at.elapsed());
    let before = load.acked_count();
    wait_until(
        "writes to resume on the new leader",
        Duration::from_secs(30),
        || (load.acked_count() > before + 20).then_some(()),
    )
    .unwrap();

    // Every acknowledged write is on the new leader.
    let acked = load.finish();
    let lost = WriteLoad::lost_on(&acked, cluster.nodes[candidate].pg_port, "acked").unwrap();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // The old leader follows the new one on its timeline, without pg_rewind.
    let healthy = cluster.wait_healthy(Duration::from_secs(120)).unwrap();
    assert_eq!(healthy, candidate);
    assert_eq!(cluster.psql(old, "SELECT pg_is_in_recovery()").unwrap(), "t");
    let log = std::fs::read_to_string(&cluster.nodes[old].log).unwrap();
    assert!(
        !log.contains("running pg_rewind"),
        "the old leader was rewound:\n{}",
        cluster.diagnostics()
    );
    // The request was consumed.
    let doc = cluster.cluster_doc().unwrap();
    assert!(doc.get("scheduled_switchover").is_none());
}

#[test]
fn switchover_to_any_member_and_request_for_wrong_leader_is_ignored() {
    let cluster = TestCluster::start(AGENT.as_ref(), ClusterOptions::default()).unwrap();
    let old = cluster.wait_healthy(Duration::from_secs(180)).unwrap();
    // Naming a non-leader as the leader to demote: cleared, nothing happens.
    let other = (0..3).find(|&i| i != old).unwrap();
    cluster.request_switchover(&cluster.nodes[other].name, None);
    let cleared = wait_until("the bogus request to be cleared", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&cluster.nodes[old].log).ok()?;
        log.contains("clearing the request").then_some(())
    });
    cleared.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    assert_eq!(cluster.leader(), Some(old));
    // Without a candidate, some healthy replica takes over.
    cluster.request_switchover(&cluster.nodes[old].name, None);
    let r = wait_until("another member to lead", Duration::from_secs(60), || {
        cluster.leader().filter(|&l| l != old)
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    cluster.wait_healthy(Duration::from_secs(120)).unwrap();
}
