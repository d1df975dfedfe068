//! Restart (now and scheduled), flush, reinitialize, and the rolling restart, through
//! `pgvigilctl` and the real `patronictl`.

mod operator_support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use operator_support::*;
use pgvigil_testkit::cluster::{ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD, TestCluster};
use pgvigil_testkit::wait_until;

const CTL_TIMEOUT: Duration = Duration::from_secs(300);

fn member_field(cluster: &TestCluster, i: usize, field: &str) -> serde_json::Value {
    member(cluster, &cluster.nodes[i].name)
        .map(|m| m[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn restart_flush_and_reinit() {
    let (cluster, leader) = start(ClusterOptions::default());
    let scope = cluster.scope.clone();
    let replicas = others(&cluster, leader);
    let (a, b) = (replicas[0], replicas[1]);
    cluster
        .psql(leader, "CREATE TABLE kept(x int); INSERT INTO kept VALUES (1)")
        .unwrap();

    // Immediate restart of every member, confirmed on stdin (scheduled "now", no version filter).
    let before: Vec<String> = (0..3).map(|i| start_time(&cluster, i)).collect();
    let run =
        pgvigilctl(&cluster, a, &["restart", &scope], Some("now\ny\n\n"), CTL_TIMEOUT).expect_ok("restart");
    assert_eq!(
        run.stdout.matches("Success: restart on member").count(),
        3,
        "{run}"
    );
    cluster.wait_healthy(HEALTHY).unwrap();
    for (i, before) in before.iter().enumerate() {
        assert_ne!(
            &start_time(&cluster, i),
            before,
            "{} was not restarted\n{run}",
            cluster.nodes[i].name
        );
    }
    assert_eq!(
        cluster.leader(),
        Some(leader),
        "a restart must not move the leader"
    );

    // Role filter: only replicas.
    let before: Vec<String> = (0..3).map(|i| start_time(&cluster, i)).collect();
    let run = pgvigilctl(
        &cluster,
        a,
        &["restart", &scope, "--role", "replica", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("restart replicas");
    assert_eq!(
        run.stdout.matches("Success: restart on member").count(),
        2,
        "{run}"
    );
    assert_eq!(start_time(&cluster, leader), before[leader]);
    cluster.wait_healthy(HEALTHY).unwrap();

    // The real patronictl restarts one member.
    let before_b = start_time(&cluster, b);
    let run = patronictl(
        &cluster,
        a,
        &["restart", &scope, &cluster.nodes[b].name, "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl restart");
    assert!(
        run.stdout
            .contains(&format!("Success: restart on member {}", cluster.nodes[b].name)),
        "{run}"
    );
    cluster.wait_healthy(HEALTHY).unwrap();
    assert_ne!(start_time(&cluster, b), before_b);

    // A version filter that does not match: the agent refuses (503), pgvigilctl says so.
    let run = pgvigilctl(
        &cluster,
        a,
        &[
            "restart",
            &scope,
            &cluster.nodes[b].name,
            "--pg-version",
            "10.0",
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok() && run.stdout.contains("restart conditions are not satisfied"),
        "{run}"
    );

    // Scheduled restart, shown by list, then flushed.
    let at = in_seconds(3600);
    let run = pgvigilctl(
        &cluster,
        a,
        &[
            "restart",
            &scope,
            &cluster.nodes[b].name,
            "--scheduled",
            &at,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("scheduled restart");
    assert!(
        run.stdout.contains(&format!(
            "Success: restart scheduled on member {}",
            cluster.nodes[b].name
        )),
        "{run}"
    );
    let r = wait_until(
        "the scheduled restart in the member key",
        Duration::from_secs(30),
        || {
            member_field(&cluster, b, "scheduled_restart")
                .get("schedule")
                .map(|_| ())
        },
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let run = patronictl(&cluster, a, &["list", &scope], None, CTL_TIMEOUT).expect_ok("patronictl list");
    assert!(run.stdout.contains("Scheduled restart"), "{run}");
    let run = pgvigilctl(
        &cluster,
        a,
        &["restart", &scope, &cluster.nodes[b].name, "--scheduled", &at],
        Some("y\n\n"),
        CTL_TIMEOUT,
    );
    assert!(
        run.stdout
            .contains("Failed: another restart is already scheduled"),
        "{run}"
    );
    let run = pgvigilctl(
        &cluster,
        a,
        &["flush", &scope, &cluster.nodes[b].name, "restart", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("flush restart");
    assert!(
        run.stdout.contains(&format!(
            "Success: flush scheduled restart for member {}",
            cluster.nodes[b].name
        )),
        "{run}"
    );
    let r = wait_until("the scheduled restart gone", Duration::from_secs(30), || {
        member_field(&cluster, b, "scheduled_restart")
            .is_null()
            .then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    // patronictl schedules one, pgvigilctl --force replaces it (DELETE first), patronictl flushes.
    let run = patronictl(
        &cluster,
        a,
        &[
            "restart",
            &scope,
            &cluster.nodes[a].name,
            "--scheduled",
            &at,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl scheduled restart");
    assert!(run.stdout.contains("Success: restart scheduled"), "{run}");
    let run = patronictl(
        &cluster,
        a,
        &["flush", &scope, &cluster.nodes[a].name, "restart", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl flush");
    assert!(run.stdout.contains("Success: flush scheduled restart"), "{run}");

    // Reinitialize a replica and wait for it.
    let run = pgvigilctl(
        &cluster,
        a,
        &["reinit", &scope, &cluster.nodes[a].name, "--wait", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("reinit");
    assert!(
        run.stdout.contains(&format!(
            "Success: reinitialize for member {}",
            cluster.nodes[a].name
        )),
        "{run}"
    );
    assert!(
        run.stdout.contains(&format!(
            "Reinitialize is completed on: {}",
            cluster.nodes[a].name
        )),
        "{run}"
    );
    cluster.wait_healthy(HEALTHY).unwrap();
    assert_eq!(cluster.psql(a, "SELECT count(*) FROM kept").unwrap(), "1");
    // The leader cannot be reinitialized.
    let run = pgvigilctl(
        &cluster,
        a,
        &["reinit", &scope, &cluster.nodes[leader].name, "--force"],
        None,
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok() && run.stderr.contains("No replica among provided members"),
        "{run}"
    );

    // patronictl reinit --wait, from the leader.
    let run = patronictl(
        &cluster,
        a,
        &[
            "reinit",
            &scope,
            &cluster.nodes[b].name,
            "--from-leader",
            "--wait",
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl reinit");
    assert!(
        run.stdout.contains(&format!(
            "Success: reinitialize for member {}",
            cluster.nodes[b].name
        )),
        "{run}"
    );
    cluster.wait_healthy(HEALTHY).unwrap();
    let r = wait_until(
        "the reinitialized replica to have the data",
        Duration::from_secs(60),
        || (cluster.psql(b, "SELECT count(*) FROM kept").ok()? == "1").then_some(()),
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
}

#[test]
fn rolling_restart_under_read_load() {
    let (cluster, leader) = start(ClusterOptions::default());
    cluster
        .psql(
            leader,
            "CREATE TABLE r(x int); INSERT INTO r SELECT generate_series(1, 1000)",
        )
        .unwrap();
    let replicas = others(&cluster, leader);
    for &i in &replicas {
        let r = wait_until("rows on the replica", Duration::from_secs(60), || {
            (cluster.psql(i, "SELECT count(*) FROM r").ok()? == "1000").then_some(())
        });
        r.unwrap();
    }
    let before: Vec<String> = (0..3).map(|i| start_time(&cluster, i)).collect();

    // Readers: one query after another on each replica, counting successes and failures.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = replicas
        .iter()
        .map(|&i| {
            let port = cluster.nodes[i].pg_port;
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let out = Command::new("psql")
                        .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM r"])
                        .arg(format!(
                            "host=127.0.0.1 port={port} user={SUPERUSER} dbname=postgres connect_timeout=2"
                        ))
                        .env("PGPASSWORD", SUPERUSER_PASSWORD)
                        .stdin(Stdio::null())
                        .output();
                    match out {
                        Ok(o)
                            if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "1000" =>
                        {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();

    let run = pgvigilctl(
        &cluster,
        replicas[0],
        &["rolling-restart", "--force", "--timeout", "180"],
        None,
        Duration::from_secs(900),
    )
    .expect_ok("rolling-restart");
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!(
        "rolling restart took {:?}; reads: {} ok, {} failed\n{}",
        run.took,
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        run.stdout
    );
    assert!(run.stdout.contains("Rolling restart of cluster"), "{run}");
    assert!(run.stdout.contains("is the new leader"), "{run}");
    assert!(
        ok.load(Ordering::SeqCst) > 0,
        "no read succeeded during the rolling restart"
    );

    let new_leader = cluster.wait_healthy(HEALTHY).unwrap();
    assert_ne!(new_leader, leader, "the leader was switched over");
    for (i, before) in before.iter().enumerate() {
        assert_ne!(
            &start_time(&cluster, i),
            before,
            "{} was not restarted\n{run}",
            cluster.nodes[i].name
        );
        let r = wait_until("all rows everywhere", Duration::from_secs(60), || {
            (cluster.psql(i, "SELECT count(*) FROM r").ok()? == "1000").then_some(())
        });
        r.unwrap();
    }
    cluster.psql(new_leader, "INSERT INTO r VALUES (1001)").unwrap();
    // Refused on an unhealthy cluster, with the reason.
    let run = pgvigilctl(
        &cluster,
        replicas[0],
        &["rolling-restart", "--force", "--candidate", "nobody"],
        None,
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok()
            && run
                .stderr
                .contains("nobody is not a replica that may be promoted"),
        "{run}"
    );
}
