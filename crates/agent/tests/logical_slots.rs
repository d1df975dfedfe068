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

#[test]
fn a_permanent_logical_slot_is_copied_to_replicas_and_survives_a_failover_at_its_confirmed_position() {
    let options = ClusterOptions {
        // Continues `bootstrap.dcs.postgresql.parameters`: logical slots need it on every node.
        extra_dcs: "        wal_level: logical\n".into(),
        ..Default::default()
    };
    let (mut cluster, primary) = operator_support::start(options);
    wait_settled(&cluster);
    let replicas = operator_support::others(&cluster, primary);
    cluster
        .psql(primary, "CREATE TABLE events (what text)")
        .expect("create table");

    // The permanent slot as a Patroni user adds it.
    let run = patronictl(
        &cluster,
        replicas[0],
        &[
            "edit-config",
            "--force",
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
    let r = wait_until("cdc on the primary", COPY_DUE, || confirmed(&cluster, primary));
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));

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
