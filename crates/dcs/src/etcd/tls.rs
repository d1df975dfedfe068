//! TLS of the etcd connections (`etcd3.protocol: https`, `cacert`, `cert`, `key`).

use std::path::Path;

use etcd_client::{Certificate, Identity, TlsOptions};
use pgvigil_tls::{ConfFile, TlsError};

/// The PEM material of an etcd TLS set-up, read and checked by [`EtcdTls::load`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA certificates that sign etcd's server certificates (`etcd3.cacert`); `None`: the
    /// system bundle.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key (`etcd3.cert`, `etcd3.key`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl EtcdTls {
    /// Reads the files named by `etcd3.cacert`, `etcd3.cert` and `etcd3.key` (the key may be
    /// inside the certificate file, as Python's ssl allows) and checks that the key belongs to
    /// the certificate.
    pub fn load(cacert: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<EtcdTls, TlsError> {
        let ca_pem = match cacert {
            Some(path) => {
                let file = ConfFile::new("etcd3.cacert", path);
                pgvigil_tls::read_certs(file)?;
                Some(pgvigil_tls::read_pem_file(file)?)
            }
            None => None,
        };
        let identity = match (cert, key) {
            (Some(cert), key) => Some(pgvigil_tls::identity_pem(&pgvigil_tls::Identity {
                cert: ConfFile::new("etcd3.cert", cert),
                key: key.map(|k| ConfFile::new("etcd3.key", k)),
                password: None,
            })?),
            (None, Some(key)) => {
                return Err(TlsError::new(
                    "etcd3.key",
                    Some(key),
                    "a client key without a client certificate (etcd3.cert)",
                ));
            }
            (None, None) => None,
        };
        Ok(EtcdTls { ca_pem, identity })
    }

    /// [`EtcdTls::load`] when `protocol` (`etcd3.protocol`, or the scheme of `etcd3.url`) is
    /// `https`; `None` otherwise, as Patroni ignores the files then (with a warning here).
    pub fn for_protocol(
        protocol: &str,
        cacert: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<EtcdTls>, TlsError> {
        if protocol.eq_ignore_ascii_case("https") {
            return Self::load(cacert, cert, key).map(Some);
        }
        if cacert.is_some() || cert.is_some() || key.is_some() {
            tracing::warn!(
                "etcd3.cacert/cert/key are set but etcd3.protocol is {protocol}: etcd is reached without TLS \
                 (set etcd3.protocol: https to use them)"
            );
        }
        Ok(None)
    }

    pub(crate) fn options(&self) -> TlsOptions {
        let ca = match &self.ca_pem {
            Some(pem) => pem.clone(),
            None => system_bundle(),
        };
        let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            options = options.identity(Identity::from_pem(cert, key));
        }
        options
    }
}

/// The system CA bundle as PEM (empty when there is none: every handshake then fails with an
/// unknown issuer, which names the problem).
fn system_bundle() -> Vec<u8> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
    .unwrap_or_default()
}
