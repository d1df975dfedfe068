//! Building the agent's parts from the configuration and starting its tasks: etcd client, lease
//! guardian, postmaster watcher, REST server, signal handlers, HA loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgvigil_config::{Config, LogConfig};
use pgvigil_dcs::{Dcs, Etcd3Dcs, EtcdOptions};
use pgvigil_postgres::{PgSettings, PgUser, Postgres};
use pgvigil_rest::{AccessControl, NodeSnapshot, PeerClient, RestContext};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::runtime::lease::{self, LeaseShared};
use crate::runtime::{Agent, Exit, Wakeups};

pub fn init_logging(log: &LogConfig) {
    let level = match log.level.to_ascii_uppercase().as_str() {
        "DEBUG" => "debug",
        "WARNING" | "WARN" => "warn",
        "ERROR" | "CRITICAL" => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGVIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only on a terminal: agent logs usually go to files and journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if log.type_ == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `host:port` → the port, for PostgreSQL's `listen`.
fn split_listen(listen: &str) -> anyhow::Result<(String, u16)> {
    let (hosts, port) = listen
        .rsplit_once(':')
        .with_context(|| format!("postgresql.listen {listen:?} must be host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("postgresql.listen {listen:?}: bad port"))?;
    let first = hosts.split(',').next().unwrap_or("").trim();
    let host = match first {
        "" | "*" | "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        h => h,
    };
    Ok((host.trim_matches(|c| c == '[' || c == ']').to_string(), port))
}

fn pg_settings(cfg: &Config, local_tls: pgvigil_postgres::LocalTls) -> anyhow::Result<PgSettings> {
    let (listen_host, port) = split_listen(&cfg.postgresql.listen)?;
    let bin_dir = match &cfg.postgresql.bin_dir {
        Some(dir) => dir.clone(),
        None => pgvigil_postgres::find_bin_dir()
            .context("PostgreSQL binaries not found: set postgresql.bin_dir")?,
    };
    let auth = &cfg.postgresql.authentication;
    let user = |c: &pgvigil_config::PgCredentials| {
        PgUser::new(c.username.clone(), c.password.as_deref()).with_options(crate::secure::options(c))
    };
    let superuser = user(&auth.superuser);
    Ok(PgSettings {
        data_dir: cfg.postgresql.data_dir.clone(),
        config_dir: cfg
            .postgresql
            .config_dir
            .clone()
            .unwrap_or_else(|| cfg.postgresql.data_dir.clone()),
        bin_dir,
        listen_host,
        unix_socket_dir: crate::secure::unix_socket_dir(cfg),
        local_tls,
        port,
        database: cfg.postgresql.database.clone(),
        replication: user(&auth.replication),
        rewind: auth.rewind.as_ref().map_or_else(|| superuser.clone(), user),
        superuser,
        pgpass: cfg.postgresql.pgpass.clone(),
        pg_ctl_timeout: Duration::from_secs(cfg.postgresql.pg_ctl_timeout),
        name: cfg.name.clone(),
    })
}

/// Connects to etcd, retrying every few seconds like Patroni until it answers or we are told
/// to stop.
async fn connect_dcs(
    cfg: &Config,
    tls: Option<pgvigil_dcs::EtcdTls>,
    retry_timeout: Duration,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<dyn Dcs>> {
    let options = EtcdOptions {
        endpoints: cfg.etcd3.hosts.clone(),
        namespace: cfg.namespace.clone(),
        scope: cfg.scope.clone(),
        member_name: cfg.name.clone(),
        username: cfg.etcd3.username.clone(),
        password: cfg.etcd3.password.clone(),
        retry_timeout,
        tls,
    };
    loop {
        match Etcd3Dcs::connect(options.clone()).await {
            Ok(dcs) => return Ok(Arc::new(dcs)),
            Err(e) => tracing::warn!("etcd is not reachable yet ({e}); retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => anyhow::bail!("stopped while waiting for etcd"),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Refuses to start when another live agent already uses our name (§2.7).
async fn duplicate_name_guard(cfg: &Config, dcs: &dyn Dcs, peers: &PeerClient) -> anyhow::Result<()> {
    let Ok(cluster) = dcs.get_cluster().await else {
        return Ok(());
    };
    let Some(member) = cluster.member(&cfg.name) else {
        return Ok(());
    };
    let ours = cfg.restapi.api_url();
    if member.data.api_url.is_empty() {
        return Ok(());
    }
    if peers
        .liveness(&member.data.api_url, Duration::from_secs(3))
        .await
        .is_some()
    {
        anyhow::bail!(
            "Can't start; there is already a node named '{}' running (its REST API at {} answers; ours would be {ours})",
            cfg.name,
            member.data.api_url
        );
    }
    Ok(())
}

/// Publishes the postmaster's pid whenever it changes, so the HA loop reacts to a crash within a
/// second instead of at its next tick.
fn watch_postmaster(pg: Arc<Postgres>, stop: CancellationToken) -> watch::Receiver<Option<i32>> {
    let (tx, rx) = watch::channel(pg.postmaster_pid());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pid = pg.postmaster_pid();
            tx.send_if_modified(|old| {
                let changed = *old != pid;
                *old = pid;
                changed
            });
        }
    });
    rx
}

pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    prepared: crate::secure::Prepared,
) -> anyhow::Result<Exit> {
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(4);
    {
        let shutdown = shutdown.clone();
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("received SIGTERM, shutting down"); shutdown.cancel(); }
                    _ = int.recv() => { tracing::info!("received SIGINT, shutting down"); shutdown.cancel(); }
                    _ = hup.recv() => { let _ = reload_tx.try_send(()); }
                }
            }
        });
    }

    let dynamic = Agent::initial_dynamic(&cfg);
    let retry = Duration::from_secs(dynamic.retry_timeout);
    let pg = Arc::new(Postgres::new(pg_settings(&cfg, prepared.superuser_tls)?));
    let dcs = connect_dcs(&cfg, prepared.etcd_tls, retry, &shutdown).await?;
    let peers = PeerClient::for_config(&cfg);
    duplicate_name_guard(&cfg, dcs.as_ref(), &peers).await?;

    let lease_shared = LeaseShared::new(Instant::now());
    let (timing_tx, timing_rx) = watch::channel(lease::LeaseTiming {
        ttl: Duration::from_secs(dynamic.ttl),
        loop_wait: Duration::from_secs(dynamic.loop_wait),
        retry_timeout: retry,
    });
    let tasks = CancellationToken::new();
    tokio::spawn(lease::guardian(
        dcs.clone(),
        pg.clone(),
        lease_shared.clone(),
        timing_rx,
        tasks.clone(),
    ));
    let postmaster = watch_postmaster(pg.clone(), tasks.clone());

    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(NodeSnapshot::initial(&cfg.scope, &cfg.name)));
    let (command_tx, command_rx) = mpsc::channel(16);
    let listener = tokio::net::TcpListener::bind(&cfg.restapi.listen)
        .await
        .with_context(|| format!("restapi.listen {}: cannot listen", cfg.restapi.listen))?;
    let failsafe = Arc::new(pgvigil_rest::FailsafeState::default());
    let rest = RestContext {
        snapshot: snapshot_rx,
        dcs: dcs.clone(),
        peers,
        commands: command_tx,
        access: AccessControl {
            authentication: cfg
                .restapi
                .authentication
                .clone()
                .map(|c| (c.username, c.password)),
            allowlist: cfg.restapi.allowlist.clone(),
            allowlist_include_members: cfg.restapi.allowlist_include_members,
        },
        extra_headers: cfg.restapi.http_extra_headers.clone().into_iter().collect(),
        failsafe: failsafe.clone(),
        status_probe: Some(Arc::new(crate::probe::PgProbe(pg.clone()))),
    };
    let rest_stop = tasks.clone();
    let rest_tls = prepared.rest_tls;
    let verify_client = cfg.restapi.verify_client;
    let rest_task = tokio::spawn(async move {
        let served = match rest_tls {
            Some(tls) => pgvigil_rest::serve_https(listener, tls, verify_client, rest, rest_stop).await,
            None => pgvigil_rest::serve(listener, rest, rest_stop).await,
        };
        if let Err(e) = served {
            tracing::error!("REST API stopped: {e}");
        }
    });

    let wake = Wakeups {
        dcs_events: dcs.subscribe(),
        commands: command_rx,
        reload: reload_rx,
        postmaster_changed: postmaster,
        shutdown: shutdown.clone(),
    };
    let agent = Agent::new(
        cfg,
        config_path,
        dcs.clone(),
        pg,
        lease_shared,
        timing_tx,
        snapshot_tx,
        dynamic,
    )
    .with_failsafe(failsafe);
    let exit = agent.run(wake).await;
    tasks.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), rest_task).await;
    Ok(exit)
}
