//! Crashes on three hosts in network namespaces, with the checker running through the router:
//! the leader's agent and PostgreSQL killed, then the whole leader host (etcd member too); the
//! leader's agent frozen for longer than `ttl`; a leader whose PostgreSQL cannot start again.
//! Every scenario ends with the checker's assertions (`NetCluster::verify`).

mod faults_support;

use std::time::Duration;

use faults_support::*;
use nix::sys::signal::Signal;
use pgvigil_testkit::netcluster::Expect;
use pgvigil_testkit::wait_until;

#[test]
fn killed_leader_processes_then_dead_leader_host_fail_over_without_loss() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (mut cluster, first, checker) = start(options(""));

    // 1. The leader's agent and PostgreSQL die (SIGKILL); its etcd member lives on.
    checker.mark("leader agent and PostgreSQL killed");
    check!(cluster, cluster.signal_agent(first, Signal::SIGKILL));
    check!(cluster, cluster.kill_postgres(first));
    let second = check!(cluster, cluster.wait_new_leader(Some(first), FAILOVER));
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));
    check!(cluster, cluster.start_agent(first));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    wait_sync_standby(&cluster);

    // 2. The new leader's whole host dies: link down, then every process on it, etcd included.
    checker.mark("leader host killed");
    check!(cluster, cluster.kill_host(second));
    let third = check!(cluster, cluster.wait_new_leader(Some(second), FAILOVER));
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));
    check!(cluster, cluster.restart_host(second));
    check!(cluster, cluster.wait_healthy(HEALTHY));

    let report = checker.finish();
    let leader = check!(cluster, cluster.verify(&report, Expect::default()));
    assert_eq!(leader, third, "the leader changed again after the host came back");
}

#[test]
fn frozen_leader_agent_does_not_come_back_as_a_second_primary() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (mut cluster, old, checker) = start(options(""));

    // SIGSTOP: the agent can neither renew its lease nor fence PostgreSQL, which keeps running.
    checker.mark("leader agent frozen");
    check!(cluster, cluster.signal_agent(old, Signal::SIGSTOP));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));

    // On SIGCONT the agent finds its lease gone: it must stop its primary at once, not act on
    // what it believed before the freeze.
    checker.mark("leader agent resumed");
    check!(cluster, cluster.signal_agent(old, Signal::SIGCONT));
    let demoted = wait_until(
        "the resumed node to stop being a primary",
        Duration::from_secs(30),
        || (cluster.psql(old, "SELECT pg_is_in_recovery()").ok().as_deref() != Some("f")).then_some(()),
    );
    check!(cluster, demoted);
    check!(cluster, cluster.wait_healthy(HEALTHY));
    assert_eq!(
        cluster.leader(),
        Some(new),
        "leadership moved back to the frozen node"
    );

    let report = checker.finish();
    // While the agent was frozen its PostgreSQL still ran as a primary (only a watchdog can
    // reset such a host), but it could not acknowledge a write: its synchronous standby had
    // moved to the new leader. After the resume it must never be a primary again.
    let resumed = report.mark("leader agent resumed").expect("marked");
    let old_primary_after_resume = report
        .ticks
        .iter()
        .filter(|t| t.at > resumed + Duration::from_secs(5))
        .filter(|t| t.nodes[old].primary == Some(true))
        .count();
    assert_eq!(
        old_primary_after_resume,
        0,
        "the resumed node was seen as a primary again\n{}",
        report.role_changes()
    );
    let expect = Expect {
        allow_two_primaries: true,
        ..Expect::default()
    };
    check!(cluster, cluster.verify(&report, expect));
}

#[test]
fn leader_whose_postgres_cannot_start_fails_over_within_primary_start_timeout() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let (cluster, old, checker) = start(options("    primary_start_timeout: 10\n"));

    // A configuration PostgreSQL refuses (postgresql.auto.conf is not managed by the agent),
    // then a crash: every restart attempt fails.
    let auto_conf = cluster.nodes[old].data_dir.join("postgresql.auto.conf");
    let original = std::fs::read_to_string(&auto_conf).unwrap();
    std::fs::write(&auto_conf, format!("{original}\nthis is not a setting\n")).unwrap();
    checker.mark("leader PostgreSQL killed, its configuration corrupt");
    check!(cluster, cluster.kill_postgres(old));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));

    // Repaired, the old leader rejoins as a replica of the new one.
    std::fs::write(&auto_conf, original).unwrap();
    checker.mark("configuration repaired");
    check!(cluster, cluster.wait_healthy(HEALTHY));
    let report = checker.finish();
    let leader = check!(cluster, cluster.verify(&report, Expect::default()));
    assert_eq!(leader, new);
}

#[test]
fn frozen_leader_with_a_watchdog_is_reset_before_its_lease_expires() {
    if !can_run() {
        return;
    }
    let _serial = serial();
    let options = pgvigil_testkit::netcluster::NetOptions {
        watchdog: true,
        ..options("")
    };
    let (mut cluster, old, checker) = start(options);
    let armed = wait_until(
        "the leader's watchdog to be armed and fed",
        Duration::from_secs(30),
        || cluster.watchdog(old).filter(|w| w.armed && w.pings > 1),
    );
    let armed = check!(cluster, armed);
    assert_eq!(armed.timeout, Duration::from_secs(cluster.options.ttl - 5));
    for i in (0..3).filter(|&i| i != old) {
        assert!(
            !cluster.watchdog(i).unwrap().armed,
            "a replica armed its watchdog"
        );
    }

    // Frozen, the agent stops feeding the watchdog; the "hardware" resets the host (every
    // process on it dies) at ttl - safety_margin, before the lease can expire.
    checker.mark("leader agent frozen");
    check!(cluster, cluster.signal_agent(old, Signal::SIGSTOP));
    let new = check!(cluster, cluster.wait_new_leader(Some(old), FAILOVER));
    let fired = cluster.watchdog(old).unwrap().fired;
    assert_eq!(
        fired.len(),
        1,
        "the watchdog did not reset the frozen leader's host"
    );
    check!(cluster, checker.wait_for_acks(50, Duration::from_secs(60)));

    checker.mark("reset host restarted");
    check!(cluster, cluster.restart_host(old));
    check!(cluster, cluster.wait_healthy(HEALTHY));
    let report = checker.finish();
    // Unlike without a watchdog, the old PostgreSQL was gone before the new one was promoted.
    let leader = check!(cluster, cluster.verify(&report, Expect::default()));
    assert_eq!(leader, new);
}
