//! Request dispatch, the way Patroni's handler does it (`docs/patroni-compat.md` §2.1): the method
//! and the first path segment select a handler; any other `GET` runs the generic health check;
//! `HEAD` and `OPTIONS` on any path answer with the status line only.

mod operator_handlers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, SERVER, TRANSFER_ENCODING,
    WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use pgvigil_api::ClusterView;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::oneshot;

use crate::access::Denied;
use crate::health::{first_segment, generic_code, health_code};
use crate::metrics::render_metrics;
use crate::operator::FailoverAction;
use crate::snapshot::NodeSnapshot;
use crate::tls::RemotePeer;
use crate::{ApiCommand, ApiReply, CLUSTER_READ_TIMEOUT, RestContext};

/// The protected endpoints (`docs/patroni-compat.md` §2.6), selected by method and first segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Reload,
    PatchConfig,
    PutConfig,
    Failover(FailoverAction),
    DeleteSwitchover,
    Restart,
    DeleteRestart,
    Reinitialize,
}

impl Operation {
    fn select(method: &Method, segment: &str) -> Option<Operation> {
        Some(match (method.as_str(), segment) {
            ("POST", "reload") => Operation::Reload,
            ("PATCH", "config") => Operation::PatchConfig,
            ("PUT", "config") => Operation::PutConfig,
            ("POST", "switchover") => Operation::Failover(FailoverAction::Switchover),
            ("POST", "failover") => Operation::Failover(FailoverAction::Failover),
            ("DELETE", "switchover") => Operation::DeleteSwitchover,
            ("POST", "restart") => Operation::Restart,
            ("DELETE", "restart") => Operation::DeleteRestart,
            ("POST", "reinitialize") => Operation::Reinitialize,
            _ => return None,
        })
    }
}

/// Why a request body was not accepted.
enum BadBody {
    /// No `Content-Length` where a body is required: 411.
    LengthRequired,
    /// Not a JSON object (or an empty one where content is required): 400.
    Malformed,
}

/// Patroni's `_read_json_content`: a JSON object; with `optional`, a missing or empty body is
/// an empty object.
fn read_json(headers: &HeaderMap, body: &[u8], optional: bool) -> Result<Map<String, Value>, BadBody> {
    let has_length = headers.contains_key(CONTENT_LENGTH) || headers.contains_key(TRANSFER_ENCODING);
    if !has_length {
        return if optional {
            Ok(Map::new())
        } else {
            Err(BadBody::LengthRequired)
        };
    }
    if body.is_empty() && optional {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) if optional || !map.is_empty() => Ok(map),
        _ => Err(BadBody::Malformed),
    }
}

struct App {
    ctx: RestContext,
    extra_headers: Vec<(HeaderName, HeaderValue)>,
}

pub(crate) fn router(ctx: RestContext) -> Router {
    let extra_headers = ctx
        .extra_headers
        .iter()
        .filter_map(|(name, value)| {
            match (
                HeaderName::try_from(name.as_str()),
                HeaderValue::try_from(value.as_str()),
            ) {
                (Ok(n), Ok(v)) => Some((n, v)),
                _ => {
                    tracing::warn!("ignoring invalid extra HTTP header {name:?}: {value:?}");
                    None
                }
            }
        })
        .collect();
    Router::new()
        .fallback(dispatch)
        .with_state(Arc::new(App { ctx, extra_headers }))
}

/// Marks a server whose protected endpoints need a client certificate although the handshake
/// does not (`restapi.verify_client: optional`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientCertForProtected;

async fn dispatch(
    State(app): State<Arc<App>>,
    ConnectInfo(remote): ConnectInfo<RemotePeer>,
    cert_rule: Option<Extension<ClientCertForProtected>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let snap = app.ctx.snapshot.borrow().clone();
    let peer = remote.addr;
    // `verify_client: optional`: the handshake let a client without certificate in, but the
    // protected endpoints want one (§2.1, checked after the allowlist in Patroni).
    let cert_missing = cert_rule.is_some() && !remote.client_cert;
    let now = Instant::now();
    let path = uri.path();
    let query = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let segment = first_segment(path);
    let response = match method {
        Method::GET => match segment {
            "patroni" => {
                let fresh = match &app.ctx.status_probe {
                    Some(probe) => {
                        tokio::time::timeout(crate::STATUS_PROBE_TIMEOUT, probe.refresh(&snap.status))
                            .await
                            .ok()
                            .flatten()
                    }
                    None => None,
                };
                app.json(&snap, 200, fresh.as_ref().unwrap_or(&snap.status))
            }
            "liveness" | "readiness" => status_only(health_code(path, &query, &snap, now)),
            "cluster" => app.get_cluster(&snap).await,
            "history" => app.get_history(&snap).await,
            "config" => app.get_config(&snap).await,
            "failsafe" => match (&snap.failsafe_members, snap.failsafe_mode_enabled) {
                (Some(members), true) => app.json(&snap, 200, members),
                _ => app.error_page(&snap, 502),
            },
            "metrics" => app.respond(&snap, 200, "text/plain", render_metrics(&snap, now)),
            _ => app.json(&snap, generic_code(path, &query, &snap, now), &snap.status),
        },
        Method::HEAD | Method::OPTIONS => status_only(health_code(path, &query, &snap, now)),
        Method::POST
            if cert_missing && (segment == "failsafe" || Operation::select(&method, segment).is_some()) =>
        {
            app.respond(&snap, 403, "text/html", "client certificate required")
        }
        Method::POST if segment == "failsafe" => app.post_failsafe(&snap, peer, &headers, &body).await,
        _ => match Operation::select(&method, segment) {
            None => app.error_page(&snap, 501),
            Some(_) if cert_missing => app.respond(&snap, 403, "text/html", "client certificate required"),
            Some(op) => match app.protect(&snap, peer, &headers).await {
                Err(denied) => denied,
                Ok(()) => app.operate(&snap, op, &headers, &body).await,
            },
        },
    };
    tracing::debug!(
        "API: {} - {method} {uri} {}",
        peer.ip(),
        response.status().as_u16()
    );
    response
}

impl App {
    /// A normal response: content type, `Server`, and the configured extra headers.
    fn respond(
        &self,
        snap: &NodeSnapshot,
        code: u16,
        content_type: &'static str,
        body: impl Into<Body>,
    ) -> Response {
        let mut response = Response::new(body.into());
        *response.status_mut() = status(code);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(server) = HeaderValue::try_from(format!("Patroni/{}", snap.version())) {
            headers.insert(SERVER, server);
        }
        for (name, value) in &self.extra_headers {
            headers.append(name.clone(), value.clone());
        }
        response
    }

    fn json<T: serde::Serialize>(&self, snap: &NodeSnapshot, code: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => self.respond(snap, code, "application/json", body),
            Err(e) => self.respond(snap, 500, "text/html", format!("cannot serialize: {e}")),
        }
    }

    /// What Python's `send_error` produces: a small HTML page.
    fn error_page(&self, snap: &NodeSnapshot, code: u16) -> Response {
        let code = status(code);
        let reason = code.canonical_reason().unwrap_or("");
        let body = format!(
            "<!DOCTYPE HTML>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>Error response</title></head>\n\
             <body>\n<h1>Error response</h1>\n<p>Error code: {}</p>\n<p>Message: {reason}.</p>\n</body>\n</html>\n",
            code.as_u16()
        );
        self.respond(snap, code.as_u16(), "text/html;charset=utf-8", body)
    }

    /// `POST /failsafe` (§2.6): auth but no member check; see [`crate::failsafe`].
    async fn post_failsafe(
        &self,
        snap: &NodeSnapshot,
        peer: SocketAddr,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        if let Err(denied) = self.ctx.access.check(peer.ip(), authorization, None, false).await {
            return self.respond(snap, denied.status(), "text/html", denied.message());
        }
        let request = match read_json(headers, body, false) {
            Ok(map) => map,
            Err(BadBody::LengthRequired) => return self.error_page(snap, 411),
            Err(BadBody::Malformed) => return self.error_page(snap, 400),
        };
        let xlog = snap.status.xlog.as_ref();
        let lsn = xlog.and_then(|x| x.received_location.max(x.replayed_location));
        let (code, message, lsn) = crate::failsafe::answer(
            snap.failsafe_mode_enabled,
            snap.status.role == "primary",
            &self.ctx.failsafe,
            &request,
            lsn,
            Instant::now(),
        );
        if message.is_empty() {
            return self.error_page(snap, code);
        }
        let mut response = self.respond(snap, code, "text/html", message);
        if let Some(lsn) = lsn.and_then(|l| HeaderValue::try_from(l.to_string()).ok()) {
            response.headers_mut().insert(HeaderName::from_static("lsn"), lsn);
        }
        response
    }

    /// Access control of protected endpoints: allowlist (403), then Basic auth (401).
    async fn protect(
        &self,
        snap: &NodeSnapshot,
        peer: SocketAddr,
        headers: &HeaderMap,
    ) -> Result<(), Response> {
        let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let checked = self
            .ctx
            .access
            .check(peer.ip(), authorization, snap.cluster.as_ref(), true)
            .await;
        checked.map_err(|denied| {
            let mut response = self.respond(snap, denied.status(), "text/html", denied.message());
            if let Denied::Unauthorized(_) = denied {
                response.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"Patroni\""),
                );
            }
            response
        })
    }

    fn text(&self, snap: &NodeSnapshot, reply: ApiReply) -> Response {
        self.respond(snap, reply.status, "text/html", reply.body)
    }

    /// Runs one protected operation (access already checked).
    async fn operate(
        &self,
        snap: &NodeSnapshot,
        op: Operation,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        let optional = matches!(op, Operation::Restart | Operation::Reinitialize);
        let needs_body = matches!(
            op,
            Operation::PatchConfig
                | Operation::PutConfig
                | Operation::Failover(_)
                | Operation::Restart
                | Operation::Reinitialize
        );
        let request = if needs_body {
            match read_json(headers, body, optional) {
                Ok(map) => map,
                Err(BadBody::LengthRequired) => return self.error_page(snap, 411),
                Err(BadBody::Malformed) => {
                    tracing::warn!(
                        "REST API: bad request body: {:?}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    );
                    return self.error_page(snap, 400);
                }
            }
        } else {
            Map::new()
        };
        match op {
            Operation::Reload => self.reload(snap),
            Operation::PatchConfig => self.patch_config(snap, &request).await,
            Operation::PutConfig => self.put_config(snap, request).await,
            Operation::Failover(action) => self.failover(snap, action, &request).await,
            Operation::DeleteSwitchover => self.delete_switchover(snap).await,
            Operation::Restart => self.restart(snap, &request).await,
            Operation::DeleteRestart => {
                let reply = self
                    .ask(
                        "cancelling the scheduled restart",
                        Duration::from_secs(120),
                        |reply| ApiCommand::CancelScheduledRestart { reply },
                    )
                    .await;
                self.text(snap, reply)
            }
            Operation::Reinitialize => self.reinitialize(snap, &request).await,
        }
    }

    /// Asks the runtime to run an HA cycle now; a full queue already holds a wake-up.
    fn wake(&self) {
        if let Err(TrySendError::Closed(_)) = self.ctx.commands.try_send(ApiCommand::Wake) {
            tracing::warn!("REST API: the HA loop is gone; cannot wake it");
        }
    }

    /// Hands a command with a reply channel to the runtime and waits (bounded) for the answer.
    async fn ask(
        &self,
        what: &str,
        wait: Duration,
        make: impl FnOnce(oneshot::Sender<ApiReply>) -> ApiCommand,
    ) -> ApiReply {
        let (tx, rx) = oneshot::channel();
        match tokio::time::timeout(Duration::from_secs(10), self.ctx.commands.send(make(tx))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return ApiReply::new(503, format!("{what} failed: the HA loop has stopped")),
            Err(_) => {
                return ApiReply::new(
                    503,
                    format!("{what} failed: the HA loop did not take the request within 10 seconds"),
                );
            }
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => ApiReply::new(503, format!("{what} failed: the HA loop dropped the request")),
            Err(_) => ApiReply::new(
                503,
                format!(
                    "{what}: no answer from the HA loop after {} seconds; it may still be in progress",
                    wait.as_secs()
                ),
            ),
        }
    }

    /// A fresh DCS read for a write; on failure the 503 answer to send.
    async fn fresh_cluster(&self, snap: &NodeSnapshot) -> Result<ClusterView, Response> {
        self.read_cluster().await.map_err(|e| self.dcs_error(snap, &e))
    }

    /// A fresh DCS read bounded by [`CLUSTER_READ_TIMEOUT`].
    async fn read_cluster(&self) -> Result<ClusterView, String> {
        match tokio::time::timeout(CLUSTER_READ_TIMEOUT, self.ctx.dcs.get_cluster()).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("DCS read timed out after {CLUSTER_READ_TIMEOUT:?}")),
        }
    }

    /// A fresh read, or the cached view when the DCS does not answer.
    async fn read_cluster_or_cached(&self, snap: &NodeSnapshot) -> Result<ClusterView, String> {
        match self.read_cluster().await {
            Ok(view) => Ok(view),
            Err(e) => snap.cluster.clone().ok_or(e),
        }
    }

    fn dcs_error(&self, snap: &NodeSnapshot, error: &str) -> Response {
        tracing::warn!("REST API: DCS read failed: {error}");
        self.json(
            snap,
            503,
            &json!({ "error": format!("DCS is not accessible: {error}") }),
        )
    }

    async fn get_cluster(&self, snap: &NodeSnapshot) -> Response {
        match self.read_cluster().await {
            Ok(view) => self.json(
                snap,
                200,
                &pgvigil_api::rest::cluster_document(&snap.scope, &view),
            ),
            Err(e) => self.dcs_error(snap, &e),
        }
    }

    async fn get_history(&self, snap: &NodeSnapshot) -> Response {
        match self.read_cluster_or_cached(snap).await {
            Ok(view) => self.json(snap, 200, &view.history_entries()),
            Err(e) => self.dcs_error(snap, &e),
        }
    }

    async fn get_config(&self, snap: &NodeSnapshot) -> Response {
        match self.read_cluster_or_cached(snap).await {
            Ok(view) => match view.config {
                Some(config) if config.mod_revision != 0 => self.json::<Value>(snap, 200, &config.value),
                _ => self.error_page(snap, 502),
            },
            Err(e) => self.dcs_error(snap, &e),
        }
    }
}

/// A response with the status line only (HAProxy reads nothing else).
fn status_only(code: u16) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status(code);
    response
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
