//! A standby cluster's leader (`docs/patroni-compat.md` §4.11): its bootstrap from the remote
//! primary and its recovery settings pointing there.
//!
//! Fencing: a standby leader holds the lock, so `Leadership`'s fence and fencer know its
//! postmaster like a primary's and stop it when the lock's deadline passes unproven. That is
//! harmless (it accepts no writes) and matches Patroni, which demotes a standby leader that
//! loses the lock to a replica: here the next cycle starts it again in recovery, following
//! whoever holds the key then (`decide.rs` never demotes or stops a replica for a lapsed lock
//! itself). Not fencing it would need the fence to know the role, one more input to a part
//! whose safety argument is that it needs none.

use std::time::Duration;

use pgvigil_api::{PgState, Role};
use pgvigil_postgres::StopMode;

use super::PgSupervisor;
use super::actions::{Failed, Outcome, recoverable};
use super::bootstrap::failed_text;
use super::callbacks::Event;
use super::config::Recovery;

impl PgSupervisor {
    /// `host:port` of the standby cluster's remote primary, if the section names one.
    pub(super) fn remote_addr(&self) -> Option<(String, u16)> {
        self.dynamic.standby_cluster.as_ref()?.remote()
    }

    /// Patroni's `bootstrap_standby_leader`: the race for `initialize`, the data directory
    /// created from the remote with `methods`, PostgreSQL started following the remote, then
    /// the cluster published and the lock taken. A failure leaves nothing behind (the data
    /// directory removed, `initialize` cancelled) and the next cycle decides again.
    pub(super) async fn bootstrap_standby(&mut self, methods: &[String]) -> Outcome {
        if !self.won_initialize_race(PgState::CreatingReplica).await? {
            return Ok(false);
        }
        self.role = Role::Replica;
        match self.bootstrap_standby_steps(methods).await {
            Ok(()) => {
                tracing::info!("bootstrapped a standby leader from the remote primary");
                Ok(true)
            }
            Err(message) => {
                let _ = self.dcs.cancel_initialization().await;
                let _ = self.pg.stop(StopMode::Immediate, self.pg_ctl_timeout()).await;
                let _ = self.pg.remove_data_dir();
                self.control = None;
                self.state = PgState::Stopped;
                self.role = Role::Uninitialized;
                Err(Failed::Recoverable(format!(
                    "bootstrap of a standby leader failed: {message}"
                )))
            }
        }
    }

    async fn bootstrap_standby_steps(&mut self, methods: &[String]) -> Result<(), String> {
        let remote = self.remote_addr();
        self.write_pgpass().map_err(failed_text)?;
        let from = match &remote {
            Some((host, port)) => format!("from the remote primary {host}:{port}"),
            None => "for a standby cluster without a remote host".to_string(),
        };
        self.run_replica_methods(remote.as_ref(), methods, &from).await?;
        self.start_in_recovery(None, None, true)
            .await
            .map_err(failed_text)?;
        self.publish_new_cluster().await
    }

    /// Patroni's `demote-cluster` (§4.11): a fast stop of the primary, `pg_rewind` against the
    /// remote when `use_pg_rewind` is on (it finds nothing to do when the histories have not
    /// diverged), then a start following the remote. A failed rewind still starts it: read-only
    /// is safe, and the operator sees why it does not stream in the log.
    pub(super) async fn demote_cluster(&mut self) -> Outcome {
        let role = self.current_role();
        self.stop_postgres(StopMode::Fast, self.pg_ctl_timeout(), Some(role))
            .await
            .map_err(recoverable("stopping postgres to demote the cluster"))?;
        self.state = PgState::Stopped;
        self.role = Role::Demoted;
        self.standby_names = None;
        if let Some((host, port)) = self.remote_addr()
            && self.cfg.use_pg_rewind(&self.dynamic)
        {
            self.write_pgpass()?;
            tracing::info!("running pg_rewind from the remote primary {host}:{port}");
            if let Err(e) = self.pg.rewind(&host, port, Duration::from_secs(3600)).await {
                tracing::error!("pg_rewind from the remote primary {host}:{port} failed: {e}");
            }
        }
        self.start_in_recovery(None, None, true).await
    }

    /// Points the recovery settings at the remote primary and reloads (PostgreSQL 13+ reads
    /// `primary_conninfo` and `primary_slot_name` on reload, 14+ `restore_command`).
    pub(super) async fn follow_remote(&mut self) -> Outcome {
        self.rewrite_recovery(Recovery::Remote).await?;
        self.follows_remote = true;
        self.configured_upstream = self.remote_addr();
        let role = self.current_role();
        self.callback(Event::Reload, role);
        Ok(false)
    }
}
