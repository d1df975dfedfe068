//! A real pgvigil cluster on loopback: an etcd cluster, and per node a PostgreSQL data
//! directory and a `pgvigil` agent running as the `postgres` user, all torn down by PID on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};
use serde_json::Value;

use crate::etcd::EtcdTlsFiles;
use crate::{EtcdCluster, free_port, spawn_owned, test_tmp_root, wait_until};
use crate::{cluster_doc, http};
use pgvigil_tls::test_pki::{Issued, TestPki};
use pgvigil_tls::{ClientSettings, ConfFile, Identity, ServerCheck};

pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "vigil-su-secret";
pub const REPLICATION_USER: &str = "replicator";
pub const REPLICATION_PASSWORD: &str = "vigil-rep-secret";

/// How the cluster is configured. The defaults are Patroni's minimum TTL with a short loop, so
/// failovers in tests take about `ttl` seconds.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
    /// Extra YAML lines appended under `bootstrap.dcs` (indented by the caller to 4 spaces).
    pub extra_dcs: String,
    /// Extra YAML per node appended at the top level (e.g. `tags:` blocks), by node index.
    pub extra_node_yaml: Vec<String>,
    /// Extra YAML per node appended inside `bootstrap:` (indented by the caller to 2 spaces),
    /// by node index.
    pub extra_bootstrap_yaml: Vec<String>,
    /// Extra YAML per node appended inside `postgresql:` (indented by the caller to 2
    /// spaces), by node index.
    pub extra_postgresql_yaml: Vec<String>,
    /// Nodes whose agents [`TestCluster::start`] does not start (the test starts them with
    /// [`TestCluster::start_agent`]).
    pub deferred: Vec<usize>,
    /// `restapi.authentication` (username, password) on every node. `pgvigilctl -c` and
    /// `patronictl -c` given a node's configuration use it too.
    pub restapi_auth: Option<(String, String)>,
    /// TLS everywhere, with a CA generated for the test: etcd over HTTPS with client
    /// certificates, the REST APIs over HTTPS with `verify_client: required`, PostgreSQL with
    /// `hostssl ... clientcert=verify-ca` only and the agents connecting with `verify-full`
    /// (superuser) and `verify-ca` (replication).
    pub tls: bool,
    /// etcd authentication: `root` with this password is created and auth enabled before the
    /// agents start; every node's `etcd3` section gets `username`/`password`.
    pub etcd_password: Option<String>,
    /// `postgresql.use_unix_socket` on every node.
    pub use_unix_socket: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            ttl: 20,
            loop_wait: 2,
            retry_timeout: 5,
            extra_dcs: String::new(),
            extra_node_yaml: Vec::new(),
            extra_bootstrap_yaml: Vec::new(),
            extra_postgresql_yaml: Vec::new(),
            deferred: Vec::new(),
            restapi_auth: None,
            tls: false,
            etcd_password: None,
            use_unix_socket: false,
        }
    }
}

pub struct Node {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    agent: Option<Child>,
}

impl Node {
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The postmaster's PID from `postmaster.pid`, if that process is alive.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        kill(Pid::from_raw(pid), None).ok().map(|()| pid)
    }
}

/// The certificates of a TLS test cluster ([`ClusterOptions::tls`]), below `<root>/pki`.
pub struct ClusterPki {
    pub ca: PathBuf,
    pub etcd: Issued,
    /// Per node (by index): PostgreSQL server, REST server, and etcd/REST client certificate.
    pub nodes: Vec<Issued>,
    /// Client certificates of the `postgres` and `replicator` roles.
    pub superuser: Issued,
    pub replication: Issued,
}

impl ClusterPki {
    /// Certificates below `<root>/pki`: node `i` (named `node<i+1>`) valid for `node_ips[i]`,
    /// 127.0.0.1 and localhost; etcd's for every node address.
    pub fn create(
        root: &Path,
        node_ips: &[String],
        owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
    ) -> anyhow::Result<Self> {
        let dir = root.join("pki");
        let pki = TestPki::new(&dir, "pgvigil test CA")?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let local = ["127.0.0.1", "localhost"];
        let mut etcd_names: Vec<&str> = local.to_vec();
        etcd_names.extend(node_ips.iter().map(String::as_str));
        let etcd = pki.issue("etcd", "etcd", &etcd_names)?;
        let nodes = node_ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let name = format!("node{}", i + 1);
                pki.issue(&name, &name, &[ip.as_str(), "127.0.0.1", "localhost"])
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let superuser = pki.issue("superuser", SUPERUSER, &[])?;
        let replication = pki.issue("replication", REPLICATION_USER, &[])?;
        // PostgreSQL and libpq want their keys owned by the user they run as.
        if let Some((uid, gid)) = owner {
            for issued in nodes.iter().chain([&superuser, &replication]) {
                chown(&issued.key, Some(uid), Some(gid))?;
                chown(&issued.cert, Some(uid), Some(gid))?;
            }
        }
        Ok(ClusterPki {
            ca: pki.ca_cert(),
            etcd,
            nodes,
            superuser,
            replication,
        })
    }

    /// A client that trusts the CA and presents node 1's certificate.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        Ok(pgvigil_tls::client_config(&ClientSettings {
            ca: Some(ConfFile::new("ca", &self.ca)),
            crls: Vec::new(),
            identity: Some(Identity {
                cert: ConfFile::new("cert", &self.nodes[0].cert),
                key: Some(ConfFile::new("key", &self.nodes[0].key)),
                password: None,
            }),
            check: Some(ServerCheck::ChainAndName),
        })?)
    }

    /// The TLS parts of node `i`'s configuration, in the sections a Patroni user writes them.
    pub(crate) fn yaml(&self, i: usize) -> TlsYaml {
        let (ca, cert, key) = (
            self.ca.display(),
            self.nodes[i].cert.display(),
            self.nodes[i].key.display(),
        );
        let role = |issued: &Issued, mode: &str| {
            format!(
                "      sslmode: {mode}\n      sslrootcert: {ca}\n      sslcert: {}\n      sslkey: {}\n",
                issued.cert.display(),
                issued.key.display()
            )
        };
        TlsYaml {
            rest: format!(
                "  certfile: {cert}\n  keyfile: {key}\n  cafile: {ca}\n  verify_client: required\n\
                 ctl:\n  certfile: {cert}\n  keyfile: {key}\n  cacert: {ca}\n"
            ),
            etcd: format!("  protocol: https\n  cacert: {ca}\n  cert: {cert}\n  key: {key}\n"),
            superuser: role(&self.superuser, "verify-full"),
            replication: role(&self.replication, "verify-ca"),
            parameters: format!(
                "    ssl: 'on'\n    ssl_cert_file: {cert}\n    ssl_key_file: {key}\n    ssl_ca_file: {ca}\n"
            ),
            hba_options: " clientcert=verify-ca",
        }
    }

    /// A client for PostgreSQL as the superuser: trusts the CA, presents the superuser's
    /// certificate.
    pub fn superuser_client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        Ok(pgvigil_tls::client_config(&ClientSettings {
            ca: Some(ConfFile::new("ca", &self.ca)),
            crls: Vec::new(),
            identity: Some(Identity {
                cert: ConfFile::new("cert", &self.superuser.cert),
                key: Some(ConfFile::new("key", &self.superuser.key)),
                password: None,
            }),
            check: Some(ServerCheck::Chain),
        })?)
    }

    /// The etcd files for [`EtcdCluster::start_with_tls`] and the lab.
    pub fn etcd_files(&self) -> EtcdTlsFiles {
        EtcdTlsFiles {
            ca: self.ca.clone(),
            cert: self.etcd.cert.clone(),
            key: self.etcd.key.clone(),
        }
    }

    /// libpq environment for connecting as the superuser with its certificate.
    pub fn libpq_env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("PGSSLMODE", "verify-ca".into()),
            ("PGSSLROOTCERT", self.ca.clone()),
            ("PGSSLCERT", self.superuser.cert.clone()),
            ("PGSSLKEY", self.superuser.key.clone()),
        ]
    }
}

pub struct TestCluster {
    pub etcd: EtcdCluster,
    /// With [`ClusterOptions::tls`].
    pub pki: Option<ClusterPki>,
    pub scope: String,
    pub nodes: Vec<Node>,
    pub options: ClusterOptions,
    agent_bin: PathBuf,
    root: tempfile::TempDir,
    owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
}

/// The `postgres` user's ids when running as root (PostgreSQL refuses root), else none.
fn postgres_owner() -> anyhow::Result<Option<(nix::unistd::Uid, nix::unistd::Gid)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")?.context("running as root but there is no postgres user")?;
    Ok(Some((user.uid, user.gid)))
}

/// A binary built next to the running test executable (`target/<profile>/<name>`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps directory has no parent")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not built: run `cargo build --workspace` first",
            path.display()
        );
    }
    Ok(path)
}

impl TestCluster {
    /// Writes the configs, starts etcd and every agent. Does not wait for health: see
    /// [`TestCluster::wait_healthy`].
    pub fn start(agent_bin: &Path, options: ClusterOptions) -> anyhow::Result<TestCluster> {
        let owner = postgres_owner()?;
        let root = tempfile::Builder::new()
            .prefix("pgvigil-cluster-")
            .tempdir_in(test_tmp_root())?;
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
        let pki = match options.tls {
            true => Some(ClusterPki::create(
                root.path(),
                &vec!["127.0.0.1".to_string(); options.nodes],
                owner,
            )?),
            false => None,
        };
        let etcd = EtcdCluster::start_with_tls(3, pki.as_ref().map(ClusterPki::etcd_files))?;
        if let Some(p) = &pki {
            http::use_tls(Some(p.client_config()?));
        }
        if let Some(password) = &options.etcd_password {
            etcd.enable_auth(password)?;
        }
        let scope = format!("test{}", std::process::id());
        let mut nodes = Vec::new();
        for i in 0..options.nodes {
            let name = format!("node{}", i + 1);
            let dir = root.path().join(&name);
            fs::create_dir_all(&dir)?;
            let node = Node {
                pg_port: free_port(),
                api_port: free_port(),
                data_dir: dir.join("data"),
                config: dir.join("pgvigil.yml"),
                log: dir.join("pgvigil.log"),
                dir,
                name,
                agent: None,
            };
            nodes.push(node);
        }
        let mut cluster = TestCluster {
            etcd,
            pki,
            scope,
            nodes,
            options,
            agent_bin: agent_bin.to_path_buf(),
            root,
            owner,
        };
        for i in 0..cluster.nodes.len() {
            let yaml = cluster.config_yaml(i);
            fs::write(&cluster.nodes[i].config, yaml)?;
            if let Some((uid, gid)) = owner {
                chown(&cluster.nodes[i].dir, Some(uid), Some(gid))?;
                chown(&cluster.nodes[i].config, Some(uid), Some(gid))?;
            }
        }
        for i in 0..cluster.nodes.len() {
            if !cluster.options.deferred.contains(&i) {
                cluster.start_agent(i)?;
            }
        }
        Ok(cluster)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    fn config_yaml(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let o = &self.options;
        let hosts = self.etcd.endpoints().join(",");
        let extra = o.extra_node_yaml.get(i).cloned().unwrap_or_default();
        let extra_bootstrap = o.extra_bootstrap_yaml.get(i).cloned().unwrap_or_default();
        let extra_pg = o.extra_postgresql_yaml.get(i).cloned().unwrap_or_default();
        let tls = self.tls_yaml(i);
        let auth = match &o.restapi_auth {
            Some((user, password)) => {
                format!("  authentication:\n    username: '{user}'\n    password: '{password}'\n")
            }
            None => String::new(),
        };
        format!(
            r#"scope: {scope}
namespace: /service
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
{auth}{rest_tls}etcd3:
  hosts: {hosts}
{etcd_tls}bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 50
        wal_keep_size: 128MB
{extra_dcs}
  initdb:
  - encoding: UTF8
  - data-checksums
{extra_bootstrap}
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  pgpass: {dir}/pgpass
{unix}  authentication:
    superuser:
      username: {su}
      password: {su_pw}
{su_tls}    replication:
      username: {rep}
      password: {rep_pw}
{rep_tls}  parameters:
    unix_socket_directories: '{dir}'
    shared_buffers: 16MB
    fsync: 'off'
{pg_tls}  pg_hba:
  - local all all trust
  - {host} all all 127.0.0.1/32 scram-sha-256{clientcert}
  - {host} replication {rep} 127.0.0.1/32 scram-sha-256{clientcert}
{extra_pg}
{extra}
"#,
            rest_tls = tls.rest,
            etcd_tls = tls.etcd.clone()
                + &o.etcd_password
                    .as_ref()
                    .map(|p| format!("  username: root\n  password: '{p}'\n"))
                    .unwrap_or_default(),
            unix = if o.use_unix_socket {
                "  use_unix_socket: true\n"
            } else {
                ""
            },
            su_tls = tls.superuser,
            rep_tls = tls.replication,
            pg_tls = tls.parameters,
            host = tls.hba_type(),
            clientcert = tls.hba_options,
            scope = self.scope,
            name = node.name,
            api = node.api_port,
            pg = node.pg_port,
            ttl = o.ttl,
            loop_wait = o.loop_wait,
            retry = o.retry_timeout,
            extra_dcs = o.extra_dcs,
            data = node.data_dir.display(),
            dir = node.dir.display(),
            su = SUPERUSER,
            su_pw = SUPERUSER_PASSWORD,
            rep = REPLICATION_USER,
            rep_pw = REPLICATION_PASSWORD,
        )
    }

    /// The TLS parts of node `i`'s configuration, written as a Patroni user would.
    fn tls_yaml(&self, i: usize) -> TlsYaml {
        self.pki.as_ref().map(|p| p.yaml(i)).unwrap_or_default()
    }

    /// Starts (or restarts) node `i`'s agent, appending to its log.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let log = fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        if let Some((uid, gid)) = self.owner {
            chown(&node.log, Some(uid), Some(gid))?;
        }
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg(&node.config)
            .current_dir(&node.dir)
            .env("HOME", &node.dir)
            .env("PGVIGIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        let child = spawn_owned(cmd).with_context(|| format!("starting {}", self.agent_bin.display()))?;
        self.nodes[i].agent = Some(child);
        Ok(())
    }

    /// Sends `signal` to node `i`'s agent; with SIGKILL or SIGTERM also waits for it to exit
    /// (bounded) and forgets it.
    pub fn signal_agent(&mut self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let Some(child) = self.nodes[i].agent.as_mut() else {
            bail!("{} has no agent running", self.nodes[i].name)
        };
        kill(Pid::from_raw(child.id() as i32), signal)?;
        if matches!(signal, Signal::SIGKILL | Signal::SIGTERM) {
            let name = self.nodes[i].name.clone();
            let child = self.nodes[i].agent.as_mut().expect("checked above");
            wait_until(
                &format!("{name}'s agent to exit"),
                Duration::from_secs(90),
                || child.try_wait().ok().flatten(),
            )?;
            self.nodes[i].agent = None;
        }
        Ok(())
    }

    /// SIGKILLs node `i`'s postmaster (its backends exit on their own when it is gone).
    pub fn kill_postgres(&self, i: usize) -> anyhow::Result<()> {
        let pid = self.nodes[i].postmaster_pid().context("no postmaster running")?;
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        wait_until("the postmaster to die", Duration::from_secs(30), || {
            kill(Pid::from_raw(pid), None).is_err().then_some(())
        })
    }

    /// `GET /cluster` from the first node whose API answers.
    pub fn cluster_doc(&self) -> Option<Value> {
        self.nodes.iter().filter(|n| n.agent.is_some()).find_map(|n| {
            http::get(n.api_port, "/cluster")
                .ok()
                .filter(|r| r.status == 200)?
                .json()
                .ok()
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

    /// Runs SQL with psql on node `i` (TCP, superuser, with its client certificate in a TLS
    /// cluster); returns trimmed unaligned output.
    pub fn psql(&self, i: usize, sql: &str) -> anyhow::Result<String> {
        let env = self.pki.as_ref().map(ClusterPki::libpq_env).unwrap_or_default();
        psql_with(self.nodes[i].pg_port, sql, &env)
    }

    /// Log tails of every agent and the cluster document, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("cluster: {:?}\n", self.cluster_doc());
        for n in &self.nodes {
            let log = fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} log tail ---\n", n.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn stop_everything(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.agent.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &self.nodes {
            if let Some(pid) = node.postmaster_pid() {
                let pid = Pid::from_raw(pid);
                let _ = kill(pid, Signal::SIGQUIT);
                let gone = wait_until("postmaster exit", Duration::from_secs(10), || {
                    kill(pid, None).is_err().then_some(())
                });
                if gone.is_err() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
        }
    }
}

/// YAML fragments of [`ClusterPki::yaml`] (all empty without TLS).
#[derive(Default)]
pub(crate) struct TlsYaml {
    pub(crate) rest: String,
    pub(crate) etcd: String,
    pub(crate) superuser: String,
    pub(crate) replication: String,
    pub(crate) parameters: String,
    /// Appended to the TCP `pg_hba` lines.
    pub(crate) hba_options: &'static str,
}

impl TlsYaml {
    /// The connection type of the TCP `pg_hba` lines: TLS only when the cluster has a CA.
    pub(crate) fn hba_type(&self) -> &'static str {
        if self.hba_options.is_empty() {
            "host"
        } else {
            "hostssl"
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.stop_everything();
    }
}

/// Runs SQL on `127.0.0.1:port` as the superuser with psql.
pub fn psql_at(port: u16, sql: &str) -> anyhow::Result<String> {
    psql_with(port, sql, &[])
}

/// [`psql_at`] with extra libpq environment variables (`PGSSLMODE`, ...).
pub fn psql_with(port: u16, sql: &str, env: &[(&str, PathBuf)]) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(format!(
            "host=127.0.0.1 port={port} user={SUPERUSER} dbname=postgres connect_timeout=3"
        ))
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "3")
        .stdin(Stdio::null())
        .output()
        .context("running psql")?;
    if !out.status.success() {
        bail!(
            "psql on port {port}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
