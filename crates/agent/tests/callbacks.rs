//! Patroni's user scripts on a real cluster (`docs/patroni-compat.md` §5.9, §5.6, §5.1): every
//! callback is a shell script appending its arguments to the node's log, `before_stop` notes
//! whether PostgreSQL still runs, `pre_promote` notes that it ran and exits with the code its
//! node's verdict file holds (0 without one).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::{http, test_tmp_root, wait_until};

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(180);

const CALLBACK: &str = r#"#!/bin/sh
log="$1"; shift
echo "$*" >> "$log"
"#;

const BEFORE_STOP: &str = r#"#!/bin/sh
pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  echo "before_stop postgres-running" >> "$1"
else
  echo "before_stop postgres-not-running" >> "$1"
fi
"#;

/// A callback that never ends on its own; notes its pid (it leads its own process group).
const HANG: &str = r#"#!/bin/sh
echo "$$" >> "$1"
exec sleep 600
"#;

const PRE_PROMOTE: &str = r#"#!/bin/sh
echo "pre_promote" >> "$1"
exit "$(cat "$2" 2>/dev/null || echo 0)"
"#;

/// The scripts and the nodes' logs, in a directory the agents (user `postgres` when the tests
/// run as root) can write to.
struct Scripts {
    dir: tempfile::TempDir,
}

impl Scripts {
    fn new() -> Scripts {
        let dir = tempfile::Builder::new()
            .prefix("pgvigil-callbacks-")
            .tempdir_in(test_tmp_root())
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        for (name, text) in [
            ("cb.sh", CALLBACK),
            ("stop.sh", BEFORE_STOP),
            ("fence.sh", PRE_PROMOTE),
            ("hang.sh", HANG),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Scripts { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self, node: usize) -> PathBuf {
        self.path(&format!("node{}.log", node + 1))
    }

    fn verdict(&self, node: usize) -> PathBuf {
        self.path(&format!("node{}.verdict", node + 1))
    }

    /// The `postgresql:` lines of node `i` (data directory as the test cluster lays it out).
    fn pg_yaml(&self, cluster_root_hint: &Path, i: usize) -> String {
        let cb = format!("{} {}", self.path("cb.sh").display(), self.log(i).display());
        let data = cluster_root_hint.join(format!("node{}", i + 1)).join("data");
        format!(
            "  callbacks:\n    on_start: {cb}\n    on_stop: {cb}\n    on_restart: {cb}\n    on_reload: {cb}\n    \
             on_role_change: {cb}\n  before_stop: {} {} {}\n  pre_promote: {} {} {}\n",
            self.path("stop.sh").display(),
            self.log(i).display(),
            data.display(),
            self.path("fence.sh").display(),
            self.log(i).display(),
            self.verdict(i).display(),
        )
    }

    fn lines(&self, node: usize) -> Vec<String> {
        std::fs::read_to_string(self.log(node))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until node `i`'s log has `line` after its first `from` lines; returns those new lines.
    fn wait_for(&self, cluster: &TestCluster, i: usize, from: usize, line: &str) -> Vec<String> {
        let found = wait_until(
            &format!("node{} to log `{line}`", i + 1),
            Duration::from_secs(90),
            || {
                let lines = self.lines(i);
                lines[from.min(lines.len())..]
                    .iter()
                    .any(|l| l == line)
                    .then_some(())
            },
        );
        found.unwrap_or_else(|e| panic!("{e}\nlogs: {:?}\n{}", self.all(), cluster.diagnostics()));
        self.lines(i)[from..].to_vec()
    }

    fn all(&self) -> Vec<Vec<String>> {
        (0..3).map(|i| self.lines(i)).collect()
    }
}

/// A three-node cluster whose nodes run the scripts. The cluster's root directory is only known
/// once it starts, so the `before_stop` script finds the data directory through a symlink.
fn start(scripts: &Scripts) -> TestCluster {
    let link = scripts.path("cluster");
    let options = ClusterOptions {
        extra_postgresql_yaml: (0..3).map(|i| scripts.pg_yaml(&link, i)).collect(),
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    std::os::unix::fs::symlink(cluster.root(), &link).unwrap();
    cluster
}

/// Waits until a node `allowed` accepts holds the leader key and runs as a primary.
fn primary_leader(cluster: &TestCluster, who: &str, allowed: impl Fn(usize) -> bool) -> usize {
    let leads = wait_until(&format!("{who} to lead"), Duration::from_secs(120), || {
        let l = cluster.leader().filter(|&l| allowed(l))?;
        (cluster.psql(l, "SELECT pg_is_in_recovery()").ok()? == "f").then_some(l)
    });
    leads.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()))
}

/// [`start`], then waits for health: the cluster, its leader and the two replicas.
fn start_healthy(scripts: &Scripts) -> (TestCluster, usize, Vec<usize>) {
    let cluster = start(scripts);
    let leader = cluster.wait_healthy(HEALTHY).unwrap();
    let replicas = (0..3).filter(|&i| i != leader).collect();
    (cluster, leader, replicas)
}

fn line(event: &str, role: &str, cluster: &TestCluster) -> String {
    format!("{event} {role} {}", cluster.scope)
}

#[test]
fn callbacks_get_patronis_arguments_on_start_restart_reload_switchover_and_stop() {
    let scripts = Scripts::new();
    let (mut cluster, leader, replicas) = start_healthy(&scripts);
    let (candidate, other) = (replicas[0], replicas[1]);

    // Start: the bootstrapping leader once it is up, the replicas once cloned and started.
    let on_start_primary = line("on_start", "primary", &cluster);
    let started = scripts.wait_for(&cluster, leader, 0, &on_start_primary);
    assert_eq!(started, [on_start_primary]);
    for &r in &replicas {
        let on_start = line("on_start", "replica", &cluster);
        assert_eq!(scripts.wait_for(&cluster, r, 0, &on_start), [on_start]);
    }

    // POST /restart: before_stop while PostgreSQL still runs, then on_restart alone.
    let seen = scripts.lines(candidate).len();
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.nodes[candidate].api_port));
    let r = http::request_within(
        api,
        "POST",
        "/restart",
        Some("{}"),
        None,
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let on_restart = line("on_restart", "replica", &cluster);
    assert_eq!(
        scripts.wait_for(&cluster, candidate, seen, &on_restart),
        ["before_stop postgres-running".to_string(), on_restart]
    );

    // A changed parameter reloads every node: on_reload with each node's role.
    let seen: Vec<usize> = (0..3).map(|i| scripts.lines(i).len()).collect();
    let body = r#"{"postgresql": {"parameters": {"work_mem": "7MB"}}}"#;
    let r = http::request(
        cluster.nodes[leader].api_port,
        "PATCH",
        "/config",
        Some(body),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    for (i, &from) in seen.iter().enumerate() {
        let role = if i == leader { "primary" } else { "replica" };
        let on_reload = line("on_reload", role, &cluster);
        assert_eq!(scripts.wait_for(&cluster, i, from, &on_reload), [on_reload]);
    }

    // Switchover: the old leader stops (demoted) and comes back as a replica; the candidate's
    // pre_promote allows the promotion, then on_role_change primary.
    let seen: Vec<usize> = (0..3).map(|i| scripts.lines(i).len()).collect();
    cluster.request_switchover(&cluster.nodes[leader].name, Some(&cluster.nodes[candidate].name));
    let promoted = line("on_role_change", "primary", &cluster);
    assert_eq!(
        scripts.wait_for(&cluster, candidate, seen[candidate], &promoted),
        ["pre_promote".to_string(), promoted]
    );
    let demoted = line("on_role_change", "replica", &cluster);
    let old_leader = scripts.wait_for(&cluster, leader, seen[leader], &demoted);
    assert_eq!(
        old_leader[..3],
        [
            "before_stop postgres-running".to_string(),
            line("on_stop", "demoted", &cluster),
            demoted
        ]
    );
    // Then at most a reload, when it started before the new leader published its address and
    // re-pointed its replication afterwards.
    let on_reload = line("on_reload", "replica", &cluster);
    assert!(old_leader[3..].iter().all(|l| *l == on_reload), "{old_leader:?}");
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), candidate);
    // The third node only re-pointed its replication (a reload), never ran pre_promote.
    assert!(
        !scripts.lines(other).iter().any(|l| l == "pre_promote"),
        "{:?}",
        scripts.all()
    );

    // The agent stopped: before_stop, then on_stop, also when the agent exits right after.
    let seen = scripts.lines(other).len();
    cluster.signal_agent(other, Signal::SIGTERM).unwrap();
    let on_stop = line("on_stop", "replica", &cluster);
    let stopped = scripts.wait_for(&cluster, other, seen, &on_stop);
    assert_eq!(
        stopped[stopped.len() - 2..],
        ["before_stop postgres-running".to_string(), on_stop]
    );
    eprintln!("scripts' logs by node: {:#?}", scripts.all());
}

#[test]
fn a_failing_pre_promote_keeps_the_switchover_candidate_a_replica_and_another_member_leads() {
    let scripts = Scripts::new();
    let (cluster, old, replicas) = start_healthy(&scripts);
    let candidate = replicas[0];
    std::fs::write(scripts.verdict(candidate), "1").unwrap();

    cluster.request_switchover(&cluster.nodes[old].name, Some(&cluster.nodes[candidate].name));
    // The candidate takes the lock, its pre_promote refuses, it gives the lock up.
    let refused = wait_until("the candidate to refuse", Duration::from_secs(90), || {
        let log = std::fs::read_to_string(&cluster.nodes[candidate].log).ok()?;
        log.contains("pre-promote script failed").then_some(())
    });
    refused.unwrap_or_else(|e| panic!("{e}\nlogs: {:?}\n{}", scripts.all(), cluster.diagnostics()));

    // Another member leads, as a running primary; the candidate stays a replica.
    let new = primary_leader(&cluster, "another member", |l| l != candidate);
    let healthy = cluster.wait_healthy(HEALTHY).unwrap();
    assert_eq!(healthy, new);
    assert_eq!(
        cluster.psql(candidate, "SELECT pg_is_in_recovery()").unwrap(),
        "t"
    );
    let on_promote = line("on_role_change", "primary", &cluster);
    // The candidate ran pre_promote once, was never promoted, and its PostgreSQL kept running
    // through the release of the lock (no second start); it may have re-pointed its replication.
    let on_reload = line("on_reload", "replica", &cluster);
    let candidate_lines: Vec<String> = scripts
        .lines(candidate)
        .into_iter()
        .filter(|l| *l != on_reload)
        .collect();
    assert_eq!(
        candidate_lines,
        [line("on_start", "replica", &cluster), "pre_promote".to_string()]
    );
    // A replica that took over was promoted after its own pre_promote allowed it (the old
    // leader, clean and stopped, would simply start as the primary again).
    if new != old {
        // on_role_change runs on the callback thread, possibly a moment after the promotion.
        let called = wait_until(
            "on_role_change on the new leader",
            Duration::from_secs(30),
            || scripts.lines(new).contains(&on_promote).then_some(()),
        );
        called.unwrap_or_else(|e| panic!("{e}: {:?}", scripts.all()));
        let lines = scripts.lines(new);
        let allowed = lines.iter().position(|l| l == "pre_promote");
        let promoted = lines.iter().position(|l| *l == on_promote);
        assert!(allowed.is_some() && allowed < promoted, "{lines:?}");
    }
    eprintln!(
        "old leader node{}, candidate node{}, new leader node{}; logs: {:#?}",
        old + 1,
        candidate + 1,
        new + 1,
        scripts.all()
    );
}

/// Kills what the hanging callbacks left (by the pids they noted, only if still `sleep 600`).
struct HungCallbacks(PathBuf);

impl Drop for HungCallbacks {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("sleep\x00600") {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn callbacks_that_never_finish_delay_neither_a_switchover_nor_each_other() {
    let scripts = Scripts::new();
    let pids = scripts.path("hung.pids");
    let _cleanup = HungCallbacks(pids.clone());
    let hang = format!("{} {}", scripts.path("hang.sh").display(), pids.display());
    let events = ["on_start", "on_stop", "on_restart", "on_reload", "on_role_change"];
    let yaml: String = events.iter().map(|e| format!("    {e}: {hang}\n")).collect();
    let options = ClusterOptions {
        extra_postgresql_yaml: vec![format!("  callbacks:\n{yaml}"); 3],
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let old = cluster.wait_healthy(HEALTHY).unwrap();
    let candidate = (0..3).find(|&i| i != old).unwrap();

    let asked = std::time::Instant::now();
    cluster.request_switchover(&cluster.nodes[old].name, Some(&cluster.nodes[candidate].name));
    primary_leader(&cluster, "the candidate", |l| l == candidate);
    eprintln!("switchover with hanging callbacks took {:?}", asked.elapsed());
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), candidate);

    // Each callback killed the hanging one before it: on every node at most the last one and
    // the last on_reload (a slot of its own) still run.
    let noted = std::fs::read_to_string(&pids).unwrap();
    let running: Vec<&str> = noted
        .lines()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(noted.lines().count() > running.len(), "{noted}");
    assert!(running.len() <= 6, "still running: {running:?} of {noted}");
}

#[test]
fn after_a_leader_dies_replicas_refused_by_pre_promote_stay_replicas_until_one_is_allowed() {
    let scripts = Scripts::new();
    let (mut cluster, old, replicas) = start_healthy(&scripts);
    for &r in &replicas {
        std::fs::write(scripts.verdict(r), "1").unwrap();
    }
    cluster.signal_agent(old, Signal::SIGKILL).unwrap();
    cluster.kill_postgres(old).unwrap();

    // Both replicas try, are refused, back off for ttl and try again: nobody promotes.
    let tries = |i: usize| scripts.lines(i).iter().filter(|l| *l == "pre_promote").count();
    let retried = wait_until(
        "both replicas to be refused twice",
        Duration::from_secs(120),
        || replicas.iter().all(|&r| tries(r) >= 2).then_some(()),
    );
    retried.unwrap_or_else(|e| panic!("{e}\nlogs: {:?}\n{}", scripts.all(), cluster.diagnostics()));
    for &r in &replicas {
        assert_eq!(cluster.psql(r, "SELECT pg_is_in_recovery()").unwrap(), "t");
        assert!(
            !scripts
                .lines(r)
                .contains(&line("on_role_change", "primary", &cluster)),
            "{:?}",
            scripts.all()
        );
    }

    // Once its script allows it, a replica promotes at its next try.
    let allowed = replicas[0];
    std::fs::write(scripts.verdict(allowed), "0").unwrap();
    assert_eq!(primary_leader(&cluster, "the allowed replica", |_| true), allowed);
    // Callbacks run on their own thread: on_role_change may land a moment after the promotion
    // shows in the cluster.
    let role_change = line("on_role_change", "primary", &cluster);
    let called = wait_until(
        "on_role_change after the promotion",
        Duration::from_secs(30),
        || scripts.lines(allowed).contains(&role_change).then_some(()),
    );
    called.unwrap_or_else(|e| panic!("{e}: {:?}", scripts.all()));
    let lines = scripts.lines(allowed);
    assert_eq!(
        lines[lines.len() - 2..],
        [
            "pre_promote".to_string(),
            line("on_role_change", "primary", &cluster)
        ]
    );
}

/// Patroni's `post_recover`: a leader whose PostgreSQL crashed and then fails to start in place
/// calls `on_role_change demoted` as it lets the key go; another member leads.
#[test]
fn a_leader_whose_postgres_fails_to_start_calls_on_role_change_demoted() {
    let scripts = Scripts::new();
    let (cluster, leader, _) = start_healthy(&scripts);
    scripts.wait_for(&cluster, leader, 0, &line("on_start", "primary", &cluster));
    let seen = scripts.lines(leader).len();
    // A setting PostgreSQL refuses (postgresql.auto.conf is not managed by the agent), then a
    // crash: the restart in place fails.
    let auto_conf = cluster.nodes[leader].data_dir.join("postgresql.auto.conf");
    let original = std::fs::read_to_string(&auto_conf).unwrap();
    std::fs::write(&auto_conf, format!("{original}\nthis is not a setting\n")).unwrap();
    cluster.kill_postgres(leader).unwrap();
    let demoted = line("on_role_change", "demoted", &cluster);
    let lines = scripts.wait_for(&cluster, leader, seen, &demoted);
    assert_eq!(lines, [demoted], "{:?}", scripts.all());
    let new = primary_leader(&cluster, "another member", |l| l != leader);
    // Repaired, the old leader rejoins as a replica of the new one.
    std::fs::write(&auto_conf, original).unwrap();
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), new);
}
