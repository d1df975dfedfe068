//! `pgvigil router` on its own, with etcd but no cluster: refusals with a PostgreSQL error, a
//! configuration it rejects, reloads, the stale-topology bound and its recovery, and a clean
//! SIGTERM.

mod routing_support;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use pgvigil_testkit::cluster::psql_at;
use pgvigil_testkit::{EtcdCluster, free_port, http, wait_until};
use routing_support::*;

/// Without a cluster (only etcd): refusals with a PostgreSQL error, a bad configuration,
/// reloads, the stale-topology bound and its recovery, and a clean SIGTERM.
#[test]
fn router_refuses_reloads_survives_etcd_and_stops_cleanly() {
    let mut etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "scope: lonely\nname: r1\nrestapi:\n  listen: 127.0.0.1:1\netcd3:\n  hosts: {}\npostgresql:\n  \
         listen: 127.0.0.1:2\n  connect_address: 127.0.0.1:2\n  data_dir: /nonexistent\n  authentication:\n    \
         superuser:\n      username: postgres\n    replication:\n      username: rep\n",
        etcd.endpoint(0)
    );

    // A bad configuration is refused with the file, the key and the problem.
    let bad = dir.path().join("bad.yml");
    fs::write(&bad, format!("{base}router:\n  primary_listen: five-thousand\n")).unwrap();
    let out = Command::new(AGENT).arg("router").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("pgvigil router: invalid configuration")
            && err.contains("bad.yml")
            && err.contains("router.primary_listen: expected host:port"),
        "{err}"
    );
    let out = Command::new(AGENT)
        .arg("router")
        .arg("--validate-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let mut router = Router::start(dir.path(), &base, "  stale_topology_timeout: 3\n").unwrap();

    // No leader key: a proper PostgreSQL error, at once.
    let started = Instant::now();
    let err = psql_at(router.primary, "SELECT 1").unwrap_err().to_string();
    assert!(
        err.contains("FATAL:  pgvigil router: no primary is available for cluster lonely"),
        "{err}"
    );
    assert!(err.contains("no member holds the leader key"), "{err}");
    let err = psql_at(router.replicas, "SELECT 1").unwrap_err().to_string();
    assert!(
        err.contains("FATAL:  pgvigil router: no replica is available for cluster lonely"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refusals took {:?}",
        started.elapsed()
    );
    let stats = router.stats_json().unwrap();
    assert_eq!(stats["ports"]["primary"]["refused"]["no_primary"], 1, "{stats}");
    let page = http::get(router.stats, "/").unwrap();
    assert!(page.body.contains("no primary"), "{}", page.body);
    let metrics = http::get(router.stats, "/metrics").unwrap();
    assert!(
        metrics
            .body
            .contains("pgvigil_router_primary_available{scope=\"lonely\"} 0"),
        "{}",
        metrics.body
    );

    // SIGHUP: the primary listener moves; a broken file is refused and changes nothing.
    let old_primary = router.primary;
    let new_primary = free_port();
    let text = fs::read_to_string(&router.config).unwrap().replace(
        &format!("127.0.0.1:{old_primary}"),
        &format!("127.0.0.1:{new_primary}"),
    );
    fs::write(&router.config, &text).unwrap();
    kill(router.pid(), Signal::SIGHUP).unwrap();
    wait_until("the primary listener to move", Duration::from_secs(10), || {
        psql_at(new_primary, "SELECT 1")
            .unwrap_err()
            .to_string()
            .contains("pgvigil router: no primary")
            .then_some(())
    })
    .unwrap();
    wait_until("the old listener to close", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", old_primary))
            .is_err()
            .then_some(())
    })
    .unwrap();
    router.primary = new_primary;
    fs::write(&router.config, format!("{text}  connect_timeout: [oops\n")).unwrap();
    kill(router.pid(), Signal::SIGHUP).unwrap();
    let stats = wait_until("the reload to be refused", Duration::from_secs(10), || {
        let s = router.stats_json()?;
        (s["last_reload"]["ok"] == false).then_some(s)
    })
    .unwrap();
    assert!(
        stats["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("YAML syntax error"),
        "{stats}"
    );
    assert!(
        psql_at(new_primary, "SELECT 1")
            .unwrap_err()
            .to_string()
            .contains("no primary")
    );

    // etcd goes away: the last topology is kept (and the page says so), then expires.
    etcd.stop_member(0);
    wait_until(
        "the router to report a stale topology",
        Duration::from_secs(10),
        || (router.stats_json()?["etcd"]["status"] == "stale").then_some(()),
    )
    .unwrap();
    wait_until("the topology to expire", Duration::from_secs(20), || {
        (router.stats_json()?["etcd"]["status"] == "expired").then_some(())
    })
    .unwrap();
    let err = psql_at(router.primary, "SELECT 1").unwrap_err().to_string();
    assert!(
        err.contains("the topology of cluster lonely is unknown: etcd has not answered"),
        "{err}"
    );
    // etcd is back: the router re-syncs by itself.
    etcd.start_member(0).unwrap();
    wait_until("the router to re-sync", Duration::from_secs(30), || {
        (router.stats_json()?["etcd"]["status"] == "in sync").then_some(())
    })
    .unwrap();
    assert!(
        psql_at(router.primary, "SELECT 1")
            .unwrap_err()
            .to_string()
            .contains("no primary")
    );

    // SIGTERM: a clean, quick exit.
    let stopped = Instant::now();
    kill(router.pid(), Signal::SIGTERM).unwrap();
    let mut child = router.child.take().unwrap();
    let status = wait_until("the router to exit", Duration::from_secs(15), || {
        child.try_wait().ok().flatten()
    })
    .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
}
