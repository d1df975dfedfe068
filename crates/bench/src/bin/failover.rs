//! `failover`: pgvigil and Patroni 4.1.5 side by side, in one invocation, on the same three-host
//! network lab (network namespaces; per host an etcd member, PostgreSQL 15 and the agent), with
//! the same YAML configuration file, `pgvigil router` in front of both, and the testkit's
//! checker writing through the router's primary port. It reports, median and spread over
//! `BENCH_RUNS` (default 5) runs each:
//!
//! 1. the client's write gap when the leader host dies (link down, then SIGKILL of every process
//!    on it, etcd member included), with the default timings (no `ttl`, `loop_wait` or
//!    `retry_timeout` in the file: 30, 10, 10) while the etcd leader runs on another host, and
//!    while it runs on the dying host itself, without and with synchronous replication; and
//!    with the fast profile (ttl 20, loop_wait 2, retry_timeout 5);
//! 2. the write gap of a planned switchover (`POST /switchover` to the leader), defaults, with
//!    the client writing through the router and, separately, straight to the nodes' own ports
//!    (a multi-host connection that picks the writable node, like libpq's
//!    `target_session_attrs=read-write`);
//!    With synchronous replication (`switchover-sync`) the candidate is the synchronous
//!    standby, the only member either agent hands over to;
//! 3. the write gap after a PostgreSQL crash on the leader (SIGKILL of the postmaster), defaults;
//! 4. acknowledged writes lost in all of the above (asynchronous replication, the default);
//! 5. agent RSS and CPU seconds per idle minute (defaults, both clusters idle at the same time);
//! 6. `pgvigilctl list` and `patronictl list` wall time.
//!
//! Runs alternate between the two systems (pgvigil first in odd runs, Patroni first in even
//! ones); both clusters of a profile are up at the same time, the one not being measured idle.
//! Run it through `bench/failover/run.sh`. Environment: `BENCH_RUNS`, `BENCH_IDLE_SECONDS`
//! (default 60), `BENCH_SYSTEMS` (`pgvigil,patroni`; `baseline` adds the older pgvigil binary
//! that `PGVIGIL_BENCH_BASELINE` names, to compare two versions in one run), `BENCH_SCENARIOS`
//! (`idle,list,host,host-etcd,switchover,switchover-direct,crash,host-sync,host-etcd-sync,switchover-sync,host-fast`),
//! `BENCH_SYNC_MODE` (`synchronous_mode` of the synchronous rows: `on`, the default, or
//! `quorum`), `BENCH_SYNC_STRICT` (`1`: `synchronous_mode_strict: true` too), `PGVIGIL_BENCH_VENV` (where `scripts/install-bench-deps.sh` put Patroni).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgvigil_bench::results::Results;
use pgvigil_bench::{env_count, env_list, load_averages};
use pgvigil_testkit::cluster::sibling_binary;
use pgvigil_testkit::netcluster::{AgentKind, NetCluster, NetOptions};
use pgvigil_testkit::{http, wait_until};

const HEALTHY: Duration = Duration::from_secs(300);
/// What `BENCH_SYSTEMS` may list, in the table's column order; `baseline` is the pgvigil
/// binary `PGVIGIL_BENCH_BASELINE` names.
const SYSTEMS: [&str; 3] = ["pgvigil", "baseline", "patroni"];

#[derive(Clone, Copy, Debug)]
struct Profile {
    name: &'static str,
    /// `(ttl, loop_wait, retry_timeout)` written into the file; `None`: left out (defaults).
    timings: Option<(u64, u64, u64)>,
    synchronous: bool,
}

impl Profile {
    fn loop_wait(&self) -> u64 {
        self.timings.map_or(10, |t| t.1)
    }
}

const DEFAULTS: Profile = Profile {
    name: "defaults",
    timings: None,
    synchronous: false,
};
const DEFAULTS_SYNC: Profile = Profile {
    name: "defaults-sync",
    timings: None,
    synchronous: true,
};
const FAST: Profile = Profile {
    name: "fast",
    timings: Some((20, 2, 5)),
    synchronous: false,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The leader's host dies; `etcd_leader_on_it`: its etcd member led raft.
    HostDeath {
        etcd_leader_on_it: bool,
    },
    Switchover,
    /// A planned switchover with the client on the nodes' own ports (no router), as issue 3's
    /// benchmark asks.
    SwitchoverDirect,
    PgCrash,
}

struct System {
    name: &'static str,
    ctl: PathBuf,
    cluster: NetCluster,
}

fn start_system(
    name: &'static str,
    agent: AgentKind,
    ctl: PathBuf,
    profile: Profile,
    router: &Path,
) -> anyhow::Result<System> {
    let mut options = NetOptions {
        router: Some(router.to_path_buf()),
        log_level: "info".into(),
        extra_dcs: if profile.synchronous {
            let strict = std::env::var_os("BENCH_SYNC_STRICT").is_some_and(|v| v == "1");
            format!(
                "    synchronous_mode: {}\n    synchronous_mode_strict: {strict}\n",
                sync_mode()
            )
        } else {
            String::new()
        },
        ..Default::default()
    };
    options = match profile.timings {
        Some((ttl, loop_wait, retry_timeout)) => NetOptions {
            ttl,
            loop_wait,
            retry_timeout,
            ..options
        },
        None => options.with_default_timings(),
    };
    let cluster =
        NetCluster::start(agent, options).with_context(|| format!("starting the {name} cluster"))?;
    Ok(System { name, ctl, cluster })
}

/// A duration uniformly below `max` (clock-seeded; no cryptographic quality needed).
fn random_below(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = nanos
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    x ^= x >> 33;
    max.mul_f64((x % 1_000_000) as f64 / 1_000_000.0)
}

/// utime + stime + cutime + cstime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 .. cstime 17 (1-based).
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Both clusters idle for `seconds`: mean CPU seconds per minute and RSS per agent.
fn measure_idle(systems: &[System], seconds: u64, results: &mut Results) -> anyhow::Result<()> {
    let pids: Vec<Vec<u32>> = systems
        .iter()
        .map(|s| s.cluster.nodes.iter().filter_map(|n| n.agent_pid()).collect())
        .collect();
    let before: Vec<Vec<f64>> = pids
        .iter()
        .map(|p| p.iter().filter_map(|&pid| cpu_seconds(pid)).collect())
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    for (i, s) in systems.iter().enumerate() {
        let after: Vec<f64> = pids[i].iter().filter_map(|&pid| cpu_seconds(pid)).collect();
        if after.len() != before[i].len() || after.is_empty() {
            bail!("{}: an agent exited during the idle measurement", s.name);
        }
        let used: f64 = after.iter().zip(&before[i]).map(|(a, b)| a - b).sum::<f64>() / after.len() as f64;
        results.add(
            "Agent CPU per idle minute (mean of 3 agents)",
            "s",
            s.name,
            used * 60.0 / seconds as f64,
        );
        let rss: Vec<f64> = pids[i].iter().filter_map(|&pid| rss_mib(pid)).collect();
        results.add(
            "Agent RSS (mean of 3 agents)",
            "MiB",
            s.name,
            rss.iter().sum::<f64>() / rss.len().max(1) as f64,
        );
    }
    Ok(())
}

fn measure_list(s: &System, results: &mut Results) -> anyhow::Result<()> {
    let config = &s.cluster.nodes[0].config;
    let started = Instant::now();
    let out = Command::new(&s.ctl)
        .arg("-c")
        .arg(config)
        .arg("list")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", s.ctl.display()))?;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("node1") {
        bail!(
            "{} list failed: {}{}",
            s.ctl.display(),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    results.add(
        "`pgvigilctl list` / `patronictl list` wall time",
        "s",
        s.name,
        took.as_secs_f64(),
    );
    Ok(())
}

/// `synchronous_mode` of the synchronous profile: `BENCH_SYNC_MODE` (`on`, the default, or
/// `quorum`).
fn sync_mode() -> String {
    std::env::var("BENCH_SYNC_MODE").unwrap_or_else(|_| "on".into())
}

/// Waits until `/cluster` names a synchronous (or quorum) standby; returns its name.
fn wait_sync_standby(c: &NetCluster) -> anyhow::Result<String> {
    let found = wait_until("a synchronous standby", HEALTHY, || {
        let doc = c.cluster_doc()?;
        doc["members"]
            .as_array()?
            .iter()
            .find(|m| {
                matches!(m["role"].as_str(), Some("sync_standby" | "quorum_standby"))
                    && m["state"] == "streaming"
            })
            .and_then(|m| m["name"].as_str())
            .map(str::to_string)
    });
    found.map_err(|e| anyhow::anyhow!("{e}\n{}", c.diagnostics()))
}

/// One fault on a healthy cluster: returns (write gap in seconds, acknowledged writes lost).
/// Leaves the cluster healthy again.
fn run_fault(s: &mut System, fault: Fault, profile: Profile) -> anyhow::Result<(f64, usize)> {
    let loop_wait = profile.loop_wait();
    let c = &mut s.cluster;
    let leader = c.wait_healthy(HEALTHY)?;
    // In synchronous mode only the synchronous standby may take over (both agents refuse any
    // other candidate), and a switchover right after the previous one must find it named.
    let sync_standby = if profile.synchronous {
        Some(wait_sync_standby(c)?)
    } else {
        None
    };
    let checker = if fault == Fault::SwitchoverDirect {
        c.start_checker_with(leader, c.checker_config_direct())?
    } else {
        c.start_checker(leader)?
    };
    checker.wait_for_acks(100, Duration::from_secs(60))?;
    // The cluster settles in step with the agents' loops; without a random pause every run
    // would hit the same point of the leader's renewal period (and a dead leader's lease
    // expires `ttl` after its last renewal), which would make the spread meaningless.
    std::thread::sleep(random_below(Duration::from_secs(loop_wait)));
    let old_name = c.nodes[leader].name.clone();
    if let Fault::HostDeath { etcd_leader_on_it } = fault {
        let etcd_host = if etcd_leader_on_it {
            leader
        } else {
            (leader + 1) % c.nodes.len()
        };
        c.move_etcd_leader(etcd_host)?;
    }
    checker.mark("fault");
    match fault {
        Fault::HostDeath { .. } => c.kill_host(leader)?,
        Fault::PgCrash => c.kill_postgres(leader)?,
        Fault::Switchover | Fault::SwitchoverDirect => {
            let candidate =
                sync_standby.unwrap_or_else(|| c.nodes[(leader + 1) % c.nodes.len()].name.clone());
            let api = c.nodes[leader].api_addr();
            let body = format!(r#"{{"leader":"{old_name}","candidate":"{candidate}"}}"#);
            // The agent answers when the switchover is done (or after its own timeout); the
            // result shows in the cluster anyway.
            std::thread::spawn(move || http::request_to(api, "POST", "/switchover", Some(&body), None));
        }
    }
    if fault != Fault::PgCrash {
        c.wait_new_leader(Some(leader), HEALTHY)?;
    }
    checker
        .wait_for_acks(50, HEALTHY)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", c.diagnostics()))?;
    let report = checker.finish();
    let gap = report.gap_after_mark("fault").context("no mark")?;
    let now_leader = c.wait_new_leader(None, HEALTHY)?;
    let lost = report.lost(&c.ids_on(now_leader)?).len();
    if matches!(fault, Fault::HostDeath { .. }) {
        c.restart_host(leader)?;
    }
    c.wait_healthy(HEALTHY)?;
    Ok((gap.as_secs_f64(), lost))
}

fn main() -> anyhow::Result<()> {
    let runs = env_count("BENCH_RUNS", 5);
    let idle_seconds = env_count("BENCH_IDLE_SECONDS", 60) as u64;
    let systems = env_list("BENCH_SYSTEMS", "pgvigil,patroni");
    let scenarios = env_list(
        "BENCH_SCENARIOS",
        "idle,list,host,host-etcd,switchover,switchover-direct,crash,host-sync,host-etcd-sync,switchover-sync,host-fast",
    );
    let venv = PathBuf::from(
        std::env::var("PGVIGIL_BENCH_VENV").unwrap_or_else(|_| "/opt/pgvigil-bench/venv".into()),
    );
    let pgvigil = sibling_binary("pgvigil")?;
    let pgvigilctl = sibling_binary("pgvigilctl")?;
    let (patroni, patronictl) = (venv.join("bin/patroni"), venv.join("bin/patronictl"));
    if systems.iter().any(|s| s == "patroni") && !patroni.exists() {
        bail!(
            "{} not found: run scripts/install-bench-deps.sh",
            patroni.display()
        );
    }
    if let Some(unknown) = systems.iter().find(|s| !SYSTEMS.contains(&s.as_str())) {
        bail!(
            "BENCH_SYSTEMS: unknown system {unknown:?} (known: {})",
            SYSTEMS.join(", ")
        );
    }
    // An older pgvigil agent to compare against in the same run (e.g. before a redesign).
    let baseline = match std::env::var_os("PGVIGIL_BENCH_BASELINE") {
        Some(path) => Some(PathBuf::from(path)),
        None if systems.iter().any(|s| s == "baseline") => {
            bail!("BENCH_SYSTEMS lists baseline: set PGVIGIL_BENCH_BASELINE to an older pgvigil binary")
        }
        None => None,
    };
    if let Some(path) = baseline.as_ref().filter(|p| !p.is_file()) {
        bail!("PGVIGIL_BENCH_BASELINE: {} is not a file", path.display());
    }
    let version = Command::new(&patroni).arg("--version").output().ok();
    let patroni_version = version
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("bench failover: {runs} runs, systems {systems:?}, scenarios {scenarios:?}; {patroni_version}");
    let started = Instant::now();
    let load_at_start = load_averages();
    let mut results = Results::default();
    let wanted = |s: &str| scenarios.iter().any(|x| x == s);
    let system_names: Vec<&'static str> = SYSTEMS
        .into_iter()
        .filter(|n| systems.iter().any(|s| s == n))
        .collect();

    let elsewhere = Fault::HostDeath {
        etcd_leader_on_it: false,
    };
    let on_it = Fault::HostDeath {
        etcd_leader_on_it: true,
    };
    for profile in [DEFAULTS, DEFAULTS_SYNC, FAST] {
        let all: Vec<(Fault, &str)> = match profile.name {
            "defaults" => vec![
                (elsewhere, "host"),
                (on_it, "host-etcd"),
                (Fault::Switchover, "switchover"),
                (Fault::SwitchoverDirect, "switchover-direct"),
                (Fault::PgCrash, "crash"),
            ],
            "defaults-sync" => vec![
                (elsewhere, "host-sync"),
                (on_it, "host-etcd-sync"),
                (Fault::Switchover, "switchover-sync"),
            ],
            _ => vec![(elsewhere, "host-fast")],
        };
        let faults: Vec<(Fault, &str)> = all.into_iter().filter(|(_, key)| wanted(key)).collect();
        let idle = profile.name == "defaults" && wanted("idle");
        let list = profile.name == "defaults" && wanted("list");
        if faults.is_empty() && !idle && !list {
            continue;
        }
        let mut up = Vec::new();
        for name in &system_names {
            let (agent, ctl) = match *name {
                "pgvigil" => (AgentKind::Pgvigil(pgvigil.clone()), pgvigilctl.clone()),
                "baseline" => {
                    let old = baseline.clone().unwrap_or_else(|| pgvigil.clone());
                    (AgentKind::Pgvigil(old), pgvigilctl.clone())
                }
                _ => (AgentKind::Patroni(patroni.clone()), patronictl.clone()),
            };
            up.push(start_system(name, agent, ctl, profile, &pgvigil)?);
        }
        for s in &up {
            s.cluster
                .wait_healthy(HEALTHY)
                .with_context(|| format!("{} cluster ({})", s.name, profile.name))?;
        }
        eprintln!(
            "[{:>5.0}s] {} profile: clusters up",
            started.elapsed().as_secs_f64(),
            profile.name
        );
        if idle {
            for run in 0..runs {
                measure_idle(&up, idle_seconds, &mut results)?;
                eprintln!(
                    "[{:>5.0}s] idle minute {}/{runs}",
                    started.elapsed().as_secs_f64(),
                    run + 1
                );
            }
        }
        if list {
            for _ in 0..runs {
                for s in &up {
                    measure_list(s, &mut results)?;
                }
            }
        }
        for (fault, _) in &faults {
            let label = match (fault, profile.name) {
                (
                    Fault::HostDeath {
                        etcd_leader_on_it: false,
                    },
                    "defaults",
                ) => "Write gap, leader host dies, etcd leader elsewhere (defaults: no timings in the file)",
                (
                    Fault::HostDeath {
                        etcd_leader_on_it: true,
                    },
                    "defaults",
                ) => "Write gap, leader host dies with the etcd leader (defaults)",
                (
                    Fault::HostDeath {
                        etcd_leader_on_it: false,
                    },
                    "defaults-sync",
                ) => "Write gap, leader host dies, etcd leader elsewhere (defaults, synchronous_mode on)",
                (
                    Fault::HostDeath {
                        etcd_leader_on_it: true,
                    },
                    "defaults-sync",
                ) => "Write gap, leader host dies with the etcd leader (defaults, synchronous_mode on)",
                (Fault::HostDeath { .. }, _) => {
                    "Write gap, leader host dies (fast: ttl 20, loop_wait 2, retry_timeout 5)"
                }
                (Fault::Switchover, "defaults-sync") => {
                    "Write gap, planned switchover (defaults, synchronous_mode on)"
                }
                (Fault::Switchover, _) => "Write gap, planned switchover (defaults)",
                (Fault::SwitchoverDirect, _) => {
                    "Write gap, planned switchover, client on the nodes' own ports (defaults)"
                }
                (Fault::PgCrash, _) => "Write gap, PostgreSQL crash on the leader (defaults)",
            };
            let lost_label = if profile.synchronous {
                "Acknowledged writes lost, synchronous_mode on"
            } else {
                "Acknowledged writes lost (asynchronous fault runs)"
            };
            for run in 0..runs {
                let order: Vec<usize> = if run % 2 == 0 {
                    (0..up.len()).collect()
                } else {
                    (0..up.len()).rev().collect()
                };
                for i in order {
                    let s = &mut up[i];
                    let (gap, lost) =
                        run_fault(s, *fault, profile).with_context(|| format!("{} {label}", s.name))?;
                    eprintln!(
                        "[{:>5.0}s] {} {label} run {}: gap {gap:.2}s, lost {lost}",
                        started.elapsed().as_secs_f64(),
                        s.name,
                        run + 1
                    );
                    results.add(label, "s", s.name, gap);
                    results.add(lost_label, "rows", s.name, lost as f64);
                }
            }
        }
        drop(up);
    }
    println!("\n{}", results.table(&system_names));
    println!("raw values:\n{}", results.raw());
    println!(
        "({runs} runs each, {:.0} minutes in total; {patroni_version}; router: pgvigil router for both; \
         load average at the start {load_at_start}, at the end {})",
        started.elapsed().as_secs_f64() / 60.0,
        load_averages()
    );
    Ok(())
}
