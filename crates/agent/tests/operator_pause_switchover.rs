//! Maintenance mode details (`docs/patroni-compat.md` §4.8) on a real cluster with the real
//! `patronictl`: a scheduled switchover is refused, a switchover to a named candidate goes
//! through, a PostgreSQL stopped by hand is reported `stopped`, not `crashed`, and a primary
//! whose leader key expired while its agent was down takes the key again.

mod operator_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use operator_support::*;
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster};
use pgvigil_testkit::{http, wait_until};
use serde_json::json;

const CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// Stops node `i`'s PostgreSQL as `pg_ctl stop -m fast` would (SIGINT to the postmaster) and
/// waits for it to be gone.
fn stop_by_hand(cluster: &TestCluster, i: usize) {
    let pid = cluster.nodes[i].postmaster_pid().expect("a postmaster runs");
    kill(Pid::from_raw(pid), Signal::SIGINT).unwrap();
    let r = wait_until("the postmaster to stop", Duration::from_secs(60), || {
        kill(Pid::from_raw(pid), None).is_err().then_some(())
    });
    r.unwrap();
}

/// Waits until node `i` reports `stopped` in `GET /cluster` and its own `GET /patroni`;
/// returns every state `/cluster` showed for it meanwhile.
fn wait_reported_stopped(cluster: &TestCluster, i: usize) -> BTreeSet<String> {
    let name = cluster.nodes[i].name.clone();
    let mut seen = BTreeSet::new();
    let r = wait_until(
        &format!("{name} to be reported stopped"),
        Duration::from_secs(60),
        || {
            let state = member(cluster, &name)?["state"].as_str()?.to_string();
            seen.insert(state.clone());
            let own = http::get(cluster.nodes[i].api_port, "/patroni")
                .ok()?
                .json()
                .ok()?;
            (state == "stopped" && own["state"] == "stopped").then_some(())
        },
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    seen
}

fn post_switchover(cluster: &TestCluster, to: usize, body: &serde_json::Value) -> http::Response {
    let addr = SocketAddr::from(([127, 0, 0, 1], cluster.nodes[to].api_port));
    http::request_within(
        addr,
        "POST",
        "/switchover",
        Some(&body.to_string()),
        Some((API_USER, API_PASSWORD)),
        Duration::from_secs(90),
    )
    .unwrap()
}

#[test]
fn paused_cluster_refuses_scheduled_switchover_switches_over_to_a_candidate_and_reports_stopped() {
    let (cluster, leader) = start(ClusterOptions::default());
    wait_settled(&cluster);
    let scope = cluster.scope.clone();
    let replicas = others(&cluster, leader);
    let (a, b) = (replicas[0], replicas[1]);
    let (leader_name, a_name) = (cluster.nodes[leader].name.clone(), cluster.nodes[a].name.clone());
    patronictl(&cluster, a, &["pause", &scope, "--wait"], None, CTL_TIMEOUT).expect_ok("patronictl pause");

    // A scheduled switchover: patronictl refuses it, and so does the REST API it would call.
    let at = in_seconds(3600);
    let run = patronictl(
        &cluster,
        a,
        &[
            "switchover",
            &scope,
            "--leader",
            &leader_name,
            "--candidate",
            &a_name,
            "--scheduled",
            &at,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok()
            && run
                .output()
                .contains("Can't schedule switchover in the paused state"),
        "{run}"
    );
    let r = post_switchover(
        &cluster,
        a,
        &json!({"leader": leader_name, "candidate": a_name, "scheduled_at": at}),
    );
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, "Can't schedule switchover in the paused state")
    );
    // Nor without a candidate.
    let r = post_switchover(&cluster, a, &json!({"leader": leader_name}));
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            400,
            "Switchover is possible only to a specific candidate in a paused state"
        )
    );

    // To a named, healthy candidate: done, and the old primary comes back as its replica.
    let r = post_switchover(&cluster, b, &json!({"leader": leader_name, "candidate": a_name}));
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            200,
            format!("Successfully switched over to \"{a_name}\"").as_str()
        ),
        "{}",
        cluster.diagnostics()
    );
    wait_leader(&cluster, a, HEALTHY);
    let run = patronictl(&cluster, b, &["list", &scope], None, CTL_TIMEOUT).expect_ok("patronictl list");
    assert!(run.stdout.contains("Maintenance mode: on"), "{run}");

    // PostgreSQL stopped by hand, on a replica and on the leader: `stopped`, never `crashed`;
    // nothing restarts it and the leader lets the key go.
    stop_by_hand(&cluster, b);
    let seen = wait_reported_stopped(&cluster, b);
    assert!(!seen.contains("crashed"), "{seen:?}");
    stop_by_hand(&cluster, a);
    let seen = wait_reported_stopped(&cluster, a);
    assert!(!seen.contains("crashed"), "{seen:?}");
    let r = wait_until(
        "the stopped leader to release the key",
        Duration::from_secs(60),
        || operator_support::leader_name(&cluster).is_none().then_some(()),
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let run = patronictl(&cluster, leader, &["list", &scope], None, CTL_TIMEOUT).expect_ok("patronictl list");
    let stopped_rows = run
        .stdout
        .lines()
        .filter(|l| (l.contains(&a_name) || l.contains(&cluster.nodes[b].name)) && l.contains("stopped"))
        .count();
    assert_eq!(stopped_rows, 2, "{run}");
    assert!(!run.stdout.contains("crashed"), "{run}");
    assert!(cluster.nodes[a].postmaster_pid().is_none() && cluster.nodes[b].postmaster_pid().is_none());

    // Resumed, the cluster heals on its own.
    patronictl(&cluster, leader, &["resume", &scope, "--wait"], None, CTL_TIMEOUT)
        .expect_ok("patronictl resume");
    cluster.wait_healthy(HEALTHY).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn paused_running_primary_takes_the_expired_leader_key_again() {
    let (mut cluster, leader) = start(ClusterOptions::default());
    let scope = cluster.scope.clone();
    let replica = others(&cluster, leader)[0];
    let leader_name = cluster.nodes[leader].name.clone();
    patronictl(&cluster, replica, &["pause", &scope, "--wait"], None, CTL_TIMEOUT)
        .expect_ok("patronictl pause");
    let postmaster = cluster.nodes[leader]
        .postmaster_pid()
        .expect("the leader's postmaster runs");

    // The leader's agent dies; paused, its PostgreSQL is left running and nobody renews the key.
    cluster.signal_agent(leader, Signal::SIGKILL).unwrap();
    let r = wait_until(
        "the dead agent's leader key to expire",
        Duration::from_secs(cluster.options.ttl * 3),
        || operator_support::leader_name(&cluster).is_none().then_some(()),
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));

    // Back, the agent finds its primary running in an unlocked paused cluster: it takes the
    // key (Patroni's `is_healthiest_node` in pause) and leaves PostgreSQL as it is.
    cluster.start_agent(leader).unwrap();
    let r = wait_until(
        "the restarted agent to take the key for its running primary",
        Duration::from_secs(120),
        || (operator_support::leader_name(&cluster).as_deref() == Some(leader_name.as_str())).then_some(()),
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    assert_eq!(cluster.nodes[leader].postmaster_pid(), Some(postmaster));
    assert_eq!(cluster.psql(leader, "SELECT pg_is_in_recovery()").unwrap(), "f");
    for r in others(&cluster, leader) {
        assert_eq!(cluster.psql(r, "SELECT pg_is_in_recovery()").unwrap(), "t");
    }

    patronictl(
        &cluster,
        replica,
        &["resume", &scope, "--wait"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl resume");
    wait_leader(&cluster, leader, HEALTHY);
}
