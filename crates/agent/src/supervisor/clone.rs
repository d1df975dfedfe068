//! Creating a replica's data directory with the methods the engine chose, in its order
//! (`docs/patroni-compat.md` §5.4): `basebackup` is pg_basebackup from the source member, any
//! other name the command of its `postgresql.<method>` section, given Patroni's arguments.

use std::time::Duration;

use pgvigil_api::{ClusterView, PgState, Role};
use pgvigil_engine::ReplicaMethod;
use pgvigil_postgres::StopMode;

use super::PgSupervisor;
use super::actions::{Failed, Outcome, recoverable};

/// How long one method may run (pg_basebackup of a large cluster, a restore from a backup).
const METHOD_TIMEOUT: Duration = Duration::from_secs(3600);

/// `postgresql.create_replica_methods` as the engine sees them: names in order, each with its
/// `no_leader` flag (the configuration guarantees every listed name but `basebackup` has a
/// section). In a standby cluster Patroni clones every member with the section's
/// `create_replica_methods` instead (its `RemoteMember`), `basebackup` when it names none.
pub fn replica_methods(
    pg: &pgvigil_config::PostgresqlConfig,
    dynamic: &pgvigil_config::DynamicConfig,
) -> Vec<ReplicaMethod> {
    let names = match &dynamic.standby_cluster {
        Some(sc) if sc.create_replica_methods.is_empty() => &vec!["basebackup".to_string()],
        Some(sc) => &sc.create_replica_methods,
        None => &pg.create_replica_methods,
    };
    names
        .iter()
        .map(|name| ReplicaMethod {
            name: name.clone(),
            no_leader: name != "basebackup" && pg.replica_methods.get(name).is_some_and(|m| m.no_leader),
        })
        .collect()
}

impl PgSupervisor {
    /// Tries `methods` in order until one succeeds, then starts as a replica following the
    /// leader (none without a leader: a restored backup replays what its own recovery settings
    /// reach). `source` is `None` only for methods that work without a leader. When every
    /// method failed the data directory is left empty and the cycle ends; the next one
    /// decides again.
    pub(super) async fn create_replica(
        &mut self,
        view: Option<&ClusterView>,
        source: Option<&str>,
        methods: &[String],
    ) -> Outcome {
        let addr = match source {
            Some(name) => Some(Self::member_addr(view, name)?),
            None => None,
        };
        self.state = PgState::CreatingReplica;
        self.role = Role::Replica;
        self.publish_member().await;
        self.write_pgpass()?;
        let from = source.map_or_else(|| "without a leader".to_string(), |s| format!("from {s}"));
        self.run_replica_methods(addr.as_ref(), methods, &from)
            .await
            .map_err(Failed::Recoverable)?;
        let leader = view.and_then(ClusterView::leader_name).map(str::to_string);
        self.start_replica(view, leader.as_deref()).await
    }

    /// Runs `methods` in order against `addr` until one creates the data directory (`from`
    /// says what `addr` is, for the log). When every one failed the data directory is removed
    /// and the error names each failure.
    pub(super) async fn run_replica_methods(
        &mut self,
        addr: Option<&(String, u16)>,
        methods: &[String],
        from: &str,
    ) -> Result<(), String> {
        let mut failures = Vec::new();
        let mut created = None;
        for method in methods {
            let result = match (method.as_str(), addr) {
                ("basebackup", Some((host, port))) => self.basebackup(host, *port).await,
                ("basebackup", None) => Err("pg_basebackup needs a server to clone from".to_string()),
                (_, addr) => self.custom_replica_method(method, addr).await,
            };
            match result {
                Ok(()) => {
                    created = Some(method);
                    break;
                }
                Err(e) => {
                    tracing::error!("creating a replica {from} with method {method} failed: {e}");
                    failures.push(format!("{method}: {e}"));
                }
            }
        }
        let Some(method) = created else {
            let _ = self.pg.remove_data_dir();
            self.state = PgState::Stopped;
            self.role = Role::Uninitialized;
            return Err(format!(
                "creating a replica {from} failed: {}",
                failures.join("; ")
            ));
        };
        tracing::info!("replica has been created using {method} ({from})");
        // A restore may leave the configuration files out (they live outside the data directory
        // on the source, or the backup tool skips them): take the copies saved next to the data.
        if let Err(e) = self.pg.restore_config_files() {
            tracing::warn!("restoring the configuration files from their .backup copies: {e}");
        }
        Ok(())
    }

    async fn basebackup(&self, host: &str, port: u16) -> Result<(), String> {
        // Without a fast checkpoint pg_basebackup waits for a spread one, minutes on an idle
        // source; users who configure a checkpoint option keep theirs.
        let mut args = self.cfg.postgresql.basebackup.clone();
        if !args
            .iter()
            .any(|a| a.starts_with("--checkpoint") || a.starts_with("-c"))
        {
            args.push("--checkpoint=fast".into());
        }
        self.pg
            .basebackup(host, port, &args, METHOD_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    }

    /// A `postgresql.<method>` command: the data directory emptied first unless `keep_data`,
    /// and again after a failure unless `keep_data`; `--connstring` empty without a source.
    async fn custom_replica_method(
        &self,
        method: &str,
        source: Option<&(String, u16)>,
    ) -> Result<(), String> {
        let Some(section) = self.cfg.postgresql.replica_methods.get(method) else {
            // The configuration refuses this at load time; a reloaded file cannot add methods.
            return Err(format!("no postgresql.{method} section"));
        };
        if !section.keep_data {
            self.pg.remove_data_dir().map_err(|e| e.to_string())?;
        }
        let connstring = source
            .map(|(host, port)| self.pg.replication_dsn(host, *port))
            .unwrap_or_default();
        let data_dir = self.pg.data_dir().to_string_lossy().into_owned();
        let args = section.replica_args(&self.cfg.scope, &data_dir, &connstring);
        tracing::info!("creating a replica using {method}: {}", section.command.join(" "));
        let result = self
            .pg
            .run_method(&section.command, &args, METHOD_TIMEOUT)
            .await
            .map_err(|e| e.to_string());
        if result.is_err() && !section.keep_data {
            let _ = self.pg.remove_data_dir();
        }
        result
    }

    /// Stops PostgreSQL, empties the data directory and creates it again ([`Self::create_replica`]).
    pub(super) async fn reinitialize(
        &mut self,
        view: Option<&ClusterView>,
        source: &str,
        methods: &[String],
    ) -> Outcome {
        let role = self.current_role();
        self.stop_postgres(StopMode::Immediate, self.pg_ctl_timeout(), Some(role))
            .await
            .map_err(recoverable("stopping to reinitialize"))?;
        self.pg
            .remove_data_dir()
            .map_err(recoverable("removing the data directory"))?;
        self.control = None;
        self.memory.rewind_failed = false;
        self.create_replica(view, Some(source), methods).await
    }
}
