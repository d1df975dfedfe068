//! Loading the local configuration: realistic files, defaults, YAML 1.1 forms, unknown keys,
//! custom methods, directories, fallbacks, and pgvigilctl's view.

mod common;

use std::path::PathBuf;

use common::*;
use pgvigil_config::{DynamicConfig, SyncMode, VerifyClient, WatchdogMode, load, load_client, sample_config};
use serde_json::{Value, json};

#[test]
fn production_config_loads_without_warnings() {
    let loaded = load_text(production_yaml()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(
        (c.scope.as_str(), c.name.as_str(), c.namespace.as_str()),
        ("pg-main", "pg-main-1", "/db/")
    );
    assert_eq!(
        c.etcd3.hosts,
        ["10.20.0.21:2379", "10.20.0.22:2379", "10.20.0.23:2379"]
    );
    assert_eq!(c.etcd3.endpoints()[0], "https://10.20.0.21:2379");
    assert_eq!(c.etcd3.username.as_deref(), Some("patroni"));
    assert_eq!(c.restapi.verify_client, VerifyClient::Optional);
    assert!(c.restapi.allowlist_include_members);
    assert_eq!(c.restapi.allowlist, ["10.20.0.0/24", "127.0.0.1"]);
    assert_eq!(
        c.ctl.authentication.as_ref().unwrap().username,
        "patroni",
        "falls back to restapi auth"
    );
    assert_eq!(
        c.ctl.cacert,
        Some(PathBuf::from("/etc/patroni/ssl/ca.crt")),
        "falls back to restapi.cafile"
    );
    assert_eq!(
        c.bootstrap.initdb,
        ["--encoding=UTF8", "--locale=en_US.UTF-8", "--data-checksums"]
    );
    assert_eq!(c.bootstrap.method, "initdb");
    assert_eq!(
        c.bootstrap.post_bootstrap.as_deref(),
        Some(&["/usr/local/bin/post_bootstrap.sh".to_string()][..])
    );
    assert_eq!(
        c.postgresql.basebackup,
        ["--checkpoint=fast", "--max-rate=100M", "--verbose"]
    );
    assert_eq!(c.postgresql.create_replica_methods, ["pgbackrest", "basebackup"]);
    let pgbackrest = &c.postgresql.replica_methods["pgbackrest"];
    assert!(pgbackrest.keep_data && pgbackrest.no_params);
    assert_eq!(
        c.postgresql.authentication.replication.sslmode.as_deref(),
        Some("verify-ca")
    );
    assert_eq!(
        c.postgresql.authentication.rewind_or_superuser().username,
        "rewind_user"
    );
    assert_eq!(c.postgresql.pg_ctl_timeout, 120);
    assert_eq!(c.postgresql.parameters["ssl"], json!(true));
    assert_eq!(
        c.postgresql.listen_addresses_and_port(),
        ("0.0.0.0".to_string(), 5432)
    );
    assert_eq!(c.watchdog.mode, WatchdogMode::Required);
    assert_eq!(c.log.file_num, 10);
    assert_eq!(c.tags.failover_priority(), 2);
    assert_eq!(
        Value::Object(c.tags.to_published()),
        json!({"clonefrom": true, "nofailover": false, "failover_priority": 2, "datacenter": "dc1", "rack": 7})
    );
    // bootstrap.dcs is kept raw (YAML 1.1 booleans already converted) and parses cleanly.
    assert_eq!(c.bootstrap.dcs["synchronous_mode"], json!(true));
    let (d, w) = DynamicConfig::from_json(&c.bootstrap.dcs);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(d.synchronous_mode, SyncMode::On);
    assert!(d.failsafe_mode && d.check_timeline && d.use_pg_rewind);
    assert_eq!(d.member_slots_ttl, 1800);
    assert_eq!(d.maximum_lag_on_syncnode, 10_485_760);
    assert_eq!(d.permanent_slots["debezium"]["plugin"], json!("pgoutput"));
    assert_eq!(d.pg_hba.as_ref().unwrap().len(), 3);
    assert!(c.use_pg_rewind(&d));
    assert_eq!(c.pg_hba(&d).unwrap()[0], "local all all peer");
}

#[test]
fn sample_config_loads_without_warnings() {
    let loaded = load_text(sample_config()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    assert_eq!(loaded.config.etcd3.hosts.len(), 3);
}

#[test]
fn minimal_config_gets_defaults() {
    let loaded = load_value(&minimal()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(c.namespace, "/service");
    assert_eq!(c.restapi.connect_address, "127.0.0.1:8008");
    assert_eq!(c.restapi.request_queue_size, 5);
    assert_eq!(c.restapi.server_tokens, "original");
    assert_eq!(c.etcd3.hosts, ["127.0.0.1:2379"]);
    assert_eq!(c.etcd3.protocol, "http");
    assert_eq!(c.postgresql.pgpass, PathBuf::from("/home/pg/pgpass"));
    assert_eq!(c.postgresql.database, "postgres");
    assert_eq!(c.postgresql.pg_ctl_timeout, 60);
    assert_eq!(c.postgresql.create_replica_methods, ["basebackup"]);
    assert_eq!(c.postgresql.effective_config_dir(), PathBuf::from("/tmp/pgdata"));
    assert_eq!(c.postgresql.authentication.superuser.password, None);
    assert_eq!(c.bootstrap.dcs, json!({}));
    assert_eq!(c.bootstrap.method, "initdb");
    assert_eq!(c.watchdog.mode, WatchdogMode::Automatic);
    assert_eq!(c.watchdog.device, PathBuf::from("/dev/watchdog"));
    assert_eq!(c.watchdog.safety_margin, 5);
    assert_eq!((c.log.level.as_str(), c.log.type_.as_str()), ("INFO", "plain"));
    assert_eq!(c.thread_pool_size, 5);
    assert_eq!(c.tags.failover_priority(), 1);
    assert!(c.tags.to_published().is_empty());
}

#[test]
fn yaml_1_1_booleans_and_integer_strings_are_accepted() {
    let yaml = r#"
scope: demo
name: node1
restapi: {listen: "127.0.0.1:8008", allowlist_include_members: On}
ctl: {insecure: yes}
etcd3: {hosts: [ "127.0.0.1:2379" ], use_proxies: "TRUE"}
log: {deduplicate_heartbeat_logs: off, file_num: "7", mode: 0640, level: debug}
postgresql:
  listen: 127.0.0.1:5432
  connect_address: 127.0.0.1:5432
  data_dir: /tmp/pg
  pg_ctl_timeout: "30"
  use_unix_socket: NO
  remove_data_directory_on_rewind_failure: "yes"
  authentication:
    superuser: {username: postgres, password: 12345}
    replication: {username: replicator}
tags: {nofailover: Yes, nosync: "off", noloadbalance: 1, sync_priority: "3"}
watchdog: {mode: off}
"#;
    let loaded = load_text(yaml).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert!(c.restapi.allowlist_include_members && c.ctl.insecure && c.etcd3.use_proxies);
    assert!(!c.log.deduplicate_heartbeat_logs);
    assert_eq!(
        (c.log.file_num, c.log.mode, c.log.level.as_str()),
        (7, Some(0o640), "DEBUG")
    );
    assert_eq!(c.postgresql.pg_ctl_timeout, 30);
    assert!(!c.postgresql.use_unix_socket && c.postgresql.remove_data_directory_on_rewind_failure);
    assert_eq!(
        c.postgresql.authentication.superuser.password.as_deref(),
        Some("12345")
    );
    assert!(c.tags.nofailover && !c.tags.nosync && c.tags.noloadbalance);
    assert_eq!((c.tags.failover_priority(), c.tags.sync_priority()), (0, 3));
    assert_eq!(c.watchdog.mode, WatchdogMode::Off);
}

#[test]
fn unknown_keys_are_warnings_naming_the_path() {
    let mut v = minimal();
    set(&mut v, "foo", json!(1));
    set(&mut v, "restapi.lisen", json!("x"));
    set(&mut v, "postgresql.authentication.superuser.pasword", json!("x"));
    set(&mut v, "bootstrap.dcs.postgresql.foo", json!(1));
    set(&mut v, "bootstrap.dcs.bar", json!(1));
    set(&mut v, "bootstrap.dcs.postgresql.listen", json!("0.0.0.0:5432"));
    set(&mut v, "watchdog.devise", json!("/dev/x"));
    set(&mut v, "ttl", json!(30));
    set(&mut v, "postgresql.parameters.max_connections", json!(200));
    set(&mut v, "postgresql.use_slots", json!(true));
    set(&mut v, "bootstrap.users", json!({"admin": {"password": "x"}}));
    let loaded = load_value(&v).unwrap();
    let w = warnings_without_dir(&loaded);
    for expected in [
        "x.yml: foo: unknown key, ignored",
        "x.yml: restapi.lisen: unknown key, ignored",
        "x.yml: postgresql.authentication.superuser.pasword: unknown key, ignored",
        "x.yml: bootstrap.dcs.postgresql.foo: unknown key, ignored",
        "x.yml: bootstrap.dcs.bar: unknown key, ignored",
        "x.yml: bootstrap.dcs.postgresql.listen: a local-only setting",
        "x.yml: watchdog.devise: unknown key, ignored",
        "x.yml: ttl: a dynamic setting",
        "x.yml: postgresql.parameters.max_connections: max_connections=200 is ignored",
        "x.yml: postgresql.use_slots: only the dynamic value counts",
        "x.yml: bootstrap.users: no longer supported",
    ] {
        assert!(
            w.iter().any(|x| x.starts_with(expected)),
            "missing {expected:?} in {w:#?}"
        );
    }
    assert_eq!(w.len(), 11, "{w:#?}");
}

#[test]
fn custom_bootstrap_and_replica_methods() {
    let mut v = minimal();
    set(&mut v, "bootstrap.method", json!("restore"));
    let e = load_value(&v).unwrap_err().to_string();
    assert!(
        e.starts_with("x.yml: bootstrap.restore: missing: bootstrap.method is `restore`"),
        "{e}"
    );
    set(
        &mut v,
        "bootstrap.restore",
        json!({"command": "/bin/restore.sh", "no_params": true, "recovery_conf": {"recovery_target_action": "promote"}, "target": "latest", "flag": true}),
    );
    set(
        &mut v,
        "postgresql.create_replica_methods",
        json!(["wal_g", "basebackup"]),
    );
    let e = load_value(&v).unwrap_err().to_string();
    assert_eq!(
        e,
        "x.yml: postgresql.wal_g: missing: create_replica_methods lists `wal_g`, which needs a section with a `command`"
    );
    set(
        &mut v,
        "postgresql.wal_g",
        json!({"command": "wal-g 'backup fetch'", "no_leader": 1, "envdir": "/etc/wal-g"}),
    );
    let loaded = load_value(&v).unwrap();
    let custom = loaded.config.bootstrap.custom.clone().unwrap();
    assert!(custom.no_params);
    assert_eq!(custom.command, ["/bin/restore.sh"]);
    assert_eq!(
        custom.bootstrap_args("main", "/data"),
        ["--target=latest", "--flag=True"]
    );
    assert_eq!(custom.recovery_conf["recovery_target_action"], json!("promote"));
    let wal_g = &loaded.config.postgresql.replica_methods["wal_g"];
    assert!(wal_g.no_leader);
    assert_eq!(wal_g.command, ["wal-g", "backup fetch"]);
    // Patroni's order: the section's own keys (no_leader included), then its four.
    assert_eq!(
        wal_g.replica_args("main", "/data", "host=a"),
        [
            "--no_leader=1",
            "--envdir=/etc/wal-g",
            "--scope=main",
            "--role=replica",
            "--datadir=/data",
            "--connstring=host=a"
        ]
    );
    assert!(warnings_without_dir(&loaded).is_empty());
    set(&mut v, "postgresql.wal_g.command", json!("wal-g 'open"));
    let e = load_value(&v).unwrap_err().to_string();
    assert!(
        e.starts_with("x.yml: postgresql.wal_g.command: `wal-g 'open`: unbalanced quotes"),
        "{e}"
    );
    set(&mut v, "postgresql.wal_g.command", json!(["wal-g"]));
    let e = load_value(&v).unwrap_err().to_string();
    assert!(e.starts_with("x.yml: postgresql.wal_g.command: "), "{e}");
    set(
        &mut v,
        "postgresql.wal_g",
        json!({"command": "wal-g", "keep_data": "maybe"}),
    );
    let e = load_value(&v).unwrap_err().to_string();
    assert!(
        e.starts_with("x.yml: postgresql.wal_g.keep_data: expected a boolean"),
        "{e}"
    );
    set(&mut v, "postgresql.wal_g.keep_data", json!(true));
    set(
        &mut v,
        "bootstrap.restore.recovery_conf",
        json!("restore_command=cp"),
    );
    let e = load_value(&v).unwrap_err().to_string();
    assert!(e.starts_with("x.yml: bootstrap.restore.recovery_conf: "), "{e}");
    set(&mut v, "bootstrap.restore.recovery_conf", json!({}));
    set(&mut v, "postgresql.wal_g", json!({"no_master": 1}));
    let e = load_value(&v).unwrap_err().to_string();
    assert_eq!(e, "x.yml: postgresql.wal_g.command: missing (required)");
}

#[test]
fn directory_is_merged_in_order_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = minimal();
    set(&mut base, "tags.dc", json!("east"));
    set(
        &mut base,
        "postgresql.parameters",
        json!({"work_mem": "4MB", "shared_buffers": "1GB"}),
    );
    write(dir.path(), "00-base.yml", serde_json::to_string(&base).unwrap());
    write(
        dir.path(),
        "10-node.yaml",
        "name: node2\ntags: {dc: null}\npostgresql: {parameters: {work_mem: 64MB}}\n",
    );
    write(dir.path(), "README.txt", "not: [yaml");
    std::fs::create_dir(dir.path().join("subdir.yml")).unwrap();
    let loaded = load(Some(dir.path()), &env(&[])).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(c.name, "node2");
    assert!(c.tags.other.is_empty());
    assert_eq!(c.postgresql.parameters["work_mem"], json!("64MB"));
    assert_eq!(c.postgresql.parameters["shared_buffers"], json!("1GB"));
    write(dir.path(), "20-bad.yml", "postgresql: {pg_ctl_timeout: soon}\n");
    let e = load(Some(dir.path()), &env(&[])).unwrap_err().to_string();
    let expected = format!(
        "{}/20-bad.yml: postgresql.pg_ctl_timeout: expected an integer",
        dir.path().display()
    );
    assert!(e.starts_with(&expected), "{e}");
    std::fs::remove_file(dir.path().join("20-bad.yml")).unwrap();
    std::fs::remove_file(dir.path().join("00-base.yml")).unwrap();
    let e = load(Some(dir.path()), &env(&[])).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: scope: missing (required)", dir.path().display())),
        "{e}"
    );
}

#[test]
fn missing_path_falls_back_to_patroni_configuration_then_environment() {
    let text = serde_json::to_string(&minimal()).unwrap();
    let missing = PathBuf::from("/nonexistent/pgvigil.yml");
    let loaded = load(
        Some(&missing),
        &env(&[("PATRONI_CONFIGURATION", &text), ("PATRONI_NAME", "node9")]),
    )
    .unwrap();
    assert_eq!(loaded.config.name, "node9");
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].starts_with("/nonexistent/pgvigil.yml: does not exist"));
    let e = load(None, &env(&[("PATRONI_CONFIGURATION", "scope: [")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("environment PATRONI_CONFIGURATION: line 1 column "),
        "{e}"
    );
    let e = load(None, &env(&[])).unwrap_err().to_string();
    assert_eq!(e, "environment: name: missing (required)");
}

#[test]
fn client_config_needs_only_a_few_sections() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "ctl.yml",
        "scope: demo\netcd3: {url: 'https://user:pw@etcd:2379'}\nrestapi: {authentication: {username: a, password: b}}\n",
    );
    let (c, w) = load_client(&p, &env(&[])).unwrap();
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(c.scope.as_deref(), Some("demo"));
    assert_eq!(c.namespace, "/service");
    assert_eq!(c.etcd3.hosts, ["etcd:2379"]);
    assert_eq!(
        (c.etcd3.protocol.as_str(), c.etcd3.username.as_deref()),
        ("https", Some("user"))
    );
    assert_eq!(c.authentication().unwrap().username, "a");
    let p = write(dir.path(), "empty.yml", "");
    let (c, _) = load_client(&p, &env(&[])).unwrap();
    assert!(c.scope.is_none() && c.etcd3.hosts.is_empty());
    let p = write(dir.path(), "bad.yml", "postgresql: {pg_ctl_timeout: soon}\n");
    let e = load_client(&p, &env(&[])).unwrap_err().to_string();
    assert!(
        e.contains("bad.yml: postgresql.pg_ctl_timeout: expected an integer"),
        "{e}"
    );
    let p = write(dir.path(), "v2.yml", "etcd: {host: x}\n");
    assert!(
        load_client(&p, &env(&[]))
            .unwrap_err()
            .to_string()
            .contains("rename `etcd:` to `etcd3:`")
    );
    let (_, w) = load_client(&dir.path().join("absent.yml"), &env(&[])).unwrap();
    assert!(w[0].contains("does not exist"), "{w:?}");
}

#[test]
fn secrets_are_redacted_in_debug_output() {
    let c = load_text(production_yaml()).unwrap().config;
    let dbg = format!("{:?}{:?}{:?}", c.restapi, c.etcd3, c.postgresql.authentication);
    for secret in ["S3cr3t!", "etcdpass", "supersecret", "replsecret", "rewindsecret"] {
        assert!(!dbg.contains(secret), "{secret} leaked");
    }
}

#[test]
fn warnings_for_wildcard_connect_addresses_and_tag_conflicts() {
    let mut v = minimal();
    set(&mut v, "restapi.listen", json!("0.0.0.0:8008"));
    set(&mut v, "postgresql.connect_address", json!("0.0.0.0:5432"));
    set(
        &mut v,
        "tags",
        json!({"nofailover": true, "failover_priority": 3}),
    );
    let w = warnings_without_dir(&load_value(&v).unwrap());
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(w[0].starts_with("x.yml: restapi.listen: the REST API address other members use is a wildcard"));
    assert!(w[1].starts_with("x.yml: postgresql.connect_address: is a wildcard address"));
    assert!(w[2].starts_with("x.yml: tags: conflicting nofailover: true and failover_priority: 3"));
}

/// Every legacy name Patroni 4 still reads is accepted, without a warning, and means what the new
/// name means (`docs/patroni-compat.md` §3.3, §3.5, §3.8). The REST `/master` check and the
/// `master` role in member keys are covered in the rest and api crates.
#[test]
fn every_legacy_name_patroni_4_reads_is_accepted() {
    let mut v = minimal();
    set(
        &mut v,
        "bootstrap",
        json!({
            "dcs": {
                "master_start_timeout": 0,
                "master_stop_timeout": 7,
                "permanent_replication_slots": {"old": {"type": "physical"}},
                "permanent_slots": {"older": {"type": "physical"}},
            },
            "post_bootstrap": "",
            "post_init": "/usr/local/bin/setup.sh",
        }),
    );
    let text = serde_json::to_string_pretty(&v).unwrap();
    let loaded = load_text_env(
        text,
        &[
            ("PATRONI_LOGLEVEL", "DEBUG"),
            ("PATRONI_LOGFORMAT", "%(message)s"),
            ("PATRONI_LOG_DATEFMT", "%H:%M"),
        ],
    )
    .unwrap();
    assert_eq!(warnings_without_dir(&loaded), Vec::<String>::new());
    let c = loaded.config;
    assert_eq!(
        c.bootstrap.post_bootstrap.as_deref(),
        Some(&["/usr/local/bin/setup.sh".to_string()][..])
    );
    assert_eq!(c.log.level, "DEBUG");
    assert_eq!(c.log.format, Some(json!("%(message)s")));
    assert_eq!(c.log.dateformat.as_deref(), Some("%H:%M"));
    let (d, w) = pgvigil_config::DynamicConfig::from_json(&c.bootstrap.dcs);
    assert!(w.is_empty(), "{w:?}");
    // `master_start_timeout: 0` is the fail-over-at-once setting, not "unset".
    assert_eq!((d.primary_start_timeout, d.primary_stop_timeout), (0, 7));
    // Patroni reads `permanent_replication_slots` before `permanent_slots` before `slots`.
    assert_eq!(d.permanent_slots.keys().collect::<Vec<_>>(), vec!["old"]);
}

/// Tags are published as written (`failover_priority: '1'` stays a string); a contradiction
/// keeps both tags, with a warning that says which one wins (`docs/patroni-compat.md` §3.7).
#[test]
fn tags_are_published_as_written_and_a_contradiction_keeps_both() {
    // YAML `failover_priority: '1'` is the JSON string "1".
    let mut v = minimal();
    set(
        &mut v,
        "tags",
        json!({"failover_priority": "1", "sync_priority": "2", "nosync": false, "dc": "east"}),
    );
    let loaded = load_value(&v).unwrap();
    assert_eq!(warnings_without_dir(&loaded), Vec::<String>::new());
    let c = loaded.config;
    assert_eq!(
        Value::Object(c.tags.to_published()),
        json!({"failover_priority": "1", "sync_priority": "2", "nosync": false, "dc": "east"})
    );
    assert_eq!((c.tags.failover_priority(), c.tags.sync_priority()), (1, 2));

    set(
        &mut v,
        "tags",
        json!({"nofailover": true, "failover_priority": "3"}),
    );
    let loaded = load_value(&v).unwrap();
    let w = warnings_without_dir(&loaded);
    assert_eq!(
        w,
        vec![
            "x.yml: tags: conflicting nofailover: true and failover_priority: 3; nofailover wins".to_string()
        ]
    );
    assert_eq!(
        Value::Object(loaded.config.tags.to_published()),
        json!({"nofailover": true, "failover_priority": "3"})
    );
    assert_eq!(loaded.config.tags.failover_priority(), 0);
}
