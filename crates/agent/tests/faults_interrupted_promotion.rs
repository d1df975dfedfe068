//! A promotion interrupted by SIGTERM must not leave two histories under one timeline number
//! (found by the deployment's end-to-end test, `docs/deployment.md`): the leader stops, its
//! synchronous standby takes the key and starts promoting, and receives SIGTERM meanwhile. A
//! promotion already asked for cannot be taken back: the agent lets it finish, stops
//! PostgreSQL, publishes the new timeline and its last position, and only then releases the
//! key. The old leader comes back without ever having received that promotion and wins the
//! race (it is within `maximum_lag_on_failover` and the synchronous leader of record); its
//! promotion must start a timeline nobody used, so the standby that promoted, when it comes
//! back, is found diverged and rewound instead of sitting on a second history of the same
//! timeline ("record with incorrect prev-link").
//!
//! The slow promotion is real PostgreSQL behind a wrapper (`postgresql.bin_dir` points at a
//! directory of links to the installed tools, with `pg_ctl` a script): while the file
//! `slow-promote` exists beside the data directory, `pg_ctl promote` waits before it runs.

mod faults_support;

use std::time::Duration;

use faults_support::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgvigil_testkit::checker::Checker;
use pgvigil_testkit::netcluster::{NetCluster, NetOptions};
use pgvigil_testkit::wait_until;

/// A directory of PostgreSQL's tools in which `pg_ctl promote` waits on demand.
fn slow_promote_bin_dir() -> tempfile::TempDir {
    // Bounded: the hold ends after 20 s whatever happens, well within the agent's own timeout
    // for the promotion (30 s), so the promotion always goes through.
    wrapped_bin_dir("pg_ctl", |real| {
        format!(
            r#"#!/bin/sh
data=""
prev=""
promote=""
for a in "$@"; do
  if [ "$prev" = "-D" ]; then data="$a"; fi
  if [ "$a" = "promote" ]; then promote=1; fi
  prev="$a"
done
if [ -n "$promote" ] && [ -n "$data" ] && [ -e "$data/../slow-promote" ]; then
  echo $$ > "$data/../slow-promote.pid"
  i=0
  while [ -e "$data/../slow-promote" ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
fi
exec {real}/pg_ctl "$@"
"#,
            real = real.display()
        )
    })
}

fn log_of(cluster: &NetCluster, i: usize) -> String {
    std::fs::read_to_string(&cluster.nodes[i].log).unwrap_or_default()
}

/// The timeline `/cluster` shows for host `i`.
fn timeline_in_cluster_doc(cluster: &NetCluster, i: usize) -> Option<u64> {
    let doc = cluster.cluster_doc()?;
    doc.get("members")?
        .as_array()?
        .iter()
        .find(|m| m["name"] == cluster.nodes[i].name.as_str())?["timeline"]
        .as_u64()
}

/// A cluster whose leader was stopped (SIGTERM) and whose synchronous standby holds the key
/// with its promotion held in the `pg_ctl` wrapper.
struct HeldPromotion(
    NetCluster,
    Checker,
    /// The old leader and its synchronous standby, whose promotion is held.
    usize,
    usize,
    /// The timeline the cluster was on before.
    u64,
    /// The file that holds the promotion while it exists.
    std::path::PathBuf,
);

/// What must outlive the cluster: the wrapper directory its PostgreSQL runs from, and this
/// binary's lab serialization.
type Lab = (tempfile::TempDir, std::sync::MutexGuard<'static, ()>);

/// `None` when the lab cannot run here (see `can_run`).
fn hold_a_promotion() -> Option<(Lab, HeldPromotion)> {
    if !can_run() {
        return None;
    }
    let serial = serial();
    let bin_dir = slow_promote_bin_dir();
    // Strict synchronous mode: the standby that promotes while shutting down waits for the
    // old leader (the synchronous partner of record, stopped) before it acknowledges anything,
    // so every acknowledged write is on the old leader, who leads next.
    let options = NetOptions {
        pg_bin_dir: Some(bin_dir.path().to_path_buf()),
        ..options("    synchronous_mode_strict: true\n")
    };
    let (mut cluster, old, checker) = start(options);
    let standby = check!(
        cluster,
        wait_until("a synchronous standby", Duration::from_secs(60), || sync_standby(
            &cluster
        ))
    );
    let first_timeline = check!(
        cluster,
        wait_until("the leader's timeline", Duration::from_secs(30), || {
            timeline_in_cluster_doc(&cluster, old)
        })
    );
    let hold = cluster.nodes[standby].dir.join("slow-promote");
    let pid_file = cluster.nodes[standby].dir.join("slow-promote.pid");
    std::fs::write(&hold, "").unwrap();

    // The leader stops; its synchronous standby takes the key and its promotion is held.
    checker.mark("leader stopped (SIGTERM)");
    check!(cluster, cluster.signal_agent(old, Signal::SIGTERM));
    check!(
        cluster,
        wait_until("the standby's promotion to start", FAILOVER, || pid_file
            .exists()
            .then_some(()))
    );
    let held = HeldPromotion(cluster, checker, old, standby, first_timeline, hold);
    Some(((bin_dir, serial), held))
}

/// The old leader's agent starts and must lead again; then the standby's, and the cluster must
/// end healthy (every member streaming on the leader's timeline) with no acknowledged write lost.
fn old_leader_then_standby_back(cluster: &mut NetCluster, checker: Checker, old: usize, standby: usize) {
    checker.mark("old leader back");
    check!(cluster, cluster.start_agent(old));
    let leader = check!(cluster, cluster.wait_new_leader(None, FAILOVER));
    assert_eq!(
        leader,
        old,
        "the old leader leads again\n{}",
        cluster.diagnostics()
    );
    checker.mark("standby back");
    check!(cluster, cluster.start_agent(standby));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    let report = checker.finish();
    let now = check!(
        cluster,
        cluster.verify(&report, pgvigil_testkit::netcluster::Expect::default())
    );
    assert_eq!(now, old);
}

#[test]
fn a_promotion_interrupted_by_sigterm_leaves_no_second_history_on_its_timeline() {
    let Some((_lab, held)) = hold_a_promotion() else {
        return;
    };
    let HeldPromotion(mut cluster, checker, old, standby, first_timeline, hold) = held;
    // SIGTERM to the standby while it promotes; the promotion then goes through.
    checker.mark("SIGTERM to the promoting standby");
    let agent = cluster.nodes[standby]
        .agent_pid()
        .expect("the standby's agent runs");
    kill(Pid::from_raw(agent as i32), Signal::SIGTERM).unwrap();
    check!(
        cluster,
        wait_until(
            "the standby to wait for its promotion",
            Duration::from_secs(30),
            || {
                log_of(&cluster, standby)
                    .contains("promotion in progress: waiting for it to finish before shutting down")
                    .then_some(())
            }
        )
    );
    std::fs::remove_file(&hold).unwrap();
    check!(cluster, cluster.signal_agent(standby, Signal::SIGTERM));
    let standby_log = log_of(&cluster, standby);
    assert!(
        standby_log.contains("promoted to primary"),
        "the interrupted promotion finished (the scenario needs it)\n{}",
        cluster.diagnostics()
    );

    // The old leader comes back, never having received that promotion, and leads; then the
    // standby comes back on the timeline it promoted to: diverged, rewound, streaming.
    old_leader_then_standby_back(&mut cluster, checker, old, standby);
    assert_eq!(
        timeline_in_cluster_doc(&cluster, old),
        Some(first_timeline + 2),
        "the second promotion skipped the timeline the first one started\n{}",
        cluster.diagnostics()
    );
    assert!(
        log_of(&cluster, standby).contains(&format!(
            "publishing timeline {} before releasing",
            first_timeline + 1
        )),
        "the standby published the timeline it started before releasing the key\n{}",
        cluster.diagnostics()
    );
    assert!(
        log_of(&cluster, old).contains("reserving it so that ours starts a new timeline"),
        "the old leader saw the timeline it never received\n{}",
        cluster.diagnostics()
    );
    assert!(
        log_of(&cluster, standby).contains("running pg_rewind from"),
        "the standby that promoted was found diverged and rewound\n{}",
        cluster.diagnostics()
    );
}

/// The same race when the promoting agent is killed instead: its PostgreSQL finishes the
/// promotion on its own and the fencer stops it, and nobody published the new timeline. The
/// old leader then promotes onto the same timeline number (nothing tells it otherwise); the
/// node that promoted first must be found to hold a second history of the leader's timeline
/// and be cloned again (pg_rewind cannot repair that).
#[test]
fn a_promotion_whose_agent_was_killed_is_recloned_after_a_second_promotion_to_its_timeline() {
    let Some((_lab, held)) = hold_a_promotion() else {
        return;
    };
    let HeldPromotion(mut cluster, checker, old, standby, first_timeline, hold) = held;

    checker.mark("SIGKILL to the promoting standby's agent");
    check!(cluster, cluster.signal_agent(standby, Signal::SIGKILL));
    std::fs::remove_file(&hold).unwrap();
    let promoted = format!("selected new timeline ID: {}", first_timeline + 1);
    check!(
        cluster,
        wait_until(
            "the orphaned promotion to finish",
            Duration::from_secs(60),
            || { log_of(&cluster, standby).contains(&promoted).then_some(()) }
        )
    );
    check!(
        cluster,
        wait_until(
            "the fencer to stop the orphaned primary",
            Duration::from_secs(120),
            || { cluster.nodes[standby].postmaster_pid().is_none().then_some(()) }
        )
    );

    // The old leader comes back and promotes onto the same timeline number; then the standby
    // comes back: a second history of the leader's timeline, cloned again.
    old_leader_then_standby_back(&mut cluster, checker, old, standby);
    assert_eq!(
        timeline_in_cluster_doc(&cluster, old),
        Some(first_timeline + 1),
        "the scenario needs both promotions on one timeline number\n{}",
        cluster.diagnostics()
    );
    assert!(
        log_of(&cluster, standby).contains("pg_rewind cannot tell them apart"),
        "the standby was found on a second history of the leader's timeline\n{}",
        cluster.diagnostics()
    );
}
