//! Copies of a permanent logical slot on replicas, on real PostgreSQL 15 and etcd
//! (`docs/patroni-compat.md` §5.8): added with the real `patronictl edit-config` as a Patroni user
//! writes it, copied to the replicas, kept at the position the consumer confirmed on the primary,
//! and still there at that position on the new primary after a failover, so the changes the
//! consumer had not confirmed are decoded from it.

mod operator_support;

use std::time::Duration;

use nix::sys::signal::Signal;
use operator_support::{patronictl, wait_settled};
use pgvigil_testkit::cluster::ClusterOptions;
use pgvigil_testkit::cluster::TestCluster;
use pgvigil_testkit::wait_until;

/// A copy involves reading the primary, a restart of the replica and then a cycle or two.
const COPY_DUE: Duration = Duration::from_secs(120);

/// `confirmed_flush_lsn` of slot `cdc` on node `i`, as a number.
fn confirmed(cluster: &TestCluster, i: usize) -> Option<u64> {
    cluster
        .psql(
            i,
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots
              WHERE slot_name = 'cdc' AND slot_type = 'logical' AND database = 'postgres'",
        )
        .ok()?
        .parse()
        .ok()
}

/// What the primary's consumer takes: every change up to now, confirmed. Returns the rows'
/// payloads and the slot's confirmed position afterwards.
fn consume(cluster: &TestCluster, primary: usize) -> (Vec<String>, u64) {
    let rows = cluster
        .psql(
            primary,
            "SELECT coalesce(string_agg(data, E'\\n'), '') FROM pg_logical_slot_get_changes('cdc', NULL, NULL)
              WHERE data LIKE 'table public.events: INSERT%'",
        )
        .unwrap_or_else(|e| panic!("consuming from cdc: {e}\n{}", cluster.diagnostics()));
    let at = confirmed(cluster, primary).expect("cdc on the primary");
    (rows.lines().map(str::to_string).collect(), at)
}

fn insert(cluster: &TestCluster, primary: usize, what: &str) {
    cluster
        .psql(primary, &format!("INSERT INTO events VALUES ('{what}')"))
        .unwrap_or_else(|e| panic!("insert {what}: {e}"));
}

/// Waits until every replica's copy of `cdc` is exactly at `at` (advanced there, not past).
fn wait_copies_at(cluster: &TestCluster, replicas: &[usize], at: u64) {
    for &i in replicas {
        let what = format!("{}'s copy of cdc at {at}", cluster.nodes[i].name);
        let r = wait_until(&what, COPY_DUE, || (confirmed(cluster, i)? == at).then_some(()));
        r.unwrap_or_else(|e| {
            panic!(
                "{e}: it is at {:?}\n{}",
                confirmed(cluster, i),
                cluster.diagnostics()
            )
        });
    }
}

/// Waits until node `i` has replayed everything the primary wrote so far.
fn wait_replayed(cluster: &TestCluster, primary: usize, i: usize) {
    let target = cluster
        .psql(primary, "SELECT pg_current_wal_flush_lsn()")
        .expect("primary position");
    let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
    let r = wait_until("the replica to replay the last insert", COPY_DUE, || {
        (cluster.psql(i, &sql).ok()? == "t").then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

/// Adds the permanent slot `cdc` as a Patroni user does, through `patronictl` on node `via`,
/// and waits until the primary has it.
fn add_permanent_slot(cluster: &TestCluster, via: usize, primary: usize) {
    let args = [
        "edit-config",
        "--force",
        "-s",
        "slots.cdc.type=logical",
        "-s",
        "slots.cdc.database=postgres",
        "-s",
        "slots.cdc.plugin=test_decoding",
    ];
    let run = patronictl(cluster, via, &args, None, Duration::from_secs(60));
    assert!(run.ok(), "patronictl edit-config failed: {run:?}");
    let r = wait_until("cdc on the primary", COPY_DUE, || confirmed(cluster, primary));
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

fn options(extra_node_yaml: Vec<String>, deferred: Vec<usize>) -> ClusterOptions {
    ClusterOptions {
        // Continues `bootstrap.dcs.postgresql.parameters`: logical slots need it on every node.
        extra_dcs: "        wal_level: logical\n".into(),
        extra_node_yaml,
        deferred,
        ..Default::default()
    }
}

#[test]
fn a_permanent_logical_slot_is_copied_to_replicas_and_survives_a_failover_at_its_confirmed_position() {
    let (mut cluster, primary) = operator_support::start(options(Vec::new(), Vec::new()));
    wait_settled(&cluster);
    let replicas = operator_support::others(&cluster, primary);
    cluster
        .psql(primary, "CREATE TABLE events (what text)")
        .expect("create table");
    add_permanent_slot(&cluster, replicas[0], primary);

    // A consumer reads the first changes on the primary.
    insert(&cluster, primary, "one");
    let (rows, first) = consume(&cluster, primary);
    assert_eq!(rows.len(), 1, "{rows:?}");

    // The replicas get the slot (copied: a replica cannot create one) with the feedback that
    // protects its catalog rows on the primary, and follow the consumer's position.
    for &i in &replicas {
        let what = format!("{} to have a copy of cdc", cluster.nodes[i].name);
        let r = wait_until(&what, COPY_DUE, || confirmed(&cluster, i));
        r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
        let feedback = cluster.psql(i, "SHOW hot_standby_feedback").expect("SHOW");
        assert_eq!(feedback, "on", "{}", cluster.nodes[i].name);
    }
    wait_copies_at(&cluster, &replicas, first);
    insert(&cluster, primary, "two");
    let (rows, second) = consume(&cluster, primary);
    assert!(rows.len() == 1 && rows[0].contains("'two'"), "{rows:?}");
    assert!(second > first);
    wait_copies_at(&cluster, &replicas, second);
    // Each replica found its copy safe to use after a failover: the primary's slot protected
    // the catalog rows until this replica's feedback did.
    for &i in &replicas {
        let log = &cluster.nodes[i].log;
        let what = format!("{} to find its copy safe", cluster.nodes[i].name);
        let r = wait_until(&what, COPY_DUE, || {
            let text = std::fs::read_to_string(log).ok()?;
            text.contains("logical slot is safe to be used after a failover")
                .then_some(())
        });
        r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    }

    // Written but not consumed when the primary dies.
    insert(&cluster, primary, "three");
    for &i in &replicas {
        wait_replayed(&cluster, primary, i);
    }
    cluster.signal_agent(primary, Signal::SIGKILL).unwrap();
    if cluster.nodes[primary].postmaster_pid().is_some() {
        cluster.kill_postgres(primary).ok();
    }
    let new = cluster.wait_new_leader(primary);

    // The new primary's slot is the copy, at the consumer's last confirmed position: the
    // consumer goes on with exactly what it had not confirmed.
    assert_eq!(
        confirmed(&cluster, new),
        Some(second),
        "{}",
        cluster.diagnostics()
    );
    let (rows, _) = consume(&cluster, new);
    assert!(
        rows.len() == 1 && rows[0].contains("'three'"),
        "{rows:?}\n{}",
        cluster.diagnostics()
    );
    insert(&cluster, new, "four");
    let (rows, _) = consume(&cluster, new);
    assert!(rows.len() == 1 && rows[0].contains("'four'"), "{rows:?}");
}

/// A `nostream` member sends no feedback to the primary through a slot, so a copy there would
/// not be safe to use: it gets none (issue 12 item 5), and no `hot_standby_feedback` either.
#[test]
fn a_nostream_member_gets_no_copy_of_a_permanent_logical_slot() {
    // node3 starts once another node leads, so it never bootstraps the cluster.
    let nostream = 2;
    let tags = vec![String::new(), String::new(), "tags:\n  nostream: true\n".into()];
    let (mut cluster, primary) = operator_support::start(options(tags, vec![nostream]));
    cluster.start_agent(nostream).expect("node3 starts");
    // node3 never streams (it would replay from an archive; there is none here): it runs as a
    // replica on what its base backup brought.
    let name = cluster.nodes[nostream].name.clone();
    let running = wait_until("node3 to run as a replica", operator_support::HEALTHY, || {
        let m = operator_support::member(&cluster, &name)?;
        (m["state"] == "running" && m["role"] == "replica").then_some(())
    });
    running.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let replica = 1 - primary;
    cluster
        .psql(primary, "CREATE TABLE events (what text)")
        .expect("create table");
    add_permanent_slot(&cluster, replica, primary);

    // Two positions for the other replica's copy to follow: node3 has run its cycles meanwhile.
    for what in ["one", "two"] {
        insert(&cluster, primary, what);
        let (_, at) = consume(&cluster, primary);
        wait_copies_at(&cluster, &[replica], at);
    }
    let slots = cluster
        .psql(
            nostream,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
        )
        .expect("node3's slots");
    assert_eq!(slots, "0", "{}", cluster.diagnostics());
    let feedback = cluster.psql(nostream, "SHOW hot_standby_feedback").expect("SHOW");
    assert_eq!(feedback, "off");
    let feedback = cluster.psql(replica, "SHOW hot_standby_feedback").expect("SHOW");
    assert_eq!(feedback, "on");
}
