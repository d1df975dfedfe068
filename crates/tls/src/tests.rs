//! Handshakes between the configurations built here, in memory.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::*;
use crate::test_pki::{Issued, TestPki};

struct Fixture {
    _dir: tempfile::TempDir,
    pki: TestPki,
    other_ca: TestPki,
    server: Issued,
    client: Issued,
    stranger: Issued,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("ca"), "test CA").unwrap();
    let other_ca = TestPki::new(&dir.path().join("other"), "other CA").unwrap();
    let server = pki
        .issue("server", "server", &["127.0.0.1", "db.example"])
        .unwrap();
    let client = pki.issue("client", "postgres", &[]).unwrap();
    let stranger = other_ca.issue("stranger", "postgres", &["127.0.0.1"]).unwrap();
    Fixture {
        _dir: dir,
        pki,
        other_ca,
        server,
        client,
        stranger,
    }
}

fn identity(issued: &Issued) -> Identity<'_> {
    Identity {
        cert: ConfFile::new("certfile", &issued.cert),
        key: Some(ConfFile::new("keyfile", &issued.key)),
        password: None,
    }
}

fn server(f: &Fixture, auth: ClientAuth) -> rustls::ServerConfig {
    let ca = f.pki.ca_cert();
    server_config(&ServerSettings {
        identity: identity(&f.server),
        client_ca: Some(ConfFile::new("restapi.cafile", &ca)),
        client_auth: auth,
        ciphers: None,
    })
    .unwrap()
}

fn client(ca: &Path, check: ServerCheck, id: Option<&Issued>) -> rustls::ClientConfig {
    client_config(&ClientSettings {
        ca: Some(ConfFile::new("cacert", ca)),
        crls: Vec::new(),
        identity: id.map(identity),
        check: Some(check),
    })
    .unwrap()
}

/// Runs a handshake plus one application byte each way (TLS 1.3 reports a refused client
/// certificate only after the client thinks it is done).
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
    name: &str,
) -> Result<(), rustls::Error> {
    use std::io::{Read, Write};
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    c.writer().write_all(b"x").unwrap();
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        let mut got = [0u8; 1];
        if !s.is_handshaking() && s.reader().read(&mut got).is_ok_and(|n| n == 1) {
            return Ok(());
        }
    }
    panic!("handshake did not finish")
}

#[test]
fn server_checks_by_mode() {
    let f = fixture();
    let ca = f.pki.ca_cert();
    let other = f.other_ca.ca_cert();
    let srv = || server(&f, ClientAuth::None);
    handshake(client(&ca, ServerCheck::ChainAndName, None), srv(), "127.0.0.1").unwrap();
    handshake(client(&ca, ServerCheck::ChainAndName, None), srv(), "db.example").unwrap();
    let e = handshake(
        client(&ca, ServerCheck::ChainAndName, None),
        srv(),
        "other.example",
    )
    .unwrap_err();
    assert!(e.to_string().contains("not valid for name"), "{e}");
    // verify-ca: the name does not matter, the CA does.
    handshake(client(&ca, ServerCheck::Chain, None), srv(), "other.example").unwrap();
    let e = handshake(client(&other, ServerCheck::Chain, None), srv(), "127.0.0.1").unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // require: encrypted, not authenticated.
    handshake(client(&other, ServerCheck::Nothing, None), srv(), "other.example").unwrap();
}

#[test]
fn client_certificates_by_verify_client() {
    let f = fixture();
    let ca = f.pki.ca_cert();
    let with_cert = || client(&ca, ServerCheck::ChainAndName, Some(&f.client));
    let without = || client(&ca, ServerCheck::ChainAndName, None);
    let stranger = || client(&ca, ServerCheck::ChainAndName, Some(&f.stranger));
    handshake(with_cert(), server(&f, ClientAuth::Required), "127.0.0.1").unwrap();
    assert!(handshake(without(), server(&f, ClientAuth::Required), "127.0.0.1").is_err());
    assert!(handshake(stranger(), server(&f, ClientAuth::Required), "127.0.0.1").is_err());
    handshake(without(), server(&f, ClientAuth::Optional), "127.0.0.1").unwrap();
    handshake(with_cert(), server(&f, ClientAuth::Optional), "127.0.0.1").unwrap();
    assert!(handshake(stranger(), server(&f, ClientAuth::Optional), "127.0.0.1").is_err());
}

#[test]
fn verify_client_without_cafile_is_refused() {
    let f = fixture();
    let e = server_config(&ServerSettings {
        identity: identity(&f.server),
        client_ca: None,
        client_auth: ClientAuth::Required,
        ciphers: None,
    })
    .unwrap_err();
    assert_eq!(e.key, "restapi.cafile");
}

#[test]
fn a_key_of_another_certificate_is_named() {
    let f = fixture();
    let e = certified_key(&Identity {
        cert: ConfFile::new("restapi.certfile", &f.server.cert),
        key: Some(ConfFile::new("restapi.keyfile", &f.client.key)),
        password: None,
    })
    .unwrap_err();
    assert_eq!(e.key, "restapi.keyfile");
    assert_eq!(e.path.as_deref(), Some(f.client.key.as_path()));
    assert!(e.problem.contains("does not belong to the certificate"), "{e}");
    assert!(e.problem.contains("server.crt"), "{e}");
}

#[test]
fn certificate_and_key_in_one_file() {
    let f = fixture();
    let both = f.pki.dir().join("both.pem");
    let text =
        std::fs::read_to_string(&f.server.cert).unwrap() + &std::fs::read_to_string(&f.server.key).unwrap();
    std::fs::write(&both, text).unwrap();
    certified_key(&Identity {
        cert: ConfFile::new("restapi.certfile", &both),
        key: None,
        password: None,
    })
    .unwrap();
    // A key file is not a certificate.
    let e = read_certs(ConfFile::new("restapi.certfile", &f.server.key)).unwrap_err();
    assert!(e.problem.contains("no certificate"), "{e}");
}

#[test]
fn encrypted_pkcs8_keys_need_the_right_password() {
    let f = fixture();
    let encrypted = f.pki.dir().join("encrypted.key");
    let status = std::process::Command::new("openssl")
        .args([
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-passout",
            "pass:s3cret",
            "-in",
        ])
        .arg(&f.client.key)
        .arg("-out")
        .arg(&encrypted)
        .status()
        .expect("the openssl command line tool is installed");
    assert!(status.success());
    let file = ConfFile::new("ctl.keyfile", &encrypted);
    read_private_key(file, Some(("ctl.keyfile_password", "s3cret"))).unwrap();
    let e = read_private_key(file, Some(("ctl.keyfile_password", "wrong"))).unwrap_err();
    assert!(
        e.problem
            .contains("cannot decrypt the key with the password from ctl.keyfile_password"),
        "{e}"
    );
    let e = read_private_key(file, None).unwrap_err();
    assert!(e.problem.contains("no password is configured"), "{e}");
    // The decrypted key is re-exported as PEM for tonic.
    let (_, key_pem) = identity_pem(&Identity {
        cert: ConfFile::new("ctl.certfile", &f.client.cert),
        key: Some(file),
        password: Some(("ctl.keyfile_password", "s3cret")),
    })
    .unwrap();
    assert!(
        String::from_utf8(key_pem)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
}

#[test]
fn ciphers_restrict_tls12_only() {
    let f = fixture();
    let ca = f.pki.ca_cert();
    let srv = server_config(&ServerSettings {
        identity: identity(&f.server),
        client_ca: None,
        client_auth: ClientAuth::None,
        ciphers: Some(("restapi.ciphers", "ECDHE-RSA-AES128-GCM-SHA256")),
    })
    .unwrap();
    // The test CA issues ECDSA keys, so no ECDSA suite is left for TLS 1.2; TLS 1.3 still works.
    handshake(
        client(&ca, ServerCheck::ChainAndName, None),
        srv.clone(),
        "127.0.0.1",
    )
    .unwrap();
    let tls12_only = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::AcceptAnyServer(provider())))
        .with_no_client_auth();
    assert!(handshake(tls12_only, srv, "127.0.0.1").is_err());
    let e = server_config(&ServerSettings {
        identity: identity(&f.server),
        client_ca: None,
        client_auth: ClientAuth::None,
        ciphers: Some(("restapi.ciphers", "RC4-SHA")),
    })
    .unwrap_err();
    assert_eq!(e.key, "restapi.ciphers");
}

#[test]
fn certificates_of_another_ca_are_named() {
    let f = fixture();
    let ca = f.pki.ca_cert();
    let ca_file = ConfFile::new("ctl.cacert", &ca);
    check_signed_by(
        ConfFile::new("restapi.certfile", &f.server.cert),
        Some(ca_file),
        CertUsage::Server,
    )
    .unwrap();
    check_signed_by(
        ConfFile::new("ctl.certfile", &f.client.cert),
        Some(ca_file),
        CertUsage::Client,
    )
    .unwrap();
    let e = check_signed_by(
        ConfFile::new("restapi.certfile", &f.stranger.cert),
        Some(ca_file),
        CertUsage::Server,
    )
    .unwrap_err();
    assert_eq!(e.key, "restapi.certfile");
    assert!(e.problem.contains("not accepted by the CA of ctl.cacert"), "{e}");
}

#[test]
fn revoked_server_certificates_are_refused_with_a_crl() {
    let f = fixture();
    let ca = f.pki.ca_cert();
    let revoking = f.pki.crl("revoking.crl", &[&f.server]).unwrap();
    let other = f.pki.crl("other.crl", &[&f.client]).unwrap();
    let with_crl = |crl: &Path| {
        client_config(&ClientSettings {
            ca: Some(ConfFile::new("sslrootcert", &ca)),
            crls: vec![ConfFile::new("sslcrl", crl)],
            identity: None,
            check: Some(ServerCheck::Chain),
        })
        .unwrap()
    };
    let e = handshake(with_crl(&revoking), server(&f, ClientAuth::None), "127.0.0.1").unwrap_err();
    assert!(e.to_string().contains("Revoked"), "{e}");
    handshake(with_crl(&other), server(&f, ClientAuth::None), "127.0.0.1").unwrap();
    // A directory of CRLs (libpq's sslcrldir) works the same.
    let dir = f.pki.dir().join("crls");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&revoking, dir.join("a.crl")).unwrap();
    assert!(handshake(with_crl(&dir), server(&f, ClientAuth::None), "127.0.0.1").is_err());
    // Not a CRL: named.
    let e = read_crls(ConfFile::new("sslcrl", &ca)).unwrap_err();
    assert!(e.problem.contains("no CRL"), "{e}");
}
