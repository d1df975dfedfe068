//! A real etcd cluster on loopback for integration tests.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{free_port, spawn_owned, test_tmp_root, wait_until};

/// How long [`EtcdCluster::start`] and [`EtcdCluster::start_member`] wait for health.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`EtcdCluster::start`] tries again with new ports when a port was taken meanwhile.
const START_ATTEMPTS: usize = 3;

struct Member {
    name: String,
    client_port: u16,
    /// Plain-HTTP `/health` and `/metrics` (used for health checks when clients need TLS).
    metrics_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

/// A cluster of `etcd` processes on 127.0.0.1, each with its own free client and peer port and a
/// data directory below one temporary directory.
///
/// Started with `--pre-vote` (a member that comes back after a partition does not force an
/// election), a 100 ms heartbeat and a 1 s election timeout. The binary is `/usr/bin/etcd` unless
/// `PGVIGIL_ETCD_BIN` says otherwise. Each member logs to `<tmp>/m<i>.log`; see
/// [`EtcdCluster::log_tail`]. Dropping the cluster kills every process it started (by pid), waits
/// for them and removes the directory; when dropped during a panic it first prints the log tails.
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    tls: Option<EtcdTlsFiles>,
    // Dropped last: the processes are gone by then.
    dir: TempDir,
}

/// Server certificate of the etcd members (valid for 127.0.0.1) and the CA that must sign
/// every client's certificate (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdTlsFiles {
    /// etcd's arguments for them: HTTPS for clients, which must present a certificate.
    pub fn etcd_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--cert-file".into(),
            self.cert.clone().into(),
            "--key-file".into(),
            self.key.clone().into(),
            "--trusted-ca-file".into(),
            self.ca.clone().into(),
            "--client-cert-auth".into(),
        ]
    }
}

impl EtcdCluster {
    /// Starts `members` etcd processes and waits (bounded) until every one reports healthy.
    pub fn start(members: usize) -> anyhow::Result<EtcdCluster> {
        Self::start_with_tls(members, None)
    }

    /// Like [`EtcdCluster::start`]; with `tls` clients must use HTTPS and present a certificate
    /// signed by `tls.ca` (peers still talk plain HTTP on loopback).
    pub fn start_with_tls(members: usize, tls: Option<EtcdTlsFiles>) -> anyhow::Result<EtcdCluster> {
        assert!(members > 0, "an etcd cluster needs at least one member");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Self::create(members, tls.clone())?;
            match cluster.launch_all() {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    let port_taken =
                        (0..members).any(|i| cluster.log_tail(i).contains("address already in use"));
                    if !port_taken {
                        return Err(e.context(cluster.all_log_tails()));
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error
            .expect("at least one attempt")
            .context("etcd ports kept being taken"))
    }

    fn create(members: usize, tls: Option<EtcdTlsFiles>) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("pgvigil-etcd-")
            .tempdir_in(test_tmp_root())
            .context("creating the etcd temp dir")?;
        let token = dir
            .path()
            .file_name()
            .map_or_else(|| "pgvigil".into(), |n| n.to_string_lossy().into_owned());
        let members = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                metrics_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log_path: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        Ok(EtcdCluster {
            members,
            token,
            tls,
            dir,
        })
    }

    fn launch_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i)?;
        }
        Ok(())
    }

    /// The client endpoints of all members (running or not), as `127.0.0.1:<port>`.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client endpoint of member `i`, as `127.0.0.1:<port>`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// The peer URL of member `i` (plain HTTP on loopback), as `http://127.0.0.1:<port>`.
    pub fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].peer_port)
    }

    /// Creates the `root` user with `password` and enables authentication (`etcdctl`, with the
    /// cluster's certificate when it uses TLS).
    pub fn enable_auth(&self, password: &str) -> anyhow::Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoints = self
            .endpoints()
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect::<Vec<_>>()
            .join(",");
        for args in [
            vec!["user".to_string(), "add".into(), format!("root:{password}")],
            vec!["auth".into(), "enable".into()],
        ] {
            let mut cmd = Command::new("etcdctl");
            cmd.env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoints}"));
            if let Some(tls) = &self.tls {
                cmd.arg(format!("--cacert={}", tls.ca.display()))
                    .arg(format!("--cert={}", tls.cert.display()))
                    .arg(format!("--key={}", tls.key.display()));
            }
            let out = cmd
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .context("running etcdctl")?;
            if !out.status.success() {
                bail!(
                    "etcdctl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// Number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The pid of member `i`, if it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// The temporary directory holding data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills member `i` (SIGKILL, by pid) and waits for it. No-op if it is not running.
    pub fn stop_member(&mut self, i: usize) {
        let member = &mut self.members[i];
        if let Some(mut child) = member.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again with its existing data directory and waits until it is healthy.
    /// No-op if it is running.
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        if self.members[i].child.is_some() {
            return Ok(());
        }
        self.spawn(i)?;
        self.wait_healthy(i)
            .with_context(|| format!("member {i} log tail:\n{}", self.log_tail(i)))
    }

    /// Freezes member `i` with SIGSTOP: its sockets stay open but nothing answers (a hung
    /// server, as opposed to [`EtcdCluster::stop_member`]'s refused connections).
    /// Returns once the kernel reports the process stopped (signal delivery is asynchronous).
    pub fn pause_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, Signal::SIGSTOP)?;
        let pid = self.pid(i).expect("signalled, so running");
        wait_until(&format!("etcd member {i} to stop"), HEALTH_TIMEOUT, || {
            (process_state(pid) == Some('T')).then_some(())
        })
    }

    /// Resumes a member frozen by [`EtcdCluster::pause_member`]; returns once it runs again.
    pub fn resume_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, Signal::SIGCONT)?;
        let pid = self.pid(i).expect("signalled, so running");
        wait_until(&format!("etcd member {i} to continue"), HEALTH_TIMEOUT, || {
            (process_state(pid) != Some('T')).then_some(())
        })
    }

    fn signal(&self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .pid(i)
            .with_context(|| format!("member {i} is not running"))?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("sending {signal} to member {i}"))
    }

    /// Whether member `i` answers `GET /health` with `"health":"true"` (it has a leader).
    pub fn is_healthy(&self, i: usize) -> bool {
        health(self.members[i].metrics_port).unwrap_or(false)
    }

    /// The last 50 lines of member `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        tail(&self.members[i].log_path, 50)
    }

    fn all_log_tails(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            out.push_str(&format!("--- etcd member {i} ({}) log tail ---\n", m.name));
            out.push_str(&self.log_tail(i));
            out.push('\n');
        }
        out
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let member = &self.members[i];
        let bin = std::env::var_os("PGVIGIL_ETCD_BIN").unwrap_or_else(|| "/usr/bin/etcd".into());
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log_path)
            .with_context(|| format!("opening {}", member.log_path.display()))?;
        writeln!(log, "=== pgvigil-testkit: starting {} ===", member.name)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .args([
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--pre-vote",
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", member.metrics_port));
        if let Some(tls) = &self.tls {
            cmd.args(tls.etcd_args());
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = spawn_owned(cmd).with_context(|| format!("spawning {}", Path::new(&bin).display()))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let port = self.members[i].metrics_port;
        let mut exited = None;
        let result = wait_until(
            &format!("etcd member {i} to become healthy"),
            HEALTH_TIMEOUT,
            || {
                if let Some(child) = self.members[i].child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    exited = Some(status);
                    return Some(());
                }
                health(port).unwrap_or(false).then_some(())
            },
        );
        if let Some(status) = exited {
            self.members[i].child = None;
            bail!("etcd member {i} exited during startup: {status}");
        }
        result
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.all_log_tails());
        }
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                // SIGKILL also ends a SIGSTOPped process.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `T` for stopped, ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: the state follows the last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// `GET /health` over plain HTTP/1.0.
fn health(port: u16) -> std::io::Result<bool> {
    health_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// `GET /health` of the etcd member whose client or metrics URL is `addr`, over plain HTTP/1.0.
pub(crate) fn health_at(addr: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.starts_with("HTTP/1.") && response.contains("\"health\":\"true\""))
}

fn tail(path: &Path, lines: usize) -> String {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_member_starts_stops_and_restarts() {
        let mut cluster = EtcdCluster::start(1).unwrap();
        assert_eq!(cluster.endpoints().len(), 1);
        assert!(cluster.is_healthy(0));
        let pid = cluster.pid(0).unwrap();
        cluster.stop_member(0);
        assert!(!cluster.is_healthy(0));
        assert!(cluster.pid(0).is_none());
        // The process is gone (reaped), not merely signalled.
        assert!(kill(Pid::from_raw(pid as i32), None).is_err());
        cluster.start_member(0).unwrap();
        assert!(cluster.is_healthy(0));
        assert!(cluster.log_tail(0).contains("pgvigil-testkit: starting m0"));
        let dir = cluster.dir().to_path_buf();
        drop(cluster);
        assert!(!dir.exists());
    }

    #[test]
    fn three_members_survive_losing_one() {
        let mut cluster = EtcdCluster::start(3).unwrap();
        cluster.stop_member(2);
        wait_until("the remaining members to stay healthy", HEALTH_TIMEOUT, || {
            (cluster.is_healthy(0) && cluster.is_healthy(1)).then_some(())
        })
        .unwrap();
        cluster.start_member(2).unwrap();
        assert!(cluster.is_healthy(2));
    }

    #[test]
    fn paused_member_does_not_answer_until_resumed() {
        let mut cluster = EtcdCluster::start(1).unwrap();
        cluster.pause_member(0).unwrap();
        assert!(!cluster.is_healthy(0));
        cluster.resume_member(0).unwrap();
        wait_until("the member to answer again", HEALTH_TIMEOUT, || {
            cluster.is_healthy(0).then_some(())
        })
        .unwrap();
    }
}
