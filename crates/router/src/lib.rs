//! `pgvigil router CONFIG.yml`: the client router of a pgvigil (or Patroni) cluster.
//!
//! * Port 5000 (`router.primary_listen`) goes to the member that holds the leader key and whose
//!   member key says it is a running primary. Without one, new connections get a PostgreSQL
//!   error at once (`FATAL: pgvigil router: no primary is available for cluster X`, SQLSTATE
//!   57P03). When the leader changes, every connection to the former leader is closed at once,
//!   so no client keeps writing to a demoted node.
//! * Port 5001 (`router.replicas_listen`) balances round-robin over running, streaming replicas
//!   within `max_replica_lag`, skipping `noloadbalance` members; optionally the primary when no
//!   replica qualifies.
//! * Port 7000 (`router.stats_listen`): HTML, JSON and Prometheus stats ([`stats`]).
//!
//! The topology comes from the cluster's etcd keys through a watch ([`watch`]), not from health
//! checks. If etcd does not answer, the last topology stays in use for `stale_topology_timeout`
//! and established connections are never closed because of it; the watch re-syncs when etcd
//! is back. SIGHUP reloads the configuration file (a bad file is refused, the running
//! configuration stays); SIGTERM/SIGINT stop accepting, give established connections
//! `shutdown_timeout` to finish, then close them.
//!
//! The router forwards bytes and never parses a routed session; it does not need to run as the
//! `postgres` user.

mod garp;
pub mod pgproto;
mod proxy;
pub mod state;
pub mod stats;
pub mod topology;
pub mod vip;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use pgvigil_config::{Config, RouterConfig};
use pgvigil_dcs::EtcdOptions;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::proxy::Workers;
use crate::state::{Port, Shared, lock};

/// A cancellation token cancelled by the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM, shutting down"),
            _ = int.recv() => tracing::info!("received SIGINT, shutting down"),
        }
        t.cancel();
    });
    Ok(token)
}

/// A running listener task.
struct Listener {
    address: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Listener {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Clients(Port),
    Stats,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Clients(Port::Primary) => "router.primary_listen",
            Kind::Clients(Port::Replicas) => "router.replicas_listen",
            Kind::Stats => "router.stats_listen",
        }
    }

    fn address(self, cfg: &RouterConfig) -> &str {
        match self {
            Kind::Clients(Port::Primary) => &cfg.primary_listen,
            Kind::Clients(Port::Replicas) => &cfg.replicas_listen,
            Kind::Stats => &cfg.stats_listen,
        }
    }
}

const KINDS: [Kind; 3] = [
    Kind::Clients(Port::Primary),
    Kind::Clients(Port::Replicas),
    Kind::Stats,
];

async fn bind(kind: Kind, address: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("{} {address}: cannot listen", kind.key()))
}

fn start(
    shared: &Arc<Shared>,
    workers: &Arc<Workers>,
    kind: Kind,
    address: &str,
    listener: TcpListener,
) -> Listener {
    let stop = CancellationToken::new();
    let task = match kind {
        Kind::Clients(port) => tokio::spawn(proxy::accept_loop(
            shared.clone(),
            workers.clone(),
            port,
            listener,
            stop.clone(),
        )),
        Kind::Stats => tokio::spawn(stats::serve(shared.clone(), listener, stop.clone())),
    };
    tracing::info!("{} on {address}", kind.key());
    Listener {
        address: address.to_string(),
        stop,
        task,
    }
}

/// The etcd watcher and what it was started with.
struct Watcher {
    options: EtcdOptions,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start_watcher(shared: &Arc<Shared>, options: EtcdOptions) -> Watcher {
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch::run(shared.clone(), options.clone(), stop.clone()));
    Watcher { options, stop, task }
}

/// Runs the router until `shutdown` is cancelled, then drains: the listeners close at once,
/// established connections get `router.shutdown_timeout` to finish, the rest are closed.
///
/// `config_path` is re-read on SIGHUP (`None`: the configuration came from the environment,
/// which is read again).
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let shared = Shared::new(cfg.scope.clone(), cfg.router.clone());
    let workers =
        Workers::start(cfg.router.threads.max(1) as usize).context("starting the connection threads")?;
    let mut listeners = Vec::new();
    for kind in KINDS {
        let address = kind.address(&cfg.router).to_string();
        let listener = bind(kind, &address).await?;
        listeners.push(start(&shared, &workers, kind, &address, listener));
    }
    let mut watcher = start_watcher(&shared, watch::etcd_options(&cfg)?);
    tracing::info!(
        scope = %cfg.scope,
        "pgvigil router running: {} -> primary, {} -> replicas, stats on http://{}/",
        cfg.router.primary_listen,
        cfg.router.replicas_listen,
        cfg.router.stats_listen
    );
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = hup.recv() => {
                tracing::info!("received SIGHUP, reloading the configuration");
                let result = reload(&shared, &workers, config_path.as_deref(), &mut listeners, &mut watcher).await;
                if let Err(e) = &result {
                    tracing::error!("reload refused, the running configuration stays: {e}");
                }
                *lock(&shared.stats.last_reload) = Some((SystemTime::now(), result.map_err(|e| format!("{e:#}"))));
            }
        }
    }

    // Shutdown: stop accepting, drain, close.
    let grace = Duration::from_secs(shared.router_config().shutdown_timeout);
    let mut stats_listener = None;
    for (kind, listener) in KINDS.into_iter().zip(listeners) {
        match kind {
            Kind::Stats => stats_listener = Some(listener),
            Kind::Clients(_) => listener.stop().await,
        }
    }
    let active = || -> u64 {
        shared
            .stats
            .active
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    };
    if active() > 0 {
        tracing::info!(
            "no longer accepting connections; waiting up to {} s for {} established connection(s) to finish",
            grace.as_secs(),
            active()
        );
    }
    let deadline = Instant::now() + grace;
    while active() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if active() > 0 {
        tracing::info!("closing {} remaining connection(s)", active());
    }
    shared.close_all.cancel();
    let closing = Instant::now() + Duration::from_secs(2);
    while active() > 0 && Instant::now() < closing {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    watcher.stop.cancel();
    let _ = watcher.task.await;
    if let Some(l) = stats_listener {
        l.stop().await;
    }
    tracing::info!("pgvigil router stopped");
    Ok(())
}

/// Re-reads the configuration and applies it: settings at once, listeners whose address
/// changed are re-bound (the old one keeps running if the new address cannot be bound), and
/// the etcd watch restarts if the etcd settings or the scope changed. Established connections
/// are kept; they follow the new topology rules.
async fn reload(
    shared: &Arc<Shared>,
    workers: &Arc<Workers>,
    path: Option<&std::path::Path>,
    listeners: &mut [Listener],
    watcher: &mut Watcher,
) -> anyhow::Result<()> {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("PATRONI_"))
        .collect();
    let loaded =
        pgvigil_config::load(path, &env).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let mut cfg = loaded.config;
    if cfg.router.threads != workers.len() as u64 {
        tracing::warn!(
            "router.threads changed from {} to {}: applied at the next start",
            workers.len(),
            cfg.router.threads
        );
        cfg.router.threads = workers.len() as u64;
    }
    // Bind every new address first, so that a reload either applies all listener changes or
    // none.
    let mut rebound = Vec::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let address = kind.address(&cfg.router);
        if listeners[i].address != address {
            let listener = bind(kind, address).await?;
            rebound.push((i, kind, address.to_string(), listener));
        }
    }
    *shared.config.write().unwrap_or_else(|e| e.into_inner()) = (cfg.scope.clone(), cfg.router.clone());
    for (i, kind, address, listener) in rebound {
        let new = start(shared, workers, kind, &address, listener);
        let old = std::mem::replace(&mut listeners[i], new);
        tracing::info!("{} moved from {} to {address}", kind.key(), old.address);
        old.stop().await;
    }
    let options = watch::etcd_options(&cfg)?;
    let same_etcd = |a: &EtcdOptions, b: &EtcdOptions| {
        a.endpoints == b.endpoints
            && a.namespace == b.namespace
            && a.scope == b.scope
            && a.username == b.username
            && a.password == b.password
            && a.tls == b.tls
    };
    if !same_etcd(&options, &watcher.options) {
        tracing::info!("the etcd settings or the scope changed: restarting the watch");
        let new = start_watcher(shared, options);
        let old = std::mem::replace(watcher, new);
        old.stop.cancel();
        let _ = old.task.await;
    } else {
        shared.nudge.notify_one();
    }
    tracing::info!("configuration reloaded");
    Ok(())
}
