//! `switchover` and `failover`: validate like patronictl, confirm, ask the leader's REST API
//! (falling back to writing the `failover` key), then watch etcd until the outcome is known.

use std::time::{Duration, Instant};

use anyhow::bail;
use pgvigil_api::{ClusterView, FailoverValue};
use pgvigil_dcs::Dcs;
use pgvigil_rest::operator::{isoformat, poll_seconds};
use serde_json::{Map, Value};

use super::{Ctx, confirm, dynamic, next_hour, parse_scheduled, print_members, prompt, read, timestamp};

#[derive(clap::Args, Clone, Debug)]
pub struct SwitchoverArgs {
    /// Cluster name (default: the configured scope).
    pub cluster: Option<String>,
    /// The name of the current leader.
    #[arg(long, alias = "primary")]
    pub leader: Option<String>,
    /// The name of the candidate.
    #[arg(long)]
    pub candidate: Option<String>,
    /// Timestamp of a scheduled switchover in unambiguous format (e.g. ISO 8601), or `now`.
    #[arg(long)]
    pub scheduled: Option<String>,
    /// Do not ask for confirmation at any point.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct FailoverArgs {
    /// Cluster name (default: the configured scope).
    pub cluster: Option<String>,
    /// The name of the candidate.
    #[arg(long)]
    pub candidate: Option<String>,
    /// Do not ask for confirmation at any point.
    #[arg(long)]
    pub force: bool,
}

/// What the operator asked for, after prompts and checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub action: &'static str,
    pub leader: Option<String>,
    pub candidate: Option<String>,
    pub scheduled_at: Option<String>,
}

impl Plan {
    /// The REST body (`candidate` is always present, `null` for "any").
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert(
            "candidate".into(),
            self.candidate.clone().map_or(Value::Null, Value::from),
        );
        if self.action == "switchover" {
            body.insert(
                "leader".into(),
                self.leader.clone().map_or(Value::Null, Value::from),
            );
        }
        if let Some(at) = &self.scheduled_at {
            body.insert("scheduled_at".into(), Value::from(at.clone()));
        }
        Value::Object(body)
    }
}

/// Candidates: members other than the leader without `nofailover`, sorted by name.
pub fn candidate_names(view: &ClusterView) -> Vec<String> {
    let leader = view.leader_name();
    let mut names: Vec<String> = view
        .members
        .iter()
        .filter(|m| Some(m.name.as_str()) != leader && m.data.failover_priority() > 0)
        .map(|m| m.name.clone())
        .collect();
    names.sort();
    names
}

fn title(action: &str) -> String {
    let mut t = action.to_string();
    t[..1].make_ascii_uppercase();
    t
}

/// patronictl's checks and prompts, in its order.
fn plan(
    view: &ClusterView,
    scope: &str,
    action: &'static str,
    leader_arg: Option<String>,
    candidate_arg: Option<String>,
    scheduled_arg: Option<String>,
    force: bool,
) -> anyhow::Result<Plan> {
    let config = dynamic(view);
    let cluster_leader = view.leader_name().map(str::to_string);
    let mut leader = None;
    if action == "switchover" {
        let Some(current) = &cluster_leader else {
            bail!("This cluster has no leader");
        };
        let given = match leader_arg {
            Some(l) => l,
            None if force => current.clone(),
            None => {
                let label = if config.standby_cluster.is_some() {
                    "Standby Leader"
                } else {
                    "Primary"
                };
                prompt(label, Some(current))?
            }
        };
        if &given != current {
            bail!("Member {given} is not the leader of cluster {scope}");
        }
        leader = Some(given);
    }
    let names = candidate_names(view);
    if names.is_empty() {
        bail!("No candidates found to {action} to");
    }
    let candidate = match candidate_arg {
        Some(c) => Some(c),
        None if force => None,
        None => {
            let shown = names
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ");
            Some(prompt(&format!("Candidate [{shown}]"), Some(""))?)
        }
    }
    .filter(|c| !c.is_empty());
    if action == "failover" && candidate.is_none() {
        bail!("Failover could be performed only to a specific candidate");
    }
    if let Some(c) = &candidate
        && !names.contains(c)
    {
        if Some(c) == cluster_leader.as_ref() {
            bail!("Member {c} is already the leader of cluster {scope}");
        }
        bail!("Member {c} does not exist in cluster {scope} or is tagged as nofailover");
    }
    if let Some(c) = &candidate
        && !force
        && action == "failover"
        && config.synchronous_mode.is_enabled()
        && config.standby_cluster.is_none()
        && let Some(sync) = view.sync.as_ref().map(|s| &s.value)
        && !sync.members().is_empty()
        && !(sync.contains(c) || sync.leader.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(c)))
        && !confirm(&format!(
            "Are you sure you want to failover to the asynchronous node {c}?"
        ))?
    {
        bail!("Aborting {action}");
    }
    let mut scheduled_at = None;
    if action == "switchover" {
        let scheduled = match scheduled_arg {
            Some(s) => Some(s),
            None if force => None,
            None => Some(prompt(
                &format!("When should the switchover take place (e.g. {} ) ", next_hour()),
                Some("now"),
            )?),
        };
        if let Some(at) = parse_scheduled(scheduled.as_deref())? {
            if config.pause {
                bail!("Can't schedule switchover in the paused state");
            }
            scheduled_at = Some(isoformat(&at));
        }
    }
    Ok(Plan {
        action,
        leader,
        candidate,
        scheduled_at,
    })
}

pub async fn switchover(ctx: &Ctx, args: SwitchoverArgs) -> anyhow::Result<()> {
    run(
        ctx,
        "switchover",
        args.cluster,
        args.leader,
        args.candidate,
        args.scheduled,
        args.force,
    )
    .await
}

pub async fn failover(ctx: &Ctx, args: FailoverArgs) -> anyhow::Result<()> {
    run(
        ctx,
        "failover",
        args.cluster,
        None,
        args.candidate,
        None,
        args.force,
    )
    .await
}

async fn run(
    ctx: &Ctx,
    action: &'static str,
    cluster: Option<String>,
    leader: Option<String>,
    candidate: Option<String>,
    scheduled: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    let scope = ctx.scope(cluster.as_deref())?;
    let dcs = ctx.dcs(&scope).await?;
    let view = read(&dcs).await?;
    println!("Current cluster topology");
    print_members(&scope, &view);
    let plan = plan(&view, &scope, action, leader, candidate, scheduled, force)?;
    let cluster_leader = view.leader_name().map(str::to_string);
    if !force {
        let demote = cluster_leader
            .as_ref()
            .map(|l| format!(", demoting current leader {l}"))
            .unwrap_or_default();
        let question = match &plan.scheduled_at {
            Some(at) => {
                format!("Are you sure you want to schedule switchover of cluster {scope} at {at}{demote}?")
            }
            None => format!("Are you sure you want to {action} cluster {scope}{demote}?"),
        };
        if !confirm(&question)? {
            match plan.scheduled_at {
                Some(_) => bail!("Aborting scheduled {action}"),
                None => bail!("Aborting {action}"),
            }
        }
    }

    let loop_wait = dynamic(&view).loop_wait;
    let ttl = dynamic(&view).ttl;
    let target = view
        .leader_member()
        .or_else(|| plan.candidate.as_deref().and_then(|c| view.member(c)));
    let answer = match target {
        Some(member) => {
            let timeout = Duration::from_secs(poll_seconds(loop_wait) + 30);
            ctx.rest
                .call(member, "POST", Some(action), Some(&plan.body()), timeout)
                .await
        }
        None => Err(anyhow::anyhow!("no member to send the request to")),
    };
    let mut settled = false;
    match answer {
        Ok(reply) if reply.status == 200 || reply.status == 202 => {
            println!("{} {}", timestamp(), reply.body);
            settled = reply.status == 202 || !reply.body.contains("status unknown");
        }
        Ok(reply) if reply.status == 503 && reply.body.contains("status unknown") => {
            println!("{} {}", timestamp(), reply.body);
        }
        Ok(reply) => {
            println!(
                "{} failed, details: {}, {}",
                title(action),
                reply.status,
                reply.body
            );
            bail!(
                "{} of cluster {scope} refused: {} {}",
                action,
                reply.status,
                reply.body
            );
        }
        Err(e) => {
            println!(
                "{} Could not {action} using Patroni api, falling back to DCS",
                timestamp()
            );
            eprintln!("({e:#})");
            let value = FailoverValue {
                leader: plan.leader.clone(),
                member: plan.candidate.clone(),
                scheduled_at: plan.scheduled_at.clone(),
            };
            if !dcs.set_failover(&value, None).await? {
                bail!("could not write the failover key");
            }
            println!(
                "{} failover key written: {}",
                timestamp(),
                serde_json::to_string(&value)?
            );
            settled = plan.scheduled_at.is_some();
        }
    }

    if plan.scheduled_at.is_some() {
        let view = read(&dcs).await?;
        print_members(&scope, &view);
        return Ok(());
    }
    // Immediate: follow the cluster until it has a running leader again, so the outcome is
    // what etcd shows, not a guess.
    let wait = Duration::from_secs(poll_seconds(loop_wait) + 2 * ttl + 30);
    let outcome = wait_outcome(
        &dcs,
        cluster_leader.as_deref(),
        plan.candidate.as_deref(),
        wait,
        settled,
    )
    .await;
    let view = match outcome {
        // Give the other members a moment to follow, so the table shows where they are.
        Outcome::NewLeader(_) => wait_followers(&dcs, Duration::from_secs(30)).await?,
        _ => read(&dcs).await?,
    };
    print_members(&scope, &view);
    match outcome {
        Outcome::NewLeader(name) => {
            match &plan.candidate {
                Some(c) if c != &name => {
                    println!(
                        "{} {} done: the new leader is {name} (not {c})",
                        timestamp(),
                        title(action)
                    )
                }
                _ => println!("{} {} done: the new leader is {name}", timestamp(), title(action)),
            }
            Ok(())
        }
        Outcome::Unchanged(name) => {
            bail!(
                "{} did not happen: {name} is still the leader and the failover key was cleared (see the leader's log for the reason)",
                title(action)
            )
        }
        Outcome::TimedOut(seen) => bail!(
            "{} not finished after {}s; last seen in etcd: {seen}",
            title(action),
            wait.as_secs()
        ),
    }
}

/// Waits (bounded) until every member other than the leader streams; returns the last view.
async fn wait_followers(dcs: &impl Dcs, limit: Duration) -> anyhow::Result<ClusterView> {
    let started = Instant::now();
    loop {
        let view = read(dcs).await?;
        let following = view
            .members
            .iter()
            .filter(|m| Some(m.name.as_str()) != view.leader_name())
            .all(|m| m.data.replication_state.as_deref() == Some("streaming"));
        if following || started.elapsed() >= limit {
            if !following {
                println!(
                    "{} not every replica streams from the new leader yet (after {}s)",
                    timestamp(),
                    limit.as_secs()
                );
            }
            return Ok(view);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What etcd showed after an immediate switchover request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Another member holds the lock and reports itself running as primary.
    NewLeader(String),
    /// The old leader still holds the lock and the request is gone.
    Unchanged(String),
    /// Neither within the time; a description of the last state seen.
    TimedOut(String),
}

/// One look at the cluster: `Some` once the outcome is known.
pub fn judge(view: &ClusterView, old_leader: Option<&str>) -> Option<Outcome> {
    match view.leader_member() {
        Some(m) if Some(m.name.as_str()) != old_leader => (m.data.state == "running"
            && matches!(m.data.role.as_str(), "primary" | "master" | "standby_leader"))
        .then(|| Outcome::NewLeader(m.name.clone())),
        Some(m) if view.pending_failover().is_none() && m.data.state == "running" => {
            Some(Outcome::Unchanged(m.name.clone()))
        }
        _ => None,
    }
}

pub fn describe(view: &ClusterView) -> String {
    let leader = view.leader_name().unwrap_or("none");
    let members = view
        .members
        .iter()
        .map(|m| format!("{} {} {}", m.name, m.data.role, m.data.state))
        .collect::<Vec<_>>()
        .join(", ");
    let pending = match view.pending_failover() {
        Some(f) => format!("; failover key {}", serde_json::to_string(f).unwrap_or_default()),
        None => String::new(),
    };
    format!("leader {leader}; members: {members}{pending}")
}

async fn wait_outcome(
    dcs: &impl Dcs,
    old_leader: Option<&str>,
    candidate: Option<&str>,
    wait: Duration,
    announced: bool,
) -> Outcome {
    let started = Instant::now();
    let mut last = String::from("nothing (etcd did not answer)");
    let mut said_waiting = false;
    while started.elapsed() < wait {
        if let Ok(view) = dcs.get_cluster().await {
            if let Some(outcome) = judge(&view, old_leader) {
                return outcome;
            }
            last = describe(&view);
            if !said_waiting {
                said_waiting = true;
                let whom = candidate.unwrap_or("a replica");
                if announced {
                    println!("{} waiting for {whom} to run as the new leader", timestamp());
                } else {
                    println!("{} waiting for the cluster to hand over to {whom}", timestamp());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Outcome::TimedOut(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::view;
    use serde_json::json;

    #[test]
    fn plans_with_force() {
        let v = view();
        let p = plan(&v, "c", "switchover", None, None, None, true).unwrap();
        assert_eq!(p.leader.as_deref(), Some("node2"));
        assert_eq!(p.body(), json!({"candidate": null, "leader": "node2"}));
        let p = plan(
            &v,
            "c",
            "switchover",
            Some("node2".into()),
            Some("node3".into()),
            Some("2030-01-01T10:00+00:00".into()),
            true,
        )
        .unwrap();
        assert_eq!(
            p.body(),
            json!({"candidate": "node3", "leader": "node2", "scheduled_at": "2030-01-01T10:00:00+00:00"})
        );
        let p = plan(&v, "c", "switchover", None, None, Some("now".into()), true).unwrap();
        assert_eq!(p.scheduled_at, None);
        let p = plan(&v, "c", "failover", None, Some("node1".into()), None, true).unwrap();
        assert_eq!(p.body(), json!({"candidate": "node1"}));
    }

    #[test]
    fn refusals() {
        let v = view();
        let e = |r: anyhow::Result<Plan>| r.unwrap_err().to_string();
        assert_eq!(
            e(plan(
                &v,
                "c",
                "switchover",
                Some("node1".into()),
                None,
                None,
                true
            )),
            "Member node1 is not the leader of cluster c"
        );
        assert_eq!(
            e(plan(&v, "c", "failover", None, None, None, true)),
            "Failover could be performed only to a specific candidate"
        );
        assert_eq!(
            e(plan(&v, "c", "failover", None, Some("node2".into()), None, true)),
            "Member node2 is already the leader of cluster c"
        );
        assert_eq!(
            e(plan(&v, "c", "failover", None, Some("node9".into()), None, true)),
            "Member node9 does not exist in cluster c or is tagged as nofailover"
        );
        assert!(
            e(plan(&v, "c", "switchover", None, None, Some("soon".into()), true))
                .starts_with("Unable to parse")
        );
        let mut no_leader = v.clone();
        no_leader.leader = None;
        assert_eq!(
            e(plan(&no_leader, "c", "switchover", None, None, None, true)),
            "This cluster has no leader"
        );
        let mut tagged = v.clone();
        for m in &mut tagged.members {
            m.data.tags.insert("nofailover".into(), json!(true));
        }
        assert_eq!(
            e(plan(&tagged, "c", "switchover", None, None, None, true)),
            "No candidates found to switchover to"
        );
        let mut paused = v.clone();
        paused.config = Some(pgvigil_api::Versioned {
            value: json!({"pause": true}),
            mod_revision: 1,
        });
        assert_eq!(
            e(plan(
                &paused,
                "c",
                "switchover",
                None,
                None,
                Some("2030-01-01T10:00Z".into()),
                true
            )),
            "Can't schedule switchover in the paused state"
        );
    }

    #[test]
    fn outcomes() {
        let mut v = view();
        assert_eq!(judge(&v, Some("node2")), Some(Outcome::Unchanged("node2".into())));
        v.failover = FailoverValue::parse(r#"{"leader":"node2"}"#).map(|value| pgvigil_api::Versioned {
            value,
            mod_revision: 1,
        });
        assert_eq!(judge(&v, Some("node2")), None);
        v.leader.as_mut().unwrap().name = "node3".into();
        // node3 holds the lock but still reports itself a replica: not yet.
        assert_eq!(judge(&v, Some("node2")), None);
        v.members[2].data.role = "primary".into();
        assert_eq!(judge(&v, Some("node2")), Some(Outcome::NewLeader("node3".into())));
        assert!(describe(&v).starts_with("leader node3; members: node1 replica running"));
    }
}
