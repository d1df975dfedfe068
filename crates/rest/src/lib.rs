//! pgvigil's REST API (`patroni-compat.md` §2): health checks for HAProxy and Kubernetes, the
//! status document peers read during the leader race, probes, Prometheus metrics, and the
//! protected management verbs; plus the small client used to call other members.
//!
//! Design rule: health answers never wait on PostgreSQL or etcd. The runtime publishes a
//! [`NodeSnapshot`] after every HA cycle and whenever the local state changes; handlers render
//! from it. Only `/cluster`, `/history` and `/config` read the DCS, through [`ClusterSource`],
//! bounded by [`CLUSTER_READ_TIMEOUT`].

pub mod access;
pub mod health;
pub mod metrics;
pub mod peer;
mod routes;
pub mod snapshot;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pgvigil_api::ClusterView;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use access::{AccessControl, Denied};
pub use health::{health_code, liveness_code, parse_bytes, readiness_code};
pub use metrics::render_metrics;
pub use peer::PeerClient;
pub use snapshot::NodeSnapshot;

/// How long `/cluster`, `/history` and `/config` wait for the DCS.
pub const CLUSTER_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A fresh read of the whole cluster from the DCS.
#[async_trait::async_trait]
pub trait ClusterSource: Send + Sync + 'static {
    async fn read_cluster(&self) -> Result<ClusterView, String>;
}

/// The runtime's answer to a command: an HTTP status and Patroni's text message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiReply {
    pub status: u16,
    pub body: String,
}

impl ApiReply {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        ApiReply {
            status,
            body: body.into(),
        }
    }
}

/// A validated `POST /restart` body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestartRequest {
    pub schedule: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// Restart only if the member has this role (`primary`, `replica`, `standby_leader`).
    pub role: Option<String>,
    /// Restart only if the running version is older than this (`X.Y[.Z]`).
    pub postgres_version: Option<String>,
    /// Seconds the restart may take (default `primary_start_timeout`).
    pub timeout: Option<u64>,
    /// Restart only if a restart is pending.
    pub restart_pending: bool,
}

/// Requests the REST API hands to the runtime.
#[derive(Debug)]
pub enum ApiCommand {
    /// `POST /reload`: same as SIGHUP.
    Reload,
    /// The API changed the DCS on an operator's behalf (config, failover key): run a cycle now.
    Wake,
    /// `POST /restart`, body already validated.
    Restart {
        request: RestartRequest,
        reply: tokio::sync::oneshot::Sender<ApiReply>,
    },
    /// `DELETE /restart`.
    CancelScheduledRestart {
        reply: tokio::sync::oneshot::Sender<ApiReply>,
    },
    /// `POST /reinitialize`.
    Reinitialize {
        force: bool,
        from_leader: bool,
        reply: tokio::sync::oneshot::Sender<ApiReply>,
    },
}

/// Everything the server needs.
pub struct RestContext {
    pub snapshot: watch::Receiver<Arc<NodeSnapshot>>,
    pub cluster: Arc<dyn ClusterSource>,
    pub commands: mpsc::Sender<ApiCommand>,
    pub access: AccessControl,
    /// `restapi.http_extra_headers`, added to every normal (non status-only) response.
    pub extra_headers: Vec<(String, String)>,
}

/// Serves the API on `listener` until `shutdown` is cancelled (then finishes in-flight requests).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: RestContext,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = routes::router(ctx).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
