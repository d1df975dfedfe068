//! Shared by the `routing_*` tests: client routing on a real three-node cluster through both
//! routers, the real HAProxy (Debian `haproxy`, configured by `pgvigilctl haproxy-config`) and
//! `pgvigil router` (which follows etcd). Port "5000" must reach the primary, "5001" a replica.
//!
//! * [`routers`]: the two routers as processes owned by the test;
//! * [`clients`]: writes, reads, held connections and a looping writer through a router port;
//! * this file: the cluster set-up and the waits the tests share.
//!
//! Needs the workspace built (`cargo build --workspace`): `pgvigilctl` is found next to the test
//! binary.

#![allow(dead_code)]

pub mod clients;
pub mod routers;

use std::fs;
use std::time::{Duration, Instant};

use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::wait_until;

pub use self::clients::*;
pub use self::routers::*;

pub const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
pub const HEALTHY: Duration = Duration::from_secs(180);
pub const HAPROXY: &str = "/usr/sbin/haproxy";

pub fn start_cluster(options: ClusterOptions) -> (TestCluster, usize) {
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    cluster
        .psql(leader, "CREATE TABLE t(id serial PRIMARY KEY, port int)")
        .unwrap();
    (cluster, leader)
}

pub fn node_config(cluster: &TestCluster) -> String {
    fs::read_to_string(&cluster.nodes[0].config).unwrap()
}

pub fn pg_port(cluster: &TestCluster, i: usize) -> u16 {
    cluster.nodes[i].pg_port
}

/// Waits until a write through `port` lands on node `want`.
pub fn wait_write_lands(
    cluster: &TestCluster,
    what: &str,
    port: u16,
    want: usize,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    let target = pg_port(cluster, want);
    let mut last = String::new();
    let r = wait_until(
        &format!("a write through {what} to land on {}", cluster.nodes[want].name),
        within,
        || match write_via(port) {
            Ok(p) if p == target => Some(()),
            Ok(p) => {
                last = format!("landed on port {p}");
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        },
    );
    r.unwrap_or_else(|e| panic!("{e} (last attempt: {last})\n{}", cluster.diagnostics()));
    start.elapsed()
}

/// Reads `n` times through `port`: every one must land on a replica (in recovery, not the
/// primary). Returns the set of server ports seen.
pub fn assert_reads_on_replicas(what: &str, port: u16, primary_port: u16, n: usize) -> Vec<u16> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (p, in_recovery) = read_via(port).unwrap_or_else(|e| panic!("read through {what}: {e}"));
        assert_ne!(p, primary_port, "a read through {what} reached the primary");
        assert!(
            in_recovery,
            "a read through {what} reached a server not in recovery"
        );
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.sort();
    seen
}

/// Waits until the routers agree the cluster is settled: HAProxy's replica backend has dropped
/// former primaries (its checks need a moment) and reads land on replicas only.
pub fn wait_reads_settled(port: u16, primary_port: u16) {
    wait_until("reads to land on replicas only", Duration::from_secs(30), || {
        (0..6)
            .all(|_| read_via(port).is_ok_and(|(p, r)| p != primary_port && r))
            .then_some(())
    })
    .unwrap();
}
