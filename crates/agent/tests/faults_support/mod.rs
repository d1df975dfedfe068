//! Shared by the `faults_*` scenarios: a three-host cluster in network namespaces (etcd member,
//! PostgreSQL and pgvigil per host; `pgvigil router` and the checker in the root namespace),
//! in synchronous mode, with the checker running.
//!
//! The scenarios need root (namespaces, veth, iptables) and are serialized: within one test
//! binary by [`serial`], across nextest processes by the `netlab` test group
//! (`.config/nextest.toml`). Each lab also takes its own address slot, so even unserialized
//! runs would not clash, only compete for the two cores.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use pgvigil_testkit::checker::Checker;
use pgvigil_testkit::netcluster::{AgentKind, NetCluster, NetOptions};

pub const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
pub const HEALTHY: Duration = Duration::from_secs(180);
/// How long a scenario waits for a new leader after a fault: a lease expiry plus a race.
pub const FAILOVER: Duration = Duration::from_secs(120);
/// `bootstrap.dcs` lines every scenario uses: classic synchronous replication.
pub const SYNC: &str = "    synchronous_mode: on\n";

/// One scenario at a time per test binary.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this process may build network namespaces. Outside CI a scenario returns early
/// (skipped, and says so); with `CI` set it fails: CI runs as root, so a lab that cannot run
/// there is a broken CI, not a passing test.
pub fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the network lab needs root, and CI must run it"
        );
        eprintln!("skipped: the network lab needs root");
        return false;
    }
    true
}

/// Options with no timing settings in the file (Patroni's defaults: ttl 30, loop_wait 10,
/// retry_timeout 10), synchronous mode `on` or off, and the router.
pub fn defaults(synchronous: bool) -> NetOptions {
    NetOptions {
        extra_dcs: if synchronous { SYNC.into() } else { String::new() },
        router: Some(AGENT.into()),
        ..Default::default()
    }
    .with_default_timings()
}

/// The index of the member `/cluster` shows as synchronous (or quorum) standby.
pub fn sync_standby(cluster: &NetCluster) -> Option<usize> {
    let doc = cluster.cluster_doc()?;
    doc.get("members")?
        .as_array()?
        .iter()
        .find(|m| matches!(m["role"].as_str(), Some("sync_standby" | "quorum_standby")))
        .and_then(|m| cluster.node_index(m["name"].as_str()?))
}

/// Whether host `i`'s agent log says it took the leader key over from a silent leader.
pub fn took_over(cluster: &NetCluster, i: usize) -> bool {
    std::fs::read_to_string(&cluster.nodes[i].log).is_ok_and(|log| log.contains("took over the leader key"))
}

pub fn options(extra_dcs: &str) -> NetOptions {
    NetOptions {
        extra_dcs: format!("{SYNC}{extra_dcs}"),
        router: Some(AGENT.into()),
        ..Default::default()
    }
}

/// Starts the cluster, waits until it is healthy, creates the checker's tables and starts the
/// checker; returns once writes flow through the router.
pub fn start(options: NetOptions) -> (NetCluster, usize, Checker) {
    let cluster =
        NetCluster::start(AgentKind::Pgvigil(AGENT.into()), options).expect("the lab cluster starts");
    let leader = cluster
        .wait_healthy(HEALTHY)
        .expect("the cluster becomes healthy");
    if synchronous(&cluster) {
        wait_sync_standby(&cluster);
    }
    let checker = cluster
        .start_checker(leader)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    (cluster, leader, checker)
}

/// Whether the cluster runs with synchronous replication (`on` or `quorum`).
pub fn synchronous(cluster: &NetCluster) -> bool {
    let dcs = &cluster.options.extra_dcs;
    dcs.contains("synchronous_mode: on") || dcs.contains("synchronous_mode: quorum")
}

/// Waits (bounded) until `/cluster` shows a synchronous standby. Returns false (and says so)
/// when none appears: the agent may not implement synchronous replication yet.
pub fn wait_sync_standby(cluster: &NetCluster) -> bool {
    let r = pgvigil_testkit::wait_until("a synchronous standby", Duration::from_secs(60), || {
        let doc = cluster.cluster_doc()?;
        let members = doc.get("members")?.as_array()?;
        members
            .iter()
            .any(|m| matches!(m["role"].as_str(), Some("sync_standby" | "quorum_standby")))
            .then_some(())
    });
    if r.is_err() {
        eprintln!("warning: no synchronous standby after 60 s; running asynchronously");
    }
    r.is_ok()
}

/// `check!(cluster, expr)`: the value of `expr` (an `anyhow::Result`), or a panic with the
/// error and the cluster's diagnostics. `expr` is evaluated first, so it may borrow the
/// cluster mutably.
macro_rules! check {
    ($cluster:expr, $e:expr) => {{
        let result = $e;
        match result {
            Ok(v) => v,
            Err(e) => panic!("{e:#}\n{}", $cluster.diagnostics()),
        }
    }};
}
pub(crate) use check;

/// The index of some node that is not `leader`.
pub fn a_replica(cluster: &NetCluster, leader: usize) -> usize {
    (0..cluster.nodes.len())
        .find(|&i| i != leader)
        .expect("three nodes")
}

/// Asserts that host `i` does not run a primary (it may run a replica or nothing).
pub fn assert_not_primary(cluster: &NetCluster, i: usize, what: &str) {
    assert_ne!(
        cluster.psql(i, "SELECT pg_is_in_recovery()").ok().as_deref(),
        Some("f"),
        "{what}"
    );
}

/// Heals host `cut_off`, waits for a healthy cluster and runs the checker's assertions (never
/// two writable nodes; with synchronous replication, nothing acknowledged lost); the leader
/// must still be `leader`.
pub fn heal_and_verify(cluster: &NetCluster, checker: Checker, cut_off: usize, leader: usize) {
    checker.mark("partition healed");
    check!(cluster, cluster.heal(cut_off));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    let report = checker.finish();
    let expect = pgvigil_testkit::netcluster::Expect {
        zero_loss: synchronous(cluster),
        ..Default::default()
    };
    let now = check!(cluster, cluster.verify(&report, expect));
    assert_eq!(now, leader);
}

/// A directory of links to the installed PostgreSQL tools in which `tool` is the shell script
/// `script` instead (for `postgresql.bin_dir`); the script can reach the real tools in
/// `{real}`, which it is formatted with.
pub fn wrapped_bin_dir(tool: &str, script: impl Fn(&std::path::Path) -> String) -> tempfile::TempDir {
    let real = pgvigil_testkit::netcluster::pg_bin_dir().expect("PostgreSQL is installed");
    let dir = tempfile::Builder::new()
        .prefix(&format!("pgvigil-wrapped-{tool}-"))
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != tool {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let wrapper = dir.path().join(tool);
    std::fs::write(&wrapper, script(&real)).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}
