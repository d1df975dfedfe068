//! A new cluster from a user's script instead of initdb (`bootstrap.method` naming a
//! `bootstrap.<method>` section, `docs/patroni-compat.md` §5.3): clone an existing cluster,
//! restore a base backup and replay an archive up to a target. The script runs, its data
//! directory recovers as `recovery_conf` (or its own settings) say, and the roles are set up
//! over a temporary trust-only `pg_hba.conf`: the superuser's password in a cloned cluster is
//! the source's, not ours (Patroni opens the same door for the same reason).

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use pgvigil_api::PgState;
use pgvigil_config::MethodConfig;
use pgvigil_postgres::{Restore, StopMode};

use super::PgSupervisor;
use super::config::Recovery;

/// How long the script and the recovery after it may take together. Restoring a large backup
/// and replaying its archive can take hours; this only keeps a stuck script from holding the
/// `initialize` key for ever.
const CUSTOM_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What the custom bootstrap replaced and must put back once the roles are set up.
pub(super) struct Opened {
    /// The `pg_hba.conf` the script produced (plus `bootstrap.pg_hba`), when pgvigil does not
    /// manage the file.
    original_hba: Option<String>,
}

impl PgSupervisor {
    /// Runs the script, starts PostgreSQL with the method's recovery settings behind a
    /// trust-only `pg_hba.conf`, and waits until it has left recovery (promoted).
    pub(super) async fn custom_bootstrap(&mut self, method: &MethodConfig) -> Result<Opened, String> {
        let deadline = Instant::now() + CUSTOM_BOOTSTRAP_TIMEOUT;
        self.state = PgState::RunningCustomBootstrapScript;
        self.publish_member().await;
        self.pg
            .remove_data_dir()
            .map_err(|e| format!("preparing the data directory: {e}"))?;
        self.write_pgpass().map_err(super::bootstrap::failed_text)?;
        let data_dir = self.pg.data_dir().to_string_lossy().into_owned();
        let args = method.bootstrap_args(&self.cfg.scope, &data_dir);
        tracing::info!("running custom bootstrap script: {}", method.command.join(" "));
        if let Err(e) = self
            .pg
            .run_method(&method.command, &args, CUSTOM_BOOTSTRAP_TIMEOUT)
            .await
        {
            self.state = PgState::CustomBootstrapFailed;
            return Err(format!("custom bootstrap script failed: {e}"));
        }
        if !self.pg.data_dir().join("PG_VERSION").is_file() {
            self.state = PgState::CustomBootstrapFailed;
            return Err(format!(
                "the custom bootstrap script succeeded but left no PostgreSQL data directory in {data_dir}"
            ));
        }
        // Patroni's `_post_restore`: configuration files the backup did not carry come from
        // their `.backup` copies, and a leftover trigger file must not promote early.
        if let Err(e) = self.pg.restore_config_files() {
            tracing::warn!("restoring the configuration files from their .backup copies: {e}");
        }
        let _ = std::fs::remove_file(self.pg.data_dir().join("promote"));

        let hba_path = self.pg.settings().config_dir.join("pg_hba.conf");
        let mut original_hba = None;
        if super::pgconf::pg_hba(&self.cfg, &self.dynamic).is_none() {
            let mut text = std::fs::read_to_string(&hba_path).map_err(|e| {
                format!(
                    "{}: {e} (the custom bootstrap left no pg_hba.conf; set postgresql.pg_hba)",
                    hba_path.display()
                )
            })?;
            super::bootstrap::append_bootstrap_hba(&mut text, &self.cfg.bootstrap.pg_hba);
            original_hba = Some(text);
        }

        let mut files = self.config_files(Recovery::None);
        files.pg_hba = Some(self.trust_hba());
        files
            .parameters
            .insert("hba_file".into(), hba_path.to_string_lossy().into_owned());
        files.restore = if !method.recovery_conf.is_empty() {
            Restore::Settings(
                method
                    .recovery_conf
                    .iter()
                    .map(|(k, v)| (k.clone(), pgvigil_config::guc_to_string(v)))
                    .collect(),
            )
        } else if method.keep_existing_recovery_conf {
            Restore::KeepExisting
        } else {
            Restore::None
        };
        self.start_new_cluster(&files, PgState::StartingAfterCustomBootstrap)
            .await?;
        self.wait_for_end_of_recovery(deadline).await?;
        Ok(Opened { original_hba })
    }

    /// Patroni's "waiting for end of recovery after bootstrap": until `pg_is_in_recovery()` is
    /// false, as long as the postmaster lives.
    async fn wait_for_end_of_recovery(&mut self, deadline: Instant) -> Result<(), String> {
        let mut said = false;
        loop {
            if !self.pg.is_running() {
                return Err("PostgreSQL stopped during the recovery after the custom bootstrap".into());
            }
            match self.pg.is_in_recovery(Duration::from_secs(5)).await {
                Ok(false) => return Ok(()),
                Ok(true) if !said => {
                    tracing::info!("waiting for end of recovery after bootstrap");
                    said = true;
                }
                Ok(true) => {}
                // Not accepting connections yet (archive recovery before consistency).
                Err(e) => tracing::debug!("pg_is_in_recovery(): {e}"),
            }
            if Instant::now() >= deadline {
                return Err("the recovery after the custom bootstrap did not end in time".into());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Trust for the superuser and the replication user, only over the local socket and from
    /// the local listen address.
    fn trust_hba(&self) -> Vec<String> {
        let s = self.pg.settings();
        let (su, rep) = (&s.superuser.username, &s.replication.username);
        let mut lines = vec![
            format!("local all {su} trust"),
            format!("local replication {rep} trust"),
        ];
        let addrs = (s.listen_host.as_str(), s.port)
            .to_socket_addrs()
            .map(|a| a.collect::<Vec<_>>())
            .unwrap_or_default();
        for addr in addrs {
            let net = match addr.ip() {
                std::net::IpAddr::V4(ip) => format!("{ip}/32"),
                std::net::IpAddr::V6(ip) => format!("{ip}/128"),
            };
            lines.push(format!("host all {su} {net} trust"));
            lines.push(format!("host replication {rep} {net} trust"));
        }
        lines.dedup();
        lines
    }

    /// Once the roles exist with our passwords: the real `pg_hba.conf` (managed, or the
    /// script's), the configuration without recovery settings, and a restart: the recovery
    /// targets are postmaster settings on PostgreSQL 15, a reload would leave them pending
    /// (Patroni restarts in that case too).
    pub(super) async fn close_custom_bootstrap(&mut self, opened: Opened) -> Result<(), String> {
        let files = self.config_files(Recovery::None);
        self.write_config(&files)
            .map_err(|e| format!("writing the configuration: {e}"))?;
        if let Some(text) = opened.original_hba {
            let path = self.pg.settings().config_dir.join("pg_hba.conf");
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        self.state = PgState::Restarting;
        self.pg
            .stop(StopMode::Fast, self.pg_ctl_timeout())
            .await
            .map_err(|e| format!("stopping PostgreSQL after the custom bootstrap: {e}"))?;
        self.pg
            .start(self.pg_ctl_timeout())
            .await
            .map_err(|e| format!("starting PostgreSQL after the custom bootstrap: {e}"))?;
        self.state = PgState::Running;
        Ok(())
    }
}
