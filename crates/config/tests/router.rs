//! The `router:` section read by `pgvigil router`: defaults, values, and refusals that name the
//! key.

mod common;

use common::*;
use pgvigil_config::{RouterConfig, sample_config};
use serde_json::json;

#[test]
fn defaults_when_the_section_is_absent() {
    let loaded = load_value(&minimal()).unwrap();
    assert_eq!(loaded.config.router, RouterConfig::default());
    let r = &loaded.config.router;
    assert_eq!(r.primary_listen, "127.0.0.1:5000");
    assert_eq!(r.replicas_listen, "127.0.0.1:5001");
    assert_eq!(r.stats_listen, "127.0.0.1:7000");
    assert_eq!(r.max_replica_lag, Some(100 << 20));
    assert!(!r.primary_serves_reads_fallback);
    assert_eq!(r.stale_topology_timeout, 30);
    assert_eq!(r.connect_timeout, 3);
    assert_eq!(r.shutdown_timeout, 10);
    assert_eq!(r.threads, 1);
}

#[test]
fn every_key_is_read() {
    let mut v = minimal();
    set(
        &mut v,
        "router",
        json!({
            "primary_listen": "0.0.0.0:6000",
            "replicas_listen": "[::1]:6001",
            "stats_listen": "localhost:6002",
            "max_replica_lag": "10MB",
            "primary_serves_reads_fallback": "on",
            "stale_topology_timeout": "20",
            "connect_timeout": 1,
            "shutdown_timeout": 0,
            "threads": 2
        }),
    );
    let loaded = load_value(&v).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(
        loaded.config.router,
        RouterConfig {
            primary_listen: "0.0.0.0:6000".into(),
            replicas_listen: "[::1]:6001".into(),
            stats_listen: "localhost:6002".into(),
            max_replica_lag: Some(10 << 20),
            primary_serves_reads_fallback: true,
            stale_topology_timeout: 20,
            connect_timeout: 1,
            shutdown_timeout: 0,
            threads: 2,
        }
    );
}

#[test]
fn lag_forms() {
    for (value, expected) in [
        (json!(1048576), Some(1048576)),
        (json!("1048576"), Some(1048576)),
        (json!("512kB"), Some(512 * 1024)),
        (json!(-1), None),
        (json!("unlimited"), None),
        (json!(0), Some(0)),
    ] {
        let mut v = minimal();
        set(&mut v, "router.max_replica_lag", value.clone());
        assert_eq!(
            load_value(&v).unwrap().config.router.max_replica_lag,
            expected,
            "{value}"
        );
    }
}

#[test]
fn unknown_router_keys_are_warnings() {
    let mut v = minimal();
    set(&mut v, "router.primary_port", json!(5000));
    let loaded = load_value(&v).unwrap();
    assert_eq!(
        warnings_without_dir(&loaded),
        ["x.yml: router.primary_port: unknown key, ignored"]
    );
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        (
            "router.primary_listen",
            json!("5000"),
            "x.yml: router.primary_listen: expected host:port",
        ),
        (
            "router.replicas_listen",
            json!("127.0.0.1:notaport"),
            "x.yml: router.replicas_listen: expected host:port",
        ),
        (
            "router.stats_listen",
            json!("127.0.0.1:5000"),
            "x.yml: router.stats_listen: 127.0.0.1:5000 is also router.primary_listen",
        ),
        (
            "router.max_replica_lag",
            json!("a lot"),
            "x.yml: router.max_replica_lag: expected a size in bytes",
        ),
        (
            "router.max_replica_lag",
            json!(-5),
            "x.yml: router.max_replica_lag: expected a size in bytes",
        ),
        (
            "router.primary_serves_reads_fallback",
            json!("maybe"),
            "x.yml: router.primary_serves_reads_fallback: expected a boolean",
        ),
        (
            "router.stale_topology_timeout",
            json!(0),
            "x.yml: router.stale_topology_timeout: must be at least 1, found 0",
        ),
        (
            "router.connect_timeout",
            json!("soon"),
            "x.yml: router.connect_timeout: expected an integer",
        ),
        (
            "router.threads",
            json!(0),
            "x.yml: router.threads: must be at least 1, found 0",
        ),
        ("router", json!("on"), "x.yml: router: expected a mapping"),
    ];
    for (path, value, expected) in cases {
        let mut v = minimal();
        set(&mut v, path, value.clone());
        let e = load_value(&v).unwrap_err().to_string();
        assert!(e.starts_with(expected), "{path} = {value}: {e}");
    }
}

#[test]
fn the_sample_documents_the_router_section() {
    let loaded = load_text(sample_config()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.config.router, RouterConfig::default());
}
