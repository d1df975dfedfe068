//! What operators ask for through the REST API and the `failover` key: planned switchover,
//! restart (now or scheduled), reinitialize.

use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, Utc};
use pgvigil_api::{ClusterView, FailoverValue, PgState, Role};
use pgvigil_engine::Action;
use pgvigil_postgres::StopMode;
use pgvigil_rest::{ApiCommand, ApiReply, RestartRequest};
use serde_json::{Map, Value};

use super::Agent;
use super::actions::Failed;

/// A restart waiting for its time (`POST /restart` with `schedule`).
#[derive(Clone, Debug)]
pub struct ScheduledRestart {
    pub request: RestartRequest,
    pub at: DateTime<FixedOffset>,
    /// Cancelled if PostgreSQL was restarted by other means meanwhile.
    pub postmaster_start_time: Option<String>,
}

impl ScheduledRestart {
    /// The `scheduled_restart` object of the member key and the status document.
    pub fn to_json(&self, with_start_time: bool) -> Value {
        let mut m = Map::new();
        m.insert("schedule".into(), Value::from(self.at.to_rfc3339()));
        if with_start_time && let Some(t) = &self.postmaster_start_time {
            m.insert("postmaster_start_time".into(), Value::from(t.clone()));
        }
        if let Some(role) = &self.request.role {
            m.insert("role".into(), Value::from(role.clone()));
        }
        if let Some(v) = &self.request.postgres_version {
            m.insert("postgres_version".into(), Value::from(v.clone()));
        }
        if let Some(t) = self.request.timeout {
            m.insert("timeout".into(), Value::from(t));
        }
        if self.request.restart_pending {
            m.insert("restart_pending".into(), Value::from(true));
        }
        Value::Object(m)
    }
}

/// Seconds until the pending failover's `scheduled_at`; an unparsable time counts as long past,
/// so the leader clears it.
pub fn failover_due_in(cluster: Option<&ClusterView>) -> Option<f64> {
    let at = cluster?.pending_failover()?.scheduled_at.as_deref()?;
    match DateTime::parse_from_rfc3339(at) {
        Ok(at) => Some((at.with_timezone(&Utc) - Utc::now()).num_milliseconds() as f64 / 1000.0),
        Err(_) => Some(f64::NEG_INFINITY),
    }
}

/// `X.Y[.Z]` or a server_version_num → comparable number (150010 for 15.10).
fn version_num(text: &str) -> Option<u32> {
    let parts: Vec<u32> = text
        .split('.')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [major, minor] if *major >= 10 => Some(major * 10000 + minor),
        [major, minor, patch] => Some(major * 10000 + minor * 100 + patch),
        _ => None,
    }
}

impl Agent {
    /// Handles one API command; immediate work (a restart) happens before the reply.
    pub(super) async fn handle_command(&mut self, command: ApiCommand) {
        match command {
            ApiCommand::Reload => self.reload_local_config().await,
            ApiCommand::Wake => {}
            ApiCommand::Restart { request, reply } => {
                let answer = self.restart_request(request).await;
                let _ = reply.send(answer);
            }
            ApiCommand::CancelScheduledRestart { reply } => {
                let answer = match self.scheduled_restart.take() {
                    Some(_) => ApiReply::new(200, "scheduled restart deleted"),
                    None => ApiReply::new(404, "no restarts are scheduled"),
                };
                let _ = reply.send(answer);
            }
            ApiCommand::Reinitialize {
                force,
                from_leader,
                reply,
            } => {
                let answer = self.reinitialize_request(force, from_leader);
                let _ = reply.send(answer);
            }
        }
    }

    fn restart_conditions_met(&self, request: &RestartRequest) -> bool {
        let role = self.current_role();
        if let Some(wanted) = &request.role {
            let matches = match wanted.as_str() {
                "primary" | "master" => role == Role::Primary,
                "replica" => role == Role::Replica,
                "standby_leader" => role == Role::StandbyLeader,
                _ => false,
            };
            if !matches {
                return false;
            }
        }
        if let Some(wanted) = &request.postgres_version {
            let running = self.status.as_ref().map(|s| s.server_version);
            match (version_num(wanted), running) {
                (Some(w), Some(r)) if w > r => {}
                _ => return false,
            }
        }
        !request.restart_pending || self.status.as_ref().is_some_and(|s| s.pending_restart)
    }

    async fn restart_request(&mut self, request: RestartRequest) -> ApiReply {
        if let Some(at) = request.schedule {
            if self.scheduled_restart.is_some() {
                return ApiReply::new(409, "Another restart is already scheduled");
            }
            let postmaster_start_time = self.status.as_ref().map(|s| s.postmaster_start_time.clone());
            self.scheduled_restart = Some(ScheduledRestart {
                request,
                at,
                postmaster_start_time,
            });
            return ApiReply::new(202, "Restart scheduled");
        }
        if !self.restart_conditions_met(&request) {
            return ApiReply::new(503, "restart conditions are not satisfied");
        }
        if !self.pg.is_running() {
            return ApiReply::new(503, "postgres is not running");
        }
        match self.restart_postgres(request.timeout).await {
            Ok(()) => ApiReply::new(200, "restarted successfully"),
            Err(e) => ApiReply::new(503, format!("restart failed: {e}")),
        }
    }

    /// Stops PostgreSQL fast and starts it again in its current role. The leader keeps the
    /// lock (`Leadership` proves it while the loop reports progress); a primary is started
    /// again only with a permit, asked once more when it is up.
    pub(super) async fn restart_postgres(&mut self, timeout: Option<u64>) -> Result<(), String> {
        let was_replica = self.status.as_ref().is_some_and(|s| s.in_recovery);
        if !was_replica && !self.leadership.permits_primary() {
            return Err("a primary is restarted only by the holder of the leader lock".into());
        }
        let timeout = Duration::from_secs(timeout.unwrap_or(self.dynamic.primary_start_timeout).max(10));
        self.leadership
            .loop_alive_for(timeout * 2 + Duration::from_secs(30));
        self.state = PgState::Restarting;
        self.publish_member().await;
        self.pg
            .stop(StopMode::Fast, timeout)
            .await
            .map_err(|e| format!("stop: {e}"))?;
        let files = if was_replica {
            let upstream = self
                .upstream_name()
                .or_else(|| self.cluster.as_ref()?.leader_name().map(str::to_string));
            let cluster = self.cluster.clone();
            let recovery = super::pgconf::recovery(
                &self.pg,
                &self.cfg,
                &self.dynamic,
                cluster.as_ref(),
                upstream.as_deref(),
            );
            super::pgconf::files(&self.cfg, &self.dynamic, self.sync_guc.as_deref(), Some(recovery))
        } else {
            super::pgconf::files(&self.cfg, &self.dynamic, self.sync_guc.as_deref(), None)
        };
        self.pg
            .write_config(&files)
            .map_err(|e| format!("writing the configuration: {e}"))?;
        self.written_parameters = Some(files.parameters.clone());
        // A primary's fences know its postmaster before it runs, and it runs only with a permit
        // asked at that moment (the stop above may have taken long).
        let leadership = &self.leadership;
        let started = self
            .pg
            .start_announced(timeout, |pid| {
                if was_replica {
                    return true;
                }
                leadership.set_postmaster(Some(pid));
                leadership.permits_primary()
            })
            .await;
        self.leadership.set_postmaster(self.pg.postmaster_pid());
        if !was_replica && !self.leadership.permits_primary() {
            let _ = self.pg.stop(StopMode::Immediate, timeout).await;
            self.state = PgState::Stopped;
            return Err("the leader lock lapsed during the restart; stopped postgres again".into());
        }
        match started {
            Ok(()) => {
                self.state = PgState::Running;
                tracing::info!("restarted PostgreSQL");
                Ok(())
            }
            Err(e) => {
                self.state = PgState::RestartFailed;
                Err(format!("start: {e}"))
            }
        }
    }

    /// Runs a scheduled restart once it is due (if its filters still hold and PostgreSQL was
    /// not restarted meanwhile).
    pub(super) async fn run_due_restart(&mut self) {
        let Some(scheduled) = &self.scheduled_restart else {
            return;
        };
        if scheduled.at.with_timezone(&Utc) > Utc::now() {
            return;
        }
        let scheduled = self.scheduled_restart.take().expect("checked above");
        let current_start = self.status.as_ref().map(|s| s.postmaster_start_time.clone());
        if scheduled.postmaster_start_time.is_some() && current_start != scheduled.postmaster_start_time {
            tracing::info!("scheduled restart cancelled: PostgreSQL was restarted meanwhile");
            return;
        }
        if !self.restart_conditions_met(&scheduled.request) {
            tracing::info!("scheduled restart skipped: restart conditions are not satisfied");
            return;
        }
        if let Err(e) = self.restart_postgres(scheduled.request.timeout).await {
            tracing::error!("scheduled restart failed: {e}");
        }
    }

    fn reinitialize_request(&mut self, force: bool, from_leader: bool) -> ApiReply {
        let Some(cluster) = &self.cluster else {
            return ApiReply::new(503, "Cluster has no leader, can not reinitialize");
        };
        let Some(leader) = cluster.leader_name() else {
            return ApiReply::new(503, "Cluster has no leader, can not reinitialize");
        };
        if leader == self.cfg.name {
            return ApiReply::new(503, "I am the leader, can not reinitialize");
        }
        if self.pending_reinit.is_some() && !force {
            return ApiReply::new(503, "reinitialize already in progress");
        }
        self.pending_reinit = Some(from_leader);
        ApiReply::new(200, "reinitialize started")
    }

    /// The reinitialize an operator asked for, done at the start of the next cycle.
    pub(super) async fn run_pending_reinit(&mut self, view: Option<&ClusterView>) -> Result<bool, Failed> {
        let Some(from_leader) = self.pending_reinit.take() else {
            return Ok(false);
        };
        let Some(cluster) = view else {
            return Err(Failed::Recoverable("reinitialize: DCS not readable".into()));
        };
        let Some(leader) = cluster.leader_member() else {
            return Err(Failed::Recoverable("reinitialize: cluster has no leader".into()));
        };
        if leader.name == self.cfg.name {
            return Err(Failed::Recoverable(
                "reinitialize refused: I am the leader".into(),
            ));
        }
        let source = if from_leader {
            leader.name.clone()
        } else {
            cluster
                .members
                .iter()
                .find(|m| {
                    m.name != self.cfg.name
                        && m.name != leader.name
                        && m.data.tag_bool("clonefrom")
                        && m.data.state == "running"
                })
                .map_or_else(|| leader.name.clone(), |m| m.name.clone())
        };
        tracing::info!("reinitializing from {source} as requested");
        self.execute(Action::Reinitialize { source }, view).await
    }

    /// Planned switchover: checkpoint, clean stop, wait for a candidate to have the shutdown
    /// checkpoint, then give the lock up. No acknowledged write is lost because every commit
    /// acknowledged before the stop precedes the shutdown checkpoint in the WAL the candidate
    /// received.
    pub(super) async fn switchover(
        &mut self,
        view: Option<&ClusterView>,
        candidate: Option<String>,
    ) -> Result<bool, Failed> {
        let Some(cluster) = view else {
            return Err(Failed::Recoverable("switchover: DCS not readable".into()));
        };
        let names: Vec<String> = match candidate {
            Some(c) => vec![c],
            None => cluster
                .members
                .iter()
                .filter(|m| m.name != self.cfg.name)
                .map(|m| m.name.clone())
                .collect(),
        };
        // A long step (checkpoint, clean stop, waiting for the candidate): the loop reports
        // for all of it, so the lock is not let go under a checkpoint that takes a while.
        let pg_ctl_timeout = Duration::from_secs(self.cfg.postgresql.pg_ctl_timeout.max(1));
        self.leadership
            .loop_alive_for(Duration::from_secs(60 + 10) + pg_ctl_timeout + self.retry_timeout() * 2);
        // Shorter shutdown: most dirty buffers are written while clients still run.
        if let Err(e) = self.pg.execute("CHECKPOINT", Duration::from_secs(60)).await {
            tracing::warn!("checkpoint before switchover failed: {e}");
        }
        self.state = PgState::Stopping;
        self.publish_member().await;
        self.pg
            .stop(StopMode::Fast, pg_ctl_timeout)
            .await
            .map_err(|e| Failed::Recoverable(format!("switchover stop: {e}")))?;
        self.state = PgState::Stopped;
        self.role = Role::Demoted;
        self.status = None;
        self.sync_guc = None;
        let shutdown_lsn = match self.pg.controldata().await {
            Ok(cd) => cd.checkpoint_lsn,
            Err(e) => return Err(Failed::Recoverable(format!("switchover: pg_controldata: {e}"))),
        };
        let received = self.wait_for_candidate(cluster, &names, shutdown_lsn).await;
        if !received {
            tracing::warn!(
                "no candidate confirmed the shutdown checkpoint within 10 s; releasing the lock anyway"
            );
        }
        let retry = Duration::from_secs(self.dynamic.retry_timeout);
        let status = pgvigil_api::StatusValue {
            optime: shutdown_lsn,
            ..cluster.status.clone()
        };
        let _ = tokio::time::timeout(retry, self.dcs.set_status(&status)).await;
        match tokio::time::timeout(retry, self.leadership.release()).await {
            Ok(Ok(_)) => tracing::info!("switchover: released the leader lock"),
            Ok(Err(e)) => {
                return Err(Failed::Recoverable(format!(
                    "switchover: releasing the lock: {e}"
                )));
            }
            Err(_) => {
                return Err(Failed::Recoverable(
                    "switchover: releasing the lock timed out".into(),
                ));
            }
        }
        Ok(true)
    }

    /// Polls the candidates (bounded, 10 s) until one reports WAL past `lsn`, the start of our
    /// shutdown checkpoint record.
    async fn wait_for_candidate(&self, cluster: &ClusterView, names: &[String], lsn: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for name in names {
                let Some(member) = cluster.member(name).filter(|m| !m.data.api_url.is_empty()) else {
                    continue;
                };
                if let Some(status) = self
                    .peers
                    .fetch_status(&member.data.api_url, Duration::from_secs(2))
                    .await
                    && status.wal_position() > lsn
                {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clears the `failover` key after it was handled, compare-and-set on its revision.
    pub(super) async fn clear_failover(&mut self, view: Option<&ClusterView>) -> Result<bool, Failed> {
        let revision = view.and_then(|c| c.failover.as_ref()).map(|f| f.mod_revision);
        let retry = Duration::from_secs(self.dynamic.retry_timeout);
        match tokio::time::timeout(retry, self.dcs.set_failover(&FailoverValue::default(), revision)).await {
            Ok(Ok(_)) => Ok(false),
            Ok(Err(e)) => Err(Failed::Recoverable(format!("clearing the failover key: {e}"))),
            Err(_) => Err(Failed::Recoverable("clearing the failover key timed out".into())),
        }
    }

    /// `scheduled_restart` and `pending_restart_reason` for the published documents.
    pub(super) fn operator_fields(&self) -> (Option<Value>, Option<Value>) {
        let scheduled = self.scheduled_restart.as_ref().map(|s| s.to_json(true));
        (scheduled, self.pending_restart_reason.clone())
    }

    /// Fills `pending_restart_reason` from pg_settings: the running value against what we wrote.
    pub(super) async fn refresh_pending_restart_reason(&mut self) {
        let pending = self.status.as_ref().is_some_and(|s| s.pending_restart);
        if !pending {
            self.pending_restart_reason = None;
            return;
        }
        let sql = "SELECT name, setting, unit FROM pg_catalog.pg_settings WHERE pending_restart";
        let Ok(rows) = self.pg.query_rows(sql, Duration::from_secs(2)).await else {
            return;
        };
        let mut reasons = Map::new();
        for row in rows {
            let (Some(Some(name)), Some(Some(old))) = (row.first(), row.get(1)) else {
                continue;
            };
            let unit = row.get(2).cloned().flatten().unwrap_or_default();
            let new = self
                .written_parameters
                .as_ref()
                .and_then(|p| p.get(name))
                .cloned()
                .unwrap_or_default();
            let old = if unit.is_empty() || unit == "s" || unit == "ms" {
                old.clone()
            } else {
                format!("{old}{unit}")
            };
            let mut entry = Map::new();
            entry.insert("old_value".into(), Value::from(old));
            entry.insert("new_value".into(), Value::from(new));
            reasons.insert(name.clone(), Value::Object(entry));
        }
        self.pending_restart_reason =
            Some(Value::Object(reasons)).filter(|v| v.as_object().is_some_and(|m| !m.is_empty()));
    }
}
