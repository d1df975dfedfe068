//! GUC computation (`docs/patroni-compat.md` §3.9).

mod common;

use std::collections::BTreeMap;

use common::*;
use pgvigil_config::{Config, DynamicConfig, effective_parameters, guc_to_string};
use serde_json::{Value, json};

fn config_with(local: Value) -> Config {
    let mut v = minimal();
    set(&mut v, "scope", json!("batman"));
    set(&mut v, "postgresql.listen", json!("127.0.0.1,10.0.0.5:5433"));
    set(&mut v, "postgresql.parameters", local);
    load_value(&v).unwrap().config
}

fn compute(local: Value, dynamic: Value, major: u32) -> (BTreeMap<String, String>, Vec<String>) {
    let cfg = config_with(local);
    let (d, w) = DynamicConfig::from_json(&json!({"postgresql": {"parameters": dynamic}}));
    assert!(w.is_empty(), "{w:?}");
    effective_parameters(&cfg, &d, major)
}

#[test]
fn defaults_for_a_current_version() {
    let (p, w) = compute(json!({}), json!({}), 16);
    assert!(w.is_empty(), "{w:?}");
    let expected: BTreeMap<String, String> = [
        ("cluster_name", "batman"),
        ("hot_standby", "on"),
        ("listen_addresses", "127.0.0.1,10.0.0.5"),
        ("max_connections", "100"),
        ("max_locks_per_transaction", "64"),
        ("max_prepared_transactions", "0"),
        ("max_replication_slots", "10"),
        ("max_wal_senders", "10"),
        ("max_worker_processes", "8"),
        ("port", "5433"),
        ("track_commit_timestamp", "off"),
        ("wal_keep_size", "128MB"),
        ("wal_level", "replica"),
        ("wal_log_hints", "on"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(p, expected);
    let (p12, _) = compute(json!({}), json!({}), 12);
    assert_eq!(p12.get("wal_keep_segments").map(String::as_str), Some("8"));
    assert!(!p12.contains_key("wal_keep_size"));
    let (p_num, _) = compute(json!({}), json!({}), 160004);
    assert_eq!(p_num, p, "server_version_num is accepted");
}

#[test]
fn dynamic_controlled_values_are_validated() {
    let dynamic = json!({
        "max_connections": 10,
        "max_wal_senders": "20",
        "Max_Locks_Per_Transaction": 128,
        "wal_level": "minimal",
        "hot_standby": false,
        "track_commit_timestamp": true,
        "wal_log_hints": "maybe",
        "max_prepared_transactions": -1,
        "listen_addresses": "*",
        "wal_keep_size": "8MB",
    });
    let (p, w) = compute(json!({}), dynamic, 16);
    assert_eq!(p["max_connections"], "100");
    assert_eq!(p["max_wal_senders"], "20");
    assert_eq!(p["max_locks_per_transaction"], "128");
    assert_eq!(p["wal_level"], "replica");
    assert_eq!(p["hot_standby"], "on");
    assert_eq!(p["track_commit_timestamp"], "on");
    assert_eq!(p["wal_log_hints"], "on");
    assert_eq!(p["max_prepared_transactions"], "0");
    assert_eq!(p["listen_addresses"], "127.0.0.1,10.0.0.5");
    assert_eq!(p["wal_keep_size"], "128MB");
    for expected in [
        "postgresql.parameters.max_connections=10 failed validation, defaulting to 100",
        "postgresql.parameters.wal_level=minimal failed validation, defaulting to hot_standby",
        "postgresql.parameters.hot_standby=off failed validation, defaulting to on",
        "postgresql.parameters.wal_log_hints=maybe failed validation",
        "postgresql.parameters.max_prepared_transactions=-1 failed validation",
        "postgresql.parameters.listen_addresses: set by pgvigil",
        "postgresql.parameters.wal_keep_size=8MB failed validation, defaulting to 128MB",
    ] {
        assert!(
            w.iter().any(|x| x.contains(expected)),
            "missing {expected:?} in {w:#?}"
        );
    }
    assert_eq!(w.len(), 7, "{w:#?}");
}

#[test]
fn local_overrides_dynamic_except_controlled() {
    let (p, w) = compute(
        json!({"work_mem": "64MB", "max_connections": 999, "ssl": true, "shared_preload_libraries": ["pg_stat_statements", "auto_explain"]}),
        json!({"work_mem": "4MB", "max_connections": 300, "random_page_cost": 1.1, "wal_level": "logical"}),
        16,
    );
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p["work_mem"], "64MB");
    assert_eq!(p["max_connections"], "300");
    assert_eq!(p["ssl"], "on");
    assert_eq!(p["random_page_cost"], "1.1");
    assert_eq!(p["wal_level"], "logical");
    assert_eq!(p["shared_preload_libraries"], "pg_stat_statements,auto_explain");
}

#[test]
fn wal_keep_conversions() {
    let (p, _) = compute(json!({}), json!({"wal_keep_segments": 32}), 13);
    assert_eq!(p["wal_keep_size"], "512MB");
    assert!(!p.contains_key("wal_keep_segments"));
    let (p, _) = compute(json!({}), json!({"wal_keep_size": "1GB"}), 12);
    assert_eq!(p["wal_keep_segments"], "64");
    assert!(!p.contains_key("wal_keep_size"));
    let (p, _) = compute(
        json!({}),
        json!({"wal_keep_size": "2GB", "wal_keep_segments": 8}),
        16,
    );
    assert_eq!(p["wal_keep_size"], "2GB");
    let (p, _) = compute(json!({"wal_keep_size": "4GB"}), json!({}), 16);
    assert_eq!(p["wal_keep_size"], "128MB", "a local value is ignored");
}

#[test]
fn hba_and_ident_files_are_relative_to_config_dir() {
    let (p, _) = compute(
        json!({"hba_file": "custom_hba.conf", "ident_file": "/etc/ident.conf"}),
        json!({}),
        16,
    );
    assert_eq!(p["hba_file"], "/tmp/pgdata/custom_hba.conf");
    assert_eq!(p["ident_file"], "/etc/ident.conf");
}

#[test]
fn guc_rendering() {
    for (v, s) in [
        (json!(true), "on"),
        (json!(false), "off"),
        (json!(100), "100"),
        (json!(0.9), "0.9"),
        (json!("4MB"), "4MB"),
        (json!(null), ""),
        (json!(["a", "b", 3]), "a,b,3"),
        (json!("it's"), "it's"),
    ] {
        assert_eq!(guc_to_string(&v), s, "{v}");
    }
}
