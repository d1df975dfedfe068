//! The server in-process: bind 127.0.0.1:0, real HTTP requests with reqwest (and one raw
//! HTTP/1.0 request, the way HAProxy checks).

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use pgvigil_api::cluster::RawKv;
use pgvigil_api::rest::{StatusDocument, XlogInfo};
use pgvigil_api::{ClusterView, Keys};
use pgvigil_rest::access::base64;
use pgvigil_rest::{AccessControl, ApiCommand, NodeSnapshot, PeerClient, RestContext, serve};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

fn cluster_view() -> ClusterView {
    let keys = Keys::new("/service", "batman");
    let kv = |key: &str, value: &str| RawKv {
        key: format!("/service/batman/{key}"),
        value: value.into(),
        mod_revision: 5,
        lease: 0,
    };
    ClusterView::from_kvs(
        &keys,
        9,
        vec![
            kv("leader", "pg1"),
            kv(
                "members/pg1",
                r#"{"conn_url":"postgres://10.0.0.1:5432/postgres","api_url":"http://10.0.0.1:8008/patroni","state":"running","role":"primary","version":"4.1.5","xlog_location":100,"timeline":2}"#,
            ),
            kv(
                "members/pg2",
                r#"{"conn_url":"postgres://10.0.0.2:5432/postgres","api_url":"http://10.0.0.2:8008/patroni","state":"running","role":"replica","version":"4.1.5","xlog_location":90,"replication_state":"streaming","timeline":2}"#,
            ),
            kv("config", r#"{"ttl":30,"loop_wait":10}"#),
            kv(
                "history",
                r#"[[1,25623960,"no recovery target specified","2024-09-23T16:57:57+02:00","pg1"]]"#,
            ),
            kv("status", r#"{"optime":100}"#),
        ],
    )
}

fn primary_snapshot() -> NodeSnapshot {
    let mut s = NodeSnapshot::initial("batman", "pg1");
    s.status.state = "running".into();
    s.status.role = "primary".into();
    s.status.server_version = Some(160004);
    s.status.timeline = Some(2);
    s.status.xlog = Some(XlogInfo {
        location: Some(100),
        ..Default::default()
    });
    s.status.cluster_unlocked = None;
    s.cluster = Some(cluster_view());
    s.leader_until = Some(Instant::now() + Duration::from_secs(3600));
    s.next_run = Instant::now() + Duration::from_secs(10);
    s
}

struct Server {
    base: String,
    snapshot: watch::Sender<Arc<NodeSnapshot>>,
    commands: mpsc::Receiver<ApiCommand>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(source: Result<ClusterView, String>, allowlist: Vec<String>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (snapshot, snapshot_rx) = watch::channel(Arc::new(primary_snapshot()));
    let (commands_tx, commands) = mpsc::channel(4);
    let ctx = RestContext {
        snapshot: snapshot_rx,
        dcs: Arc::new(match source {
            Ok(view) => support::FakeDcs::new(view),
            Err(e) => support::FakeDcs::failing(&e),
        }),
        peers: PeerClient::new(None),
        commands: commands_tx,
        access: AccessControl {
            authentication: Some(("admin".into(), "secret".into())),
            allowlist,
            allowlist_include_members: false,
        },
        extra_headers: vec![("X-Frame-Options".into(), "SAMEORIGIN".into())],
        failsafe: Default::default(),
        status_probe: None,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, ctx, shutdown.clone()));
    Server {
        base,
        snapshot,
        commands,
        shutdown,
        task,
    }
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

fn client() -> reqwest::Client {
    // reqwest is built without a default crypto provider: hand it the workspace's rustls set-up.
    let tls = pgvigil_tls::client_config(&Default::default()).unwrap();
    pgvigil_rest::tls::http_client(tls, Duration::from_secs(5))
}

async fn call(method: Method, url: &str) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let response = client().request(method, url).send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.text().await.unwrap())
}

#[tokio::test]
async fn health_checks_for_every_method() {
    let server = start(Ok(cluster_view()), vec![]).await;
    let b = &server.base;
    for (path, code) in [
        ("/", 200),
        ("/primary", 200),
        ("/master", 200),
        ("/leader", 200),
        ("/read-write", 200),
        ("/read-only", 200),
        ("/health", 200),
        ("/standby-leader", 503),
        ("/replica", 503),
        ("/async", 503),
        ("/sync", 503),
        ("/quorum", 503),
        ("/read-only-sync", 200),
        ("/nonsense", 503),
    ] {
        let url = format!("{b}{path}");
        let (status, headers, body) = call(Method::GET, &url).await;
        assert_eq!(status.as_u16(), code, "GET {path}");
        assert_eq!(headers["content-type"], "application/json", "GET {path}");
        assert_eq!(headers["x-frame-options"], "SAMEORIGIN");
        assert_eq!(headers["server"], "Patroni/4.1.5");
        let doc: StatusDocument = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (doc.role.as_str(), doc.state.as_str()),
            ("primary", "running"),
            "GET {path}"
        );
        for method in [Method::HEAD, Method::OPTIONS] {
            let (status, headers, body) = call(method.clone(), &url).await;
            assert_eq!(status.as_u16(), code, "{method} {path}");
            assert!(body.is_empty(), "{method} {path}");
            assert!(headers.get("content-type").is_none() && headers.get("x-frame-options").is_none());
        }
    }
    // The handlers render the latest published snapshot.
    let mut replica = primary_snapshot();
    replica.status.role = "replica".into();
    replica.status.replication_state = Some("streaming".into());
    replica.leader_until = None;
    server.snapshot.send(Arc::new(replica)).unwrap();
    assert_eq!(call(Method::OPTIONS, &format!("{b}/primary")).await.0, 503);
    assert_eq!(
        call(Method::OPTIONS, &format!("{b}/replica?lag=1MB")).await.0,
        200
    );
    assert_eq!(
        call(Method::GET, &format!("{b}/replica?tag_dc=east")).await.0,
        503
    );
    assert_eq!(call(Method::HEAD, &format!("{b}/async?lag=abc")).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn haproxy_style_http10_options() {
    let server = start(Ok(cluster_view()), vec![]).await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(b"OPTIONS /primary HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn read_endpoints() {
    let server = start(Ok(cluster_view()), vec![]).await;
    let b = &server.base;

    let (status, _, body) = call(Method::GET, &format!("{b}/patroni")).await;
    assert_eq!(status, 200);
    let doc: StatusDocument = serde_json::from_str(&body).unwrap();
    assert_eq!(doc.patroni.name, "pg1");
    assert_eq!(doc.xlog.unwrap().location, Some(100));
    assert_eq!(call(Method::HEAD, &format!("{b}/patroni")).await.0, 503);

    for path in ["/liveness", "/readiness"] {
        let (status, headers, body) = call(Method::GET, &format!("{b}{path}")).await;
        assert_eq!(status, 200, "{path}");
        assert!(body.is_empty() && headers.get("content-type").is_none(), "{path}");
    }

    let (status, headers, body) = call(Method::GET, &format!("{b}/cluster")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let cluster: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cluster["scope"], "batman");
    assert_eq!(cluster["members"][0]["name"], "pg1");
    assert_eq!(cluster["members"][0]["role"], "leader");
    assert_eq!(cluster["members"][1]["role"], "replica");
    assert_eq!(cluster["members"][1]["state"], "streaming");
    assert_eq!(cluster["members"][1]["lag"], 10);
    assert_eq!(cluster["members"][1]["host"], "10.0.0.2");

    let (status, _, body) = call(Method::GET, &format!("{b}/history")).await;
    assert_eq!(status, 200);
    let history: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(history[0][0], 1);
    assert_eq!(history[0][4], "pg1");

    let (status, _, body) = call(Method::GET, &format!("{b}/config")).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ttl"], 30);

    let (status, headers, body) = call(Method::GET, &format!("{b}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/plain");
    assert!(
        body.contains("patroni_primary{scope=\"batman\",name=\"pg1\"} 1\n"),
        "{body}"
    );
    assert!(body.contains("patroni_xlog_location{scope=\"batman\",name=\"pg1\"} 100\n"));

    assert_eq!(call(Method::GET, &format!("{b}/failsafe")).await.0, 502);
    assert_eq!(call(Method::PUT, &format!("{b}/nonsense")).await.0, 501);
    assert_eq!(call(Method::PUT, &format!("{b}/config")).await.0, 401);
    server.stop().await;
}

#[tokio::test]
async fn dcs_failures() {
    let server = start(Err("etcd is down".into()), vec![]).await;
    let b = &server.base;
    let (status, headers, body) = call(Method::GET, &format!("{b}/cluster")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["content-type"], "application/json");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(error["error"].as_str().unwrap().contains("etcd is down"));
    // /history and /config fall back to the cached view...
    assert_eq!(call(Method::GET, &format!("{b}/history")).await.0, 200);
    assert_eq!(call(Method::GET, &format!("{b}/config")).await.0, 200);
    // ...and answer 503 without one.
    let mut stale = primary_snapshot();
    stale.cluster = None;
    server.snapshot.send(Arc::new(stale)).unwrap();
    assert_eq!(call(Method::GET, &format!("{b}/history")).await.0, 503);
    // Health checks do not care.
    assert_eq!(call(Method::GET, &format!("{b}/primary")).await.0, 200);
    server.stop().await;

    // A config key that does not parse (no valid config) → 502.
    let mut no_config = cluster_view();
    no_config.config = None;
    let server = start(Ok(no_config), vec![]).await;
    assert_eq!(call(Method::GET, &format!("{}/config", server.base)).await.0, 502);
    assert_eq!(
        call(Method::GET, &format!("{}/history", server.base)).await.0,
        200
    );
    server.stop().await;
}

#[tokio::test]
async fn reload_is_protected() {
    let mut server = start(Ok(cluster_view()), vec!["127.0.0.1".into()]).await;
    let url = format!("{}/reload", server.base);
    let http = client();

    let response = http.post(&url).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Basic realm=\"Patroni\"");
    assert_eq!(response.text().await.unwrap(), "no auth header received");

    let response = http
        .post(&url)
        .basic_auth("admin", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.text().await.unwrap(), "not authenticated");
    assert!(server.commands.try_recv().is_err());

    let response = http
        .post(&url)
        .basic_auth("admin", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["content-type"], "text/html");
    assert_eq!(response.text().await.unwrap(), "reload scheduled");
    assert!(matches!(server.commands.try_recv().unwrap(), ApiCommand::Reload));

    // GET /reload is not protected: it is the generic health check.
    assert_eq!(http.get(&url).send().await.unwrap().status(), 503);
    server.stop().await;

    // Outside the allowlist: 403 even with the right credentials.
    let server = start(Ok(cluster_view()), vec!["10.0.0.0/8".into()]).await;
    let response = client()
        .post(format!("{}/reload", server.base))
        .header("Authorization", format!("Basic {}", base64(b"admin:secret")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.text().await.unwrap(), "Access is denied");
    server.stop().await;
}

#[tokio::test]
async fn peer_client() {
    let server = start(Ok(cluster_view()), vec![]).await;
    let peer = PeerClient::new(Some(("admin".into(), "secret".into())));
    let timeout = Duration::from_secs(2);

    let status = peer
        .fetch_status(&format!("{}/patroni", server.base), timeout)
        .await
        .expect("status document");
    assert!(status.is_primary());
    assert_eq!(status.wal_position(), 100);
    assert_eq!(
        peer.liveness(&format!("{}/patroni", server.base), timeout).await,
        Some(200)
    );

    // Any HTTP answer counts for the duplicate-name guard, even 503.
    let mut dead = primary_snapshot();
    dead.next_run = Instant::now() - Duration::from_secs(3600);
    server.snapshot.send(Arc::new(dead)).unwrap();
    assert_eq!(peer.liveness(&server.base, timeout).await, Some(503));
    // Non-JSON answers are "unreachable".
    assert!(
        peer.fetch_status(&format!("{}/metrics", server.base), timeout)
            .await
            .is_none()
    );
    let base = server.base.clone();
    server.stop().await;

    // Nobody listening.
    assert!(
        peer.fetch_status(&format!("{base}/patroni"), timeout)
            .await
            .is_none()
    );
    assert_eq!(peer.liveness(&base, timeout).await, None);
}
