//! The lab's etcd cluster as a thing to push around: starting and stopping a host's member,
//! which member leads raft, moving that leadership to a chosen host, and freezing every member
//! for a while.

use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::{ETCD_CLIENT_PORT, ETCD_METRICS_PORT, ETCD_PEER_PORT, NetCluster, tail};
use crate::{spawn_owned, wait_until};

impl NetCluster {
    fn etcdctl(&self, endpoints: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--command-timeout=5s");
        if let Some(pki) = &self.pki {
            let files = pki.etcd_files();
            cmd.arg("--cacert").arg(&files.ca);
            cmd.arg("--cert").arg(&files.cert);
            cmd.arg("--key").arg(&files.key);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl (Debian package etcd-client)")?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn endpoint(&self, i: usize) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{ETCD_CLIENT_PORT}", self.nodes[i].ip)
    }

    /// Member id of host `i`'s etcd and the id of the raft leader it knows of.
    fn etcd_status(&self, i: usize) -> anyhow::Result<(u64, u64)> {
        let text = self.etcdctl(&self.endpoint(i), &["endpoint", "status", "-w", "json"])?;
        let doc: Value = serde_json::from_str(&text).context("etcdctl endpoint status output")?;
        let status = &doc[0]["Status"];
        let member = status["header"]["member_id"].as_u64().context("no member_id")?;
        let leader = status["leader"].as_u64().context("no leader")?;
        Ok((member, leader))
    }

    /// The host whose etcd member leads raft now, as the running members agree.
    pub fn etcd_leader(&self) -> anyhow::Result<usize> {
        let statuses: Vec<(usize, u64, u64)> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].etcd.is_some())
            .filter_map(|i| self.etcd_status(i).ok().map(|(m, l)| (i, m, l)))
            .collect();
        let leader_id = statuses.first().map(|s| s.2).context("no etcd member answers")?;
        statuses
            .iter()
            .find(|s| s.1 == leader_id)
            .map(|s| s.0)
            .context("the raft leader is not a member that answers")
    }

    /// Makes host `to`'s etcd member the raft leader (`etcdctl move-leader`), and waits until
    /// every member agrees.
    pub fn move_etcd_leader(&self, to: usize) -> anyhow::Result<()> {
        let current = self.etcd_leader()?;
        if current != to {
            let (target, _) = self.etcd_status(to)?;
            self.etcdctl(&self.endpoint(current), &["move-leader", &format!("{target:x}")])?;
        }
        wait_until(
            "etcd to lead from the chosen host",
            Duration::from_secs(30),
            || (self.etcd_leader().ok()? == to).then_some(()),
        )
    }

    /// Freezes every etcd member (SIGSTOP) for `how_long`, then lets them run again: etcd
    /// answers nothing meanwhile, like a cluster stalled on a slow disk.
    pub fn stall_etcd(&self, how_long: Duration) -> anyhow::Result<()> {
        let pids: Vec<Pid> = self
            .nodes
            .iter()
            .filter_map(|n| n.etcd.as_ref().map(|c| Pid::from_raw(c.id() as i32)))
            .collect();
        for &pid in &pids {
            kill(pid, Signal::SIGSTOP)?;
        }
        // The fault is the stall itself, so its length is a sleep, not a wait for a condition.
        std::thread::sleep(how_long);
        for &pid in &pids {
            kill(pid, Signal::SIGCONT)?;
        }
        Ok(())
    }

    pub(super) fn spawn_etcd(&mut self, i: usize) -> anyhow::Result<()> {
        let initial_cluster = self
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| format!("e{}=http://{}:{ETCD_PEER_PORT}", k + 1, n.ip))
            .collect::<Vec<_>>()
            .join(",");
        let node = &self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.etcd_log)?;
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:{ETCD_CLIENT_PORT}", node.ip);
        let peer = format!("http://{}:{ETCD_PEER_PORT}", node.ip);
        let bin = std::env::var_os("PGVIGIL_ETCD_BIN").unwrap_or_else(|| "/usr/bin/etcd".into());
        let mut cmd = self.lab.command(i, bin);
        cmd.arg("--name")
            .arg(format!("e{}", i + 1))
            .arg("--data-dir")
            .arg(&node.etcd_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.scope])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--pre-vote",
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .arg("--listen-metrics-urls")
            .arg(format!("http://{}:{ETCD_METRICS_PORT}", node.ip));
        if let Some(pki) = &self.pki {
            cmd.args(pki.etcd_files().etcd_args());
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = spawn_owned(cmd).context("starting etcd")?;
        self.nodes[i].etcd = Some(child);
        Ok(())
    }

    pub(super) fn wait_etcd_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let addr = SocketAddr::from((self.nodes[i].ip, ETCD_METRICS_PORT));
        let result = wait_until(
            &format!("etcd on {} to be healthy", self.nodes[i].name),
            Duration::from_secs(30),
            || crate::etcd::health_at(addr).ok()?.then_some(()),
        );
        result.with_context(|| format!("etcd log tail:\n{}", tail(&self.nodes[i].etcd_log, 30)))
    }

    /// Starts etcd on host `i` again (existing data) and waits until it is healthy (which
    /// needs a quorum of members running).
    pub fn start_etcd(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].etcd.is_none() {
            self.spawn_etcd(i)?;
        }
        self.wait_etcd_healthy(i)
    }

    /// Starts etcd on host `i` without waiting for health.
    pub fn spawn_etcd_member(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].etcd.is_none() {
            self.spawn_etcd(i)?;
        }
        Ok(())
    }

    /// SIGKILLs host `i`'s etcd member and waits for it.
    pub fn stop_etcd(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
