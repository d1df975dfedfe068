//! Client routing on a real three-node cluster, through both routers: the real HAProxy (Debian
//! `haproxy`, configured by `pgvigilctl haproxy-config`) and `pgvigil router` (which follows
//! etcd). Port "5000" must reach the primary, "5001" a replica; both must follow a killed leader
//! and a planned switchover (`POST /switchover`), close client connections to a former primary,
//! and keep established connections while etcd is down.
//!
//! Needs the workspace built (`cargo build --workspace`): `pgvigilctl` is found next to the test
//! binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgvigil_testkit::cluster::{
    ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD, TestCluster, psql_at, sibling_binary,
};
use pgvigil_testkit::{EtcdCluster, free_port, http, spawn_owned, wait_until};
use serde_json::Value;
use tokio::runtime::Runtime;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(180);
const HAPROXY: &str = "/usr/sbin/haproxy";

// ---------------------------------------------------------------------------------------------
// The two routers, as processes owned by the test and stopped by PID.

/// `pgvigil router` with its own copy of a node's configuration plus a `router:` section.
struct Router {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    primary: u16,
    replicas: u16,
    stats: u16,
}

fn router_section(primary: u16, replicas: u16, stats: u16, extra: &str) -> String {
    format!(
        "\nrouter:\n  primary_listen: 127.0.0.1:{primary}\n  replicas_listen: 127.0.0.1:{replicas}\n  \
         stats_listen: 127.0.0.1:{stats}\n{extra}"
    )
}

impl Router {
    /// Starts the router on `base_config` (an agent configuration) and waits until it has read
    /// the cluster.
    fn start(dir: &Path, base_config: &str, extra: &str) -> anyhow::Result<Router> {
        let (primary, replicas, stats) = (free_port(), free_port(), free_port());
        let config = dir.join(format!("router-{primary}.yml"));
        fs::write(
            &config,
            format!("{base_config}{}", router_section(primary, replicas, stats, extra)),
        )?;
        let log = dir.join(format!("router-{primary}.log"));
        let mut router = Router {
            child: None,
            config,
            log,
            primary,
            replicas,
            stats,
        };
        router.spawn()?;
        wait_until(
            "the router to read the cluster from etcd",
            Duration::from_secs(30),
            || {
                let s = router.stats_json()?;
                (s["etcd"]["status"] == "in sync").then_some(())
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}\n{}", router.log_tail()))?;
        Ok(router)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(AGENT);
        cmd.arg("router")
            .arg(&self.config)
            .env("PGVIGIL_LOG", "info,pgvigil_router=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(spawn_owned(cmd)?);
        Ok(())
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    fn stats_json(&self) -> Option<Value> {
        http::get(self.stats, "/stats.json").ok()?.json().ok()
    }

    fn member<'a>(stats: &'a Value, name: &str) -> Option<&'a Value> {
        stats["members"].as_array()?.iter().find(|m| m["name"] == name)
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- router log tail ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The real HAProxy with the configuration `pgvigilctl haproxy-config` prints.
struct Haproxy {
    child: Option<Child>,
    log: PathBuf,
    primary: u16,
    replicas: u16,
    config_text: String,
}

impl Haproxy {
    fn start(dir: &Path, node_config: &Path) -> anyhow::Result<Haproxy> {
        let (primary, replicas, stats) = (free_port(), free_port(), free_port());
        let ctl = sibling_binary("pgvigilctl")?;
        let out = Command::new(&ctl)
            .arg("-c")
            .arg(node_config)
            .args(["haproxy-config", "--bind", "127.0.0.1", "--max-lag", "16MB"])
            .args(["--primary-port", &primary.to_string()])
            .args(["--replica-port", &replicas.to_string()])
            .args(["--stats-port", &stats.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "pgvigilctl haproxy-config: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let config_text = String::from_utf8(out.stdout)?;
        let config = dir.join(format!("haproxy-{primary}.cfg"));
        fs::write(&config, &config_text)?;
        let check = Command::new(HAPROXY).arg("-c").arg("-f").arg(&config).output()?;
        if !check.status.success() {
            bail!(
                "haproxy rejects the generated configuration: {}{}\n{config_text}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let log = dir.join(format!("haproxy-{primary}.log"));
        let file = fs::File::create(&log)?;
        let mut cmd = Command::new(HAPROXY);
        cmd.arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = spawn_owned(cmd).context("starting haproxy")?;
        Ok(Haproxy {
            child: Some(child),
            log,
            primary,
            replicas,
            config_text,
        })
    }
}

impl Haproxy {
    /// HAProxy 2.6 starts with every server up until its first failed check: wait until its
    /// checks have settled and port "5000" reaches only node `leader`.
    fn wait_settled(&self, cluster: &TestCluster, leader: usize) {
        let want = cluster.nodes[leader].pg_port;
        wait_until("HAProxy's checks to settle", Duration::from_secs(30), || {
            (0..6)
                .all(|_| read_via(self.primary).is_ok_and(|(p, r)| p == want && !r))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- haproxy log ---\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A write through `port`: the PostgreSQL port of the server that took it.
fn write_via(port: u16) -> anyhow::Result<u16> {
    let out = psql_at(
        port,
        "INSERT INTO t(port) VALUES (inet_server_port()) RETURNING port",
    )?;
    // psql prints the command tag (`INSERT 0 1`) after the row.
    Ok(out.lines().next().unwrap_or("").trim().parse()?)
}

/// A read through `port`: (server port, in recovery).
fn read_via(port: u16) -> anyhow::Result<(u16, bool)> {
    let out = psql_at(port, "SELECT inet_server_port() || ',' || pg_is_in_recovery()")?;
    let (p, r) = out.split_once(',').context("unexpected answer")?;
    Ok((p.parse()?, r == "true"))
}

fn conninfo(port: u16) -> String {
    format!(
        "host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=5"
    )
}

/// A client connection held open through a router.
struct Held {
    client: tokio_postgres::Client,
}

fn hold(rt: &Runtime, port: u16) -> anyhow::Result<Held> {
    rt.block_on(async {
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(&conninfo(port), tokio_postgres::NoTls),
        )
        .await
        .context("connect timed out")??;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Held { client })
    })
}

impl Held {
    /// The server port this connection talks to (a query on it).
    fn server_port(&self, rt: &Runtime) -> anyhow::Result<u16> {
        rt.block_on(async {
            let rows = tokio::time::timeout(
                Duration::from_secs(5),
                self.client.simple_query("SELECT inet_server_port()"),
            )
            .await
            .context("query timed out")??;
            for m in rows {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                    return Ok(row.get(0).context("null")?.parse()?);
                }
            }
            bail!("no row")
        })
    }
}

/// A connection through `port` (a read-only port, which balances) that reached the server on
/// `want`: opens connections until one does (a few tries).
fn hold_on(rt: &Runtime, port: u16, want: u16, what: &str) -> Held {
    let mut seen = Vec::new();
    for _ in 0..10 {
        let held = hold(rt, port).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        match held.server_port(rt) {
            Ok(p) if p == want => return held,
            Ok(p) => seen.push(p),
            Err(e) => panic!("{what}: query: {e}"),
        }
    }
    panic!("{what}: 10 connections through port {port}, none reached {want}: {seen:?}")
}

/// A client that writes through a router's port "5000" in a loop, reconnecting after any error,
/// and records the PostgreSQL port of the server that took each acknowledged write.
struct Writer {
    what: &'static str,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(rt: &Runtime, what: &'static str, port: u16) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = rt.spawn(async move {
            let info = conninfo(port);
            let mut client: Option<tokio_postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                let Some(c) = client.as_ref() else {
                    let connect = tokio_postgres::connect(&info, tokio_postgres::NoTls);
                    match tokio::time::timeout(Duration::from_secs(5), connect).await {
                        Ok(Ok((c, conn))) => {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            client = Some(c);
                        }
                        // Refused (no primary) or no answer: try again shortly.
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                    continue;
                };
                let insert = c.simple_query("INSERT INTO t(port) VALUES (inet_server_port()) RETURNING port");
                let landed = match tokio::time::timeout(Duration::from_secs(5), insert).await {
                    Ok(Ok(messages)) => messages.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse::<u16>().ok(),
                        _ => None,
                    }),
                    _ => None,
                };
                match landed {
                    Some(p) => {
                        a.lock().unwrap().push(p);
                        // Pace the writes: a steady client, not a load test.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    None => {
                        client = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Writer {
            what,
            stop,
            acked,
            task,
        }
    }

    /// Waits (up to a minute) until a write landed on the server on `port`.
    fn wait_for(&self, what: &str, port: u16) {
        wait_until(what, Duration::from_secs(60), || {
            self.acked.lock().unwrap().contains(&port).then_some(())
        })
        .unwrap();
    }

    /// Stops the writer; the server port of every acknowledged write, in order.
    fn finish(self, rt: &Runtime) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), self.task)
                .await
                .expect("the writer stops")
                .expect("the writer did not panic")
        });
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster set-up.

fn start_cluster(options: ClusterOptions) -> (TestCluster, usize) {
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    cluster
        .psql(leader, "CREATE TABLE t(id serial PRIMARY KEY, port int)")
        .unwrap();
    (cluster, leader)
}

fn node_config(cluster: &TestCluster) -> String {
    fs::read_to_string(&cluster.nodes[0].config).unwrap()
}

fn pg_port(cluster: &TestCluster, i: usize) -> u16 {
    cluster.nodes[i].pg_port
}

/// Waits until a write through `port` lands on node `want`.
fn wait_write_lands(cluster: &TestCluster, what: &str, port: u16, want: usize, within: Duration) -> Duration {
    let start = Instant::now();
    let target = pg_port(cluster, want);
    let mut last = String::new();
    let r = wait_until(
        &format!("a write through {what} to land on {}", cluster.nodes[want].name),
        within,
        || match write_via(port) {
            Ok(p) if p == target => Some(()),
            Ok(p) => {
                last = format!("landed on port {p}");
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        },
    );
    r.unwrap_or_else(|e| panic!("{e} (last attempt: {last})\n{}", cluster.diagnostics()));
    start.elapsed()
}

/// Reads `n` times through `port`: every one must land on a replica (in recovery, not the
/// primary). Returns the set of server ports seen.
fn assert_reads_on_replicas(what: &str, port: u16, primary_port: u16, n: usize) -> Vec<u16> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (p, in_recovery) = read_via(port).unwrap_or_else(|e| panic!("read through {what}: {e}"));
        assert_ne!(p, primary_port, "a read through {what} reached the primary");
        assert!(
            in_recovery,
            "a read through {what} reached a server not in recovery"
        );
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.sort();
    seen
}

/// Waits until the routers agree the cluster is settled: HAProxy's replica backend has dropped
/// former primaries (its checks need a moment) and reads land on replicas only.
fn wait_reads_settled(port: u16, primary_port: u16) {
    wait_until("reads to land on replicas only", Duration::from_secs(30), || {
        (0..6)
            .all(|_| read_via(port).is_ok_and(|(p, r)| p != primary_port && r))
            .then_some(())
    })
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Without a cluster (only etcd): refusals with a PostgreSQL error, a bad configuration,
/// reloads, the stale-topology bound and its recovery, and a clean SIGTERM.
#[test]
fn router_refuses_reloads_survives_etcd_and_stops_cleanly() {
    let mut etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "scope: lonely\nname: r1\nrestapi:\n  listen: 127.0.0.1:1\netcd3:\n  hosts: {}\npostgresql:\n  \
         listen: 127.0.0.1:2\n  connect_address: 127.0.0.1:2\n  data_dir: /nonexistent\n  authentication:\n    \
         superuser:\n      username: postgres\n    replication:\n      username: rep\n",
        etcd.endpoint(0)
    );

    // A bad configuration is refused with the file, the key and the problem.
    let bad = dir.path().join("bad.yml");
    fs::write(&bad, format!("{base}router:\n  primary_listen: five-thousand\n")).unwrap();
    let out = Command::new(AGENT).arg("router").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("pgvigil router: invalid configuration")
            && err.contains("bad.yml")
            && err.contains("router.primary_listen: expected host:port"),
        "{err}"
    );
    let out = Command::new(AGENT)
        .arg("router")
        .arg("--validate-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let mut router = Router::start(dir.path(), &base, "  stale_topology_timeout: 3\n").unwrap();

    // No leader key: a proper PostgreSQL error, at once.
    let started = Instant::now();
    let err = psql_at(router.primary, "SELECT 1").unwrap_err().to_string();
    assert!(
        err.contains("FATAL:  pgvigil router: no primary is available for cluster lonely"),
        "{err}"
    );
    assert!(err.contains("no member holds the leader key"), "{err}");
    let err = psql_at(router.replicas, "SELECT 1").unwrap_err().to_string();
    assert!(
        err.contains("FATAL:  pgvigil router: no replica is available for cluster lonely"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refusals took {:?}",
        started.elapsed()
    );
    let stats = router.stats_json().unwrap();
    assert_eq!(stats["ports"]["primary"]["refused"]["no_primary"], 1, "{stats}");
    let page = http::get(router.stats, "/").unwrap();
    assert!(page.body.contains("no primary"), "{}", page.body);
    let metrics = http::get(router.stats, "/metrics").unwrap();
    assert!(
        metrics
            .body
            .contains("pgvigil_router_primary_available{scope=\"lonely\"} 0"),
        "{}",
        metrics.body
    );

    // SIGHUP: the primary listener moves; a broken file is refused and changes nothing.
    let old_primary = router.primary;
    let new_primary = free_port();
    let text = fs::read_to_string(&router.config).unwrap().replace(
        &format!("127.0.0.1:{old_primary}"),
        &format!("127.0.0.1:{new_primary}"),
    );
    fs::write(&router.config, &text).unwrap();
    kill(router.pid(), Signal::SIGHUP).unwrap();
    wait_until("the primary listener to move", Duration::from_secs(10), || {
        psql_at(new_primary, "SELECT 1")
            .unwrap_err()
            .to_string()
            .contains("pgvigil router: no primary")
            .then_some(())
    })
    .unwrap();
    wait_until("the old listener to close", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", old_primary))
            .is_err()
            .then_some(())
    })
    .unwrap();
    router.primary = new_primary;
    fs::write(&router.config, format!("{text}  connect_timeout: [oops\n")).unwrap();
    kill(router.pid(), Signal::SIGHUP).unwrap();
    let stats = wait_until("the reload to be refused", Duration::from_secs(10), || {
        let s = router.stats_json()?;
        (s["last_reload"]["ok"] == false).then_some(s)
    })
    .unwrap();
    assert!(
        stats["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("YAML syntax error"),
        "{stats}"
    );
    assert!(
        psql_at(new_primary, "SELECT 1")
            .unwrap_err()
            .to_string()
            .contains("no primary")
    );

    // etcd goes away: the last topology is kept (and the page says so), then expires.
    etcd.stop_member(0);
    wait_until(
        "the router to report a stale topology",
        Duration::from_secs(10),
        || (router.stats_json()?["etcd"]["status"] == "stale").then_some(()),
    )
    .unwrap();
    wait_until("the topology to expire", Duration::from_secs(20), || {
        (router.stats_json()?["etcd"]["status"] == "expired").then_some(())
    })
    .unwrap();
    let err = psql_at(router.primary, "SELECT 1").unwrap_err().to_string();
    assert!(
        err.contains("the topology of cluster lonely is unknown: etcd has not answered"),
        "{err}"
    );
    // etcd is back: the router re-syncs by itself.
    etcd.start_member(0).unwrap();
    wait_until("the router to re-sync", Duration::from_secs(30), || {
        (router.stats_json()?["etcd"]["status"] == "in sync").then_some(())
    })
    .unwrap();
    assert!(
        psql_at(router.primary, "SELECT 1")
            .unwrap_err()
            .to_string()
            .contains("no primary")
    );

    // SIGTERM: a clean, quick exit.
    let stopped = Instant::now();
    kill(router.pid(), Signal::SIGTERM).unwrap();
    let mut child = router.child.take().unwrap();
    let status = wait_until("the router to exit", Duration::from_secs(15), || {
        child.try_wait().ok().flatten()
    })
    .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
}

/// Writes go to the primary and reads to the replicas through both routers; after SIGKILL of
/// the leader (agent and PostgreSQL) both reach the new primary.
#[test]
fn both_routers_route_writes_and_reads_and_follow_a_killed_leader() {
    let (mut cluster, old) = start_cluster(ClusterOptions::default());
    let dir = cluster.root().to_path_buf();
    let router = Router::start(&dir, &node_config(&cluster), "").unwrap();
    let haproxy = Haproxy::start(&dir, &cluster.nodes[0].config).unwrap();
    haproxy.wait_settled(&cluster, old);
    assert!(haproxy.config_text.contains("OPTIONS /replica?lag=16777216"));
    let old_port = pg_port(&cluster, old);
    let mut replicas: Vec<u16> = (0..3)
        .filter(|&i| i != old)
        .map(|i| pg_port(&cluster, i))
        .collect();
    replicas.sort();

    for (what, primary, reads) in [
        ("the router", router.primary, router.replicas),
        ("HAProxy", haproxy.primary, haproxy.replicas),
    ] {
        wait_write_lands(&cluster, what, primary, old, Duration::from_secs(30));
        assert_eq!(read_via(primary).unwrap(), (old_port, false));
        wait_reads_settled(reads, old_port);
        // Every read lands on a replica; both replicas get reads (once their member keys show
        // them caught up: the lag estimate is refreshed every loop_wait).
        wait_until(
            &format!("{what} to balance reads over both replicas"),
            Duration::from_secs(30),
            || (assert_reads_on_replicas(what, reads, old_port, 8) == replicas).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}; router stats: {}", router.stats_json().unwrap_or_default()));
    }

    // The stats pages show the cluster as routed.
    let stats = router.stats_json().unwrap();
    let old_name = cluster.nodes[old].name.clone();
    assert_eq!(stats["primary"], old_name.as_str(), "{stats}");
    assert_eq!(stats["read_targets"].as_array().unwrap().len(), 2, "{stats}");
    let leader = Router::member(&stats, &old_name).unwrap();
    assert_eq!(leader["role"], "leader");
    assert!(leader["connections_total"].as_u64().unwrap() >= 2, "{leader}");
    assert!(leader["bytes_to_client"].as_u64().unwrap() > 0, "{leader}");
    let page = http::get(router.stats, "/").unwrap().body;
    for name in ["node1", "node2", "node3"] {
        assert!(page.contains(&format!("<td>{name}</td>")), "{page}");
    }
    let metrics = http::get(router.stats, "/metrics").unwrap().body;
    assert!(
        metrics.contains("pgvigil_router_primary_available{scope=\""),
        "{metrics}"
    );

    let rt = Runtime::new().unwrap();
    let held = hold(&rt, router.primary).unwrap();
    assert_eq!(held.server_port(&rt).unwrap(), old_port);

    // The leader host dies.
    cluster.signal_agent(old, Signal::SIGKILL).unwrap();
    cluster.kill_postgres(old).unwrap();
    let killed = Instant::now();
    let new = wait_until("a new leader", Duration::from_secs(120), || {
        cluster.leader().filter(|&l| l != old)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let new_port = pg_port(&cluster, new);
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, new, Duration::from_secs(60));
        eprintln!(
            "{what}: writes reach the new primary {:?} after the kill",
            killed.elapsed()
        );
    }
    assert!(
        held.server_port(&rt).is_err(),
        "a connection to the killed primary still answers"
    );

    // The remaining replica serves all reads; the new primary none.
    let survivor = (0..3).find(|&i| i != old && i != new).unwrap();
    for (what, reads) in [("the router", router.replicas), ("HAProxy", haproxy.replicas)] {
        wait_reads_settled(reads, new_port);
        let seen = assert_reads_on_replicas(what, reads, new_port, 8);
        assert_eq!(seen, [pg_port(&cluster, survivor)], "{what}");
    }
    let stats = router.stats_json().unwrap();
    assert_eq!(stats["primary"], cluster.nodes[new].name.as_str(), "{stats}");
    assert!(stats["leader_changes"].as_u64().unwrap() >= 1, "{stats}");
}

/// A planned switchover (`POST /switchover` to the leader's REST API, from A to B) through both
/// routers: the connections held to A through port "5000" are closed, so are the read-only
/// connections held to B through port "5001" (B's PostgreSQL is promoted, not restarted, so
/// only the router can close them), a client writing in a loop through each router never
/// writes to A once its writes reach B, and new connections on "5000" reach B. Then a leader
/// whose agent is frozen (SIGSTOP: its PostgreSQL keeps running as a primary) loses the lock:
/// both routers close the connections to it, although that PostgreSQL still accepts writes. A
/// `noloadbalance` member never gets reads.
#[test]
fn both_routers_close_connections_to_a_former_primary() {
    let options = ClusterOptions {
        extra_node_yaml: vec![
            String::new(),
            String::new(),
            "tags:\n  noloadbalance: true\n".into(),
        ],
        ..ClusterOptions::default()
    };
    let (mut cluster, a) = start_cluster(options);
    let dir = cluster.root().to_path_buf();
    let router = Router::start(&dir, &node_config(&cluster), "").unwrap();
    let haproxy = Haproxy::start(&dir, &cluster.nodes[0].config).unwrap();
    haproxy.wait_settled(&cluster, a);
    let a_port = pg_port(&cluster, a);
    let node3_port = pg_port(&cluster, 2);
    for (what, primary, reads) in [
        ("the router", router.primary, router.replicas),
        ("HAProxy", haproxy.primary, haproxy.replicas),
    ] {
        wait_write_lands(&cluster, what, primary, a, Duration::from_secs(30));
        wait_reads_settled(reads, a_port);
        let seen = assert_reads_on_replicas(what, reads, a_port, 8);
        assert!(
            !seen.contains(&node3_port) || a == 2,
            "{what}: reads reached node3 (noloadbalance)"
        );
    }

    // The candidate B is a replica that serves reads (node3 does not).
    let b = (0..2).find(|&i| i != a).unwrap();
    let b_port = pg_port(&cluster, b);
    let (a_name, b_name) = (cluster.nodes[a].name.clone(), cluster.nodes[b].name.clone());
    let rt = Runtime::new().unwrap();
    let writes_via_router = Writer::start(&rt, "the router", router.primary);
    let writes_via_haproxy = Writer::start(&rt, "HAProxy", haproxy.primary);
    let via_router = hold(&rt, router.primary).unwrap();
    let via_haproxy = hold(&rt, haproxy.primary).unwrap();
    assert_eq!(via_router.server_port(&rt).unwrap(), a_port);
    assert_eq!(via_haproxy.server_port(&rt).unwrap(), a_port);
    let reads_via_router = hold_on(&rt, router.replicas, b_port, "the router");
    let reads_via_haproxy = hold_on(&rt, haproxy.replicas, b_port, "HAProxy");
    let direct_to_b = hold(&rt, b_port).unwrap();
    for w in [&writes_via_router, &writes_via_haproxy] {
        w.wait_for(&format!("a write through {} to land on A", w.what), a_port);
    }

    // Planned switchover from A to B, as `patronictl switchover` asks for it: the REST API
    // answers when it is done.
    let body = format!(r#"{{"leader": "{a_name}", "candidate": "{b_name}"}}"#);
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.nodes[a].api_port));
    let answer = http::request_within(
        api,
        "POST",
        "/switchover",
        Some(&body),
        None,
        Duration::from_secs(90),
    )
    .unwrap_or_else(|e| panic!("POST /switchover: {e}\n{}", cluster.diagnostics()));
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (
            200,
            format!("Successfully switched over to \"{b_name}\"").as_str()
        ),
        "{}",
        cluster.diagnostics()
    );
    wait_until("B to hold the leader key", Duration::from_secs(30), || {
        (cluster.leader() == Some(b)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));

    // New connections on "5000" reach B, and the writers' too.
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, b, Duration::from_secs(30));
    }
    for w in [&writes_via_router, &writes_via_haproxy] {
        w.wait_for(&format!("a write through {} to land on B", w.what), b_port);
    }
    // No held connection still talks to A (its PostgreSQL restarted as a replica, which ends
    // them; the router also dropped the route at once).
    for (what, held) in [("the router", &via_router), ("HAProxy", &via_haproxy)] {
        wait_until(
            &format!("{what}: the connection to the old primary to be closed"),
            Duration::from_secs(30),
            || held.server_port(&rt).is_err().then_some(()),
        )
        .unwrap();
    }
    // The read-only connections to B are closed by the routers: B is the primary now, and its
    // PostgreSQL did not end them (the direct connection opened at the same time still works).
    wait_until(
        "the router to close the read-only connection to the new primary",
        Duration::from_secs(10),
        || reads_via_router.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    wait_until(
        "HAProxy to close the read-only connection to the new primary",
        Duration::from_secs(30),
        || reads_via_haproxy.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    assert_eq!(
        direct_to_b.server_port(&rt).unwrap(),
        b_port,
        "B's PostgreSQL ended its sessions: the test proves nothing about the routers"
    );
    wait_until(
        "the router to hold no connection to the old primary",
        Duration::from_secs(10),
        || {
            let stats = router.stats_json()?;
            let m = Router::member(&stats, &a_name)?;
            (m["connections_primary"] == 0 && stats["primary"] == b_name.as_str()).then_some(())
        },
    )
    .unwrap();
    let stats = router.stats_json().unwrap();
    let closed = Router::member(&stats, &b_name).unwrap()["closed_by_router"]
        .as_u64()
        .unwrap();
    assert!(closed >= 1, "{stats}");
    // No write landed on A after one had landed on B, through either router.
    for w in [writes_via_router, writes_via_haproxy] {
        let what = w.what;
        let ports = w.finish(&rt);
        let first_on_b = ports.iter().position(|&p| p == b_port).unwrap();
        assert!(
            !ports[first_on_b..].contains(&a_port),
            "{what}: a write reached the old primary after the switchover: {ports:?}"
        );
        eprintln!(
            "{what}: {} writes, {} on A then {} on B",
            ports.len(),
            first_on_b,
            ports.len() - first_on_b
        );
    }

    // B's agent freezes, and so does its fencer (as if it had died, or B ran an agent without
    // one): its PostgreSQL stays a writable primary while the lock expires and C takes over.
    // Both routers must drop the connections to B.
    let via_router = hold(&rt, router.primary).unwrap();
    let via_haproxy = hold(&rt, haproxy.primary).unwrap();
    assert_eq!(via_router.server_port(&rt).unwrap(), b_port);
    assert_eq!(via_haproxy.server_port(&rt).unwrap(), b_port);
    let agent = cluster.nodes[b].agent_pid().expect("B's agent runs");
    let fencer = pgvigil_testkit::process::fencer_of(agent).expect("B's agent started its fencer");
    let _resume_fencer = pgvigil_testkit::process::Stopped::stop(fencer).unwrap();
    cluster.signal_agent(b, Signal::SIGSTOP).unwrap();
    let c = wait_until(
        "the router to route to a new primary",
        Duration::from_secs(90),
        || {
            let stats = router.stats_json()?;
            let p = stats["primary"].as_str()?;
            (p != b_name).then(|| cluster.node_index(p)).flatten()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    // The router closes the old connection as it switches (within a second, to allow for the
    // microseconds between publishing the new topology and closing the old route).
    wait_until(
        "the router to close the connection to the frozen leader",
        Duration::from_secs(1),
        || via_router.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    // That PostgreSQL still runs as a primary: the router, not the server, closed the session.
    assert_eq!(
        psql_at(b_port, "SELECT pg_is_in_recovery()").unwrap(),
        "f",
        "the frozen leader's PostgreSQL stopped by itself; the test proves nothing"
    );
    let stats = router.stats_json().unwrap();
    let closed = Router::member(&stats, &b_name).unwrap()["closed_by_router"]
        .as_u64()
        .unwrap();
    assert!(closed >= 1, "{stats}");
    // HAProxy marks B down (its REST API no longer answers) and shuts the session down too.
    wait_until(
        "HAProxy to close the connection to the frozen leader",
        Duration::from_secs(30),
        || via_haproxy.server_port(&rt).is_err().then_some(()),
    )
    .unwrap();
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, c, Duration::from_secs(60));
    }
    // Nothing reaches B through port 5000 any more.
    for _ in 0..5 {
        assert_eq!(write_via(router.primary).unwrap(), pg_port(&cluster, c));
    }
    // Let B's agent run again so that teardown finds a normal process.
    cluster.signal_agent(b, Signal::SIGCONT).unwrap();
}

/// With every etcd member stopped, established connections through both routers keep working
/// (until the primary fences itself, which the routers do not hasten), and the router keeps
/// routing new connections by its last topology and says so. When etcd is back, it re-syncs.
#[test]
fn both_routers_keep_established_connections_while_etcd_is_down() {
    let (mut cluster, leader) = start_cluster(ClusterOptions::default());
    let dir = cluster.root().to_path_buf();
    let router = Router::start(&dir, &node_config(&cluster), "").unwrap();
    let haproxy = Haproxy::start(&dir, &cluster.nodes[0].config).unwrap();
    haproxy.wait_settled(&cluster, leader);
    let leader_port = pg_port(&cluster, leader);
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, leader, Duration::from_secs(30));
    }
    let rt = Runtime::new().unwrap();
    let via_router = hold(&rt, router.primary).unwrap();
    let via_haproxy = hold(&rt, haproxy.primary).unwrap();

    // No etcd answers any more: two members are killed (refused connections), the third is
    // frozen (a hung server).
    cluster.etcd.stop_member(1);
    cluster.etcd.stop_member(2);
    cluster.etcd.pause_member(0).unwrap();
    let stopped = Instant::now();
    // For a few seconds (the primary fences itself later, when its agent gives up on etcd):
    // every query on the established connections works, and new connections through the router
    // still reach the primary by the last known topology.
    let mut probes = 0;
    while stopped.elapsed() < Duration::from_secs(5) {
        let direct_ok = psql_at(leader_port, "SELECT pg_is_in_recovery()").is_ok_and(|v| v == "f");
        let r = via_router.server_port(&rt);
        let h = via_haproxy.server_port(&rt);
        let fresh = write_via(router.primary);
        let still_ok = psql_at(leader_port, "SELECT pg_is_in_recovery()").is_ok_and(|v| v == "f");
        if !(direct_ok && still_ok) {
            break; // the primary fenced itself: nothing left to hold on to
        }
        assert_eq!(
            r.unwrap(),
            leader_port,
            "router: established connection lost with etcd down"
        );
        assert_eq!(
            h.unwrap(),
            leader_port,
            "HAProxy: established connection lost with etcd down"
        );
        assert_eq!(
            fresh.unwrap(),
            leader_port,
            "router: new connection not routed with etcd down"
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{probes} probes succeeded with etcd down");
    assert!(
        probes >= 3,
        "only {probes} probes before the primary fenced itself"
    );
    // The router says it is running on its last known topology.
    let stats = wait_until(
        "the router to say its topology is stale",
        Duration::from_secs(10),
        || {
            let stats = router.stats_json()?;
            (stats["etcd"]["status"] == "stale").then_some(stats)
        },
    )
    .unwrap();
    assert!(
        stats["etcd"]["message"]
            .as_str()
            .unwrap()
            .contains("routing new connections by the topology read"),
        "{stats}"
    );

    cluster.etcd.resume_member(0).unwrap();
    cluster.etcd.start_member(1).unwrap();
    cluster.etcd.start_member(2).unwrap();
    let leader = cluster.wait_healthy(HEALTHY).unwrap();
    wait_until("the router to re-sync with etcd", Duration::from_secs(30), || {
        let stats = router.stats_json()?;
        (stats["etcd"]["status"] == "in sync" && stats["primary"] == cluster.nodes[leader].name.as_str())
            .then_some(())
    })
    .unwrap();
    for (what, primary) in [("the router", router.primary), ("HAProxy", haproxy.primary)] {
        wait_write_lands(&cluster, what, primary, leader, Duration::from_secs(60));
    }
}
