//! `POST /switchover`, `POST /failover` and `DELETE /switchover` in-process
//! (`docs/patroni-compat.md` §2.6): validation, feasibility, the paused-cluster rules, polling
//! for the outcome, scheduling and cancelling, against an in-memory DCS whose reads can play the
//! cluster's part.

mod operator_support;
mod support;

use std::time::{Duration, Instant};

use operator_support::*;
use pgvigil_api::{ClusterView, FailoverValue, Versioned};
use serde_json::json;
use support::FakeDcs;

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
