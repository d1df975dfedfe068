//! A long operator action on the leader does not weaken the leader lock, and does not leave
//! operators hanging: a `POST /restart` whose PostgreSQL takes long to start is in progress on
//! the leader when a switchover is asked for (refused at once, with the reason), then the
//! leader's host is cut off from the other two. The restart runs on the supervisor's task, the
//! lock on its own thread: the fence stops the starting postmaster before another member
//! takes the key over and accepts writes.
//!
//! The slow start is real PostgreSQL behind a wrapper (`postgresql.bin_dir` points at a
//! directory of links to the installed tools, with `postgres` a script): while the file
//! `slow-start` exists beside the data directory, the script holds the start (as a long crash
//! recovery would), then `exec`s the real postgres under the same pid.

mod faults_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use faults_support::*;
use pgvigil_testkit::netcluster::{NetOptions, psql_addr};
use pgvigil_testkit::{http, wait_until};

/// A directory of PostgreSQL's tools in which `postgres` starts slowly on demand.
fn slow_start_bin_dir() -> tempfile::TempDir {
    // Bounded: the hold ends after 10 minutes whatever happens.
    wrapped_bin_dir("postgres", |real| {
        format!(
            r#"#!/bin/sh
data=""
prev=""
for a in "$@"; do
  if [ "$prev" = "-D" ]; then data="$a"; fi
  prev="$a"
done
if [ -n "$data" ] && [ -e "$data/../slow-start" ]; then
  echo $$ > "$data/../slow-start.pid"
  i=0
  while [ -e "$data/../slow-start" ] && [ $i -lt 3000 ]; do sleep 0.2; i=$((i+1)); done
fi
exec {real}/postgres "$@"
"#,
            real = real.display()
        )
    })
}

/// Whether `pid` is a live process (a zombie is dead: it runs nothing).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Polls `f` every 10 ms on a thread until it yields (with the moment it did) or `timeout`
/// passes (`None`).
fn watch_in_thread<T: Send + 'static>(
    timeout: Duration,
    mut f: impl FnMut() -> Option<T> + Send + 'static,
) -> std::thread::JoinHandle<Option<(Instant, T)>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(v) = f() {
                return Some((Instant::now(), v));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    })
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn a_leader_cut_off_during_a_long_restart_is_fenced_in_time_and_a_switchover_meanwhile_is_refused() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let bin_dir = slow_start_bin_dir();
    let options = NetOptions {
        pg_bin_dir: Some(bin_dir.path().to_path_buf()),
        ..defaults(true)
    };
    let (cluster, old, checker) = start(options);
    let node_dir = cluster.nodes[old].dir.clone();
    let hold = node_dir.join("slow-start");
    let pid_file = node_dir.join("slow-start.pid");
    let api = cluster.nodes[old].api_addr();

    // A restart with a long timeout; its start is held.
    std::fs::write(&hold, "").unwrap();
    checker.mark("restart of the leader, its start held");
    let (restart_tx, restart_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let answer = http::request_within(
            api,
            "POST",
            "/restart",
            Some(r#"{"timeout": 600}"#),
            None,
            Duration::from_secs(900),
        );
        let _ = restart_tx.send(answer);
    });
    let held = wait_until(
        "the restart to reach the held start",
        Duration::from_secs(60),
        || read_pid(&pid_file).filter(|&pid| alive(pid)),
    );
    let held = check!(cluster, held);

    // A switchover meanwhile is refused at once, and says why.
    let body = format!(r#"{{"leader":"{}"}}"#, cluster.nodes[old].name);
    let answer = http::request_within(
        api,
        "POST",
        "/switchover",
        Some(&body),
        None,
        Duration::from_secs(30),
    );
    let answer = check!(cluster, answer);
    assert_eq!(answer.status, 503, "switchover during a restart: {answer:?}");
    assert!(
        answer.body.contains("restart in progress"),
        "the refusal says what the node is busy with: {answer:?}"
    );

    // The leader's host is cut off while the restart waits: the fence must stop the held
    // postmaster before another member accepts writes. Two watchers time both events, each on
    // its own thread so neither waits on the other's slow calls.
    let others: Vec<SocketAddr> = (0..cluster.nodes.len())
        .filter(|&i| i != old)
        .map(|i| cluster.nodes[i].pg_addr())
        .collect();
    let pid_gone = watch_in_thread(FAILOVER, move || (!alive(held)).then_some(()));
    let first_writable = watch_in_thread(FAILOVER, move || {
        others
            .iter()
            .find(|&&addr| psql_addr(addr, "SELECT pg_is_in_recovery()").is_ok_and(|r| r == "f"))
            .copied()
    });
    checker.mark("leader host cut off during the restart");
    check!(cluster, cluster.isolate(old));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    let (writable_at, writable) = first_writable
        .join()
        .unwrap()
        .unwrap_or_else(|| panic!("no other member became writable\n{}", cluster.diagnostics()));
    assert_eq!(writable, cluster.nodes[new].pg_addr());
    let gone_at = pid_gone.join().unwrap().map(|(at, ())| at);
    match gone_at {
        Some(gone_at) if gone_at <= writable_at => {}
        _ => panic!(
            "{} accepted writes before the cut-off leader's held postmaster (pid {held}) was stopped \
             (stopped: {gone_at:?}, writable: {writable_at:?})\n{}",
            cluster.nodes[new].name,
            cluster.diagnostics()
        ),
    }
    assert!(
        took_over(&cluster, new),
        "the new leader took the key over from the silent leader (fast takeover), not by lease expiry"
    );

    // The operator who asked for the restart gets an answer: it failed.
    let restart = restart_rx.recv_timeout(Duration::from_secs(120));
    let restart = check!(
        cluster,
        restart.map_err(|e| anyhow::anyhow!("no answer to POST /restart: {e}"))
    );
    let restart = check!(cluster, restart);
    assert_ne!(
        restart.status,
        200,
        "the fenced restart reports success: {restart:?}\n{}",
        cluster.diagnostics()
    );

    // Released or not, nothing of the old start may run any more.
    std::fs::remove_file(&hold).unwrap();
    assert_not_primary(&cluster, old, "the cut-off leader runs as a primary");
    heal_and_verify(&cluster, checker, old, new);
}
