//! The dynamic configuration (`docs/patroni-compat.md` §3.3) and the timing rule (§3.4).

use pgvigil_config::{DynamicConfig, SyncMode};
use serde_json::{Value, json};

#[test]
fn empty_object_gives_patroni_defaults() {
    let (d, w) = DynamicConfig::from_json(&json!({}));
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(d, DynamicConfig::default());
    assert_eq!((d.ttl, d.loop_wait, d.retry_timeout), (30, 10, 10));
    assert_eq!(d.maximum_lag_on_failover, 1_048_576);
    assert_eq!(d.maximum_lag_on_syncnode, -1);
    assert_eq!(
        (
            d.primary_start_timeout,
            d.primary_stop_timeout,
            d.primary_race_backoff
        ),
        (300, 0, 0)
    );
    assert_eq!((d.synchronous_mode, d.synchronous_node_count), (SyncMode::Off, 1));
    assert_eq!(d.member_slots_ttl, 1800);
    assert!(d.use_slots && !d.use_pg_rewind && !d.pause && !d.failsafe_mode);
}

/// (ttl, loop_wait, retry_timeout) in → out, and whether a warning is expected.
#[test]
fn timing_rule_edge_cases() {
    let cases: Vec<(Value, (u64, u64, u64), bool)> = vec![
        (json!([30, 10, 10]), (30, 10, 10), false),
        (json!([20, 2, 9]), (20, 2, 9), false),
        (json!([60, 30, 15]), (60, 30, 15), false),
        // loop_wait + 2*retry_timeout > ttl, but 1 + 2*retry_timeout fits: shorten loop_wait.
        (json!([30, 11, 10]), (30, 10, 10), true),
        (json!([21, 5, 10]), (21, 1, 10), true),
        (json!([25, 20, 10]), (25, 5, 10), true),
        // Even loop_wait = 1 does not fit: loop_wait = 1, retry_timeout = (ttl - 1) // 2.
        (json!([20, 1, 10]), (20, 1, 9), true),
        (json!([30, 10, 15]), (30, 1, 14), true),
        (json!([31, 10, 15]), (31, 1, 15), true),
        // Minimums first: loop_wait 1, retry_timeout 3, ttl 20.
        (json!([10, 10, 10]), (20, 1, 9), true),
        (json!([30, 0, 1]), (30, 1, 3), true),
        (json!([-5, -5, -5]), (20, 1, 3), true),
        (json!([19, 1, 3]), (20, 1, 3), true),
        // Integer-looking strings are accepted, as Patroni's int() does.
        (json!(["30", "10", "10"]), (30, 10, 10), false),
        // Absurd values must not overflow.
        (
            json!([i64::MAX, i64::MAX, i64::MAX]),
            (i64::MAX as u64, 1, (i64::MAX as u64 - 1) / 2),
            true,
        ),
        (
            json!([i64::MAX, i64::MAX, 3]),
            (i64::MAX as u64, i64::MAX as u64 - 6, 3),
            true,
        ),
    ];
    for (input, expected, warned) in cases {
        let v = json!({"ttl": input[0], "loop_wait": input[1], "retry_timeout": input[2]});
        let (d, w) = DynamicConfig::from_json(&v);
        assert_eq!((d.ttl, d.loop_wait, d.retry_timeout), expected, "{input}");
        assert_eq!(!w.is_empty(), warned, "{input}: {w:?}");
        assert!(
            d.loop_wait + 2 * d.retry_timeout <= d.ttl || d.ttl == i64::MAX as u64,
            "{input}"
        );
        assert_eq!(d.raw, v, "the raw value is not rewritten");
    }
    let (_, w) = DynamicConfig::from_json(&json!({"ttl": 30, "loop_wait": 11, "retry_timeout": 10}));
    assert_eq!(
        w,
        [
            "dynamic configuration: the rule loop_wait + 2*retry_timeout <= ttl is violated (ttl=30, retry_timeout=10); \
          adjusting loop_wait from 11 to 10"
        ]
    );
}

#[test]
fn synchronous_mode_spellings() {
    for (v, mode, warned) in [
        (json!(true), SyncMode::On, false),
        (json!("on"), SyncMode::On, false),
        (json!("TRUE"), SyncMode::On, false),
        (json!(1), SyncMode::On, false),
        (json!("quorum"), SyncMode::Quorum, false),
        (json!("Quorum"), SyncMode::Quorum, false),
        (json!(false), SyncMode::Off, false),
        (json!("off"), SyncMode::Off, false),
        (json!("no"), SyncMode::Off, false),
        (json!("sometimes"), SyncMode::Off, true),
        (json!([1]), SyncMode::Off, true),
    ] {
        let (d, w) = DynamicConfig::from_json(&json!({"synchronous_mode": v}));
        assert_eq!(d.synchronous_mode, mode, "{v}");
        assert_eq!(!w.is_empty(), warned, "{v}: {w:?}");
    }
    assert!(SyncMode::Quorum.is_enabled() && !SyncMode::Off.is_enabled());
}

#[test]
fn member_slots_ttl_units() {
    for (v, secs) in [
        (json!(0), 0),
        (json!(3600), 3600),
        (json!("3600"), 3600),
        (json!("30min"), 1800),
        (json!("2h"), 7200),
        (json!("1d"), 86400),
        (json!("1500ms"), 2),
        (json!("45s"), 45),
    ] {
        let (d, w) = DynamicConfig::from_json(&json!({"member_slots_ttl": v}));
        assert_eq!(d.member_slots_ttl, secs, "{v}");
        assert!(w.is_empty(), "{w:?}");
    }
    let (d, w) = DynamicConfig::from_json(&json!({"member_slots_ttl": "forever"}));
    assert_eq!(d.member_slots_ttl, 1800);
    assert!(
        w[0].starts_with("dynamic configuration: member_slots_ttl: expected seconds or a duration"),
        "{w:?}"
    );
}

#[test]
fn bad_values_warn_and_fall_back() {
    let v = json!({
        "ttl": "abc",
        "maximum_lag_on_failover": -5,
        "synchronous_node_count": 0,
        "pause": "perhaps",
        "check_timeline": "yes",
        "new_patroni_key": 1,
        "postgresql": {"use_slots": "no", "parameters": {"work_mem": "4MB"}, "data_dir": "/x", "whatever": 1, "pg_hba": "host all all 0.0.0.0/0 md5"},
        "standby_cluster": {"port": "notaport"},
    });
    let (d, w) = DynamicConfig::from_json(&v);
    assert_eq!(d.ttl, 30);
    assert_eq!(d.maximum_lag_on_failover, 1_048_576);
    assert_eq!(d.synchronous_node_count, 1);
    assert!(!d.pause && d.check_timeline && !d.use_slots);
    assert_eq!(d.parameters["work_mem"], json!("4MB"));
    assert_eq!(
        d.pg_hba.as_deref(),
        Some(&["host all all 0.0.0.0/0 md5".to_string()][..])
    );
    assert!(d.standby_cluster.is_none());
    for expected in [
        "dynamic configuration: ttl: expected an integer, found \"abc\"; ignored, using the default",
        "dynamic configuration: maximum_lag_on_failover: must be at least 0, found -5; ignored, using the default",
        "dynamic configuration: synchronous_node_count: must be at least 1",
        "dynamic configuration: pause: expected a boolean",
        "dynamic configuration: new_patroni_key: unknown key, ignored",
        "dynamic configuration: postgresql.data_dir: a local-only setting; ignored in the dynamic configuration",
        "dynamic configuration: postgresql.whatever: unknown key, ignored",
        "dynamic configuration: standby_cluster.port: expected an integer",
    ] {
        assert!(
            w.iter().any(|x| x.starts_with(expected)),
            "missing {expected:?} in {w:#?}"
        );
    }
    assert_eq!(w.len(), 8, "{w:#?}");
}

/// The section arriving through etcd (`patronictl edit-config`, `demote-cluster`) makes this a
/// standby cluster, and turns synchronous replication off as Patroni's `is_synchronous_mode`
/// does; without the section the mode is back.
#[test]
fn an_active_standby_cluster_from_etcd_is_adopted_and_disables_synchronous_mode() {
    let v = json!({"synchronous_mode": true, "standby_cluster": {"host": "10.0.0.9", "port": 5433}});
    let (d, w) = DynamicConfig::from_json(&v);
    assert!(w.is_empty(), "{w:#?}");
    assert_eq!(
        d.standby_cluster.unwrap().remote(),
        Some(("10.0.0.9".to_string(), 5433))
    );
    assert_eq!(d.synchronous_mode, pgvigil_config::SyncMode::Off);
    let (d, _) = DynamicConfig::from_json(&json!({"synchronous_mode": true}));
    assert_eq!(d.synchronous_mode, pgvigil_config::SyncMode::On);
    // Archive recovery only: active, nothing to stream from.
    let (d, _) = DynamicConfig::from_json(&json!({"standby_cluster": {"restore_command": "cp /a/%f %p"}}));
    assert_eq!(d.standby_cluster.unwrap().remote(), None);
    // A port alone is refused with a warning and leaves no active section.
    let (d, w) = DynamicConfig::from_json(&json!({"standby_cluster": {"port": 5433}}));
    assert!(d.standby_cluster.is_none());
    assert!(
        w[0].contains("standby_cluster.host: the remote primary's host is required with port"),
        "{w:?}"
    );
}

#[test]
fn non_objects_give_defaults() {
    for v in [json!(null), json!([1, 2]), json!("config"), json!(5)] {
        let (d, w) = DynamicConfig::from_json(&v);
        assert_eq!(d.ttl, 30);
        assert_eq!(d.raw, v);
        assert_eq!(w.len(), 1, "{w:?}");
    }
}

#[test]
fn aliases_slots_and_standby_cluster() {
    let v = json!({
        "master_start_timeout": 60,
        "master_stop_timeout": 5,
        "permanent_slots": {"s1": null},
        "ignore_slots": [{"name": "x"}],
        "standby_cluster": {"host": "remote", "port": 5433, "primary_slot_name": "standby", "create_replica_methods": ["basebackup"]},
        "postgresql": {"parameters_replica": {"work_mem": "8MB"}, "pg_hba_primary": ["host all all 0.0.0.0/0 md5"], "use_pg_rewind": "on", "remove_data_directory_on_rewind_failure": true},
    });
    let (d, w) = DynamicConfig::from_json(&v);
    assert!(w.is_empty(), "{w:?}");
    let sc = d.standby_cluster.as_ref().expect("active");
    assert_eq!(sc.create_replica_methods, ["basebackup"]);
    assert_eq!((d.primary_start_timeout, d.primary_stop_timeout), (60, 5));
    assert!(d.permanent_slots.contains_key("s1"));
    assert_eq!(d.ignore_slots.len(), 1);
    assert!(d.use_pg_rewind);
    assert_eq!(
        d.role_overrides["replica"].parameters.as_ref().unwrap()["work_mem"],
        json!("8MB")
    );
    assert_eq!(d.role_overrides["primary"].pg_hba.as_ref().unwrap().len(), 1);
    let (d, _) = DynamicConfig::from_json(&json!({"primary_start_timeout": 0, "master_start_timeout": 60}));
    assert_eq!(d.primary_start_timeout, 0, "the new name wins");
    let (d, _) = DynamicConfig::from_json(&json!({"standby_cluster": {"primary_slot_name": "x"}}));
    assert!(
        d.standby_cluster.is_none(),
        "no host, port or restore_command: not a standby cluster"
    );
}

#[test]
fn bad_slot_entries_from_the_dcs_are_left_out_with_a_warning_naming_them() {
    let v = json!({
        "slots": {
            "ok": null,
            "cdc": {"type": "logical", "database": "app", "plugin": "pgoutput"},
            "Bad": null,
            "half": {"type": "logical", "plugin": "pgoutput"},
            "extra": {"type": "physical", "lsn": 5},
        },
        "ignore_slots": [{"name": "keep"}, {"name": 5}],
    });
    let (d, w) = DynamicConfig::from_json(&v);
    assert_eq!(
        d.permanent_slots.keys().collect::<Vec<_>>(),
        ["ok", "cdc", "extra"]
    );
    assert_eq!(d.ignore_slots, vec![json!({"name": "keep"})]);
    assert_eq!(w.len(), 4, "{w:?}");
    assert!(
        w.iter().any(|w| w.contains("slots.extra.lsn: unknown key")),
        "{w:?}"
    );
    assert!(w.iter().any(|w| w.contains("slots.Bad")), "{w:?}");
    assert!(w.iter().any(|w| w.contains("slots.half")), "{w:?}");
    assert!(
        w.iter()
            .any(|w| w.contains("ignore_slots[1]: name: expected a string")),
        "{w:?}"
    );
}
