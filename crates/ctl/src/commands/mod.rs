//! The operator commands of `pgvigilctl` (patronictl's verbs that change something), plus
//! `rolling-restart`. Shared here: the connection to etcd and to the members' REST APIs,
//! confirmation prompts, member selection by name and role, and timestamps.
//!
//! Prompts read standard input like patronictl's; `--force` skips them. When standard input
//! has no answer (closed, `/dev/null`, end of a pipe) a command refuses instead of guessing.

pub mod edit_config;
mod interaction;
pub mod members;
pub mod misc;
pub mod pause;
pub mod rolling;
pub mod switchover;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, FixedOffset, Local, TimeZone};
use pgvigil_api::{ClusterView, Member};
use pgvigil_dcs::{Dcs, Etcd3Dcs, EtcdOptions};
use pgvigil_rest::operator::{Stamp, parse_timestamp};
use pgvigil_rest::peer::base_url;
use serde_json::Value;

pub use interaction::*;

use crate::list::Format;
use crate::{Cli, Command, Target};

/// Runs one of the operator commands.
pub async fn run(ctx: &Ctx, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Switchover(args) => switchover::switchover(ctx, args.clone()).await,
        Command::Failover(args) => switchover::failover(ctx, args.clone()).await,
        Command::Restart(args) => members::restart(ctx, args.clone()).await,
        Command::Reload(args) => members::reload(ctx, args.clone()).await,
        Command::Reinit(args) => members::reinit(ctx, args.clone()).await,
        Command::Pause(args) => pause::toggle(ctx, args.clone(), true).await,
        Command::Resume(args) => pause::toggle(ctx, args.clone(), false).await,
        Command::EditConfig(args) => edit_config::run(ctx, args.clone()).await,
        Command::Flush(args) => members::flush(ctx, args.clone()).await,
        Command::Dsn(args) => misc::dsn(ctx, args.clone()).await,
        Command::Remove(args) => misc::remove(ctx, args.clone()).await,
        Command::RollingRestart(args) => rolling::run(ctx, args.clone()).await,
        other => anyhow::bail!("not an operator command: {other:?}"),
    }
}

/// What every operator command needs: where etcd is and how to call the members.
pub struct Ctx {
    pub target: Target,
    pub rest: Rest,
}

impl Ctx {
    pub fn load(cli: &Cli) -> anyhow::Result<Ctx> {
        let target = crate::target(cli)?;
        let mut auth = None;
        let mut ctl = pgvigil_config::CtlConfig::default();
        if let Some(path) = cli.config_file.clone().or_else(crate::default_config_path) {
            let env: BTreeMap<String, String> = std::env::vars()
                .filter(|(k, _)| k.starts_with("PATRONI_"))
                .collect();
            // Warnings were printed by `target` already.
            let (client, _) = pgvigil_config::load_client(&path, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
            auth = client
                .authentication()
                .map(|c| (c.username.clone(), c.password.clone()));
            ctl = client.ctl;
        }
        let insecure = cli.insecure || ctl.insecure;
        let tls = pgvigil_rest::tls::client_config(&ctl, insecure).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Ctx {
            target,
            rest: Rest::new(auth, tls),
        })
    }

    /// The cluster name given on the command line, else the configured scope.
    pub fn scope(&self, given: Option<&str>) -> anyhow::Result<String> {
        match given {
            Some(s) => Ok(s.to_string()),
            None => Ok(crate::scopes(&self.target, &[])?.remove(0)),
        }
    }

    pub async fn dcs(&self, scope: &str) -> anyhow::Result<Etcd3Dcs> {
        let t = &self.target;
        Etcd3Dcs::connect(EtcdOptions {
            endpoints: t.endpoints.clone(),
            namespace: t.namespace.clone(),
            scope: scope.to_string(),
            member_name: "pgvigilctl".into(),
            username: t.username.clone(),
            password: t.password.clone(),
            retry_timeout: Duration::from_secs(10),
            tls: t.tls.clone(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot connect to etcd at {}", t.endpoints.join(",")))
    }
}

/// Reads the whole cluster (linearizable).
pub async fn read(dcs: &impl Dcs) -> anyhow::Result<ClusterView> {
    dcs.get_cluster()
        .await
        .with_context(|| format!("cannot read {} from etcd", dcs.keys().prefix()))
}

/// Prints the member table the way `patronictl` does before acting.
pub fn print_members(scope: &str, view: &ClusterView) {
    println!("{}", crate::list::render(scope, view, Format::Pretty, false));
}

/// One answer of a member's REST API.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// HTTP client for the members' REST APIs (`api_url` host and port, Basic auth from
/// `ctl.authentication`, else `restapi.authentication`).
pub struct Rest {
    http: reqwest::Client,
    auth: Option<(String, String)>,
}

impl Rest {
    /// `tls`: the `ctl` client side, see [`pgvigil_rest::tls::client_config`].
    pub fn new(auth: Option<(String, String)>, tls: rustls::ClientConfig) -> Self {
        let http = pgvigil_rest::tls::http_client(tls, Duration::from_secs(5));
        Rest { http, auth }
    }

    /// `method <api_url base>/<endpoint>` (or the `api_url` itself without an endpoint).
    pub async fn call(
        &self,
        member: &Member,
        method: &str,
        endpoint: Option<&str>,
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        let api_url = &member.data.api_url;
        if api_url.is_empty() {
            bail!("member {} has no api_url", member.name);
        }
        let url = match endpoint {
            Some(e) => format!("{}/{e}", base_url(api_url)),
            None => api_url.clone(),
        };
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut request = self.http.request(method.clone(), &url).timeout(timeout);
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{method} {url}: {}", error_chain(&e)))?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|e| anyhow::anyhow!("{method} {url}: reading the answer: {}", error_chain(&e)))?;
        Ok(Reply { status, body })
    }

    /// `GET <api_url>`: the member's status document.
    pub async fn status(&self, member: &Member) -> anyhow::Result<Value> {
        let reply = self
            .call(member, "GET", None, None, Duration::from_secs(5))
            .await?;
        serde_json::from_str(&reply.body).with_context(|| format!("{}: the answer is not JSON", member.name))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Python's `str(datetime)`: `2024-05-01 10:00:00+02:00`.
fn python_datetime(at: &DateTime<FixedOffset>) -> String {
    pgvigil_rest::operator::isoformat(at).replacen('T', " ", 1)
}

/// patronictl's `parse_scheduled`: `None`/`now` → immediately; a time without a zone is local.
pub fn parse_scheduled(text: Option<&str>) -> anyhow::Result<Option<DateTime<FixedOffset>>> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty() && *t != "now") else {
        return Ok(None);
    };
    let unparsable = || {
        anyhow::anyhow!(
            "Unable to parse scheduled timestamp ({text}). It should be in an unambiguous format (e.g. ISO 8601)"
        )
    };
    match parse_timestamp(text).ok_or_else(unparsable)? {
        Stamp::Aware(at) => Ok(Some(at)),
        Stamp::Naive(naive) => {
            let local = Local
                .from_local_datetime(&naive)
                .earliest()
                .ok_or_else(unparsable)?;
            Ok(Some(local.fixed_offset()))
        }
    }
}

/// An example time an hour from now, as patronictl shows in its prompt.
pub fn next_hour() -> String {
    (Local::now() + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M")
        .to_string()
}

/// patronictl's progress timestamp: `2024-05-01 10:00:00.12345`.
pub fn timestamp() -> String {
    let mut t = Local::now().format("%Y-%m-%d %H:%M:%S%.6f").to_string();
    t.pop();
    t
}

/// A member's `host` and `port` from its `conn_url`.
pub fn dsn(member: &Member) -> Option<String> {
    let (host, port) = member.data.host_port()?;
    Some(format!("host={host} port={port}"))
}

/// The dynamic configuration as the agents see it (defaults for what is missing).
pub fn dynamic(view: &ClusterView) -> pgvigil_config::DynamicConfig {
    match &view.config {
        Some(c) => pgvigil_config::DynamicConfig::from_json(&c.value).0,
        None => pgvigil_config::DynamicConfig::default(),
    }
}

/// Exit status for commands that report failures line by line and carry on.
pub fn finish(failures: usize, what: &str) -> anyhow::Result<()> {
    if failures > 0 {
        bail!("{what}: {failures} member(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgvigil_api::MemberData;
    use pgvigil_api::cluster::Leader;

    pub(crate) fn view() -> ClusterView {
        let member = |name: &str, role: &str| Member {
            name: name.into(),
            data: MemberData {
                conn_url: format!("postgres://127.0.0.1:54{}/postgres", &name[4..]),
                api_url: format!("http://127.0.0.1:80{}/patroni", &name[4..]),
                state: "running".into(),
                role: role.into(),
                ..Default::default()
            },
            lease: 1,
        };
        ClusterView {
            leader: Some(Leader {
                name: "node2".into(),
                lease: 1,
                mod_revision: 1,
            }),
            members: vec![
                member("node1", "replica"),
                member("node2", "primary"),
                member("node3", "replica"),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn schedules() {
        assert_eq!(parse_scheduled(None).unwrap(), None);
        assert_eq!(parse_scheduled(Some("now")).unwrap(), None);
        let at = parse_scheduled(Some("2030-01-02T03:04:05+02:00"))
            .unwrap()
            .unwrap();
        assert_eq!(
            pgvigil_rest::operator::isoformat(&at),
            "2030-01-02T03:04:05+02:00"
        );
        assert_eq!(python_datetime(&at), "2030-01-02 03:04:05+02:00");
        // Without a zone: local time, with the local offset.
        let local = parse_scheduled(Some("2030-01-02T03:04")).unwrap().unwrap();
        assert_eq!(local.naive_local().to_string(), "2030-01-02 03:04:00");
        let err = parse_scheduled(Some("whenever")).unwrap_err().to_string();
        assert_eq!(
            err,
            "Unable to parse scheduled timestamp (whenever). It should be in an unambiguous format (e.g. ISO 8601)"
        );
        assert_eq!(timestamp().len(), "2024-05-01 10:00:00.12345".len());
    }

    fn parse(args: &[&str]) -> Result<crate::Cli, clap::Error> {
        use clap::Parser;
        crate::Cli::try_parse_from(std::iter::once("pgvigilctl").chain(args.iter().copied()))
    }

    #[test]
    fn arguments_like_patronictl() {
        let Command::Switchover(s) = parse(&[
            "switchover",
            "c",
            "--primary",
            "a",
            "--candidate",
            "b",
            "--scheduled",
            "now",
            "--force",
        ])
        .unwrap()
        .command
        else {
            panic!("not a switchover")
        };
        assert_eq!(
            (
                s.cluster.as_deref(),
                s.leader.as_deref(),
                s.candidate.as_deref(),
                s.scheduled.as_deref(),
                s.force
            ),
            (Some("c"), Some("a"), Some("b"), Some("now"), true)
        );
        let Command::Restart(r) = parse(&[
            "restart",
            "c",
            "m1",
            "m2",
            "-r",
            "standby-leader",
            "--any",
            "--pg-version",
            "16.4",
            "--pending",
            "--timeout",
            "30",
        ])
        .unwrap()
        .command
        else {
            panic!("not a restart")
        };
        assert_eq!(r.members, ["m1", "m2"]);
        assert_eq!(r.role, RoleFilter::StandbyLeader);
        assert!(r.any && r.pending && !r.force);
        assert_eq!(
            (r.pg_version.as_deref(), r.timeout.as_deref()),
            (Some("16.4"), Some("30"))
        );
        let Command::Reload(r) = parse(&["reload", "c"]).unwrap().command else {
            panic!()
        };
        assert_eq!(r.role, RoleFilter::Any);
        let Command::Reinit(r) = parse(&["reinit", "c", "m", "--from-leader", "--wait"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(r.from_leader && r.wait && !r.force);
        let Command::Flush(f) = parse(&["flush", "c", "m", "restart", "--force"]).unwrap().command else {
            panic!()
        };
        assert_eq!(f.args, ["c", "m", "restart"]);
        let Command::EditConfig(e) = parse(&[
            "edit-config",
            "-s",
            "a=1",
            "-s",
            "b.c=x",
            "-p",
            "work_mem=4MB",
            "-q",
            "--apply",
            "-",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(
            (e.set.len(), e.pg.len(), e.quiet, e.apply.as_deref()),
            (2, 1, true, Some("-"))
        );
        let Command::Pause(p) = parse(&["pause", "--wait"]).unwrap().command else {
            panic!()
        };
        assert!(p.wait && p.cluster.is_none());
        let Command::Dsn(d) = parse(&["dsn", "c", "-r", "replica"]).unwrap().command else {
            panic!()
        };
        assert_eq!(d.role, Some(RoleFilter::Replica));
        let Command::Version(v) = parse(&["version", "c", "m1"]).unwrap().command else {
            panic!()
        };
        assert_eq!((v.cluster.as_deref(), v.members.len()), (Some("c"), 1));
        assert!(matches!(
            parse(&["version"]).unwrap().command,
            Command::Version(_)
        ));
        assert!(matches!(
            parse(&["rolling-restart", "--timeout", "60"]).unwrap().command,
            Command::RollingRestart(_)
        ));
        assert!(matches!(
            parse(&["remove", "c", "-f", "json"]).unwrap().command,
            Command::Remove(_)
        ));
        // Required arguments and choices are enforced by the parser.
        assert!(parse(&["restart"]).is_err());
        assert!(parse(&["restart", "c", "--role", "boss"]).is_err());
        assert!(parse(&["flush", "c"]).is_err());
        assert!(parse(&["remove"]).is_err());
    }

    #[test]
    fn dsn_from_conn_url() {
        let v = view();
        assert_eq!(dsn(&v.members[0]).unwrap(), "host=127.0.0.1 port=541");
    }
}
