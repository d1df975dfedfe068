//! Synchronous replication on the leader: steps the engine's state machine
//! ([`pgvigil_engine::sync::next_step`]) until it converges, bounded to a few seconds per
//! cycle. Key writes are compare-and-set; a GUC change is written, reloaded, and followed by a
//! tiny local-commit transaction so standbys can confirm the new position quickly.

use std::time::{Duration, Instant};

use pgvigil_api::ClusterView;
use pgvigil_config::SyncMode as ConfigSyncMode;
use pgvigil_engine::sync::{SyncInput, SyncMode, SyncStep, WalSender, next_step};

use super::PgSupervisor;

pub fn engine_mode(mode: ConfigSyncMode) -> SyncMode {
    match mode {
        ConfigSyncMode::Off => SyncMode::Off,
        ConfigSyncMode::On => SyncMode::On,
        ConfigSyncMode::Quorum => SyncMode::Quorum,
    }
}

impl PgSupervisor {
    fn walsenders(&self) -> Vec<WalSender> {
        let Some(st) = &self.status else { return Vec::new() };
        let pick = match st.synchronous_commit.as_str() {
            "remote_apply" => |w: &pgvigil_postgres::WalSender| w.replay_lsn,
            "remote_write" => |w: &pgvigil_postgres::WalSender| w.write_lsn,
            _ => |w: &pgvigil_postgres::WalSender| w.flush_lsn,
        };
        let now = std::time::Instant::now();
        st.walsenders
            .iter()
            .map(|w| WalSender {
                application_name: w.application_name.clone(),
                // A standby that stopped flushing is not a candidate, whatever its walsender
                // says (see `sync_watch`).
                state: if self.sync_watch.is_stalled(&w.application_name, now) {
                    "stalled".to_string()
                } else {
                    w.state.clone().unwrap_or_default()
                },
                sync_state: w.sync_state.clone().unwrap_or_default(),
                lsn: pick(w).unwrap_or(0),
            })
            .collect()
    }

    /// Leader with a running primary: bring the GUC and the `sync` key to their target.
    pub(super) async fn manage_sync(&mut self, view: &ClusterView) {
        let mode = engine_mode(self.dynamic.synchronous_mode);
        if mode == SyncMode::Off && view.sync.is_none() {
            if self.standby_names.take().is_some() {
                self.apply_config().await;
            }
            return;
        }
        let mut view = view.clone();
        if mode != SyncMode::Off && self.standby_names.is_none() {
            // Adopt what runs, so the first step compares against reality.
            self.standby_names = self.status.as_ref().map(|s| s.synchronous_standby_names.clone());
        }
        let retry = Duration::from_secs(self.dynamic.retry_timeout);
        let deadline = Instant::now() + Duration::from_secs(3);
        for _ in 0..8 {
            let senders = self.walsenders();
            let current_guc = self.standby_names.clone().unwrap_or_default();
            let step = next_step(&SyncInput {
                me: &self.cfg.name,
                mode,
                strict: self.dynamic.synchronous_mode_strict,
                node_count: self.dynamic.synchronous_node_count as usize,
                maximum_lag_on_syncnode: self.dynamic.maximum_lag_on_syncnode,
                cluster: &view,
                current_guc: &current_guc,
                walsenders: &senders,
                guc_changed_at: self.standby_names_changed_at_lsn,
                primary_lsn: self.status.as_ref().and_then(|s| s.wal_flush_lsn).unwrap_or(0),
            });
            let Some(step) = step else { return };
            match step {
                SyncStep::WriteKey(value) => {
                    let revision = view.sync.as_ref().map(|s| s.mod_revision);
                    match tokio::time::timeout(retry, self.dcs.set_sync(&value, revision)).await {
                        Ok(Ok(true)) => tracing::info!(
                            "synchronous standbys now {:?} (quorum {})",
                            value.sync_standby.as_deref().unwrap_or(""),
                            value.quorum
                        ),
                        Ok(Ok(false)) => {
                            tracing::info!("the sync key changed under us; retrying next cycle");
                            return;
                        }
                        Ok(Err(e)) => return tracing::warn!("could not write the sync key: {e}"),
                        Err(_) => return tracing::warn!("writing the sync key timed out"),
                    }
                    match tokio::time::timeout(retry, self.dcs.get_cluster()).await {
                        Ok(Ok(fresh)) => view = fresh,
                        _ => return,
                    }
                }
                SyncStep::SetGuc(guc) => {
                    tracing::info!("setting synchronous_standby_names to {guc:?}");
                    self.standby_names = Some(guc);
                    self.apply_config().await;
                    self.mark_guc_change().await;
                    if !self.wait_for_confirmation(deadline).await {
                        return;
                    }
                }
                SyncStep::DeleteKey => {
                    let revision = view.sync.as_ref().map(|s| s.mod_revision);
                    match tokio::time::timeout(retry, self.dcs.delete_sync(revision)).await {
                        Ok(Ok(_)) => tracing::info!("synchronous replication switched off"),
                        Ok(Err(e)) => tracing::warn!("could not delete the sync key: {e}"),
                        Err(_) => tracing::warn!("deleting the sync key timed out"),
                    }
                    self.standby_names = None;
                    self.apply_config().await;
                    return;
                }
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Writes a local-only commit so the flush position moves past the GUC change, and records
    /// that position: a newly listed standby is trusted once it confirmed this far.
    async fn mark_guc_change(&mut self) {
        let sql = "BEGIN; SET LOCAL synchronous_commit TO local; SELECT pg_catalog.txid_current(); COMMIT;";
        if let Err(e) = self.pg.execute(sql, Duration::from_secs(2)).await {
            tracing::warn!("could not write the marker transaction: {e}");
        }
        if let Ok(st) = self.pg.query_state(Duration::from_secs(2)).await {
            self.standby_names_changed_at_lsn = st.wal_flush_lsn.unwrap_or(0);
            self.status = Some(st);
        }
    }

    /// Re-reads the walsenders until the listed standbys report the new state, up to `deadline`.
    async fn wait_for_confirmation(&mut self, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.pg.query_state(Duration::from_secs(2)).await {
                Ok(st) => {
                    let target = self.standby_names_changed_at_lsn;
                    let confirmed = st.walsenders.iter().any(|w| {
                        matches!(w.sync_state.as_deref(), Some("sync" | "quorum"))
                            && w.flush_lsn.unwrap_or(0) >= target
                    });
                    self.status = Some(st);
                    if confirmed {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }
}
