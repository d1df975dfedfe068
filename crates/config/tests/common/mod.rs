#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pgvigil_config::{ConfigError, Loaded, load};
use serde_json::{Value, json};

/// The smallest configuration the agent accepts.
pub fn minimal() -> Value {
    json!({
        "scope": "demo",
        "name": "node1",
        "restapi": {"listen": "127.0.0.1:8008"},
        "etcd3": {"host": "127.0.0.1:2379"},
        "postgresql": {
            "listen": "127.0.0.1:5432",
            "connect_address": "127.0.0.1:5432",
            "data_dir": "/tmp/pgdata",
            "authentication": {
                "superuser": {"username": "postgres"},
                "replication": {"username": "replicator"}
            }
        }
    })
}

pub fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut e: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    e.entry("HOME".into()).or_insert_with(|| "/home/pg".into());
    e
}

pub fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Loads `text` from a file called `x.yml` in a fresh temporary directory.
pub fn load_text(text: impl AsRef<[u8]>) -> Result<Loaded, ConfigError> {
    load_text_env(text, &[])
}

pub fn load_text_env(text: impl AsRef<[u8]>, vars: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.yml", text);
    load(Some(&p), &env(vars)).map_err(|e| strip_dir(e, dir.path()))
}

pub fn load_value(v: &Value) -> Result<Loaded, ConfigError> {
    load_text(serde_json::to_string_pretty(v).unwrap())
}

/// Replaces the temporary directory in error origins so messages can be compared.
fn strip_dir(e: ConfigError, dir: &Path) -> ConfigError {
    let prefix = format!("{}/", dir.display());
    let fix = |s: String| s.replace(&prefix, "");
    match e {
        ConfigError::Read { origin, message } => ConfigError::Read {
            origin: fix(origin),
            message,
        },
        ConfigError::Syntax {
            origin,
            line,
            column,
            message,
        } => ConfigError::Syntax {
            origin: fix(origin),
            line,
            column,
            message,
        },
        ConfigError::NotAMapping { origin, found } => ConfigError::NotAMapping {
            origin: fix(origin),
            found,
        },
        ConfigError::Invalid { origin, key, message } => ConfigError::Invalid {
            origin: fix(origin),
            key,
            message,
        },
    }
}

pub fn warnings_without_dir(l: &Loaded) -> Vec<String> {
    l.warnings
        .iter()
        .map(|w| {
            w.rsplit_once("x.yml")
                .map_or(w.clone(), |(_, r)| format!("x.yml{r}"))
        })
        .collect()
}

/// Sets a dotted path in a JSON object (creating objects on the way); `Value::Null` removes it.
pub fn set(v: &mut Value, path: &str, new: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap();
    let mut cur = v;
    for p in parts {
        cur = cur.as_object_mut().unwrap().entry(p).or_insert_with(|| json!({}));
    }
    let obj = cur.as_object_mut().unwrap();
    if new.is_null() {
        obj.remove(last);
    } else {
        obj.insert(last.to_string(), new);
    }
}

pub fn production_yaml() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/production.yml")).unwrap()
}
