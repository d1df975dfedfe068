//! What pgvigil writes into PostgreSQL's configuration: the effective parameters, pg_hba, and
//! the recovery settings for following an upstream (`docs/patroni-compat.md` §3.9, §5.2, §5.7).

use std::collections::BTreeMap;

use pgvigil_api::ClusterView;
use pgvigil_config::{Config, DynamicConfig, StandbyClusterConfig};
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
    // Recovery settings given as parameters are written only on a standby, with the rest of
    // its recovery settings ([`recovery_settings`]), as Patroni does.
    parameters.retain(|name, _| !is_recovery_parameter(name));
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
/// follows (the leader, or the member it cascades from: both keep a slot for it, §5.8).
///
/// With `nostream` nothing streams, whoever the caller names (a rewind restarts towards the
/// member it rewound from): no `primary_conninfo`, no slot; the node replays what its
/// `restore_command` fetches from the archive (§5.7).
pub fn recovery(
    pg: &Postgres,
    cfg: &Config,
    dynamic: &DynamicConfig,
    cluster: Option<&ClusterView>,
    upstream: Option<&str>,
) -> RecoveryConf {
    let upstream = upstream.filter(|_| !cfg.tags.nostream);
    let upstream_addr = upstream.and_then(|name| cluster?.member(name)?.data.host_port());
    let primary_conninfo = upstream_addr
        .as_ref()
        .map(|(host, port)| Postgres::primary_conninfo(host, *port, pg.settings()));
    let primary_slot_name =
        (dynamic.use_slots && primary_conninfo.is_some()).then(|| pgvigil_postgres::slot_name_for(&cfg.name));
    let mut extra = recovery_settings(cfg, dynamic);
    // In a standby cluster every member may need the archive of the remote (Patroni's
    // `_get_node_to_follow` hands the section's commands to the member it follows).
    if let Some(sc) = &dynamic.standby_cluster {
        standby_commands(sc, &mut extra, false);
    }
    RecoveryConf {
        primary_conninfo,
        primary_slot_name,
        recovery_target_timeline: "latest".into(),
        extra,
    }
}

/// Recovery settings of a standby cluster's leader (`docs/patroni-compat.md` §4.11, Patroni's
/// `build_recovery_params` for a `RemoteMember`): stream from the section's `host:port` with the
/// replication credentials, through `primary_slot_name` when the section names one (made a
/// valid slot name as Patroni does), and the section's `restore_command`,
/// `archive_cleanup_command` and `recovery_min_apply_delay`.
pub fn remote_recovery(
    pg: &Postgres,
    cfg: &Config,
    dynamic: &DynamicConfig,
    sc: &StandbyClusterConfig,
) -> RecoveryConf {
    let primary_conninfo = sc
        .remote()
        .map(|(host, port)| Postgres::primary_conninfo(&host, port, pg.settings()));
    let primary_slot_name = sc
        .primary_slot_name
        .as_deref()
        .filter(|_| dynamic.use_slots && primary_conninfo.is_some())
        .map(pgvigil_postgres::slot_name_for);
    let mut extra = recovery_settings(cfg, dynamic);
    standby_commands(sc, &mut extra, true);
    RecoveryConf {
        primary_conninfo,
        primary_slot_name,
        recovery_target_timeline: "latest".into(),
        extra,
    }
}

fn is_recovery_parameter(name: &str) -> bool {
    pgvigil_postgres::RECOVERY_PARAMETERS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
}

/// A standby's own recovery settings (`restore_command`, `recovery_min_apply_delay`, ...), as
/// Patroni takes them (`_adjust_recovery_parameters`): the recovery parameters among
/// `postgresql.parameters` (dynamic and local) when there are any, which then replace
/// `postgresql.recovery_conf`, else `postgresql.recovery_conf`. Targets, `primary_conninfo` and
/// `primary_slot_name` are the agent's to set.
fn recovery_settings(cfg: &Config, dynamic: &DynamicConfig) -> BTreeMap<String, String> {
    let (parameters, _) = pgvigil_config::effective_parameters(cfg, dynamic, PG_MAJOR);
    let mut settings: BTreeMap<String, String> = parameters
        .into_iter()
        .filter(|(name, _)| is_recovery_parameter(name))
        .collect();
    if settings.is_empty() {
        settings = cfg
            .postgresql
            .recovery_conf
            .iter()
            .map(|(k, v)| (k.clone(), pgvigil_config::guc_to_string(v)))
            .collect();
    }
    settings.retain(|k, _| {
        let k = k.to_ascii_lowercase();
        !k.starts_with("recovery_target") && k != "primary_conninfo" && k != "primary_slot_name"
    });
    settings
}

/// The section's recovery commands, over the user's; `recovery_min_apply_delay` only for the
/// standby leader (`remote`), as in Patroni.
fn standby_commands(sc: &StandbyClusterConfig, extra: &mut BTreeMap<String, String>, remote: bool) {
    let delay = sc.recovery_min_apply_delay.as_ref().filter(|_| remote);
    let commands = [
        ("restore_command", sc.restore_command.as_ref()),
        ("archive_cleanup_command", sc.archive_cleanup_command.as_ref()),
        ("recovery_min_apply_delay", delay),
    ];
    for (key, value) in commands {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            extra.insert(key.into(), v.clone());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(parameters: &[(&str, &str)], recovery_conf: &[(&str, &str)]) -> Config {
        let mut cfg = Config::default();
        for (k, v) in parameters {
            cfg.postgresql.parameters.insert(k.to_string(), json!(v));
        }
        for (k, v) in recovery_conf {
            cfg.postgresql.recovery_conf.insert(k.to_string(), json!(v));
        }
        cfg
    }

    #[test]
    fn recovery_conf_gives_the_standby_its_restore_command() {
        let cfg = config(
            &[],
            &[
                ("restore_command", "cp /archive/%f %p"),
                ("recovery_target_time", "2026-01-01"),
                ("primary_conninfo", "host=elsewhere"),
            ],
        );
        let settings = recovery_settings(&cfg, &DynamicConfig::default());
        assert_eq!(
            settings,
            BTreeMap::from([("restore_command".to_string(), "cp /archive/%f %p".to_string())])
        );
    }

    #[test]
    fn recovery_parameters_among_the_parameters_replace_recovery_conf() {
        let cfg = config(
            &[("restore_command", "cp /a/%f %p"), ("work_mem", "8MB")],
            &[
                ("restore_command", "cp /b/%f %p"),
                ("recovery_min_apply_delay", "5min"),
            ],
        );
        let dynamic = DynamicConfig::default();
        let settings = recovery_settings(&cfg, &dynamic);
        assert_eq!(
            settings,
            BTreeMap::from([("restore_command".to_string(), "cp /a/%f %p".to_string())])
        );
        // Written only with the recovery settings, never among a primary's parameters.
        let (parameters, _) = super::parameters(&cfg, &dynamic, None, false);
        assert!(!parameters.contains_key("restore_command"), "{parameters:?}");
        assert_eq!(parameters.get("work_mem").map(String::as_str), Some("8MB"));
    }

    /// The standby leader gets the section's three recovery settings over the user's; the other
    /// members only the two commands (Patroni's `build_recovery_params`).
    #[test]
    fn the_sections_commands_go_to_every_member_the_delay_only_to_the_standby_leader() {
        let sc = StandbyClusterConfig {
            host: Some("10.0.0.9".into()),
            restore_command: Some("cp /archive/%f %p".into()),
            archive_cleanup_command: Some("pg_archivecleanup /archive %r".into()),
            recovery_min_apply_delay: Some("5min".into()),
            ..Default::default()
        };
        let user = || BTreeMap::from([("restore_command".to_string(), "false".to_string())]);
        let mut leader = user();
        standby_commands(&sc, &mut leader, true);
        assert_eq!(leader["restore_command"], "cp /archive/%f %p");
        assert_eq!(leader["archive_cleanup_command"], "pg_archivecleanup /archive %r");
        assert_eq!(leader["recovery_min_apply_delay"], "5min");
        let mut replica = user();
        standby_commands(&sc, &mut replica, false);
        assert_eq!(replica["restore_command"], "cp /archive/%f %p");
        assert!(!replica.contains_key("recovery_min_apply_delay"));
        // Without commands in the section the user's stay.
        let mut kept = user();
        standby_commands(&StandbyClusterConfig::default(), &mut kept, true);
        assert_eq!(kept, user());
    }
}
