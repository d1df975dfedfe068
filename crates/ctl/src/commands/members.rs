//! Per-member verbs: `restart`, `reload`, `reinit`, `flush`.

use std::time::{Duration, Instant};

use anyhow::bail;
use pgvigil_api::{FailoverValue, Member};
use pgvigil_dcs::Dcs;
use pgvigil_rest::operator::{check_postgres_version, isoformat};
use serde_json::{Map, Value};

use super::{
    Ctx, RoleFilter, confirm, confirm_members_action, dynamic, finish, members_leader_first, next_hour,
    parse_scheduled, prompt, read, select_members, timestamp,
};

#[derive(clap::Args, Clone, Debug)]
pub struct RestartArgs {
    pub cluster: String,
    pub members: Vec<String>,
    /// Restart only members with this role.
    #[arg(short = 'r', long, value_enum, default_value = "any")]
    pub role: RoleFilter,
    /// Restart a single member only.
    #[arg(long)]
    pub any: bool,
    /// Timestamp of a scheduled restart in unambiguous format (e.g. ISO 8601), or `now`.
    #[arg(long)]
    pub scheduled: Option<String>,
    /// Restart if the PostgreSQL version is less than provided (e.g. 9.5.2).
    #[arg(long = "pg-version")]
    pub pg_version: Option<String>,
    /// Restart if pending.
    #[arg(long)]
    pub pending: bool,
    /// Return error and fail over if necessary when restarting takes longer than this.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Do not ask for confirmation at any point.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ReloadArgs {
    pub cluster: String,
    pub members: Vec<String>,
    /// Reload only members with this role.
    #[arg(short = 'r', long, value_enum, default_value = "any")]
    pub role: RoleFilter,
    /// Do not ask for confirmation at any point.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ReinitArgs {
    pub cluster: String,
    pub members: Vec<String>,
    /// Do not ask for confirmation at any point (also cancels a running task on the member).
    #[arg(long)]
    pub force: bool,
    /// Get the base backup from the leader.
    #[arg(long = "from-leader")]
    pub from_leader: bool,
    /// Wait until reinitialization completes.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long = "wait-timeout", default_value_t = 1800)]
    pub wait_timeout: u64,
}

#[derive(clap::Args, Clone, Debug)]
pub struct FlushArgs {
    /// CLUSTER [MEMBER...] restart|switchover
    #[arg(required = true, num_args = 2.., value_names = ["CLUSTER", "MEMBER|TARGET"])]
    pub args: Vec<String>,
    /// Flush only members with this role.
    #[arg(short = 'r', long, value_enum, default_value = "any")]
    pub role: RoleFilter,
    /// Do not ask for confirmation at any point.
    #[arg(long)]
    pub force: bool,
}

/// `CLUSTER [MEMBER...] TARGET` split like click does for a variadic argument before a fixed one.
pub fn split_flush_args(args: &[String]) -> anyhow::Result<(String, Vec<String>, String)> {
    let (Some(cluster), Some(target)) = (args.first(), args.last()) else {
        bail!("usage: flush CLUSTER [MEMBER...] restart|switchover");
    };
    if args.len() < 2 {
        bail!("usage: flush CLUSTER [MEMBER...] restart|switchover");
    }
    if !matches!(target.as_str(), "restart" | "switchover") {
        bail!("Invalid value for 'TARGET': '{target}' is not one of 'restart', 'switchover'.");
    }
    Ok((cluster.clone(), args[1..args.len() - 1].to_vec(), target.clone()))
}

/// patronictl's `check_response`.
fn report(reply: &super::Reply, member: &str, action: &str, silent_success: bool) -> bool {
    if reply.status >= 400 {
        println!(
            "Failed: {action} for member {member}, status code={}, ({})",
            reply.status, reply.body
        );
        false
    } else {
        if !silent_success {
            println!("Success: {action} for member {member}");
        }
        true
    }
}

/// The `POST /restart` body.
pub fn restart_body(
    schedule: Option<&str>,
    pending: bool,
    version: Option<&str>,
    timeout: Option<&str>,
) -> Value {
    let mut content = Map::new();
    if pending {
        content.insert("restart_pending".into(), Value::Bool(true));
    }
    if let Some(v) = version {
        content.insert("postgres_version".into(), Value::from(v));
    }
    if let Some(s) = schedule {
        content.insert("schedule".into(), Value::from(s));
    }
    if let Some(t) = timeout {
        content.insert("timeout".into(), Value::from(t));
    }
    Value::Object(content)
}

/// How long to wait for `POST /restart` to answer (it answers once PostgreSQL is up again).
fn restart_wait(timeout: Option<&str>, primary_start_timeout: u64) -> Duration {
    let secs = timeout
        .and_then(|t| pgvigil_rest::operator::parse_seconds(&Value::from(t)))
        .filter(|t| *t > 0)
        .map_or(primary_start_timeout, |t| t as u64);
    Duration::from_secs(secs.clamp(60, 3600) + 60)
}

pub async fn restart(ctx: &Ctx, args: RestartArgs) -> anyhow::Result<()> {
    let dcs = ctx.dcs(&args.cluster).await?;
    let view = read(&dcs).await?;
    let mut members = select_members(
        &view,
        &args.cluster,
        &args.members,
        args.role,
        args.force,
        "restart",
        false,
    )?;
    let scheduled = match args.scheduled {
        Some(s) => Some(s),
        None if args.force => None,
        None => Some(prompt(
            &format!("When should the restart take place (e.g. {}) ", next_hour()),
            Some("now"),
        )?),
    };
    let scheduled_at = parse_scheduled(scheduled.as_deref())?;
    if args.pending && scheduled_at.is_none() {
        members.retain(|m| m.data.pending_restart == Some(true));
    }
    if args.any && members.len() > 1 {
        let pick = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()) as usize)
            % members.len();
        members = vec![members[pick]];
    }
    confirm_members_action(
        &members,
        args.force,
        "restart",
        scheduled_at.as_ref(),
        args.pending,
    )?;
    let version = match args.pg_version {
        Some(v) => Some(v),
        None if args.force => None,
        None => Some(prompt(
            "Restart if the PostgreSQL version is less than provided (e.g. 9.5.2) ",
            Some(""),
        )?),
    }
    .filter(|v| !v.is_empty());
    if let Some(v) = &version {
        check_postgres_version(v).map_err(|e| anyhow::anyhow!(e))?;
    }
    let config = dynamic(&view);
    if scheduled_at.is_some() && config.pause {
        bail!("Can't schedule restart in the paused state");
    }
    let schedule = scheduled_at.as_ref().map(isoformat);
    let body = restart_body(
        schedule.as_deref(),
        args.pending,
        version.as_deref(),
        args.timeout.as_deref(),
    );
    let wait = restart_wait(args.timeout.as_deref(), config.primary_start_timeout);
    if members.is_empty() {
        println!("No member needs a restart");
        return Ok(());
    }
    let mut failures = 0;
    let mut restarted = Vec::new();
    for member in members {
        if schedule.is_some() && args.force && member.data.scheduled_restart.is_some() {
            match ctx
                .rest
                .call(member, "DELETE", Some("restart"), None, Duration::from_secs(130))
                .await
            {
                Ok(r) => {
                    report(&r, &member.name, "flush scheduled restart", true);
                }
                Err(e) => println!(
                    "Failed: flush scheduled restart for member {}: {e:#}",
                    member.name
                ),
            }
        }
        if schedule.is_none() {
            println!("{} restarting {} ...", timestamp(), member.name);
        }
        let started = Instant::now();
        match ctx
            .rest
            .call(member, "POST", Some("restart"), Some(&body), wait)
            .await
        {
            Ok(r) if r.status == 200 => {
                restarted.push(member.name.clone());
                println!(
                    "Success: restart on member {} ({:.1}s)",
                    member.name,
                    started.elapsed().as_secs_f64()
                )
            }
            Ok(r) if r.status == 202 => println!("Success: restart scheduled on member {}", member.name),
            Ok(r) if r.status == 409 => {
                failures += 1;
                println!(
                    "Failed: another restart is already scheduled on member {}",
                    member.name
                )
            }
            Ok(r) => {
                failures += 1;
                println!(
                    "Failed: restart for member {}, status code={}, ({})",
                    member.name, r.status, r.body
                )
            }
            Err(e) => {
                failures += 1;
                println!("Failed: restart for member {}: {e:#}", member.name)
            }
        }
    }
    if !restarted.is_empty() {
        failures += wait_running(&dcs, &restarted, Duration::from_secs(60)).await;
    }
    finish(failures, "restart")
}

/// After immediate restarts: waits until etcd shows each member running again (replicas also
/// streaming); reports the ones that are not. Returns how many are not.
async fn wait_running(dcs: &impl Dcs, names: &[String], limit: Duration) -> usize {
    let started = Instant::now();
    let mut pending: Vec<String> = names.to_vec();
    let mut seen: Vec<String> = Vec::new();
    while started.elapsed() < limit {
        if let Ok(view) = dcs.get_cluster().await {
            seen.clear();
            pending.retain(|name| {
                let Some(m) = view.member(name) else {
                    seen.push(format!("{name}: no member key"));
                    return true;
                };
                let is_leader = view.leader_name() == Some(name.as_str());
                let ok = m.data.state == "running"
                    && (is_leader || m.data.replication_state.as_deref() == Some("streaming"));
                if !ok {
                    seen.push(format!(
                        "{name}: {}{}",
                        m.data.state,
                        m.data
                            .replication_state
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ));
                }
                !ok
            });
            if pending.is_empty() {
                println!("{} all restarted members are running again", timestamp());
                return 0;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "Warning: not running again after {}s according to etcd: {}",
        limit.as_secs(),
        if seen.is_empty() {
            pending.join(", ")
        } else {
            seen.join(", ")
        }
    );
    pending.len()
}

pub async fn reload(ctx: &Ctx, args: ReloadArgs) -> anyhow::Result<()> {
    let dcs = ctx.dcs(&args.cluster).await?;
    let view = read(&dcs).await?;
    let members = select_members(
        &view,
        &args.cluster,
        &args.members,
        args.role,
        args.force,
        "reload",
        true,
    )?;
    let loop_wait = dynamic(&view).loop_wait;
    let mut failures = 0;
    for member in members {
        match ctx
            .rest
            .call(member, "POST", Some("reload"), None, Duration::from_secs(30))
            .await
        {
            Ok(r) if r.status == 200 => println!("No changes to apply on member {}", member.name),
            Ok(r) if r.status == 202 => println!(
                "Reload request received for member {} and will be processed within {loop_wait} seconds",
                member.name
            ),
            Ok(r) => {
                failures += 1;
                println!(
                    "Failed: reload for member {}, status code={}, ({})",
                    member.name, r.status, r.body
                )
            }
            Err(e) => {
                failures += 1;
                println!("Failed: reload for member {}: {e:#}", member.name)
            }
        }
    }
    finish(failures, "reload")
}

pub async fn reinit(ctx: &Ctx, args: ReinitArgs) -> anyhow::Result<()> {
    let dcs = ctx.dcs(&args.cluster).await?;
    let view = read(&dcs).await?;
    let members = select_members(
        &view,
        &args.cluster,
        &args.members,
        RoleFilter::Replica,
        args.force,
        "reinitialize",
        true,
    )?;
    let mut failures = 0;
    let mut waiting: Vec<(&Member, Option<Value>)> = Vec::new();
    for member in members {
        let before = ctx.rest.status(member).await.ok();
        let mut force = args.force;
        loop {
            let body = serde_json::json!({"force": force, "from_leader": args.from_leader});
            let reply = match ctx
                .rest
                .call(
                    member,
                    "POST",
                    Some("reinitialize"),
                    Some(&body),
                    Duration::from_secs(60),
                )
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    println!("Failed: reinitialize for member {}: {e:#}", member.name);
                    failures += 1;
                    break;
                }
            };
            let started = report(&reply, &member.name, "reinitialize", false);
            if !started
                && reply.body.ends_with(" already in progress")
                && !force
                && confirm("Do you want to cancel it and reinitialize anyway?")?
            {
                force = true;
                continue;
            }
            if started {
                if args.wait {
                    waiting.push((member, before));
                }
            } else {
                failures += 1;
            }
            break;
        }
    }
    if !waiting.is_empty() {
        failures += wait_reinit(ctx, waiting, Duration::from_secs(args.wait_timeout)).await;
    }
    finish(failures, "reinitialize")
}

/// What a reinitializing member looks like now.
#[derive(Debug, PartialEq, Eq)]
pub enum ReinitProgress {
    Busy,
    Done,
    Failed(String),
}

/// Done = running again after having been seen busy (or with a new postmaster start time).
pub fn reinit_progress(before: Option<&Value>, now: &Value, seen_busy: bool) -> ReinitProgress {
    let state = now.get("state").and_then(Value::as_str).unwrap_or("");
    if state.ends_with("failed") {
        return ReinitProgress::Failed(state.to_string());
    }
    let start = |v: Option<&Value>| v.and_then(|v| v.get("postmaster_start_time")).cloned();
    let restarted = start(Some(now)).is_some() && start(Some(now)) != start(before);
    if state == "running" && (seen_busy || restarted) {
        ReinitProgress::Done
    } else {
        ReinitProgress::Busy
    }
}

async fn wait_reinit(ctx: &Ctx, mut waiting: Vec<(&Member, Option<Value>)>, timeout: Duration) -> usize {
    let started = Instant::now();
    let mut busy_seen = vec![false; waiting.len()];
    let mut failures = 0;
    let mut shown: Vec<String> = Vec::new();
    let mut last_state: Vec<String> = vec![String::new(); waiting.len()];
    while !waiting.is_empty() {
        let names: Vec<String> = waiting.iter().map(|(m, _)| m.name.clone()).collect();
        if names != shown {
            println!("Waiting for reinitialize to complete on: {}", names.join(", "));
            shown = names;
        }
        if started.elapsed() > timeout {
            for ((m, _), state) in waiting.iter().zip(&last_state) {
                println!(
                    "Reinitialize of {} not finished after {}s (last state: {})",
                    m.name,
                    timeout.as_secs(),
                    if state.is_empty() { "no answer" } else { state }
                );
            }
            return failures + waiting.len();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut i = 0;
        while i < waiting.len() {
            let (member, before) = &waiting[i];
            let Ok(now) = ctx.rest.status(member).await else {
                busy_seen[i] = true;
                i += 1;
                continue;
            };
            let state = now.get("state").and_then(Value::as_str).unwrap_or("").to_string();
            if state != "running" {
                busy_seen[i] = true;
            }
            last_state[i] = state;
            match reinit_progress(before.as_ref(), &now, busy_seen[i]) {
                ReinitProgress::Busy => i += 1,
                ReinitProgress::Done => {
                    println!("Reinitialize is completed on: {}", member.name);
                    waiting.remove(i);
                    busy_seen.remove(i);
                    last_state.remove(i);
                }
                ReinitProgress::Failed(state) => {
                    println!("Reinitialize failed on: {} (state: {state})", member.name);
                    failures += 1;
                    waiting.remove(i);
                    busy_seen.remove(i);
                    last_state.remove(i);
                }
            }
        }
    }
    failures
}

pub async fn flush(ctx: &Ctx, args: FlushArgs) -> anyhow::Result<()> {
    let (cluster, names, target) = split_flush_args(&args.args)?;
    let dcs = ctx.dcs(&cluster).await?;
    let view = read(&dcs).await?;
    if target == "restart" {
        let mut failures = 0;
        for member in select_members(&view, &cluster, &names, args.role, args.force, "flush", true)? {
            if member.data.scheduled_restart.is_some() {
                match ctx
                    .rest
                    .call(member, "DELETE", Some("restart"), None, Duration::from_secs(130))
                    .await
                {
                    Ok(r) => {
                        if !report(&r, &member.name, "flush scheduled restart", false) {
                            failures += 1;
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        println!(
                            "Failed: flush scheduled restart for member {}: {e:#}",
                            member.name
                        )
                    }
                }
            } else {
                println!("No scheduled restart for member {}", member.name);
            }
        }
        return finish(failures, "flush");
    }
    let Some(failover) = view
        .failover
        .as_ref()
        .filter(|f| f.value.scheduled_at.as_deref().is_some_and(|s| !s.is_empty()))
    else {
        println!("No pending scheduled switchover");
        return Ok(());
    };
    for member in members_leader_first(&view) {
        match ctx
            .rest
            .call(
                member,
                "DELETE",
                Some("switchover"),
                None,
                Duration::from_secs(30),
            )
            .await
        {
            Ok(r) if r.status == 200 => {
                println!("Success: {}", r.body);
                return Ok(());
            }
            Ok(r) if r.status == 404 => {
                println!("Failed: {}", r.body);
                bail!("no scheduled switchover was deleted");
            }
            Ok(r) => println!(
                "Failed: member={}, status_code={}, ({})",
                member.name, r.status, r.body
            ),
            Err(e) => eprintln!("Member {} is not accessible: {e:#}", member.name),
        }
    }
    println!(
        "{} Could not find any accessible member of cluster {cluster}",
        timestamp()
    );
    if dcs
        .set_failover(&FailoverValue::default(), Some(failover.mod_revision))
        .await?
    {
        println!("Success: scheduled switchover deleted (written to etcd directly)");
        Ok(())
    } else {
        bail!("the failover key changed meanwhile; nothing was deleted")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flush_arguments() {
        let s = |v: &[&str]| split_flush_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            s(&["c", "restart"]).unwrap(),
            ("c".into(), vec![], "restart".into())
        );
        assert_eq!(
            s(&["c", "n1", "n2", "switchover"]).unwrap(),
            ("c".into(), vec!["n1".into(), "n2".into()], "switchover".into())
        );
        assert!(
            s(&["c", "n1"])
                .unwrap_err()
                .to_string()
                .contains("'n1' is not one of")
        );
        assert!(s(&["c"]).is_err());
    }

    #[test]
    fn restart_bodies() {
        assert_eq!(restart_body(None, false, None, None), json!({}));
        assert_eq!(
            restart_body(Some("2030-01-01T00:00:00+00:00"), true, Some("17.1"), Some("30")),
            json!({"restart_pending": true, "postgres_version": "17.1", "schedule": "2030-01-01T00:00:00+00:00", "timeout": "30"})
        );
        assert_eq!(restart_wait(None, 300), Duration::from_secs(360));
        assert_eq!(restart_wait(Some("2min"), 300), Duration::from_secs(180));
        assert_eq!(restart_wait(Some("5"), 300), Duration::from_secs(120));
    }

    #[test]
    fn reinit_completion() {
        let before = json!({"state": "running", "postmaster_start_time": "a"});
        assert_eq!(
            reinit_progress(Some(&before), &before, false),
            ReinitProgress::Busy
        );
        assert_eq!(
            reinit_progress(Some(&before), &json!({"state": "creating replica"}), true),
            ReinitProgress::Busy
        );
        assert_eq!(
            reinit_progress(
                Some(&before),
                &json!({"state": "running", "postmaster_start_time": "b"}),
                false
            ),
            ReinitProgress::Done
        );
        assert_eq!(
            reinit_progress(Some(&before), &before, true),
            ReinitProgress::Done
        );
        assert_eq!(
            reinit_progress(None, &json!({"state": "start failed"}), true),
            ReinitProgress::Failed("start failed".into())
        );
    }
}
