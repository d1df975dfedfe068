//! Shared by the `operator_*` tests: the REST server in-process with an in-memory DCS
//! ([`FakeDcs`]), a three-member cluster view, raw HTTP requests, and a stand-in for the runtime
//! that answers the commands the server hands over.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil_api::cluster::RawKv;
use pgvigil_api::rest::XlogInfo;
use pgvigil_api::{ClusterView, Keys};
use pgvigil_rest::{AccessControl, ApiCommand, ApiReply, NodeSnapshot, PeerClient, RestContext, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::support::{self, FakeDcs};

pub const USER: &str = "admin";
pub const PASSWORD: &str = "secret";

/// `pg1` leads, `pg2` and `pg3` replicate; member API URLs are filled in per test.
pub fn cluster_view(api_urls: [&str; 3], extra: &[(&str, &str)]) -> ClusterView {
    let keys = Keys::new("/service", "batman");
    let kv = |key: &str, value: &str| RawKv {
        key: format!("/service/batman/{key}"),
        value: value.into(),
        mod_revision: 5,
        lease: 0,
    };
    let member = |name: &str, role: &str, api: &str| {
        kv(
            &format!("members/{name}"),
            &json!({"conn_url": format!("postgres://127.0.0.1:5432/{name}"), "api_url": api,
                    "state": "running", "role": role, "version": "4.1.5"})
            .to_string(),
        )
    };
    let mut kvs = vec![
        kv("leader", "pg1"),
        member("pg1", "primary", api_urls[0]),
        member("pg2", "replica", api_urls[1]),
        member("pg3", "replica", api_urls[2]),
        kv(
            "config",
            r#"{"ttl":30,"loop_wait":10,"postgresql":{"parameters":{"max_connections":100}}}"#,
        ),
    ];
    for (k, v) in extra {
        kvs.push(kv(k, v));
    }
    ClusterView::from_kvs(&keys, 9, kvs)
}

pub fn snapshot(name: &str, view: &ClusterView) -> NodeSnapshot {
    let mut s = NodeSnapshot::initial("batman", name);
    s.status.state = "running".into();
    s.status.role = if name == "pg1" { "primary" } else { "replica" }.into();
    s.status.xlog = Some(XlogInfo {
        location: Some(100),
        ..Default::default()
    });
    s.status.cluster_unlocked = None;
    s.cluster = Some(view.clone());
    s.paused = view.is_paused();
    if name == "pg1" {
        s.leader_until = Some(Instant::now() + Duration::from_secs(3600));
    }
    s.next_run = Instant::now() + Duration::from_secs(10);
    s.loop_wait = 2;
    s
}

pub struct Server {
    pub base: String,
    pub dcs: Arc<FakeDcs>,
    pub snapshot: watch::Sender<Arc<NodeSnapshot>>,
    pub commands: mpsc::Receiver<ApiCommand>,
    pub shutdown: CancellationToken,
}

pub async fn start_with(dcs: FakeDcs, name: &str) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(listener, dcs, name).await
}

/// A three-member cluster whose members' API URLs point to nothing (unreachable).
pub async fn start(name: &str) -> Server {
    let dead = format!("http://127.0.0.1:{}/patroni", closed_port());
    start_with(FakeDcs::new(cluster_view([&dead, &dead, &dead], &[])), name).await
}

pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Status and body of an authenticated request with an optional JSON body.
pub async fn send(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    send_raw(server, method, path, body.map(|b| b.to_string()).as_deref(), true).await
}

/// A raw HTTP/1.0 request, so the test controls exactly which headers go out.
pub async fn send_raw(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: bool,
) -> (u16, String) {
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if auth {
        head.push_str(&format!(
            "Authorization: Basic {}\r\n",
            pgvigil_rest::access::base64(format!("{USER}:{PASSWORD}").as_bytes())
        ));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    if let Some(b) = body {
        stream.write_all(b.as_bytes()).await.unwrap();
    }
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_string(&mut answer))
        .await
        .expect("the server answers within a minute")
        .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

pub type Asked = tokio::task::JoinHandle<(String, mpsc::Receiver<ApiCommand>)>;

/// Answers the next command the way a runtime would; [`asked`] tells what was asked.
pub fn answer_next(server: &mut Server, reply: ApiReply) -> Asked {
    let mut commands = std::mem::replace(&mut server.commands, mpsc::channel(1).1);
    tokio::spawn(async move {
        let command = commands.recv().await.expect("a command");
        let text = format!("{command:?}");
        match command {
            ApiCommand::Restart { reply: tx, .. }
            | ApiCommand::CancelScheduledRestart { reply: tx }
            | ApiCommand::Reinitialize { reply: tx, .. } => {
                let _ = tx.send(reply);
            }
            ApiCommand::Reload | ApiCommand::Wake => {}
        }
        (text, commands)
    })
}

/// The command [`answer_next`] answered (as Debug text); gives the queue back to the server.
pub async fn asked(server: &mut Server, handle: Asked) -> String {
    let (text, commands) = handle.await.unwrap();
    server.commands = commands;
    text
}

pub fn drain(server: &mut Server) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(c) = server.commands.try_recv() {
        seen.push(format!("{c:?}"));
    }
    seen
}

/// A server whose members' `api_url` is its own `/patroni` (a running primary's document,
/// which counts as a good candidate).
pub async fn start_reachable(hook: Option<support::ReadHook>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = format!("http://{}/patroni", listener.local_addr().unwrap());
    let dcs = FakeDcs::new(cluster_view([&me, &me, &me], &[]));
    dcs.state.lock().unwrap().after_read = hook;
    start_on(listener, dcs, "pg1").await
}

pub async fn start_on(listener: tokio::net::TcpListener, dcs: FakeDcs, name: &str) -> Server {
    let base = format!("http://{}", listener.local_addr().unwrap());
    let dcs = Arc::new(dcs);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(snapshot(name, &dcs.view())));
    let (commands_tx, commands) = mpsc::channel(16);
    let ctx = RestContext {
        snapshot: snapshot_rx,
        dcs: dcs.clone(),
        peers: PeerClient::new(Some((USER.into(), PASSWORD.into()))),
        commands: commands_tx,
        access: AccessControl {
            authentication: Some((USER.into(), PASSWORD.into())),
            ..Default::default()
        },
        extra_headers: vec![],
        failsafe: Default::default(),
        status_probe: None,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, ctx, shutdown.clone()));
    Server {
        base,
        dcs,
        snapshot: snapshot_tx,
        commands,
        shutdown,
    }
}

/// Simulates the cluster acting on the failover key: `leader` becomes the named member.
pub fn promote_candidate() -> support::ReadHook {
    Box::new(|view: &mut ClusterView| {
        let Some(member) = view.pending_failover().and_then(|f| f.member.clone()) else {
            return;
        };
        if let Some(l) = view.leader.as_mut() {
            l.name = member;
        }
        view.failover = None;
    })
}
