//! The stats server (`router.stats_listen`, default 127.0.0.1:7000):
//!
//! * `/`: an HTML page a person can read at a glance (refreshes every 2 s): where each port
//!   routes, whether etcd is in sync, and per member its role, state, lag, connections, bytes
//!   and last change (`html.rs`);
//! * `/stats.json` (also `/json`): the same as JSON;
//! * `/metrics`: Prometheus text format, metric names prefixed `pgvigil_router_`
//!   (`metrics.rs`).
//!
//! Rendering is pure ([`StatsDoc::build`], [`render_html`], [`render_metrics`]); the HTTP part
//! is a small axum router.

mod html;
mod metrics;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::html::render_html;
pub use self::metrics::render_metrics;
use crate::state::{Port, Shared, lock};

#[derive(Clone, Debug, Serialize)]
pub struct StatsDoc {
    pub scope: String,
    pub version: String,
    pub now: String,
    pub started_at: String,
    pub listen: Listen,
    pub etcd: EtcdDoc,
    /// The leader key's value.
    pub leader: Option<String>,
    /// Where port 5000 routes (member name), if anywhere.
    pub primary: Option<String>,
    pub primary_address: Option<String>,
    pub no_primary_reason: Option<String>,
    /// Where port 5001 routes (member names).
    pub read_targets: Vec<String>,
    pub reads_on_primary: bool,
    pub no_replica_reason: Option<String>,
    /// Times the primary moved from one member to another since the router started.
    pub leader_changes: u64,
    pub last_primary_change: Option<String>,
    pub settings: SettingsDoc,
    pub ports: BTreeMap<String, PortDoc>,
    pub members: Vec<MemberDoc>,
    pub last_reload: Option<ReloadDoc>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Listen {
    pub primary: String,
    pub replicas: String,
    pub stats: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct EtcdDoc {
    /// `in sync`, `stale` (etcd unreachable, last topology in use), `expired` (etcd unreachable
    /// for longer than `stale_topology_timeout`) or `not synced yet`.
    pub status: String,
    /// One sentence for people.
    pub message: String,
    pub last_sync: Option<String>,
    pub last_sync_age_seconds: Option<f64>,
    pub failing_since: Option<String>,
    pub last_error: Option<String>,
    pub watch_established: Option<String>,
    pub revision: Option<i64>,
    pub stale_topology_timeout: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SettingsDoc {
    pub max_replica_lag: Option<u64>,
    pub primary_serves_reads_fallback: bool,
    pub connect_timeout: u64,
    pub shutdown_timeout: u64,
    pub threads: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PortDoc {
    pub accepted: u64,
    pub active: u64,
    pub refused: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MemberDoc {
    pub name: String,
    /// `leader`, `replica`, or the member key's role; `gone` once the member key disappeared
    /// (its counters stay).
    pub role: String,
    pub state: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub timeline: Option<u64>,
    pub lag: Option<u64>,
    /// What the router does with it: `primary`, `replica`, `excluded: <why>`.
    pub routing: String,
    pub connections_primary: u64,
    pub connections_replicas: u64,
    pub connections_total: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub connect_errors: u64,
    pub closed_by_router: u64,
    pub last_change: Option<String>,
    pub last_change_age_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReloadDoc {
    pub at: String,
    pub ok: bool,
    pub error: Option<String>,
}

fn time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

fn age(t: SystemTime, now: SystemTime) -> f64 {
    now.duration_since(t)
        .map_or(0.0, |d| (d.as_secs_f64() * 10.0).round() / 10.0)
}

impl StatsDoc {
    pub fn build(shared: &Shared) -> StatsDoc {
        let now = SystemTime::now();
        let (scope, cfg) = shared.config.read().unwrap_or_else(|e| e.into_inner()).clone();
        let snapshot = shared.snapshot();
        let topology = snapshot.topology.clone();
        let last_sync_age = snapshot.synced_wall.map(|t| age(t, now));
        let (status, message) = match (&topology, snapshot.failing_since_wall, snapshot.expired) {
            (None, _, _) => (
                "not synced yet",
                format!(
                    "the cluster has not been read from etcd yet{}; all connections are refused",
                    snapshot
                        .last_error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" ({e})"))
                ),
            ),
            (Some(_), None, _) => (
                "in sync",
                format!(
                    "watching etcd; last read {:.1} s ago",
                    last_sync_age.unwrap_or(0.0)
                ),
            ),
            (Some(_), Some(_), false) => {
                let a = last_sync_age.unwrap_or(0.0);
                (
                    "stale",
                    format!(
                        "etcd does not answer: routing new connections by the topology read {a:.0} s ago, for {:.0} s more \
                         (stale_topology_timeout {} s); established connections stay open",
                        (cfg.stale_topology_timeout as f64 - a).max(0.0),
                        cfg.stale_topology_timeout
                    ),
                )
            }
            (Some(_), Some(_), true) => (
                "expired",
                format!(
                    "etcd has not answered for {:.0} s (more than stale_topology_timeout {} s): new connections are \
                     refused until it answers; established connections stay open",
                    last_sync_age.unwrap_or(0.0),
                    cfg.stale_topology_timeout
                ),
            ),
        };
        let etcd = EtcdDoc {
            status: status.to_string(),
            message,
            last_sync: snapshot.synced_wall.map(time),
            last_sync_age_seconds: last_sync_age,
            failing_since: snapshot.failing_since_wall.map(time),
            last_error: snapshot.last_error.clone(),
            watch_established: snapshot.watch_since.map(time),
            revision: topology.as_ref().map(|t| t.revision),
            stale_topology_timeout: cfg.stale_topology_timeout,
        };

        let counters = lock(&shared.stats.members).clone();
        let changes = lock(&shared.stats.member_changes).clone();
        let mut members = Vec::new();
        let mut seen = Vec::new();
        let fill = |doc: &mut MemberDoc| {
            if let Some(c) = counters.get(&doc.name) {
                doc.connections_primary = c.active[Port::Primary as usize].load(Ordering::Relaxed);
                doc.connections_replicas = c.active[Port::Replicas as usize].load(Ordering::Relaxed);
                doc.connections_total = c.total.iter().map(|t| t.load(Ordering::Relaxed)).sum();
                doc.bytes_to_server = c.bytes_to_server.load(Ordering::Relaxed);
                doc.bytes_to_client = c.bytes_to_client.load(Ordering::Relaxed);
                doc.connect_errors = c.connect_errors.load(Ordering::Relaxed);
                doc.closed_by_router = c.closed_by_router.load(Ordering::Relaxed);
            }
            if let Some((_, at)) = changes.get(&doc.name) {
                doc.last_change = Some(time(*at));
                doc.last_change_age_seconds = Some(age(*at, now));
            }
        };
        if let Some(t) = &topology {
            for m in &t.members {
                let role = if m.is_leader {
                    "leader".to_string()
                } else {
                    m.role.clone()
                };
                let mut doc = MemberDoc {
                    name: m.name.clone(),
                    role,
                    state: match (&m.replication_state, m.is_leader) {
                        (Some(rs), false) => format!("{} ({rs})", m.state),
                        _ => m.state.clone(),
                    },
                    host: m.host.clone(),
                    port: m.port,
                    timeline: m.timeline,
                    lag: m.lag,
                    routing: m.routing.clone(),
                    ..Default::default()
                };
                fill(&mut doc);
                seen.push(m.name.clone());
                members.push(doc);
            }
        }
        // Members that left the cluster keep their counters on the page.
        for name in counters.keys() {
            if !seen.contains(name) {
                let mut doc = MemberDoc {
                    name: name.clone(),
                    role: "gone".into(),
                    state: "no member key".into(),
                    routing: "excluded: not in the cluster".into(),
                    ..Default::default()
                };
                fill(&mut doc);
                members.push(doc);
            }
        }

        let refused = lock(&shared.stats.refused).clone();
        let mut ports = BTreeMap::new();
        for port in [Port::Primary, Port::Replicas] {
            let i = port as usize;
            ports.insert(
                port.name().to_string(),
                PortDoc {
                    accepted: shared.stats.accepted[i].load(Ordering::Relaxed),
                    active: shared.stats.active[i].load(Ordering::Relaxed),
                    refused: refused
                        .iter()
                        .filter(|((p, _), _)| *p == port)
                        .map(|((_, r), n)| (r.to_string(), *n))
                        .collect(),
                },
            );
        }
        let primary_change = lock(&shared.stats.primary).1;
        let last_reload = lock(&shared.stats.last_reload).clone().map(|(at, r)| ReloadDoc {
            at: time(at),
            ok: r.is_ok(),
            error: r.err(),
        });
        let t = topology.as_deref();
        StatsDoc {
            scope,
            version: env!("CARGO_PKG_VERSION").to_string(),
            now: time(now),
            started_at: time(shared.stats.started),
            listen: Listen {
                primary: cfg.primary_listen.clone(),
                replicas: cfg.replicas_listen.clone(),
                stats: cfg.stats_listen.clone(),
            },
            etcd,
            leader: t.and_then(|t| t.leader.clone()),
            primary: t.and_then(|t| t.primary.as_ref().map(|p| p.member.clone())),
            primary_address: t.and_then(|t| t.primary.as_ref().map(|p| p.address())),
            no_primary_reason: t
                .filter(|t| t.primary.is_none())
                .map(|t| t.no_primary_reason.clone()),
            read_targets: t.map_or_else(Vec::new, |t| {
                t.read_routes()
                    .iter()
                    .map(|r| r.backend().member.clone())
                    .collect()
            }),
            reads_on_primary: t.is_some_and(|t| t.reads_on_primary),
            no_replica_reason: t
                .filter(|t| t.replicas.is_empty())
                .map(|t| t.no_replica_reason.clone()),
            leader_changes: shared.stats.leader_changes.load(Ordering::Relaxed),
            last_primary_change: primary_change.map(time),
            settings: SettingsDoc {
                max_replica_lag: cfg.max_replica_lag,
                primary_serves_reads_fallback: cfg.primary_serves_reads_fallback,
                connect_timeout: cfg.connect_timeout,
                shutdown_timeout: cfg.shutdown_timeout,
                threads: cfg.threads,
            },
            ports,
            members,
            last_reload,
        }
    }
}

async fn html(State(shared): State<Arc<Shared>>) -> Html<String> {
    Html(render_html(&StatsDoc::build(&shared)))
}

async fn json(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(StatsDoc::build(&shared))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        render_metrics(&StatsDoc::build(&shared)),
    )
}

/// Serves the stats pages until `stop` is cancelled.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/", get(html))
        .route("/stats.json", get(json))
        .route("/json", get(json))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!("stats server stopped: {e}");
    }
}
