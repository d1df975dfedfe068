//! Follows the cluster through etcd: the DCS watch on the cluster prefix wakes the router on
//! every change (leader key, member keys, ...), and each wake-up re-reads the prefix and
//! publishes a new topology, so a new leader is routed to within one etcd round trip of its
//! member key saying it is a running primary.
//!
//! A read every [`RESYNC_INTERVAL`] also runs while nothing changes: it notices that etcd went
//! away (the watch alone would just go quiet) and re-syncs after etcd comes back, before the
//! watch is re-established. While etcd does not answer, the last topology stays in use for
//! `stale_topology_timeout`, and the stats page and the log say so; after that new connections
//! are refused. Established connections are never closed because etcd is unreachable.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgvigil_dcs::{Dcs, DcsEvent, Etcd3Dcs, EtcdOptions};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::state::{Shared, Snapshot};
use crate::topology::Topology;

/// How often the cluster is re-read when no change arrives.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of one read (retries included).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The etcd connection settings of a configuration (what a reload compares); fails when the
/// TLS files (`etcd3.cacert`, `cert`, `key`) cannot be used.
pub fn etcd_options(cfg: &pgvigil_config::Config) -> Result<EtcdOptions, pgvigil_tls::TlsError> {
    let e = &cfg.etcd3;
    let tls = pgvigil_dcs::EtcdTls::for_protocol(
        &e.protocol,
        e.cacert.as_deref(),
        e.cert.as_deref(),
        e.key.as_deref(),
    )?;
    Ok(EtcdOptions {
        endpoints: cfg.etcd3.hosts.clone(),
        namespace: cfg.namespace.clone(),
        scope: cfg.scope.clone(),
        member_name: format!("pgvigil-router-{}", std::process::id()),
        username: cfg.etcd3.username.clone(),
        password: cfg.etcd3.password.clone(),
        retry_timeout: READ_TIMEOUT,
        attempt_timeout: None,
        tls,
    })
}

/// Runs until `stop` is cancelled.
pub async fn run(shared: Arc<Shared>, options: EtcdOptions, stop: CancellationToken) {
    let dcs = match Etcd3Dcs::connect(options.clone()).await {
        Ok(dcs) => dcs,
        Err(e) => {
            // Only invalid options fail here; configuration loading rules those out.
            tracing::error!("cannot set up the etcd client: {e}");
            return;
        }
    };
    tracing::info!(
        endpoints = %options.endpoints.join(","),
        prefix = %dcs.keys().prefix(),
        "watching the cluster in etcd"
    );
    let mut events = dcs.subscribe();
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            read = tokio::time::timeout(READ_TIMEOUT + Duration::from_millis(500), dcs.get_cluster()) => read,
        };
        match read {
            Ok(Ok(view)) => synced(&shared, &view),
            Ok(Err(e)) => failed(&shared, e.to_string()),
            Err(_) => failed(&shared, format!("no answer within {READ_TIMEOUT:?}")),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            // A reload changed the settings (or the scope): recompute now.
            _ = shared.nudge.notified() => {}
            event = events.recv() => match event {
                Ok(DcsEvent::WatchRestarted) => {
                    let mut snapshot = (*shared.snapshot()).clone();
                    snapshot.watch_since = Some(SystemTime::now());
                    shared.publish(snapshot);
                    tracing::info!("etcd watch (re-)established; re-reading the cluster");
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => {
                    tick.tick().await;
                }
            }
        }
        // Coalesce a burst of changes into one read.
        while events.try_recv().is_ok() {}
    }
}

fn synced(shared: &Shared, view: &pgvigil_api::ClusterView) {
    let scope = shared.scope();
    let topology = Topology::compute(&scope, view, &shared.settings());
    let old = shared.snapshot();
    if old.failing_since.is_some() {
        tracing::info!(
            "etcd answers again after {:.1} s; topology re-synced",
            old.failing_since.map_or(0.0, |s| s.elapsed().as_secs_f64())
        );
    }
    log_changes(old.topology.as_deref(), &topology);
    shared.stats.observe(&topology);
    shared.publish(Snapshot {
        topology: Some(Arc::new(topology)),
        synced_at: Some(Instant::now()),
        synced_wall: Some(SystemTime::now()),
        failing_since: None,
        failing_since_wall: None,
        last_error: None,
        expired: false,
        watch_since: old.watch_since,
    });
}

fn failed(shared: &Shared, error: String) {
    let old = shared.snapshot();
    let stale_after = Duration::from_secs(shared.router_config().stale_topology_timeout);
    let mut snapshot = (*old).clone();
    let now = Instant::now();
    if snapshot.failing_since.is_none() {
        snapshot.failing_since = Some(now);
        snapshot.failing_since_wall = Some(SystemTime::now());
        if snapshot.topology.is_some() {
            tracing::warn!(
                "etcd does not answer ({error}); routing by the last known topology for up to {} s \
                 (router.stale_topology_timeout), established connections stay open",
                stale_after.as_secs()
            );
        } else {
            tracing::warn!("etcd does not answer ({error}); no topology yet, refusing connections");
        }
    }
    let expired = snapshot.topology.is_some()
        && snapshot
            .synced_at
            .is_none_or(|s| now.duration_since(s) >= stale_after);
    if expired && !old.expired {
        tracing::error!(
            "etcd has not answered for {} s: the last known topology expired; refusing new connections until etcd answers \
             (established connections stay open)",
            stale_after.as_secs()
        );
    }
    snapshot.expired = expired;
    snapshot.last_error = Some(error);
    shared.publish(snapshot);
}

fn log_changes(old: Option<&Topology>, new: &Topology) {
    let old_primary = old.and_then(|t| t.primary.as_ref());
    if old.is_none() || old_primary != new.primary.as_ref() {
        match &new.primary {
            Some(p) => tracing::info!(member = %p.member, "primary: {} at {}", p.member, p.address()),
            None => tracing::warn!("no primary: {}", new.no_primary_reason),
        }
    }
    let names = |t: &Topology| t.replicas.iter().map(|b| b.member.clone()).collect::<Vec<_>>();
    if old.is_none_or(|o| names(o) != names(new) || o.reads_on_primary != new.reads_on_primary) {
        if !new.replicas.is_empty() {
            tracing::info!("replicas for reads: {}", names(new).join(", "));
        } else if new.reads_on_primary {
            tracing::warn!(
                "no replica qualifies ({}); reads go to the primary",
                new.no_replica_reason
            );
        } else {
            tracing::warn!("no replica for reads: {}", new.no_replica_reason);
        }
    }
}
