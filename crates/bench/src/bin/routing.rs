//! `routing`: client routing on a real three-node pgvigil cluster on this machine, three ways:
//! straight to the primary, through HAProxy (configured by `pgvigilctl haproxy-config`) and
//! through `pgvigil router`. In one run it reports
//!
//! 1. `pgbench -S` throughput (scale 10, `-c 4 -j 2 -T 10`, 5 runs each, interleaved): median
//!    and spread, and each router's cost relative to direct;
//! 2. connection set-up latency (connect, authenticate, ReadyForQuery; 200 connections each):
//!    median and p95;
//! 3. the delay from the new leader key appearing in etcd to the first successful write through
//!    port 5000, for the router and for HAProxy (5 planned leader changes: SIGTERM of the
//!    leader's agent, which stops PostgreSQL and releases the lock).
//!
//! Run it through `bench/routing/run.sh` (builds the release binaries first). Environment:
//! `BENCH_RUNS`, `BENCH_SECONDS`, `BENCH_CONNECTS`, `BENCH_FAILOVERS` override the counts (for a
//! quick smoke run).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use pgvigil_bench::{Summary, parse_pgbench_tps, summarize};
use pgvigil_testkit::cluster::{
    ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD, TestCluster, psql_at, sibling_binary,
};
use pgvigil_testkit::{free_port, http, spawn_owned, wait_until};
use tokio::runtime::Runtime;

const HEALTHY: Duration = Duration::from_secs(180);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process killed (by PID) and reaped on drop.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let file = fs::File::create(log)?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        Ok(Proc {
            child: spawn_owned(cmd)?,
            log: log.to_path_buf(),
        })
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy)]
struct Ports {
    primary: u16,
    replicas: u16,
    stats: u16,
}

fn start_router(cluster: &TestCluster, agent: &Path) -> anyhow::Result<(Proc, Ports)> {
    let ports = Ports {
        primary: free_port(),
        replicas: free_port(),
        stats: free_port(),
    };
    let base = fs::read_to_string(&cluster.nodes[0].config)?;
    let config = cluster.root().join("router.yml");
    fs::write(
        &config,
        format!(
            "{base}\nrouter:\n  primary_listen: 127.0.0.1:{}\n  replicas_listen: 127.0.0.1:{}\n  stats_listen: 127.0.0.1:{}\n",
            ports.primary, ports.replicas, ports.stats
        ),
    )?;
    let mut cmd = Command::new(agent);
    cmd.arg("router").arg(&config).env("PGVIGIL_LOG", "warn");
    let proc = Proc::spawn(cmd, &cluster.root().join("router.log"))?;
    Ok((proc, ports))
}

fn start_haproxy(cluster: &TestCluster, ctl: &Path) -> anyhow::Result<(Proc, Ports)> {
    let ports = Ports {
        primary: free_port(),
        replicas: free_port(),
        stats: free_port(),
    };
    let out = Command::new(ctl)
        .arg("-c")
        .arg(&cluster.nodes[0].config)
        .arg("haproxy-config")
        .args(["--primary-port", &ports.primary.to_string()])
        .args(["--replica-port", &ports.replicas.to_string()])
        .args(["--stats-port", &ports.stats.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "pgvigilctl haproxy-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = cluster.root().join("haproxy.cfg");
    fs::write(&config, &out.stdout)?;
    let mut cmd = Command::new("/usr/sbin/haproxy");
    cmd.arg("-db").arg("-f").arg(&config);
    let proc = Proc::spawn(cmd, &cluster.root().join("haproxy.log"))?;
    Ok((proc, ports))
}

/// `SELECT inet_server_port(), pg_is_in_recovery()` through `port`.
fn server_of(port: u16) -> Option<(u16, bool)> {
    let out = psql_at(port, "SELECT inet_server_port() || ',' || pg_is_in_recovery()").ok()?;
    let (p, r) = out.split_once(',')?;
    Some((p.parse().ok()?, r == "true"))
}

/// Waits until `port` reaches only the primary on `pg_port` (HAProxy's checks have settled,
/// the router has read the new topology).
fn wait_routes_to(port: u16, pg_port: u16, what: &str) -> anyhow::Result<()> {
    wait_until(
        &format!("{what} to route to the primary"),
        Duration::from_secs(60),
        || {
            (0..5)
                .all(|_| server_of(port) == Some((pg_port, false)))
                .then_some(())
        },
    )
}

fn conninfo(port: u16) -> String {
    format!(
        "host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=2"
    )
}

fn pgbench(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("pgbench")
        .args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            SUPERUSER,
            "postgres",
        ])
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .context("running pgbench")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("pgbench {args:?} on port {port} failed:\n{text}");
    }
    Ok(text)
}

/// Connection set-up times in milliseconds: connect, authenticate (SCRAM), ReadyForQuery.
async fn connect_times(port: u16, n: usize) -> anyhow::Result<Vec<f64>> {
    let info = conninfo(port);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting through port {port}"))?;
        out.push(start.elapsed().as_secs_f64() * 1000.0);
        let task = tokio::spawn(conn);
        drop(client);
        let _ = task.await;
    }
    Ok(out)
}

/// Writes through `port` in a loop, reconnecting after every error, until a write lands on a
/// server other than `old_port`; returns when that happened.
async fn first_write_elsewhere(port: u16, old_port: u16, stop: Arc<AtomicBool>) -> Option<Instant> {
    let info = conninfo(port);
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_ref() else {
            match tokio::time::timeout(
                Duration::from_secs(1),
                tokio_postgres::connect(&info, tokio_postgres::NoTls),
            )
            .await
            {
                Ok(Ok((c, conn))) => {
                    tokio::spawn(conn);
                    client = Some(c);
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
            continue;
        };
        let write = tokio::time::timeout(
            Duration::from_secs(2),
            c.simple_query("INSERT INTO bench_writes(port) VALUES (inet_server_port()) RETURNING port"),
        )
        .await;
        let landed = match write {
            Ok(Ok(messages)) => messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|p| p.parse::<u16>().ok()),
                _ => None,
            }),
            _ => None,
        };
        match landed {
            Some(p) if p != old_port => return Some(Instant::now()),
            Some(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            None => {
                client = None;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    None
}

/// Watches the leader key; returns when it holds a value other than `old`.
async fn new_leader_key(endpoints: Vec<String>, key: String, old: String) -> anyhow::Result<Instant> {
    let mut client = etcd_client::Client::connect(endpoints, None).await?;
    let mut stream = client.watch(key.as_bytes(), None).await?;
    while let Some(response) = stream.message().await? {
        for event in response.events() {
            if event.event_type() == etcd_client::EventType::Put
                && let Some(kv) = event.kv()
                && kv.value() != old.as_bytes()
            {
                return Ok(Instant::now());
            }
        }
    }
    bail!("the etcd watch ended")
}

fn fmt_summary(s: Option<Summary>, digits: usize) -> (String, String) {
    match s {
        Some(s) => (
            format!("{:.digits$}", s.median),
            format!("{:.digits$}-{:.digits$}", s.min, s.max),
        ),
        None => ("-".into(), "-".into()),
    }
}

fn main() -> anyhow::Result<()> {
    let runs = env_count("BENCH_RUNS", 5);
    let seconds = env_count("BENCH_SECONDS", 10);
    let connects = env_count("BENCH_CONNECTS", 200);
    let failovers = env_count("BENCH_FAILOVERS", 5);
    let agent = sibling_binary("pgvigil")?;
    let ctl = sibling_binary("pgvigilctl")?;

    eprintln!("starting a 3-node cluster (etcd x3, pgvigil x3, PostgreSQL x3) ...");
    let mut cluster = TestCluster::start(&agent, ClusterOptions::default())?;
    let mut leader = cluster
        .wait_healthy(HEALTHY)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.diagnostics()))?;
    let (router, rports) = start_router(&cluster, &agent)?;
    let (haproxy, hports) = start_haproxy(&cluster, &ctl)?;
    let leader_port = cluster.nodes[leader].pg_port;
    wait_routes_to(rports.primary, leader_port, "the router")
        .map_err(|e| anyhow::anyhow!("{e}\n{}", router.log_tail()))?;
    wait_routes_to(hports.primary, leader_port, "HAProxy")
        .map_err(|e| anyhow::anyhow!("{e}\n{}", haproxy.log_tail()))?;

    eprintln!("pgbench -i -s 10 ...");
    pgbench(leader_port, &["-i", "-s", "10", "-q"])?;
    cluster.psql(
        leader,
        "CREATE TABLE bench_writes(id bigserial PRIMARY KEY, port int)",
    )?;
    cluster.psql(leader, "CHECKPOINT")?;

    let targets = [
        ("direct", leader_port),
        ("HAProxy", hports.primary),
        ("router", rports.primary),
    ];

    // 1. Throughput.
    let mut tps: [Vec<f64>; 3] = Default::default();
    let secs = seconds.to_string();
    for run in 0..runs {
        for k in 0..3 {
            let i = (run + k) % 3; // rotate the order so no target always runs first
            let (name, port) = targets[i];
            let out = pgbench(port, &["-S", "-n", "-c", "4", "-j", "2", "-T", &secs])?;
            let t = parse_pgbench_tps(&out).with_context(|| format!("no tps in pgbench output:\n{out}"))?;
            eprintln!("pgbench -S run {}/{runs} {name:8} {t:10.0} tps", run + 1);
            tps[i].push(t);
        }
    }

    // 2. Connection set-up latency.
    let rt = Runtime::new()?;
    let mut connect: [Vec<f64>; 3] = Default::default();
    for (i, (name, port)) in targets.iter().enumerate() {
        connect[i] = rt.block_on(connect_times(*port, connects))?;
        eprintln!(
            "{connects} connections {name:8} median {:.2} ms",
            summarize(&connect[i]).map_or(0.0, |s| s.median)
        );
    }

    // 3. Leader key -> first write, planned leader changes.
    let mut delays: [Vec<f64>; 2] = Default::default();
    let leader_key = format!("/service/{}/leader", cluster.scope);
    for run in 0..failovers {
        let old = leader;
        let old_port = cluster.nodes[old].pg_port;
        let old_name = cluster.nodes[old].name.clone();
        wait_routes_to(rports.primary, old_port, "the router")?;
        wait_routes_to(hports.primary, old_port, "HAProxy")?;
        let stop = Arc::new(AtomicBool::new(false));
        let key_task = rt.spawn(new_leader_key(
            cluster.etcd.endpoints(),
            leader_key.clone(),
            old_name.clone(),
        ));
        let router_task = rt.spawn(first_write_elsewhere(rports.primary, old_port, stop.clone()));
        let haproxy_task = rt.spawn(first_write_elsewhere(hports.primary, old_port, stop.clone()));
        std::thread::sleep(Duration::from_millis(500)); // writers and watch running
        cluster.signal_agent(old, Signal::SIGTERM)?;
        let outcome = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(90), async {
                let key = key_task.await??;
                let r = router_task.await?;
                let h = haproxy_task.await?;
                anyhow::Ok((key, r, h))
            })
            .await
        });
        stop.store(true, Ordering::Relaxed);
        let (key_at, router_at, haproxy_at) = match outcome {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => bail!("leader change {}: {e}\n{}", run + 1, cluster.diagnostics()),
            Err(_) => bail!(
                "leader change {}: no write within 90 s\n{}",
                run + 1,
                cluster.diagnostics()
            ),
        };
        let ms = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(key_at).as_secs_f64() * 1000.0);
        let (r, h) = (ms(router_at), ms(haproxy_at));
        eprintln!(
            "leader change {}/{failovers}: new leader key -> first write: router {:.0} ms, HAProxy {:.0} ms",
            run + 1,
            r.unwrap_or(f64::NAN),
            h.unwrap_or(f64::NAN)
        );
        delays[0].extend(r);
        delays[1].extend(h);
        // The old leader rejoins as a replica before the next round.
        cluster.start_agent(old)?;
        leader = cluster
            .wait_healthy(HEALTHY)
            .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.diagnostics()))?;
    }
    let stats_ok = http::get(rports.stats, "/stats.json").is_ok_and(|r| r.status == 200);

    // Report.
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let pg = psql_at(leader_port_of(&cluster, leader), "SHOW server_version").unwrap_or_default();
    let hv = Command::new("/usr/sbin/haproxy")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!();
    println!("pgvigil routing benchmark: 3-node cluster on 127.0.0.1, {cores} CPU(s), PostgreSQL {pg}, {hv}");
    println!(
        "pgbench -S scale 10, -c 4 -j 2 -T {seconds}, {runs} runs each (interleaved); {connects} connections each; \
         {failovers} planned leader changes"
    );
    println!();
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "", "direct", "HAProxy", "router"
    );
    println!("|{:-<46}|{:->14}|{:->14}|{:->14}|", "", "", "", "");
    let t: Vec<(String, String)> = tps.iter().map(|v| fmt_summary(summarize(v), 0)).collect();
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "pgbench -S TPS, median", t[0].0, t[1].0, t[2].0
    );
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "pgbench -S TPS, min-max", t[0].1, t[1].1, t[2].1
    );
    let direct = summarize(&tps[0]).map_or(f64::NAN, |s| s.median);
    let rel = |i: usize| {
        summarize(&tps[i]).map_or("-".into(), |s| {
            format!("{:+.1}%", (s.median / direct - 1.0) * 100.0)
        })
    };
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "TPS vs direct (median)",
        "",
        rel(1),
        rel(2)
    );
    let c: Vec<Option<Summary>> = connect.iter().map(|v| summarize(v)).collect();
    let cell = |s: Option<Summary>, f: fn(Summary) -> f64| s.map_or("-".into(), |s| format!("{:.2}", f(s)));
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "connection set-up, median (ms)",
        cell(c[0], |s| s.median),
        cell(c[1], |s| s.median),
        cell(c[2], |s| s.median)
    );
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "connection set-up, p95 (ms)",
        cell(c[0], |s| s.p95),
        cell(c[1], |s| s.p95),
        cell(c[2], |s| s.p95)
    );
    let d: Vec<(String, String)> = delays.iter().map(|v| fmt_summary(summarize(v), 0)).collect();
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "new leader key -> first write, median (ms)", "", d[1].0, d[0].0
    );
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>12} |",
        "new leader key -> first write, min-max (ms)", "", d[1].1, d[0].1
    );
    println!();
    println!(
        "raw: tps direct {:?}, HAProxy {:?}, router {:?}; leader change router {:?} ms, HAProxy {:?} ms; router stats page answered: {stats_ok}",
        rounded(&tps[0]),
        rounded(&tps[1]),
        rounded(&tps[2]),
        rounded(&delays[0]),
        rounded(&delays[1])
    );
    drop(router);
    drop(haproxy);
    Ok(())
}

fn rounded(v: &[f64]) -> Vec<i64> {
    v.iter().map(|x| x.round() as i64).collect()
}

fn leader_port_of(cluster: &TestCluster, i: usize) -> u16 {
    cluster.nodes[i].pg_port
}
