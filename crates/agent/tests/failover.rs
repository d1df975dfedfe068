//! Failure handling on a real three-node cluster: crash of the leader (agent and PostgreSQL),
//! graceful hand-over, PostgreSQL crash on a live leader, full restart, and the lease fence
//! when etcd loses quorum.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgvigil_dcs::Dcs;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::{http, wait_until};

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(180);

fn start() -> (TestCluster, usize) {
    let cluster = TestCluster::start(AGENT.as_ref(), ClusterOptions::default()).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    cluster
        .psql(leader, "CREATE TABLE t(id int primary key)")
        .unwrap();
    (cluster, leader)
}

/// The timeline node `i` is on: a replica's walreceiver timeline, a primary's current WAL
/// file's. (`pg_control_checkpoint()` on a standby is its last restartpoint's timeline, which
/// stays behind a timeline switch until the next restartpoint, up to `checkpoint_timeout`.)
fn timeline(cluster: &TestCluster, i: usize) -> String {
    cluster
        .psql(
            i,
            "SELECT CASE WHEN pg_is_in_recovery() \
               THEN (SELECT received_tli FROM pg_stat_wal_receiver) \
               ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
        )
        .unwrap()
}

fn wait_row(cluster: &TestCluster, i: usize, id: i32) {
    let r = wait_until(
        &format!("row {id} on {}", cluster.nodes[i].name),
        Duration::from_secs(120),
        || {
            cluster
                .psql(i, &format!("SELECT id FROM t WHERE id = {id}"))
                .ok()
                .filter(|v| v == &id.to_string())
        },
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

#[test]
fn killed_leader_is_replaced_and_rejoins_as_replica() {
    let (mut cluster, old) = start();
    cluster.psql(old, "INSERT INTO t VALUES (1)").unwrap();
    for i in (0..3).filter(|&i| i != old) {
        wait_row(&cluster, i, 1);
    }

    // The leader host "dies": agent and PostgreSQL get SIGKILL, nothing is released.
    cluster.signal_agent(old, Signal::SIGKILL).unwrap();
    cluster.kill_postgres(old).unwrap();
    let killed_at = Instant::now();
    let new = cluster.wait_new_leader(old);
    eprintln!(
        "new leader {} after {:?}",
        cluster.nodes[new].name,
        killed_at.elapsed()
    );

    // Writes resume on the new leader and reach the surviving replica.
    cluster.psql(new, "INSERT INTO t VALUES (2)").unwrap();
    let survivor = (0..3).find(|&i| i != old && i != new).unwrap();
    wait_row(&cluster, survivor, 2);
    assert_eq!(cluster.psql(new, "SELECT count(*) FROM t").unwrap(), "2");

    // The killed node comes back as a replica of the new leader, on its timeline.
    cluster.start_agent(old).unwrap();
    wait_row(&cluster, old, 2);
    let healthy_leader = cluster.wait_healthy(HEALTHY).unwrap();
    assert_eq!(healthy_leader, new);
    assert_eq!(cluster.psql(old, "SELECT pg_is_in_recovery()").unwrap(), "t");
    cluster.psql(new, "INSERT INTO t VALUES (3)").unwrap();
    wait_row(&cluster, old, 3);
    assert_eq!(timeline(&cluster, old), timeline(&cluster, new));
}

#[test]
fn sigterm_on_leader_hands_over_then_rejoins() {
    let (mut cluster, old) = start();
    cluster.psql(old, "INSERT INTO t VALUES (1)").unwrap();
    let stopped_at = Instant::now();
    cluster.signal_agent(old, Signal::SIGTERM).unwrap();
    // A graceful stop stops PostgreSQL and deletes the leader key before the agent exits, so
    // nobody has to wait for the lease to expire.
    assert!(
        cluster.nodes[old].postmaster_pid().is_none(),
        "PostgreSQL still runs after SIGTERM"
    );
    let old_name = cluster.nodes[old].name.clone();
    let leader_key = cluster.with_operator_dcs(async |dcs| dcs.get_cluster().await.unwrap().leader);
    assert!(
        leader_key.as_ref().is_none_or(|l| l.name != old_name),
        "the stopped leader still holds the lock: {leader_key:?}"
    );
    let new = cluster.wait_new_leader(old);
    eprintln!("hand-over took {:?}", stopped_at.elapsed());
    wait_row(&cluster, new, 1);
    cluster.psql(new, "INSERT INTO t VALUES (2)").unwrap();
    cluster.start_agent(old).unwrap();
    wait_row(&cluster, old, 2);
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), new);
}

#[test]
fn postgres_crash_on_leader_is_restarted_in_place() {
    let (cluster, leader) = start();
    let tl = timeline(&cluster, leader);
    let old_pid = cluster.nodes[leader].postmaster_pid().unwrap();
    cluster.kill_postgres(leader).unwrap();
    let r = wait_until(
        "PostgreSQL restarted on the leader",
        Duration::from_secs(90),
        || {
            let pid = cluster.nodes[leader].postmaster_pid()?;
            (pid != old_pid && cluster.psql(leader, "SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
        },
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    // Same leader, same timeline: no failover happened.
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), leader);
    assert_eq!(timeline(&cluster, leader), tl);
    cluster.psql(leader, "INSERT INTO t VALUES (7)").unwrap();
}

#[test]
fn full_restart_keeps_data_and_does_not_bootstrap_again() {
    let (mut cluster, leader) = start();
    cluster
        .psql(leader, "INSERT INTO t SELECT generate_series(1, 100)")
        .unwrap();
    for i in (0..3).filter(|&i| i != leader) {
        wait_row(&cluster, i, 100);
    }
    let sysid = cluster
        .psql(leader, "SELECT system_identifier FROM pg_control_system()")
        .unwrap();
    for i in 0..3 {
        cluster.signal_agent(i, Signal::SIGTERM).unwrap();
        assert!(cluster.nodes[i].postmaster_pid().is_none());
    }
    for i in 0..3 {
        cluster.start_agent(i).unwrap();
    }
    let leader = cluster.wait_healthy(HEALTHY).unwrap();
    for i in 0..3 {
        assert_eq!(cluster.psql(i, "SELECT count(*) FROM t").unwrap(), "100");
        assert_eq!(
            cluster
                .psql(i, "SELECT system_identifier FROM pg_control_system()")
                .unwrap(),
            sysid
        );
    }
    let bootstraps: usize = cluster
        .nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap_or_default()
                .matches("initialized a new cluster")
                .count()
        })
        .sum();
    assert_eq!(bootstraps, 1);
    cluster.psql(leader, "INSERT INTO t VALUES (101)").unwrap();
}

#[test]
fn leader_stops_accepting_writes_when_etcd_loses_quorum() {
    let (mut cluster, leader) = start();
    // Two of three etcd members down: no lease can be renewed anywhere.
    cluster.etcd.stop_member(1);
    cluster.etcd.stop_member(2);
    let cut_at = Instant::now();
    let ttl = Duration::from_secs(cluster.options.ttl);
    let r = wait_until(
        "the leader to stop accepting writes",
        ttl + Duration::from_secs(30),
        || match cluster.psql(leader, "SELECT pg_is_in_recovery()") {
            Ok(v) if v == "f" => None,
            _ => Some(()),
        },
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let fenced_after = cut_at.elapsed();
    eprintln!("primary stopped accepting writes {fenced_after:?} after etcd lost quorum");
    // Safety: before the lease could have expired (renewed at most `ttl` ago).
    assert!(
        fenced_after < ttl,
        "fenced after {fenced_after:?}, not before the {ttl:?} lease expiry"
    );
    // No node is writable while etcd is down.
    for i in 0..3 {
        if let Ok(v) = cluster.psql(i, "SELECT pg_is_in_recovery()") {
            assert_eq!(v, "t", "{} accepts writes without etcd", cluster.nodes[i].name);
        }
    }
    // etcd comes back: the cluster elects a leader again and writes work.
    cluster.etcd.start_member(1).unwrap();
    cluster.etcd.start_member(2).unwrap();
    // The member keys still describe the fenced leader as a running primary until it has
    // restarted PostgreSQL (its lease outlived the outage), so "healthy" in etcd is not yet
    // "writable": wait for a write to succeed on the leader.
    let leader = wait_until("a writable leader after etcd returns", HEALTHY, || {
        let leader = cluster.wait_healthy(Duration::from_secs(5)).ok()?;
        cluster.psql(leader, "INSERT INTO t VALUES (42)").ok()?;
        Some(leader)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    assert_eq!(
        http::get(cluster.nodes[leader].api_port, "/primary")
            .unwrap()
            .status,
        200
    );
}
