//! The handlers of the protected endpoints (`docs/patroni-compat.md` §2.6): configuration writes,
//! switchover and failover, restart, reinitialize and reload. Validation is in
//! `crate::operator`; this adds the DCS reads and writes and the commands to the agent.

use std::time::Duration;

use axum::response::Response;
use pgvigil_api::{ClusterView, FailoverValue};
use serde_json::{Map, Value};
use tokio::sync::mpsc::error::TrySendError;

use super::App;
use crate::operator::{self, FailoverAction};
use crate::snapshot::NodeSnapshot;
use crate::{ApiCommand, ApiReply, CLUSTER_READ_TIMEOUT, COMMAND_REPLY_TIMEOUT};

impl App {
    pub(super) async fn patch_config(&self, snap: &NodeSnapshot, patch: &Map<String, Value>) -> Response {
        let view = match self.fresh_cluster(snap).await {
            Ok(v) => v,
            Err(response) => return response,
        };
        let Some(config) = view.config.filter(|c| c.mod_revision != 0) else {
            return self.error_page(snap, 503);
        };
        let Value::Object(mut data) = config.value else {
            return self.error_page(snap, 503);
        };
        if operator::patch_config(&mut data, patch) {
            let value = Value::Object(data.clone());
            match self
                .bounded_write(self.ctx.dcs.set_config(&value, Some(config.mod_revision)))
                .await
            {
                Ok(true) => {
                    let patch = serde_json::to_string(patch).unwrap_or_default();
                    tracing::info!("REST API: configuration patched: {patch}");
                }
                Ok(false) => return self.error_page(snap, 409),
                Err(e) => {
                    tracing::warn!("REST API: writing the configuration failed: {e}");
                    return self.error_page(snap, 503);
                }
            }
        }
        self.wake();
        self.json(snap, 200, &Value::Object(data))
    }

    pub(super) async fn put_config(&self, snap: &NodeSnapshot, request: Map<String, Value>) -> Response {
        let view = match self.fresh_cluster(snap).await {
            Ok(v) => v,
            Err(response) => return response,
        };
        let identical = view
            .config
            .as_ref()
            .and_then(|c| c.value.as_object())
            .is_some_and(|current| operator::deep_compare(&request, current));
        let value = Value::Object(request);
        if !identical {
            match self.bounded_write(self.ctx.dcs.set_config(&value, None)).await {
                Ok(true) => tracing::info!("REST API: configuration replaced"),
                Ok(false) => return self.error_page(snap, 502),
                Err(e) => {
                    tracing::warn!("REST API: writing the configuration failed: {e}");
                    return self.error_page(snap, 502);
                }
            }
        }
        self.wake();
        self.json(snap, 200, &value)
    }

    /// A DCS write bounded like the reads.
    pub(super) async fn bounded_write(
        &self,
        write: impl std::future::Future<Output = Result<bool, pgvigil_dcs::DcsError>>,
    ) -> Result<bool, String> {
        match tokio::time::timeout(CLUSTER_READ_TIMEOUT * 3, write).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "DCS write timed out after {:?}",
                CLUSTER_READ_TIMEOUT * 3
            )),
        }
    }

    pub(super) async fn failover(
        &self,
        snap: &NodeSnapshot,
        action: FailoverAction,
        body: &Map<String, Value>,
    ) -> Response {
        let view = match self.fresh_cluster(snap).await {
            Ok(v) => v,
            Err(response) => return response,
        };
        let paused = view.is_paused();
        let request = match operator::validate_failover(body, action, paused, chrono::Utc::now()) {
            Ok(r) => r,
            Err(reply) => return self.text(snap, reply),
        };
        let action = request.action;
        if let Some(busy) = &snap.busy
            && request.scheduled_at.is_none()
        {
            return self.text(
                snap,
                ApiReply::new(
                    503,
                    format!(
                        "{} not possible now: {busy}; try again when it is done",
                        action.title()
                    ),
                ),
            );
        }
        tracing::info!(
            "received {} request with leader={:?} candidate={:?} scheduled_at={:?}",
            action.name(),
            request.leader,
            request.candidate,
            request.scheduled_at
        );
        if request.scheduled_at.is_none()
            && let Err(reason) = self
                .failover_possible(
                    &view,
                    action,
                    request.leader.as_deref(),
                    request.candidate.as_deref(),
                )
                .await
        {
            return self.text(snap, ApiReply::new(412, reason));
        }
        let value = FailoverValue {
            leader: request.leader.clone(),
            member: request.candidate.clone(),
            scheduled_at: request.scheduled_at.as_ref().map(operator::isoformat),
        };
        match self.bounded_write(self.ctx.dcs.set_failover(&value, None)).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                return self.text(snap, ApiReply::new(503, "failed to write failover key into DCS"));
            }
        }
        self.wake();
        if request.scheduled_at.is_some() {
            return self.text(snap, ApiReply::new(202, format!("{} scheduled", action.title())));
        }
        let reply = self
            .poll_failover(snap, view.leader_name(), request.candidate.as_deref(), action)
            .await;
        self.text(snap, reply)
    }

    /// Rule 6 of `docs/patroni-compat.md` §2.6: some member must be able to take over.
    pub(super) async fn failover_possible(
        &self,
        view: &ClusterView,
        action: FailoverAction,
        leader: Option<&str>,
        candidate: Option<&str>,
    ) -> Result<(), String> {
        let members = operator::feasibility_members(view, action, leader, candidate)?;
        let mut checks = tokio::task::JoinSet::new();
        for member in members {
            let peers = self.ctx.peers.clone();
            let url = member.data.api_url.clone();
            checks.spawn(async move {
                if url.is_empty() {
                    return None;
                }
                peers.fetch_status(&url, Duration::from_secs(2)).await
            });
        }
        while let Some(joined) = checks.join_next().await {
            if operator::failover_limitation(joined.ok().flatten().as_ref()).is_none() {
                return Ok(());
            }
        }
        Err(format!(
            "{} is not possible: no good candidates have been found",
            action.name()
        ))
    }

    /// Polls the DCS every second until the switchover shows an outcome or the time is up.
    pub(super) async fn poll_failover(
        &self,
        snap: &NodeSnapshot,
        old_leader: Option<&str>,
        candidate: Option<&str>,
        action: FailoverAction,
    ) -> ApiReply {
        let seconds = operator::poll_seconds(snap.loop_wait);
        for _ in 0..seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match self.read_cluster().await {
                Ok(view) => {
                    if let Some(reply) = operator::poll_outcome(&view, old_leader, candidate, action) {
                        return reply;
                    }
                }
                Err(e) => tracing::debug!("polling the {} result: {e}", action.name()),
            }
        }
        operator::poll_timeout(action, seconds)
    }

    pub(super) async fn delete_switchover(&self, snap: &NodeSnapshot) -> Response {
        let view = match self.fresh_cluster(snap).await {
            Ok(v) => v,
            Err(response) => return response,
        };
        let scheduled = view
            .failover
            .as_ref()
            .filter(|f| f.value.scheduled_at.as_deref().is_some_and(|s| !s.is_empty()));
        let Some(failover) = scheduled else {
            return self.text(snap, ApiReply::new(404, "no switchover is scheduled"));
        };
        match self
            .bounded_write(
                self.ctx
                    .dcs
                    .set_failover(&FailoverValue::default(), Some(failover.mod_revision)),
            )
            .await
        {
            Ok(true) => {
                self.wake();
                self.text(snap, ApiReply::new(200, "scheduled switchover deleted"))
            }
            Ok(false) | Err(_) => self.error_page(snap, 409),
        }
    }

    pub(super) async fn restart(&self, snap: &NodeSnapshot, body: &Map<String, Value>) -> Response {
        let paused = snap.paused || snap.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let request = match operator::validate_restart(body, paused, chrono::Utc::now()) {
            Ok(r) => r,
            Err(reply) => return self.text(snap, reply),
        };
        if !body.is_empty() {
            let body = serde_json::to_string(body).unwrap_or_default();
            tracing::info!("received restart request: {body}");
        }
        let wait = COMMAND_REPLY_TIMEOUT.max(Duration::from_secs(
            request.timeout.unwrap_or(0).saturating_add(120),
        ));
        let reply = self
            .ask("restart", wait, |reply| ApiCommand::Restart { request, reply })
            .await;
        self.text(snap, reply)
    }

    pub(super) async fn reinitialize(&self, snap: &NodeSnapshot, body: &Map<String, Value>) -> Response {
        let flag = |key: &str| match body.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(v) => operator::parse_bool(v)
                .ok_or_else(|| ApiReply::new(400, format!("{key} should be a boolean, not {v}"))),
        };
        let (force, from_leader) = match (flag("force"), flag("from_leader")) {
            (Ok(f), Ok(l)) => (f, l),
            (Err(reply), _) | (_, Err(reply)) => return self.text(snap, reply),
        };
        if !body.is_empty() {
            let body = serde_json::to_string(body).unwrap_or_default();
            tracing::info!("received reinitialize request: {body}");
        }
        if let Ok(view) = self.read_cluster_or_cached(snap).await {
            match view.leader_name() {
                None => {
                    return self.text(
                        snap,
                        ApiReply::new(503, "Cluster has no leader, can not reinitialize"),
                    );
                }
                Some(leader) if leader == snap.name => {
                    return self.text(snap, ApiReply::new(503, "I am the leader, can not reinitialize"));
                }
                Some(_) => {}
            }
        }
        let reply = self
            .ask("reinitialize", COMMAND_REPLY_TIMEOUT, |reply| {
                ApiCommand::Reinitialize {
                    force,
                    from_leader,
                    reply,
                }
            })
            .await;
        self.text(snap, reply)
    }

    pub(super) fn reload(&self, snap: &NodeSnapshot) -> Response {
        match self.ctx.commands.try_send(ApiCommand::Reload) {
            // A full queue already holds a pending command; the reload will still be seen.
            Ok(()) | Err(TrySendError::Full(_)) => self.respond(snap, 202, "text/html", "reload scheduled"),
            Err(TrySendError::Closed(_)) => self.respond(snap, 503, "text/html", "reload failed"),
        }
    }
}
