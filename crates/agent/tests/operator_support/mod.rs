//! Shared by the `operator_*` integration tests: a cluster with REST authentication, and
//! running `pgvigilctl` and the real `patronictl` against it with a bounded wait.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgvigil_testkit::cluster::{ClusterOptions, TestCluster, sibling_binary};
use pgvigil_testkit::wait_until;
use serde_json::Value;

pub const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
pub const HEALTHY: Duration = Duration::from_secs(180);
pub const API_USER: &str = "vigil-admin";
pub const API_PASSWORD: &str = "vigil-api-secret";

/// A three-node cluster with `restapi.authentication`; returns it and the leader's index.
pub fn start(mut options: ClusterOptions) -> (TestCluster, usize) {
    options.restapi_auth = Some((API_USER.into(), API_PASSWORD.into()));
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    (cluster, leader)
}

/// What a command did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with the whole output unless the command succeeded.
    pub fn expect_ok(self, what: &str) -> Run {
        assert!(self.ok(), "{what} failed:\n{self}");
        self
    }

    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.took, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with `stdin` (closed when `None`), killing it after `timeout`.
pub fn run(mut cmd: Command, stdin: Option<&str>, timeout: Duration) -> Run {
    let started = Instant::now();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    {
        let mut input = child.stdin.take().expect("piped stdin");
        if let Some(text) = stdin {
            let _ = input.write_all(text.as_bytes());
        }
    }
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        took: started.elapsed(),
    };
    assert!(
        status.is_some(),
        "{cmd:?} did not finish within {timeout:?}:\n{run}"
    );
    run
}

pub fn pgvigilctl_bin() -> PathBuf {
    sibling_binary("pgvigilctl").expect("pgvigilctl is built (cargo build --workspace)")
}

/// The real patronictl (on PATH, else the pyenv install).
pub fn patronictl_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("patronictl"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/root/.pyenv/versions/3.11.7/bin/patronictl"))
}

/// `pgvigilctl -c <node i's config> args...`.
pub fn pgvigilctl(
    cluster: &TestCluster,
    node: usize,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Run {
    let mut cmd = Command::new(pgvigilctl_bin());
    cmd.arg("-c").arg(&cluster.nodes[node].config).args(args);
    cmd.env_remove("PATRONICTL_CONFIG_FILE").env_remove("DCS_URL");
    run(cmd, stdin, timeout)
}

/// `patronictl -c <node i's config> args...`.
pub fn patronictl(
    cluster: &TestCluster,
    node: usize,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Run {
    let mut cmd = Command::new(patronictl_bin());
    cmd.arg("-c").arg(&cluster.nodes[node].config).args(args);
    cmd.env_remove("PATRONICTL_CONFIG_FILE").env_remove("DCS_URL");
    // No pager, no colours: patronictl talks to a pipe.
    cmd.env("PAGER", "cat").env("TERM", "dumb");
    run(cmd, stdin, timeout)
}

/// `GET /cluster` member entry by name.
pub fn member(cluster: &TestCluster, name: &str) -> Option<Value> {
    let doc = cluster.cluster_doc()?;
    doc["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
}

/// The leader's name from `/cluster` (running or not).
pub fn leader_name(cluster: &TestCluster) -> Option<String> {
    let doc = cluster.cluster_doc()?;
    doc["members"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == "leader")
        .and_then(|m| m["name"].as_str())
        .map(str::to_string)
}

/// Waits until node `i` is the running leader, accepts writes, and the others stream again.
pub fn wait_leader(cluster: &TestCluster, i: usize, within: Duration) {
    let r = wait_until(
        &format!("{} to lead a healthy cluster", cluster.nodes[i].name),
        within,
        || {
            (cluster.wait_healthy(Duration::from_secs(1)).ok()? == i
                && cluster.psql(i, "SELECT pg_is_in_recovery()").ok()? == "f")
                .then_some(())
        },
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

/// The replicas' indexes (everyone but `leader`).
pub fn others(cluster: &TestCluster, leader: usize) -> Vec<usize> {
    (0..cluster.nodes.len()).filter(|&i| i != leader).collect()
}

/// The `postmaster_start_time` of node `i` as PostgreSQL reports it.
pub fn start_time(cluster: &TestCluster, i: usize) -> String {
    cluster
        .psql(i, "SELECT pg_postmaster_start_time()")
        .unwrap_or_default()
}

/// An ISO 8601 UTC timestamp `secs` from now.
pub fn in_seconds(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs))
        .format("%Y-%m-%dT%H:%M:%S+00:00")
        .to_string()
}

/// Waits until `/cluster` shows every replica streaming with zero lag. Right after bootstrap
/// (or a base backup) a replica's published WAL position can trail the leader's by a segment
/// for a cycle, and the leader then rightly refuses it as a switchover candidate; operators
/// switch over on a settled cluster, so the tests do too.
pub fn wait_settled(cluster: &TestCluster) {
    let r = wait_until("replicas streaming without lag", Duration::from_secs(60), || {
        let doc = cluster.cluster_doc()?;
        let members = doc["members"].as_array()?;
        members
            .iter()
            .filter(|m| m["role"] != "leader")
            .all(|m| m["state"] == "streaming" && m["lag"] == 0)
            .then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}
