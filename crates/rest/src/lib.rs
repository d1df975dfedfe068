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

/// Requests the REST API hands to the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiCommand {
    /// `POST /reload`: same as SIGHUP.
    Reload,
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
