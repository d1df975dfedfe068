//! Both routers (`pgvigil router` and HAProxy) route writes to the primary and reads to the
//! replicas, and follow a leader killed with SIGKILL.

mod routing_support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgvigil_testkit::cluster::ClusterOptions;
use pgvigil_testkit::{http, wait_until};
use routing_support::*;
use tokio::runtime::Runtime;

/// Writes go to the primary and reads to the replicas through both routers; after SIGKILL of
/// the leader (agent and PostgreSQL) both reach the new primary.
#[test]
fn both_routers_route_writes_and_reads_and_follow_a_killed_leader() {
    let (mut cluster, old) = start_cluster(ClusterOptions::default());
    let dir = cluster.root().to_path_buf();
    let router = Router::start(&dir, &node_config(&cluster), "").unwrap();
    let haproxy = Haproxy::start(&dir, &cluster.nodes[0].config).unwrap();
    haproxy.wait_settled(&cluster, old);
    assert!(haproxy.config_text.contains("OPTIONS /replica?lag=16777216"));
    let old_port = pg_port(&cluster, old);
    let mut replicas: Vec<u16> = (0..3)
        .filter(|&i| i != old)
        .map(|i| pg_port(&cluster, i))
        .collect();
    replicas.sort();

    for (what, primary, reads) in [
        ("the router", router.primary, router.replicas),
        ("HAProxy", haproxy.primary, haproxy.replicas),
    ] {
        wait_write_lands(&cluster, what, primary, old, Duration::from_secs(30));
        assert_eq!(read_via(primary).unwrap(), (old_port, false));
        wait_reads_settled(reads, old_port);
        // Every read lands on a replica; both replicas get reads (once their member keys show
        // them caught up: the lag estimate is refreshed every loop_wait).
        wait_until(
            &format!("{what} to balance reads over both replicas"),
            Duration::from_secs(30),
            || (assert_reads_on_replicas(what, reads, old_port, 8) == replicas).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}; router stats: {}", router.stats_json().unwrap_or_default()));
    }

    // The stats pages show the cluster as routed.
    let stats = router.stats_json().unwrap();
    let old_name = cluster.nodes[old].name.clone();
    assert_eq!(stats["primary"], old_name.as_str(), "{stats}");
    assert_eq!(stats["read_targets"].as_array().unwrap().len(), 2, "{stats}");
    let leader = Router::member(&stats, &old_name).unwrap();
    assert_eq!(leader["role"], "leader");
    assert!(leader["connections_total"].as_u64().unwrap() >= 2, "{leader}");
    assert!(leader["bytes_to_client"].as_u64().unwrap() > 0, "{leader}");
    let page = http::get(router.stats, "/").unwrap().body;
    for name in ["node1", "node2", "node3"] {
        assert!(page.contains(&format!("<td>{name}</td>")), "{page}");
    }
    let metrics = http::get(router.stats, "/metrics").unwrap().body;
    assert!(
        metrics.contains("pgvigil_router_primary_available{scope=\""),
        "{metrics}"
    );

    let rt = Runtime::new().unwrap();
    let held = hold(&rt, router.primary).unwrap();
    assert_eq!(held.server_port(&rt).unwrap(), old_port);

    // The leader host dies.
    cluster.signal_agent(old, Signal::SIGKILL).unwrap();
    cluster.kill_postgres(old).unwrap();
    let killed = Instant::now();
    let new = wait_until("a new leader", Duration::from_secs(120), || {
        cluster.leader().filter(|&l| l != old)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let new_port = pg_port(&cluster, new);
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, new, Duration::from_secs(60));
        eprintln!(
            "{what}: writes reach the new primary {:?} after the kill",
            killed.elapsed()
        );
    }
    assert!(
        held.server_port(&rt).is_err(),
        "a connection to the killed primary still answers"
    );

    // The remaining replica serves all reads; the new primary none.
    let survivor = (0..3).find(|&i| i != old && i != new).unwrap();
    for (what, reads) in [("the router", router.replicas), ("HAProxy", haproxy.replicas)] {
        wait_reads_settled(reads, new_port);
        let seen = assert_reads_on_replicas(what, reads, new_port, 8);
        assert_eq!(seen, [pg_port(&cluster, survivor)], "{what}");
    }
    let stats = router.stats_json().unwrap();
    assert_eq!(stats["primary"], cluster.nodes[new].name.as_str(), "{stats}");
    assert!(stats["leader_changes"].as_u64().unwrap() >= 1, "{stats}");
}
