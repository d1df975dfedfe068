//! Planned switchover and manual failover end to end, through `pgvigilctl` and through the
//! real `patronictl`; a switchover under a steady write load loses no acknowledged write.

mod operator_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use operator_support::*;
use pgvigil_testkit::cluster::{ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD, TestCluster};
use pgvigil_testkit::{http, wait_until};

const CTL_TIMEOUT: Duration = Duration::from_secs(180);

fn failover_key(cluster: &TestCluster) -> serde_json::Value {
    let doc = cluster.cluster_doc().expect("cluster document");
    doc.get("scheduled_switchover")
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn switchover_and_failover_with_pgvigilctl() {
    let (cluster, leader) = start(ClusterOptions::default());
    wait_settled(&cluster);
    let scope = cluster.scope.clone();
    let replicas = others(&cluster, leader);
    let (a, b) = (replicas[0], replicas[1]);

    // Without --force and without an answer on stdin, nothing happens.
    let refused = pgvigilctl(
        &cluster,
        a,
        &["switchover", "--candidate", &cluster.nodes[a].name],
        None,
        CTL_TIMEOUT,
    );
    assert!(!refused.ok(), "{refused}");
    assert!(refused.stderr.contains("--force"), "{refused}");
    assert_eq!(
        leader_name(&cluster).as_deref(),
        Some(cluster.nodes[leader].name.as_str())
    );

    // Answering the prompts on stdin works like patronictl's.
    let answers = format!(
        "{}\n{}\nnow\ny\n",
        cluster.nodes[leader].name, cluster.nodes[a].name
    );
    let run = pgvigilctl(&cluster, b, &["switchover"], Some(&answers), CTL_TIMEOUT).expect_ok("switchover");
    eprintln!("{run}");
    assert!(
        run.stdout.contains(&format!(
            "Successfully switched over to \"{}\"",
            cluster.nodes[a].name
        )),
        "{run}"
    );
    assert!(run.stdout.contains("Switchover done: the new leader is"), "{run}");
    wait_leader(&cluster, a, HEALTHY);

    // Failover to the other replica, --force.
    let run = pgvigilctl(
        &cluster,
        leader,
        &[
            "failover",
            &scope,
            "--candidate",
            &cluster.nodes[b].name,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("failover");
    assert!(
        run.stdout.contains(&format!(
            "Successfully failed over to \"{}\"",
            cluster.nodes[b].name
        )),
        "{run}"
    );
    wait_leader(&cluster, b, HEALTHY);

    // Refusals are explained and change nothing.
    let run = pgvigilctl(
        &cluster,
        a,
        &["switchover", "--leader", &cluster.nodes[a].name, "--force"],
        None,
        CTL_TIMEOUT,
    );
    assert!(
        !run.ok() && run.stderr.contains("is not the leader of cluster"),
        "{run}"
    );
    let run = pgvigilctl(&cluster, a, &["failover", "--force"], None, CTL_TIMEOUT);
    assert!(
        !run.ok()
            && run
                .stderr
                .contains("Failover could be performed only to a specific candidate"),
        "{run}"
    );

    // A scheduled switchover is visible, and flush cancels it.
    let at = in_seconds(3600);
    let run = pgvigilctl(
        &cluster,
        a,
        &["switchover", "--scheduled", &at, "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("scheduled switchover");
    assert!(run.stdout.contains("Switchover scheduled"), "{run}");
    assert!(run.stdout.contains("Switchover scheduled at:"), "{run}");
    assert!(
        failover_key(&cluster).get("at").is_some(),
        "{:?}",
        cluster.cluster_doc()
    );
    let run = pgvigilctl(
        &cluster,
        a,
        &["flush", &scope, "switchover", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("flush");
    assert!(
        run.stdout.contains("Success: scheduled switchover deleted"),
        "{run}"
    );
    assert!(failover_key(&cluster).is_null());
    let run = pgvigilctl(
        &cluster,
        a,
        &["flush", &scope, "switchover", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("flush");
    assert!(run.stdout.contains("No pending scheduled switchover"), "{run}");

    // A switchover scheduled a few seconds ahead happens at its time.
    let at = in_seconds(8);
    let run = pgvigilctl(
        &cluster,
        a,
        &[
            "switchover",
            "--candidate",
            &cluster.nodes[leader].name,
            "--scheduled",
            &at,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("switchover in 8 s");
    assert!(run.stdout.contains("Switchover scheduled"), "{run}");
    wait_leader(&cluster, leader, HEALTHY);
    assert!(failover_key(&cluster).is_null());
}

#[test]
fn switchover_and_failover_with_patronictl() {
    let (cluster, leader) = start(ClusterOptions::default());
    wait_settled(&cluster);
    let scope = cluster.scope.clone();
    let replicas = others(&cluster, leader);
    let (a, b) = (replicas[0], replicas[1]);

    let run = patronictl(
        &cluster,
        a,
        &[
            "switchover",
            &scope,
            "--candidate",
            &cluster.nodes[a].name,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl switchover");
    assert!(
        run.stdout.contains(&format!(
            "Successfully switched over to \"{}\"",
            cluster.nodes[a].name
        )),
        "{run}"
    );
    wait_leader(&cluster, a, HEALTHY);

    let run = patronictl(
        &cluster,
        leader,
        &[
            "failover",
            &scope,
            "--candidate",
            &cluster.nodes[b].name,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl failover");
    assert!(
        run.stdout.contains(&format!(
            "Successfully failed over to \"{}\"",
            cluster.nodes[b].name
        )),
        "{run}"
    );
    wait_leader(&cluster, b, HEALTHY);

    // patronictl's "any candidate" switchover (candidate null in the body).
    let run = patronictl(&cluster, a, &["switchover", &scope, "--force"], None, CTL_TIMEOUT)
        .expect_ok("patronictl switchover");
    assert!(run.stdout.contains("Successfully switched over to"), "{run}");
    let new = wait_until("a new leader", HEALTHY, || cluster.leader().filter(|&l| l != b));
    let new = new.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    wait_leader(&cluster, new, HEALTHY);

    // patronictl schedules, lists and flushes a switchover through our REST API.
    let at = in_seconds(3600);
    let run = patronictl(
        &cluster,
        a,
        &["switchover", &scope, "--scheduled", &at, "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl scheduled switchover");
    assert!(run.stdout.contains("Switchover scheduled"), "{run}");
    let run = patronictl(&cluster, a, &["list", &scope], None, CTL_TIMEOUT).expect_ok("patronictl list");
    assert!(run.stdout.contains("Switchover scheduled at:"), "{run}");
    let run = patronictl(
        &cluster,
        a,
        &["flush", &scope, "switchover", "--force"],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("patronictl flush");
    assert!(
        run.stdout.contains("Success: scheduled switchover deleted"),
        "{run}"
    );
    assert!(failover_key(&cluster).is_null());
}

/// Inserts unique ids every ~20 ms through psql connected to whichever node is the primary
/// (libpq multi-host, `target_session_attrs=read-write`), reconnecting after errors; records
/// the ids the server acknowledged (printed by `RETURNING`).
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(cluster: &TestCluster) -> Writer {
        let hosts = vec!["127.0.0.1"; cluster.nodes.len()].join(",");
        let ports: Vec<String> = cluster.nodes.iter().map(|n| n.pg_port.to_string()).collect();
        let conninfo = format!(
            "host={hosts} port={} user={SUPERUSER} dbname=postgres target_session_attrs=read-write connect_timeout=2",
            ports.join(",")
        );
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, a, e) = (stop.clone(), acked.clone(), errors.clone());
        let thread = std::thread::spawn(move || {
            let mut next: u64 = 1;
            while !s.load(Ordering::SeqCst) {
                let child = Command::new("psql")
                    .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                    .arg(&conninfo)
                    .env("PGPASSWORD", SUPERUSER_PASSWORD)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn();
                let Ok(mut child) = child else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                let mut input = child.stdin.take().unwrap();
                let mut output = BufReader::new(child.stdout.take().unwrap());
                while !s.load(Ordering::SeqCst) {
                    let id = next;
                    next += 1;
                    if writeln!(input, "INSERT INTO load(id) VALUES ({id}) RETURNING id;").is_err() {
                        break;
                    }
                    let _ = input.flush();
                    let mut line = String::new();
                    match output.read_line(&mut line) {
                        Ok(n) if n > 0 && line.trim() == id.to_string() => a.lock().unwrap().push(id),
                        _ => break,
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(input);
                let _ = child.kill();
                if let Ok(out) = child.wait_with_output() {
                    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    if !text.is_empty() {
                        e.lock().unwrap().push(text);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Writer {
            stop,
            acked,
            errors,
            thread,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn finish(self) -> (Vec<u64>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        let acked = self.acked.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        (acked, errors)
    }
}

#[test]
fn switchover_under_write_load_loses_no_acknowledged_write() {
    let (cluster, leader) = start(ClusterOptions::default());
    cluster
        .psql(
            leader,
            "CREATE TABLE load(id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
        )
        .unwrap();
    wait_settled(&cluster);
    let writer = Writer::start(&cluster);
    wait_until("the writer to get going", Duration::from_secs(30), || {
        (writer.acked() >= 50).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));

    let candidate = others(&cluster, leader)[0];
    let before = writer.acked();
    let started = Instant::now();
    let run = pgvigilctl(
        &cluster,
        candidate,
        &[
            "switchover",
            "--candidate",
            &cluster.nodes[candidate].name,
            "--force",
        ],
        None,
        CTL_TIMEOUT,
    )
    .expect_ok("switchover under load");
    assert!(run.stdout.contains("Successfully switched over"), "{run}");
    wait_leader(&cluster, candidate, HEALTHY);
    eprintln!("switchover took {:?}", started.elapsed());
    // Writes resume on the new primary.
    let resumed = wait_until("writes on the new primary", Duration::from_secs(60), || {
        (writer.acked() >= before + 100).then_some(())
    });
    resumed.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    let (acked, errors) = writer.finish();

    let stored: std::collections::HashSet<u64> = cluster
        .psql(candidate, "SELECT id FROM load")
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let lost: Vec<u64> = acked.iter().copied().filter(|id| !stored.contains(id)).collect();
    eprintln!(
        "{} writes acknowledged, {} rows on the new primary, {} connection errors",
        acked.len(),
        stored.len(),
        errors.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes lost in the switchover: {lost:?}\nerrors: {errors:?}"
    );
    // The former primary follows and has everything too.
    let r = wait_until("the former primary to catch up", Duration::from_secs(60), || {
        let count = cluster.psql(leader, "SELECT count(*) FROM load").ok()?;
        (count.parse::<usize>().ok()? >= stored.len()).then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", cluster.diagnostics()));
    assert_eq!(
        http::get(cluster.nodes[candidate].api_port, "/primary")
            .unwrap()
            .status,
        200
    );
}
