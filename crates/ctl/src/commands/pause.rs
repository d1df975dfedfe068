//! `pause` and `resume`: `PATCH /config` on the leader (then the others until one answers);
//! `--wait` follows the members' keys until every member reports the new state.

use std::time::{Duration, Instant};

use anyhow::bail;
use pgvigil_api::ClusterView;
use pgvigil_dcs::Dcs;
use serde_json::{Value, json};

use super::{Ctx, dynamic, members_leader_first, read};

#[derive(clap::Args, Clone, Debug)]
pub struct PauseArgs {
    /// Cluster name (default: the configured scope).
    pub cluster: Option<String>,
    /// Wait until the change is applied on all nodes.
    #[arg(long)]
    pub wait: bool,
}

fn word(paused: bool) -> &'static str {
    if paused { "paused" } else { "resumed" }
}

fn verb(paused: bool) -> &'static str {
    if paused { "pause" } else { "resume" }
}

/// Members (by name, among `names`) whose key does not show `pause == paused` yet.
pub fn not_yet(view: &ClusterView, names: &[String], paused: bool) -> Vec<String> {
    view.members
        .iter()
        .filter(|m| names.contains(&m.name) && m.data.pause.unwrap_or(false) != paused)
        .map(|m| m.name.clone())
        .collect()
}

pub async fn toggle(ctx: &Ctx, args: PauseArgs, paused: bool) -> anyhow::Result<()> {
    let scope = ctx.scope(args.cluster.as_deref())?;
    let dcs = ctx.dcs(&scope).await?;
    let view = read(&dcs).await?;
    if dynamic(&view).pause == paused {
        bail!("Cluster is {} paused", if paused { "already" } else { "not" });
    }
    let patch = json!({"pause": if paused { Value::Bool(true) } else { Value::Null }});
    for member in members_leader_first(&view) {
        let reply = match ctx
            .rest
            .call(
                member,
                "PATCH",
                Some("config"),
                Some(&patch),
                Duration::from_secs(30),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("Member {} is not accessible: {e:#}", member.name);
                continue;
            }
        };
        if reply.status != 200 {
            println!(
                "Failed: {} cluster management status code={}, ({})",
                verb(paused),
                reply.status,
                reply.body
            );
            bail!("{} refused by {}", verb(paused), member.name);
        }
        if !args.wait {
            println!("Success: cluster management is {}", word(paused));
            return Ok(());
        }
        return wait_applied(&dcs, &view, paused).await;
    }
    bail!("Can not find accessible cluster member")
}

async fn wait_applied(dcs: &impl Dcs, old: &ClusterView, paused: bool) -> anyhow::Result<()> {
    println!(
        "'{}' request sent, waiting until it is recognized by all nodes",
        verb(paused)
    );
    let names: Vec<String> = old
        .members
        .iter()
        .filter(|m| !m.data.api_url.is_empty())
        .map(|m| m.name.clone())
        .collect();
    let loop_wait = dynamic(old).loop_wait;
    // Every agent rewrites its key within one cycle; allow a few, at least 30 s.
    let limit = Duration::from_secs((3 * loop_wait + 5).max(30));
    let started = Instant::now();
    let mut remaining = names.clone();
    loop {
        if let Ok(view) = dcs.get_cluster().await {
            remaining = not_yet(&view, &names, paused);
            if remaining.is_empty() {
                println!("Success: cluster management is {}", word(paused));
                return Ok(());
            }
        }
        if started.elapsed() >= limit {
            println!(
                "{} members didn't recognized pause state after {} seconds",
                remaining.join(", "),
                limit.as_secs()
            );
            bail!("not every member reports the {} state", word(paused));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::view;

    #[test]
    fn pending_members() {
        let mut v = view();
        let names: Vec<String> = vec!["node1".into(), "node2".into()];
        assert_eq!(not_yet(&v, &names, true), ["node1", "node2"]);
        assert!(not_yet(&v, &names, false).is_empty());
        v.members[0].data.pause = Some(true);
        assert_eq!(not_yet(&v, &names, true), ["node2"]);
        assert_eq!(not_yet(&v, &names, false), ["node1"]);
    }
}
