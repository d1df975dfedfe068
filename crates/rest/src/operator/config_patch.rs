//! The `PATCH /config` merge and the `PUT /config` comparison, as Patroni does them.

use serde_json::{Map, Value};

use super::values::python_str;

/// Patroni's `patch_config`: merges `patch` into `config`; `null` deletes a key, objects merge
/// recursively, other values replace when their text differs. Returns whether anything changed.
pub fn patch_config(config: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    let mut changed = false;
    for (name, value) in patch {
        match value {
            Value::Null => {
                if config.remove(name).is_some_and(|old| !old.is_null()) {
                    changed = true;
                }
            }
            Value::Object(sub) => match config.get_mut(name) {
                Some(Value::Object(existing)) => changed |= patch_config(existing, sub),
                _ => {
                    config.insert(name.clone(), value.clone());
                    changed = true;
                }
            },
            _ => match config.get(name) {
                Some(old) if python_str(old) == python_str(value) => {}
                _ => {
                    config.insert(name.clone(), value.clone());
                    changed = true;
                }
            },
        }
    }
    changed
}

/// Patroni's `deep_compare`: same keys, nested objects compared recursively, other values by
/// their text.
pub fn deep_compare(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    if a.len() != b.len() || a.keys().any(|k| !b.contains_key(k)) {
        return false;
    }
    a.iter().all(|(k, va)| match (va, &b[k]) {
        (Value::Object(x), Value::Object(y)) => deep_compare(x, y),
        (Value::Object(_), _) | (_, Value::Object(_)) => false,
        (x, y) => python_str(x) == python_str(y),
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::obj;
    use super::*;
    use serde_json::json;

    #[test]
    fn patching() {
        let mut config = obj(
            json!({"ttl": 30, "postgresql": {"parameters": {"max_connections": 100, "work_mem": "4MB"}},
                                    "pause": true}),
        );
        assert!(!patch_config(&mut config, &obj(json!({"ttl": "30"}))));
        assert!(!patch_config(&mut config, &obj(json!({"missing": null}))));
        assert!(patch_config(
            &mut config,
            &obj(json!({"pause": null, "loop_wait": 5,
                        "postgresql": {"parameters": {"work_mem": null, "max_connections": 200}}}))
        ));
        assert_eq!(
            Value::Object(config.clone()),
            json!({"ttl": 30, "postgresql": {"parameters": {"max_connections": 200}}, "loop_wait": 5})
        );
        assert!(patch_config(&mut config, &obj(json!({"ttl": {"x": 1}}))));
        assert_eq!(config["ttl"], json!({"x": 1}));
        let mut c = obj(json!({"flag": true}));
        assert!(!patch_config(&mut c, &obj(json!({"flag": "True"}))));
        assert!(patch_config(&mut c, &obj(json!({"flag": "true"}))));
    }

    #[test]
    fn comparing() {
        assert!(deep_compare(
            &obj(json!({"a": 1, "b": {"c": "2"}})),
            &obj(json!({"b": {"c": 2}, "a": "1"}))
        ));
        assert!(!deep_compare(
            &obj(json!({"a": 1})),
            &obj(json!({"a": 1, "b": 2}))
        ));
        assert!(!deep_compare(&obj(json!({"a": {}})), &obj(json!({"a": null}))));
        assert!(!deep_compare(&obj(json!({"a": [1]})), &obj(json!({"a": [2]}))));
        assert!(!deep_compare(&obj(json!({"1": null})), &obj(json!({}))));
    }
}
