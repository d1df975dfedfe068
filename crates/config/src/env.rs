//! `PATRONI_*` environment overrides (`docs/patroni-compat.md` §3.8), merged over the file. Values
//! stay strings except lists and mappings, which are parsed here (YAML or comma syntax); booleans
//! and integers are checked by the typed walk, whose errors then name the variable.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::ConfigError;
use crate::yaml::{Origins, parse_yaml};

/// The variable holding a whole YAML configuration.
pub const CONFIGURATION_VAR: &str = "PATRONI_CONFIGURATION";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    List,
    Dict,
    LogFormat,
}

use Kind::*;

/// Fixed variables: suffix after `PATRONI_`, key path, kind.
const FIXED: &[(&str, &str, Kind)] = &[
    ("NAME", "name", Str),
    ("NAMESPACE", "namespace", Str),
    ("SCOPE", "scope", Str),
    ("THREAD_POOL_SIZE", "thread_pool_size", Str),
    ("THREAD_STACK_SIZE", "thread_stack_size", Str),
    ("RESTAPI_LISTEN", "restapi.listen", Str),
    ("RESTAPI_CONNECT_ADDRESS", "restapi.connect_address", Str),
    ("RESTAPI_CERTFILE", "restapi.certfile", Str),
    ("RESTAPI_KEYFILE", "restapi.keyfile", Str),
    ("RESTAPI_KEYFILE_PASSWORD", "restapi.keyfile_password", Str),
    ("RESTAPI_CAFILE", "restapi.cafile", Str),
    ("RESTAPI_CIPHERS", "restapi.ciphers", Str),
    ("RESTAPI_VERIFY_CLIENT", "restapi.verify_client", Str),
    ("RESTAPI_HTTP_EXTRA_HEADERS", "restapi.http_extra_headers", Dict),
    ("RESTAPI_HTTPS_EXTRA_HEADERS", "restapi.https_extra_headers", Dict),
    ("RESTAPI_ALLOWLIST", "restapi.allowlist", List),
    (
        "RESTAPI_ALLOWLIST_INCLUDE_MEMBERS",
        "restapi.allowlist_include_members",
        Str,
    ),
    ("RESTAPI_REQUEST_QUEUE_SIZE", "restapi.request_queue_size", Str),
    ("RESTAPI_SERVER_TOKENS", "restapi.server_tokens", Str),
    ("RESTAPI_USERNAME", "restapi.authentication.username", Str),
    ("RESTAPI_PASSWORD", "restapi.authentication.password", Str),
    ("CTL_INSECURE", "ctl.insecure", Str),
    ("CTL_CACERT", "ctl.cacert", Str),
    ("CTL_CERTFILE", "ctl.certfile", Str),
    ("CTL_KEYFILE", "ctl.keyfile", Str),
    ("CTL_KEYFILE_PASSWORD", "ctl.keyfile_password", Str),
    ("CTL_USERNAME", "ctl.authentication.username", Str),
    ("CTL_PASSWORD", "ctl.authentication.password", Str),
    ("POSTGRESQL_LISTEN", "postgresql.listen", Str),
    ("POSTGRESQL_CONNECT_ADDRESS", "postgresql.connect_address", Str),
    ("POSTGRESQL_PROXY_ADDRESS", "postgresql.proxy_address", Str),
    ("POSTGRESQL_CONFIG_DIR", "postgresql.config_dir", Str),
    ("POSTGRESQL_DATA_DIR", "postgresql.data_dir", Str),
    ("POSTGRESQL_PGPASS", "postgresql.pgpass", Str),
    ("POSTGRESQL_BIN_DIR", "postgresql.bin_dir", Str),
    ("LOG_TYPE", "log.type", Str),
    ("LOG_LEVEL", "log.level", Str),
    ("LOG_TRACEBACK_LEVEL", "log.traceback_level", Str),
    ("LOG_FORMAT", "log.format", LogFormat),
    ("LOG_DATEFORMAT", "log.dateformat", Str),
    ("LOG_STATIC_FIELDS", "log.static_fields", Dict),
    ("LOG_MAX_QUEUE_SIZE", "log.max_queue_size", Str),
    ("LOG_DIR", "log.dir", Str),
    ("LOG_MODE", "log.mode", Str),
    ("LOG_FILE_NUM", "log.file_num", Str),
    ("LOG_FILE_SIZE", "log.file_size", Str),
    ("LOG_LOGGERS", "log.loggers", Dict),
    (
        "LOG_DEDUPLICATE_HEARTBEAT_LOGS",
        "log.deduplicate_heartbeat_logs",
        Str,
    ),
    ("ETCD3_USERNAME", "etcd3.username", Str),
    ("ETCD3_PASSWORD", "etcd3.password", Str),
    ("ETCD_USERNAME", "etcd.username", Str),
    ("ETCD_PASSWORD", "etcd.password", Str),
];

/// Old names of the log variables, used only when the new one is not set.
const LEGACY_LOG: &[(&str, &str)] = &[
    ("LOGLEVEL", "LOG_LEVEL"),
    ("LOGFORMAT", "LOG_FORMAT"),
    ("LOG_DATEFMT", "LOG_DATEFORMAT"),
];

const BINARIES: &[&str] = &[
    "PG_CTL",
    "INITDB",
    "PG_CONTROLDATA",
    "PG_BASEBACKUP",
    "POSTGRES",
    "PG_ISREADY",
    "PG_REWIND",
];

const USER_TYPES: &[&str] = &["REPLICATION", "SUPERUSER", "REWIND"];
const AUTH_PARAMS: &[&str] = &[
    "USERNAME",
    "PASSWORD",
    "SSLMODE",
    "SSLKEY",
    "SSLPASSWORD",
    "SSLCERT",
    "SSLROOTCERT",
    "SSLCRL",
    "SSLCRLDIR",
    "SSLNEGOTIATION",
    "GSSENCMODE",
    "CHANNEL_BINDING",
];

/// Patroni's generic `PATRONI_<SECTION>_<SUFFIX>` rule for DCS sections.
const DCS_SUFFIXES: &[&str] = &[
    "HOST",
    "HOSTS",
    "PORT",
    "USE_PROXIES",
    "PROTOCOL",
    "SRV",
    "SRV_SUFFIX",
    "URL",
    "PROXY",
    "CACERT",
    "CERT",
    "KEY",
    "VERIFY",
    "TOKEN",
    "CHECKS",
    "DC",
    "CONSISTENCY",
    "REGISTER_SERVICE",
    "SERVICE_CHECK_INTERVAL",
    "SERVICE_CHECK_TLS_SERVER_NAME",
    "SERVICE_TAGS",
    "NAMESPACE",
    "CONTEXT",
    "USE_ENDPOINTS",
    "SCOPE_LABEL",
    "ROLE_LABEL",
    "POD_IP",
    "PORTS",
    "LABELS",
    "BYPASS_API_SERVICE",
    "RETRIABLE_HTTP_CODES",
    "KEY_PASSWORD",
    "USE_SSL",
    "SET_ACLS",
    "GROUP",
    "DATABASE",
    "LEADER_LABEL_VALUE",
    "FOLLOWER_LABEL_VALUE",
    "STANDBY_LEADER_LABEL_VALUE",
    "TMP_ROLE_LABEL",
    "AUTH_DATA",
    "BOOTSTRAP_LABELS",
];
/// Keys of a DCS section that say where the DCS is; Patroni uses the first of them it finds.
const ENDPOINT_KEYS: &[&str] = &["proxy", "url", "hosts", "host", "srv"];
const DCS_LISTS: &[&str] = &["HOSTS", "PORTS", "CHECKS", "SERVICE_TAGS", "RETRIABLE_HTTP_CODES"];
const DCS_DICTS: &[&str] = &["LABELS", "SET_ACLS", "AUTH_DATA", "BOOTSTRAP_LABELS"];

/// Applies the `PATRONI_*` variables of `env` to `root`, recording each key's origin.
/// Variables with empty values are ignored (as in Patroni); unrecognised `PATRONI_*` variables
/// produce a warning.
pub(crate) fn apply_env(
    root: &mut Map<String, Value>,
    env: &BTreeMap<String, String>,
    origins: &mut Origins,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let mut settings: Vec<(String, String, Kind, String)> = Vec::new(); // (var, path, kind, value)
    let get = |suffix: &str| env.get(&format!("PATRONI_{suffix}")).filter(|v| !v.is_empty());
    let mut handled: Vec<String> = vec![CONFIGURATION_VAR.to_string()];
    for (old, new) in LEGACY_LOG {
        handled.push(format!("PATRONI_{old}"));
        if get(new).is_none()
            && let Some(v) = get(old)
        {
            let (_, path, kind) = FIXED.iter().find(|(s, _, _)| s == new).expect("listed");
            settings.push((format!("PATRONI_{old}"), path.to_string(), *kind, v.clone()));
        }
    }
    for (suffix, path, kind) in FIXED {
        let var = format!("PATRONI_{suffix}");
        if let Some(v) = get(suffix) {
            settings.push((var.clone(), path.to_string(), *kind, v.clone()));
        }
        handled.push(var);
    }
    for bin in BINARIES {
        let var = format!("PATRONI_POSTGRESQL_BIN_{bin}");
        if let Some(v) = get(&format!("POSTGRESQL_BIN_{bin}")) {
            settings.push((
                var.clone(),
                format!("postgresql.bin_name.{}", bin.to_ascii_lowercase()),
                Str,
                v.clone(),
            ));
        }
        handled.push(var);
    }
    for user in USER_TYPES {
        for param in AUTH_PARAMS {
            let var = format!("PATRONI_{user}_{param}");
            if let Some(v) = get(&format!("{user}_{param}")) {
                let path = format!(
                    "postgresql.authentication.{}.{}",
                    user.to_ascii_lowercase(),
                    param.to_ascii_lowercase()
                );
                settings.push((var.clone(), path, Str, v.clone()));
            }
            handled.push(var);
        }
    }
    for (var, value) in env {
        let Some(rest) = var.strip_prefix("PATRONI_") else {
            continue;
        };
        if handled.contains(var) || value.is_empty() {
            continue;
        }
        let (section, suffix) = rest.split_once('_').unwrap_or((rest, ""));
        if section.is_empty() || !DCS_SUFFIXES.contains(&suffix) {
            warnings.push(format!("environment {var}: not a recognized variable; ignored"));
            continue;
        }
        if section == "CITUS" && suffix != "GROUP" && suffix != "DATABASE" {
            warnings.push(format!("environment {var}: not a recognized variable; ignored"));
            continue;
        }
        let kind = if DCS_LISTS.contains(&suffix) {
            List
        } else if DCS_DICTS.contains(&suffix) {
            Dict
        } else {
            Str
        };
        let path = format!("{}.{}", section.to_ascii_lowercase(), suffix.to_ascii_lowercase());
        settings.push((var.clone(), path, kind, value.clone()));
    }
    // An endpoint given in the environment replaces the file's endpoints of the same section
    // (`PATRONI_ETCD3_HOSTS` overrides a `host:` from the file) instead of competing with them.
    for section in ["etcd3", "etcd"] {
        let from_env: Vec<String> = settings
            .iter()
            .filter_map(|(_, path, _, _)| path.strip_prefix(section)?.strip_prefix('.').map(str::to_string))
            .filter(|key| ENDPOINT_KEYS.contains(&key.as_str()))
            .collect();
        if let (false, Some(Value::Object(m))) = (from_env.is_empty(), root.get_mut(section)) {
            m.retain(|k, _| !ENDPOINT_KEYS.contains(&k.as_str()) || from_env.contains(k));
        }
    }
    for (var, path, kind, text) in settings {
        let origin = format!("environment {var}");
        let value = convert(&var, &path, kind, &text)?;
        for created in set_path(root, &path, value) {
            origins.record(&created, &origin);
        }
        origins.record(&path, &origin);
    }
    Ok(())
}

fn convert(var: &str, path: &str, kind: Kind, text: &str) -> Result<Value, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        origin: format!("environment {var}"),
        key: path.to_string(),
        message,
    };
    match kind {
        Str => Ok(Value::String(text.to_string())),
        LogFormat if text.contains("%(") => Ok(Value::String(text.to_string())),
        List | LogFormat => parse_list(text).map_err(invalid),
        Dict => {
            let t = text.trim();
            let wrapped = if t.starts_with('{') {
                t.to_string()
            } else {
                format!("{{{t}}}")
            };
            match parse_yaml(&wrapped, var, &mut Vec::new()) {
                Ok(v @ Value::Object(_)) => Ok(v),
                Ok(other) => Err(invalid(format!(
                    "expected a mapping such as `{{key: value}}`, found {other}"
                ))),
                Err(e) => Err(invalid(format!(
                    "expected a mapping such as `{{key: value}}`: {}",
                    syntax_message(&e)
                ))),
            }
        }
    }
}

/// YAML list syntax (`[a, b]` or `- a`) or a comma-separated list (`a,b`).
fn parse_list(text: &str) -> Result<Value, String> {
    let t = text.trim();
    if t.starts_with('[') || t.starts_with('-') {
        match parse_yaml(t, "list", &mut Vec::new()) {
            Ok(v @ Value::Array(_)) => return Ok(v),
            Ok(other) if t.starts_with('-') => return Err(format!("expected a list, found {other}")),
            Err(e) if t.starts_with('-') => return Err(format!("expected a list: {}", syntax_message(&e))),
            // `[::1]:2379,[::2]:2379` is not YAML: read it as a comma-separated list below.
            _ => {}
        }
    }
    let items: Vec<Value> = t
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| Value::String(s.to_string()))
        .collect();
    if items.is_empty() {
        return Err("expected a list such as `a,b` or `[a, b]`".to_string());
    }
    Ok(Value::Array(items))
}

fn syntax_message(e: &ConfigError) -> String {
    match e {
        ConfigError::Syntax { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Sets a dotted path, creating mappings on the way (replacing non-mappings). A mapping value
/// is merged into an existing mapping, like Patroni's `patch_config`. Returns the paths of the
/// sections it had to create.
fn set_path(root: &mut Map<String, Value>, path: &str, value: Value) -> Vec<String> {
    let mut created = Vec::new();
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("non-empty path");
    let mut cur = root;
    let mut at = String::new();
    for part in parts {
        at = if at.is_empty() {
            part.to_string()
        } else {
            format!("{at}.{part}")
        };
        let entry = cur.entry(part.to_string()).or_insert(Value::Null);
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
            created.push(at.clone());
        }
        cur = entry.as_object_mut().expect("just made an object");
    }
    match (cur.get_mut(last), value) {
        (Some(Value::Object(existing)), Value::Object(new)) => {
            for (k, v) in new {
                if v.is_null() {
                    existing.remove(&k);
                } else {
                    existing.insert(k, v);
                }
            }
        }
        (_, value) => {
            cur.insert(last.to_string(), value);
        }
    }
    created
}
