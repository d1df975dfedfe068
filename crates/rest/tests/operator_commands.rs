//! `POST /restart`, `DELETE /restart` and `POST /reinitialize` in-process
//! (`docs/patroni-compat.md` §2.6): the API validates the request, hands it to the runtime (a
//! stand-in here) and returns its answer.

mod operator_support;
mod support;

use operator_support::*;
use pgvigil_rest::ApiReply;
use serde_json::json;
use tokio::sync::mpsc;

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
