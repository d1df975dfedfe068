//! Zero data loss with synchronous replication: every acknowledged commit survives repeated
//! SIGKILLs of the leader, in classic (`on`) and `quorum` modes; strict mode blocks writes
//! instead of committing without a standby.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster, psql_at};
use pgvigil_testkit::load::WriteLoad;
use pgvigil_testkit::wait_until;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(180);

fn start(dcs: &str) -> (TestCluster, usize) {
    let options = ClusterOptions {
        extra_dcs: dcs.to_string(),
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    cluster
        .psql(leader, "CREATE TABLE acked(id bigint primary key)")
        .unwrap();
    (cluster, leader)
}

/// Waits until the sync key names `n` standbys, i.e. the leader really waits for them.
fn wait_sync_standbys(cluster: &TestCluster, n: usize) {
    let r = wait_until(
        &format!("{n} synchronous standbys"),
        Duration::from_secs(90),
        || {
            let doc = cluster.cluster_doc()?;
            let members = doc.get("members")?.as_array()?;
            let sync = members
                .iter()
                .filter(|m| matches!(m["role"].as_str(), Some("sync_standby" | "quorum_standby")))
                .count();
            (sync >= n).then_some(())
        },
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

/// Kills the leader three times under a write load, the second time right after the first
/// failover (before the killed node is back), and counts acknowledged writes missing on the
/// new leader each time: there must be none.
fn no_acknowledged_write_lost(mode: &str, sync_count: usize) {
    let (mut cluster, mut leader) = start(&format!("    synchronous_mode: {mode}\n"));
    wait_sync_standbys(&cluster, sync_count);
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.pg_port).collect();
    let load = WriteLoad::start(ports, "acked", Duration::from_millis(5));
    wait_until("writes flowing", Duration::from_secs(30), || {
        (load.acked_count() > 50).then_some(())
    })
    .unwrap();

    // First kill, then a second one during the aftermath (one node still down).
    cluster.kill_node(leader);
    let first_dead = leader;
    leader = cluster.wait_new_leader(first_dead);
    let acked_now = load.acked_count();
    wait_until("writes resume", Duration::from_secs(60), || {
        (load.acked_count() > acked_now + 20).then_some(())
    })
    .unwrap();
    // The aftermath: the first victim is still down, and the new leader has just confirmed its
    // remaining standby (before that, nobody may promote: writes acknowledged in the gap exist
    // only on the leader, and the rules keep the cluster unavailable rather than lose them).
    wait_sync_standbys(&cluster, 1);
    let second_dead = leader;
    cluster.kill_node(second_dead);
    leader = cluster.wait_new_leader(second_dead);
    let acked_now = load.acked_count();
    wait_until("writes resume", Duration::from_secs(60), || {
        (load.acked_count() > acked_now + 20).then_some(())
    })
    .unwrap();
    let lost = WriteLoad::lost_on(&load.finish(), cluster.nodes[leader].pg_port, "acked").unwrap();
    assert!(
        lost.is_empty(),
        "{mode}: acknowledged writes lost after two kills: {lost:?}\n{}",
        cluster.diagnostics()
    );

    // Both come back, the cluster heals, and a third kill loses nothing either.
    cluster.start_agent(first_dead).unwrap();
    cluster.start_agent(second_dead).unwrap();
    let leader = cluster.wait_healthy(HEALTHY).unwrap();
    wait_sync_standbys(&cluster, sync_count);
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.pg_port).collect();
    let load = WriteLoad::start(ports, "acked2", Duration::from_millis(5));
    cluster
        .psql(leader, "CREATE TABLE IF NOT EXISTS acked2(id bigint primary key)")
        .unwrap();
    wait_until("writes flowing", Duration::from_secs(30), || {
        (load.acked_count() > 50).then_some(())
    })
    .unwrap();
    cluster.kill_node(leader);
    let new = cluster.wait_new_leader(leader);
    let acked_now = load.acked_count();
    wait_until("writes resume", Duration::from_secs(60), || {
        (load.acked_count() > acked_now + 20).then_some(())
    })
    .unwrap();
    let lost = WriteLoad::lost_on(&load.finish(), cluster.nodes[new].pg_port, "acked2").unwrap();
    assert!(
        lost.is_empty(),
        "{mode}: acknowledged writes lost after the third kill: {lost:?}"
    );
}

#[test]
fn synchronous_mode_on_loses_no_acknowledged_write() {
    no_acknowledged_write_lost("on", 1);
}

#[test]
fn quorum_mode_loses_no_acknowledged_write() {
    no_acknowledged_write_lost("quorum", 2);
}

#[test]
fn strict_mode_blocks_writes_without_a_standby() {
    let (mut cluster, leader) = start("    synchronous_mode: on\n    synchronous_mode_strict: true\n");
    wait_sync_standbys(&cluster, 1);
    let replicas: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &r in &replicas {
        cluster.signal_agent(r, Signal::SIGTERM).unwrap();
    }
    // A write now waits for a standby that is not there: it must not commit.
    let port = cluster.nodes[leader].pg_port;
    let writer = std::thread::spawn(move || psql_at(port, "INSERT INTO acked VALUES (1)"));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !writer.is_finished(),
        "the write returned without a synchronous standby: {:?}",
        started.elapsed()
    );
    assert_eq!(
        cluster.psql(leader, "SELECT count(*) FROM acked").unwrap(),
        "0",
        "the row is visible before any standby has it"
    );
    // A standby returns: the waiting commit completes.
    cluster.start_agent(replicas[0]).unwrap();
    let done = wait_until("the blocked write to commit", Duration::from_secs(120), || {
        writer.is_finished().then_some(())
    });
    done.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    writer.join().unwrap().unwrap();
    assert_eq!(cluster.psql(leader, "SELECT count(*) FROM acked").unwrap(), "1");
}
