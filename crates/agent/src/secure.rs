//! Every TLS file of the configuration, read and checked before anything starts: a missing
//! file, a CA that is not one, a key that does not belong to its certificate or that the agent
//! cannot read stops the agent with the configuration key and the file named, before `initdb`
//! could run (`--validate-config` runs the same checks).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use pgvigil_config::{Config, PgCredentials};
use pgvigil_dcs::EtcdTls;
use pgvigil_postgres::LocalTls;
use pgvigil_tls::TlsError;

/// The prepared TLS set-up of the agent.
pub struct Prepared {
    /// The agent's own superuser connection.
    pub superuser_tls: LocalTls,
    /// HTTPS for the REST API (`restapi.certfile` set).
    pub rest_tls: Option<Arc<pgvigil_rest::tls::ServerTls>>,
    pub etcd_tls: Option<EtcdTls>,
}

/// Reads and checks everything; see the module documentation.
pub fn prepare(cfg: &Config) -> Result<Prepared, TlsError> {
    let auth = &cfg.postgresql.authentication;
    let superuser_tls = LocalTls::from_options(
        "superuser",
        &options(&auth.superuser),
        cfg.postgresql.use_unix_socket,
    )?;
    // The replication and rewind roles are used by libpq tools, which read the files
    // themselves; check them the same way (GSSAPI is theirs to use).
    let mut roles = vec![("superuser", &auth.superuser), ("replication", &auth.replication)];
    if let Some(rewind) = &auth.rewind {
        roles.push(("rewind", rewind));
    }
    for (role, credentials) in &roles {
        if *role != "superuser" {
            let without_gss: Vec<_> = options(credentials)
                .into_iter()
                .filter(|(k, _)| k != "gssencmode")
                .collect();
            LocalTls::from_options(role, &without_gss, false)?;
        }
        if let Some(key) = &credentials.sslkey {
            libpq_key_permissions(
                &format!("postgresql.authentication.{role}.sslkey"),
                Path::new(key),
            )?;
        }
    }
    let rest_tls = pgvigil_rest::tls::ServerTls::new(&cfg.restapi)?;
    pgvigil_rest::tls::client_config(&cfg.ctl, cfg.ctl.insecure)?;
    check_trust(cfg)?;
    let e = &cfg.etcd3;
    let etcd_tls = EtcdTls::for_protocol(
        &e.protocol,
        e.cacert.as_deref(),
        e.cert.as_deref(),
        e.key.as_deref(),
    )?;
    Ok(Prepared {
        superuser_tls,
        rest_tls,
        etcd_tls,
    })
}

/// Our own certificates must be accepted by the CAs the other side uses to check them (the
/// members share one configuration in practice): PostgreSQL's server certificate by the roles'
/// `sslrootcert` when they verify, the REST certificate by `ctl.cacert` (what peers and
/// patronictl check it with), and `ctl.certfile` by `restapi.cafile` when clients must show one.
fn check_trust(cfg: &Config) -> Result<(), TlsError> {
    use pgvigil_tls::{CertUsage, ConfFile, check_signed_by};
    let auth = &cfg.postgresql.authentication;
    let server_cert = cfg
        .postgresql
        .parameters
        .get("ssl_cert_file")
        .and_then(|v| v.as_str())
        .map(Path::new)
        .filter(|p| p.is_absolute());
    let ssl_on = cfg.postgresql.parameters.get("ssl").is_some_and(|v| {
        matches!(v.as_str(), Some("on" | "true" | "yes" | "1")) || v == &serde_json::Value::Bool(true)
    });
    if let Some(server_cert) = server_cert.filter(|_| ssl_on) {
        let mut roles = vec![("superuser", &auth.superuser), ("replication", &auth.replication)];
        if let Some(rewind) = &auth.rewind {
            roles.push(("rewind", rewind));
        }
        for (role, credentials) in roles {
            let verifies = matches!(credentials.sslmode.as_deref(), Some("verify-ca" | "verify-full"));
            if let (true, Some(root)) = (verifies, &credentials.sslrootcert) {
                let key = format!("postgresql.authentication.{role}.sslrootcert");
                check_signed_by(
                    ConfFile::new("postgresql.parameters.ssl_cert_file", server_cert),
                    Some(ConfFile::new(&key, Path::new(root))),
                    CertUsage::Server,
                )?;
            }
        }
    }
    if let Some(cert) = &cfg.restapi.certfile
        && !cfg.ctl.insecure
    {
        let cert = ConfFile::new("restapi.certfile", cert);
        match &cfg.ctl.cacert {
            Some(ca) => check_signed_by(cert, Some(ConfFile::new("ctl.cacert", ca)), CertUsage::Server)?,
            // Without a configured CA, peers verify against the system bundle; Patroni runs
            // like that too (its peer checks then fail), so only warn.
            None => {
                if let Err(e) = check_signed_by(cert, None, CertUsage::Server) {
                    tracing::warn!(
                        "{e}; other members and patronictl will not be able to verify this API: \
                         set ctl.cacert (or restapi.cafile) to the CA that signed it"
                    );
                }
            }
        }
    }
    if let (Some(cert), Some(ca)) = (&cfg.ctl.certfile, &cfg.restapi.cafile)
        && cfg.restapi.verify_client != pgvigil_config::VerifyClient::None
    {
        check_signed_by(
            ConfFile::new("ctl.certfile", cert),
            Some(ConfFile::new("restapi.cafile", ca)),
            CertUsage::Client,
        )?;
    }
    Ok(())
}

/// The libpq keywords of a role other than user and password.
pub fn options(credentials: &PgCredentials) -> Vec<(String, String)> {
    credentials
        .libpq_options()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// libpq refuses a key that others may read (unless root owns it and only its group may):
/// say so now rather than when `pg_basebackup` first fails.
fn libpq_key_permissions(key: &str, path: &Path) -> Result<(), TlsError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // a missing file was reported already
    };
    let mode = meta.mode() & 0o777;
    let too_open = if meta.uid() == nix::unistd::geteuid().as_raw() {
        mode & 0o077 != 0
    } else {
        mode & 0o037 != 0
    };
    if too_open {
        return Err(TlsError::new(
            key,
            Some(path),
            format!(
                "the key has permissions {mode:04o}; libpq refuses keys that others can read \
                 (use 0600, or 0640 when root owns the file)"
            ),
        ));
    }
    Ok(())
}

/// With `use_unix_socket`: the socket directory of the agent's own superuser connection, as
/// Patroni picks it: the first absolute directory of `unix_socket_directories`; PostgreSQL's
/// default directory when the parameter is not set; `None` (TCP) when it is set but has no
/// absolute directory.
pub fn unix_socket_dir(cfg: &Config) -> Option<String> {
    if !cfg.postgresql.use_unix_socket {
        return None;
    }
    let configured = cfg
        .postgresql
        .parameters
        .get("unix_socket_directories")
        .or_else(|| {
            cfg.bootstrap
                .dcs
                .pointer("/postgresql/parameters/unix_socket_directories")
        });
    match configured {
        Some(value) => {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.split(',')
                .map(str::trim)
                .find(|d| d.starts_with('/'))
                .map(str::to_string)
        }
        None => Some(
            ["/var/run/postgresql", "/run/postgresql", "/tmp"]
                .into_iter()
                .find(|d| Path::new(d).is_dir())
                .unwrap_or("/tmp")
                .to_string(),
        ),
    }
}
