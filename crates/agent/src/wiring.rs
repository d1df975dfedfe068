//! Building the agent's parts from the configuration and starting its tasks: etcd client,
//! `Leadership` (its own thread, etcd connection, fence and fencer process), postmaster
//! watcher, REST server, signal handlers, HA loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgvigil_config::{Config, LogConfig};
use pgvigil_dcs::{Dcs, Etcd3Dcs, EtcdOptions};
use pgvigil_postgres::{PgSettings, PgUser, Postgres};
use pgvigil_rest::{AccessControl, FailsafePost, NodeSnapshot, PeerClient, RestContext};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::leadership::failsafe::FailsafeProber;
use crate::leadership::watchdog::Watchdog;
use crate::leadership::{Leadership, LockSettings};
use crate::operator::OperatorQueue;
use crate::runtime::{Agent, Exit, Parts, Wakeups};
use crate::supervisor::{Context as SupervisorContext, PgSupervisor, SyncWatch};

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

/// The etcd endpoints with the ones on this host first: the agent dies with its host, so a
/// local member is never the one that vanished under it, and a watch or a lock write going
/// through a dead member costs a whole attempt timeout, which the fast takeover cannot spare.
/// "On this host" means the address of our REST API or PostgreSQL, or loopback.
fn local_endpoints_first(cfg: &Config, endpoints: &[String]) -> Vec<String> {
    let host_of = |addr: &str| -> String {
        let addr = addr.trim_start_matches("http://").trim_start_matches("https://");
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        host.trim_matches(|c| c == '[' || c == ']').to_ascii_lowercase()
    };
    let ours = [
        host_of(&cfg.restapi.connect_address),
        host_of(&cfg.postgresql.connect_address),
    ];
    let local = |e: &String| {
        let h = host_of(e);
        ours.contains(&h) || h == "localhost" || h == "::1" || h.starts_with("127.")
    };
    let (mut first, rest): (Vec<String>, Vec<String>) = endpoints.iter().cloned().partition(local);
    first.extend(rest);
    first
}

fn etcd_options(cfg: &Config, tls: Option<pgvigil_dcs::EtcdTls>, retry_timeout: Duration) -> EtcdOptions {
    EtcdOptions {
        endpoints: local_endpoints_first(cfg, &cfg.etcd3.hosts),
        namespace: cfg.namespace.clone(),
        scope: cfg.scope.clone(),
        member_name: cfg.name.clone(),
        username: cfg.etcd3.username.clone(),
        password: cfg.etcd3.password.clone(),
        retry_timeout,
        attempt_timeout: None,
        tls,
    }
}

/// `etcd3.srv` (`docs/patroni-compat.md` §1.7): the endpoints the DNS SRV records give, with
/// the protocol they imply. When no record answers, `etcd3.hosts` serve if given, as with
/// Patroni; otherwise the records are asked again every 5 s, saying so, like Patroni's
/// "waiting on etcd", until one answers or we are told to stop.
async fn srv_endpoints(
    cfg: &Config,
    mut options: EtcdOptions,
    domain: &str,
    stop: &CancellationToken,
) -> anyhow::Result<EtcdOptions> {
    use crate::etcd_srv::{SystemLookups, discover, record_names};
    let lookups = SystemLookups::new(options.retry_timeout)?;
    let suffix = cfg.etcd3.srv_suffix.as_deref();
    loop {
        if let Some(found) = discover(&lookups, domain, suffix).await {
            options.endpoints = local_endpoints_first(cfg, &found.endpoints);
            options.tls = match (found.protocol.as_str(), options.tls.take()) {
                ("https", Some(tls)) => Some(tls),
                ("https", None) => {
                    let e = &cfg.etcd3;
                    let (ca, cert, key) = (e.cacert.as_deref(), e.cert.as_deref(), e.key.as_deref());
                    pgvigil_dcs::EtcdTls::for_protocol("https", ca, cert, key)?
                }
                _ => None,
            };
            return Ok(options);
        }
        if !options.endpoints.is_empty() {
            tracing::warn!("etcd3.srv: no DNS SRV record for {domain} names etcd; using etcd3.hosts");
            return Ok(options);
        }
        let names: Vec<String> = record_names(domain, suffix).into_iter().map(|r| r.0).collect();
        tracing::warn!(
            "etcd3.srv: no etcd found through the DNS SRV records {}; waiting on etcd, asking again in 5 s",
            names.join(", ")
        );
        tokio::select! {
            _ = stop.cancelled() => anyhow::bail!("stopped while waiting for etcd3.srv to find etcd"),
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Connects to etcd, retrying every few seconds like Patroni until it answers or we are told
/// to stop.
async fn connect_dcs(options: EtcdOptions, stop: &CancellationToken) -> anyhow::Result<Arc<dyn Dcs>> {
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

/// Refuses to start when another live agent already uses our name (`docs/patroni-compat.md` §2.7).
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
    let mut etcd = etcd_options(&cfg, prepared.etcd_tls, retry);
    if let Some(domain) = &cfg.etcd3.srv {
        etcd = srv_endpoints(&cfg, etcd, domain, &shutdown).await?;
    }
    let dcs = connect_dcs(etcd.clone(), &shutdown).await?;
    let peers = PeerClient::for_config(&cfg);
    duplicate_name_guard(&cfg, dcs.as_ref(), &peers).await?;

    let me = FailsafePost {
        name: cfg.name.clone(),
        conn_url: format!(
            "postgres://{}/{}",
            cfg.postgresql.connect_address, cfg.postgresql.database
        ),
        api_url: cfg.restapi.api_url(),
        slots: Default::default(),
    };
    let lock_news = Arc::new(Notify::new());
    let watchdog = Arc::new(Watchdog::new(cfg.watchdog.clone()));
    let leadership = Leadership::start(
        etcd,
        &cfg.postgresql.data_dir,
        watchdog.clone(),
        Arc::new(FailsafeProber::new(peers.clone(), me)),
        LockSettings {
            ttl: Duration::from_secs(dynamic.ttl),
            ..LockSettings::default()
        },
        lock_news.clone(),
    )
    .context("starting the leader lock")?;
    let leadership = Arc::new(leadership);
    let tasks = CancellationToken::new();
    let postmaster = watch_postmaster(pg.clone(), tasks.clone());
    let sync_watch = Arc::new(SyncWatch::default());
    tokio::spawn(crate::supervisor::sync_watch::sample(
        sync_watch.clone(),
        pg.clone(),
        lock_news.clone(),
        tasks.clone(),
    ));

    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(NodeSnapshot::initial(&cfg.scope, &cfg.name)));
    let (command_tx, command_rx) = mpsc::channel(16);
    let listener = pgvigil_rest::listen::bind(&cfg.restapi.listen)
        .await
        .map_err(anyhow::Error::msg)?;
    let failsafe = Arc::new(pgvigil_rest::FailsafeState::default());
    let rest = RestContext {
        snapshot: snapshot_rx,
        dcs: dcs.clone(),
        peers: peers.clone(),
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
        lock_keys: dcs.subscribe_lock_keys(),
        lock_news,
        commands: command_rx,
        reload: reload_rx,
        postmaster_changed: postmaster,
        shutdown: shutdown.clone(),
    };
    let scheduled_restart = Arc::default();
    let supervisor = PgSupervisor::new(
        Arc::new(cfg.clone()),
        dynamic.clone(),
        pg,
        SupervisorContext {
            dcs: dcs.clone(),
            leadership: leadership.clone(),
            failsafe: failsafe.clone(),
            watchdog: watchdog.clone(),
            sync_watch,
            scheduled_restart: Arc::clone(&scheduled_restart),
        },
    );
    let agent = Agent::new(Parts {
        cfg,
        config_path,
        dynamic,
        dcs: dcs.clone(),
        leadership,
        supervisor,
        operator: OperatorQueue::new(scheduled_restart),
        snapshot: snapshot_tx,
        peers,
        failsafe,
        watchdog,
    });
    let exit = agent.run(wake).await;
    tasks.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), rest_task).await;
    Ok(exit)
}
