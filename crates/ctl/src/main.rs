//! `pgvigilctl`: patronictl's commands for pgvigil and Patroni clusters.

mod commands;
mod haproxy;
mod list;
mod table;
mod yaml;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use pgvigil_api::ClusterView;
use pgvigil_dcs::{Dcs, Etcd3Dcs, EtcdOptions};

use crate::list::Format;

#[derive(Parser, Debug)]
#[command(
    name = "pgvigilctl",
    version,
    about = "Operate pgvigil (and Patroni) clusters; patronictl-compatible"
)]
struct Cli {
    /// Configuration file (the agent's own file works; only scope, namespace, etcd3, ctl and
    /// restapi authentication are read).
    #[arg(
        short = 'c',
        long = "config-file",
        env = "PATRONICTL_CONFIG_FILE",
        global = true
    )]
    config_file: Option<PathBuf>,
    /// etcd to use instead of the file's, as etcd3://host:port[/namespace].
    #[arg(short = 'd', long = "dcs-url", alias = "dcs", env = "DCS_URL", global = true)]
    dcs_url: Option<String>,
    /// Accepted for patronictl compatibility (TLS is not supported yet).
    #[arg(short = 'k', long = "insecure", global = true)]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the members of the cluster.
    List(ListArgs),
    /// Like list, with replicas indented under their upstream.
    Topology(ListArgs),
    /// Show the timeline history.
    History {
        cluster: Option<String>,
        #[arg(short = 'f', long = "format", value_enum, default_value = "pretty")]
        format: Format,
    },
    /// Show the dynamic configuration stored in etcd.
    ShowConfig { cluster: Option<String> },
    /// Print pgvigilctl's version, and the members' Patroni/PostgreSQL versions of CLUSTER.
    Version(commands::misc::VersionArgs),
    /// Switchover to a replica.
    Switchover(commands::switchover::SwitchoverArgs),
    /// Failover to a replica.
    Failover(commands::switchover::FailoverArgs),
    /// Restart cluster members.
    Restart(commands::members::RestartArgs),
    /// Reload cluster members' configuration.
    Reload(commands::members::ReloadArgs),
    /// Reinitialize cluster members (replicas).
    Reinit(commands::members::ReinitArgs),
    /// Disable automatic failover (maintenance mode).
    Pause(commands::pause::PauseArgs),
    /// Resume automatic failover.
    Resume(commands::pause::PauseArgs),
    /// Edit the cluster configuration.
    EditConfig(commands::edit_config::EditConfigArgs),
    /// Discard scheduled events: flush CLUSTER [MEMBER...] restart|switchover.
    Flush(commands::members::FlushArgs),
    /// Print a connection string for a member (default: the leader).
    Dsn(commands::misc::DsnArgs),
    /// Remove the cluster from the DCS.
    Remove(commands::misc::RemoveArgs),
    /// Restart every member, replicas first, then switch over and restart the former leader.
    RollingRestart(commands::rolling::RollingRestartArgs),
    /// Print a haproxy.cfg for the cluster: 5000 to the primary, 5001 to the replicas.
    HaproxyConfig(haproxy::HaproxyArgs),
}

#[derive(clap::Args, Debug)]
struct ListArgs {
    /// Cluster names (default: the configured scope).
    clusters: Vec<String>,
    /// Show pending restarts, scheduled restarts and tags even when empty.
    #[arg(short = 'e', long)]
    extended: bool,
    /// Print a timestamp before the table.
    #[arg(short = 't', long = "timestamp")]
    timestamp: bool,
    #[arg(short = 'f', long = "format", value_enum, default_value = "pretty")]
    format: Format,
    /// Refresh every 2 seconds (like -w 2).
    #[arg(short = 'W', conflicts_with = "watch")]
    watch_default: bool,
    /// Refresh every N seconds.
    #[arg(short = 'w', long = "watch")]
    watch: Option<f64>,
}

struct Target {
    namespace: String,
    scope: Option<String>,
    endpoints: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    /// `etcd3.protocol: https`: the checked TLS files.
    tls: Option<pgvigil_dcs::EtcdTls>,
}

fn default_config_path() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".config/patroni/patronictl.yaml");
    path.exists().then_some(path)
}

fn target(cli: &Cli) -> anyhow::Result<Target> {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("PATRONI_"))
        .collect();
    let mut t = Target {
        namespace: "/service".into(),
        scope: None,
        endpoints: Vec::new(),
        username: None,
        password: None,
        tls: None,
    };
    if let Some(path) = cli.config_file.clone().or_else(default_config_path) {
        let (client, warnings) =
            pgvigil_config::load_client(&path, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        t.namespace = client.namespace;
        t.scope = client.scope;
        let e = &client.etcd3;
        t.endpoints = e.hosts.clone();
        t.tls = pgvigil_dcs::EtcdTls::for_protocol(
            &e.protocol,
            e.cacert.as_deref(),
            e.cert.as_deref(),
            e.key.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        t.username = client.etcd3.username;
        t.password = client.etcd3.password;
    }
    if let Some(url) = &cli.dcs_url {
        let rest = url
            .strip_prefix("etcd3://")
            .with_context(|| format!("--dcs-url {url:?}: only etcd3://host:port[/namespace] is supported"))?;
        let (hosts, namespace) = rest.split_once('/').map_or((rest, None), |(h, n)| (h, Some(n)));
        if hosts.is_empty() {
            bail!("--dcs-url {url:?}: no host given");
        }
        t.endpoints = hosts.split(',').map(str::to_string).collect();
        if let Some(ns) = namespace.filter(|n| !n.is_empty()) {
            t.namespace = format!("/{ns}");
        }
    }
    if t.endpoints.is_empty() {
        bail!("no etcd to talk to: give -c CONFIG (with an etcd3 section) or -d etcd3://host:port");
    }
    Ok(t)
}

async fn read_cluster(t: &Target, scope: &str) -> anyhow::Result<ClusterView> {
    let dcs = Etcd3Dcs::connect(EtcdOptions {
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
    .with_context(|| format!("cannot connect to etcd at {}", t.endpoints.join(",")))?;
    dcs.get_cluster()
        .await
        .with_context(|| format!("cannot read cluster {scope} from etcd"))
}

fn scopes(t: &Target, given: &[String]) -> anyhow::Result<Vec<String>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    match &t.scope {
        Some(s) => Ok(vec![s.clone()]),
        None => bail!("no cluster name given and the configuration has no scope"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Version(args) => {
            let ctx = match args.cluster {
                Some(_) => Some(commands::Ctx::load(&cli)?),
                None => None,
            };
            commands::misc::version(ctx.as_ref(), args).await
        }
        Command::Switchover(_)
        | Command::Failover(_)
        | Command::Restart(_)
        | Command::Reload(_)
        | Command::Reinit(_)
        | Command::Pause(_)
        | Command::Resume(_)
        | Command::EditConfig(_)
        | Command::Flush(_)
        | Command::Dsn(_)
        | Command::Remove(_)
        | Command::RollingRestart(_) => {
            let ctx = commands::Ctx::load(&cli)?;
            commands::run(&ctx, &cli.command).await
        }
        Command::HaproxyConfig(args) => haproxy::run(&cli, args).await,
        Command::List(args) | Command::Topology(args) => {
            let t = target(&cli)?;
            let format = if matches!(cli.command, Command::Topology(_)) {
                Format::Topology
            } else {
                args.format
            };
            let every = args.watch.or(args.watch_default.then_some(2.0));
            loop {
                if args.timestamp {
                    println!("{}", chrono::Local::now().format("%Y-%m-%d %H:%M:%S"));
                }
                for scope in scopes(&t, &args.clusters)? {
                    let view = read_cluster(&t, &scope).await?;
                    println!("{}", list::render(&scope, &view, format, args.extended));
                }
                let Some(secs) = every else { return Ok(()) };
                if !(secs.is_finite() && secs > 0.0) {
                    bail!("-w must be a positive number of seconds");
                }
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
        }
        Command::History { cluster, format } => {
            let t = target(&cli)?;
            let scope = scopes(&t, cluster.as_slice())?.remove(0);
            let view = read_cluster(&t, &scope).await?;
            let rows: Vec<Vec<String>> = view
                .history_entries()
                .iter()
                .map(|h| {
                    vec![
                        h.parent_timeline.to_string(),
                        h.switch_lsn.to_string(),
                        h.reason.clone(),
                        h.timestamp.clone().unwrap_or_default(),
                        h.new_leader.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            let columns = ["TL", "LSN", "Reason", "Timestamp", "New Leader"];
            match format {
                Format::Json | Format::Yaml => {
                    let objects: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|r| {
                            serde_json::Value::Object(
                                columns
                                    .iter()
                                    .map(|c| c.to_string())
                                    .zip(r.iter().map(|v| serde_json::Value::from(v.as_str())))
                                    .collect(),
                            )
                        })
                        .collect();
                    let v = serde_json::Value::Array(objects);
                    if *format == Format::Json {
                        println!("{v}")
                    } else {
                        print!("{}", yaml::to_yaml(&v))
                    }
                }
                _ => {
                    let table = table::Table {
                        columns: columns.iter().map(|c| c.to_string()).collect(),
                        align: vec![
                            table::Align::Right,
                            table::Align::Right,
                            table::Align::Left,
                            table::Align::Left,
                            table::Align::Left,
                        ],
                        rows,
                    };
                    println!(
                        "{}",
                        if *format == Format::Tsv {
                            table.tsv()
                        } else {
                            table.pretty("")
                        }
                    );
                }
            }
            Ok(())
        }
        Command::ShowConfig { cluster } => {
            let t = target(&cli)?;
            let scope = scopes(&t, cluster.as_slice())?.remove(0);
            let view = read_cluster(&t, &scope).await?;
            let config = view
                .config
                .map(|c| c.value)
                .unwrap_or_else(|| serde_json::json!({}));
            print!("{}", yaml::to_yaml(&config));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    pgvigil_tls::install_default_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgvigilctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
