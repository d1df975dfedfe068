//! The GUCs pgvigil writes to `postgresql.conf` (`docs/patroni-compat.md` §3.9): dynamic
//! `postgresql.parameters` overlaid by the local ones, except the Patroni-controlled GUCs, which
//! come from the dynamic configuration only and are validated against minimums.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::dynamic::DynamicConfig;
use crate::model::Config;
use crate::walk::{as_bool, as_i64};

/// How a Patroni-controlled GUC is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ControlledGuc {
    /// `listen_addresses`, `port`, `cluster_name`: derived from the local configuration.
    Derived,
    /// One of a fixed set of values (case-insensitive).
    OneOf(&'static [&'static str]),
    /// Must be a true boolean (`hot_standby`).
    BoolTrue,
    /// Any boolean.
    Bool,
    /// An integer of at least this value.
    IntMin(i64),
    /// A size in MB (units allowed) of at least this value.
    SizeMbMin(i64),
}

use ControlledGuc::*;

/// Name, default, validation (Patroni's `CMDLINE_OPTIONS`).
const CONTROLLED: &[(&str, &str, ControlledGuc)] = &[
    ("listen_addresses", "", Derived),
    ("port", "", Derived),
    ("cluster_name", "", Derived),
    (
        "wal_level",
        "hot_standby",
        OneOf(&["hot_standby", "replica", "logical"]),
    ),
    ("hot_standby", "on", BoolTrue),
    ("max_connections", "100", IntMin(25)),
    ("max_wal_senders", "10", IntMin(3)),
    ("wal_keep_segments", "8", IntMin(1)),
    ("wal_keep_size", "128MB", SizeMbMin(16)),
    ("max_prepared_transactions", "0", IntMin(0)),
    ("max_locks_per_transaction", "64", IntMin(32)),
    ("track_commit_timestamp", "off", Bool),
    ("max_replication_slots", "10", IntMin(4)),
    ("max_worker_processes", "8", IntMin(2)),
    ("wal_log_hints", "on", Bool),
];

/// Whether `name` (any case) is a Patroni-controlled GUC, and how it is validated.
pub(crate) fn controlled_guc(name: &str) -> Option<ControlledGuc> {
    let lower = name.to_ascii_lowercase();
    CONTROLLED
        .iter()
        .find(|(n, _, _)| *n == lower)
        .map(|(_, _, c)| *c)
}

/// Names of the Patroni-controlled GUCs (always passed on the postmaster command line, except
/// `wal_keep_segments`/`wal_keep_size`).
pub fn controlled_gucs() -> impl Iterator<Item = &'static str> {
    CONTROLLED.iter().map(|(n, _, _)| *n)
}

/// Renders a GUC value for `postgresql.conf` / the command line: booleans as `on`/`off`,
/// numbers as written, lists joined with commas, `null` as the empty string.
pub fn guc_to_string(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(true) => "on".to_string(),
        Value::Bool(false) => "off".to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(guc_to_string).collect::<Vec<_>>().join(","),
        Value::Object(_) => v.to_string(),
    }
}

/// A size in MB from `128`, `"128"`, `"128MB"`, `"1GB"`, `"16384kB"` (PostgreSQL's units).
pub(crate) fn size_mb(v: &Value) -> Option<i64> {
    if let Some(n) = as_i64(v) {
        return Some(n);
    }
    let s = v.as_str()?.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '-'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: i64 = num.parse().ok()?;
    let kb: i64 = match unit.trim() {
        "B" => return Some(num.saturating_add(512 * 1024) / (1024 * 1024)),
        "kB" => 1,
        "" | "MB" => 1024,
        "GB" => 1024 * 1024,
        "TB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    Some(num.checked_mul(kb)? / 1024)
}

/// Validates a dynamic value of a controlled GUC; `Some(normalized)` if acceptable.
fn validate(check: ControlledGuc, v: &Value) -> Option<Value> {
    match check {
        Derived => None,
        OneOf(allowed) => {
            let s = v.as_str()?.trim().to_ascii_lowercase();
            allowed.contains(&s.as_str()).then_some(Value::String(s))
        }
        BoolTrue => as_bool(v).filter(|b| *b).map(Value::Bool),
        Bool => as_bool(v).map(Value::Bool),
        IntMin(min) => as_i64(v).filter(|n| *n >= min).map(Value::from),
        SizeMbMin(min) => size_mb(v).filter(|n| *n >= min).map(|_| v.clone()),
    }
}

/// The GUCs to write to `postgresql.conf`, rendered as strings, and warnings about dynamic
/// values that failed validation (the default is used for those).
///
/// * start from the defaults of the Patroni-controlled GUCs;
/// * overlay dynamic `postgresql.parameters` (controlled ones validated; `listen_addresses`,
///   `port`, `cluster_name` ignored);
/// * overlay local `postgresql.parameters`, except controlled GUCs (already warned about at
///   load time);
/// * `listen_addresses`/`port` from `postgresql.listen`, `cluster_name` = scope;
/// * `wal_level: hot_standby` is written as `replica`;
/// * `wal_keep_segments` ↔ `wal_keep_size` converted for the major version (16 MB segments).
///
/// Names are lower-cased (GUC names are case-insensitive). `pg_major` is the major version
/// (`16`); a `server_version_num` (`160004`) is accepted too. Role-specific overrides,
/// `synchronous_standby_names`, `hba_file`/`ident_file` defaults and recovery settings are
/// not handled here.
pub fn effective_parameters(
    cfg: &Config,
    dynamic: &DynamicConfig,
    pg_major: u32,
) -> (BTreeMap<String, String>, Vec<String>) {
    let major = if pg_major >= 1000 {
        pg_major / 10000
    } else {
        pg_major
    };
    let mut warnings = Vec::new();
    let mut params: BTreeMap<String, Value> = CONTROLLED
        .iter()
        .filter(|(name, _, check)| *check != Derived && !name.starts_with("wal_keep_"))
        .map(|(name, default, _)| (name.to_string(), Value::String(default.to_string())))
        .collect();
    for (name, value) in &dynamic.parameters {
        let lower = name.to_ascii_lowercase();
        let Some((_, default, check)) = CONTROLLED.iter().find(|(n, _, _)| *n == lower) else {
            params.insert(lower, value.clone());
            continue;
        };
        if *check == Derived {
            warnings.push(format!(
                "dynamic configuration: postgresql.parameters.{name}: set by pgvigil from postgresql.listen and scope; ignored"
            ));
            continue;
        }
        match validate(*check, value) {
            Some(v) => {
                params.insert(lower, v);
            }
            None => warnings.push(format!(
                "dynamic configuration: postgresql.parameters.{name}={} failed validation, defaulting to {default}",
                guc_to_string(value)
            )),
        }
    }
    for (name, value) in &cfg.postgresql.parameters {
        let lower = name.to_ascii_lowercase();
        if controlled_guc(&lower).is_none() {
            params.insert(lower, value.clone());
        }
    }
    let (addresses, port) = cfg.postgresql.listen_addresses_and_port();
    params.insert("listen_addresses".into(), Value::String(addresses));
    params.insert("port".into(), Value::from(port));
    params.insert("cluster_name".into(), Value::String(cfg.scope.clone()));
    if params.get("wal_level").and_then(Value::as_str) == Some("hot_standby") {
        params.insert("wal_level".into(), Value::String("replica".into()));
    }
    if major >= 13 {
        let segments = params
            .remove("wal_keep_segments")
            .and_then(|v| as_i64(&v))
            .unwrap_or(8);
        params
            .entry("wal_keep_size".into())
            .or_insert_with(|| Value::String(format!("{}MB", segments.saturating_mul(16))));
    } else {
        let size = params
            .remove("wal_keep_size")
            .and_then(|v| size_mb(&v))
            .unwrap_or(128);
        params
            .entry("wal_keep_segments".into())
            .or_insert_with(|| Value::from(size.saturating_add(8) / 16));
    }
    let config_dir = cfg.postgresql.effective_config_dir();
    for key in ["hba_file", "ident_file"] {
        if let Some(Value::String(file)) = params.get(key)
            && !file.starts_with('/')
            && !config_dir.as_os_str().is_empty()
        {
            let joined = config_dir.join(file).to_string_lossy().into_owned();
            params.insert(key.into(), Value::String(joined));
        }
    }
    let rendered = params.into_iter().map(|(k, v)| (k, guc_to_string(&v))).collect();
    (rendered, warnings)
}
