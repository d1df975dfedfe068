//! A real three-node cluster on loopback: bootstrap, replication, the REST API, and pgvigilctl
//! against the real patronictl. Each test phase says why it exists.

use std::time::Duration;

use pgvigil_testkit::cluster::{ClusterOptions, TestCluster, sibling_binary};
use pgvigil_testkit::http;
use pgvigil_testkit::wait_until;
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(180);

fn start() -> TestCluster {
    TestCluster::start(AGENT.as_ref(), ClusterOptions::default()).expect("cluster starts")
}

fn count_in_logs(cluster: &TestCluster, needle: &str) -> usize {
    cluster
        .nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap_or_default()
                .matches(needle)
                .count()
        })
        .sum()
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rows of `list -f json`, keyed by the columns both tools must agree on.
fn list_rows(json: &str) -> Vec<(String, String, String, String)> {
    let rows: Vec<Value> = serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    let mut rows: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r["Member"].as_str().unwrap_or("").to_string(),
                r["Role"].as_str().unwrap_or("").to_string(),
                r["State"].as_str().unwrap_or("").to_string(),
                r["TL"].to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn bootstrap_replication_rest_and_patronictl() {
    let cluster = start();
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");

    // Exactly one node won the initialize race and ran initdb; the others cloned.
    assert_eq!(
        count_in_logs(&cluster, "initialized a new cluster"),
        1,
        "{}",
        cluster.diagnostics()
    );
    assert_eq!(
        count_in_logs(&cluster, "replica has been created using basebackup"),
        2,
        "{}",
        cluster.diagnostics()
    );

    // A row written on the primary reaches both replicas.
    cluster
        .psql(
            leader,
            "CREATE TABLE t(id int primary key, v text); INSERT INTO t VALUES (1, 'hello')",
        )
        .unwrap();
    for i in (0..3).filter(|&i| i != leader) {
        let v = wait_until("the row to replicate", Duration::from_secs(30), || {
            cluster
                .psql(i, "SELECT v FROM t WHERE id = 1")
                .ok()
                .filter(|v| v == "hello")
        });
        assert!(v.is_ok(), "node {i}: {v:?}");
        assert_eq!(cluster.psql(i, "SELECT pg_is_in_recovery()").unwrap(), "t");
    }

    // Each replica streams through its own physical slot on the leader.
    let slots = wait_until("both slots active", Duration::from_secs(30), || {
        let s = cluster
            .psql(
                leader,
                "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots WHERE active",
            )
            .ok()?;
        (s.split(',').count() == 2).then_some(s)
    })
    .unwrap();
    let expected: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| cluster.nodes[i].name.clone())
        .collect();
    assert_eq!(slots, expected.join(","));

    // REST health checks: 200 where the role matches, 503 elsewhere; HEAD and OPTIONS too.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let is_leader = i == leader;
        for (path, want_leader) in [
            ("/primary", true),
            ("/leader", true),
            ("/replica", false),
            ("/read-write", true),
        ] {
            let want = if is_leader == want_leader { 200 } else { 503 };
            for method in ["GET", "HEAD", "OPTIONS"] {
                let r = http::request(node.api_port, method, path, None, None).unwrap();
                assert_eq!(r.status, want, "{method} {path} on {}", node.name);
            }
        }
        assert_eq!(http::get(node.api_port, "/health").unwrap().status, 200);
        assert_eq!(http::get(node.api_port, "/liveness").unwrap().status, 200);
        let status = http::get(node.api_port, "/patroni").unwrap().json().unwrap();
        assert_eq!(status["role"], if is_leader { "primary" } else { "replica" });
        assert_eq!(status["patroni"]["name"], node.name.as_str());
        let metrics = http::get(node.api_port, "/metrics").unwrap().body;
        let primary_line = metrics
            .lines()
            .find(|l| l.starts_with("patroni_primary{"))
            .unwrap()
            .to_string();
        assert!(
            primary_line.ends_with(if is_leader { " 1" } else { " 0" }),
            "{primary_line}"
        );
    }

    // pgvigilctl and the real patronictl agree on members, roles, states and timeline.
    let config = &cluster.nodes[0].config;
    let ours = run(std::process::Command::new(sibling_binary("pgvigilctl").unwrap())
        .arg("-c")
        .arg(config)
        .args(["list", "-f", "json"]));
    let theirs = run(std::process::Command::new("patronictl")
        .arg("-c")
        .arg(config)
        .args(["list", "-f", "json"]));
    assert_eq!(
        list_rows(&ours),
        list_rows(&theirs),
        "pgvigilctl: {ours}\npatronictl: {theirs}"
    );
    let rows = list_rows(&ours);
    assert_eq!(
        rows.iter()
            .filter(|r| r.1 == "Leader" && r.2 == "running")
            .count(),
        1,
        "{rows:?}"
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r.1 == "Replica" && r.2 == "streaming")
            .count(),
        2,
        "{rows:?}"
    );
    let pretty = run(std::process::Command::new(sibling_binary("pgvigilctl").unwrap())
        .arg("-c")
        .arg(config)
        .arg("list"));
    assert!(
        pretty.starts_with(&format!("+ Cluster: {} (", cluster.scope)),
        "{pretty}"
    );
}
