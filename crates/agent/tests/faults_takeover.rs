//! The leader lock on three hosts with the timings left at their defaults (no `ttl`,
//! `loop_wait` or `retry_timeout` in the file), the checker writing through the router:
//!
//! * a dead leader host is replaced by a member that **took the key over** after the leader's
//!   promise ran out, long before its 30 s lease could expire, whether or not the dead host
//!   also ran the etcd leader, in synchronous mode and without it;
//! * a healthy primary is never fenced and no failover happens when every etcd member stalls
//!   for 2 s, when a host running a replica and the etcd leader dies, on a slow lossy link,
//!   or when the replicas' agents are starved for 3 s;
//! * the synchronous standby's host dying or being cut off stops writes only for a moment;
//! * without synchronous replication and without a watchdog, a leader whose agent is frozen
//!   past its lease, or killed alone, never leaves two writable primaries (its fencer stops
//!   PostgreSQL).
//!
//! Every scenario ends with the checker's assertions; the write gaps are printed (the
//! benchmark, `bench/failover`, measures them).

mod faults_support;

use std::time::{Duration, Instant};

use faults_support::*;
use nix::sys::signal::Signal;
use pgvigil_testkit::netcluster::{Expect, NetCluster};
use pgvigil_testkit::netns::Impairment;
use pgvigil_testkit::wait_until;

/// Kills the leader's host with the etcd leader placed on it or elsewhere; returns the new
/// leader after checking that it took the key over and that writes flow through it.
fn kill_leader_host(
    cluster: &mut NetCluster,
    checker: &pgvigil_testkit::checker::Checker,
    old: usize,
    etcd_leader_on_it: bool,
) -> usize {
    let etcd_host = if etcd_leader_on_it {
        old
    } else {
        a_replica(cluster, old)
    };
    check!(cluster, cluster.move_etcd_leader(etcd_host));
    let what = if etcd_leader_on_it {
        "leader host (and etcd leader) died"
    } else {
        "leader host died (etcd leader elsewhere)"
    };
    checker.mark(what);
    check!(cluster, cluster.kill_host(old));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    check!(cluster, checker.wait_for_acks(30, Duration::from_secs(60)));
    assert!(
        took_over(cluster, new),
        "{} did not take the key over: the failover waited for the lease\n{}",
        cluster.nodes[new].name,
        cluster.diagnostics()
    );
    checker.mark("dead host restarted");
    check!(cluster, cluster.restart_host(old));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    new
}

fn dead_leader_hosts_are_taken_over(synchronous: bool) {
    let (mut cluster, first, checker) = start(defaults(synchronous));
    let second = kill_leader_host(&mut cluster, &checker, first, false);
    if synchronous {
        wait_sync_standby(&cluster);
    }
    kill_leader_host(&mut cluster, &checker, second, true);
    let report = checker.finish();
    let expect = Expect {
        zero_loss: synchronous,
        ..Expect::default()
    };
    check!(cluster, cluster.verify(&report, expect));
    for mark in [
        "leader host died (etcd leader elsewhere)",
        "leader host (and etcd leader) died",
    ] {
        eprintln!("write gap after \"{mark}\": {:?}", report.gap_after_mark(mark));
    }
}

#[test]
fn dead_leader_hosts_are_taken_over_in_synchronous_mode() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    dead_leader_hosts_are_taken_over(true);
}

#[test]
fn dead_leader_hosts_are_taken_over_without_synchronous_replication() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    dead_leader_hosts_are_taken_over(false);
}

#[test]
fn a_healthy_primary_rides_out_etcd_stalls_etcd_leader_loss_slow_links_and_starved_replicas() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (mut cluster, leader, checker) = start(defaults(true));
    let postmaster = cluster.nodes[leader].postmaster_pid();
    let timeline = cluster
        .psql(leader, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap()[..8]
        .to_string();
    let same_leader = |cluster: &NetCluster, during: &str| {
        if let Some(l) = cluster.leader() {
            assert_eq!(l, leader, "failover during {during}\n{}", cluster.diagnostics());
        }
    };

    checker.mark("every etcd member stalled for 2 s");
    check!(cluster, cluster.stall_etcd(Duration::from_secs(2)));
    check!(cluster, checker.wait_for_acks(20, Duration::from_secs(60)));
    same_leader(&cluster, "the etcd stall");

    let replica = a_replica(&cluster, leader);
    check!(cluster, cluster.move_etcd_leader(replica));
    checker.mark("a host with a replica and the etcd leader died");
    check!(cluster, cluster.kill_host(replica));
    check!(cluster, checker.wait_for_acks(30, Duration::from_secs(60)));
    same_leader(&cluster, "the etcd leader's death");
    check!(cluster, cluster.restart_host(replica));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    wait_sync_standby(&cluster);

    checker.mark("200 ms delay and 2% loss on the leader's link");
    let imp = Impairment {
        delay: Duration::from_millis(200),
        jitter: Duration::from_millis(20),
        loss: 0.02,
    };
    check!(cluster, cluster.impair(leader, imp));
    let acked_before = checker.acked();
    let until = Instant::now() + Duration::from_secs(cluster.options.ttl);
    while Instant::now() < until {
        same_leader(&cluster, "the slow link");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        checker.acked() > acked_before,
        "no write acknowledged on the slow link"
    );
    check!(cluster, cluster.lab.clear_impairment(leader));
    checker.mark("link restored");

    checker.mark("replicas' agents starved for 3 s");
    let replicas: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &i in &replicas {
        check!(cluster, cluster.signal_agent(i, Signal::SIGSTOP));
    }
    std::thread::sleep(Duration::from_secs(3));
    for &i in &replicas {
        check!(cluster, cluster.signal_agent(i, Signal::SIGCONT));
    }
    check!(cluster, checker.wait_for_acks(30, Duration::from_secs(60)));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    same_leader(&cluster, "the replicas' starvation");

    let report = checker.finish();
    let end = check!(cluster, cluster.verify(&report, Expect::default()));
    assert_eq!(end, leader, "the leader changed");
    assert_eq!(
        cluster.nodes[leader].postmaster_pid(),
        postmaster,
        "the healthy primary was fenced (its postmaster changed)"
    );
    let now = cluster
        .psql(leader, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap()[..8]
        .to_string();
    assert_eq!(now, timeline, "the timeline changed: a failover happened");
}

#[test]
fn writes_resume_when_the_synchronous_standby_host_dies_or_is_cut_off() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (mut cluster, leader, checker) = start(defaults(true));
    let standby = check!(
        cluster,
        sync_standby(&cluster).ok_or_else(|| anyhow::anyhow!("no synchronous standby"))
    );

    checker.mark("synchronous standby host died");
    check!(cluster, cluster.kill_host(standby));
    // Writes resume with the other replica named, long before the dead one's key expires.
    check!(cluster, checker.wait_for_acks(30, Duration::from_secs(60)));
    let named = wait_until("another synchronous standby", Duration::from_secs(60), || {
        sync_standby(&cluster).filter(|&s| s != standby)
    });
    check!(cluster, named);
    check!(cluster, cluster.restart_host(standby));
    check!(cluster, cluster.wait_healthy(HEALTHY));

    let standby = check!(
        cluster,
        sync_standby(&cluster).ok_or_else(|| anyhow::anyhow!("no synchronous standby"))
    );
    checker.mark("synchronous standby cut off");
    check!(cluster, cluster.isolate(standby));
    check!(cluster, checker.wait_for_acks(30, Duration::from_secs(60)));
    checker.mark("synchronous standby healed");
    check!(cluster, cluster.heal(standby));
    check!(cluster, cluster.wait_healthy(HEALTHY));

    let report = checker.finish();
    let end = check!(cluster, cluster.verify(&report, Expect::default()));
    assert_eq!(end, leader, "losing a standby moved the leader");
    for mark in ["synchronous standby host died", "synchronous standby cut off"] {
        eprintln!("write gap after \"{mark}\": {:?}", report.gap_after_mark(mark));
    }
}

#[test]
fn a_frozen_or_killed_leader_agent_never_leaves_two_writable_primaries_without_sync() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (mut cluster, old, checker) = start(defaults(false));
    let ttl = Duration::from_secs(cluster.options.ttl);

    // Frozen past its lease: the fencer process stops PostgreSQL at the deadline; a replica
    // takes over after it.
    checker.mark("leader agent frozen");
    check!(cluster, cluster.signal_agent(old, Signal::SIGSTOP));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    let old_name = cluster.nodes[old].name.clone();
    let expired = wait_until(
        "the frozen leader's lease to expire",
        ttl + Duration::from_secs(30),
        || {
            let doc = cluster.cluster_doc()?;
            let members = doc.get("members")?.as_array()?;
            (!members.iter().any(|m| m["name"] == old_name.as_str())).then_some(())
        },
    );
    check!(cluster, expired);
    assert_ne!(
        cluster.psql(old, "SELECT pg_is_in_recovery()").ok().as_deref(),
        Some("f"),
        "the frozen leader's PostgreSQL still accepts writes"
    );
    checker.mark("frozen agent resumed");
    check!(cluster, cluster.signal_agent(old, Signal::SIGCONT));
    check!(cluster, cluster.wait_healthy(HEALTHY));

    // Killed alone, PostgreSQL left running: the fencer outlives the agent.
    checker.mark("leader agent killed");
    check!(cluster, cluster.signal_agent(new, Signal::SIGKILL));
    let third = check!(cluster, cluster.wait_new_leader(Some(new), FAILOVER));
    assert_ne!(
        cluster.psql(new, "SELECT pg_is_in_recovery()").ok().as_deref(),
        Some("f"),
        "the killed agent's PostgreSQL still accepts writes"
    );
    checker.mark("killed agent restarted");
    check!(cluster, cluster.start_agent(new));
    check!(cluster, cluster.wait_healthy(HEALTHY));

    let report = checker.finish();
    let expect = Expect {
        zero_loss: false,
        ..Expect::default()
    };
    let end = check!(cluster, cluster.verify(&report, expect));
    eprintln!(
        "final leader {}, after {} and {}",
        cluster.nodes[end].name, cluster.nodes[new].name, cluster.nodes[third].name
    );
    for mark in ["leader agent frozen", "leader agent killed"] {
        eprintln!("write gap after \"{mark}\": {:?}", report.gap_after_mark(mark));
    }
}
