//! PostgreSQL's configuration files as the supervisor writes them: one builder for "the
//! recovery settings, the files, the write", and the guard that no path changes the
//! configuration of a primary that does not hold the lock.

use pgvigil_postgres::ConfigFiles;

use super::{PgSupervisor, pgconf};

/// Where PostgreSQL should stream from, for [`PgSupervisor::config_files`].
pub(super) enum Recovery<'a> {
    /// A primary: no recovery settings.
    None,
    /// A replica following this member (`None`: read-only without an upstream).
    Follow(Option<&'a str>),
    /// A standby cluster's leader following the remote primary (`docs/patroni-compat.md` §4.11). Without an active
    /// section (it went away meanwhile), read-only without an upstream.
    Remote,
}

impl PgSupervisor {
    /// The files to write: parameters (with the synchronous standbys the sync manager chose),
    /// `pg_hba`, and the recovery settings for `recovery`.
    pub(super) fn config_files(&self, recovery: Recovery<'_>) -> ConfigFiles {
        let recovery = match recovery {
            Recovery::None => None,
            Recovery::Follow(upstream) => Some(pgconf::recovery(
                &self.pg,
                &self.cfg,
                &self.dynamic,
                self.cluster.as_ref(),
                upstream,
            )),
            Recovery::Remote => Some(match &self.dynamic.standby_cluster {
                Some(sc) => pgconf::remote_recovery(&self.pg, &self.cfg, &self.dynamic, sc),
                None => pgconf::recovery(&self.pg, &self.cfg, &self.dynamic, self.cluster.as_ref(), None),
            }),
        };
        let names = self.standby_names.as_deref();
        pgconf::files(
            &self.cfg,
            &self.dynamic,
            names,
            self.hot_standby_feedback,
            recovery,
        )
    }

    /// Writes `files` and records what was written.
    pub(super) fn write_config(&mut self, files: &ConfigFiles) -> Result<(), pgvigil_postgres::PgError> {
        self.pg.write_config(files)?;
        self.written_parameters = Some(files.parameters.clone());
        self.config_dirty = false;
        Ok(())
    }

    /// Whether PostgreSQL runs with a configuration other than the one we would write now:
    /// parameters changed (dynamic configuration, synchronous standbys), or a reload or a new
    /// dynamic configuration may have changed the files.
    pub fn config_pending(&self) -> bool {
        if !self.pg.is_running() {
            return false;
        }
        let names = self.standby_names.as_deref();
        let (parameters, _) = pgconf::parameters(&self.cfg, &self.dynamic, names, self.hot_standby_feedback);
        self.config_dirty || self.written_parameters.as_ref() != Some(&parameters)
    }

    /// A running primary whose lock is not proven: nothing may change its configuration. A
    /// reload could shorten `synchronous_standby_names` and release commits that only this
    /// node has, after another node was promoted (acknowledged, then lost in the rewind).
    pub(super) fn primary_without_lock(&self) -> bool {
        let primary = self.status.as_ref().is_none_or(|s| !s.in_recovery);
        self.pg.is_running() && primary && !self.leadership.holds_lock()
    }

    /// Writes PostgreSQL's configuration files and reloads, when something changed. Refused on
    /// a primary without the lock, whoever asks ([`Agent::primary_without_lock`]).
    pub(super) async fn apply_config(&mut self) {
        if !self.pg.is_running() || !self.config_pending() {
            return;
        }
        if self.primary_without_lock() {
            tracing::warn!("not changing the configuration of a primary that does not hold the leader lock");
            return;
        }
        let upstream = self.upstream_name();
        let in_recovery = self.status.as_ref().is_some_and(|s| s.in_recovery);
        let files = if in_recovery && self.follows_remote {
            self.config_files(Recovery::Remote)
        } else if in_recovery {
            self.config_files(Recovery::Follow(upstream.as_deref()))
        } else {
            self.config_files(Recovery::None)
        };
        let written = self.written_parameters.clone();
        if let Err(e) = self.write_config(&files) {
            tracing::error!("could not rewrite the PostgreSQL configuration: {e}");
            return;
        }
        if let Err(e) = self.pg.reload().await {
            tracing::error!("PostgreSQL reload failed: {e}");
            // Not applied: the next cycle tries again.
            self.written_parameters = written;
            self.config_dirty = true;
            return;
        }
        tracing::info!("reloaded PostgreSQL configuration");
        let role = self.current_role();
        self.callback(super::callbacks::Event::Reload, role);
    }

    /// The member name our `primary_conninfo` currently points at, if we know it.
    pub(super) fn upstream_name(&self) -> Option<String> {
        let (host, port) = self.configured_upstream.as_ref()?;
        self.cluster
            .as_ref()?
            .members
            .iter()
            .find(|m| m.data.host_port().is_some_and(|(h, p)| &h == host && p == *port))
            .map(|m| m.name.clone())
    }
}
