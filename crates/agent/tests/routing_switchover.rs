//! Both routers close client connections to a former primary: after a planned switchover, and
//! after a leader whose agent is frozen lost the lock.

mod routing_support;

use std::time::Duration;

use nix::sys::signal::Signal;
use pgvigil_testkit::cluster::{ClusterOptions, psql_at};
use pgvigil_testkit::{http, wait_until};
use routing_support::*;
use tokio::runtime::Runtime;

/// A planned switchover (`POST /switchover` to the leader's REST API, from A to B) through both
/// routers: the connections held to A through port "5000" are closed, so are the read-only
/// connections held to B through port "5001" (B's PostgreSQL is promoted, not restarted, so
/// only the router can close them), a client writing in a loop through each router never
/// writes to A once its writes reach B, and new connections on "5000" reach B. Then a leader
/// whose agent is frozen (SIGSTOP: its PostgreSQL keeps running as a primary) loses the lock:
/// both routers close the connections to it, although that PostgreSQL still accepts writes. A
/// `noloadbalance` member never gets reads.
#[test]
fn both_routers_close_connections_to_a_former_primary() {
    let options = ClusterOptions {
        extra_node_yaml: vec![
            String::new(),
            String::new(),
            "tags:\n  noloadbalance: true\n".into(),
        ],
        ..ClusterOptions::default()
    };
    let (mut cluster, a) = start_cluster(options);
    let dir = cluster.root().to_path_buf();
    let router = Router::start(&dir, &node_config(&cluster), "").unwrap();
    let haproxy = Haproxy::start(&dir, &cluster.nodes[0].config).unwrap();
    haproxy.wait_settled(&cluster, a);
    let a_port = pg_port(&cluster, a);
    let node3_port = pg_port(&cluster, 2);
    for (what, primary, reads) in [
        ("the router", router.primary, router.replicas),
        ("HAProxy", haproxy.primary, haproxy.replicas),
    ] {
        wait_write_lands(&cluster, what, primary, a, Duration::from_secs(30));
        wait_reads_settled(reads, a_port);
        let seen = assert_reads_on_replicas(what, reads, a_port, 8);
        assert!(
            !seen.contains(&node3_port) || a == 2,
            "{what}: reads reached node3 (noloadbalance)"
        );
    }

    // The candidate B is a replica that serves reads (node3 does not).
    let b = (0..2).find(|&i| i != a).unwrap();
    let b_port = pg_port(&cluster, b);
    let (a_name, b_name) = (cluster.nodes[a].name.clone(), cluster.nodes[b].name.clone());
    let rt = Runtime::new().unwrap();
    let writes_via_router = Writer::start(&rt, "the router", router.primary);
    let writes_via_haproxy = Writer::start(&rt, "HAProxy", haproxy.primary);
    let via_router = hold(&rt, router.primary).unwrap();
    let via_haproxy = hold(&rt, haproxy.primary).unwrap();
    assert_eq!(via_router.server_port(&rt).unwrap(), a_port);
    assert_eq!(via_haproxy.server_port(&rt).unwrap(), a_port);
    let reads_via_router = hold_on(&rt, router.replicas, b_port, "the router");
    let reads_via_haproxy = hold_on(&rt, haproxy.replicas, b_port, "HAProxy");
    let direct_to_b = hold(&rt, b_port).unwrap();
    for w in [&writes_via_router, &writes_via_haproxy] {
        w.wait_for(&format!("a write through {} to land on A", w.what), a_port);
    }

    // Planned switchover from A to B, as `patronictl switchover` asks for it: the REST API
    // answers when it is done.
    let body = format!(r#"{{"leader": "{a_name}", "candidate": "{b_name}"}}"#);
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.nodes[a].api_port));
    let answer = http::request_within(
        api,
        "POST",
        "/switchover",
        Some(&body),
        None,
        Duration::from_secs(90),
    )
    .unwrap_or_else(|e| panic!("POST /switchover: {e}\n{}", cluster.diagnostics()));
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (
            200,
            format!("Successfully switched over to \"{b_name}\"").as_str()
        ),
        "{}",
        cluster.diagnostics()
    );
    wait_until("B to hold the leader key", Duration::from_secs(30), || {
        (cluster.leader() == Some(b)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));

    // New connections on "5000" reach B, and the writers' too.
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, b, Duration::from_secs(30));
    }
    for w in [&writes_via_router, &writes_via_haproxy] {
        w.wait_for(&format!("a write through {} to land on B", w.what), b_port);
    }
    // No held connection still talks to A (its PostgreSQL restarted as a replica, which ends
    // them; the router also dropped the route at once).
    for (what, held) in [("the router", &via_router), ("HAProxy", &via_haproxy)] {
        wait_until(
            &format!("{what}: the connection to the old primary to be closed"),
            Duration::from_secs(30),
            || held.server_port(&rt).is_err().then_some(()),
        )
        .unwrap();
    }
    // The read-only connections to B are closed by the routers: B is the primary now, and its
    // PostgreSQL did not end them (the direct connection opened at the same time still works).
    wait_until(
        "the router to close the read-only connection to the new primary",
        Duration::from_secs(10),
        || reads_via_router.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    wait_until(
        "HAProxy to close the read-only connection to the new primary",
        Duration::from_secs(30),
        || reads_via_haproxy.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    assert_eq!(
        direct_to_b.server_port(&rt).unwrap(),
        b_port,
        "B's PostgreSQL ended its sessions: the test proves nothing about the routers"
    );
    wait_until(
        "the router to hold no connection to the old primary",
        Duration::from_secs(10),
        || {
            let stats = router.stats_json()?;
            let m = Router::member(&stats, &a_name)?;
            (m["connections_primary"] == 0 && stats["primary"] == b_name.as_str()).then_some(())
        },
    )
    .unwrap();
    let stats = router.stats_json().unwrap();
    let closed = Router::member(&stats, &b_name).unwrap()["closed_by_router"]
        .as_u64()
        .unwrap();
    assert!(closed >= 1, "{stats}");
    // No write landed on A after one had landed on B, through either router.
    for w in [writes_via_router, writes_via_haproxy] {
        let what = w.what;
        let ports = w.finish(&rt);
        let first_on_b = ports.iter().position(|&p| p == b_port).unwrap();
        assert!(
            !ports[first_on_b..].contains(&a_port),
            "{what}: a write reached the old primary after the switchover: {ports:?}"
        );
        eprintln!(
            "{what}: {} writes, {} on A then {} on B",
            ports.len(),
            first_on_b,
            ports.len() - first_on_b
        );
    }

    // B's agent freezes, and so does its fencer (as if it had died, or B ran an agent without
    // one): its PostgreSQL stays a writable primary while the lock expires and C takes over.
    // Both routers must drop the connections to B.
    let via_router = hold(&rt, router.primary).unwrap();
    let via_haproxy = hold(&rt, haproxy.primary).unwrap();
    assert_eq!(via_router.server_port(&rt).unwrap(), b_port);
    assert_eq!(via_haproxy.server_port(&rt).unwrap(), b_port);
    let agent = cluster.nodes[b].agent_pid().expect("B's agent runs");
    let fencer = pgvigil_testkit::process::fencer_of(agent).expect("B's agent started its fencer");
    let _resume_fencer = pgvigil_testkit::process::Stopped::stop(fencer).unwrap();
    cluster.signal_agent(b, Signal::SIGSTOP).unwrap();
    let c = wait_until(
        "the router to route to a new primary",
        Duration::from_secs(90),
        || {
            let stats = router.stats_json()?;
            let p = stats["primary"].as_str()?;
            (p != b_name).then(|| cluster.node_index(p)).flatten()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    // The router closes the old connection as it switches (within a second, to allow for the
    // microseconds between publishing the new topology and closing the old route).
    wait_until(
        "the router to close the connection to the frozen leader",
        Duration::from_secs(1),
        || via_router.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    // That PostgreSQL still runs as a primary: the router, not the server, closed the session.
    assert_eq!(
        psql_at(b_port, "SELECT pg_is_in_recovery()").unwrap(),
        "f",
        "the frozen leader's PostgreSQL stopped by itself; the test proves nothing"
    );
    let stats = router.stats_json().unwrap();
    let closed = Router::member(&stats, &b_name).unwrap()["closed_by_router"]
        .as_u64()
        .unwrap();
    assert!(closed >= 1, "{stats}");
    // HAProxy marks B down (its REST API no longer answers) and shuts the session down too.
    wait_until(
        "HAProxy to close the connection to the frozen leader",
        Duration::from_secs(30),
        || via_haproxy.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, c, Duration::from_secs(60));
    }
    // Nothing reaches B through port 5000 any more.
    for _ in 0..5 {
        assert_eq!(write_via(router.primary).unwrap(), pg_port(&cluster, c));
    }
    // Let B's agent run again so that teardown finds a normal process.
    cluster.signal_agent(b, Signal::SIGCONT).unwrap();
}
