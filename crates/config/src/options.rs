//! Rendering of user-supplied command-line options (`bootstrap.initdb`, `postgresql.basebackup`,
//! `postgresql.rewind`, custom method sections) and normalization of etcd endpoints.

use serde_json::{Map, Value};

use crate::error::ConfigError;
use crate::walk::{Ctx, as_string, describe};

/// initdb options pgvigil sets itself (`docs/patroni-compat.md` §3.5).
pub(crate) const INITDB_FORBIDDEN: &[&str] = &["pgdata", "nosync", "pwfile", "sync-only", "version"];
/// pg_basebackup options pgvigil sets itself (§5.4). `compress` is handled separately.
pub(crate) const BASEBACKUP_FORBIDDEN: &[&str] = &[
    "pgdata",
    "format",
    "wal-method",
    "xlog-method",
    "gzip",
    "version",
    "dbname",
    "host",
    "port",
    "username",
    "password",
];
/// pg_rewind options pgvigil sets itself.
pub(crate) const REWIND_FORBIDDEN: &[&str] = &["target-pgdata", "source-server", "source-pgdata", "version"];

/// Patroni's `process_user_options`: a list of `option` strings and single-key `{option: value}`
/// mappings, or one mapping, becomes `--option` / `--option=value`. Enclosing quotes around a
/// value are removed. Forbidden options are errors naming the option.
pub(crate) fn render_options(
    ctx: &mut Ctx,
    path: &str,
    value: Option<&Value>,
    forbidden: &[&str],
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    let check = |ctx: &mut Ctx, at: &str, name: &str| -> Result<String, ConfigError> {
        let name = name.trim().trim_start_matches('-').to_string();
        if name.is_empty() {
            return Err(ctx.error(at, "empty option name"));
        }
        if forbidden.contains(&name.as_str()) {
            return Err(ctx.error(
                at,
                format!("option `{name}` is not allowed (pgvigil sets it itself)"),
            ));
        }
        Ok(name)
    };
    match value {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("{path}[{i}]");
                match item {
                    Value::String(s) => out.push(format!("--{}", check(ctx, &at, s)?)),
                    Value::Object(m) if m.len() == 1 => {
                        let (k, v) = m.iter().next().expect("one entry");
                        let name = check(ctx, &at, k)?;
                        match as_string(v) {
                            Some(v) => out.push(format!("--{name}={}", unquote(&v))),
                            None => {
                                let msg = format!(
                                    "the value of option `{name}` must be a string, found {}",
                                    describe(v)
                                );
                                return Err(ctx.error(&at, msg));
                            }
                        }
                    }
                    other => {
                        let msg = format!(
                            "expected an option name or a single `option: value` pair, found {}",
                            describe(other)
                        );
                        return Err(ctx.error(&at, msg));
                    }
                }
            }
        }
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let at = format!("{path}.{k}");
                let name = check(ctx, &at, k)?;
                match v {
                    Value::Null | Value::Bool(false) => {}
                    Value::Bool(true) => out.push(format!("--{name}")),
                    other => match as_string(other) {
                        Some(v) if !v.is_empty() => out.push(format!("--{name}={}", unquote(&v))),
                        Some(_) => {}
                        None => {
                            return Err(
                                ctx.error(&at, format!("expected a string, found {}", describe(other)))
                            );
                        }
                    },
                }
            }
        }
        Some(other) => {
            return Err(ctx.error(
                path,
                format!("expected a list of options, found {}", describe(other)),
            ));
        }
    }
    Ok(out)
}

/// Renders the extra keys of a custom method section as `--key=value`, formatting values the
/// way Patroni (Python's `str`) does so existing scripts keep working.
/// A method section's keys but `command`, in the order written, with values as Patroni's
/// `--{key}={value}` renders them (Python's `str()`: `True`, `1`, `latest`); nulls left out.
pub(crate) fn method_options(section: &Map<String, Value>) -> Vec<(String, String)> {
    section
        .iter()
        .filter(|(k, v)| *k != "command" && !v.is_null())
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Bool(true) => "True".to_string(),
                Value::Bool(false) => "False".to_string(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Splits a command line into words as a POSIX shell (and Python's `shlex.split`) would:
/// single quotes literal, double quotes with `\` escapes for `\ " $ ``, backslash outside
/// quotes escaping the next character. `None` for unbalanced quotes or a trailing backslash.
pub(crate) fn split_words(text: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            c @ ('\\' | '"' | '$' | '`') => w.push(c),
                            '\n' => {}
                            c => {
                                w.push('\\');
                                w.push(c);
                            }
                        },
                        c => w.push(c),
                    }
                }
            }
            '\\' => {
                let next = chars.next()?;
                let w = word.get_or_insert_with(String::new);
                if next != '\n' {
                    w.push(next);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Some(words)
}

fn unquote(v: &str) -> String {
    let t = v.trim();
    for q in ['"', '\''] {
        if t.len() >= 2 && t.starts_with(q) && t.ends_with(q) {
            return t[1..t.len() - 1].to_string();
        }
    }
    v.to_string()
}

/// A normalized etcd endpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `host:port`, IPv6 bracketed.
    pub host_port: String,
    /// `http`/`https` when the entry carried a scheme.
    pub scheme: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Parses `host`, `host:port`, `[v6]:port`, bare IPv6, or `scheme://[user:pass@]host[:port][/]`.
pub(crate) fn parse_endpoint(text: &str, default_port: u16) -> Result<Endpoint, String> {
    let mut rest = text.trim();
    let mut scheme = None;
    if let Some((s, r)) = rest.split_once("://") {
        let s = s.to_ascii_lowercase();
        if s != "http" && s != "https" {
            return Err(format!("unsupported scheme `{s}` (use http or https)"));
        }
        scheme = Some(s);
        rest = r;
    }
    let rest = rest.split('/').next().unwrap_or("");
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (username, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((n, p)) => (Some(n.to_string()), Some(p.to_string())),
            None => (Some(u.to_string()), None),
        },
        None => (None, None),
    };
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("invalid port `{p}` in `{}`", text.trim()))
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("unclosed `[` in `{}`", text.trim()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => return Err(format!("unexpected `{after}` after `]`")),
        };
        (format!("[{addr}]"), port)
    } else {
        match hostport.matches(':').count() {
            0 => (hostport.to_string(), default_port),
            1 => {
                let (h, p) = hostport.split_once(':').expect("one colon");
                (h.to_string(), parse_port(p)?)
            }
            _ => (format!("[{hostport}]"), default_port),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("no host in `{}`", text.trim()));
    }
    Ok(Endpoint {
        host_port: format!("{host}:{port}"),
        scheme,
        username,
        password,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::yaml::Origins;

    #[test]
    fn commands_split_like_a_shell() {
        let words = |t: &str| split_words(t).unwrap();
        assert_eq!(words("/bin/restore.sh  --a=1"), ["/bin/restore.sh", "--a=1"]);
        assert_eq!(
            words(r#"sh -c 'echo "$1"' "two words" a\ b"#),
            ["sh", "-c", "echo \"$1\"", "two words", "a b"]
        );
        assert_eq!(words(r#""a\"b\$c\x""#), [r#"a"b$c\x"#]);
        assert_eq!(words("''"), [""]);
        assert_eq!(split_words("'open"), None);
        assert_eq!(split_words("a\\"), None);
    }

    #[test]
    fn method_options_keep_order_and_python_spelling() {
        let section =
            json!({"command": "x", "no_leader": 1, "flag": true, "off": false, "n": null, "s": "v"});
        assert_eq!(
            method_options(section.as_object().unwrap()),
            [
                ("no_leader".to_string(), "1".to_string()),
                ("flag".into(), "True".into()),
                ("off".into(), "False".into()),
                ("s".into(), "v".into())
            ]
        );
    }

    fn render(v: Value, forbidden: &[&str]) -> Result<Vec<String>, String> {
        let mut ctx = Ctx::new(Origins::new("x.yml"));
        render_options(&mut ctx, "bootstrap.initdb", Some(&v), forbidden).map_err(|e| e.to_string())
    }

    #[test]
    fn options_render_like_patroni() {
        let v =
            json!(["data-checksums", {"encoding": "UTF8"}, {"locale": "'en_US.UTF-8'"}, {"wal-segsize": 64}]);
        assert_eq!(
            render(v, INITDB_FORBIDDEN).unwrap(),
            [
                "--data-checksums",
                "--encoding=UTF8",
                "--locale=en_US.UTF-8",
                "--wal-segsize=64"
            ]
        );
        let v = json!({"checkpoint": "fast", "max-rate": "100M", "progress": true, "verbose": false});
        assert_eq!(
            render(v, BASEBACKUP_FORBIDDEN).unwrap(),
            ["--checkpoint=fast", "--max-rate=100M", "--progress"]
        );
    }

    #[test]
    fn forbidden_and_malformed_options() {
        for (v, expected) in [
            (
                json!(["pgdata"]),
                "bootstrap.initdb[0]: option `pgdata` is not allowed",
            ),
            (
                json!(["data-checksums", {"pwfile": "/tmp/x"}]),
                "bootstrap.initdb[1]: option `pwfile` is not allowed",
            ),
            (json!(["--nosync"]), "option `nosync` is not allowed"),
            (
                json!({"sync-only": "yes"}),
                "bootstrap.initdb.sync-only: option `sync-only` is not allowed",
            ),
            (json!([{"a": "1", "b": "2"}]), "single `option: value` pair"),
            (json!([{"encoding": true}]), "must be a string"),
            (json!([7]), "expected an option name"),
            (json!("data-checksums"), "expected a list of options"),
        ] {
            let e = render(v.clone(), INITDB_FORBIDDEN).unwrap_err();
            assert!(e.contains(expected), "{v}: {e}");
        }
    }

    #[test]
    fn endpoints() {
        let ok = |s: &str| parse_endpoint(s, 2379).unwrap().host_port;
        assert_eq!(ok("etcd1"), "etcd1:2379");
        assert_eq!(ok(" etcd1:2381 "), "etcd1:2381");
        assert_eq!(ok("10.0.0.1"), "10.0.0.1:2379");
        assert_eq!(ok("[::1]:2380"), "[::1]:2380");
        assert_eq!(ok("[fe80::1]"), "[fe80::1]:2379");
        assert_eq!(ok("fe80::1"), "[fe80::1]:2379");
        let e = parse_endpoint("https://u:p@etcd.example:2379/", 2379).unwrap();
        assert_eq!(e.host_port, "etcd.example:2379");
        assert_eq!(e.scheme.as_deref(), Some("https"));
        assert_eq!(
            (e.username.as_deref(), e.password.as_deref()),
            (Some("u"), Some("p"))
        );
        for bad in ["", "host:abc", "host:99999", "ftp://x", "[::1", ":2379"] {
            assert!(parse_endpoint(bad, 2379).is_err(), "{bad}");
        }
    }
}
