//! Applying the dynamic configuration (the DCS `config` key) and caching it in
//! `<data_dir>/patroni.dynamic.json` so that a wiped DCS can be restored (`docs/patroni-compat.md`
//! §3.1).

use std::path::PathBuf;
use std::time::Duration;

use pgvigil_api::ClusterView;
use pgvigil_config::DynamicConfig;
use serde_json::Value;

use super::Agent;

pub const CACHE_FILE: &str = "patroni.dynamic.json";

impl Agent {
    fn dynamic_cache_path(&self) -> PathBuf {
        self.cfg.postgresql.data_dir.join(CACHE_FILE)
    }

    /// The dynamic configuration to use before the DCS has one: the cache written by an earlier
    /// run, else `bootstrap.dcs`.
    pub fn initial_dynamic(cfg: &pgvigil_config::Config) -> DynamicConfig {
        let cached = std::fs::read_to_string(cfg.postgresql.data_dir.join(CACHE_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .filter(Value::is_object);
        let source = cached.unwrap_or_else(|| cfg.bootstrap.dcs.clone());
        let (dynamic, warnings) = DynamicConfig::from_json(&source);
        for w in warnings {
            tracing::warn!("{w}");
        }
        dynamic
    }

    /// Adopts a changed `config` key (timings reach `Leadership` at the end of the cycle; new
    /// parameters are applied when the engine decides it is safe, [`Agent::apply_config`]).
    /// Restores the key from our cache when the leader finds it missing.
    pub(super) async fn apply_dynamic_config(&mut self, cluster: &ClusterView) {
        let Some(config) = &cluster.config else {
            if self.leadership.holds_lock() {
                let value = self.dynamic.raw.clone();
                let retry = Duration::from_secs(self.dynamic.retry_timeout);
                if let Ok(Ok(_)) = tokio::time::timeout(retry, self.dcs.set_config(&value, None)).await {
                    tracing::info!("restored the missing config key from the local cache");
                }
            }
            return;
        };
        if config.mod_revision == self.dynamic_revision {
            return;
        }
        let (dynamic, warnings) = DynamicConfig::from_json(&config.value);
        for w in warnings {
            tracing::warn!("{w}");
        }
        let timing_changed = dynamic.ttl != self.dynamic.ttl
            || dynamic.loop_wait != self.dynamic.loop_wait
            || dynamic.retry_timeout != self.dynamic.retry_timeout;
        self.dynamic = dynamic;
        self.dynamic_revision = config.mod_revision;
        if timing_changed {
            tracing::info!(
                "timings now ttl={} loop_wait={} retry_timeout={}",
                self.dynamic.ttl,
                self.dynamic.loop_wait,
                self.dynamic.retry_timeout
            );
        }
        self.config_dirty = true;
        self.write_dynamic_cache();
    }

    fn write_dynamic_cache(&self) {
        let path = self.dynamic_cache_path();
        let Some(dir) = path.parent().filter(|d| d.is_dir()) else {
            return;
        };
        if !dir.join("PG_VERSION").exists() {
            return;
        }
        let tmp = dir.join(format!("{CACHE_FILE}.tmp"));
        let text = self.dynamic.raw.to_string();
        let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            tracing::warn!("could not write {}: {e}", path.display());
        }
    }

    /// Whether PostgreSQL runs with a configuration other than the one we would write now:
    /// parameters changed (dynamic configuration, synchronous standbys), or a reload or a new
    /// dynamic configuration may have changed the files.
    pub(super) fn config_pending(&self) -> bool {
        if !self.pg.is_running() {
            return false;
        }
        let (parameters, _) = super::pgconf::parameters(&self.cfg, &self.dynamic, self.sync_guc.as_deref());
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
        let recovery = self.status.as_ref().filter(|s| s.in_recovery).map(|_| {
            super::pgconf::recovery(
                &self.pg,
                &self.cfg,
                &self.dynamic,
                self.cluster.as_ref(),
                upstream.as_deref(),
            )
        });
        let files = super::pgconf::files(&self.cfg, &self.dynamic, self.sync_guc.as_deref(), recovery);
        if let Err(e) = self.pg.write_config(&files) {
            tracing::error!("could not rewrite the PostgreSQL configuration: {e}");
            return;
        }
        match self.pg.reload().await {
            Ok(()) => {
                tracing::info!("reloaded PostgreSQL configuration");
                self.written_parameters = Some(files.parameters);
                self.config_dirty = false;
            }
            Err(e) => tracing::error!("PostgreSQL reload failed: {e}"),
        }
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
