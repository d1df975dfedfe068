//! Replication slots on real PostgreSQL 15 and etcd (`docs/patroni-compat.md` §5.8, §1.3.8):
//! permanent slots added with the real `patronictl edit-config`, `ignore_slots`, the slots
//! every node keeps for the members, the `status` key, and the slot of a member that left,
//! through a switchover and a failover. The copies of logical slots: `logical_slots.rs`.

mod operator_support;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use operator_support::{HEALTHY, patronictl, wait_leader, wait_settled};
use pgvigil_api::StatusValue;
use pgvigil_dcs::Dcs;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::wait_until;

const SLOTS_DUE: Duration = Duration::from_secs(60);

/// `name:type` of every slot on node `i`.
fn slots(cluster: &TestCluster, i: usize) -> Option<BTreeSet<String>> {
    let text = cluster
        .psql(
            i,
            "SELECT coalesce(string_agg(slot_name || ':' || slot_type, ',' ORDER BY slot_name), '')
               FROM pg_replication_slots",
        )
        .ok()?;
    Some(
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// Waits until node `i` has every slot of `present` and none of `absent`.
fn wait_slots(cluster: &TestCluster, i: usize, present: &[&str], absent: &[&str]) {
    let what = format!(
        "{} to have slots {present:?} and not {absent:?}",
        cluster.nodes[i].name
    );
    let r = wait_until(&what, SLOTS_DUE, || {
        let have = slots(cluster, i)?;
        (present.iter().all(|s| have.contains(*s)) && absent.iter().all(|s| !have.contains(*s))).then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}; it has {:?}\n{}", slots(cluster, i), cluster.diagnostics()));
}

fn status(cluster: &TestCluster) -> StatusValue {
    cluster.with_operator_dcs(async |dcs| dcs.get_cluster().await.unwrap().status)
}

fn member_slot(cluster: &TestCluster, i: usize) -> String {
    format!("{}:physical", cluster.nodes[i].name)
}

#[test]
fn permanent_and_ignored_slots_outlive_switchover_and_failover_and_a_departed_members_slot_goes() {
    let options = ClusterOptions {
        // The first line continues `bootstrap.dcs.postgresql.parameters`: logical slots need it.
        extra_dcs: "        wal_level: logical\n    member_slots_ttl: 10\n    ignore_slots:\n    - name: backup_tool\n"
            .into(),
        ..Default::default()
    };
    let (mut cluster, first) = operator_support::start(options);
    wait_settled(&cluster);
    let [a, b] = operator_support::others(&cluster, first)[..] else {
        panic!("three nodes")
    };

    // Every node keeps a slot for every other member (member_slots_ttl > 0, PostgreSQL 11+).
    for i in 0..3 {
        let others: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| member_slot(&cluster, j))
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        wait_slots(&cluster, i, &others, &[]);
    }

    // A slot nobody configured is dropped; one matched by ignore_slots is kept.
    for slot in ["backup_tool", "stray"] {
        cluster
            .psql(
                first,
                &format!("SELECT pg_create_physical_replication_slot('{slot}', true)"),
            )
            .unwrap();
    }
    wait_slots(&cluster, first, &["backup_tool:physical"], &["stray:physical"]);

    // Permanent slots through the real patronictl.
    let run = patronictl(
        &cluster,
        a,
        &[
            "edit-config",
            "--force",
            "-s",
            "slots.archiver.type=physical",
            "-s",
            "slots.cdc.type=logical",
            "-s",
            "slots.cdc.database=postgres",
            "-s",
            "slots.cdc.plugin=test_decoding",
        ],
        None,
        Duration::from_secs(60),
    );
    assert!(run.ok(), "patronictl edit-config failed: {run:?}");
    wait_slots(
        &cluster,
        first,
        &["archiver:physical", "cdc:logical", "backup_tool:physical"],
        &[],
    );
    // Replicas keep the permanent physical slot and a copy of the logical one
    // (`logical_slots.rs` follows the copies' positions).
    for i in [a, b] {
        wait_slots(&cluster, i, &["archiver:physical", "cdc:logical"], &[]);
    }

    // The leader publishes its position, the slot positions and the slots to retain.
    let r = wait_until("status with slots and retain_slots", SLOTS_DUE, || {
        let st = status(&cluster);
        (st.optime > 0
            && ["archiver", "cdc", &cluster.nodes[first].name].iter().all(|s| {
                st.slots
                    .get(*s)
                    .is_some_and(|v| v.as_u64().is_some_and(|l| l > 0))
            })
            && cluster.nodes.iter().all(|n| st.retain_slots.contains(&n.name)))
        .then_some(st)
    });
    let st = r.unwrap_or_else(|e| panic!("{e}: {:?}", status(&cluster)));
    assert!(!st.slots.contains_key("backup_tool"), "{st:?}");
    let listed = patronictl(&cluster, a, &["list"], None, Duration::from_secs(60));
    assert!(listed.ok(), "patronictl list: {listed:?}");

    // Switchover: the new primary has the permanent slots (the logical one its copy), the old
    // one keeps its ignored slot and the logical slot as a replica.
    let run = patronictl(
        &cluster,
        a,
        &[
            "switchover",
            "--leader",
            &cluster.nodes[first].name,
            "--candidate",
            &cluster.nodes[a].name,
            "--force",
        ],
        None,
        Duration::from_secs(90),
    );
    assert!(run.ok(), "patronictl switchover failed: {run:?}");
    wait_leader(&cluster, a, HEALTHY);
    wait_slots(&cluster, a, &["archiver:physical", "cdc:logical"], &[]);
    let first_member = member_slot(&cluster, first);
    wait_slots(&cluster, a, &[&first_member], &[]);
    wait_slots(
        &cluster,
        first,
        &["archiver:physical", "backup_tool:physical", "cdc:logical"],
        &[],
    );

    // Failover: the leader's agent and PostgreSQL die; whoever leads next has the permanent
    // slots, and the ignored slot is still there on its node.
    cluster.signal_agent(a, Signal::SIGKILL).unwrap();
    if cluster.nodes[a].postmaster_pid().is_some() {
        cluster.kill_postgres(a).ok();
    }
    let new = cluster.wait_new_leader(a);
    wait_slots(&cluster, new, &["archiver:physical", "cdc:logical"], &[]);
    wait_slots(&cluster, first, &["backup_tool:physical"], &[]);

    // The dead member's key expires; member_slots_ttl (10 s) later its slot goes everywhere.
    let gone = member_slot(&cluster, a);
    for i in [first, b] {
        let r = wait_until(
            "the departed member's slot to go",
            Duration::from_secs(120),
            || (!slots(&cluster, i)?.contains(&gone)).then_some(()),
        );
        r.unwrap_or_else(|e| panic!("{e}: {:?}\n{}", slots(&cluster, i), cluster.diagnostics()));
    }
    let st = status(&cluster);
    assert!(!st.retain_slots.contains(&cluster.nodes[a].name), "{st:?}");
    wait_slots(
        &cluster,
        first,
        &["backup_tool:physical", "archiver:physical"],
        &[],
    );
}

/// A member tagged `replicatefrom` streams from that replica through its own slot there, so the
/// replica's slot for it is in use (and holds no WAL in vain).
#[test]
fn a_cascading_replica_streams_through_its_slot_on_its_upstream() {
    let options = ClusterOptions {
        extra_node_yaml: vec![
            String::new(),
            String::new(),
            "tags:\n  replicatefrom: node2\n".into(),
        ],
        ..Default::default()
    };
    let (cluster, leader) = operator_support::start(options);
    wait_settled(&cluster);
    // node2 and node3 must be replicas for node3 to cascade from node2.
    let (upstream, cascading) = (1, 2);
    if leader != 0 {
        cluster.request_switchover(&cluster.nodes[leader].name, Some(&cluster.nodes[0].name));
        wait_leader(&cluster, 0, HEALTHY);
    }
    let r = wait_until("node3 to stream from node2 through its slot", SLOTS_DUE, || {
        let receiver = cluster
            .psql(
                cascading,
                "SELECT slot_name || '@' || sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            )
            .ok()?;
        let in_use = cluster
            .psql(
                upstream,
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'node3'",
            )
            .ok()?;
        (receiver == format!("node3@{}", cluster.nodes[upstream].pg_port) && in_use == "t").then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}
