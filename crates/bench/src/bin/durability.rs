//! `durability`: what synchronous replication buys and costs, pgvigil and Patroni 4.1.5 side by
//! side in one invocation, on the same three-host network lab as `failover` (network
//! namespaces; per host an etcd member, PostgreSQL 15 and the agent), with the same YAML
//! configuration file for both. It reports:
//!
//! 1. **Acknowledged rows lost per failover**, `synchronous_mode` off and on (`BENCH_RUNS`,
//!    default 5, failovers per mode and system). The testkit checker writes unique ids through
//!    `pgvigil router` (autocommit `INSERT`s back to back, `BENCH_WRITE_PAUSE_MS` = 0, every
//!    acknowledged id recorded) while a rate-limited background `pgbench` (tpcb-like,
//!    `BENCH_LOAD_CLIENTS` (4) clients, `BENCH_LOAD_RATE` (1000) transactions per second in
//!    total) writes directly to the primary, after a `CHECKPOINT`, so that the replicas are
//!    never trivially caught up. After at least 5 s of load, the leader's *host* dies: its link
//!    goes down first (WAL still in flight or in the socket buffers never arrives, nobody gets a
//!    reset), then every process on it gets SIGKILL (agent, PostgreSQL, etcd member). Once
//!    another member is a writable leader and the checker's writes flow again, the checker's
//!    acknowledged ids missing on the new leader are counted. The dead host then comes back
//!    and rejoins (pg_rewind) before the next run.
//! 2. **pgbench TPS on the primary**, `synchronous_mode` off / on / quorum: `pgbench`
//!    tpcb-like, scale `BENCH_TPS_SCALE` (10), `BENCH_TPS_CLIENTS` (4) clients, 2 threads,
//!    `BENCH_TPS_SECONDS` (20) seconds, straight to the primary's PostgreSQL port (no router),
//!    after a `CHECKPOINT`. `BENCH_TPS_ROUNDS` (5) rounds; in each round every (mode, system)
//!    pair runs once, the mode order rotating and the system order alternating, so machine
//!    noise spreads over all cells.
//!
//! Modes change through the dynamic configuration (`PATCH /config` on the leader's REST API,
//! `{"synchronous_mode": false | true | "quorum"}`, the same request for both agents); a
//! measurement starts only once the mode is in effect on the primary (`synchronous_commit`,
//! `synchronous_standby_names` and `pg_stat_replication.sync_state`) and in `/cluster` (a
//! member with role `sync_standby`, or `quorum_standby` for each replica).
//!
//! Timings are the fast profile of `failover` (`ttl` 20, `loop_wait` 2, `retry_timeout` 5,
//! valid for both agents): loss does not depend on them, and they keep the run short. Both
//! clusters are up for the whole run; the one not being measured idles.
//!
//! Run it through `bench/durability/run.sh`. Environment: the counts above, `BENCH_SYSTEMS`
//! (`pgvigil,patroni`), `BENCH_PHASES` (`tps,loss`), `PGVIGIL_BENCH_VENV`.
//!
//! The helpers shared with `failover.rs` (environment parsing, the results table) are
//! duplicated here on purpose for now, while `failover.rs` changes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgvigil_bench::results::Results;
use pgvigil_bench::{env_count, env_list, load_averages, parse_pgbench_tps, summarize};
use pgvigil_testkit::checker::{self, Checker};
use pgvigil_testkit::cluster::{SUPERUSER, SUPERUSER_PASSWORD, sibling_binary};
use pgvigil_testkit::netcluster::{AgentKind, NetCluster, NetOptions, pg_bin_dir};
use pgvigil_testkit::{http, spawn_owned, wait_until};

const HEALTHY: Duration = Duration::from_secs(300);
const MODE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the background load runs before the leader's host dies (at least).
const LOAD_WARMUP: Duration = Duration::from_secs(5);
/// The replica furthest behind: bytes of WAL the primary has written that it has not flushed.
const LAG_SQL: &str =
    "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)), 0) FROM pg_stat_replication";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Off,
    On,
    Quorum,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::On => "on",
            Mode::Quorum => "quorum",
        }
    }

    /// The `synchronous_mode` value in `PATCH /config`.
    fn json(self) -> &'static str {
        match self {
            Mode::Off => "false",
            Mode::On => "true",
            Mode::Quorum => "\"quorum\"",
        }
    }
}

struct Settings {
    runs: usize,
    load_clients: usize,
    load_rate: usize,
    tps_rounds: usize,
    tps_seconds: usize,
    tps_clients: usize,
    tps_scale: usize,
    write_pause_ms: usize,
}

struct System {
    name: &'static str,
    cluster: NetCluster,
    mode: Mode,
}

fn pgbench_command(c: &NetCluster, i: usize, args: &[&str]) -> anyhow::Result<Command> {
    let addr = c.nodes[i].pg_addr();
    let mut cmd = Command::new(pg_bin_dir()?.join("pgbench"));
    cmd.args(args)
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", SUPERUSER, "postgres"])
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null());
    Ok(cmd)
}

/// Runs pgbench on host `i`'s PostgreSQL to completion; returns its output.
fn pgbench(c: &NetCluster, i: usize, args: &[&str]) -> anyhow::Result<String> {
    let out = pgbench_command(c, i, args)?.output().context("running pgbench")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("pgbench {args:?} on {} failed:\n{text}", c.nodes[i].name);
    }
    Ok(text)
}

/// One check that `mode` is in effect: on the primary (`synchronous_commit`,
/// `synchronous_standby_names`, the replicas' `sync_state`) and in `/cluster` (the roles the sync key gives the replicas).
fn mode_in_effect(c: &NetCluster, mode: Mode) -> anyhow::Result<usize> {
    let leader = c.leader().context("no running leader")?;
    let row = c.psql(
        leader,
        "SELECT current_setting('synchronous_commit') || '|' || \
         current_setting('synchronous_standby_names') || '|' || \
         (SELECT coalesce(string_agg(sync_state, ',' ORDER BY sync_state), '') \
          FROM pg_stat_replication WHERE state = 'streaming')",
    )?;
    let (commit, rest) = row.split_once('|').context("unexpected psql output")?;
    let (names, states) = rest.split_once('|').context("unexpected psql output")?;
    let states: Vec<&str> = states.split(',').filter(|s| !s.is_empty()).collect();
    let replicas = c.nodes.len() - 1;
    let count = |s: &str| states.iter().filter(|&&x| x == s).count();
    let doc = c.cluster_doc().context("no /cluster")?;
    let roles: Vec<String> = doc["members"]
        .as_array()
        .context("no members")?
        .iter()
        .filter_map(|m| m["role"].as_str().map(str::to_string))
        .collect();
    let roles_count = |r: &str| roles.iter().filter(|x| *x == r).count();
    // A synchronous mode only delays commits whose synchronous_commit waits for a standby.
    let waits = matches!(commit, "on" | "remote_write" | "remote_apply");
    let ok = states.len() == replicas
        && (mode == Mode::Off || waits)
        && match mode {
            Mode::Off => {
                names.is_empty()
                    && count("async") == replicas
                    && roles_count("sync_standby") + roles_count("quorum_standby") == 0
            }
            Mode::On => {
                !names.is_empty()
                    && !names.starts_with("ANY")
                    && count("sync") == 1
                    && roles_count("sync_standby") == 1
            }
            Mode::Quorum => {
                names.starts_with("ANY")
                    && count("quorum") == replicas
                    && roles_count("quorum_standby") == replicas
            }
        };
    if !ok {
        bail!(
            "synchronous_commit {commit:?}, synchronous_standby_names {names:?}, sync states {states:?}, \
             roles {roles:?}"
        );
    }
    Ok(leader)
}

/// Switches `s` to `mode` through `PATCH /config` on the leader and waits (bounded) until it
/// is in effect; returns the leader.
fn set_mode(s: &mut System, mode: Mode) -> anyhow::Result<usize> {
    let c = &s.cluster;
    let leader = c.wait_healthy(HEALTHY)?;
    if s.mode != mode {
        let body = format!(r#"{{"synchronous_mode": {}}}"#, mode.json());
        let r = http::request_to(c.nodes[leader].api_addr(), "PATCH", "/config", Some(&body), None)?;
        if r.status != 200 {
            bail!("{}: PATCH /config {body}: {} {}", s.name, r.status, r.body);
        }
        s.mode = mode;
    }
    let mut last = String::new();
    wait_until(
        &format!("synchronous_mode {} in effect", mode.label()),
        MODE_TIMEOUT,
        || match mode_in_effect(c, mode) {
            Ok(l) => Some(l),
            Err(e) => {
                last = e.to_string();
                None
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}: {last}\n{}", s.name, c.diagnostics()))
}

/// One pgbench TPS measurement on the primary, in `mode`.
fn measure_tps(s: &mut System, mode: Mode, cfg: &Settings) -> anyhow::Result<f64> {
    let leader = set_mode(s, mode)?;
    let c = &s.cluster;
    c.psql(leader, "CHECKPOINT")?;
    let (clients, seconds) = (cfg.tps_clients.to_string(), cfg.tps_seconds.to_string());
    let out = pgbench(c, leader, &["-c", &clients, "-j", "2", "-T", &seconds])?;
    parse_pgbench_tps(&out).with_context(|| format!("no tps in pgbench output:\n{out}"))
}

/// A failover's outcome.
struct Loss {
    lost: usize,
    lag_bytes: f64,
    /// The largest of the lag samples taken under load before the kill.
    lag_peak: f64,
    gap: f64,
    lost_ids: Vec<i64>,
    /// Checker writes acknowledged in the run.
    acked: usize,
    /// From restarting the dead host to every member streaming again, in seconds.
    rejoin: f64,
}

/// A pgbench we started in the background: SIGKILLed by its PID and reaped when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One failover under load, in `mode`: the leader's host dies; returns the checker's
/// acknowledged ids missing on the new leader. Leaves the cluster healthy again (the dead host
/// rejoined).
fn measure_loss(s: &mut System, mode: Mode, cfg: &Settings) -> anyhow::Result<Loss> {
    let leader = set_mode(s, mode)?;
    let c = &mut s.cluster;
    // The background load, straight to the primary.
    let (clients, rate) = (cfg.load_clients.to_string(), cfg.load_rate.to_string());
    let mut cmd = pgbench_command(
        c,
        leader,
        &["-n", "-c", &clients, "-j", "1", "-R", &rate, "-T", "600"],
    )?;
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    c.psql(leader, "CHECKPOINT")?;
    let mut load = Background(spawn_owned(cmd).context("starting the background pgbench")?);
    // The checker as in the fault tests, but writing back to back (`BENCH_WRITE_PAUSE_MS`,
    // default 0, instead of 20 ms): the last acknowledgement before the host dies is then
    // within a millisecond or two of the death, where asynchronous replication can lose it.
    c.psql(
        leader,
        &format!("{}; TRUNCATE {}", checker::setup_sql(), checker::WRITES_TABLE),
    )?;
    let mut checker_cfg = c.checker_config()?;
    checker_cfg.write_every = Duration::from_millis(cfg.write_pause_ms as u64);
    let checker = Checker::start(checker_cfg);
    checker.wait_for_acks(20, Duration::from_secs(60))?;
    // Under load for at least LOAD_WARMUP and 100 more acknowledged checker writes, sampling
    // the replicas' lag four times a second (bounded: at most 60 s).
    let (target, since) = (checker.acked() + 100, Instant::now());
    let mut lags = Vec::new();
    for _ in 0..240 {
        if checker.acked() >= target && since.elapsed() >= LOAD_WARMUP {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        if let Some(l) = c.psql(leader, LAG_SQL).ok().and_then(|l| l.parse::<f64>().ok()) {
            lags.push(l);
        }
    }
    if checker.acked() < target {
        bail!(
            "the checker's writes do not flow under load: {} acknowledged",
            checker.acked()
        );
    }
    if let Some(status) = load.0.try_wait()? {
        bail!("the background pgbench exited early ({status})");
    }
    let lag = c.psql(leader, LAG_SQL);
    checker.mark("host dies");
    c.kill_host(leader)?;
    drop(load);
    let new = c.wait_new_leader(Some(leader), HEALTHY)?;
    checker
        .wait_for_acks(20, HEALTHY)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.diagnostics()))?;
    let report = checker.finish();
    let gap = report.gap_after_mark("host dies").context("no mark")?;
    let lost_ids = report.lost(&c.ids_on(new)?);
    if !lost_ids.is_empty() {
        eprintln!(
            "{}: {} acknowledged ids missing on {} after the failover: {:?}\n{}",
            s.name,
            lost_ids.len(),
            c.nodes[new].name,
            &lost_ids[..lost_ids.len().min(20)],
            report.summary()
        );
    }
    let back = Instant::now();
    c.restart_host(leader)?;
    c.wait_healthy(HEALTHY)?;
    let rejoin = back.elapsed().as_secs_f64();
    Ok(Loss {
        rejoin,
        lost: lost_ids.len(),
        lag_bytes: lag.ok().and_then(|l| l.parse().ok()).unwrap_or(f64::NAN),
        lag_peak: summarize(&lags).map_or(f64::NAN, |s| s.max),
        gap: gap.as_secs_f64(),
        lost_ids,
        acked: report.acks.len(),
    })
}

fn start_system(name: &'static str, agent: AgentKind, router: &std::path::Path) -> anyhow::Result<System> {
    let options = NetOptions {
        ttl: 20,
        loop_wait: 2,
        retry_timeout: 5,
        router: Some(router.to_path_buf()),
        log_level: "info".into(),
        ..Default::default()
    };
    let cluster =
        NetCluster::start(agent, options).with_context(|| format!("starting the {name} cluster"))?;
    Ok(System {
        name,
        cluster,
        mode: Mode::Off,
    })
}

fn main() -> anyhow::Result<()> {
    let cfg = Settings {
        runs: env_count("BENCH_RUNS", 5),
        load_clients: env_count("BENCH_LOAD_CLIENTS", 4),
        load_rate: env_count("BENCH_LOAD_RATE", 1000),
        tps_rounds: env_count("BENCH_TPS_ROUNDS", 5),
        tps_seconds: env_count("BENCH_TPS_SECONDS", 20),
        tps_clients: env_count("BENCH_TPS_CLIENTS", 4),
        tps_scale: env_count("BENCH_TPS_SCALE", 10),
        write_pause_ms: env_count("BENCH_WRITE_PAUSE_MS", 0),
    };
    let systems = env_list("BENCH_SYSTEMS", "pgvigil,patroni");
    let phases = env_list("BENCH_PHASES", "tps,loss");
    let venv = PathBuf::from(
        std::env::var("PGVIGIL_BENCH_VENV").unwrap_or_else(|_| "/opt/pgvigil-bench/venv".into()),
    );
    let pgvigil = sibling_binary("pgvigil")?;
    let patroni = venv.join("bin/patroni");
    if systems.iter().any(|s| s == "patroni") && !patroni.exists() {
        bail!(
            "{} not found: run scripts/install-bench-deps.sh",
            patroni.display()
        );
    }
    let patroni_version = Command::new(&patroni)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load_start = load_averages();
    eprintln!(
        "bench durability: {} failovers per mode and system, TPS {} rounds x {} s, systems {systems:?}, \
         phases {phases:?}; {patroni_version}; load average {load_start}",
        cfg.runs, cfg.tps_rounds, cfg.tps_seconds
    );
    let started = Instant::now();
    let elapsed = || started.elapsed().as_secs_f64();
    let wanted = |p: &str| phases.iter().any(|x| x == p);
    let names: Vec<&'static str> = ["pgvigil", "patroni"]
        .into_iter()
        .filter(|n| systems.iter().any(|s| s == n))
        .collect();

    let mut up = Vec::new();
    for name in &names {
        let agent = match *name {
            "pgvigil" => AgentKind::Pgvigil(pgvigil.clone()),
            _ => AgentKind::Patroni(patroni.clone()),
        };
        up.push(start_system(name, agent, &pgvigil)?);
    }
    let scale = cfg.tps_scale.to_string();
    for s in &up {
        let leader = s
            .cluster
            .wait_healthy(HEALTHY)
            .with_context(|| format!("{} cluster", s.name))?;
        pgbench(&s.cluster, leader, &["-i", "-q", "-s", &scale])?;
        s.cluster.wait_replicas_caught_up(leader, HEALTHY)?;
    }
    eprintln!(
        "[{:>5.0}s] clusters up, pgbench tables (scale {scale}) loaded",
        elapsed()
    );

    let mut results = Results::default();
    let mut lost_detail = Vec::new();
    let mut loads = Vec::new();
    let modes = [Mode::Off, Mode::On, Mode::Quorum];
    if wanted("tps") {
        for round in 0..cfg.tps_rounds {
            for k in 0..modes.len() {
                let mode = modes[(round + k) % modes.len()];
                let order: Vec<usize> = if (round + k) % 2 == 0 {
                    (0..up.len()).collect()
                } else {
                    (0..up.len()).rev().collect()
                };
                for i in order {
                    let s = &mut up[i];
                    let tps = measure_tps(s, mode, &cfg)
                        .with_context(|| format!("{} TPS {}", s.name, mode.label()))?;
                    let la = load_averages();
                    eprintln!(
                        "[{:>5.0}s] TPS round {}: {} synchronous_mode {}: {tps:.0} (load average {la})",
                        elapsed(),
                        round + 1,
                        s.name,
                        mode.label()
                    );
                    loads.push(la);
                    let row = format!(
                        "pgbench TPS on the primary, synchronous_mode {} (tpcb-like, scale {}, {} clients, {} s)",
                        mode.label(),
                        cfg.tps_scale,
                        cfg.tps_clients,
                        cfg.tps_seconds
                    );
                    results.add(&row, "tps", s.name, tps);
                }
            }
        }
    }
    if wanted("loss") {
        for mode in [Mode::Off, Mode::On] {
            for run in 0..cfg.runs {
                let order: Vec<usize> = if run % 2 == 0 {
                    (0..up.len()).collect()
                } else {
                    (0..up.len()).rev().collect()
                };
                for i in order {
                    let s = &mut up[i];
                    let loss = measure_loss(s, mode, &cfg)
                        .with_context(|| format!("{} failover, synchronous_mode {}", s.name, mode.label()))?;
                    eprintln!(
                        "[{:>5.0}s] failover, synchronous_mode {}, {} run {}: lost {} of {} acknowledged, replica flush lag {:.0} bytes (peak under load {:.0}), write gap {:.1}s, rejoin {:.1}s (load average {})",
                        elapsed(),
                        mode.label(),
                        s.name,
                        run + 1,
                        loss.lost,
                        loss.acked,
                        loss.lag_bytes,
                        loss.lag_peak,
                        loss.gap,
                        loss.rejoin,
                        load_averages()
                    );
                    if !loss.lost_ids.is_empty() {
                        lost_detail.push(format!(
                            "{} synchronous_mode {} run {}: {:?}",
                            s.name,
                            mode.label(),
                            run + 1,
                            loss.lost_ids
                        ));
                    }
                    let m = mode.label();
                    results.add(
                        &format!("Acknowledged rows lost per failover, synchronous_mode {m}"),
                        "rows",
                        s.name,
                        loss.lost as f64,
                    );
                    results.add(
                        &format!("Replica lag under the load, peak of 4 samples/s (WAL bytes the worst replica had not flushed), synchronous_mode {m}"),
                        "bytes",
                        s.name,
                        loss.lag_peak,
                    );
                    results.add(
                        &format!("Replica lag, last sample before the kill, synchronous_mode {m}"),
                        "bytes",
                        s.name,
                        loss.lag_bytes,
                    );
                    results.add(
                        &format!("Write gap of the failover (context), synchronous_mode {m}"),
                        "s",
                        s.name,
                        loss.gap,
                    );
                    results.add(
                        &format!("Checker writes acknowledged per run (context), synchronous_mode {m}"),
                        "writes",
                        s.name,
                        loss.acked as f64,
                    );
                    results.add(
                        &format!(
                            "Old leader's host back to all members streaming (context), synchronous_mode {m}"
                        ),
                        "s",
                        s.name,
                        loss.rejoin,
                    );
                }
            }
        }
    }
    drop(up);
    println!("\n{}", results.table(&names));
    println!("raw values (in run order):\n{}", results.raw());
    if !lost_detail.is_empty() {
        println!("lost ids:\n{}\n", lost_detail.join("\n"));
    }
    println!(
        "({:.0} minutes in total; {patroni_version}; load average at the start {load_start}, at the end {}; \
         during the TPS runs (1-min) {}; background load during failovers: pgbench tpcb-like -c {} -R {})",
        started.elapsed().as_secs_f64() / 60.0,
        load_averages(),
        loads
            .iter()
            .map(|l| l.split_whitespace().next().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(" "),
        cfg.load_clients,
        cfg.load_rate
    );
    Ok(())
}
