//! The two routers under test, as processes owned by the test and stopped by PID: `pgvigil
//! router` with a copy of a node's configuration, and the real HAProxy with the configuration
//! `pgvigilctl haproxy-config` prints.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::unistd::Pid;
use pgvigil_testkit::cluster::{TestCluster, sibling_binary};
use pgvigil_testkit::{free_port, http, spawn_owned, wait_until};
use serde_json::Value;

use super::{AGENT, HAPROXY, read_via};

/// `pgvigil router` with its own copy of a node's configuration plus a `router:` section.
pub struct Router {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub primary: u16,
    pub replicas: u16,
    pub stats: u16,
}

pub fn router_section(primary: u16, replicas: u16, stats: u16, extra: &str) -> String {
    format!(
        "\nrouter:\n  primary_listen: 127.0.0.1:{primary}\n  replicas_listen: 127.0.0.1:{replicas}\n  \
         stats_listen: 127.0.0.1:{stats}\n{extra}"
    )
}

impl Router {
    /// Starts the router on `base_config` (an agent configuration) and waits until it has read
    /// the cluster.
    pub fn start(dir: &Path, base_config: &str, extra: &str) -> anyhow::Result<Router> {
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

    pub fn spawn(&mut self) -> anyhow::Result<()> {
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

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn stats_json(&self) -> Option<Value> {
        http::get(self.stats, "/stats.json").ok()?.json().ok()
    }

    pub fn member<'a>(stats: &'a Value, name: &str) -> Option<&'a Value> {
        stats["members"].as_array()?.iter().find(|m| m["name"] == name)
    }

    pub fn log_tail(&self) -> String {
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
pub struct Haproxy {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub primary: u16,
    pub replicas: u16,
    pub config_text: String,
}

impl Haproxy {
    pub fn start(dir: &Path, node_config: &Path) -> anyhow::Result<Haproxy> {
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
    pub fn wait_settled(&self, cluster: &TestCluster, leader: usize) {
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
