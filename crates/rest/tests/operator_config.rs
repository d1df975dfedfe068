//! `PATCH /config` and `PUT /config` in-process (`docs/patroni-compat.md` §2.6): the merge, the
//! compare-and-set write and its conflicts, against an in-memory DCS.

mod operator_support;
mod support;

use operator_support::*;
use pgvigil_api::ClusterView;
use serde_json::{Value, json};

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
