//! A cluster of pgvigil members makes the fast-takeover promise: the leader writes the
//! `heartbeat` key with its promise F, because every member key carries the `pgvigil` marker.
//! Without the marker no leader of more than one member ever promised, and a dead leader was
//! replaced only when its lease expired.

use std::time::Duration;

use pgvigil_dcs::Dcs;
use pgvigil_lock::HeartbeatValue;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::wait_until;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");

#[test]
fn the_leader_of_pgvigil_members_promises_the_fast_takeover() {
    let cluster = TestCluster::start(AGENT.as_ref(), ClusterOptions::default()).expect("cluster starts");
    let leader = cluster
        .wait_healthy(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let name = cluster.nodes[leader].name.clone();
    let promised = wait_until("the leader's heartbeat key", Duration::from_secs(60), || {
        let view = cluster.with_operator_dcs(async |dcs| dcs.get_cluster().await.ok());
        let view = view?;
        let every_member_marked =
            view.members.len() == cluster.nodes.len() && view.members.iter().all(|m| m.data.is_pgvigil());
        let heartbeat = HeartbeatValue::parse(&view.heartbeat?.value)?;
        (every_member_marked && heartbeat.leader == name).then_some(heartbeat)
    });
    let heartbeat = promised.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    // The default promise F (`fast_takeover.fence_after`).
    assert_eq!(heartbeat.promise(), Duration::from_millis(3500), "{heartbeat:?}");
}

/// The promise lasts 3.5 s past each heartbeat while the HA loop runs once per `loop_wait`
/// (10 s here, Patroni's default): the leader's health check must follow the heartbeats, not
/// the last cycle, or HAProxy (`on-marked-down shutdown-sessions`) would cut the primary off
/// between two cycles.
#[test]
fn the_leader_stays_primary_for_health_checks_between_two_slow_cycles() {
    let options = ClusterOptions {
        ttl: 30,
        loop_wait: 10,
        retry_timeout: 10,
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster
        .wait_healthy(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let port = cluster.nodes[leader].api_port;
    // Wait until the promise is made, then watch the leader for two full cycles.
    wait_until("the leader's promise", Duration::from_secs(60), || {
        let view = cluster.with_operator_dcs(async |dcs| dcs.get_cluster().await.ok())?;
        view.heartbeat.and_then(|h| HeartbeatValue::parse(&h.value))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let watched = std::time::Instant::now();
    let mut answers = 0;
    while watched.elapsed() < Duration::from_secs(22) {
        let code = pgvigil_testkit::http::get(port, "/primary").map(|r| r.status);
        assert!(
            matches!(code, Ok(200)),
            "GET /primary on the healthy leader answered {code:?} after {:?}\n{}",
            watched.elapsed(),
            cluster.diagnostics()
        );
        answers += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(answers > 40, "only {answers} health checks in 22 s");
}
