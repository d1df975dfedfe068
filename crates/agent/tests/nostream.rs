//! The `nostream` tag on real PostgreSQL 15, etcd and the real `patronictl` 4.1.5
//! (`docs/patroni-compat.md` §3.7, §5.7, §1.3.1): a member that never streams and replays what
//! the primary archives, through its `postgresql.recovery_conf.restore_command`, reported
//! `in archive recovery` while the others stream; it stays so across an agent restart and a
//! switchover (the new timeline reaches it through the archive too).

mod operator_support;

use std::time::Duration;

use nix::sys::signal::Signal;
use operator_support::{HEALTHY, member, patronictl, pgvigilctl};
use pgvigil_dcs::Dcs;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::{shared_tmp_dir, wait_until};
use serde_json::Value;

/// Archive recovery retries a missing segment every `wal_retrieve_retry_interval` (5 s), and
/// the archiver runs on its own schedule: generous, the waits end as soon as the row is there.
const REPLAYED: Duration = Duration::from_secs(120);
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// The member tagged `nostream`; its agent starts once the other two run.
const NOSTREAM: usize = 2;

/// `replication_state` and `state` of every member key in etcd, by name.
fn member_states(cluster: &TestCluster) -> Vec<(String, Option<String>, String)> {
    let view = cluster.with_operator_dcs(async |dcs| dcs.get_cluster().await.ok());
    let mut states: Vec<_> = view
        .map(|v| v.members)
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.name, m.data.replication_state, m.data.state))
        .collect();
    states.sort();
    states
}

/// Waits until the member keys say: the leader without a `replication_state`, the streaming
/// replica `streaming`, the nostream member `in archive recovery`, all running.
fn wait_member_keys(cluster: &TestCluster, leader: usize, streaming: usize) {
    let name = |i: usize| cluster.nodes[i].name.clone();
    let mut want = vec![
        (name(leader), None, "running".to_string()),
        (
            name(streaming),
            Some("streaming".to_string()),
            "running".to_string(),
        ),
        (
            name(NOSTREAM),
            Some("in archive recovery".to_string()),
            "running".to_string(),
        ),
    ];
    want.sort();
    let r = wait_until(
        "the member keys to report the replication states",
        HEALTHY,
        || (member_states(cluster) == want).then_some(()),
    );
    r.unwrap_or_else(|e| {
        panic!(
            "{e}; they say {:?}\n{}",
            member_states(cluster),
            cluster.diagnostics()
        )
    });
}

/// Inserts `value` on the leader, switches WAL so the segment is archived, and waits until
/// the nostream member has replayed it.
fn write_and_wait_replayed(cluster: &TestCluster, leader: usize, value: &str) {
    cluster
        .psql(leader, &format!("INSERT INTO archived VALUES ('{value}')"))
        .unwrap();
    cluster.psql(leader, "SELECT pg_switch_wal()").unwrap();
    let query = format!("SELECT count(*) FROM archived WHERE v = '{value}'");
    let r = wait_until(
        &format!("row {value} replayed from the archive"),
        REPLAYED,
        || (cluster.psql(NOSTREAM, &query).ok()? == "1").then_some(()),
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

/// What shows that the nostream member never streams: no WAL receiver and no
/// `primary_conninfo` on it, no walsender and no slot for it on the leader, while the leader
/// has both for the streaming replica.
fn assert_not_streaming(cluster: &TestCluster, leader: usize, streaming: usize) {
    let nostream = &cluster.nodes[NOSTREAM].name;
    let q = |i: usize, sql: &str| cluster.psql(i, sql).unwrap();
    assert_eq!(q(NOSTREAM, "SELECT count(*) FROM pg_stat_wal_receiver"), "0");
    assert_eq!(q(NOSTREAM, "SELECT current_setting('primary_conninfo')"), "");
    assert_eq!(q(NOSTREAM, "SELECT current_setting('primary_slot_name')"), "");
    assert_eq!(q(NOSTREAM, "SELECT pg_is_in_recovery()"), "t");
    let senders = "SELECT coalesce(string_agg(application_name, ',' ORDER BY application_name), '')
                     FROM pg_stat_replication";
    assert_eq!(q(leader, senders), cluster.nodes[streaming].name);
    let slot = |name: &str| {
        let slot = pgvigil_postgres::slot_name_for(name);
        q(
            leader,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
    };
    assert_eq!(slot(&cluster.nodes[streaming].name), "1");
    assert_eq!(slot(nostream), "0", "the leader keeps a slot for {nostream}");
}

/// `list -f json` of the real `patronictl`, or of `pgvigilctl` (`ours`): `(Member, Role,
/// State)` rows, sorted.
fn list(cluster: &TestCluster, ours: bool) -> Vec<(String, String, String)> {
    let args = ["list", "-f", "json"];
    let run = if ours {
        pgvigilctl(cluster, 0, &args, None, CTL_TIMEOUT)
    } else {
        patronictl(cluster, 0, &args, None, CTL_TIMEOUT)
    };
    let run = run.expect_ok("list");
    let rows: Vec<Value> =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout));
    let mut rows: Vec<_> = rows
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (field("Member"), field("Role"), field("State"))
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn a_nostream_member_recovers_from_the_archive_only_and_says_so() {
    let archive = shared_tmp_dir("archive").expect("temporary directory");
    let dir = archive.path().display();
    let options = ClusterOptions {
        // Continues `bootstrap.dcs.postgresql.parameters`: the primary archives every segment.
        extra_dcs: format!(
            "        archive_mode: 'on'\n        archive_command: 'test ! -f {dir}/%f && cp %p {dir}/%f'\n"
        ),
        extra_node_yaml: vec![String::new(), String::new(), "tags:\n  nostream: true\n".into()],
        extra_postgresql_yaml: vec![
            String::new(),
            String::new(),
            format!("  recovery_conf:\n    restore_command: 'cp {dir}/%f %p'\n"),
        ],
        // The two streaming members elect the leader; the nostream one joins them.
        deferred: vec![NOSTREAM],
        ..Default::default()
    };
    let (mut cluster, leader) = operator_support::start(options);
    assert_ne!(leader, NOSTREAM);
    let streaming = 1 - leader;
    cluster
        .psql(leader, "CREATE TABLE archived (v text PRIMARY KEY)")
        .unwrap();

    cluster.start_agent(NOSTREAM).unwrap();
    wait_member_keys(&cluster, leader, streaming);
    write_and_wait_replayed(&cluster, leader, "first");
    assert_not_streaming(&cluster, leader, streaming);

    // The real patronictl (and pgvigilctl) show the member key's replication state in the
    // State column.
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let name = |i: usize| names[i].clone();
    let mut want = vec![
        (name(leader), "Leader".to_string(), "running".to_string()),
        (name(streaming), "Replica".to_string(), "streaming".to_string()),
        (
            name(NOSTREAM),
            "Replica".to_string(),
            "in archive recovery".to_string(),
        ),
    ];
    want.sort();
    assert_eq!(list(&cluster, false), want);
    assert_eq!(list(&cluster, true), want);

    // An agent restart (PostgreSQL stopped and started again) changes nothing.
    let old_postmaster = cluster.nodes[NOSTREAM].postmaster_pid();
    cluster.signal_agent(NOSTREAM, Signal::SIGTERM).unwrap();
    assert_eq!(cluster.nodes[NOSTREAM].postmaster_pid(), None);
    // Its key says so (or is gone with its lease) before the new agent writes it again.
    let gone = wait_until("the stopped member's key to stop saying running", HEALTHY, || {
        let states = member_states(&cluster);
        let own = states.iter().find(|(n, _, _)| *n == cluster.nodes[NOSTREAM].name);
        own.is_none_or(|(_, _, state)| state != "running").then_some(())
    });
    gone.unwrap_or_else(|e| panic!("{e}: {:?}", member_states(&cluster)));
    cluster.start_agent(NOSTREAM).unwrap();
    let r = wait_until("the nostream member's PostgreSQL to run again", HEALTHY, || {
        cluster.nodes[NOSTREAM]
            .postmaster_pid()
            .filter(|pid| Some(*pid) != old_postmaster)
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    wait_member_keys(&cluster, leader, streaming);
    write_and_wait_replayed(&cluster, leader, "second");
    assert_not_streaming(&cluster, leader, streaming);
    assert_eq!(list(&cluster, false), want);

    // A switchover to the streaming replica: the nostream member finds the new timeline's
    // history and WAL in the archive and goes on replaying, still streaming from nobody.
    let r = wait_until("the candidate to have no lag", HEALTHY, || {
        (member(&cluster, &name(streaming))?["lag"] == 0).then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let run = patronictl(
        &cluster,
        0,
        &[
            "switchover",
            "--leader",
            &name(leader),
            "--candidate",
            &name(streaming),
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    );
    run.expect_ok("patronictl switchover");
    let (leader, streaming) = (streaming, leader);
    wait_member_keys(&cluster, leader, streaming);
    let r = wait_until("the new leader to accept writes", HEALTHY, || {
        (cluster.psql(leader, "SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    write_and_wait_replayed(&cluster, leader, "third");
    assert_eq!(
        cluster.psql(NOSTREAM, "SELECT count(*) FROM archived").unwrap(),
        "3"
    );
    assert_not_streaming(&cluster, leader, streaming);
}
