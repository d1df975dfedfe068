//! `rolling-restart`: restart every member with one PostgreSQL down at a time and the primary
//! moved away before its turn. Replicas first (each must be running and streaming again before
//! the next), then a switchover to a healthy replica, then the former leader (unless the
//! switchover's demotion already restarted it). Every wait is bounded and reports what it saw.

use std::time::{Duration, Instant};

use anyhow::bail;
use pgvigil_api::{ClusterView, Member};
use pgvigil_dcs::Dcs;
use pgvigil_rest::operator::poll_seconds;
use serde_json::{Value, json};

use super::{Ctx, confirm, dynamic, print_members, read, timestamp};

#[derive(clap::Args, Clone, Debug)]
pub struct RollingRestartArgs {
    /// Cluster name (default: the configured scope).
    pub cluster: Option<String>,
    /// Switch over to this replica (default: the most caught-up replica that may be promoted).
    #[arg(long)]
    pub candidate: Option<String>,
    /// Seconds each step (one restart, the switchover) may take before the command gives up.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub force: bool,
}

/// Whether a replica's member key says it is running and streaming.
fn key_streaming(m: &Member) -> bool {
    m.data.state == "running" && m.data.replication_state.as_deref() == Some("streaming")
}

/// Why the cluster is not ready for a rolling restart, if it is not.
pub fn unhealthy(view: &ClusterView) -> Option<String> {
    let Some(leader) = view.leader_member() else {
        return Some("the cluster has no leader".into());
    };
    if leader.data.state != "running" {
        return Some(format!("the leader {} is {}", leader.name, leader.data.state));
    }
    if view.is_paused() {
        return Some("the cluster is paused (maintenance mode); resume it first".into());
    }
    if view.pending_failover().is_some() {
        return Some("a switchover or failover is pending".into());
    }
    let bad: Vec<String> = view
        .members
        .iter()
        .filter(|m| m.name != leader.name && !key_streaming(m))
        .map(|m| {
            format!(
                "{} is {}{}",
                m.name,
                m.data.state,
                m.data
                    .replication_state
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if !bad.is_empty() {
        return Some(bad.join(", "));
    }
    if view.members.iter().any(|m| m.data.api_url.is_empty()) {
        return Some("some member has no REST API address".into());
    }
    None
}

/// The switchover target: the named replica, or the most caught-up one that may be promoted.
pub fn choose_candidate(view: &ClusterView, wanted: Option<&str>) -> anyhow::Result<String> {
    let leader = view.leader_name();
    let eligible: Vec<&Member> = view
        .members
        .iter()
        .filter(|m| Some(m.name.as_str()) != leader && m.data.failover_priority() > 0)
        .collect();
    if let Some(name) = wanted {
        if !eligible.iter().any(|m| m.name == name) {
            bail!(
                "{name} is not a replica that may be promoted (not a member, the leader, or tagged nofailover)"
            );
        }
        return Ok(name.to_string());
    }
    let position = |m: &Member| {
        m.data
            .receive_lsn
            .unwrap_or(0)
            .max(m.data.replay_lsn.unwrap_or(0))
            .max(m.data.xlog_location.unwrap_or(0))
    };
    eligible
        .iter()
        .max_by(|a, b| {
            position(a)
                .cmp(&position(b))
                .then(a.data.failover_priority().cmp(&b.data.failover_priority()))
                .then(b.name.cmp(&a.name))
        })
        .map(|m| m.name.clone())
        .ok_or_else(|| anyhow::anyhow!("no replica may be promoted (all are tagged nofailover)"))
}

fn start_time(status: &Value) -> Option<String> {
    status
        .get("postmaster_start_time")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// A restarted replica is back: running, streaming, with a new postmaster (REST), and its key
/// says so too.
pub fn replica_back(status: &Value, key: Option<&Member>, before: Option<&str>) -> bool {
    let s = |k: &str| status.get(k).and_then(Value::as_str).unwrap_or("");
    s("state") == "running"
        && s("role") == "replica"
        && s("replication_state") == "streaming"
        && start_time(status).is_some_and(|t| Some(t.as_str()) != before)
        && key.is_some_and(key_streaming)
}

fn describe_status(status: Option<&Value>) -> String {
    match status {
        None => "no answer from its REST API".into(),
        Some(s) => {
            let f = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
            format!(
                "state={}, role={}, replication_state={}",
                f("state"),
                f("role"),
                f("replication_state")
            )
        }
    }
}

struct Run<'a, D: Dcs> {
    ctx: &'a Ctx,
    dcs: &'a D,
    step_timeout: Duration,
}

impl<D: Dcs> Run<'_, D> {
    async fn status(&self, member: &Member) -> Option<Value> {
        self.ctx.rest.status(member).await.ok()
    }

    /// Waits until `name` is a streaming replica whose postmaster started after `before`.
    async fn wait_replica(&self, name: &str, before: Option<&str>) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::from("nothing yet");
        while started.elapsed() < self.step_timeout {
            if let Ok(view) = self.dcs.get_cluster().await {
                let key = view.member(name);
                let status = match key {
                    Some(m) => self.status(m).await,
                    None => None,
                };
                if let Some(s) = &status
                    && replica_back(s, key, before)
                {
                    println!(
                        "{} {name} is running and streaming again ({:.1}s)",
                        timestamp(),
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                last = format!(
                    "{}; member key: {}",
                    describe_status(status.as_ref()),
                    key.map_or("missing".into(), |m| format!(
                        "{} {}",
                        m.data.state,
                        m.data.replication_state.as_deref().unwrap_or("-")
                    ))
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        bail!(
            "Rolling restart stopped: {name} is not a streaming replica after {}s (last seen: {last})",
            self.step_timeout.as_secs()
        )
    }

    async fn restart(&self, view: &ClusterView, name: &str) -> anyhow::Result<()> {
        let Some(member) = view.member(name) else {
            bail!("Rolling restart stopped: {name} is no longer a member");
        };
        let before = self.status(member).await.as_ref().and_then(start_time);
        println!("{} restarting {name} ...", timestamp());
        let wait = self.step_timeout + Duration::from_secs(30);
        match self
            .ctx
            .rest
            .call(member, "POST", Some("restart"), Some(&json!({})), wait)
            .await
        {
            Ok(r) if r.status == 200 => {}
            Ok(r) => bail!(
                "Rolling restart stopped: restart of {name} failed: {} {}",
                r.status,
                r.body
            ),
            Err(e) => bail!("Rolling restart stopped: restart of {name} failed: {e:#}"),
        }
        self.wait_replica(name, before.as_deref()).await
    }

    /// Switches over from `leader` to `candidate`; returns the new leader once it runs as
    /// primary.
    async fn switchover(&self, view: &ClusterView, leader: &str, candidate: &str) -> anyhow::Result<String> {
        let Some(member) = view.member(leader) else {
            bail!("Rolling restart stopped: the leader {leader} has no member key");
        };
        println!("{} switching over from {leader} to {candidate} ...", timestamp());
        let timeout = Duration::from_secs(poll_seconds(dynamic(view).loop_wait) + 30);
        let body = json!({"leader": leader, "candidate": candidate});
        // The leader may refuse a candidate that looks behind for a moment (e.g. right after its
        // restart); try a few times before giving up.
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let reply = self
                .ctx
                .rest
                .call(member, "POST", Some("switchover"), Some(&body), timeout)
                .await;
            match reply {
                Ok(r) if r.status == 200 => {
                    println!("{} {}", timestamp(), r.body);
                    break;
                }
                Ok(r) if r.status == 503 && r.body.contains("status unknown") => {
                    println!("{} {}", timestamp(), r.body);
                    break;
                }
                Ok(r) if (r.status == 503 || r.status == 412) && attempt < ATTEMPTS => {
                    println!(
                        "{} switchover refused ({} {}); retrying in 5s",
                        timestamp(),
                        r.status,
                        r.body
                    );
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Ok(r) => bail!(
                    "Rolling restart stopped: switchover refused: {} {}",
                    r.status,
                    r.body
                ),
                Err(e) => bail!("Rolling restart stopped: switchover request failed: {e:#}"),
            }
        }
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < self.step_timeout {
            if let Ok(view) = self.dcs.get_cluster().await {
                match super::switchover::judge(&view, Some(leader)) {
                    Some(super::switchover::Outcome::NewLeader(name)) => {
                        println!("{} {name} is the new leader", timestamp());
                        return Ok(name);
                    }
                    Some(super::switchover::Outcome::Unchanged(_)) => {
                        bail!(
                            "Rolling restart stopped: the switchover did not happen ({leader} is still the leader)"
                        )
                    }
                    _ => last = super::switchover::describe(&view),
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        bail!(
            "Rolling restart stopped: no new leader after {}s (last seen: {last})",
            self.step_timeout.as_secs()
        )
    }
}

pub async fn run(ctx: &Ctx, args: RollingRestartArgs) -> anyhow::Result<()> {
    let scope = ctx.scope(args.cluster.as_deref())?;
    let dcs = ctx.dcs(&scope).await?;
    let view = read(&dcs).await?;
    print_members(&scope, &view);
    if let Some(why) = unhealthy(&view) {
        bail!("Rolling restart needs a healthy cluster: {why}");
    }
    let leader = view.leader_name().unwrap_or_default().to_string();
    let candidate = choose_candidate(&view, args.candidate.as_deref())?;
    let replicas: Vec<String> = view
        .members
        .iter()
        .filter(|m| m.name != leader)
        .map(|m| m.name.clone())
        .collect();
    println!(
        "Plan: restart {} one at a time, switch over from {leader} to {candidate}, then restart {leader} \
         (unless the switchover already restarted it).",
        replicas.join(", ")
    );
    if !args.force
        && !confirm(&format!(
            "Are you sure you want to rolling-restart cluster {scope}, switching over from {leader} to {candidate}?"
        ))?
    {
        bail!("Aborted rolling restart");
    }
    let total = Instant::now();
    let run = Run {
        ctx,
        dcs: &dcs,
        step_timeout: Duration::from_secs(args.timeout.max(10)),
    };
    for name in &replicas {
        let view = read(&dcs).await?;
        run.restart(&view, name).await?;
    }

    let view = read(&dcs).await?;
    if view.leader_name() != Some(leader.as_str()) {
        bail!(
            "Rolling restart stopped: the leader changed on its own (now {}); nothing else was done",
            view.leader_name().unwrap_or("none")
        );
    }
    let old_start = match view.member(&leader) {
        Some(m) => run.status(m).await.as_ref().and_then(start_time),
        None => None,
    };
    let new_leader = run.switchover(&view, &leader, &candidate).await?;
    // The former leader was demoted: it must come back as a streaming replica.
    println!(
        "{} waiting for {leader} to run as a replica of {new_leader} ...",
        timestamp()
    );
    run.wait_replica(&leader, None).await?;
    let view = read(&dcs).await?;
    let now_start = match view.member(&leader) {
        Some(m) => run.status(m).await.as_ref().and_then(start_time),
        None => None,
    };
    if now_start.is_some() && now_start != old_start {
        println!(
            "{} {leader} was restarted by the switchover (PostgreSQL started {})",
            timestamp(),
            now_start.unwrap_or_default()
        );
    } else {
        run.restart(&view, &leader).await?;
    }

    // Final check: everything healthy as seen in etcd.
    let started = Instant::now();
    let mut why = String::new();
    while started.elapsed() < run.step_timeout {
        let view = read(&dcs).await?;
        match unhealthy(&view) {
            None => {
                print_members(&scope, &view);
                println!(
                    "Rolling restart of cluster {scope} finished in {:.0}s: {} members restarted, leader {}, all running",
                    total.elapsed().as_secs_f64(),
                    view.members.len(),
                    view.leader_name().unwrap_or("none")
                );
                return Ok(());
            }
            Some(w) => why = w,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let view = read(&dcs).await?;
    print_members(&scope, &view);
    bail!("Rolling restart done, but the cluster is not healthy: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::view;

    fn streaming(mut v: ClusterView) -> ClusterView {
        for m in &mut v.members {
            if m.name != "node2" {
                m.data.replication_state = Some("streaming".into());
            }
        }
        v
    }

    #[test]
    fn health() {
        let v = view();
        assert_eq!(unhealthy(&v).unwrap(), "node1 is running, node3 is running");
        let v = streaming(v);
        assert_eq!(unhealthy(&v), None);
        let mut paused = v.clone();
        paused.config = Some(pgvigil_api::Versioned {
            value: serde_json::json!({"pause": true}),
            mod_revision: 1,
        });
        assert!(unhealthy(&paused).unwrap().contains("paused"));
        let mut no_leader = v.clone();
        no_leader.leader = None;
        assert_eq!(unhealthy(&no_leader).unwrap(), "the cluster has no leader");
    }

    #[test]
    fn candidates() {
        let mut v = streaming(view());
        v.members[0].data.replay_lsn = Some(100);
        v.members[2].data.replay_lsn = Some(200);
        assert_eq!(choose_candidate(&v, None).unwrap(), "node3");
        assert_eq!(choose_candidate(&v, Some("node1")).unwrap(), "node1");
        assert!(choose_candidate(&v, Some("node2")).is_err());
        v.members[2]
            .data
            .tags
            .insert("nofailover".into(), serde_json::json!(true));
        assert_eq!(choose_candidate(&v, None).unwrap(), "node1");
        v.members[0]
            .data
            .tags
            .insert("nofailover".into(), serde_json::json!(true));
        assert!(choose_candidate(&v, None).is_err());
    }

    #[test]
    fn replica_is_back() {
        let v = streaming(view());
        let key = v.member("node1");
        let status = serde_json::json!({"state": "running", "role": "replica", "replication_state": "streaming",
                                        "postmaster_start_time": "t2"});
        assert!(replica_back(&status, key, Some("t1")));
        assert!(!replica_back(&status, key, Some("t2")));
        assert!(!replica_back(&status, None, Some("t1")));
        let starting =
            serde_json::json!({"state": "starting", "role": "replica", "postmaster_start_time": "t2"});
        assert!(!replica_back(&starting, key, Some("t1")));
        assert_eq!(
            describe_status(Some(&starting)),
            "state=starting, role=replica, replication_state=-"
        );
    }
}
