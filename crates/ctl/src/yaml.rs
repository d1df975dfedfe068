//! A small YAML emitter for JSON values (block style, sorted keys, like PyYAML's `safe_dump`
//! as patronictl uses it), enough for `-f yaml` and `show-config`.

use serde_json::Value;

pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    emit(value, 0, &mut out);
    if out.is_empty() || !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let plain = !s.is_empty()
                && !s.starts_with(|c: char| "-?:,[]{}#&*!|>'\"%@` ".contains(c))
                && !s.ends_with(' ')
                && !s.contains(": ")
                && !s.contains(" #")
                && !s.contains('\n')
                && s.parse::<f64>().is_err()
                && !matches!(
                    s.to_ascii_lowercase().as_str(),
                    "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~"
                );
            if plain {
                s.clone()
            } else {
                format!("'{}'", s.replace('\'', "''"))
            }
        }
        _ => String::new(),
    }
}

fn emit(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for k in keys {
                let v = &map[k];
                match v {
                    Value::Object(m) if !m.is_empty() => {
                        out.push_str(&format!("{pad}{}:\n", scalar(&Value::from(k.as_str()))));
                        emit(v, indent + 2, out);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        out.push_str(&format!("{pad}{}:\n", scalar(&Value::from(k.as_str()))));
                        emit(v, indent, out);
                    }
                    _ => out.push_str(&format!(
                        "{pad}{}: {}\n",
                        scalar(&Value::from(k.as_str())),
                        inline(v)
                    )),
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        let mut nested = String::new();
                        emit(item, indent + 2, &mut nested);
                        let nested = nested.trim_start();
                        out.push_str(&format!("{pad}- {nested}"));
                    }
                    _ => out.push_str(&format!("{pad}- {}\n", inline(item))),
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", inline(other))),
    }
}

fn inline(v: &Value) -> String {
    match v {
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(_) | Value::Array(_) => v.to_string(),
        other => scalar(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn block_yaml() {
        let v = json!({"ttl": 30, "postgresql": {"parameters": {"max_connections": 100}, "use_pg_rewind": true},
                       "pg_hba": ["host all all 0.0.0.0/0 md5"], "name": "on", "empty": {}});
        let expected = "empty: {}\nname: 'on'\npg_hba:\n- host all all 0.0.0.0/0 md5\npostgresql:\n  parameters:\n    max_connections: 100\n  use_pg_rewind: true\nttl: 30\n";
        assert_eq!(to_yaml(&v), expected);
        assert_eq!(to_yaml(&json!([{"a": 1, "b": "x"}])), "- a: 1\n  b: x\n");
    }
}
