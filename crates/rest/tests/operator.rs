//! The operator endpoints in-process (`docs/patroni-compat.md` §2.6): real HTTP requests against the
//! server, an in-memory DCS, and a stand-in for the runtime that answers the commands.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil_api::cluster::RawKv;
use pgvigil_api::rest::XlogInfo;
use pgvigil_api::{ClusterView, FailoverValue, Keys, Versioned};
use pgvigil_rest::{AccessControl, ApiCommand, ApiReply, NodeSnapshot, PeerClient, RestContext, serve};
use serde_json::{Value, json};
use support::FakeDcs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const USER: &str = "admin";
const PASSWORD: &str = "secret";

/// `pg1` leads, `pg2` and `pg3` replicate; member API URLs are filled in per test.
fn cluster_view(api_urls: [&str; 3], extra: &[(&str, &str)]) -> ClusterView {
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

fn snapshot(name: &str, view: &ClusterView) -> NodeSnapshot {
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

struct Server {
    base: String,
    dcs: Arc<FakeDcs>,
    snapshot: watch::Sender<Arc<NodeSnapshot>>,
    commands: mpsc::Receiver<ApiCommand>,
    shutdown: CancellationToken,
}

async fn start_with(dcs: FakeDcs, name: &str) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(listener, dcs, name).await
}

/// A three-member cluster whose members' API URLs point to nothing (unreachable).
async fn start(name: &str) -> Server {
    let dead = format!("http://127.0.0.1:{}/patroni", closed_port());
    start_with(FakeDcs::new(cluster_view([&dead, &dead, &dead], &[])), name).await
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Status and body of an authenticated request with an optional JSON body.
async fn send(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    send_raw(server, method, path, body.map(|b| b.to_string()).as_deref(), true).await
}

/// A raw HTTP/1.0 request, so the test controls exactly which headers go out.
async fn send_raw(
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

type Asked = tokio::task::JoinHandle<(String, mpsc::Receiver<ApiCommand>)>;

/// Answers the next command the way a runtime would; [`asked`] tells what was asked.
fn answer_next(server: &mut Server, reply: ApiReply) -> Asked {
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
async fn asked(server: &mut Server, handle: Asked) -> String {
    let (text, commands) = handle.await.unwrap();
    server.commands = commands;
    text
}

fn drain(server: &mut Server) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(c) = server.commands.try_recv() {
        seen.push(format!("{c:?}"));
    }
    seen
}

#[tokio::test]
async fn every_operation_requires_authentication() {
    let mut server = start("pg1").await;
    for (method, path) in [
        ("POST", "/reload"),
        ("PATCH", "/config"),
        ("PUT", "/config"),
        ("POST", "/switchover"),
        ("POST", "/failover"),
        ("DELETE", "/switchover"),
        ("POST", "/restart"),
        ("DELETE", "/restart"),
        ("POST", "/reinitialize"),
    ] {
        let (status, body) = send_raw(&server, method, path, Some(r#"{"leader":"pg1"}"#), false).await;
        assert_eq!(
            (status, body.as_str()),
            (401, "no auth header received"),
            "{method} {path}"
        );
    }
    assert!(drain(&mut server).is_empty());
    assert!(server.dcs.writes().is_empty());
    // Unknown operations are not implemented, whoever asks.
    assert_eq!(send_raw(&server, "POST", "/nonsense", None, false).await.0, 501);
    assert_eq!(send_raw(&server, "DELETE", "/config", None, true).await.0, 501);
}

#[tokio::test]
async fn bodies_are_checked() {
    let mut server = start("pg1").await;
    for (method, path) in [
        ("PATCH", "/config"),
        ("PUT", "/config"),
        ("POST", "/switchover"),
        ("POST", "/failover"),
    ] {
        // Body required: no Content-Length → 411; not JSON, not an object, empty → 400.
        assert_eq!(
            send_raw(&server, method, path, None, true).await.0,
            411,
            "{method} {path}"
        );
        for bad in ["{", "[1,2]", "\"text\"", "{}", "", "null"] {
            let (status, body) = send_raw(&server, method, path, Some(bad), true).await;
            assert_eq!(status, 400, "{method} {path} {bad:?}");
            assert!(body.contains("Bad Request"), "{body}");
        }
    }
    // Optional bodies: absent or empty is fine, malformed is not.
    for path in ["/restart", "/reinitialize"] {
        for bad in ["{", "[]", "7"] {
            assert_eq!(
                send_raw(&server, "POST", path, Some(bad), true).await.0,
                400,
                "{path} {bad:?}"
            );
        }
    }
    assert!(drain(&mut server).is_empty());
    assert!(server.dcs.writes().is_empty());
}

#[tokio::test]
async fn patch_config_merges_with_compare_and_set() {
    let mut server = start("pg1").await;
    let (status, body) = send(
        &server,
        "PATCH",
        "/config",
        Some(json!({"pause": true, "ttl": null, "postgresql": {"parameters": {"work_mem": "8MB"}}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let config: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        config,
        json!({"loop_wait": 10, "postgresql": {"parameters": {"max_connections": 100, "work_mem": "8MB"}}, "pause": true})
    );
    assert_eq!(server.dcs.view().config.unwrap().value, config);
    assert_eq!(server.dcs.writes().len(), 1);
    assert!(drain(&mut server).iter().any(|c| c == "Wake"));

    // Nothing changes: no write, still 200 with the config.
    let (status, body) = send(&server, "PATCH", "/config", Some(json!({"loop_wait": "10"}))).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), config);
    assert_eq!(server.dcs.writes().len(), 1);

    // Someone else writes between our read and our write: 409.
    server.dcs.state.lock().unwrap().after_read = Some(Box::new(|view: &mut ClusterView| {
        if let Some(c) = view.config.as_mut() {
            c.mod_revision += 100;
        }
    }));
    assert_eq!(
        send(&server, "PATCH", "/config", Some(json!({"ttl": 40})))
            .await
            .0,
        409
    );
    server.dcs.state.lock().unwrap().after_read = None;

    // No valid configuration: 503; DCS down: 503.
    server.dcs.state.lock().unwrap().view.config = None;
    assert_eq!(
        send(&server, "PATCH", "/config", Some(json!({"ttl": 40})))
            .await
            .0,
        503
    );
    server.dcs.state.lock().unwrap().read_error = Some("etcd is down".into());
    let (status, body) = send(&server, "PATCH", "/config", Some(json!({"ttl": 40}))).await;
    assert_eq!(status, 503);
    assert!(body.contains("etcd is down"), "{body}");
}

#[tokio::test]
async fn put_config_replaces_unless_identical() {
    let mut server = start("pg1").await;
    let same = json!({"ttl": "30", "loop_wait": 10, "postgresql": {"parameters": {"max_connections": 100}}});
    let (status, body) = send(&server, "PUT", "/config", Some(same.clone())).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (200, same)
    );
    assert!(server.dcs.writes().is_empty());

    let new = json!({"ttl": 60, "loop_wait": 5});
    let (status, body) = send(&server, "PUT", "/config", Some(new.clone())).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (200, new.clone())
    );
    assert_eq!(server.dcs.view().config.unwrap().value, new);
    assert!(drain(&mut server).iter().any(|c| c == "Wake"));

    server.dcs.state.lock().unwrap().write_error = Some("no quorum".into());
    assert_eq!(
        send(&server, "PUT", "/config", Some(json!({"ttl": 90}))).await.0,
        502
    );
}

#[tokio::test]
async fn switchover_validation_and_feasibility() {
    let server = start("pg1").await;
    let cases = [
        (
            "/failover",
            json!({"leader": "pg1"}),
            400,
            "Failover could be performed only to a specific candidate",
        ),
        (
            "/switchover",
            json!({"candidate": "pg2"}),
            400,
            "Switchover could be performed only from a specific leader",
        ),
        (
            "/failover",
            json!({"candidate": "pg2", "scheduled_at": "2099-01-01T00:00:00+00:00"}),
            400,
            "Failover can't be scheduled",
        ),
        (
            "/switchover",
            json!({"leader": "pg1", "scheduled_at": "yesterday-ish"}),
            422,
            "Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601",
        ),
        (
            "/switchover",
            json!({"leader": "pg1", "scheduled_at": "2099-01-01T00:00:00"}),
            400,
            "Timezone information is mandatory for the scheduled switchover",
        ),
        (
            "/switchover",
            json!({"leader": "pg1", "scheduled_at": "2001-01-01T00:00:00Z"}),
            422,
            "Cannot schedule switchover in the past",
        ),
        (
            "/switchover",
            json!({"leader": "pg2", "candidate": "pg2"}),
            400,
            "Switchover target and source are the same",
        ),
        (
            "/switchover",
            json!({"leader": "pg2", "candidate": "pg3"}),
            412,
            "leader name does not match",
        ),
        (
            "/switchover",
            json!({"leader": "pg1", "candidate": "pg9"}),
            412,
            "candidate does not exists",
        ),
        (
            "/switchover",
            json!({"leader": "pg1", "candidate": "pg2"}),
            412,
            "switchover is not possible: no good candidates have been found",
        ),
        (
            "/failover",
            json!({"candidate": "pg3"}),
            412,
            "failover is not possible: no good candidates have been found",
        ),
        // A failover naming the leader is handled as a switchover.
        (
            "/failover",
            json!({"leader": "pg1", "member": "pg3"}),
            412,
            "switchover is not possible: no good candidates have been found",
        ),
    ];
    for (path, body, code, message) in cases {
        let (status, text) = send(&server, "POST", path, Some(body.clone())).await;
        assert_eq!((status, text.as_str()), (code, message), "{path} {body}");
    }
    let (status, text) = send(&server, "POST", "/switchover", Some(json!({"leader": 1}))).await;
    assert_eq!(status, 400);
    assert!(text.contains("leader"), "{text}");
    assert!(server.dcs.writes().is_empty());
}

#[tokio::test]
async fn paused_cluster_rules() {
    let dead = format!("http://127.0.0.1:{}/patroni", closed_port());
    let mut view = cluster_view([&dead, &dead, &dead], &[]);
    view.config.as_mut().unwrap().value["pause"] = json!(true);
    let server = start_with(FakeDcs::new(view), "pg1").await;
    for (body, message) in [
        (
            json!({"leader": "pg1"}),
            "Switchover is possible only to a specific candidate in a paused state",
        ),
        (
            json!({"leader": "pg1", "candidate": "pg2", "scheduled_at": "2099-01-01T00:00Z"}),
            "Can't schedule switchover in the paused state",
        ),
    ] {
        let (status, text) = send(&server, "POST", "/switchover", Some(body)).await;
        assert_eq!((status, text.as_str()), (400, message));
    }
    let (status, text) = send(
        &server,
        "POST",
        "/restart",
        Some(json!({"schedule": "2099-01-01T00:00Z"})),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (500, "Can't schedule restart in the paused state")
    );
}

/// A server whose members' `api_url` is its own `/patroni` (a running primary's document,
/// which counts as a good candidate).
async fn start_reachable(hook: Option<support::ReadHook>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = format!("http://{}/patroni", listener.local_addr().unwrap());
    let dcs = FakeDcs::new(cluster_view([&me, &me, &me], &[]));
    dcs.state.lock().unwrap().after_read = hook;
    start_on(listener, dcs, "pg1").await
}

async fn start_on(listener: tokio::net::TcpListener, dcs: FakeDcs, name: &str) -> Server {
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
fn promote_candidate() -> support::ReadHook {
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

#[tokio::test]
async fn immediate_switchover_waits_for_the_new_leader() {
    let mut server = start_reachable(Some(promote_candidate())).await;
    let started = Instant::now();
    let (status, text) = send(
        &server,
        "POST",
        "/switchover",
        Some(json!({"leader": "pg1", "candidate": "pg2"})),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Successfully switched over to \"pg2\"")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        server.dcs.writes(),
        vec![("failover".to_string(), json!({"leader": "pg1", "member": "pg2"}))]
    );
    assert!(drain(&mut server).iter().any(|c| c == "Wake"));

    // Another member won instead.
    let mut server = start_reachable(Some(Box::new(|view: &mut ClusterView| {
        if view.pending_failover().is_some() {
            view.leader.as_mut().unwrap().name = "pg3".into();
        }
    })))
    .await;
    let (status, text) = send(&server, "POST", "/failover", Some(json!({"candidate": "pg2"}))).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "Failed over to \"pg3\" instead of \"pg2\"")
    );
    assert_eq!(server.dcs.writes()[0].1, json!({"member": "pg2"}));
    drain(&mut server);

    // The leader cleared the key without handing over.
    let server = start_reachable(Some(Box::new(|view: &mut ClusterView| {
        if view.pending_failover().is_some() {
            view.failover = None;
        }
    })))
    .await;
    let (status, text) = send(&server, "POST", "/switchover", Some(json!({"leader": "pg1"}))).await;
    assert_eq!((status, text.as_str()), (503, "Switchover failed"));
}

#[tokio::test]
async fn scheduled_switchover_and_its_cancellation() {
    let server = start_reachable(None).await;
    let (status, text) = send(&server, "DELETE", "/switchover", None).await;
    assert_eq!((status, text.as_str()), (404, "no switchover is scheduled"));

    let (status, text) = send(
        &server,
        "POST",
        "/switchover",
        Some(json!({"leader": "pg1", "candidate": "pg3", "scheduled_at": "2099-05-01T10:00:00+02:00"})),
    )
    .await;
    assert_eq!((status, text.as_str()), (202, "Switchover scheduled"));
    assert_eq!(
        server.dcs.view().failover.unwrap().value,
        FailoverValue {
            leader: Some("pg1".into()),
            member: Some("pg3".into()),
            scheduled_at: Some("2099-05-01T10:00:00+02:00".into()),
        }
    );
    let (status, text) = send(&server, "DELETE", "/switchover", None).await;
    assert_eq!((status, text.as_str()), (200, "scheduled switchover deleted"));
    assert!(server.dcs.view().failover.unwrap().value.is_empty());

    // A concurrent change of the key makes the delete fail with 409.
    {
        let mut state = server.dcs.state.lock().unwrap();
        state.view.failover = Some(Versioned {
            value: FailoverValue {
                scheduled_at: Some("2099-05-01T10:00:00+02:00".into()),
                leader: Some("pg1".into()),
                member: None,
            },
            mod_revision: 50,
        });
        state.after_read = Some(Box::new(|view: &mut ClusterView| {
            if let Some(f) = view.failover.as_mut() {
                f.mod_revision += 1;
            }
        }));
    }
    assert_eq!(send(&server, "DELETE", "/switchover", None).await.0, 409);

    // A failing DCS write.
    let server = start_reachable(None).await;
    server.dcs.state.lock().unwrap().write_error = Some("no quorum".into());
    let (status, text) = send(
        &server,
        "POST",
        "/switchover",
        Some(json!({"leader": "pg1", "candidate": "pg2"})),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (503, "failed to write failover key into DCS")
    );
}

#[tokio::test]
async fn restart_validation_then_the_runtime_answers() {
    let mut server = start("pg2").await;
    let cases = [
        (
            json!({"role": "master"}),
            400,
            "PostgreSQL role should be either primary, standby_leader, or replica",
        ),
        (
            json!({"postgres_version": "9.6"}),
            400,
            "Invalid PostgreSQL version format: X.Y or X.Y.Z is accepted: 9.6",
        ),
        (
            json!({"postgres_version": "x.y"}),
            400,
            "Invalid PostgreSQL version: x.y",
        ),
        (
            json!({"timeout": "-3"}),
            400,
            "Timeout should be a positive number of seconds",
        ),
        (
            json!({"timeout": "soon"}),
            400,
            "Timeout should be a positive number of seconds",
        ),
        (
            json!({"force": true}),
            400,
            "Unknown filter for the scheduled restart: force",
        ),
        (
            json!({"schedule": "2099-01-01 10:00"}),
            400,
            "Timezone information is mandatory for the scheduled restart",
        ),
        (
            json!({"schedule": "2001-01-01T10:00+00:00"}),
            422,
            "Cannot schedule restart in the past",
        ),
        (
            json!({"schedule": 12}),
            422,
            "Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601",
        ),
    ];
    for (body, code, message) in cases {
        let (status, text) = send(&server, "POST", "/restart", Some(body.clone())).await;
        assert_eq!((status, text.as_str()), (code, message), "{body}");
    }
    let (status, text) = send(&server, "POST", "/restart", Some(json!({"postgres_version": 16}))).await;
    assert_eq!(status, 400);
    assert!(text.contains("postgres_version"), "{text}");
    assert!(drain(&mut server).is_empty());

    // Valid: handed to the runtime, whose answer is returned as is.
    let handle = answer_next(&mut server, ApiReply::new(200, "restarted successfully"));
    let (status, text) = send(
        &server,
        "POST",
        "/restart",
        Some(json!({"role": "replica", "timeout": "30s", "restart_pending": "yes", "postgres_version": "99.1"})),
    )
    .await;
    assert_eq!((status, text.as_str()), (200, "restarted successfully"));
    let request = asked(&mut server, handle).await;
    assert!(
        request.contains("role: Some(\"replica\")") && request.contains("timeout: Some(30)"),
        "{request}"
    );
    assert!(
        request.contains("restart_pending: true") && request.contains("postgres_version: Some(\"99.1\")"),
        "{request}"
    );

    let handle = answer_next(&mut server, ApiReply::new(202, "Restart scheduled"));
    let (status, text) = send(
        &server,
        "POST",
        "/restart",
        Some(json!({"schedule": "2099-01-01T10:00:00+00:00"})),
    )
    .await;
    assert_eq!((status, text.as_str()), (202, "Restart scheduled"));
    assert!(
        asked(&mut server, handle)
            .await
            .contains("schedule: Some(2099-01-01T10:00:00+00:00)")
    );

    // No body at all is an unconditional restart.
    let handle = answer_next(
        &mut server,
        ApiReply::new(503, "restart conditions are not satisfied"),
    );
    let (status, text) = send_raw(&server, "POST", "/restart", None, true).await;
    assert_eq!(
        (status, text.as_str()),
        (503, "restart conditions are not satisfied")
    );
    assert!(
        asked(&mut server, handle)
            .await
            .contains("RestartRequest { schedule: None, role: None")
    );

    let handle = answer_next(&mut server, ApiReply::new(404, "no restarts are scheduled"));
    let (status, text) = send(&server, "DELETE", "/restart", None).await;
    assert_eq!((status, text.as_str()), (404, "no restarts are scheduled"));
    assert!(
        asked(&mut server, handle)
            .await
            .starts_with("CancelScheduledRestart")
    );
}

#[tokio::test]
async fn a_runtime_that_drops_the_request_gives_503() {
    let mut server = start("pg2").await;
    let mut commands = std::mem::replace(&mut server.commands, mpsc::channel(1).1);
    let dropper = tokio::spawn(async move {
        while let Some(command) = commands.recv().await {
            drop(command);
        }
    });
    let (status, text) = send(&server, "POST", "/restart", Some(json!({}))).await;
    assert_eq!(status, 503);
    assert!(text.contains("restart failed"), "{text}");
    let (status, _) = send(&server, "POST", "/reinitialize", Some(json!({}))).await;
    assert_eq!(status, 503);
    dropper.abort();
}

#[tokio::test]
async fn reinitialize_checks_the_leader_then_asks_the_runtime() {
    let mut leader = start("pg1").await;
    let (status, text) = send(&leader, "POST", "/reinitialize", Some(json!({"force": true}))).await;
    assert_eq!(
        (status, text.as_str()),
        (503, "I am the leader, can not reinitialize")
    );
    assert!(drain(&mut leader).is_empty());

    let mut replica = start("pg2").await;
    let (status, text) = send(
        &replica,
        "POST",
        "/reinitialize",
        Some(json!({"force": {"x": 1}})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(text.contains("force"), "{text}");

    let handle = answer_next(&mut replica, ApiReply::new(200, "reinitialize started"));
    let (status, text) = send(
        &replica,
        "POST",
        "/reinitialize",
        Some(json!({"force": "true", "from_leader": true})),
    )
    .await;
    assert_eq!((status, text.as_str()), (200, "reinitialize started"));
    assert!(
        asked(&mut replica, handle)
            .await
            .contains("force: true, from_leader: true")
    );

    let handle = answer_next(
        &mut replica,
        ApiReply::new(503, "reinitialize already in progress"),
    );
    let (status, text) = send_raw(&replica, "POST", "/reinitialize", None, true).await;
    assert_eq!((status, text.as_str()), (503, "reinitialize already in progress"));
    assert!(
        asked(&mut replica, handle)
            .await
            .contains("force: false, from_leader: false")
    );

    replica.dcs.state.lock().unwrap().view.leader = None;
    let (status, text) = send(&replica, "POST", "/reinitialize", Some(json!({}))).await;
    assert_eq!(
        (status, text.as_str()),
        (503, "Cluster has no leader, can not reinitialize")
    );
    let _ = &replica.snapshot;
}
