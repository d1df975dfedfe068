//! Reading PEM files: certificates, private keys (plain or PKCS#8-encrypted), CRLs.

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::{ConfFile, TlsError};

/// Where Debian, Ubuntu and RHEL-likes keep the system CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Reads a whole file; the error says whether it is missing or unreadable.
pub fn read_pem_file(file: ConfFile<'_>) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file.path).map_err(|e| {
        let problem = match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_string(),
            std::io::ErrorKind::PermissionDenied => {
                "cannot read the file: permission denied (the agent runs as the user that owns PostgreSQL)"
                    .to_string()
            }
            _ => format!("cannot read the file: {e}"),
        };
        TlsError::new(file.key, Some(file.path), problem)
    })
}

/// Every certificate of a PEM file, at least one.
pub fn read_certs(file: ConfFile<'_>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read_pem_file(file)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(file.key, Some(file.path), format!("not a valid PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            file.key,
            Some(file.path),
            "no certificate in the file (expected a PEM \"BEGIN CERTIFICATE\" block)",
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file. `password` is `(config key, passphrase)` for encrypted keys.
/// Encrypted PKCS#8 keys (`BEGIN ENCRYPTED PRIVATE KEY`, what OpenSSL 3 writes) are decrypted
/// here; the legacy OpenSSL encryption (`Proc-Type: 4,ENCRYPTED`) is refused with a hint.
pub fn read_private_key(
    file: ConfFile<'_>,
    password: Option<(&str, &str)>,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read_pem_file(file)?;
    let err = |problem: String| TlsError::new(file.key, Some(file.path), problem);
    let utf8 = String::from_utf8_lossy(&text);
    if utf8.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(err(
            "the key is encrypted in the legacy OpenSSL format, which pgvigil cannot read; \
             convert it to encrypted PKCS#8 with `openssl pkcs8 -topk8 -v2 aes-256-cbc -in OLD -out NEW`"
                .into(),
        ));
    }
    if let Some(block) = pem_block(&utf8, "ENCRYPTED PRIVATE KEY") {
        let Some((password_key, password)) = password else {
            return Err(err(
                "the key is encrypted but no password is configured for it".into()
            ));
        };
        let (_, der) = pkcs8::der::pem::decode_vec(block.as_bytes())
            .map_err(|e| err(format!("not a valid encrypted key: {e}")))?;
        let info = pkcs8::EncryptedPrivateKeyInfo::try_from(der.as_slice())
            .map_err(|e| err(format!("not a valid encrypted key: {e}")))?;
        let plain = info.decrypt(password.as_bytes()).map_err(|_| {
            err(format!(
                "cannot decrypt the key with the password from {password_key}"
            ))
        })?;
        return Ok(PrivateKeyDer::Pkcs8(plain.as_bytes().to_vec().into()));
    }
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&text) {
        let (kind, der) = section.map_err(|e| err(format!("not a valid PEM file: {e}")))?;
        let key = match kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(der.into()),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
            _ => continue,
        };
        return Ok(key);
    }
    Err(err(
        "no private key in the file (expected a PEM \"BEGIN PRIVATE KEY\" block)".into(),
    ))
}

/// CRLs from a PEM file, or from every file of a directory (libpq's `sslcrldir`).
pub fn read_crls(file: ConfFile<'_>) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    if file.path.is_dir() {
        let entries = std::fs::read_dir(file.path).map_err(|e| {
            TlsError::new(
                file.key,
                Some(file.path),
                format!("cannot list the directory: {e}"),
            )
        })?;
        let mut paths: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        let mut out = Vec::new();
        for path in &paths {
            out.extend(read_crl_file(ConfFile::new(file.key, path))?);
        }
        return Ok(out);
    }
    read_crl_file(file)
}

fn read_crl_file(file: ConfFile<'_>) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let text = read_pem_file(file)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(file.key, Some(file.path), format!("not a valid PEM file: {e}")))?;
    if crls.is_empty() {
        return Err(TlsError::new(
            file.key,
            Some(file.path),
            "no CRL in the file (expected a PEM \"BEGIN X509 CRL\" block)",
        ));
    }
    Ok(crls)
}

/// The system's CA bundle (empty when none is installed).
pub fn system_roots() -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for bundle in SYSTEM_BUNDLES {
        let Ok(text) = std::fs::read(bundle) else {
            continue;
        };
        let certs = CertificateDer::pem_slice_iter(&text).flatten();
        let (added, ignored) = store.add_parsable_certificates(certs);
        tracing::debug!(bundle, added, ignored, "system CA bundle loaded");
        break;
    }
    store
}

/// The first `-----BEGIN <label>-----` ... `-----END <label>-----` block of `text`.
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(&text[start..stop])
}

/// PEM text of one DER object.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn pem_round_trip() {
        for der in [&b"a"[..], b"ab", b"abc", &[0u8, 255, 17, 42, 99][..]] {
            let pem = pem_encode("X", der);
            let (label, back) = pkcs8::der::pem::decode_vec(pem.as_bytes()).unwrap();
            assert_eq!(label, "X");
            assert_eq!(back, der);
        }
    }

    #[test]
    fn missing_file_names_key_and_path() {
        let e = read_certs(ConfFile::new("restapi.certfile", Path::new("/nonexistent/x.pem"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "restapi.certfile (/nonexistent/x.pem): file not found"
        );
    }
}
