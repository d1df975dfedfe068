//! What pgvigil writes into PostgreSQL's configuration: the effective parameters, pg_hba, and
//! the recovery settings for following an upstream (`docs/patroni-compat.md` §3.9, §5.2, §5.7).

use std::collections::BTreeMap;

use pgvigil_api::ClusterView;
use pgvigil_config::{Config, DynamicConfig};
use pgvigil_postgres::{ConfigFiles, Postgres, RecoveryConf};

/// The major version pgvigil manages (Debian 12's PostgreSQL).
pub const PG_MAJOR: u32 = 15;

/// Parameters for `postgresql.conf`, with warnings about values that were replaced. While
/// synchronous replication is managed, `sync_guc` is the `synchronous_standby_names` the leader
/// chose; otherwise the user's own value stands. `hot_standby_feedback` is forced on for copies
/// of permanent logical slots (§3.9, §5.8), as Patroni does.
pub fn parameters(
    cfg: &Config,
    dynamic: &DynamicConfig,
    sync_guc: Option<&str>,
    hot_standby_feedback: bool,
) -> (BTreeMap<String, String>, Vec<String>) {
    let (mut parameters, warnings) = pgvigil_config::effective_parameters(cfg, dynamic, PG_MAJOR);
    if let Some(guc) = sync_guc {
        parameters.insert("synchronous_standby_names".into(), guc.to_string());
    }
    if hot_standby_feedback {
        parameters.insert("hot_standby_feedback".into(), "on".into());
    }
    (parameters, warnings)
}

/// The lines of `pg_hba.conf` when pgvigil manages it: local `postgresql.pg_hba` wins over the
/// dynamic one; `None` leaves the file alone.
pub fn pg_hba(cfg: &Config, dynamic: &DynamicConfig) -> Option<Vec<String>> {
    cfg.postgresql.pg_hba.clone().or_else(|| dynamic.pg_hba.clone())
}

/// Recovery settings to stream from `upstream` (a member name, looked up in `cluster`), or to
/// stay read-only without one. The node streams through its own slot on whichever member it
/// follows (the leader, or the member it cascades from: both keep a slot for it, §5.8), except
/// with `nostream`, for which nobody keeps one.
pub fn recovery(
    pg: &Postgres,
    cfg: &Config,
    dynamic: &DynamicConfig,
    cluster: Option<&ClusterView>,
    upstream: Option<&str>,
) -> RecoveryConf {
    let upstream_addr = upstream.and_then(|name| cluster?.member(name)?.data.host_port());
    let primary_conninfo = upstream_addr
        .as_ref()
        .map(|(host, port)| Postgres::primary_conninfo(host, *port, pg.settings()));
    let primary_slot_name = (dynamic.use_slots && !cfg.tags.nostream && primary_conninfo.is_some())
        .then(|| pgvigil_postgres::slot_name_for(&cfg.name));
    let extra = cfg
        .postgresql
        .recovery_conf
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("recovery_target") && *k != "primary_conninfo" && *k != "primary_slot_name"
        })
        .map(|(k, v)| (k.clone(), pgvigil_config::guc_to_string(v)))
        .collect();
    RecoveryConf {
        primary_conninfo,
        primary_slot_name,
        recovery_target_timeline: "latest".into(),
        extra,
    }
}

/// Everything to write before starting or reloading PostgreSQL.
pub fn files(
    cfg: &Config,
    dynamic: &DynamicConfig,
    sync_guc: Option<&str>,
    hot_standby_feedback: bool,
    recovery_conf: Option<RecoveryConf>,
) -> ConfigFiles {
    let (parameters, warnings) = parameters(cfg, dynamic, sync_guc, hot_standby_feedback);
    for w in warnings {
        tracing::warn!("{w}");
    }
    ConfigFiles {
        parameters,
        recovery: recovery_conf,
        pg_hba: pg_hba(cfg, dynamic),
        restore: Default::default(),
    }
}
