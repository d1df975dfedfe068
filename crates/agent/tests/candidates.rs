//! Who may become leader: `failover_priority` decides between equally advanced replicas, a
//! `nofailover` member never promotes, asynchronous failover loses at most what the lag limit
//! allows, and synchronous modes switch live through the dynamic configuration.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgvigil_dcs::Dcs;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::load::WriteLoad;
use pgvigil_testkit::{http, wait_until};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(180);

/// Waits until every replica replayed exactly what the leader wrote, so positions are equal.
fn wait_caught_up(cluster: &TestCluster, leader: usize) {
    cluster.psql(leader, "CHECKPOINT").unwrap();
    let lsn = cluster.psql(leader, "SELECT pg_current_wal_flush_lsn()").unwrap();
    for i in (0..cluster.nodes.len()).filter(|&i| i != leader && cluster.nodes[i].agent_pid().is_some()) {
        let r = wait_until("replicas caught up", Duration::from_secs(60), || {
            let replayed = cluster
                .psql(
                    i,
                    "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn"
                        .replace("$1", &format!("'{lsn}'"))
                        .as_str(),
                )
                .ok()?;
            (replayed == "t").then_some(())
        });
        r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    }
}

#[test]
fn failover_priority_breaks_ties_and_nofailover_never_promotes() {
    let options = ClusterOptions {
        extra_node_yaml: (1..=3)
            .map(|p| format!("tags:\n  failover_priority: {p}\n"))
            .collect(),
        ..Default::default()
    };
    let mut cluster = TestCluster::start(AGENT.as_ref(), options).unwrap();
    let first = cluster.wait_healthy(HEALTHY).unwrap();
    wait_caught_up(&cluster, first);

    // Two replicas at the same position: the higher failover_priority wins.
    let expected = (0..3).filter(|&i| i != first).max().unwrap(); // priority = index + 1
    cluster.kill_node(first);
    let second = cluster.wait_new_leader(first);
    assert_eq!(
        second,
        expected,
        "the higher failover_priority must win a tie\n{}",
        cluster.diagnostics()
    );

    // The other replica becomes nofailover (config reload); the first leader returns.
    let other = (0..3).find(|&i| i != first && i != second).unwrap();
    let path = cluster.nodes[other].config.clone();
    let yaml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        yaml.replace(&format!("failover_priority: {}", other + 1), "nofailover: true"),
    )
    .unwrap();
    cluster.signal_agent(other, Signal::SIGHUP).unwrap();
    let tagged = wait_until("nofailover published", Duration::from_secs(30), || {
        let doc = cluster.cluster_doc()?;
        let m = doc["members"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == cluster.nodes[other].name.as_str())?
            .clone();
        (m["tags"]["nofailover"] == Value::Bool(true)).then_some(())
    });
    tagged.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    cluster.start_agent(first).unwrap();
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), second);
    wait_caught_up(&cluster, second);

    // Kill the leader: the nofailover member stands aside, the returned node takes over.
    cluster.kill_node(second);
    let third = cluster.wait_new_leader(second);
    assert_eq!(third, first, "{}", cluster.diagnostics());

    // Only the nofailover member is left: nobody promotes.
    cluster.kill_node(third);
    let deadline = Instant::now() + Duration::from_secs(cluster.options.ttl + 15);
    while Instant::now() < deadline {
        assert_eq!(
            cluster.psql(other, "SELECT pg_is_in_recovery()").unwrap(),
            "t",
            "the nofailover member promoted"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = http::get(cluster.nodes[other].api_port, "/patroni")
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(status["role"], "replica");
}

#[test]
fn asynchronous_failover_reports_lost_rows_within_the_lag_limit() {
    let mut cluster = TestCluster::start(AGENT.as_ref(), ClusterOptions::default()).unwrap();
    let leader = cluster.wait_healthy(HEALTHY).unwrap();
    cluster
        .psql(leader, "CREATE TABLE acked(id bigint primary key)")
        .unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.pg_port).collect();
    let load = WriteLoad::start(ports, "acked", Duration::from_millis(5));
    wait_until("writes flowing", Duration::from_secs(30), || {
        (load.acked_count() > 200).then_some(())
    })
    .unwrap();
    cluster.kill_node(leader);
    let new = cluster.wait_new_leader(leader);
    let before = load.acked_count();
    wait_until("writes resume", Duration::from_secs(60), || {
        (load.acked_count() > before + 20).then_some(())
    })
    .unwrap();
    let acked = load.finish();
    let lost =
        pgvigil_testkit::load::WriteLoad::lost_on(&acked, cluster.nodes[new].pg_port, "acked").unwrap();
    eprintln!(
        "asynchronous failover: {} of {} acknowledged rows lost",
        lost.len(),
        acked.len()
    );
    // An INSERT of one bigint writes well over 50 bytes of WAL, so 1 MiB of lag (the default
    // maximum_lag_on_failover) bounds the loss far below 20000 rows.
    assert!(lost.len() < 20_000, "{} rows lost", lost.len());
}

#[test]
fn synchronous_mode_changes_apply_without_restart() {
    let cluster = TestCluster::start(AGENT.as_ref(), ClusterOptions::default()).unwrap();
    let leader = cluster.wait_healthy(HEALTHY).unwrap();
    let pid = cluster.nodes[leader].postmaster_pid().unwrap();
    // Like `patronictl edit-config`: compare-and-set on the config key's revision.
    let set_mode = |mode: &str| {
        cluster.with_operator_dcs(async |dcs| {
            let current = dcs.get_cluster().await.unwrap().config.unwrap();
            let mut value = current.value.clone();
            value["synchronous_mode"] = Value::from(mode);
            assert!(dcs.set_config(&value, Some(current.mod_revision)).await.unwrap());
        })
    };
    let roles = |want: &str, n: usize| {
        let r = wait_until(
            &format!("{n} members with role {want}"),
            Duration::from_secs(60),
            || {
                let doc = cluster.cluster_doc()?;
                let count = doc["members"]
                    .as_array()?
                    .iter()
                    .filter(|m| m["role"] == want)
                    .count();
                (count == n).then_some(())
            },
        );
        r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    };
    let ssn = || cluster.psql(leader, "SHOW synchronous_standby_names").unwrap();

    set_mode("on");
    roles("sync_standby", 1);
    assert!(!ssn().is_empty());
    set_mode("quorum");
    roles("quorum_standby", 2);
    assert!(ssn().starts_with("ANY 1 ("), "{}", ssn());
    set_mode("off");
    roles("replica", 2);
    wait_until(
        "synchronous_standby_names cleared",
        Duration::from_secs(30),
        || ssn().is_empty().then_some(()),
    )
    .unwrap();
    assert_eq!(
        cluster.nodes[leader].postmaster_pid(),
        Some(pid),
        "PostgreSQL was restarted"
    );
}
