//! A small typed walker over a `serde_json::Value` tree. It converts values the way Patroni's
//! users expect (YAML 1.1 booleans, integer-looking strings), records every key it reads so the
//! rest can be reported as unknown, and produces errors that carry the dotted key path and the
//! source of the key.
//!
//! In lenient mode (used for the dynamic configuration read from the DCS, which another
//! implementation may have written) a value of the wrong type is reported as a warning and
//! treated as absent, so the caller falls back to the default.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::ConfigError;
use crate::yaml::{Origins, join};

/// Shared state of one walk.
pub(crate) struct Ctx {
    pub warnings: Vec<String>,
    pub origins: Origins,
    /// Type errors become warnings and the value is ignored.
    pub lenient: bool,
    /// Required keys must be present (false for `pgvigilctl`, which needs only a few sections).
    pub enforce_required: bool,
}

impl Ctx {
    pub fn new(origins: Origins) -> Self {
        Ctx {
            warnings: Vec::new(),
            origins,
            lenient: false,
            enforce_required: true,
        }
    }

    pub fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origins.of(path).to_string(),
            key: path.to_string(),
            message: message.into(),
        }
    }

    pub fn warn(&mut self, path: &str, message: impl AsRef<str>) {
        let origin = self.origins.of(path);
        let text = if path.is_empty() {
            format!("{origin}: {}", message.as_ref())
        } else {
            format!("{origin}: {path}: {}", message.as_ref())
        };
        self.warnings.push(text);
    }

    /// A bad value: an error, or in lenient mode a warning (the value is then ignored).
    pub fn bad<T>(&mut self, path: &str, message: impl Into<String>) -> Result<Option<T>, ConfigError> {
        let message = message.into();
        if self.lenient {
            self.warn(path, format!("{message}; ignored, using the default"));
            Ok(None)
        } else {
            Err(self.error(path, message))
        }
    }
}

/// Short description of a value for error messages: `"abc"`, `true`, `a list`, ...
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut shown: String = s.chars().take(60).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            format!("{shown:?}")
        }
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

/// Patroni's `parse_bool`, plus real booleans: `on/true/yes/1` and `off/false/no/0`, any case.
pub(crate) fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) => parse_bool_str(s),
        _ => None,
    }
}

pub(crate) fn parse_bool_str(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// An integer: JSON integers, integral floats and integer-looking strings (`"30"`, `" +5 "`).
pub(crate) fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            let f = n.as_f64()?;
            (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
        }),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
}

/// A string: strings, and numbers written without quotes (`password: 12345`).
pub(crate) fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn string_hint(v: &Value) -> &'static str {
    if matches!(v, Value::Bool(_)) {
        " (YAML reads unquoted on/off/yes/no/true/false as booleans; quote the value)"
    } else {
        ""
    }
}

/// A mapping being read. Every key that is looked at counts as known; [`Obj::finish`] warns
/// about the others.
pub(crate) struct Obj<'a> {
    pub path: String,
    map: Option<&'a Map<String, Value>>,
    used: BTreeSet<String>,
}

impl<'a> Obj<'a> {
    pub fn new(path: impl Into<String>, map: Option<&'a Map<String, Value>>) -> Self {
        Obj {
            path: path.into(),
            map,
            used: BTreeSet::new(),
        }
    }

    /// Whether the mapping exists at all (as opposed to an absent section).
    pub fn present(&self) -> bool {
        self.map.is_some()
    }

    pub fn key_path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The underlying mapping, if present.
    pub fn object_ref(&self) -> Option<&'a Map<String, Value>> {
        self.map
    }

    /// Whether `key` holds a custom method section (a mapping with a `command`).
    pub fn has_method_section(&self, key: &str) -> bool {
        self.map
            .and_then(|m| m.get(key))
            .and_then(Value::as_object)
            .is_some_and(|m| m.contains_key("command"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.and_then(|m| m.get(key)).is_some_and(|v| !v.is_null())
    }

    /// The raw value; `null` counts as absent. Marks the key as known.
    pub fn raw(&mut self, key: &str) -> Option<&'a Value> {
        self.used.insert(key.to_string());
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    /// Marks keys as known without reading them.
    pub fn allow(&mut self, keys: &[&str]) {
        for k in keys {
            self.used.insert((*k).to_string());
        }
    }

    pub fn missing(&self, ctx: &Ctx, key: &str) -> ConfigError {
        ctx.error(&self.key_path(key), "missing (required)")
    }

    pub fn string(&mut self, ctx: &mut Ctx, key: &str) -> Result<Option<String>, ConfigError> {
        let Some(v) = self.raw(key) else { return Ok(None) };
        match as_string(v) {
            Some(s) => Ok(Some(s)),
            None => ctx.bad(
                &self.key_path(key),
                format!("expected a string, found {}{}", describe(v), string_hint(v)),
            ),
        }
    }

    /// A required, non-empty string. Without `enforce_required` a missing value becomes "".
    pub fn req_string(&mut self, ctx: &mut Ctx, key: &str) -> Result<String, ConfigError> {
        match self.string(ctx, key)? {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) if ctx.enforce_required => Err(ctx.error(&self.key_path(key), "must not be empty")),
            None if ctx.enforce_required => Err(self.missing(ctx, key)),
            _ => Ok(String::new()),
        }
    }

    pub fn path_buf(&mut self, ctx: &mut Ctx, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self
            .string(ctx, key)?
            .filter(|s| !s.is_empty())
            .map(PathBuf::from))
    }

    pub fn bool(&mut self, ctx: &mut Ctx, key: &str) -> Result<Option<bool>, ConfigError> {
        let Some(v) = self.raw(key) else { return Ok(None) };
        match as_bool(v) {
            Some(b) => Ok(Some(b)),
            None => ctx.bad(
                &self.key_path(key),
                format!(
                    "expected a boolean (true/false, on/off, yes/no), found {}",
                    describe(v)
                ),
            ),
        }
    }

    pub fn i64(&mut self, ctx: &mut Ctx, key: &str) -> Result<Option<i64>, ConfigError> {
        let Some(v) = self.raw(key) else { return Ok(None) };
        match as_i64(v) {
            Some(n) => Ok(Some(n)),
            None => ctx.bad(
                &self.key_path(key),
                format!("expected an integer, found {}", describe(v)),
            ),
        }
    }

    /// An integer that must be at least `min`.
    pub fn i64_min(&mut self, ctx: &mut Ctx, key: &str, min: i64) -> Result<Option<i64>, ConfigError> {
        match self.i64(ctx, key)? {
            Some(n) if n < min => ctx.bad(&self.key_path(key), format!("must be at least {min}, found {n}")),
            other => Ok(other),
        }
    }

    pub fn u64(&mut self, ctx: &mut Ctx, key: &str) -> Result<Option<u64>, ConfigError> {
        Ok(self.i64_min(ctx, key, 0)?.map(|n| n as u64))
    }

    /// A list of strings. A single string is accepted as a one-element list.
    pub fn string_list(&mut self, ctx: &mut Ctx, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(v) = self.raw(key) else { return Ok(None) };
        let path = self.key_path(key);
        match v {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match as_string(item) {
                        Some(s) => out.push(s),
                        None => {
                            let msg =
                                format!("expected a string, found {}{}", describe(item), string_hint(item));
                            return ctx.bad(&format!("{path}[{i}]"), msg);
                        }
                    }
                }
                Ok(Some(out))
            }
            other => match as_string(other) {
                Some(s) => Ok(Some(vec![s])),
                None => ctx.bad(
                    &path,
                    format!("expected a list of strings, found {}", describe(other)),
                ),
            },
        }
    }

    /// A mapping of strings to strings (numbers are accepted as strings).
    pub fn string_map(&mut self, ctx: &mut Ctx, key: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let Some(map) = self.object(ctx, key)? else {
            return Ok(BTreeMap::new());
        };
        let path = self.key_path(key);
        let mut out = BTreeMap::new();
        for (k, v) in map {
            if v.is_null() {
                continue;
            }
            match as_string(v) {
                Some(s) => {
                    out.insert(k.clone(), s);
                }
                None => {
                    let msg = format!("expected a string, found {}{}", describe(v), string_hint(v));
                    ctx.bad::<()>(&join(&path, k), msg)?;
                }
            }
        }
        Ok(out)
    }

    /// A mapping with arbitrary values (`null` values dropped).
    pub fn value_map(&mut self, ctx: &mut Ctx, key: &str) -> Result<BTreeMap<String, Value>, ConfigError> {
        let Some(map) = self.object(ctx, key)? else {
            return Ok(BTreeMap::new());
        };
        Ok(map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    /// The raw mapping under `key`, if it is one.
    pub fn object(
        &mut self,
        ctx: &mut Ctx,
        key: &str,
    ) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
        let Some(v) = self.raw(key) else { return Ok(None) };
        match v {
            Value::Object(m) => Ok(Some(m)),
            other => ctx.bad(
                &self.key_path(key),
                format!("expected a mapping, found {}", describe(other)),
            ),
        }
    }

    /// A nested section; absent (or, in lenient mode, malformed) sections read as empty.
    pub fn section(&mut self, ctx: &mut Ctx, key: &str) -> Result<Obj<'a>, ConfigError> {
        let map = self.object(ctx, key)?;
        Ok(Obj::new(self.key_path(key), map))
    }

    /// Keys that were never looked at.
    pub fn unknown_keys(&self) -> Vec<&'a str> {
        match self.map {
            Some(m) => m
                .keys()
                .filter(|k| !self.used.contains(*k))
                .map(String::as_str)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Warns about every key that was never looked at.
    pub fn finish(self, ctx: &mut Ctx) {
        for key in self.unknown_keys() {
            ctx.warn(&self.key_path(key), "unknown key, ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn conversions() {
        for (v, b) in [
            (json!(true), Some(true)),
            (json!("ON"), Some(true)),
            (json!("Yes"), Some(true)),
            (json!("1"), Some(true)),
            (json!(1), Some(true)),
            (json!("off"), Some(false)),
            (json!("NO"), Some(false)),
            (json!(0), Some(false)),
            (json!("y"), None),
            (json!(2), None),
            (json!([]), None),
        ] {
            assert_eq!(as_bool(&v), b, "{v}");
        }
        for (v, n) in [
            (json!(30), Some(30)),
            (json!("30"), Some(30)),
            (json!(" -5 "), Some(-5)),
            (json!(30.0), Some(30)),
            (json!(30.5), None),
            (json!("abc"), None),
            (json!("30s"), None),
            (json!(true), None),
        ] {
            assert_eq!(as_i64(&v), n, "{v}");
        }
    }

    #[test]
    fn typed_reads_name_the_key() {
        let v = json!({"a": {"ttl": "abc", "flag": "maybe", "name": true, "list": [1, {"x": 1}]}});
        let mut ctx = Ctx::new(Origins::new("/etc/x.yml"));
        let mut root = Obj::new("", v.as_object());
        let mut a = root.section(&mut ctx, "a").unwrap();
        let e = a.i64(&mut ctx, "ttl").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/x.yml: a.ttl: expected an integer, found \"abc\""
        );
        let e = a.bool(&mut ctx, "flag").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/x.yml: a.flag: expected a boolean"),
            "{e}"
        );
        let e = a.string(&mut ctx, "name").unwrap_err();
        assert!(e.to_string().contains("quote the value"), "{e}");
        let e = a.string_list(&mut ctx, "list").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/x.yml: a.list[1]: expected a string"),
            "{e}"
        );
        let e = a.req_string(&mut ctx, "missing").unwrap_err();
        assert_eq!(e.to_string(), "/etc/x.yml: a.missing: missing (required)");
    }

    #[test]
    fn lenient_mode_warns_and_ignores() {
        let v = json!({"ttl": "abc", "extra": 1});
        let mut ctx = Ctx::new(Origins::new("DCS config"));
        ctx.lenient = true;
        let mut root = Obj::new("", v.as_object());
        assert_eq!(root.i64(&mut ctx, "ttl").unwrap(), None);
        root.finish(&mut ctx);
        assert_eq!(ctx.warnings.len(), 2, "{:?}", ctx.warnings);
        assert!(
            ctx.warnings[1].contains("extra: unknown key"),
            "{:?}",
            ctx.warnings
        );
    }
}
