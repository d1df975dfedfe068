//! A three-host cluster in a [`NetLab`]: per host an etcd member, PostgreSQL and the HA agent
//! (pgvigil, or Patroni for the benchmark: same configuration file), each bound to the host's
//! own address; optionally `pgvigil router` in the root namespace. Everything is torn down by PID
//! on drop, then the lab removes the namespaces.
//!
//! Ports are the standard ones on every host (PostgreSQL 5432, REST 8008, etcd 2379/2380): each
//! host has its own address, so nothing clashes. The router listens on free loopback ports of
//! the root namespace.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User, chown};
use serde_json::Value;

use crate::checker::{self, CheckerConfig};
use crate::cluster::{ClusterPki, SUPERUSER, SUPERUSER_PASSWORD};
use crate::netns::{Impairment, NetLab, kill_namespace_processes};
use crate::watchdog::{WatchdogHardware, WatchdogState};
use crate::{cluster_doc, free_port, http, spawn_owned, test_tmp_root, wait_until};

mod config;
mod etcd_control;
mod verify;

pub use verify::Expect;

pub const PG_PORT: u16 = 5432;
pub const API_PORT: u16 = 8008;
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
/// etcd's plain-HTTP `/health` (and `/metrics`), for health checks when clients need TLS.
pub const ETCD_METRICS_PORT: u16 = 2381;

/// Which HA agent runs on the hosts.
#[derive(Clone, Debug)]
pub enum AgentKind {
    /// `pgvigil CONFIG`.
    Pgvigil(PathBuf),
    /// `patroni CONFIG` (the program must be readable and executable by the postgres user).
    Patroni(PathBuf),
}

impl AgentKind {
    fn program(&self) -> &Path {
        match self {
            AgentKind::Pgvigil(p) | AgentKind::Patroni(p) => p,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            AgentKind::Pgvigil(_) => "pgvigil",
            AgentKind::Patroni(_) => "patroni",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NetOptions {
    pub hosts: usize,
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
    /// Extra YAML lines under `bootstrap.dcs`, indented by 4 spaces (e.g.
    /// `"    synchronous_mode: on\n"`).
    pub extra_dcs: String,
    /// Extra top-level YAML for every host (e.g. a `watchdog:` section).
    pub extra_yaml: String,
    /// Extra top-level YAML per host, by index.
    pub extra_node_yaml: Vec<String>,
    /// Start `pgvigil router` (this `pgvigil` binary) in the root namespace.
    pub router: Option<PathBuf>,
    /// `PGVIGIL_LOG` for pgvigil agents.
    pub log_level: String,
    /// Give every host a watchdog in `required` mode: Patroni's `testing` driver on a FIFO,
    /// played by a [`WatchdogHardware`] that kills every process of the host when it fires.
    pub watchdog: bool,
    /// `postgresql.pg_ctl_timeout` (seconds; default: not set, i.e. 60).
    pub pg_ctl_timeout: Option<u64>,
    /// Leave `ttl`, `loop_wait` and `retry_timeout` out of the file, as most Patroni files
    /// do (the fields above then hold Patroni's defaults, 30/10/10, for the tests to read).
    pub default_timings: bool,
    /// Another agent on some hosts (a mixed cluster), by host index.
    pub agent_overrides: Vec<(usize, AgentKind)>,
    /// `postgresql.bin_dir` for every host instead of the installed PostgreSQL's (a directory
    /// of wrappers that inject a fault, such as a slow start).
    pub pg_bin_dir: Option<PathBuf>,
    /// TLS everywhere, as [`crate::cluster::ClusterOptions::tls`]: etcd with client
    /// certificates, REST over HTTPS with `verify_client: required`, PostgreSQL `hostssl ...
    /// clientcert=verify-ca` only; the checker and psql present the superuser's certificate.
    pub tls: bool,
}

impl NetOptions {
    /// No timing settings in the file: Patroni's (and pgvigil's) defaults.
    pub fn with_default_timings(mut self) -> NetOptions {
        self.default_timings = true;
        (self.ttl, self.loop_wait, self.retry_timeout) = (30, 10, 10);
        self
    }
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            hosts: 3,
            ttl: 20,
            loop_wait: 2,
            retry_timeout: 5,
            extra_dcs: String::new(),
            extra_yaml: String::new(),
            extra_node_yaml: Vec::new(),
            router: None,
            log_level: "info".into(),
            watchdog: false,
            pg_ctl_timeout: None,
            default_timings: false,
            agent_overrides: Vec::new(),
            pg_bin_dir: None,
            tls: false,
        }
    }
}

pub struct NetNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub etcd_log: PathBuf,
    etcd_dir: PathBuf,
    agent: Option<Child>,
    etcd: Option<Child>,
}

impl NetNode {
    pub fn pg_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, PG_PORT))
    }

    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, API_PORT))
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.as_ref().map(Child::id)
    }

    /// The postmaster's PID from `postmaster.pid`, if that process is alive.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        kill(Pid::from_raw(pid), None).ok().map(|()| pid)
    }
}

pub struct NetCluster {
    pub nodes: Vec<NetNode>,
    pub scope: String,
    pub options: NetOptions,
    pub agent: AgentKind,
    router: Option<Child>,
    /// The router's primary (read-write) and replicas ports on 127.0.0.1.
    pub router_ports: Option<(u16, u16)>,
    pub router_log: PathBuf,
    owner: (Uid, Gid),
    watchdogs: Vec<WatchdogHardware>,
    root: tempfile::TempDir,
    /// Dropped last: the namespaces go once every process is gone.
    pub lab: NetLab,
    /// With [`NetOptions::tls`].
    pub pki: Option<ClusterPki>,
}

/// The newest PostgreSQL `bin` directory under `/usr/lib/postgresql`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .context("reading /usr/lib/postgresql")?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop()
        .map(|(_, p)| p)
        .context("no PostgreSQL under /usr/lib/postgresql")
}

impl NetCluster {
    /// Creates the lab, writes the configurations, starts etcd on every host (waiting until it
    /// is healthy), every agent and the router. Does not wait for PostgreSQL: see
    /// [`NetCluster::wait_healthy`].
    pub fn start(agent: AgentKind, options: NetOptions) -> anyhow::Result<NetCluster> {
        let user = User::from_name("postgres")?.context("there is no postgres user")?;
        let lab = NetLab::create(options.hosts)?;
        let root = tempfile::Builder::new()
            .prefix("pgvigil-netcluster-")
            .tempdir_in(test_tmp_root())?;
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
        let nodes = (0..options.hosts)
            .map(|i| {
                let name = format!("node{}", i + 1);
                let dir = root.path().join(&name);
                NetNode {
                    ip: lab.host_ip(i),
                    data_dir: dir.join("data"),
                    config: dir.join("node.yml"),
                    log: dir.join("agent.log"),
                    etcd_log: root.path().join(format!("etcd{}.log", i + 1)),
                    etcd_dir: root.path().join(format!("etcd{}", i + 1)),
                    dir,
                    name,
                    agent: None,
                    etcd: None,
                }
            })
            .collect::<Vec<NetNode>>();
        let pki = match options.tls {
            true => {
                let ips: Vec<String> = nodes.iter().map(|n| n.ip.to_string()).collect();
                let pki = ClusterPki::create(root.path(), &ips, Some((user.uid, user.gid)))?;
                http::use_tls(Some(pki.client_config()?));
                Some(pki)
            }
            false => None,
        };
        let mut cluster = NetCluster {
            pki,
            nodes,
            scope: format!("lab{}", lab.slot()),
            options,
            agent,
            router: None,
            router_ports: None,
            router_log: root.path().join("router.log"),
            owner: (user.uid, user.gid),
            watchdogs: Vec::new(),
            root,
            lab,
        };
        let bin_dir = match &cluster.options.pg_bin_dir {
            Some(dir) => dir.clone(),
            None => pg_bin_dir()?,
        };
        for i in 0..cluster.nodes.len() {
            let node = &cluster.nodes[i];
            fs::create_dir_all(&node.dir)?;
            fs::write(&node.config, cluster.config_yaml(i, &bin_dir))?;
            chown(&node.dir, Some(user.uid), Some(user.gid))?;
            chown(&node.config, Some(user.uid), Some(user.gid))?;
            if cluster.options.watchdog {
                let fifo = node.dir.join("watchdog.fifo");
                nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
                chown(&fifo, Some(user.uid), Some(user.gid))?;
                let ns = cluster.lab.hosts()[i].ns.clone();
                let hw = WatchdogHardware::start(&fifo, move || {
                    eprintln!("watchdog of {ns} fired: resetting the host");
                    kill_namespace_processes(&ns);
                })?;
                cluster.watchdogs.push(hw);
            }
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn_etcd(i)?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_etcd_healthy(i)?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.start_agent(i)?;
        }
        if let Some(bin) = cluster.options.router.clone() {
            cluster.start_router(&bin)?;
        }
        Ok(cluster)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `host:2379` of every etcd member, comma-separated.
    pub fn etcd_hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}:{ETCD_CLIENT_PORT}", n.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The agent host `i` runs.
    pub fn agent_of(&self, i: usize) -> &AgentKind {
        self.options
            .agent_overrides
            .iter()
            .find(|(h, _)| *h == i)
            .map_or(&self.agent, |(_, a)| a)
    }

    /// Starts (or restarts) host `i`'s agent as the postgres user, appending to its log.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let (uid, gid) = self.owner;
        let node = &self.nodes[i];
        let log = fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        chown(&node.log, Some(uid), Some(gid))?;
        let agent = self.agent_of(i).clone();
        let mut cmd = self.lab.command_as(i, agent.program(), uid, gid);
        cmd.arg(&node.config)
            .current_dir(&node.dir)
            .env("HOME", &node.dir)
            .env("PGVIGIL_LOG", &self.options.log_level)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_owned(cmd).with_context(|| format!("starting {}", agent.program().display()))?;
        self.nodes[i].agent = Some(child);
        Ok(())
    }

    /// Sends `signal` to host `i`'s agent; with SIGKILL or SIGTERM also waits (bounded) for it
    /// to exit and forgets it.
    pub fn signal_agent(&mut self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let name = self.nodes[i].name.clone();
        let Some(child) = self.nodes[i].agent.as_mut() else {
            bail!("{name} has no agent running")
        };
        kill(Pid::from_raw(child.id() as i32), signal)?;
        if matches!(signal, Signal::SIGKILL | Signal::SIGTERM) {
            wait_until(
                &format!("{name}'s agent to exit"),
                Duration::from_secs(90),
                || child.try_wait().ok().flatten(),
            )?;
            self.nodes[i].agent = None;
        }
        Ok(())
    }

    /// SIGKILLs host `i`'s postmaster and waits until it is gone.
    pub fn kill_postgres(&self, i: usize) -> anyhow::Result<()> {
        let pid = self.nodes[i].postmaster_pid().context("no postmaster running")?;
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        wait_until("the postmaster to die", Duration::from_secs(30), || {
            kill(Pid::from_raw(pid), None).is_err().then_some(())
        })
    }

    /// The whole host dies: its link goes down first (nobody gets a reset), then every process
    /// on it (agent, PostgreSQL, etcd member, helpers) gets SIGKILL.
    pub fn kill_host(&mut self, i: usize) -> anyhow::Result<()> {
        self.lab.link_down(i)?;
        for child in [self.nodes[i].agent.take(), self.nodes[i].etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.lab.kill_all(i)
    }

    /// What host `i`'s emulated watchdog saw (with [`NetOptions::watchdog`]).
    pub fn watchdog(&self, i: usize) -> Option<WatchdogState> {
        self.watchdogs.get(i).map(WatchdogHardware::state)
    }

    /// Brings a host killed by [`NetCluster::kill_host`] (or reset by its watchdog) back: link
    /// up, etcd, agent.
    pub fn restart_host(&mut self, i: usize) -> anyhow::Result<()> {
        for child in [self.nodes[i].agent.take(), self.nodes[i].etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.lab.kill_all(i)?;
        self.lab.link_up(i)?;
        self.spawn_etcd_member(i)?;
        self.start_agent(i)
    }

    pub fn isolate(&self, i: usize) -> anyhow::Result<()> {
        self.lab.isolate(i)
    }

    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        self.lab.heal(i)
    }

    pub fn impair(&self, i: usize, imp: Impairment) -> anyhow::Result<()> {
        self.lab.impair(i, imp)
    }

    fn start_router(&mut self, bin: &Path) -> anyhow::Result<()> {
        let (primary, replicas, stats) = (free_port(), free_port(), free_port());
        // The router reads an agent's file (scope, namespace, etcd3) plus its `router:` section.
        let config = self.root.path().join("router.yml");
        let base = fs::read_to_string(&self.nodes[0].config)?;
        fs::write(
            &config,
            format!(
                "{base}\nrouter:\n  primary_listen: 127.0.0.1:{primary}\n  replicas_listen: 127.0.0.1:{replicas}\n  \
                 stats_listen: 127.0.0.1:{stats}\n  connect_timeout: 2\n"
            ),
        )?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.router_log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("router")
            .arg(&config)
            .env("PGVIGIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.router = Some(spawn_owned(cmd).context("starting pgvigil router")?);
        self.router_ports = Some((primary, replicas));
        wait_until("the router to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", primary))
                .ok()
                .map(|_| ())
        })
        .with_context(|| tail(&self.router_log, 30))
    }

    /// The address clients write to: the router's primary port.
    pub fn write_addr(&self) -> Option<SocketAddr> {
        self.router_ports
            .map(|(p, _)| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
    }

    /// `GET /cluster` from the first host whose API answers.
    pub fn cluster_doc(&self) -> Option<Value> {
        self.nodes.iter().filter(|n| n.agent.is_some()).find_map(|n| {
            let r = http::get_from(n.api_addr(), "/cluster").ok()?;
            (r.status == 200).then(|| r.json().ok())?
        })
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Index of the member `/cluster` calls leader, when it is `running`.
    pub fn leader(&self) -> Option<usize> {
        let doc = self.cluster_doc()?;
        self.node_index(cluster_doc::running_leader(&doc)?)
    }

    /// Waits until there is a running leader and every other node with an agent streams from
    /// it; returns the leader's index.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<usize> {
        let want = self.nodes.iter().filter(|n| n.agent.is_some()).count();
        let result = wait_until("a leader and streaming replicas", timeout, || {
            let doc = self.cluster_doc()?;
            self.node_index(cluster_doc::healthy_leader(&doc, want)?)
        });
        result.map_err(|e| anyhow::anyhow!("{e}\n{}", self.diagnostics()))
    }

    /// Runs SQL with psql on host `i` (from the root namespace, TCP, superuser); returns the
    /// trimmed unaligned output.
    pub fn psql(&self, i: usize, sql: &str) -> anyhow::Result<String> {
        let addr = self.nodes[i].pg_addr();
        match &self.pki {
            Some(pki) => psql_with_at(addr, sql, &pki.libpq_env()),
            None => psql_addr(addr, sql),
        }
    }

    /// Waits for a leader other than `old` whose PostgreSQL accepts writes; returns it.
    pub fn wait_new_leader(&self, old: Option<usize>, timeout: Duration) -> anyhow::Result<usize> {
        wait_until("a new writable leader", timeout, || {
            let l = self.leader().filter(|&l| Some(l) != old)?;
            (self.psql(l, "SELECT pg_is_in_recovery()").ok()? == "f").then_some(l)
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.diagnostics()))
    }

    /// A checker writing through the router and sampling every host.
    pub fn checker_config(&self) -> anyhow::Result<CheckerConfig> {
        let write_to = self.write_addr().context("the cluster has no router")?;
        let nodes = self.nodes.iter().map(|n| (n.name.clone(), n.pg_addr())).collect();
        let mut config = CheckerConfig::new(vec![write_to], nodes, SUPERUSER, SUPERUSER_PASSWORD);
        config.tls = self.checker_tls()?;
        Ok(config)
    }

    /// A checker configuration whose writer bypasses the router: it connects to every node's
    /// own PostgreSQL port and writes to the one that accepts writes (libpq's
    /// `target_session_attrs=read-write`).
    pub fn checker_config_direct(&self) -> CheckerConfig {
        let nodes: Vec<(String, SocketAddr)> =
            self.nodes.iter().map(|n| (n.name.clone(), n.pg_addr())).collect();
        let direct = nodes.iter().map(|(_, a)| *a).collect();
        let mut config = CheckerConfig::new(direct, nodes, SUPERUSER, SUPERUSER_PASSWORD);
        config.tls = self
            .checker_tls()
            .expect("the test CA's files were readable when the lab started");
        config
    }

    fn checker_tls(&self) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        match &self.pki {
            Some(pki) => Ok(Some(std::sync::Arc::new(pki.superuser_client_config()?))),
            None => Ok(None),
        }
    }

    /// Creates the checker's tables on the leader and starts the checker; returns once writes
    /// flow.
    pub fn start_checker(&self, leader: usize) -> anyhow::Result<checker::Checker> {
        self.start_checker_with(leader, self.checker_config()?)
    }

    /// [`NetCluster::start_checker`] with a given configuration (e.g.
    /// [`NetCluster::checker_config_direct`]).
    pub fn start_checker_with(
        &self,
        leader: usize,
        config: CheckerConfig,
    ) -> anyhow::Result<checker::Checker> {
        self.psql(leader, &checker::setup_sql())?;
        let c = checker::Checker::start(config);
        c.wait_for_acks(20, Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("{e}\nrouter log:\n{}", tail(&self.router_log, 30)))?;
        Ok(c)
    }

    /// Log tails of every agent and the cluster document, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("cluster: {:?}\n", self.cluster_doc());
        for n in &self.nodes {
            out.push_str(&format!(
                "--- {} ({}) agent log tail ---\n{}\n",
                n.name,
                n.ip,
                tail(&n.log, 40)
            ));
        }
        if self.router.is_some() {
            out.push_str(&format!(
                "--- router log tail ---\n{}\n",
                tail(&self.router_log, 15)
            ));
        }
        out
    }

    fn stop_everything(&mut self) {
        if let Some(mut r) = self.router.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.agent.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &self.nodes {
            if let Some(pid) = node.postmaster_pid() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.etcd.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Backends, pg_basebackup, anything else a host started: by PID, per namespace.
        for i in 0..self.nodes.len() {
            let _ = self.lab.kill_all(i);
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.stop_everything();
        if std::env::var_os("PGVIGIL_KEEP_TEST_DIRS").is_some() {
            let root = std::mem::replace(&mut self.root, tempfile::TempDir::new().expect("a temp dir"));
            eprintln!("PGVIGIL_KEEP_TEST_DIRS: kept {}", root.keep().display());
        }
    }
}

/// Runs SQL on `addr` as the superuser with psql.
pub fn psql_addr(addr: SocketAddr, sql: &str) -> anyhow::Result<String> {
    psql_with_at(addr, sql, &[])
}

/// [`psql_addr`] with extra libpq environment variables (the TLS client certificate).
pub fn psql_with_at(addr: SocketAddr, sql: &str, env: &[(&str, PathBuf)]) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(format!(
            "host={} port={} user={SUPERUSER} dbname=postgres connect_timeout=3",
            addr.ip(),
            addr.port()
        ))
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "3")
        .env("PGOPTIONS", "-c statement_timeout=10000")
        .stdin(Stdio::null())
        .output()
        .context("running psql")?;
    if !out.status.success() {
        bail!("psql on {addr}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
