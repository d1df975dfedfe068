//! Entry points: read the file or directory (or `PATRONI_CONFIGURATION`), overlay the
//! environment, and type-check everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::env::{CONFIGURATION_VAR, apply_env};
use crate::error::ConfigError;
use crate::model::{ClientConfig, Config};
use crate::parse::parse_config;
use crate::walk::{Ctx, describe};
use crate::yaml::{Origins, merge, parse_yaml, parse_yaml_bytes};

/// A loaded configuration and the warnings found on the way (unknown keys, ignored settings,
/// adjusted timings, ...). Warnings name the source and the key path; log each one.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Human-readable warnings.
    pub warnings: Vec<String>,
}

/// Loads the agent's configuration.
///
/// `path` is a YAML file or a directory (its `*.yml`/`*.yaml` files are deep-merged in sorted
/// order, later files win). If `path` is `None` or does not exist, the YAML in
/// `PATRONI_CONFIGURATION` is used, and without that the configuration comes from the environment
/// alone. The `PATRONI_*` variables of `env` (`docs/patroni-compat.md` §3.8) are then merged over
/// it. `env` may contain other variables; `HOME` is used for the default `pgpass` location.
pub fn load(path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Loaded, ConfigError> {
    let (root, origins, warnings) = assemble(path, env)?;
    let mut ctx = Ctx::new(origins);
    ctx.warnings = warnings;
    let config = parse_config(&root, &mut ctx, &home(env))?;
    Ok(Loaded {
        config,
        warnings: ctx.warnings,
    })
}

/// Loads what `pgvigilctl` needs. Only `scope`, `namespace`, the `etcd3` section, `ctl` and
/// the REST API credentials matter; nothing is required, but sections that are present are
/// still type-checked. A missing file is treated like an empty one (with a warning).
pub fn load_client(
    path: &Path,
    env: &BTreeMap<String, String>,
) -> Result<(ClientConfig, Vec<String>), ConfigError> {
    let (root, origins, warnings) = assemble(Some(path), env)?;
    let mut ctx = Ctx::new(origins);
    ctx.warnings = warnings;
    ctx.enforce_required = false;
    let config = parse_config(&root, &mut ctx, &home(env))?;
    let client = ClientConfig {
        scope: Some(config.scope).filter(|s| !s.is_empty()),
        namespace: config.namespace,
        etcd3: config.etcd3,
        ctl: config.ctl,
        restapi_auth: config.restapi.authentication,
    };
    Ok((client, ctx.warnings))
}

fn home(env: &BTreeMap<String, String>) -> PathBuf {
    env.get("HOME")
        .cloned()
        .or_else(|| std::env::var("HOME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string())
        .into()
}

type Assembled = (Map<String, Value>, Origins, Vec<String>);

/// Reads every source into one JSON object, remembering where each key came from.
fn assemble(path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Assembled, ConfigError> {
    let mut warnings = Vec::new();
    let mut root = Map::new();
    let existing = path.filter(|p| p.exists());
    let mut origins;
    if let Some(p) = existing {
        let label = p.display().to_string();
        origins = Origins::new(label.clone());
        if p.is_dir() {
            let files = yaml_files(p)?;
            if files.is_empty() {
                warnings.push(format!("{label}: no *.yml or *.yaml files in this directory"));
            }
            for file in files {
                let file_label = file.display().to_string();
                let doc = read_document(&file, &file_label, &mut warnings)?;
                merge(&mut root, doc, &file_label, &mut origins);
            }
        } else if p.is_file() {
            let doc = read_document(p, &label, &mut warnings)?;
            merge(&mut root, doc, &label, &mut origins);
        } else {
            return Err(ConfigError::Read {
                origin: label,
                message: "neither a regular file nor a directory".to_string(),
            });
        }
    } else {
        if let Some(p) = path {
            warnings.push(format!(
                "{}: does not exist; reading the configuration from the environment",
                p.display()
            ));
        }
        match env.get(CONFIGURATION_VAR).filter(|v| !v.trim().is_empty()) {
            Some(text) => {
                let label = format!("environment {CONFIGURATION_VAR}");
                origins = Origins::new(label.clone());
                let doc = to_mapping(parse_yaml(text, &label, &mut warnings)?, &label)?;
                merge(&mut root, doc, &label, &mut origins);
            }
            None => origins = Origins::new("environment"),
        }
    }
    apply_env(&mut root, env, &mut origins, &mut warnings)?;
    Ok((root, origins, warnings))
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |e: std::io::Error| ConfigError::Read {
        origin: dir.display().to_string(),
        message: e.to_string(),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name.ends_with(".yml") || name.ends_with(".yaml")) && p.is_file()
        })
        .collect();
    files.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    Ok(files)
}

fn read_document(
    path: &Path,
    label: &str,
    warnings: &mut Vec<String>,
) -> Result<Map<String, Value>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Read {
        origin: label.to_string(),
        message: e.to_string(),
    })?;
    let value = parse_yaml_bytes(&bytes, label, warnings)?;
    if value.is_null() {
        warnings.push(format!("{label}: the file is empty"));
    }
    to_mapping(value, label)
}

fn to_mapping(value: Value, label: &str) -> Result<Map<String, Value>, ConfigError> {
    match value {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        other => Err(ConfigError::NotAMapping {
            origin: label.to_string(),
            found: describe(&other),
        }),
    }
}
