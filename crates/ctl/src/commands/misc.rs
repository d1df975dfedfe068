//! `dsn`, `remove` and `version [CLUSTER [MEMBER...]]`.

use anyhow::bail;
use pgvigil_api::{ClusterView, Member};
use pgvigil_dcs::Dcs;
use serde_json::Value;

use super::{Ctx, RoleFilter, members_with_role, prompt, read};
use crate::list::Format;

#[derive(clap::Args, Clone, Debug)]
pub struct DsnArgs {
    /// Cluster name (default: the configured scope).
    pub cluster: Option<String>,
    /// Give a dsn of any member with this role.
    #[arg(short = 'r', long, value_enum)]
    pub role: Option<RoleFilter>,
    /// Generate a dsn for this member.
    #[arg(short = 'm', long)]
    pub member: Option<String>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RemoveArgs {
    pub cluster: String,
    #[arg(short = 'f', long = "format", value_enum, default_value = "pretty")]
    pub format: Format,
}

#[derive(clap::Args, Clone, Debug)]
pub struct VersionArgs {
    /// Also show the versions of this cluster's members.
    pub cluster: Option<String>,
    /// Only these members.
    pub members: Vec<String>,
}

/// patronictl's `get_any_member`: by name, else the first with the role (leader by default).
pub fn any_member<'a>(
    view: &'a ClusterView,
    role: Option<RoleFilter>,
    member: Option<&str>,
) -> anyhow::Result<Option<&'a Member>> {
    let role = match (member, role) {
        (Some(_), Some(_)) => bail!("--role and --member are mutually exclusive options"),
        (Some(_), None) => RoleFilter::Any,
        (None, r) => r.unwrap_or(RoleFilter::Leader),
    };
    Ok(members_with_role(view, role)
        .into_iter()
        .find(|m| member.is_none_or(|name| m.name == name)))
}

pub async fn dsn(ctx: &Ctx, args: DsnArgs) -> anyhow::Result<()> {
    let scope = ctx.scope(args.cluster.as_deref())?;
    let view = read(&ctx.dcs(&scope).await?).await?;
    let member = any_member(&view, args.role, args.member.as_deref())?;
    match member.and_then(super::dsn) {
        Some(dsn) => {
            println!("{dsn}");
            Ok(())
        }
        None => bail!("Can not find a suitable member"),
    }
}

pub async fn remove(ctx: &Ctx, args: RemoveArgs) -> anyhow::Result<()> {
    let scope = args.cluster;
    let dcs = ctx.dcs(&scope).await?;
    let view = read(&dcs).await?;
    println!("{}", crate::list::render(&scope, &view, args.format, false));
    if prompt("Please confirm the cluster name to remove", None)? != scope {
        bail!("Cluster names specified do not match");
    }
    let message = "Yes I am aware";
    let typed = prompt(
        &format!("You are about to remove all information in DCS for {scope}, please type: \"{message}\""),
        None,
    )?;
    if typed != message {
        bail!("You did not exactly type \"{message}\"");
    }
    if let Some(leader) = view.leader_name() {
        let typed = prompt(
            "This cluster currently is healthy. Please specify the leader name to continue",
            None,
        )?;
        if typed != leader {
            bail!("You did not specify the current leader of the cluster");
        }
    }
    dcs.delete_cluster().await?;
    println!("Cluster {scope} removed from the DCS ({})", dcs.keys().prefix());
    Ok(())
}

/// patronictl's `format_pg_version`: `90624` → `9.6.24`, `140008` → `14.8`.
pub fn format_pg_version(version: u64) -> String {
    if version < 100_000 {
        format!("{}.{}.{}", version / 10000, version / 100 % 100, version % 100)
    } else {
        format!("{}.{}", version / 10000, version % 100)
    }
}

/// One line of `version CLUSTER`: `node1: Patroni 4.1.5 PostgreSQL 16.4`.
pub fn version_line(name: &str, status: &Value) -> String {
    let version = status
        .get("patroni")
        .and_then(|p| p.get("version"))
        .map_or("None".to_string(), |v| {
            v.as_str().map_or(v.to_string(), str::to_string)
        });
    let pg = status
        .get("server_version")
        .and_then(Value::as_u64)
        .filter(|v| *v > 0)
        .map(|v| format!(" PostgreSQL {}", format_pg_version(v)))
        .unwrap_or_default();
    format!("{name}: Patroni {version}{pg}")
}

pub async fn version(ctx: Option<&Ctx>, args: &VersionArgs) -> anyhow::Result<()> {
    println!("pgvigilctl version {}", env!("CARGO_PKG_VERSION"));
    let (Some(ctx), Some(scope)) = (ctx, args.cluster.clone()) else {
        return Ok(());
    };
    println!();
    let view = read(&ctx.dcs(&scope).await?).await?;
    for m in members_with_role(&view, RoleFilter::Any) {
        if m.data.api_url.is_empty() || !(args.members.is_empty() || args.members.contains(&m.name)) {
            continue;
        }
        match ctx.rest.status(m).await {
            Ok(status) => println!("{}", version_line(&m.name, &status)),
            Err(e) => println!("{}: failed to get version: {e:#}", m.name),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::view;
    use serde_json::json;

    #[test]
    fn pg_versions() {
        assert_eq!(format_pg_version(90624), "9.6.24");
        assert_eq!(format_pg_version(100000), "10.0");
        assert_eq!(format_pg_version(140008), "14.8");
        assert_eq!(
            version_line(
                "n1",
                &json!({"patroni": {"version": "4.1.5"}, "server_version": 160004})
            ),
            "n1: Patroni 4.1.5 PostgreSQL 16.4"
        );
        assert_eq!(
            version_line("n1", &json!({"patroni": {"version": "4.1.5"}})),
            "n1: Patroni 4.1.5"
        );
    }

    #[test]
    fn member_choice() {
        let v = view();
        assert_eq!(any_member(&v, None, None).unwrap().unwrap().name, "node2");
        assert_eq!(
            any_member(&v, Some(RoleFilter::Replica), None)
                .unwrap()
                .unwrap()
                .name,
            "node1"
        );
        assert_eq!(
            any_member(&v, None, Some("node3")).unwrap().unwrap().name,
            "node3"
        );
        assert!(any_member(&v, None, Some("node9")).unwrap().is_none());
        assert_eq!(
            any_member(&v, Some(RoleFilter::Any), Some("node3"))
                .unwrap_err()
                .to_string(),
            "--role and --member are mutually exclusive options"
        );
    }
}
