//! Bootstrapping a new cluster (`docs/patroni-compat.md` §5.3): the `initialize` race, `initdb`
//! or a custom method (`custom_bootstrap.rs`), the roles, `post_bootstrap`, and the first
//! `initialize`, `config` and leader keys; a failed bootstrap moves the data directory aside.

use std::path::PathBuf;
use std::time::Duration;

use pgvigil_api::{PgState, Role};
use pgvigil_dcs::TermOpening;
use pgvigil_postgres::StopMode;

use super::PgSupervisor;
use super::actions::{Failed, Outcome};
use super::callbacks::Event;
use super::config::Recovery;
use super::pgconf;

impl PgSupervisor {
    /// The race for `initialize`; the winner reports `state` from now on.
    pub(super) async fn won_initialize_race(&mut self, state: PgState) -> Result<bool, Failed> {
        if !self
            .dcs_call("bootstrap race", self.dcs.initialize_race())
            .await?
        {
            tracing::info!("failed to acquire initialize lock");
            return Ok(false);
        }
        self.state = state;
        self.publish_member().await;
        Ok(true)
    }

    pub(super) async fn bootstrap(&mut self) -> Outcome {
        if !self.won_initialize_race(PgState::InitializingNewCluster).await? {
            return Ok(false);
        }
        match self.bootstrap_steps().await {
            Ok(()) => {
                tracing::info!("initialized a new cluster");
                // No callback runs during the bootstrap itself; Patroni calls on_start after it.
                self.callback(Event::Start, Role::Primary);
                Ok(true)
            }
            Err(message) => {
                // Leave nothing half-done: another node may try again.
                let _ = self.dcs.cancel_initialization().await;
                let _ = self.pg.stop(StopMode::Immediate, self.pg_ctl_timeout()).await;
                let data_dir = self.cfg.postgresql.data_dir.clone();
                let mut failed = data_dir.clone().into_os_string();
                failed.push(".failed");
                let failed = PathBuf::from(failed);
                let _ = std::fs::remove_dir_all(&failed);
                let moved = match std::fs::rename(&data_dir, &failed) {
                    Ok(()) => format!("; the data directory was moved to {}", failed.display()),
                    Err(e) => format!("; could not move the data directory aside: {e}"),
                };
                self.state = match self.cfg.bootstrap.custom {
                    Some(_) => PgState::CustomBootstrapFailed,
                    None => PgState::InitdbFailed,
                };
                Err(Failed::Fatal(format!("bootstrap failed: {message}{moved}")))
            }
        }
    }

    async fn bootstrap_steps(&mut self) -> Result<(), String> {
        let opened = match self.cfg.bootstrap.custom.clone() {
            Some(method) => Some(self.custom_bootstrap(&method).await?),
            None => {
                self.initdb_and_start().await?;
                None
            }
        };
        self.pg
            .create_roles()
            .await
            .map_err(|e| format!("creating roles: {e}"))?;
        if let Some(script) = self.cfg.bootstrap.post_bootstrap.clone() {
            self.run_post_bootstrap(&script).await?;
        }
        if let Some(opened) = opened {
            self.close_custom_bootstrap(opened).await?;
        }
        self.publish_new_cluster().await
    }

    /// The end of a bootstrap: the system identifier into `initialize`, `bootstrap.dcs` into
    /// `config`, and the leader key taken.
    pub(super) async fn publish_new_cluster(&mut self) -> Result<(), String> {
        let cd = self
            .pg
            .controldata()
            .await
            .map_err(|e| format!("pg_controldata: {e}"))?;
        let dcs = self.dcs.clone();
        let retry = self.retry();
        let bounded = |what: &'static str| {
            move |r: Result<Result<(), pgvigil_dcs::DcsError>, _>| match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("{what}: {e}")),
                Err(_) => Err(format!("{what}: timed out")),
            }
        };
        bounded("publishing the system identifier")(
            tokio::time::timeout(retry, dcs.set_initialize(&cd.system_identifier)).await,
        )?;
        let config = self.cfg.bootstrap.dcs.clone();
        let written = tokio::time::timeout(retry, dcs.set_config(&config, None)).await;
        bounded("writing the dynamic configuration")(written.map(|r| r.map(|_| ())))?;
        match tokio::time::timeout(retry, self.leadership.open(TermOpening::Acquire)).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err("taking the leader key: another member holds it".into()),
            Ok(Err(e)) => Err(format!("taking the leader key: {e}")),
            Err(_) => Err("taking the leader key: timed out".into()),
        }
    }

    /// `initdb` with `bootstrap.initdb`, `bootstrap.pg_hba` appended unless pgvigil manages
    /// the file, the configuration written, PostgreSQL started.
    async fn initdb_and_start(&mut self) -> Result<(), String> {
        let cfg = &self.cfg;
        self.pg
            .initdb(&cfg.bootstrap.initdb)
            .await
            .map_err(|e| format!("initdb: {e}"))?;
        if pgconf::pg_hba(cfg, &self.dynamic).is_none() && !cfg.bootstrap.pg_hba.is_empty() {
            let path = self.pg.data_dir().join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            append_bootstrap_hba(&mut text, &cfg.bootstrap.pg_hba);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        self.write_pgpass().map_err(failed_text)?;
        let files = self.config_files(Recovery::None);
        self.start_new_cluster(&files, PgState::Starting).await
    }

    /// Writes `files` and starts the new cluster's PostgreSQL (in `state` meanwhile).
    pub(super) async fn start_new_cluster(
        &mut self,
        files: &pgvigil_postgres::ConfigFiles,
        state: PgState,
    ) -> Result<(), String> {
        self.write_config(files)
            .map_err(|e| format!("writing the configuration: {e}"))?;
        self.state = state;
        self.pg
            .start(self.pg_ctl_timeout())
            .await
            .map_err(|e| format!("starting PostgreSQL: {e}"))?;
        self.state = PgState::Running;
        self.role = Role::Primary;
        Ok(())
    }

    /// `bootstrap.post_bootstrap`: its words with a superuser connection string appended, run
    /// without a shell, as Patroni runs `shlex.split(cmd) + [connstring]`.
    async fn run_post_bootstrap(&self, script: &[String]) -> Result<(), String> {
        let s = self.pg.settings();
        let Some((program, args)) = script.split_first() else {
            return Ok(());
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).arg(self.pg.superuser_dsn()).kill_on_drop(true);
        cmd.env("PGPASSFILE", &s.pgpass)
            .env("PGOPTIONS", "-c synchronous_commit=local -c statement_timeout=0");
        let status = tokio::time::timeout(Duration::from_secs(3600), cmd.status())
            .await
            .map_err(|_| "post_bootstrap script timed out".to_string())?
            .map_err(|e| format!("post_bootstrap script {program}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("post_bootstrap script {program} failed: {status}"))
        }
    }
}

/// `bootstrap.pg_hba` appended to a `pg_hba.conf` pgvigil does not manage.
pub(super) fn append_bootstrap_hba(text: &mut String, lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    text.push_str("\n# bootstrap.pg_hba\n");
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
}

pub(super) fn failed_text(f: Failed) -> String {
    match f {
        Failed::Fatal(m) | Failed::Recoverable(m) => m,
    }
}
