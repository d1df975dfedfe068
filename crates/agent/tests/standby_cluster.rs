//! Standby clusters on real etcd, PostgreSQL 15 and the real `patronictl`
//! (`docs/patroni-compat.md` §4.11): a cluster whose `bootstrap.dcs` has a `standby_cluster`
//! section, written as a Patroni user writes it, follows a remote primary through a permanent
//! slot there; its replicas cascade from its standby leader; the standby leader fails over
//! inside the standby cluster; removing the section with `patronictl edit-config` promotes it.

mod operator_support;

use std::time::Duration;

use nix::sys::signal::Signal;
use operator_support::{AGENT, API_PASSWORD, API_USER, HEALTHY, patronictl};
use pgvigil_dcs::Dcs;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::{http, wait_until};
use serde_json::Value;

/// The slot on the source cluster that the standby leader streams through.
const SLOT: &str = "standby_dr";
const DUE: Duration = Duration::from_secs(120);

fn options(nodes: usize, extra_dcs: String) -> ClusterOptions {
    ClusterOptions {
        nodes,
        extra_dcs,
        restapi_auth: Some((API_USER.into(), API_PASSWORD.into())),
        ..Default::default()
    }
}

/// `role` and `state` of every member in `/cluster`, by name.
fn roles(cluster: &TestCluster) -> Option<Vec<(String, String, String)>> {
    let doc = cluster.cluster_doc()?;
    let members = doc["members"].as_array()?;
    Some(
        members
            .iter()
            .map(|m| {
                let text = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                (text("name"), text("role"), text("state"))
            })
            .collect(),
    )
}

/// Waits until a running standby leader and `replicas` streaming replicas are listed; returns
/// the standby leader's index.
fn wait_standby_leader(cluster: &TestCluster, replicas: usize, not: Option<usize>) -> usize {
    let r = wait_until("a running standby leader and streaming replicas", DUE, || {
        let members = roles(cluster)?;
        let leader = members
            .iter()
            .find(|(_, role, state)| role == "standby_leader" && state == "running")?;
        let streaming = members
            .iter()
            .filter(|(_, role, state)| role == "replica" && state == "streaming")
            .count();
        let i = cluster.node_index(&leader.0)?;
        (streaming >= replicas && Some(i) != not).then_some(i)
    });
    r.unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", roles(cluster), cluster.diagnostics()))
}

/// Waits until `sql` answers `want` on node `i`.
fn wait_answer(cluster: &TestCluster, i: usize, sql: &str, want: &str) {
    let what = format!("{} to answer {want:?} to {sql}", cluster.nodes[i].name);
    let r = wait_until(&what, DUE, || {
        (cluster.psql(i, sql).ok()?.as_str() == want).then_some(())
    });
    r.unwrap_or_else(|e| {
        panic!(
            "{e}; it answers {:?}\n{}",
            cluster.psql(i, sql),
            cluster.diagnostics()
        )
    });
}

/// The standby leader `i` streams from the source's port through the slot, and the source sees
/// the slot in use.
fn assert_streams_from_source(standby: &TestCluster, i: usize, source: &TestCluster) {
    let receiver =
        "SELECT status || ',' || sender_port || ',' || coalesce(slot_name, '') FROM pg_stat_wal_receiver";
    let want = format!("streaming,{},{SLOT}", source.nodes[0].pg_port);
    wait_answer(standby, i, receiver, &want);
    let active = format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{SLOT}'");
    wait_answer(source, 0, &active, "t");
    assert_eq!(standby.psql(i, "SELECT pg_is_in_recovery()").unwrap(), "t");
}

fn status_code(cluster: &TestCluster, i: usize, path: &str) -> u16 {
    http::get(cluster.nodes[i].api_port, path)
        .map(|r| r.status)
        .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", cluster.nodes[i].name))
}

/// The source, a one-node cluster of its own with a table `dr` holding one row and a
/// permanent slot for the standby cluster; and a standby cluster of `nodes` members configured
/// as a Patroni user does, once its standby leader runs and the others stream. Returns both and
/// the standby leader's index.
fn start_pair(nodes: usize) -> (TestCluster, TestCluster, usize) {
    let source_slot = format!("    slots:\n      {SLOT}:\n        type: physical\n");
    let source = TestCluster::start(AGENT.as_ref(), options(1, source_slot)).expect("source starts");
    source
        .wait_healthy(HEALTHY)
        .expect("source cluster becomes healthy");
    source
        .psql(0, "CREATE TABLE dr(x int); INSERT INTO dr VALUES (1)")
        .unwrap();
    let active = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}'");
    wait_answer(&source, 0, &active, "1");
    let section = format!(
        "    standby_cluster:\n      host: 127.0.0.1\n      port: {}\n      primary_slot_name: {SLOT}\n",
        source.nodes[0].pg_port
    );
    let standby = TestCluster::start(AGENT.as_ref(), options(nodes, section)).expect("standby starts");
    let leader = wait_standby_leader(&standby, nodes - 1, None);
    (source, standby, leader)
}

#[test]
fn a_standby_cluster_follows_the_remote_fails_over_inside_and_promotes_when_the_section_goes() {
    let (source, mut standby, first) = start_pair(3);

    // Data written on the source reaches every member of the standby cluster.
    source.psql(0, "INSERT INTO dr VALUES (2)").unwrap();
    for i in 0..3 {
        wait_answer(&standby, i, "SELECT count(*) FROM dr", "2");
    }
    assert_streams_from_source(&standby, first, &source);
    // The replicas cascade from the standby leader.
    let replicas =
        "SELECT string_agg(application_name, ',' ORDER BY application_name) FROM pg_stat_replication";
    wait_answer(&standby, first, replicas, &names_but(&standby, first));

    // What patronictl and the REST API say about it.
    let list =
        patronictl(&standby, first, &["list"], None, Duration::from_secs(60)).expect_ok("patronictl list");
    let leader_line = list
        .stdout
        .lines()
        .find(|l| l.contains(&standby.nodes[first].name))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(leader_line.contains("Standby Leader"), "{list}");
    assert_eq!(status_code(&standby, first, "/standby-leader"), 200);
    assert_eq!(status_code(&standby, first, "/primary"), 503);
    let replica = others_index(&standby, first)[0];
    assert_eq!(status_code(&standby, replica, "/standby-leader"), 503);
    assert_eq!(status_code(&standby, replica, "/replica"), 200);

    // A switchover inside the standby cluster with the real patronictl: the candidate becomes
    // the standby leader, following the source; the old one follows it.
    let target = replica;
    let run = patronictl(
        &standby,
        first,
        &[
            "switchover",
            "--leader",
            &standby.nodes[first].name,
            "--candidate",
            &standby.nodes[target].name,
            "--force",
        ],
        None,
        Duration::from_secs(90),
    );
    assert!(run.ok(), "patronictl switchover failed: {run}");
    assert_eq!(wait_standby_leader(&standby, 2, Some(first)), target);
    assert_streams_from_source(&standby, target, &source);
    wait_answer(&standby, target, replicas, &names_but(&standby, target));

    // The standby leader's host dies: another member becomes standby leader, still a replica
    // of the source, streaming through the same slot.
    standby.signal_agent(target, Signal::SIGKILL).unwrap();
    standby.kill_postgres(target).unwrap();
    let second = wait_standby_leader(&standby, 1, Some(target));
    assert_streams_from_source(&standby, second, &source);
    source.psql(0, "INSERT INTO dr VALUES (3)").unwrap();
    for i in others_index(&standby, target) {
        wait_answer(&standby, i, "SELECT count(*) FROM dr", "3");
    }
    // The dead one comes back as a replica of the new standby leader.
    standby.start_agent(target).unwrap();
    assert_eq!(wait_standby_leader(&standby, 2, None), second);
    wait_answer(&standby, target, "SELECT count(*) FROM dr", "3");

    // Removing the section promotes the standby leader; the others follow it.
    let run = patronictl(
        &standby,
        second,
        &["edit-config", "--force", "-s", "standby_cluster=null"],
        None,
        Duration::from_secs(60),
    );
    assert!(run.ok(), "patronictl edit-config failed: {run}");
    let config: Value =
        standby.with_operator_dcs(async |dcs| dcs.get_cluster().await.unwrap().config.unwrap().value);
    assert!(config.get("standby_cluster").is_none(), "{config}");
    operator_support::wait_leader(&standby, second, DUE);
    standby
        .psql(second, "INSERT INTO dr VALUES (4)")
        .expect("the promoted leader accepts writes");
    for i in others_index(&standby, second) {
        wait_answer(&standby, i, "SELECT count(*) FROM dr", "4");
        wait_answer(&standby, i, "SELECT pg_is_in_recovery()", "t");
    }
    assert_eq!(status_code(&standby, second, "/primary"), 200);
    // It no longer follows the source: the slot there is left unused.
    let active = format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{SLOT}'");
    wait_answer(&source, 0, &active, "f");
    assert_eq!(source.psql(0, "SELECT count(*) FROM dr").unwrap(), "3");
}

fn others_index(cluster: &TestCluster, but: usize) -> Vec<usize> {
    (0..cluster.nodes.len()).filter(|&i| i != but).collect()
}

/// The other members' names, sorted, comma-separated (as `pg_stat_replication` lists them).
fn names_but(cluster: &TestCluster, but: usize) -> String {
    let mut names: Vec<&str> = others_index(cluster, but)
        .into_iter()
        .map(|i| cluster.nodes[i].name.as_str())
        .collect();
    names.sort();
    names.join(",")
}

/// `patronictl promote-cluster` (Patroni 4's way of removing the section through the leader's
/// `PATCH /config`) promotes the standby leader; `patronictl demote-cluster` then turns the
/// old source into a standby cluster of the promoted one (its primary rewound against it). Both
/// report themselves done.
#[test]
fn patronictl_promote_cluster_and_demote_cluster_swap_the_roles() {
    let (source, standby, leader) = start_pair(2);
    assert_streams_from_source(&standby, leader, &source);

    let run = patronictl(
        &standby,
        leader,
        &["promote-cluster", "--force"],
        None,
        Duration::from_secs(90),
    );
    assert!(run.ok(), "patronictl promote-cluster failed: {run}");
    assert!(run.stdout.contains("cluster is successfully promoted"), "{run}");
    standby
        .psql(leader, "INSERT INTO dr VALUES (2)")
        .expect("the promoted leader accepts writes");
    let replica = others_index(&standby, leader)[0];
    wait_answer(&standby, replica, "SELECT count(*) FROM dr", "2");
    assert_eq!(status_code(&standby, leader, "/primary"), 200);

    // The old source becomes a standby cluster of the new primary.
    let port = standby.nodes[leader].pg_port.to_string();
    let run = patronictl(
        &source,
        0,
        &[
            "demote-cluster",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--force",
        ],
        None,
        Duration::from_secs(120),
    );
    assert!(run.ok(), "patronictl demote-cluster failed: {run}");
    assert!(run.stdout.contains("cluster is successfully demoted"), "{run}");
    assert_eq!(wait_standby_leader(&source, 0, None), 0);
    standby.psql(leader, "INSERT INTO dr VALUES (3)").unwrap();
    wait_answer(&source, 0, "SELECT count(*) FROM dr", "3");
    let receiver = "SELECT status || ',' || sender_port FROM pg_stat_wal_receiver";
    wait_answer(&source, 0, receiver, &format!("streaming,{port}"));
    assert_eq!(status_code(&source, 0, "/primary"), 503);
    assert_eq!(status_code(&source, 0, "/standby-leader"), 200);
}
