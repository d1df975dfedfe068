//! Synchronous replication details of `docs/patroni-compat.md` §4.9, set the way a Patroni user
//! sets them, with the real `patronictl edit-config`, and checked by what Patroni documents:
//! the `sync` key, `synchronous_standby_names` and commits that complete.
//!
//! * the synchronous standby stops: the key names the other streaming replica, also one that
//!   has just restarted and one with a `replicatefrom` tag;
//! * `maximum_lag_on_syncnode` drops a standby that stopped replaying (`remote_apply`);
//! * `synchronous_node_count: 2` names both replicas, in classic and quorum mode, and a change
//!   of the replication factor in quorum mode keeps every member in the key;
//! * strict quorum mode without a replica runs with `ANY 1 (*)`, as Patroni 4.1.5 sets it.

mod operator_support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use operator_support::{HEALTHY, patronictl};
use pgvigil_api::SyncValue;
use pgvigil_dcs::Dcs;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster, psql_at};
use pgvigil_testkit::wait_until;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
/// Generous: the rules act within a cycle or two (`loop_wait` is 2 s here); the time taken is
/// printed, not asserted (speed belongs to bench/).
const DUE: Duration = Duration::from_secs(90);

fn start(options: ClusterOptions) -> (TestCluster, usize) {
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    (cluster, leader)
}

/// `patronictl edit-config --force` with `-s key=value` for each setting (and `-p` for the
/// PostgreSQL parameters), as an operator would type it.
fn edit_config(cluster: &TestCluster, node: usize, set: &[&str], pg: &[&str]) {
    let mut args = vec!["edit-config", "--force"];
    for s in set {
        args.extend(["-s", s]);
    }
    for p in pg {
        args.extend(["-p", p]);
    }
    let run = patronictl(cluster, node, &args, None, Duration::from_secs(60));
    assert!(run.ok(), "patronictl {args:?} failed:\n{run}");
}

fn sync_key(cluster: &TestCluster) -> Option<SyncValue> {
    cluster.with_operator_dcs(async |dcs| dcs.get_cluster().await.ok()?.sync.map(|s| s.value))
}

fn ssn(cluster: &TestCluster, i: usize) -> Option<String> {
    cluster.psql(i, "SHOW synchronous_standby_names").ok()
}

fn names(cluster: &TestCluster, nodes: &[usize]) -> String {
    let mut names: Vec<&str> = nodes.iter().map(|&i| cluster.nodes[i].name.as_str()).collect();
    names.sort();
    names.join(",")
}

/// Waits until the `sync` key, owned by `leader`, lists exactly `standbys` with `quorum`, and
/// the leader runs with `guc`; returns how long that took.
fn wait_sync_state(
    cluster: &TestCluster,
    leader: usize,
    standbys: &[usize],
    quorum: u32,
    guc: &str,
) -> Duration {
    let started = Instant::now();
    let want = SyncValue {
        leader: Some(cluster.nodes[leader].name.clone()),
        quorum,
        sync_standby: (!standbys.is_empty()).then(|| names(cluster, standbys)),
    };
    let what = format!("sync key {want:?} and synchronous_standby_names {guc:?}");
    let r = wait_until(&what, DUE, || {
        (sync_key(cluster).as_ref() == Some(&want) && ssn(cluster, leader).as_deref() == Some(guc))
            .then_some(())
    });
    r.unwrap_or_else(|e| {
        panic!(
            "{e}; the key is {:?}, the GUC {:?}\n{}",
            sync_key(cluster),
            ssn(cluster, leader),
            cluster.diagnostics()
        )
    });
    started.elapsed()
}

/// Waits until the key names exactly one standby, owned by `leader`; returns its index.
fn wait_one_sync_standby(cluster: &TestCluster, leader: usize) -> usize {
    let r = wait_until("the sync key to name a standby", DUE, || {
        let key = sync_key(cluster)?;
        (key.leader.as_deref() == Some(cluster.nodes[leader].name.as_str())).then_some(())?;
        let members = key.members();
        match members.as_slice() {
            [one] => cluster.node_index(one),
            _ => None,
        }
    });
    r.unwrap_or_else(|e| {
        panic!(
            "{e}; the key is {:?}\n{}",
            sync_key(cluster),
            cluster.diagnostics()
        )
    })
}

/// A commit on `leader` completes (bounded: a commit left waiting for a standby fails the test).
fn commit_completes(cluster: &TestCluster, leader: usize, sql: &str) {
    let port = cluster.nodes[leader].pg_port;
    let sql = sql.to_string();
    let writer = std::thread::spawn(move || psql_at(port, &sql));
    let done = wait_until("the commit to complete", DUE, || {
        writer.is_finished().then_some(())
    });
    done.unwrap_or_else(|e| panic!("{e}: the commit waits for a standby\n{}", cluster.diagnostics()));
    writer
        .join()
        .expect("writer thread")
        .expect("the commit succeeds");
}

#[test]
fn the_sync_key_follows_the_streaming_replica_when_the_synchronous_standby_stops() {
    // node1 bootstraps alone; node3 streams from it by its `replicatefrom` tag (Patroni's
    // basic_replication feature does the same).
    let options = ClusterOptions {
        deferred: vec![1, 2],
        extra_node_yaml: vec![
            String::new(),
            String::new(),
            "tags:\n  replicatefrom: node1\n".into(),
        ],
        ..Default::default()
    };
    let (mut cluster, leader) = start(options);
    assert_eq!(leader, 0, "node1 is the only node started");
    cluster.start_agent(1).unwrap();
    cluster.start_agent(2).unwrap();
    cluster.wait_healthy(HEALTHY).unwrap();
    cluster.psql(leader, "CREATE TABLE t(id int)").unwrap();
    edit_config(&cluster, 1, &["synchronous_mode=on"], &[]);

    let first = wait_one_sync_standby(&cluster, leader);
    let other = 3 - first; // the replica that is not synchronous: 1 or 2
    for (stopped, next) in [(first, other), (other, first)] {
        // The synchronous standby shuts down: the other one (just restarted the second time
        // round, and one of the two has the replicatefrom tag) is named instead.
        let name = cluster.nodes[next].name.clone();
        cluster.signal_agent(stopped, Signal::SIGTERM).unwrap();
        let took = wait_sync_state(&cluster, leader, &[next], 0, &name);
        eprintln!(
            "{} stopped: {name} named after {took:?} (loop_wait {} s)",
            cluster.nodes[stopped].name, cluster.options.loop_wait
        );
        commit_completes(&cluster, leader, "INSERT INTO t VALUES (1)");
        cluster.start_agent(stopped).unwrap();
        cluster.wait_healthy(HEALTHY).unwrap();
    }
}

#[test]
fn maximum_lag_on_syncnode_drops_a_standby_that_stopped_replaying() {
    let (cluster, leader) = start(ClusterOptions::default());
    // Patroni's "check stuck sync replica": commits wait for the standbys to apply, and a
    // standby more than 15 MB behind the best one is no longer synchronous.
    edit_config(
        &cluster,
        leader,
        &["synchronous_mode=on", "maximum_lag_on_syncnode=15000000"],
        &["synchronous_commit=remote_apply"],
    );
    let stuck = wait_one_sync_standby(&cluster, leader);
    let other = (0..3).find(|&i| i != leader && i != stuck).unwrap();
    let r = wait_until("synchronous_commit = remote_apply", DUE, || {
        (cluster.psql(leader, "SHOW synchronous_commit").ok()? == "remote_apply").then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    cluster.psql(leader, "CREATE TABLE mytest(x numeric)").unwrap();

    cluster.psql(stuck, "SELECT pg_wal_replay_pause()").unwrap();
    // About 30 MB of WAL in one commit: it waits for the paused standby until it is dropped.
    let port = cluster.nodes[leader].pg_port;
    let load = std::thread::spawn(move || {
        psql_at(
            port,
            "INSERT INTO mytest SELECT r::numeric FROM generate_series(1, 400000) r",
        )
    });
    let other_name = cluster.nodes[other].name.clone();
    let took = wait_sync_state(&cluster, leader, &[other], 0, &other_name);
    eprintln!("the paused standby was replaced after {took:?}");
    let done = wait_until("the load to commit", DUE, || load.is_finished().then_some(()));
    done.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    load.join().unwrap().expect("the load commits");
    cluster.psql(stuck, "SELECT pg_wal_replay_resume()").unwrap();
}

#[test]
fn synchronous_node_count_names_every_standby_in_classic_and_quorum_mode() {
    let (cluster, leader) = start(ClusterOptions::default());
    let replicas: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let both = names(&cluster, &replicas);
    // Classic mode waiting for two standbys: `2 (a,b)`, both in the key.
    edit_config(
        &cluster,
        leader,
        &["synchronous_mode=on", "synchronous_node_count=2"],
        &[],
    );
    wait_sync_state(&cluster, leader, &replicas, 0, &format!("2 ({both})"));
    commit_completes(&cluster, leader, "CREATE TABLE t(id int)");

    // Quorum mode: the key lists every quorum member whatever the replication factor;
    // numsync + quorum = number of members (Patroni's quorum_commit feature).
    edit_config(&cluster, leader, &["synchronous_mode=quorum"], &[]);
    wait_sync_state(&cluster, leader, &replicas, 0, &format!("ANY 2 ({both})"));
    edit_config(&cluster, leader, &["synchronous_node_count=1"], &[]);
    wait_sync_state(&cluster, leader, &replicas, 1, &format!("ANY 1 ({both})"));
    commit_completes(&cluster, leader, "INSERT INTO t VALUES (1)");
    edit_config(&cluster, leader, &["synchronous_node_count=2"], &[]);
    wait_sync_state(&cluster, leader, &replicas, 0, &format!("ANY 2 ({both})"));
    commit_completes(&cluster, leader, "INSERT INTO t VALUES (2)");
}

#[test]
fn strict_quorum_mode_without_a_replica_waits_for_any_standby() {
    let (mut cluster, leader) = start(ClusterOptions::default());
    let replicas: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &r in &replicas {
        cluster.signal_agent(r, Signal::SIGTERM).unwrap();
    }
    // Patroni's quorum_commit feature: quorum mode alone, then strict.
    edit_config(&cluster, leader, &["synchronous_mode=quorum"], &[]);
    wait_sync_state(&cluster, leader, &[], 0, "");
    edit_config(&cluster, leader, &["synchronous_mode_strict=true"], &[]);
    wait_sync_state(&cluster, leader, &[], 0, "ANY 1 (*)");

    // A replica returns: it is named, and commits complete.
    let back = replicas[0];
    cluster.start_agent(back).unwrap();
    let name = cluster.nodes[back].name.clone();
    wait_sync_state(&cluster, leader, &[back], 0, &format!("ANY 1 ({name})"));
    commit_completes(&cluster, leader, "CREATE TABLE t(id int)");
}
