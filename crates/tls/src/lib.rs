//! TLS set-up shared by every pgvigil component: PEM files read and checked once, with errors
//! that name the configuration key and the file, and the rustls configurations built from them.
//!
//! One TLS stack is used throughout (rustls with the ring provider): the etcd client (tonic),
//! the REST server and the HTTP client (reqwest), and the agent's own PostgreSQL connections
//! (tokio-postgres) all take the configurations built here. Checking files here, before the
//! agent touches PostgreSQL, is what makes a bad set-up fail before `initdb` instead of after.
//!
//! * [`read_certs`], [`read_private_key`], [`read_crls`]: the files, one key each;
//! * [`client_config`]: a client that verifies the server's chain and name (`verify-full`,
//!   HTTPS, etcd), its chain only (`verify-ca`) or nothing (`require`, `ctl.insecure`), with an
//!   optional client certificate;
//! * [`server_config`]: the REST API's server side, with `verify_client` and `ciphers`.

mod ciphers;
mod files;
#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use ciphers::select_tls12_suites;
pub use files::{read_certs, read_crls, read_pem_file, read_private_key, system_roots};
pub use rustls;

/// A TLS file or setting that cannot be used. `key` is the configuration key the value came
/// from (`restapi.certfile`, `postgresql.authentication.superuser.sslkey`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}{}: {problem}", path.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
pub struct TlsError {
    pub key: String,
    pub path: Option<PathBuf>,
    pub problem: String,
}

impl TlsError {
    pub fn new(key: &str, path: Option<&Path>, problem: impl Into<String>) -> Self {
        TlsError {
            key: key.to_string(),
            path: path.map(Path::to_path_buf),
            problem: problem.into(),
        }
    }
}

/// A file named by a configuration key.
#[derive(Debug, Clone, Copy)]
pub struct ConfFile<'a> {
    pub key: &'a str,
    pub path: &'a Path,
}

impl<'a> ConfFile<'a> {
    pub fn new(key: &'a str, path: &'a Path) -> Self {
        ConfFile { key, path }
    }
}

/// The crypto provider every configuration uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider, for libraries that build their own
/// configurations from it. Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client certificate with its key.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub cert: ConfFile<'a>,
    /// Defaults to the certificate file (a PEM holding both).
    pub key: Option<ConfFile<'a>>,
    /// Passphrase of an encrypted key, and the key it was configured under.
    pub password: Option<(&'a str, &'a str)>,
}

/// How much of the server's certificate a client checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCheck {
    /// Nothing (libpq `sslmode=require` without a root certificate, `ctl.insecure`).
    Nothing,
    /// The chain up to a trusted root, not the name (libpq `verify-ca`).
    Chain,
    /// Chain and host name (libpq `verify-full`, HTTPS, etcd).
    ChainAndName,
}

/// What [`client_config`] builds from.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings<'a> {
    /// Trusted roots; `None` means the system bundle.
    pub ca: Option<ConfFile<'a>>,
    /// Certificate revocation lists (files or directories).
    pub crls: Vec<ConfFile<'a>>,
    pub identity: Option<Identity<'a>>,
    pub check: Option<ServerCheck>,
}

/// Reads a certificate chain and its key and checks that they belong together.
pub fn certified_key(identity: &Identity<'_>) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let chain = read_certs(identity.cert)?;
    let key_file = identity.key.unwrap_or(identity.cert);
    let key = read_private_key(key_file, identity.password)?;
    rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| {
            let problem = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "the private key does not belong to the certificate {} ({})",
                    identity.cert.path.display(),
                    identity.cert.key
                ),
                other => format!("unusable private key: {other}"),
            };
            TlsError::new(key_file.key, Some(key_file.path), problem)
        })
}

/// Reads and checks a client certificate and key without building a configuration: the PEM
/// text of the chain and of the (decrypted) key, for libraries that take PEM (tonic).
pub fn identity_pem(identity: &Identity<'_>) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let key = certified_key(identity)?;
    let key_file = identity.key.unwrap_or(identity.cert);
    let der = read_private_key(key_file, identity.password)?;
    let mut cert_pem = Vec::new();
    for cert in &key.cert {
        cert_pem.extend(files::pem_encode("CERTIFICATE", cert.as_ref()).into_bytes());
    }
    let label = match &der {
        rustls::pki_types::PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        rustls::pki_types::PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let key_pem = files::pem_encode(label, der.secret_der()).into_bytes();
    Ok((cert_pem, key_pem))
}

fn roots(ca: Option<ConfFile<'_>>) -> Result<rustls::RootCertStore, TlsError> {
    match ca {
        Some(file) => {
            let mut store = rustls::RootCertStore::empty();
            for cert in read_certs(file)? {
                store.add(cert).map_err(|e| {
                    TlsError::new(
                        file.key,
                        Some(file.path),
                        format!("not a usable CA certificate: {e}"),
                    )
                })?;
            }
            Ok(store)
        }
        None => Ok(system_roots()),
    }
}

/// A rustls client configuration (no ALPN set).
pub fn client_config(settings: &ClientSettings<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let check = settings.check.unwrap_or(ServerCheck::ChainAndName);
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("tls", None, e.to_string()))?;
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match check {
        ServerCheck::Nothing => Arc::new(verify::AcceptAnyServer(provider.clone())),
        ServerCheck::Chain | ServerCheck::ChainAndName => {
            let roots = Arc::new(roots(settings.ca)?);
            let mut crls = Vec::new();
            for file in &settings.crls {
                crls.extend(read_crls(*file)?);
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .with_crls(crls)
                .build()
                .map_err(|e| {
                    let key = settings.ca.map_or("tls", |f| f.key);
                    TlsError::new(
                        key,
                        settings.ca.map(|f| f.path),
                        format!("cannot verify with it: {e}"),
                    )
                })?;
            if check == ServerCheck::Chain {
                Arc::new(verify::ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    match &settings.identity {
        Some(identity) => {
            let key = certified_key(identity)?;
            let resolver = Arc::new(verify::FixedClientCert(key));
            Ok(builder.with_client_cert_resolver(resolver))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// What a certificate is checked for by [`check_signed_by`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUsage {
    Server,
    Client,
}

/// Checks that the certificate in `cert` chains up to a root in `ca` (`None`: the system
/// bundle) and is valid for `usage`, the way the other side will check it. Catches a
/// certificate signed by another CA than the one its peers trust, before anything starts.
pub fn check_signed_by(
    cert: ConfFile<'_>,
    ca: Option<ConfFile<'_>>,
    usage: CertUsage,
) -> Result<(), TlsError> {
    let chain = read_certs(cert)?;
    let (end, intermediates) = chain.split_first().expect("read_certs returns at least one");
    let roots = Arc::new(roots(ca)?);
    let now = rustls::pki_types::UnixTime::now();
    let result = match usage {
        CertUsage::Server => {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| TlsError::new(ca.map_or("tls", |c| c.key), ca.map(|c| c.path), e.to_string()))?;
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("valid name");
            verify::ChainOnly(verifier).verify_server_cert_now(end, intermediates, &name, now)
        }
        CertUsage::Client => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| TlsError::new(ca.map_or("tls", |c| c.key), ca.map(|c| c.path), e.to_string()))?;
            verifier.verify_client_cert(end, intermediates, now).map(|_| ())
        }
    };
    result.map_err(|e| {
        let trusted = match ca {
            Some(ca) => format!("the CA of {} ({})", ca.key, ca.path.display()),
            None => "the system CA bundle".to_string(),
        };
        TlsError::new(
            cert.key,
            Some(cert.path),
            format!("not accepted by {trusted}: {e}"),
        )
    })
}

/// `restapi.verify_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    #[default]
    None,
    /// Certificates are asked for and verified when given.
    Optional,
    /// Every client must present a certificate signed by the CA.
    Required,
}

/// What [`server_config`] builds from.
#[derive(Debug, Clone)]
pub struct ServerSettings<'a> {
    pub identity: Identity<'a>,
    /// CA that signs client certificates (`restapi.cafile`).
    pub client_ca: Option<ConfFile<'a>>,
    pub client_auth: ClientAuth,
    /// (`restapi.ciphers` key, value): an OpenSSL cipher list restricting the TLS 1.2 suites.
    pub ciphers: Option<(&'a str, &'a str)>,
}

/// A rustls server configuration (ALPN `http/1.1`).
pub fn server_config(settings: &ServerSettings<'_>) -> Result<rustls::ServerConfig, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some((key, list)) = settings.ciphers {
        let tls12 = select_tls12_suites(list).map_err(|problem| TlsError::new(key, None, problem))?;
        provider.cipher_suites.retain(|s| match s {
            rustls::SupportedCipherSuite::Tls13(_) => true,
            rustls::SupportedCipherSuite::Tls12(_) => tls12.contains(&s.suite()),
        });
    }
    let provider = Arc::new(provider);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("tls", None, e.to_string()))?;
    let builder = match settings.client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        auth => {
            let ca = settings.client_ca.ok_or_else(|| {
                TlsError::new(
                    "restapi.cafile",
                    None,
                    "verify_client needs the CA that signs client certificates (restapi.cafile)",
                )
            })?;
            let roots = Arc::new(roots(Some(ca))?);
            let mut verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            if auth == ClientAuth::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::new(ca.key, Some(ca.path), format!("cannot verify with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let key = certified_key(&settings.identity)?;
    let mut config = builder.with_cert_resolver(Arc::new(verify::FixedServerCert(key)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests;
