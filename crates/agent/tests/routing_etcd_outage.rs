//! Both routers keep established connections while every etcd member is down, and `pgvigil
//! router` keeps routing new ones by its last topology until etcd is back.

mod routing_support;

use std::time::{Duration, Instant};

use pgvigil_testkit::cluster::{ClusterOptions, psql_at};
use pgvigil_testkit::wait_until;
use routing_support::*;
use tokio::runtime::Runtime;

/// With every etcd member stopped, established connections through both routers keep working
/// (until the primary fences itself, which the routers do not hasten), and the router keeps
/// routing new connections by its last topology and says so. When etcd is back, it re-syncs.
#[test]
fn both_routers_keep_established_connections_while_etcd_is_down() {
    let (mut cluster, leader) = start_cluster(ClusterOptions::default());
    let dir = cluster.root().to_path_buf();
    let router = Router::start(&dir, &node_config(&cluster), "").unwrap();
    let haproxy = Haproxy::start(&dir, &cluster.nodes[0].config).unwrap();
    haproxy.wait_settled(&cluster, leader);
    let leader_port = pg_port(&cluster, leader);
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, leader, Duration::from_secs(30));
    }
    let rt = Runtime::new().unwrap();
    let via_router = hold(&rt, router.primary).unwrap();
    let via_haproxy = hold(&rt, haproxy.primary).unwrap();

    // No etcd answers any more: two members are killed (refused connections), the third is
    // frozen (a hung server).
    cluster.etcd.stop_member(1);
    cluster.etcd.stop_member(2);
    cluster.etcd.pause_member(0).unwrap();
    let stopped = Instant::now();
    // For a few seconds (the primary fences itself later, when its agent gives up on etcd):
    // every query on the established connections works, and new connections through the router
    // still reach the primary by the last known topology.
    let mut probes = 0;
    while stopped.elapsed() < Duration::from_secs(5) {
        let direct_ok = psql_at(leader_port, "SELECT pg_is_in_recovery()").is_ok_and(|v| v == "f");
        let r = via_router.server_port(&rt);
        let h = via_haproxy.server_port(&rt);
        let fresh = write_via(router.primary);
        let still_ok = psql_at(leader_port, "SELECT pg_is_in_recovery()").is_ok_and(|v| v == "f");
        if !(direct_ok && still_ok) {
            break; // the primary fenced itself: nothing left to hold on to
        }
        assert_eq!(
            r.unwrap(),
            leader_port,
            "router: established connection lost with etcd down"
        );
        assert_eq!(
            h.unwrap(),
            leader_port,
            "HAProxy: established connection lost with etcd down"
        );
        assert_eq!(
            fresh.unwrap(),
            leader_port,
            "router: new connection not routed with etcd down"
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{probes} probes succeeded with etcd down");
    assert!(
        probes >= 3,
        "only {probes} probes before the primary fenced itself"
    );
    // The router says it is running on its last known topology.
    let stats = wait_until(
        "the router to say its topology is stale",
        Duration::from_secs(10),
        || {
            let stats = router.stats_json()?;
            (stats["etcd"]["status"] == "stale").then_some(stats)
        },
    )
    .unwrap();
    assert!(
        stats["etcd"]["message"]
            .as_str()
            .unwrap()
            .contains("routing new connections by the topology read"),
        "{stats}"
    );

    cluster.etcd.resume_member(0).unwrap();
    cluster.etcd.start_member(1).unwrap();
    cluster.etcd.start_member(2).unwrap();
    let leader = cluster.wait_healthy(HEALTHY).unwrap();
    wait_until("the router to re-sync with etcd", Duration::from_secs(30), || {
        let stats = router.stats_json()?;
        (stats["etcd"]["status"] == "in sync" && stats["primary"] == cluster.nodes[leader].name.as_str())
            .then_some(())
    })
    .unwrap();
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, leader, Duration::from_secs(60));
    }
}
