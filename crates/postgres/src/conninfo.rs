//! Connection strings and the pgpass file (`docs/patroni-compat.md` §5.2, §5.7):
//! `primary_conninfo`, DSNs for the libpq tools (never with a password), and the passfile they
//! read.

use std::fs;

use crate::datadir::write_atomic;
use crate::{PgError, PgSettings, Postgres};

/// Escapes a libpq connection-string value the way Patroni does (backslash before `'`, `\` and
/// whitespace); an empty value becomes `''`.
pub fn conninfo_escape(value: &str) -> String {
    if value.is_empty() {
        return "''".into();
    }
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '\'' || c == '\\' || c.is_whitespace() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Escapes one field of a pgpass line (`:` and `\` get a backslash).
pub fn pgpass_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(crate) fn render_pgpass(settings: &PgSettings, hosts: &[(String, u16)]) -> String {
    let mut users: Vec<&crate::PgUser> = Vec::new();
    for user in [&settings.superuser, &settings.replication, &settings.rewind] {
        if user.effective_password().is_some()
            && !user.username.is_empty()
            && !users.iter().any(|u| u.username == user.username)
        {
            users.push(user);
        }
    }
    let mut lines = Vec::new();
    let mut endpoints: Vec<(String, String)> = Vec::new();
    for (host, port) in hosts {
        let mut add = |h: &str| {
            let e = (pgpass_escape(h), port.to_string());
            if !endpoints.contains(&e) {
                endpoints.push(e);
            }
        };
        for h in host.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            add(h);
            if h.starts_with('/') {
                add("localhost");
            }
        }
    }
    endpoints.push(("*".into(), "*".into()));
    for (host, port) in &endpoints {
        for user in &users {
            lines.push(format!(
                "{host}:{port}:*:{}:{}",
                pgpass_escape(&user.username),
                pgpass_escape(user.effective_password().unwrap_or_default())
            ));
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

impl Postgres {
    /// `primary_conninfo` for following `upstream_host:upstream_port` (§5.7): the replication
    /// user, the passfile instead of a password, our member name as `application_name`.
    pub fn primary_conninfo(upstream_host: &str, upstream_port: u16, settings: &PgSettings) -> String {
        let rep = &settings.replication;
        let mut parts: Vec<(&str, String)> = vec![("user", rep.username.clone())];
        if rep.effective_password().is_some() && !settings.pgpass.as_os_str().is_empty() {
            parts.push(("passfile", settings.pgpass.to_string_lossy().into_owned()));
        }
        parts.push(("host", upstream_host.to_string()));
        parts.push(("port", upstream_port.to_string()));
        parts.push(("dbname", settings.database.clone()));
        parts.push(("application_name", settings.name.clone()));
        // The replication role's TLS keywords as configured; Patroni's defaults for the three
        // that libpq would otherwise take from the environment.
        let defaults = [
            ("sslmode", "prefer"),
            ("gssencmode", "prefer"),
            ("channel_binding", "prefer"),
        ];
        for keyword in crate::TLS_KEYWORDS {
            let default = defaults.iter().find(|(k, _)| k == keyword).map(|(_, v)| *v);
            if let Some(value) = rep.option(keyword).or(default) {
                parts.push((keyword, value.to_string()));
            }
        }
        parts
            .iter()
            .map(|(k, v)| format!("{k}={}", conninfo_escape(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Writes the pgpass file (0600): for every `(host, port)` and every configured user with a
    /// password (superuser, replication, rewind) a `host:port:*:user:password` line, a
    /// `localhost` line for socket directories, and last `*:*:*:user:password` fallbacks so a
    /// standby keeps authenticating after its upstream changes.
    pub fn write_pgpass(&self, hosts: &[(String, u16)]) -> Result<(), PgError> {
        let path = &self.settings.pgpass;
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            fs::create_dir_all(dir).map_err(|e| PgError::io("create", dir, e))?;
        }
        write_atomic(path, render_pgpass(&self.settings, hosts).as_bytes())
    }

    /// A DSN for libpq tools connecting to `host:port` as `user`, with the user's TLS keywords
    /// and without password (it comes from the pgpass file).
    pub(crate) fn tool_dsn(&self, host: &str, port: u16, user: &crate::PgUser) -> String {
        let mut parts = vec![
            ("host", host.to_string()),
            ("port", port.to_string()),
            ("user", user.username.clone()),
            ("dbname", self.settings.database.clone()),
        ];
        parts.extend(user.options.iter().map(|(k, v)| (k.as_str(), v.clone())));
        parts
            .iter()
            .map(|(k, v)| format!("{k}={}", conninfo_escape(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PgUser;
    use std::path::PathBuf;

    fn settings() -> PgSettings {
        PgSettings {
            data_dir: "/data".into(),
            config_dir: "/data".into(),
            bin_dir: PathBuf::new(),
            listen_host: "127.0.0.1".into(),
            unix_socket_dir: None,
            local_tls: crate::LocalTls::default(),
            port: 5433,
            database: "postgres".into(),
            superuser: PgUser::new("postgres", Some("su:pw\\x")),
            replication: PgUser::new("replicator", Some("rep pw")),
            rewind: PgUser::new("postgres", Some("other")),
            pgpass: "/home/pg/pgpass".into(),
            pg_ctl_timeout: std::time::Duration::from_secs(60),
            name: "node-1".into(),
        }
    }

    #[test]
    fn conninfo_is_escaped() {
        let mut s = settings();
        s.replication = PgUser::new("rep user", Some("x"));
        s.pgpass = "/tmp/my pass".into();
        s.name = "it's".into();
        let c = Postgres::primary_conninfo("10.0.0.2", 5432, &s);
        assert_eq!(
            c,
            r"user=rep\ user passfile=/tmp/my\ pass host=10.0.0.2 port=5432 dbname=postgres application_name=it\'s sslmode=prefer gssencmode=prefer channel_binding=prefer"
        );
        s.replication.password = None;
        assert!(!Postgres::primary_conninfo("h", 1, &s).contains("passfile"));
        s.replication.options = vec![
            ("sslmode".into(), "verify-ca".into()),
            ("sslcert".into(), "/etc/pg/rep lica.crt".into()),
            ("channel_binding".into(), "require".into()),
        ];
        assert!(
            Postgres::primary_conninfo("h", 1, &s).ends_with(
                r"sslmode=verify-ca sslcert=/etc/pg/rep\ lica.crt gssencmode=prefer channel_binding=require"
            ),
            "{}",
            Postgres::primary_conninfo("h", 1, &s)
        );
        assert_eq!(conninfo_escape(""), "''");
        assert_eq!(conninfo_escape(r"a\b"), r"a\\b");
    }

    #[test]
    fn pgpass_lines() {
        let s = settings();
        let text = render_pgpass(
            &s,
            &[("10.0.0.1".into(), 5432), ("/var/run/postgresql".into(), 5433)],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                r"10.0.0.1:5432:*:postgres:su\:pw\\x",
                "10.0.0.1:5432:*:replicator:rep pw",
                r"/var/run/postgresql:5433:*:postgres:su\:pw\\x",
                "/var/run/postgresql:5433:*:replicator:rep pw",
                r"localhost:5433:*:postgres:su\:pw\\x",
                "localhost:5433:*:replicator:rep pw",
                r"*:*:*:postgres:su\:pw\\x",
                "*:*:*:replicator:rep pw",
            ]
        );
    }
}
