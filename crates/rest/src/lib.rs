//! pgvigil's REST API (`docs/patroni-compat.md` §2): health checks for HAProxy and Kubernetes, the
//! status document peers read during the leader race, probes, Prometheus metrics, and the
//! protected management verbs; plus the small client used to call other members.
//!
//! Design rule: health answers never wait on PostgreSQL or etcd. The runtime publishes a
//! [`NodeSnapshot`] after every HA cycle and whenever the local state changes; handlers render
//! from it. Only `/cluster`, `/history`, `/config` and the operator endpoints read the DCS,
//! bounded by [`CLUSTER_READ_TIMEOUT`].
//!
//! The operator endpoints (`docs/patroni-compat.md` §2.6) validate their bodies here, write the DCS
//! themselves (`config`, `failover`) and wake the runtime with [`ApiCommand::Wake`], or hand
//! restart and reinitialize requests to the runtime and wait for its [`ApiReply`].

pub mod access;
pub mod failsafe;
pub mod health;
pub mod listen;
pub mod metrics;
pub mod operator;
pub mod peer;
mod routes;
pub mod snapshot;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use pgvigil_dcs::Dcs;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use access::{AccessControl, Denied};
pub use failsafe::{FailsafePost, FailsafeState};
pub use health::{health_code, liveness_code, parse_bytes, readiness_code};
pub use metrics::render_metrics;
pub use peer::PeerClient;
pub use snapshot::{LiveLock, LockProof, NodeSnapshot};

/// How long `/cluster`, `/history` and `/config` wait for the DCS.
pub const CLUSTER_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a handler waits for the runtime to answer a restart or reinitialize request.
pub const COMMAND_REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// The runtime's answer to an API command: the status code and Patroni's text message.
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

/// A validated `POST /restart` body (`docs/patroni-compat.md` §2.6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestartRequest {
    /// Restart at this time instead of now.
    pub schedule: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// Only if the current role is this one (`primary`, `standby_leader` or `replica`).
    pub role: Option<String>,
    /// Only if the running PostgreSQL is older than this `X.Y[.Z]` version.
    pub postgres_version: Option<String>,
    /// Seconds allowed for the start (default `primary_start_timeout`).
    pub timeout: Option<u64>,
    /// Only if PostgreSQL has a pending restart.
    pub restart_pending: bool,
}

/// Requests the REST API hands to the runtime.
#[derive(Debug)]
pub enum ApiCommand {
    /// `POST /reload`: same as SIGHUP.
    Reload,
    /// The API changed the DCS on an operator's behalf (config PATCH/PUT, failover key): run an
    /// HA cycle now.
    Wake,
    /// `POST /restart`, body already validated (400/422 handled by the API). The runtime
    /// replies 200 `restarted successfully`, 503 ..., 202 `Restart scheduled`, 409 `Another
    /// restart is already scheduled`, ...
    Restart {
        request: RestartRequest,
        reply: oneshot::Sender<ApiReply>,
    },
    /// `DELETE /restart` → 200 `scheduled restart deleted` / 404 `no restarts are scheduled`.
    CancelScheduledRestart { reply: oneshot::Sender<ApiReply> },
    /// `POST /reinitialize` → 200 `reinitialize started` or 503 with the reason.
    Reinitialize {
        force: bool,
        from_leader: bool,
        reply: oneshot::Sender<ApiReply>,
    },
}

/// Everything the server needs.
pub struct RestContext {
    pub snapshot: watch::Receiver<Arc<NodeSnapshot>>,
    /// Fresh reads for `/cluster`, `/history`, `/config`, and the operator writes (`config`,
    /// `failover`).
    pub dcs: Arc<dyn Dcs>,
    /// Calls to other members (switchover feasibility).
    pub peers: PeerClient,
    pub commands: mpsc::Sender<ApiCommand>,
    pub access: AccessControl,
    /// `restapi.http_extra_headers`, added to every normal (non status-only) response.
    pub extra_headers: Vec<(String, String)>,
    /// Leaders' `POST /failsafe` calls, shared with the HA loop (`failsafe_mode`).
    pub failsafe: Arc<FailsafeState>,
    /// A fresh look at PostgreSQL for `GET /patroni`; `None` serves the snapshot.
    pub status_probe: Option<Arc<dyn StatusProbe>>,
}

/// How long `GET /patroni` may spend on a fresh PostgreSQL query before it answers from the
/// snapshot instead.
pub const STATUS_PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Refreshes the WAL positions and role of the status document from PostgreSQL.
///
/// `GET /patroni` is what peers read in a leader race and what a leader reads to judge a
/// switchover candidate's lag; a snapshot up to `loop_wait` old can make a caught-up replica
/// look far behind on a busy primary. Like Patroni, that one endpoint asks PostgreSQL, bounded
/// by [`STATUS_PROBE_TIMEOUT`]; health checks keep answering from the snapshot.
#[async_trait::async_trait]
pub trait StatusProbe: Send + Sync + 'static {
    async fn refresh(
        &self,
        base: &pgvigil_api::rest::StatusDocument,
    ) -> Option<pgvigil_api::rest::StatusDocument>;
}

/// Serves the API on `listener` until `shutdown` is cancelled (then finishes in-flight requests).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: RestContext,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = routes::router(ctx).into_make_service_with_connect_info::<tls::RemotePeer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Serves the API over HTTPS (`restapi.certfile`, see [`tls::ServerTls`]).
/// `verify_client: optional` makes the protected endpoints answer 403 `client certificate
/// required` to a client that presented none.
pub async fn serve_https(
    listener: tokio::net::TcpListener,
    tls: Arc<tls::ServerTls>,
    verify_client: pgvigil_config::VerifyClient,
    ctx: RestContext,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut router = routes::router(ctx);
    if verify_client == pgvigil_config::VerifyClient::Optional {
        router = router.layer(axum::Extension(routes::ClientCertForProtected));
    }
    let listener = tls::TlsListener::new(listener, tls)?;
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<tls::RemotePeer>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}
