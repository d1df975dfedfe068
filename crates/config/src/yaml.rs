//! YAML text → `serde_json::Value`, deep merging of several sources, and remembering which
//! source (file or environment variable) supplied which key so that errors can name it.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::ConfigError;

/// Parses one YAML document into a JSON value.
///
/// PyYAML (YAML 1.1) is what Patroni uses, so plain `on/off/yes/no` (any case) become booleans.
/// Numbers with leading zeros stay strings (`0755`) rather than silently turning octal, and
/// `.inf`/`.nan` stay strings. A duplicate key is accepted with a warning, the last value wins,
/// as with PyYAML. Empty text gives `Value::Null`.
pub(crate) fn parse_yaml(text: &str, origin: &str, warnings: &mut Vec<String>) -> Result<Value, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match serde_saphyr::from_str_with_options::<Value>(text, options(serde_saphyr::DuplicateKeyPolicy::Error))
    {
        Ok(v) => Ok(v),
        Err(e) => {
            if let serde_saphyr::Error::DuplicateMappingKey { key, location } = e.without_snippet() {
                let key = key.as_deref().unwrap_or("?");
                warnings.push(format!(
                    "{origin}: line {} column {}: duplicate key `{key}`; the last value wins",
                    location.line(),
                    location.column()
                ));
                let relaxed = options(serde_saphyr::DuplicateKeyPolicy::LastWins);
                return serde_saphyr::from_str_with_options::<Value>(text, relaxed)
                    .map_err(|e| syntax(origin, &e));
            }
            Err(syntax(origin, &e))
        }
    }
}

/// Like [`parse_yaml`] for raw file contents: refuses text that is not UTF-8 (binary junk).
pub(crate) fn parse_yaml_bytes(
    bytes: &[u8],
    origin: &str,
    warnings: &mut Vec<String>,
) -> Result<Value, ConfigError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_yaml(text, origin, warnings),
        Err(e) => {
            let (line, column) = position_of(bytes, e.valid_up_to());
            Err(ConfigError::Syntax {
                origin: origin.to_string(),
                line,
                column,
                message: "the file is not UTF-8 text".to_string(),
            })
        }
    }
}

fn position_of(bytes: &[u8], offset: usize) -> (u64, u64) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let column = before.iter().rev().take_while(|b| **b != b'\n').count() as u64 + 1;
    (line, column)
}

fn options(duplicate_keys: serde_saphyr::DuplicateKeyPolicy) -> serde_saphyr::Options {
    serde_saphyr::options! {
        duplicate_keys: duplicate_keys,
        leading_zero_numbers_as_strings: true,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
        with_snippet: false,
    }
}

fn syntax(origin: &str, e: &serde_saphyr::Error) -> ConfigError {
    let inner = e.without_snippet();
    let mut message = inner.to_string();
    let (line, column) = match inner.location() {
        Some(loc) => {
            let suffix = format!(" at line {}, column {}", loc.line(), loc.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_string();
            }
            (loc.line(), loc.column())
        }
        None => (0, 0),
    };
    ConfigError::Syntax {
        origin: origin.to_string(),
        line,
        column,
        message,
    }
}

/// Which source supplied which key path. Lookups fall back to the nearest recorded ancestor and
/// then to the default (the configuration path given on the command line).
#[derive(Debug, Clone, Default)]
pub(crate) struct Origins {
    pub default: String,
    by_path: BTreeMap<String, String>,
}

impl Origins {
    pub fn new(default: impl Into<String>) -> Self {
        Origins {
            default: default.into(),
            by_path: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, path: &str, origin: &str) {
        let nested = format!("{path}.");
        let indexed = format!("{path}[");
        self.by_path
            .retain(|k, _| !(k.starts_with(&nested) || k.starts_with(&indexed)));
        self.by_path.insert(path.to_string(), origin.to_string());
    }

    /// The origin of `path` (dotted, lists as `[i]`).
    pub fn of(&self, path: &str) -> &str {
        let mut p = path;
        loop {
            if let Some(o) = self.by_path.get(p) {
                return o;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return &self.default,
            }
        }
    }
}

/// Joins a parent path and a key into a dotted path.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Patroni's `patch_config`: deep-merges `overlay` into `base`. A `null` in the overlay removes
/// the key; mappings merge recursively; anything else replaces. Records `origin` for every key
/// the overlay sets.
pub(crate) fn merge(
    base: &mut Map<String, Value>,
    overlay: Map<String, Value>,
    origin: &str,
    origins: &mut Origins,
) {
    merge_at(base, overlay, "", origin, origins);
}

fn merge_at(
    base: &mut Map<String, Value>,
    overlay: Map<String, Value>,
    path: &str,
    origin: &str,
    origins: &mut Origins,
) {
    for (key, value) in overlay {
        let key_path = join(path, &key);
        match value {
            Value::Null => {
                base.remove(&key);
            }
            Value::Object(inner) => match base.get_mut(&key) {
                Some(Value::Object(existing)) => merge_at(existing, inner, &key_path, origin, origins),
                _ => {
                    origins.record(&key_path, origin);
                    base.insert(key, Value::Object(inner));
                }
            },
            other => {
                origins.record(&key_path, origin);
                base.insert(key, other);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(text: &str) -> Result<Value, ConfigError> {
        parse_yaml(text, "t.yml", &mut Vec::new())
    }

    #[test]
    fn yaml_1_1_booleans_and_numbers() {
        let v = parse("a: on\nb: 'on'\nc: YES\nd: Off\ne: 0755\nf: 10MB\ng: .inf\nh: 30\ni: ~\n").unwrap();
        assert_eq!(
            v,
            json!({"a": true, "b": "on", "c": true, "d": false, "e": "0755", "f": "10MB", "g": ".inf", "h": 30, "i": null})
        );
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("t.yml: line 3 column "), "{text}");
        assert!(text.contains("YAML syntax error"), "{text}");
        assert!(!text.contains(" at line "), "{text}");
    }

    #[test]
    fn duplicate_keys_warn_and_last_wins() {
        let mut w = Vec::new();
        let v = parse_yaml("a: 1\na: 2\n", "t.yml", &mut w).unwrap();
        assert_eq!(v, json!({"a": 2}));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("duplicate key `a`"), "{w:?}");
    }

    #[test]
    fn binary_junk_is_a_syntax_error() {
        let e = parse_yaml_bytes(b"name: x\n\xff\xfe\x00junk", "t.yml", &mut Vec::new()).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Syntax {
                    line: 2,
                    column: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_yaml_bytes(b"\x00\x01\x02: [", "t.yml", &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let deep = format!("a: {}", "[".repeat(5000));
        assert!(parse(&deep).is_err());
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(parse(&bomb).is_err());
    }

    #[test]
    fn merge_is_patch_config() {
        let mut origins = Origins::new("dir");
        let mut base = Map::new();
        let a = json!({"postgresql": {"listen": "x", "parameters": {"a": 1, "b": 2}}, "tags": {"t": 1}});
        let b = json!({"postgresql": {"parameters": {"b": null, "c": 3}}, "tags": "scalar"});
        merge(&mut base, a.as_object().unwrap().clone(), "a.yml", &mut origins);
        merge(&mut base, b.as_object().unwrap().clone(), "b.yml", &mut origins);
        assert_eq!(
            Value::Object(base),
            json!({"postgresql": {"listen": "x", "parameters": {"a": 1, "c": 3}}, "tags": "scalar"})
        );
        assert_eq!(origins.of("postgresql.listen"), "a.yml");
        assert_eq!(origins.of("postgresql.parameters.c"), "b.yml");
        assert_eq!(origins.of("postgresql.parameters.a"), "a.yml");
        assert_eq!(origins.of("tags"), "b.yml");
        assert_eq!(origins.of("restapi.listen"), "dir");
    }
}
