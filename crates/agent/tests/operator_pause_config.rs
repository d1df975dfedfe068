//! Maintenance mode, the dynamic configuration, reload, and the protection and validation of
//! the REST verbs, on a real cluster through `pgvigilctl`, the real `patronictl` and raw HTTP.

mod operator_support;

use std::time::{Duration, Instant};

use operator_support::*;
use pgvigil_testkit::cluster::ClusterOptions;
use pgvigil_testkit::{http, wait_until};
use serde_json::{Value, json};

const CTL_TIMEOUT: Duration = Duration::from_secs(120);

fn config(cluster: &pgvigil_testkit::cluster::TestCluster) -> Value {
    let r = http::get(cluster.nodes[0].api_port, "/config").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().unwrap()
}

#[test]
fn pause_stops_automatic_failover_until_resume() {
    let (mut cluster, leader) = start(ClusterOptions::default());
    let scope = cluster.scope.clone();
    let replicas = others(&cluster, leader);

    let run = pgvigilctl(&cluster, replicas[0], &["pause", "--wait"], None, CTL_TIMEOUT).expect_ok("pause");
    assert!(
        run.stdout.contains("Success: cluster management is paused"),
        "{run}"
    );
    assert_eq!(config(&cluster)["pause"], true);
    let run = pgvigilctl(&cluster, replicas[0], &["pause"], None, CTL_TIMEOUT);
    assert!(
        !run.ok() && run.stderr.contains("Cluster is already paused"),
        "{run}"
    );
    let run = pgvigilctl(&cluster, replicas[0], &["list"], None, CTL_TIMEOUT).expect_ok("list");
    assert!(run.stdout.contains("Maintenance mode: on"), "{run}");

    // The primary's PostgreSQL dies: nobody restarts it, nobody is promoted.
    cluster.kill_postgres(leader).unwrap();
    let watch_for = Duration::from_secs(cluster.options.ttl + 10);
    let started = Instant::now();
    while started.elapsed() < watch_for {
        for &r in &replicas {
            if let Ok(v) = cluster.psql(r, "SELECT pg_is_in_recovery()") {
                assert_eq!(
                    v,
                    "t",
                    "{} was promoted in maintenance mode\n{}",
                    cluster.nodes[r].name,
                    cluster.diagnostics()
                );
            }
        }
        assert!(
            cluster.nodes[leader].postmaster_pid().is_none(),
            "PostgreSQL was restarted on the leader in maintenance mode\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // patronictl resumes: the cluster heals (restart in place or failover) and takes writes.
    let run = patronictl(
        &cluster,
        replicas[1],
        &["resume", &scope, "--wait"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl resume");
    assert!(
        run.stdout.contains("Success: cluster management is resumed"),
        "{run}"
    );
    assert!(config(&cluster).get("pause").is_none());
    let healed = cluster.wait_healthy(HEALTHY).unwrap_or_else(|e| panic!("{e}"));
    cluster.psql(healed, "CREATE TABLE after_resume(x int)").unwrap();

    // And the other way round: patronictl pauses, pgvigilctl resumes.
    let run = patronictl(
        &cluster,
        replicas[1],
        &["pause", &scope, "--wait"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl pause");
    assert!(
        run.stdout.contains("Success: cluster management is paused"),
        "{run}"
    );
    let r = wait_until(
        "the status document to report pause",
        Duration::from_secs(30),
        || {
            let doc = http::get(cluster.nodes[healed].api_port, "/patroni")
                .ok()?
                .json()
                .ok()?;
            (doc["pause"] == true).then_some(())
        },
    );
    r.unwrap();
    let run = pgvigilctl(&cluster, replicas[0], &["resume", "--wait"], None, CTL_TIMEOUT).expect_ok("resume");
    assert!(
        run.stdout.contains("Success: cluster management is resumed"),
        "{run}"
    );
    let run = pgvigilctl(&cluster, replicas[0], &["resume"], None, CTL_TIMEOUT);
    assert!(!run.ok() && run.stderr.contains("Cluster is not paused"), "{run}");
    let _ = &mut cluster;
}

#[test]
fn config_edits_reload_and_rest_protection() {
    let (cluster, leader) = start(ClusterOptions::default());
    let scope = cluster.scope.clone();
    let port = cluster.nodes[leader].api_port;
    let auth = Some((API_USER, API_PASSWORD));

    // Unauthenticated or wrongly authenticated requests change nothing.
    for (method, path, body) in [
        ("PATCH", "/config", Some(r#"{"ttl": 99}"#)),
        ("PUT", "/config", Some(r#"{"ttl": 99}"#)),
        ("POST", "/switchover", Some(r#"{"leader": "x"}"#)),
        ("POST", "/failover", Some(r#"{"candidate": "x"}"#)),
        ("DELETE", "/switchover", None),
        ("POST", "/restart", Some("{}")),
        ("DELETE", "/restart", None),
        ("POST", "/reinitialize", Some("{}")),
        ("POST", "/reload", None),
    ] {
        let r = http::request(port, method, path, body, None).unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (401, "no auth header received"),
            "{method} {path}"
        );
        let r = http::request(port, method, path, body, Some((API_USER, "wrong"))).unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (401, "not authenticated"),
            "{method} {path}"
        );
    }
    assert!(config(&cluster).get("ttl").and_then(Value::as_u64) != Some(99));

    // Documented 4xx for bad bodies.
    assert_eq!(
        http::request(port, "PATCH", "/config", None, auth)
            .unwrap()
            .status,
        411
    );
    assert_eq!(
        http::request(port, "POST", "/switchover", None, auth)
            .unwrap()
            .status,
        411
    );
    assert_eq!(
        http::request(port, "PATCH", "/config", Some("{nope"), auth)
            .unwrap()
            .status,
        400
    );
    assert_eq!(
        http::request(port, "POST", "/failover", Some("[1]"), auth)
            .unwrap()
            .status,
        400
    );
    assert_eq!(
        http::request(port, "POST", "/restart", Some("{"), auth)
            .unwrap()
            .status,
        400
    );
    for (path, body, code, message) in [
        (
            "/restart",
            r#"{"role": "boss"}"#,
            400,
            "PostgreSQL role should be either primary, standby_leader, or replica",
        ),
        (
            "/restart",
            r#"{"timeout": 0}"#,
            400,
            "Timeout should be a positive number of seconds",
        ),
        (
            "/restart",
            r#"{"when": "now"}"#,
            400,
            "Unknown filter for the scheduled restart: when",
        ),
        (
            "/restart",
            r#"{"schedule": "2001-01-01T00:00:00+00:00"}"#,
            422,
            "Cannot schedule restart in the past",
        ),
        (
            "/restart",
            r#"{"schedule": "2099-01-01T00:00:00"}"#,
            400,
            "Timezone information is mandatory for the scheduled restart",
        ),
        (
            "/switchover",
            r#"{"candidate": "x"}"#,
            400,
            "Switchover could be performed only from a specific leader",
        ),
        (
            "/failover",
            r#"{"leader": "x"}"#,
            400,
            "Failover could be performed only to a specific candidate",
        ),
        (
            "/switchover",
            r#"{"leader": "nobody", "candidate": "x"}"#,
            412,
            "leader name does not match",
        ),
        (
            "/reinitialize",
            r#"{}"#,
            503,
            "I am the leader, can not reinitialize",
        ),
    ] {
        let r = http::request(port, "POST", path, Some(body), auth).unwrap();
        assert_eq!((r.status, r.body.as_str()), (code, message), "POST {path} {body}");
    }
    let r = http::request(port, "POST", "/switchover", Some(r#"{"leader": 7}"#), auth).unwrap();
    assert!(r.status == 400 && r.body.contains("leader"), "{r:?}");

    // PATCH /config merges, null deletes.
    let r = http::request(
        port,
        "PATCH",
        "/config",
        Some(r#"{"postgresql": {"parameters": {"work_mem": "8MB"}}, "custom_key": 1}"#),
        auth,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let patched: Value = r.json().unwrap();
    assert_eq!(patched["postgresql"]["parameters"]["work_mem"], "8MB");
    assert_eq!(patched["postgresql"]["parameters"]["max_connections"], 50);
    let r = http::request(port, "PATCH", "/config", Some(r#"{"custom_key": null}"#), auth).unwrap();
    assert!(r.json().unwrap().get("custom_key").is_none());
    // The replicas apply the new parameter.
    let replica = others(&cluster, leader)[0];
    let r = wait_until("work_mem applied on a replica", Duration::from_secs(60), || {
        (cluster.psql(replica, "SHOW work_mem").ok()? == "8MB").then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));

    // pgvigilctl edit-config: -s/-p pairs with a diff.
    let run = pgvigilctl(
        &cluster,
        replica,
        &[
            "edit-config",
            "-s",
            "loop_wait=3",
            "-p",
            "work_mem=16MB",
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("edit-config -s -p");
    assert!(
        run.stdout.contains("-loop_wait: 2") && run.stdout.contains("+loop_wait: 3"),
        "{run}"
    );
    assert!(
        run.stdout.contains("+    work_mem: 16MB") && run.stdout.contains("Configuration changed"),
        "{run}"
    );
    assert_eq!(config(&cluster)["loop_wait"], 3);
    let run = pgvigilctl(
        &cluster,
        replica,
        &["edit-config", "-s", "loop_wait=3", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("no-op");
    assert!(run.stdout.contains("Not changed"), "{run}");
    // Without --force and no answer: refused, unchanged.
    let run = pgvigilctl(
        &cluster,
        replica,
        &["edit-config", "-s", "loop_wait=4"],
        None,
        CTL_TIMEOUT,
    );
    assert!(!run.ok() && run.stderr.contains("--force"), "{run}");
    assert_eq!(config(&cluster)["loop_wait"], 3);
    // --apply from stdin needs --force.
    let run = pgvigilctl(
        &cluster,
        replica,
        &["edit-config", "--apply", "-"],
        Some("loop_wait: 4\n"),
        CTL_TIMEOUT,
    )
    .expect_ok("apply -");
    assert!(
        run.stdout.contains("Use --force option to apply changes"),
        "{run}"
    );
    let run = pgvigilctl(
        &cluster,
        replica,
        &["edit-config", "--apply", "-", "--force", "-q"],
        Some("loop_wait: 4\nmaximum_lag_on_failover: null\n"),
        CTL_TIMEOUT,
    )
    .expect_ok("apply - --force");
    assert!(
        run.stdout.contains("Configuration changed") && !run.stdout.contains("+loop_wait"),
        "{run}"
    );
    let c = config(&cluster);
    assert_eq!(c["loop_wait"], 4);
    assert!(c.get("maximum_lag_on_failover").is_none());

    // $EDITOR, confirmed on stdin.
    let editor = cluster.root().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/^loop_wait: 4$/loop_wait: 5/' \"$1\"\n",
    )
    .unwrap();
    make_executable(&editor);
    let mut cmd = std::process::Command::new(pgvigilctl_bin());
    cmd.arg("-c")
        .arg(&cluster.nodes[replica].config)
        .arg("edit-config")
        .env("EDITOR", &editor);
    let run = operator_support::run(cmd, Some("y\n"), CTL_TIMEOUT).expect_ok("edit-config with EDITOR");
    assert!(
        run.stdout.contains("+loop_wait: 5") && run.stdout.contains("Apply these changes? [y/N]"),
        "{run}"
    );
    assert_eq!(config(&cluster)["loop_wait"], 5);

    // A concurrent change while the editor is open: compare-and-set refuses.
    let sneaky = cluster.root().join("sneaky-editor.sh");
    std::fs::write(
        &sneaky,
        format!(
            "#!/bin/sh\n'{}' -c '{}' edit-config -s ttl=25 --force -q >/dev/null\nsed -i 's/^loop_wait: 5$/loop_wait: 6/' \"$1\"\n",
            pgvigilctl_bin().display(),
            cluster.nodes[replica].config.display()
        ),
    )
    .unwrap();
    make_executable(&sneaky);
    let mut cmd = std::process::Command::new(pgvigilctl_bin());
    cmd.arg("-c")
        .arg(&cluster.nodes[replica].config)
        .args(["edit-config", "--force"])
        .env("EDITOR", &sneaky);
    let run = operator_support::run(cmd, None, CTL_TIMEOUT);
    assert!(
        !run.ok()
            && run
                .stderr
                .contains("Config modification aborted due to concurrent changes"),
        "{run}"
    );
    let c = config(&cluster);
    assert_eq!((c["ttl"].as_u64(), c["loop_wait"].as_u64()), (Some(25), Some(5)));

    // The real patronictl edits it too (compare-and-set write to etcd).
    let run = patronictl(
        &cluster,
        replica,
        &[
            "edit-config",
            &scope,
            "-s",
            "loop_wait=2",
            "-p",
            "work_mem=4MB",
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl edit-config");
    assert!(run.stdout.contains("Configuration changed"), "{run}");
    assert_eq!(config(&cluster)["loop_wait"], 2);
    let run = patronictl(&cluster, replica, &["show-config", &scope], None, CTL_TIMEOUT)
        .expect_ok("patronictl show-config");
    assert!(run.stdout.contains("work_mem: 4MB"), "{run}");
    let r = wait_until(
        "work_mem back to 4MB on the leader",
        Duration::from_secs(60),
        || (cluster.psql(leader, "SHOW work_mem").ok()? == "4MB").then_some(()),
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));

    // PUT /config replaces the whole configuration.
    let current = config(&cluster);
    let mut replaced = current.clone();
    replaced["custom_marker"] = json!("put");
    let r = http::request(port, "PUT", "/config", Some(&replaced.to_string()), auth).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(config(&cluster)["custom_marker"], "put");

    // Reload, through both tools.
    let run = pgvigilctl(
        &cluster,
        replica,
        &["reload", &scope, "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("reload");
    assert_eq!(
        run.stdout.matches("Reload request received for member").count(),
        3,
        "{run}"
    );
    let run = patronictl(
        &cluster,
        replica,
        &["reload", &scope, &cluster.nodes[leader].name, "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl reload");
    assert!(
        run.stdout.contains(&format!(
            "Reload request received for member {}",
            cluster.nodes[leader].name
        )),
        "{run}"
    );

    // dsn and version.
    let run = pgvigilctl(&cluster, replica, &["dsn"], None, CTL_TIMEOUT).expect_ok("dsn");
    assert_eq!(
        run.stdout.trim(),
        format!("host=127.0.0.1 port={}", cluster.nodes[leader].pg_port)
    );
    let run = pgvigilctl(
        &cluster,
        replica,
        &["dsn", "--member", &cluster.nodes[replica].name],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("dsn -m");
    assert_eq!(
        run.stdout.trim(),
        format!("host=127.0.0.1 port={}", cluster.nodes[replica].pg_port)
    );
    let run = pgvigilctl(&cluster, replica, &["version", &scope], None, CTL_TIMEOUT).expect_ok("version");
    assert_eq!(
        run.stdout.matches(": Patroni 4.1.5 PostgreSQL ").count(),
        3,
        "{run}"
    );
    let run = patronictl(&cluster, replica, &["version", &scope], None, CTL_TIMEOUT)
        .expect_ok("patronictl version");
    assert_eq!(
        run.stdout.matches(": Patroni 4.1.5 PostgreSQL ").count(),
        3,
        "{run}"
    );
    cluster.wait_healthy(HEALTHY).unwrap();

    // remove: three confirmations; any wrong answer (or none) leaves the cluster alone.
    let leader_name = cluster.nodes[leader].name.clone();
    let run = pgvigilctl(&cluster, replica, &["remove", &scope], None, CTL_TIMEOUT);
    assert!(
        !run.ok() && run.stderr.contains("standard input gave no answer"),
        "{run}"
    );
    let run = pgvigilctl(
        &cluster,
        replica,
        &["remove", &scope],
        Some("other\n"),
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok() && run.stderr.contains("Cluster names specified do not match"),
        "{run}"
    );
    let run = pgvigilctl(
        &cluster,
        replica,
        &["remove", &scope],
        Some(&format!("{scope}\nyes\n")),
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok() && run.stderr.contains("You did not exactly type \"Yes I am aware\""),
        "{run}"
    );
    let answers = format!("{scope}\nYes I am aware\nnot-the-leader\n");
    let run = pgvigilctl(
        &cluster,
        replica,
        &["remove", &scope],
        Some(&answers),
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok()
            && run
                .stderr
                .contains("You did not specify the current leader of the cluster"),
        "{run}"
    );
    assert!(config(&cluster).get("ttl").is_some());
    let answers = format!("{scope}\nYes I am aware\n{leader_name}\n");
    let run = pgvigilctl(
        &cluster,
        replica,
        &["remove", &scope],
        Some(&answers),
        CTL_TIMEOUT,
    )
    .expect_ok("remove");
    assert!(
        run.stdout
            .contains(&format!("Cluster {scope} removed from the DCS")),
        "{run}"
    );
}

fn make_executable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
