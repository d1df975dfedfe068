//! The REST API over HTTPS (`restapi.certfile`, `verify_client`) and the `ctl` client side,
//! in-process with certificates generated for the test.

use std::sync::Arc;
use std::time::Duration;

mod support;

use pgvigil_api::{ClusterView, Keys};
use pgvigil_config::{CtlConfig, RestApiConfig, VerifyClient};
use pgvigil_rest::{AccessControl, NodeSnapshot, PeerClient, RestContext, serve_https};
use pgvigil_tls::test_pki::{Issued, TestPki};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

struct Fixture {
    _dir: tempfile::TempDir,
    pki: TestPki,
    server: Issued,
    client: Issued,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki"), "CA").unwrap();
    let server = pki.issue("server", "pg1", &["127.0.0.1"]).unwrap();
    let client = pki.issue("client", "operator", &[]).unwrap();
    Fixture {
        _dir: dir,
        pki,
        server,
        client,
    }
}

/// A running server; dropping it stops it.
struct Running {
    base: String,
    tls: Arc<pgvigil_rest::tls::ServerTls>,
    shutdown: CancellationToken,
    _snapshot: watch::Sender<Arc<NodeSnapshot>>,
    _commands: mpsc::Receiver<pgvigil_rest::ApiCommand>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves the API over HTTPS with `verify_client`.
async fn start(f: &Fixture, verify_client: VerifyClient) -> Running {
    let api = RestApiConfig {
        certfile: Some(f.server.cert.clone()),
        keyfile: Some(f.server.key.clone()),
        cafile: Some(f.pki.ca_cert()),
        verify_client,
        ..Default::default()
    };
    let tls = pgvigil_rest::tls::ServerTls::new(&api)
        .unwrap()
        .expect("certfile is set");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let mut snapshot = NodeSnapshot::initial("batman", "pg1");
    snapshot.status.state = "running".into();
    snapshot.status.role = "primary".into();
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(snapshot));
    let (commands, commands_rx) = mpsc::channel(4);
    let ctx = RestContext {
        snapshot: snapshot_rx,
        dcs: Arc::new(support::FakeDcs::new(ClusterView::from_kvs(
            &Keys::new("/service", "batman"),
            1,
            Vec::new(),
        ))),
        peers: PeerClient::new(None),
        commands,
        access: AccessControl {
            authentication: Some(("admin".into(), "secret".into())),
            ..Default::default()
        },
        extra_headers: Vec::new(),
        failsafe: Default::default(),
        status_probe: None,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_https(
        listener,
        tls.clone(),
        verify_client,
        ctx,
        shutdown.clone(),
    ));
    Running {
        base,
        tls,
        shutdown,
        _snapshot: snapshot_tx,
        _commands: commands_rx,
    }
}

/// The `ctl` client: the CA, and the client certificate when `with_cert`.
fn client(f: &Fixture, with_cert: bool) -> reqwest::Client {
    let ctl = CtlConfig {
        cacert: Some(f.pki.ca_cert()),
        certfile: with_cert.then(|| f.client.cert.clone()),
        keyfile: with_cert.then(|| f.client.key.clone()),
        ..Default::default()
    };
    let tls = pgvigil_rest::tls::client_config(&ctl, false).unwrap();
    pgvigil_rest::tls::http_client(tls, Duration::from_secs(2))
}

#[tokio::test]
async fn optional_client_certificates_guard_the_protected_endpoints() {
    pgvigil_tls::install_default_provider();
    let f = fixture();
    let server = start(&f, VerifyClient::Optional).await;
    let base = &server.base;
    let anonymous = client(&f, false);
    let r = anonymous.get(format!("{base}/patroni")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = anonymous
        .post(format!("{base}/restart"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.text().await.unwrap(), "client certificate required");
    // With a certificate the request reaches the next check: Basic authentication.
    let r = client(&f, true)
        .post(format!("{base}/restart"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn required_client_certificates_refuse_the_handshake() {
    pgvigil_tls::install_default_provider();
    let f = fixture();
    let server = start(&f, VerifyClient::Required).await;
    let base = &server.base;
    assert!(
        client(&f, false)
            .get(format!("{base}/patroni"))
            .send()
            .await
            .is_err()
    );
    let r = client(&f, true)
        .get(format!("{base}/patroni"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The peer client of the agent, with the ctl settings, reads the status document.
    let ctl = CtlConfig {
        cacert: Some(f.pki.ca_cert()),
        certfile: Some(f.client.cert.clone()),
        keyfile: Some(f.client.key.clone()),
        ..Default::default()
    };
    let peers = PeerClient::with_tls(None, pgvigil_rest::tls::client_config(&ctl, false).unwrap());
    let status = peers
        .fetch_status(&format!("{base}/patroni"), Duration::from_secs(2))
        .await
        .expect("status over HTTPS");
    assert_eq!(status.role, "primary");
}

/// The certificate the server presents to a new connection (DER).
async fn served_certificate(f: &Fixture, base: &str) -> Vec<u8> {
    let addr = base.trim_start_matches("https://").to_string();
    let config = pgvigil_tls::client_config(&pgvigil_tls::ClientSettings {
        ca: Some(pgvigil_tls::ConfFile::new("ca", &f.pki.ca_cert())),
        ..Default::default()
    })
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem_path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem_path)
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let f = fixture();
    let server = start(&f, VerifyClient::None).await;
    let old = der_of(&f.server.cert);
    assert_eq!(served_certificate(&f, &server.base).await, old);
    // Renewal: the same file names, a new certificate and key.
    let renewed = f.pki.issue("server", "pg1", &["127.0.0.1"]).unwrap();
    let new = der_of(&renewed.cert);
    assert_ne!(new, old);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if served_certificate(&f, &server.base).await == new {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A broken replacement keeps the last good set-up.
    std::fs::write(&f.server.key, "not a key").unwrap();
    assert!(!server.tls.refresh());
    assert_eq!(served_certificate(&f, &server.base).await, new);
}
