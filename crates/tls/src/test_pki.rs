//! A throw-away certificate authority for tests: certificates and keys are generated at test
//! time into a directory the test owns (nothing private is ever committed).

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA whose files live in `dir`: `<dir>/ca.crt`, and per issued name `<name>.crt` and
/// `<name>.key` (mode 0600, as PostgreSQL and libpq demand of keys).
pub struct TestPki {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    next_serial: std::sync::atomic::AtomicU64,
}

/// The files of one issued certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: u64,
}

impl TestPki {
    /// Creates the CA (common name `cn`) and writes `<dir>/ca.crt`.
    pub fn new(dir: &Path, cn: &str) -> std::io::Result<TestPki> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(other)?).map_err(other)?;
        std::fs::write(dir.join("ca.crt"), issuer.pem())?;
        Ok(TestPki {
            dir: dir.to_path_buf(),
            issuer,
            next_serial: std::sync::atomic::AtomicU64::new(1000),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Issues a certificate for `cn` valid for `names` (IP addresses or DNS names) as both a
    /// server and a client certificate, and writes `<file_stem>.crt` / `<file_stem>.key`.
    pub fn issue(&self, file_stem: &str, cn: &str, names: &[&str]) -> std::io::Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().map_err(other)?),
            });
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(other)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(other)?;
        let issued = Issued {
            cert: self.dir.join(format!("{file_stem}.crt")),
            key: self.dir.join(format!("{file_stem}.key")),
            serial,
        };
        std::fs::write(&issued.cert, cert.pem())?;
        std::fs::write(&issued.key, key.serialize_pem())?;
        std::fs::set_permissions(&issued.key, std::fs::Permissions::from_mode(0o600))?;
        Ok(issued)
    }
}

impl TestPki {
    /// Writes `<dir>/<file_name>`: a CRL of this CA revoking `revoked`.
    pub fn crl(&self, file_name: &str, revoked: &[&Issued]) -> std::io::Result<PathBuf> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|i| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(i.serial),
                    revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(other)?;
        let path = self.dir.join(file_name);
        std::fs::write(&path, crl.pem().map_err(other)?)?;
        Ok(path)
    }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
