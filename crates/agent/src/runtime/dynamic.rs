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
    /// parameters reach the supervisor and are applied when the engine decides it is safe).
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
}
