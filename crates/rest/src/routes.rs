//! Request dispatch, the way Patroni's handler does it (`patroni-compat.md` §2.1): the method
//! and the first path segment select a handler; any other `GET` runs the generic health check;
//! `HEAD` and `OPTIONS` on any path answer with the status line only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, SERVER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use pgvigil_api::ClusterView;
use serde_json::{Value, json};
use tokio::sync::mpsc::error::TrySendError;

use crate::access::Denied;
use crate::health::{first_segment, generic_code, health_code};
use crate::metrics::render_metrics;
use crate::snapshot::NodeSnapshot;
use crate::{ApiCommand, CLUSTER_READ_TIMEOUT, RestContext};

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

async fn dispatch(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let snap = app.ctx.snapshot.borrow().clone();
    let now = Instant::now();
    let path = uri.path();
    let query = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let segment = first_segment(path);
    let response = match method {
        Method::GET => match segment {
            "patroni" => app.json(&snap, 200, &snap.status),
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
        Method::POST if segment == "reload" => match app.protect(&snap, peer, &headers).await {
            Err(denied) => denied,
            Ok(()) => app.reload(&snap),
        },
        _ => app.error_page(&snap, 501),
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

    fn reload(&self, snap: &NodeSnapshot) -> Response {
        match self.ctx.commands.try_send(ApiCommand::Reload) {
            // A full queue already holds a pending command; the reload will still be seen.
            Ok(()) | Err(TrySendError::Full(_)) => self.respond(snap, 202, "text/html", "reload scheduled"),
            Err(TrySendError::Closed(_)) => self.respond(snap, 503, "text/html", "reload failed"),
        }
    }

    /// A fresh DCS read bounded by [`CLUSTER_READ_TIMEOUT`].
    async fn read_cluster(&self) -> Result<ClusterView, String> {
        match tokio::time::timeout(CLUSTER_READ_TIMEOUT, self.ctx.cluster.read_cluster()).await {
            Ok(result) => result,
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
