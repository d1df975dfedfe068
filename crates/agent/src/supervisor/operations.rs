//! PostgreSQL operations an operator asks for: a restart in place, and the clean stop of a
//! planned switchover (the hand-over that follows is the engine's, `pgvigil_engine::operator`).

use std::time::{Duration, Instant};

use pgvigil_api::{PgState, Role};
use pgvigil_engine::SwitchoverStop;
use pgvigil_postgres::{Postgres, StopMode};
use serde_json::{Map, Value};

use super::PgSupervisor;
use super::actions::{Failed, Outcome};
use super::callbacks::Event;
use super::config::Recovery;

impl PgSupervisor {
    /// Stops PostgreSQL fast and starts it again in its current role. The leader keeps the
    /// lock (`Leadership` proves it while the loop reports progress); a primary is started
    /// again only with a permit, asked once more when it is up.
    pub(super) async fn restart_postgres(&mut self, timeout: Option<u64>) -> Result<(), String> {
        self.restart_postgres_with(timeout, |_| Ok(())).await
    }

    /// [`Self::restart_postgres`], running `while_stopped` on the data directory between the
    /// stop and the start. PostgreSQL is started again whatever it returns; its error is the
    /// restart's.
    pub(super) async fn restart_postgres_with(
        &mut self,
        timeout: Option<u64>,
        while_stopped: impl FnOnce(&Postgres) -> Result<(), String>,
    ) -> Result<(), String> {
        let was_replica = self.status.as_ref().is_some_and(|s| s.in_recovery);
        if !was_replica && !self.leadership.permits_primary() {
            return Err("a primary is restarted only by the holder of the leader lock".into());
        }
        let timeout = Duration::from_secs(timeout.unwrap_or(self.dynamic.primary_start_timeout).max(10));
        self.state = PgState::Restarting;
        self.publish_member().await;
        // on_restart replaces on_stop and on_start (Patroni blocks them during a restart).
        self.stop_postgres(StopMode::Fast, timeout, None)
            .await
            .map_err(|e| format!("stop: {e}"))?;
        let changed = while_stopped(&self.pg);
        let files = if was_replica && self.follows_remote {
            self.config_files(Recovery::Remote)
        } else if was_replica {
            let upstream = self
                .upstream_name()
                .or_else(|| self.cluster.as_ref()?.leader_name().map(str::to_string));
            self.config_files(Recovery::Follow(upstream.as_deref()))
        } else {
            self.config_files(Recovery::None)
        };
        self.write_config(&files)
            .map_err(|e| format!("writing the configuration: {e}"))?;
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
                let role = if was_replica { Role::Replica } else { Role::Primary };
                self.callback(Event::Restart, role);
                changed
            }
            Err(e) => {
                self.state = PgState::RestartFailed;
                Err(format!("start: {e}"))
            }
        }
    }

    /// Planned switchover: checkpoint (so the clean stop is short), stop cleanly, and remember
    /// where the shutdown checkpoint begins. Every commit acknowledged before the stop precedes
    /// it in the WAL, so a candidate past it has them all; the engine releases the lock once
    /// one is (or after a while without).
    pub(super) async fn stop_for_switchover(&mut self, candidates: Vec<String>) -> Outcome {
        let pg_ctl_timeout = Duration::from_secs(self.cfg.postgresql.pg_ctl_timeout.max(1));
        if let Err(e) = self.pg.execute("CHECKPOINT", Duration::from_secs(60)).await {
            tracing::warn!("checkpoint before switchover failed: {e}");
        }
        self.state = PgState::Stopping;
        self.publish_member().await;
        // Patroni's graceful demotion reports the stop as `demoted` once the replicas have
        // the shutdown checkpoint, which is what a switchover waits for.
        self.stop_postgres(StopMode::Fast, pg_ctl_timeout, Some(Role::Demoted))
            .await
            .map_err(|e| Failed::Recoverable(format!("switchover stop: {e}")))?;
        self.state = PgState::Stopped;
        self.role = Role::Demoted;
        self.status = None;
        self.standby_names = None;
        let shutdown_lsn = match self.pg.controldata().await {
            Ok(cd) => cd.checkpoint_lsn,
            Err(e) => return Err(Failed::Recoverable(format!("switchover: pg_controldata: {e}"))),
        };
        self.memory.switchover = Some(SwitchoverStop {
            since: Instant::now(),
            shutdown_lsn,
            candidates,
        });
        Ok(true)
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
