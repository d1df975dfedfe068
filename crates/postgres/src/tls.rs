//! TLS of the agent's own PostgreSQL connections, from the libpq keywords of a role in
//! `postgresql.authentication` (`docs/patroni-compat.md` §3.6), with libpq's meaning:
//!
//! * `sslmode`: `disable`; `allow` and `prefer` (the default) use TLS when the server offers it;
//!   `require` insists on it; `verify-ca` also checks the server's chain and `verify-full` its
//!   name too. As in libpq, `prefer`/`require` verify the chain when a root certificate is
//!   available (`sslrootcert`, or `~/.postgresql/root.crt`), and Unix-socket connections never
//!   use TLS.
//! * `sslcert`/`sslkey` (default `~/.postgresql/postgresql.{crt,key}` when present),
//!   `sslpassword`, `sslrootcert`, `sslcrl`/`sslcrldir`, `sslnegotiation`, `channel_binding`.
//! * `gssencmode`: the agent's connections have no GSSAPI; `disable`/`prefer` are accepted (no
//!   GSS encryption is attempted), `require` is refused. The libpq tools (`pg_basebackup`,
//!   `pg_rewind`, `psql`) and `primary_conninfo` get every keyword as written.
//!
//! Everything is read and checked by [`LocalTls::from_options`], so a bad file is reported at
//! start-up with the key that names it.

use std::path::{Path, PathBuf};

use pgvigil_tls::{ClientSettings, ConfFile, Identity, ServerCheck, TlsError};
use tokio_postgres::config::{ChannelBinding, SslMode, SslNegotiation};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The libpq keywords of a role that concern TLS/GSS, in the order libpq documents them.
pub const TLS_KEYWORDS: &[&str] = &[
    "sslmode",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslnegotiation",
    "gssencmode",
    "channel_binding",
];

/// How the agent's own connections as one role use TLS. Cheap to clone.
#[derive(Clone)]
pub struct LocalTls {
    mode: SslMode,
    channel_binding: ChannelBinding,
    negotiation: SslNegotiation,
    connector: MakeRustlsConnect,
}

impl Default for LocalTls {
    /// libpq without any TLS keyword: `sslmode=prefer`, nothing verified.
    fn default() -> Self {
        let config = pgvigil_tls::client_config(&ClientSettings {
            check: Some(ServerCheck::Nothing),
            ..ClientSettings::default()
        })
        .expect("a configuration without files cannot fail");
        LocalTls {
            mode: SslMode::Prefer,
            channel_binding: ChannelBinding::Prefer,
            negotiation: SslNegotiation::Postgres,
            connector: MakeRustlsConnect::new(config),
        }
    }
}

impl std::fmt::Debug for LocalTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTls")
            .field("mode", &self.mode)
            .field("channel_binding", &self.channel_binding)
            .field("negotiation", &self.negotiation)
            .finish()
    }
}

/// `~/.postgresql/<name>` when it exists: libpq's default for unset file keywords.
fn libpq_default(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join(name);
    path.exists().then_some(path)
}

impl LocalTls {
    /// Reads and checks the TLS keywords of `role` (`superuser`, `replication`, `rewind`):
    /// `options` are `(keyword, value)` pairs as configured. `unix_socket`: the connections go
    /// through a socket directory, where libpq uses no TLS.
    pub fn from_options(
        role: &str,
        options: &[(String, String)],
        unix_socket: bool,
    ) -> Result<Self, TlsError> {
        let key = |kw: &str| format!("postgresql.authentication.{role}.{kw}");
        let get = |kw: &str| {
            options
                .iter()
                .find(|(k, _)| k == kw)
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let invalid = |kw: &str, value: &str, allowed: &str| {
            TlsError::new(
                &key(kw),
                None,
                format!("invalid value {value:?} (expected one of {allowed})"),
            )
        };
        let sslmode = get("sslmode").unwrap_or("prefer");
        let (mode, required_check) = match sslmode {
            "disable" => (SslMode::Disable, None),
            "allow" | "prefer" => (SslMode::Prefer, None),
            "require" => (SslMode::Require, None),
            "verify-ca" => (SslMode::Require, Some(ServerCheck::Chain)),
            "verify-full" => (SslMode::Require, Some(ServerCheck::ChainAndName)),
            other => {
                return Err(invalid(
                    "sslmode",
                    other,
                    "disable, allow, prefer, require, verify-ca, verify-full",
                ));
            }
        };
        let channel_binding = match get("channel_binding").unwrap_or("prefer") {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => return Err(invalid("channel_binding", other, "disable, prefer, require")),
        };
        let negotiation = match get("sslnegotiation").unwrap_or("postgres") {
            "postgres" => SslNegotiation::Postgres,
            "direct" => SslNegotiation::Direct,
            other => return Err(invalid("sslnegotiation", other, "postgres, direct")),
        };
        match get("gssencmode").unwrap_or("prefer") {
            "disable" | "prefer" => {}
            "require" => {
                return Err(TlsError::new(
                    &key("gssencmode"),
                    None,
                    "\"require\" is not supported: pgvigil's own connections cannot use GSSAPI encryption",
                ));
            }
            other => return Err(invalid("gssencmode", other, "disable, prefer, require")),
        }

        let file = |kw: &str, default: &str| -> Option<PathBuf> {
            get(kw).map(PathBuf::from).or_else(|| libpq_default(default))
        };
        let rootcert = file("sslrootcert", "root.crt");
        if rootcert.as_deref() == Some(Path::new("system")) {
            return Err(TlsError::new(
                &key("sslrootcert"),
                None,
                "\"system\" is not supported: name the CA file",
            ));
        }
        let check = match (required_check, &rootcert, mode) {
            (_, _, SslMode::Disable) => ServerCheck::Nothing,
            (Some(check), Some(_), _) => check,
            (Some(_), None, _) => {
                return Err(TlsError::new(
                    &key("sslrootcert"),
                    None,
                    format!("sslmode={sslmode} needs a root certificate to verify the server with"),
                ));
            }
            // libpq verifies the chain whenever it has a root certificate.
            (None, Some(_), _) => ServerCheck::Chain,
            (None, None, _) => ServerCheck::Nothing,
        };
        let cert = file("sslcert", "postgresql.crt");
        let keyfile = file("sslkey", "postgresql.key");
        let (cert_key, key_key, crl_key, crldir_key, root_key, password_key) = (
            key("sslcert"),
            key("sslkey"),
            key("sslcrl"),
            key("sslcrldir"),
            key("sslrootcert"),
            key("sslpassword"),
        );
        let password = get("sslpassword");
        match (&cert, &keyfile) {
            (Some(cert), None) => {
                return Err(TlsError::new(
                    &key_key,
                    None,
                    format!("no private key for the client certificate {}", cert.display()),
                ));
            }
            (None, Some(_)) if get("sslkey").is_some() => {
                return Err(TlsError::new(&cert_key, None, "sslkey is set but sslcert is not"));
            }
            _ => {}
        }
        let identity = match (&cert, &keyfile) {
            (Some(cert), Some(keyfile)) => Some(Identity {
                cert: ConfFile::new(&cert_key, cert),
                key: Some(ConfFile::new(&key_key, keyfile)),
                password: password.map(|p| (password_key.as_str(), p)),
            }),
            _ => None,
        };
        let crl = file("sslcrl", "root.crl");
        let crldir = get("sslcrldir").map(PathBuf::from);
        let mut crls = Vec::new();
        if let Some(p) = &crl {
            crls.push(ConfFile::new(&crl_key, p));
        }
        if let Some(p) = &crldir {
            crls.push(ConfFile::new(&crldir_key, p));
        }
        let mut config = pgvigil_tls::client_config(&ClientSettings {
            ca: rootcert.as_deref().map(|p| ConfFile::new(&root_key, p)),
            crls: if check == ServerCheck::Nothing {
                Vec::new()
            } else {
                crls
            },
            identity,
            check: Some(check),
        })?;
        if negotiation == SslNegotiation::Direct {
            // PostgreSQL 17 accepts a direct TLS handshake only with this ALPN protocol.
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        Ok(LocalTls {
            mode: if unix_socket { SslMode::Disable } else { mode },
            channel_binding,
            negotiation,
            connector: MakeRustlsConnect::new(config),
        })
    }

    /// Sets the TLS fields of a connection configuration.
    pub(crate) fn apply(&self, cfg: &mut tokio_postgres::Config) {
        cfg.ssl_mode(self.mode)
            .channel_binding(self.channel_binding)
            .ssl_negotiation(self.negotiation);
    }

    pub(crate) fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = LocalTls::from_options("superuser", &opts(&[("sslmode", "verify")]), false).unwrap_err();
        assert_eq!(e.key, "postgresql.authentication.superuser.sslmode");
        let e = LocalTls::from_options("rewind", &opts(&[("gssencmode", "require")]), false).unwrap_err();
        assert_eq!(e.key, "postgresql.authentication.rewind.gssencmode");
        let e = LocalTls::from_options("superuser", &opts(&[("sslmode", "verify-full")]), false).unwrap_err();
        if libpq_default("root.crt").is_none() {
            assert_eq!(e.key, "postgresql.authentication.superuser.sslrootcert");
        }
        let e = LocalTls::from_options(
            "superuser",
            &opts(&[
                ("sslmode", "require"),
                ("sslcert", "/nonexistent/c.crt"),
                ("sslkey", "/nonexistent/c.key"),
            ]),
            false,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "postgresql.authentication.superuser.sslcert (/nonexistent/c.crt): file not found"
        );
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        let tls = LocalTls::from_options("superuser", &opts(&[("sslmode", "require")]), true).unwrap();
        assert_eq!(tls.mode, SslMode::Disable);
        let tls = LocalTls::from_options("superuser", &opts(&[("sslmode", "require")]), false).unwrap();
        assert_eq!(tls.mode, SslMode::Require);
    }
}
