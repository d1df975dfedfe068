//! `routing`: client routing on a real three-node pgvigil cluster on this machine, three ways:
//! straight to the primary, through HAProxy (configured by `pgvigilctl haproxy-config`) and
//! through `pgvigil router`. In one run it reports
//!
//! 1. `pgbench -S` throughput (scale 10, `-c 4 -j 2 -T 10`, 5 runs each, interleaved): median
//!    and spread, each router's cost relative to direct, the average latency, and the CPU time
//!    each proxy spends per transaction;
//! 2. the same with a single client (`-c 1 -j 1`), which keeps the machine far from saturation:
//!    the latency of one query (a round trip through the proxy), what each proxy adds to it, and
//!    its CPU per transaction, which is what a proxy costs when the database is not CPU-bound;
//! 3. connection set-up latency (connect, authenticate, ReadyForQuery; 200 connections each):
//!    median and p95;
//! 4. the delay from the new leader key appearing in etcd to the first successful write through
//!    port 5000, for the router and for HAProxy (5 planned leader changes: SIGTERM of the
//!    leader's agent, which stops PostgreSQL and releases the lock).
//!
//! Run it through `bench/routing/run.sh` (builds the release binaries first). Environment:
//! `BENCH_RUNS`, `BENCH_SECONDS`, `BENCH_CONNECTS`, `BENCH_FAILOVERS` override the counts (for a
//! quick smoke run). `BENCH_BASELINE_ROUTER=/path/to/pgvigil` adds the router of another build
//! as a fourth target.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use pgvigil_bench::{
    Summary, env_count, load_average, parse_pgbench_latency_ms, parse_pgbench_tps,
    parse_pgbench_transactions, process_cpu_ns, summarize,
};
use pgvigil_testkit::cluster::{
    ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD, TestCluster, psql_at, sibling_binary,
};
use pgvigil_testkit::{free_port, http, spawn_owned, wait_until};
use tokio::runtime::Runtime;

const HEALTHY: Duration = Duration::from_secs(180);

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

fn start_router(cluster: &TestCluster, agent: &Path, name: &str) -> anyhow::Result<(Proc, Ports)> {
    let ports = Ports {
        primary: free_port(),
        replicas: free_port(),
        stats: free_port(),
    };
    let base = fs::read_to_string(&cluster.nodes[0].config)?;
    let config = cluster.root().join(format!("{name}.yml"));
    fs::write(
        &config,
        format!(
            "{base}\nrouter:\n  primary_listen: 127.0.0.1:{}\n  replicas_listen: 127.0.0.1:{}\n  stats_listen: 127.0.0.1:{}\n",
            ports.primary, ports.replicas, ports.stats
        ),
    )?;
    let mut cmd = Command::new(agent);
    cmd.arg("router").arg(&config).env("PGVIGIL_LOG", "warn");
    let proc = Proc::spawn(cmd, &cluster.root().join(format!("{name}.log")))?;
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

/// One pgbench run through a target.
#[derive(Default)]
struct Runs {
    tps: Vec<f64>,
    latency_ms: Vec<f64>,
    /// CPU time of the proxy per transaction, microseconds (none for direct connections).
    cpu_us: Vec<f64>,
}

/// Runs pgbench against `port`; `proxy` is the PID of the proxy in between, if any, whose CPU
/// time is measured over the run.
fn pgbench_run(port: u16, proxy: Option<u32>, args: &[&str], into: &mut Runs) -> anyhow::Result<f64> {
    let before = proxy.and_then(process_cpu_ns);
    let out = pgbench(port, args)?;
    let after = proxy.and_then(process_cpu_ns);
    let tps = parse_pgbench_tps(&out).with_context(|| format!("no tps in pgbench output:\n{out}"))?;
    let latency =
        parse_pgbench_latency_ms(&out).with_context(|| format!("no latency in pgbench output:\n{out}"))?;
    let n = parse_pgbench_transactions(&out).with_context(|| format!("no transaction count:\n{out}"))?;
    into.tps.push(tps);
    into.latency_ms.push(latency);
    if let (Some(b), Some(a)) = (before, after)
        && n > 0
    {
        into.cpu_us.push(a.saturating_sub(b) as f64 / 1000.0 / n as f64);
    }
    Ok(tps)
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
    let (router, rports) = start_router(&cluster, &agent, "router")?;
    // Another build of the router to compare with, e.g. the one before a change.
    let baseline = match std::env::var_os("BENCH_BASELINE_ROUTER") {
        Some(bin) => {
            let (proc, ports) = start_router(&cluster, Path::new(&bin), "baseline-router")?;
            wait_routes_to(
                ports.primary,
                cluster.nodes[leader].pg_port,
                "the baseline router",
            )
            .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log_tail()))?;
            Some((proc, ports))
        }
        None => None,
    };
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

    let mut targets = vec![
        ("direct", leader_port, None),
        ("HAProxy", hports.primary, Some(haproxy.child.id())),
        ("router", rports.primary, Some(router.child.id())),
    ];
    if let Some((proc, ports)) = &baseline {
        targets.push(("baseline", ports.primary, Some(proc.child.id())));
    }
    let n = targets.len();

    // 1. Throughput, saturated: as many transactions as the machine can run.
    let mut sat: Vec<Runs> = targets.iter().map(|_| Runs::default()).collect();
    let mut loads = Vec::new();
    let secs = seconds.to_string();
    for run in 0..runs {
        for k in 0..n {
            let i = (run + k) % n; // rotate the order so no target always runs first
            let (name, port, pid) = targets[i];
            let t = pgbench_run(
                port,
                pid,
                &["-S", "-n", "-c", "4", "-j", "2", "-T", &secs],
                &mut sat[i],
            )?;
            loads.extend(load_average());
            eprintln!(
                "pgbench -S run {}/{runs} {name:8} {t:10.0} tps, load average {:.1}",
                run + 1,
                loads.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
    // 2. One client: the machine is far from saturated; latency of one query, proxy CPU.
    let mut single: Vec<Runs> = targets.iter().map(|_| Runs::default()).collect();
    for run in 0..runs {
        for k in 0..n {
            let i = (run + k) % n;
            let (name, port, pid) = targets[i];
            let args = ["-S", "-n", "-c", "1", "-j", "1", "-T", &secs];
            pgbench_run(port, pid, &args, &mut single[i])?;
            loads.extend(load_average());
            eprintln!(
                "pgbench -S -c 1 run {}/{runs} {name:8} latency {:.3} ms, load average {:.1}",
                run + 1,
                single[i].latency_ms.last().copied().unwrap_or(f64::NAN),
                loads.last().copied().unwrap_or(f64::NAN)
            );
        }
    }

    // 3. Connection set-up latency.
    let rt = Runtime::new()?;
    let mut connect: Vec<Vec<f64>> = vec![Vec::new(); n];
    for (i, (name, port, _)) in targets.iter().enumerate() {
        connect[i] = rt.block_on(connect_times(*port, connects))?;
        eprintln!(
            "{connects} connections {name:8} median {:.2} ms",
            summarize(&connect[i]).map_or(0.0, |s| s.median)
        );
    }

    // 4. Leader key -> first write, planned leader changes.
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
        "pgbench -S scale 10, -T {seconds}, -c 4 -j 2 (saturated) and -c 1 -j 1, {runs} runs each (interleaved); \
         {connects} connections each; {failovers} planned leader changes"
    );
    let l = summarize(&loads);
    println!(
        "load average (1 min) after each pgbench run: median {:.1}, min-max {:.1}-{:.1}",
        l.map_or(f64::NAN, |l| l.median),
        l.map_or(f64::NAN, |l| l.min),
        l.map_or(f64::NAN, |l| l.max)
    );
    println!();
    let row = |label: &str, cells: Vec<String>| {
        let cells: String = cells.iter().map(|c| format!(" {c:>12} |")).collect();
        println!("| {label:<46} |{cells}");
    };
    row("", targets.iter().map(|t| t.0.to_string()).collect());
    println!("|{:-<48}|{}", "", "--------------|".repeat(n));
    let med = |v: &[f64], digits: usize| fmt_summary(summarize(v), digits).0;
    let spread = |v: &[f64], digits: usize| fmt_summary(summarize(v), digits).1;
    let median_of = |v: &[f64]| summarize(v).map_or(f64::NAN, |s| s.median);
    // One cell per target; direct connections have no proxy and get an empty cell for proxy
    // measurements.
    let cells = |f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<String>>();
    let proxies = |f: &dyn Fn(usize) -> String| cells(&|i| if i == 0 { String::new() } else { f(i) });
    row("pgbench -S TPS, median", cells(&|i| med(&sat[i].tps, 0)));
    row("pgbench -S TPS, min-max", cells(&|i| spread(&sat[i].tps, 0)));
    let direct = median_of(&sat[0].tps);
    row(
        "TPS vs direct (median)",
        proxies(&|i| format!("{:+.1}%", (median_of(&sat[i].tps) / direct - 1.0) * 100.0)),
    );
    row(
        "latency average, median (ms)",
        cells(&|i| med(&sat[i].latency_ms, 3)),
    );
    row(
        "proxy CPU per transaction, median (us)",
        proxies(&|i| med(&sat[i].cpu_us, 1)),
    );
    row(
        "proxy CPU per transaction, min-max (us)",
        proxies(&|i| spread(&sat[i].cpu_us, 1)),
    );
    row("1 client: TPS, median", cells(&|i| med(&single[i].tps, 0)));
    row(
        "1 client: latency average, median (ms)",
        cells(&|i| med(&single[i].latency_ms, 3)),
    );
    row(
        "1 client: latency average, min-max (ms)",
        cells(&|i| spread(&single[i].latency_ms, 3)),
    );
    let direct = median_of(&single[0].latency_ms);
    row(
        "1 client: latency vs direct (us, medians)",
        proxies(&|i| format!("{:+.0}", (median_of(&single[i].latency_ms) - direct) * 1000.0)),
    );
    row(
        "1 client: proxy CPU per transaction (us)",
        proxies(&|i| med(&single[i].cpu_us, 1)),
    );
    let c: Vec<Option<Summary>> = connect.iter().map(|v| summarize(v)).collect();
    let cell = |s: Option<Summary>, f: fn(Summary) -> f64| s.map_or("-".into(), |s| format!("{:.2}", f(s)));
    row(
        "connection set-up, median (ms)",
        cells(&|i| cell(c[i], |s| s.median)),
    );
    row("connection set-up, p95 (ms)", cells(&|i| cell(c[i], |s| s.p95)));
    // Leader changes are measured for HAProxy and the router only.
    let d: Vec<(String, String)> = delays.iter().map(|v| fmt_summary(summarize(v), 0)).collect();
    let leader_cells = |k: usize| {
        cells(&|i| match i {
            1 => {
                if k == 0 {
                    d[1].0.clone()
                } else {
                    d[1].1.clone()
                }
            }
            2 => {
                if k == 0 {
                    d[0].0.clone()
                } else {
                    d[0].1.clone()
                }
            }
            _ => String::new(),
        })
    };
    row("new leader key -> first write, median (ms)", leader_cells(0));
    row("new leader key -> first write, min-max (ms)", leader_cells(1));
    println!();
    println!(
        "raw: tps direct {:?}, HAProxy {:?}, router {:?}; CPU us/transaction HAProxy {:?}, router {:?}; \
         leader change router {:?} ms, HAProxy {:?} ms; router stats page answered: {stats_ok}",
        rounded(&sat[0].tps),
        rounded(&sat[1].tps),
        rounded(&sat[2].tps),
        rounded(&sat[1].cpu_us),
        rounded(&sat[2].cpu_us),
        rounded(&delays[0]),
        rounded(&delays[1])
    );
    drop(baseline);
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
