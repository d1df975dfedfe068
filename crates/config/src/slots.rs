//! Checking the dynamic configuration's `slots` and `ignore_slots` (`docs/patroni-compat.md`
//! §5.8). A bad entry is an error naming its key in a file; read from the DCS (lenient) it is
//! a warning and the entry is left out, as Patroni logs and skips it.

use serde_json::{Map, Value};

use crate::error::ConfigError;
use crate::walk::{Ctx, describe};
use crate::yaml::join;

/// What PostgreSQL accepts as a slot name (Patroni checks the same before creating one).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn non_empty_text(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str).is_some_and(|s| !s.is_empty())
}

/// Why a permanent slot's value is not a slot, if it is not.
fn permanent_problem(v: &Value) -> Option<String> {
    let m = match v {
        Value::Null => return None,
        Value::Object(m) => m,
        other => {
            return Some(format!(
                "expected a mapping (or nothing), found {}",
                describe(other)
            ));
        }
    };
    let logical = non_empty_text(m.get("database")) && non_empty_text(m.get("plugin"));
    match m.get("type") {
        None => None,
        Some(Value::String(t)) if t == "physical" => None,
        Some(Value::String(t)) if t == "logical" && logical => None,
        Some(Value::String(t)) if t == "logical" => {
            Some("a logical slot needs both `database` and `plugin`".to_string())
        }
        Some(other) => Some(format!(
            "type: expected physical or logical, found {}",
            describe(other)
        )),
    }
}

/// The permanent slots worth keeping: bad names and values are reported.
pub(crate) fn permanent_slots(
    ctx: &mut Ctx,
    path: &str,
    slots: &Map<String, Value>,
) -> Result<Map<String, Value>, ConfigError> {
    let mut out = Map::new();
    for (name, v) in slots {
        let key = join(path, name);
        if !valid_name(name) {
            let msg = "not a valid slot name: only lower case letters, digits and `_`, at most 63";
            ctx.bad::<()>(&key, msg)?;
            continue;
        }
        if let Some(problem) = permanent_problem(v) {
            ctx.bad::<()>(&key, problem)?;
            continue;
        }
        // Another writer's extra attributes do not make the slot less permanent: a warning,
        // not a reason to leave it out (which would drop it).
        for extra in v
            .as_object()
            .into_iter()
            .flat_map(Map::keys)
            .filter(|k| !matches!(k.as_str(), "type" | "database" | "plugin" | "cluster_type"))
        {
            ctx.warn(
                &join(&key, extra),
                "unknown key, ignored (known: type, database, plugin, cluster_type)",
            );
        }
        out.insert(name.clone(), v.clone());
    }
    Ok(out)
}

/// The `ignore_slots` matchers worth keeping: each a mapping of `name`, `type`, `database`,
/// `plugin` to strings.
pub(crate) fn ignore_slots(ctx: &mut Ctx, path: &str, items: &[Value]) -> Result<Vec<Value>, ConfigError> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = format!("{path}[{i}]");
        let Value::Object(m) = item else {
            let msg = format!(
                "expected a mapping of name, type, database, plugin; found {}",
                describe(item)
            );
            ctx.bad::<()>(&key, msg)?;
            continue;
        };
        let problem = m.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("name" | "type" | "database" | "plugin", Value::String(_)) => None,
            ("name" | "type" | "database" | "plugin", other) => {
                Some(format!("{k}: expected a string, found {}", describe(other)))
            }
            _ => Some(format!("unknown key {k:?} (known: name, type, database, plugin)")),
        });
        let problem = problem.or_else(|| match m.get("type").and_then(Value::as_str) {
            Some("physical" | "logical") | None => None,
            Some(t) => Some(format!("type: expected physical or logical, found {t:?}")),
        });
        if let Some(problem) = problem {
            ctx.bad::<()>(&key, problem)?;
            continue;
        }
        out.push(item.clone());
    }
    Ok(out)
}
