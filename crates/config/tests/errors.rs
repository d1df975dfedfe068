//! Configurations that must be refused, with an error naming the source, the key and the
//! problem; and hostile input that must never panic.

mod common;

use common::*;
use pgvigil_config::{ConfigError, load};
use serde_json::{Value, json};

/// Sets each `path` to `value` in the minimal configuration; the load must fail with an
/// error containing `expected`.
fn assert_each_refused(cases: Vec<(&str, Value, &str)>) {
    for (path, value, expected) in cases {
        let mut v = minimal();
        set(&mut v, path, value.clone());
        let e = load_value(&v).unwrap_err().to_string();
        assert!(e.contains(expected), "{path} = {value}: {e}");
    }
}

#[test]
fn missing_required_keys_are_named() {
    let cases = [
        ("name", "x.yml: name: missing (required)"),
        ("scope", "x.yml: scope: missing (required)"),
        ("restapi", "x.yml: restapi.listen: missing (required)"),
        ("restapi.listen", "x.yml: restapi.listen: missing (required)"),
        ("postgresql", "x.yml: postgresql.listen: missing (required)"),
        (
            "postgresql.listen",
            "x.yml: postgresql.listen: missing (required)",
        ),
        (
            "postgresql.connect_address",
            "x.yml: postgresql.connect_address: missing (required)",
        ),
        (
            "postgresql.data_dir",
            "x.yml: postgresql.data_dir: missing (required)",
        ),
        (
            "postgresql.authentication",
            "x.yml: postgresql.authentication.superuser.username: missing (required)",
        ),
        (
            "postgresql.authentication.superuser.username",
            "x.yml: postgresql.authentication.superuser.username: missing (required)",
        ),
        (
            "postgresql.authentication.replication.username",
            "x.yml: postgresql.authentication.replication.username: missing (required)",
        ),
        (
            "postgresql.authentication.replication",
            "x.yml: postgresql.authentication.replication.username: missing",
        ),
        (
            "etcd3",
            "x.yml: etcd3: missing (required): pgvigil needs an `etcd3:` section",
        ),
        ("etcd3.host", "x.yml: etcd3: no etcd endpoint"),
    ];
    for (remove, expected) in cases {
        let mut v = minimal();
        set(&mut v, remove, Value::Null);
        let e = load_value(&v).unwrap_err().to_string();
        assert!(e.starts_with(expected), "removing {remove}: {e}");
    }
    let mut v = minimal();
    set(&mut v, "name", json!("  "));
    assert_eq!(
        load_value(&v).unwrap_err().to_string(),
        "x.yml: name: must not be empty"
    );
}

#[test]
fn wrong_types_and_values_are_named() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "bootstrap.dcs.ttl",
            json!("abc"),
            "x.yml: bootstrap.dcs.ttl: expected an integer, found \"abc\"",
        ),
        (
            "bootstrap.dcs.synchronous_mode",
            json!("sometimes"),
            "x.yml: bootstrap.dcs.synchronous_mode: expected on, off or quorum",
        ),
        (
            "bootstrap.dcs.postgresql.use_slots",
            json!("maybe"),
            "x.yml: bootstrap.dcs.postgresql.use_slots: expected a boolean",
        ),
        (
            "bootstrap.dcs.synchronous_node_count",
            json!(0),
            "x.yml: bootstrap.dcs.synchronous_node_count: must be at least 1",
        ),
        (
            "bootstrap.dcs",
            json!([1]),
            "x.yml: bootstrap.dcs: expected a mapping, found a list",
        ),
        (
            "bootstrap.dcs.slots",
            json!({"Bad-Name": null}),
            "x.yml: bootstrap.dcs.slots.Bad-Name: not a valid slot name",
        ),
        (
            "bootstrap.dcs.slots",
            json!({"cdc": {"type": "logical", "database": "app"}}),
            "x.yml: bootstrap.dcs.slots.cdc: a logical slot needs both `database` and `plugin`",
        ),
        (
            "bootstrap.dcs.slots",
            json!({"cdc": {"type": "logcal"}}),
            "x.yml: bootstrap.dcs.slots.cdc: type: expected physical or logical, found \"logcal\"",
        ),
        (
            "bootstrap.dcs.ignore_slots",
            json!([{"name": "x", "plugn": "p"}]),
            "x.yml: bootstrap.dcs.ignore_slots[0]: unknown key \"plugn\"",
        ),
        (
            "bootstrap.dcs.ignore_slots",
            json!(["x"]),
            "x.yml: bootstrap.dcs.ignore_slots[0]: expected a mapping",
        ),
        (
            "restapi.allowlist_include_members",
            json!("maybe"),
            "x.yml: restapi.allowlist_include_members: expected a boolean",
        ),
        (
            "restapi.listen",
            json!("no-port"),
            "x.yml: restapi.listen: expected host:port, found \"no-port\"",
        ),
        (
            "restapi.verify_client",
            json!("sometimes"),
            "x.yml: restapi.verify_client: expected none, optional or required",
        ),
        (
            "restapi.request_queue_size",
            json!(5000),
            "x.yml: restapi.request_queue_size: must be at most 4096",
        ),
        (
            "restapi.authentication",
            json!({"username": "u"}),
            "x.yml: restapi.authentication.password: missing (required)",
        ),
        ("restapi", json!(5), "x.yml: restapi: expected a mapping, found 5"),
        (
            "postgresql.pg_ctl_timeout",
            json!(-1),
            "x.yml: postgresql.pg_ctl_timeout: must be at least 0, found -1",
        ),
        (
            "postgresql.listen",
            json!("host:port"),
            "x.yml: postgresql.listen: expected host[,host...][:port]",
        ),
        (
            "postgresql.parameters",
            json!({"work_mem": {"a": 1}}),
            "x.yml: postgresql.parameters.work_mem: expected a parameter value",
        ),
        (
            "postgresql.pg_hba",
            json!(["ok", ["nested"]]),
            "x.yml: postgresql.pg_hba[1]: expected a string, found a list",
        ),
        (
            "postgresql.authentication.superuser.username",
            json!(true),
            "quote the value",
        ),
        (
            "tags.failover_priority",
            json!(-1),
            "x.yml: tags.failover_priority: must be at least 0",
        ),
        (
            "tags.nofailover",
            json!("perhaps"),
            "x.yml: tags.nofailover: expected a boolean",
        ),
        (
            "watchdog.safety_margin",
            json!(-2),
            "x.yml: watchdog.safety_margin: must be at least -1",
        ),
        (
            "watchdog.mode",
            json!([]),
            "x.yml: watchdog.mode: expected off, automatic or required",
        ),
        (
            "log.level",
            json!("LOUD"),
            "x.yml: log.level: expected one of DEBUG, INFO",
        ),
        (
            "log.type",
            json!("xml"),
            "x.yml: log.type: expected one of plain, json",
        ),
        (
            "log.mode",
            json!("0999"),
            "x.yml: log.mode: expected file permissions",
        ),
        (
            "etcd3.protocol",
            json!("ftp"),
            "x.yml: etcd3.protocol: expected http or https",
        ),
        (
            "etcd3.host",
            json!("etcd:port"),
            "x.yml: etcd3.host: invalid port `port`",
        ),
        (
            "etcd3.hosts",
            json!(["a:1", true]),
            "x.yml: etcd3.hosts[1]: expected host:port, found boolean true",
        ),
        (
            "bootstrap.post_bootstrap",
            json!("/usr/local/bin/setup.sh 'unclosed"),
            "x.yml: bootstrap.post_bootstrap: cannot split",
        ),
        (
            "thread_pool_size",
            json!(2),
            "x.yml: thread_pool_size: must be at least 5",
        ),
        (
            "name",
            json!("__patroni_strict_sync_replica_placeholder__"),
            "x.yml: name: `__patroni_strict_sync_replica_placeholder__` is reserved",
        ),
    ];
    assert_each_refused(cases);
}

#[test]
fn callback_commands_are_strings_that_split_into_words() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "postgresql.callbacks.on_start",
            json!(5),
            "x.yml: postgresql.callbacks.on_start: expected a command (a string), found 5",
        ),
        (
            "postgresql.callbacks.on_role_change",
            json!(["/bin/cb", "x"]),
            "x.yml: postgresql.callbacks.on_role_change: expected a command (a string), found a list",
        ),
        (
            "postgresql.callbacks.on_stop",
            json!("  "),
            "x.yml: postgresql.callbacks.on_stop: empty command",
        ),
        (
            "postgresql.callbacks",
            json!("/bin/cb"),
            "x.yml: postgresql.callbacks: expected a mapping",
        ),
        (
            "postgresql.pre_promote",
            json!("/bin/fence 'unclosed"),
            "x.yml: postgresql.pre_promote: cannot split \"/bin/fence 'unclosed\" into words",
        ),
        (
            "postgresql.before_stop",
            json!(true),
            "x.yml: postgresql.before_stop: expected a command (a string), found boolean true",
        ),
    ];
    assert_each_refused(cases);

    // Split like Patroni's shlex.split; an empty pre_promote/before_stop is unset, as there.
    let mut v = minimal();
    set(&mut v, "postgresql.callbacks.on_start", json!("/bin/cb 'a b' c"));
    set(&mut v, "postgresql.pre_promote", json!(""));
    set(&mut v, "postgresql.before_stop", json!("/bin/stop --now"));
    let pg = load_value(&v).unwrap().config.postgresql;
    assert_eq!(pg.callbacks["on_start"], ["/bin/cb", "a b", "c"]);
    assert_eq!(pg.pre_promote, None);
    assert_eq!(
        pg.before_stop.as_deref(),
        Some(&["/bin/stop".to_string(), "--now".to_string()][..])
    );
}

#[test]
fn only_etcd3_is_supported() {
    let mut v = minimal();
    set(&mut v, "etcd3", Value::Null);
    set(&mut v, "etcd", json!({"host": "127.0.0.1:2379"}));
    let e = load_value(&v).unwrap_err().to_string();
    assert!(
        e.starts_with("x.yml: etcd: pgvigil only supports the etcd v3 API: rename `etcd:` to `etcd3:`"),
        "{e}"
    );
    for dcs in ["consul", "zookeeper", "kubernetes", "raft", "exhibitor"] {
        let mut v = minimal();
        set(&mut v, "etcd3", Value::Null);
        set(&mut v, dcs, json!({"hosts": ["x"]}));
        let e = load_value(&v).unwrap_err().to_string();
        assert!(e.contains(&format!("`{dcs}` is not supported")), "{e}");
    }
    let mut v = minimal();
    set(&mut v, "consul", json!({"host": "x"}));
    let loaded = load_value(&v).unwrap();
    assert!(
        loaded.warnings[0].contains("consul: pgvigil only supports etcd v3"),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn forbidden_tool_options_are_errors() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "bootstrap.initdb",
            json!(["data-checksums", {"pgdata": "/x"}]),
            "x.yml: bootstrap.initdb[1]: option `pgdata` is not allowed",
        ),
        (
            "bootstrap.initdb",
            json!(["nosync"]),
            "option `nosync` is not allowed",
        ),
        (
            "bootstrap.initdb",
            json!([{"pwfile": "/x"}]),
            "option `pwfile` is not allowed",
        ),
        (
            "bootstrap.initdb",
            json!(["sync-only"]),
            "option `sync-only` is not allowed",
        ),
        (
            "bootstrap.initdb",
            json!(["version"]),
            "option `version` is not allowed",
        ),
        (
            "postgresql.basebackup",
            json!([{"host": "x"}]),
            "x.yml: postgresql.basebackup[0]: option `host` is not allowed",
        ),
        (
            "postgresql.basebackup",
            json!(["gzip"]),
            "option `gzip` is not allowed",
        ),
        (
            "postgresql.basebackup",
            json!({"wal-method": "fetch"}),
            "option `wal-method` is not allowed",
        ),
        (
            "postgresql.basebackup",
            json!([{"compress": "gzip:9"}]),
            "only server-side compression is allowed",
        ),
        (
            "postgresql.rewind",
            json!([{"target-pgdata": "/x"}]),
            "option `target-pgdata` is not allowed",
        ),
    ];
    assert_each_refused(cases);
    let mut v = minimal();
    set(
        &mut v,
        "postgresql.basebackup",
        json!([{"compress": "server-zstd"}, "progress"]),
    );
    let c = load_value(&v).unwrap().config;
    assert_eq!(
        c.postgresql.basebackup_args(16),
        ["--compress=server-zstd", "--progress"]
    );
    assert_eq!(c.postgresql.basebackup_args(14), ["--progress"]);
}

#[test]
fn hostile_documents_never_panic() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"- a\n- b\n".to_vec(),
            "x.yml: the configuration must be a YAML mapping (key: value ...), found a list",
        ),
        (b"just a string".to_vec(), "found \"just a string\""),
        (b"".to_vec(), "x.yml: name: missing (required)"),
        (b"# only a comment\n".to_vec(), "x.yml: name: missing (required)"),
        (
            b"\xff\xfe\x00\x01binary\x00junk".to_vec(),
            "x.yml: line 1 column 1: YAML syntax error: the file is not UTF-8 text",
        ),
        (
            b"name: [unclosed\n".to_vec(),
            "x.yml: line 1 column 7: YAML syntax error: unclosed bracket",
        ),
        (b"a: 1\n---\nb: 2\n".to_vec(), "YAML syntax error"),
        (b"a:\n\t- tab\n".to_vec(), "YAML syntax error"),
        (
            format!("a: {}", "[".repeat(100_000)).into_bytes(),
            "YAML syntax error",
        ),
        (b"name: &a [*a]".to_vec(), "YAML syntax error"),
        (b"? [complex, key]\n: v\n".to_vec(), "YAML syntax error"),
        (
            b"name: 1e999\nscope: 123456789012345678901234567890\n".to_vec(),
            "",
        ),
        (
            b"restapi: ~\npostgresql: ~\ntags: ~\nname: node\nscope: s\n".to_vec(),
            "x.yml: etcd3: missing",
        ),
        // Unlike PyYAML, YAML 1.1 also reads a bare y/n as a boolean: the error says to quote it.
        (
            b"name: n\n".to_vec(),
            "x.yml: name: expected a string, found boolean false (YAML reads unquoted",
        ),
    ];
    for (text, expected) in cases {
        let r = load_text(&text);
        let e = r.expect_err("must fail").to_string();
        assert!(
            e.contains(expected),
            "{:?}: {e}",
            String::from_utf8_lossy(&text[..text.len().min(40)])
        );
    }
}

/// Replaces every node of the production configuration with junk of every type, one at a time:
/// loading may fail, but must never panic.
#[test]
fn mutated_production_config_never_panics() {
    let loaded = load_text(production_yaml()).unwrap();
    let base = loaded.config.raw.clone();
    let mut paths = Vec::new();
    collect_paths(&base, String::new(), &mut paths);
    let junk = [
        json!(null),
        json!(true),
        json!(-1),
        json!(1.5),
        json!(""),
        json!("x:y"),
        json!([]),
        json!({}),
        json!([{}]),
        json!(u64::MAX),
    ];
    for path in &paths {
        for j in &junk {
            let mut v = base.clone();
            if let Some(slot) = v.pointer_mut(path) {
                *slot = j.clone();
            }
            let text = serde_json::to_string(&v).unwrap();
            let _ = load(None, &env(&[("PATRONI_CONFIGURATION", &text)]));
        }
    }
    assert!(paths.len() > 100, "{}", paths.len());
}

fn collect_paths(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => m.iter().for_each(|(k, v)| {
            collect_paths(
                v,
                format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                out,
            )
        }),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| collect_paths(v, format!("{at}/{i}"), out)),
        _ => {}
    }
}

#[test]
fn syntax_error_and_duplicate_keys() {
    let e = load_text("scope: a\nname: b\nrestapi:\n  listen: [\n").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("x.yml: line 4 column 11: YAML syntax error: "),
        "{e}"
    );
    let mut text = serde_json::to_string_pretty(&minimal()).unwrap();
    text.insert_str(1, "\n\"scope\": \"first\",");
    let loaded = load_text(&text).unwrap();
    assert_eq!(loaded.config.scope, "demo");
    assert!(
        loaded.warnings[0].contains("duplicate key `scope`; the last value wins"),
        "{:?}",
        loaded.warnings
    );
}

/// A `standby_cluster` section in `bootstrap.dcs` is checked with Patroni's validator's types;
/// a bad value stops the start, naming the key.
#[test]
fn a_bad_standby_cluster_in_bootstrap_dcs_is_refused() {
    assert_each_refused(vec![
        (
            "bootstrap.dcs.standby_cluster",
            json!({"host": "10.0.0.9", "port": 70000}),
            "x.yml: bootstrap.dcs.standby_cluster.port: expected a port number, found 70000",
        ),
        (
            "bootstrap.dcs.standby_cluster",
            json!({"host": "10.0.0.9", "port": "fivefourthreetwo"}),
            "x.yml: bootstrap.dcs.standby_cluster.port: expected an integer",
        ),
        (
            "bootstrap.dcs.standby_cluster",
            json!({"port": 5433}),
            "x.yml: bootstrap.dcs.standby_cluster.host: the remote primary's host is required with port",
        ),
        (
            "bootstrap.dcs.standby_cluster",
            json!({"host": "10.0.0.9", "create_replica_methods": {"basebackup": true}}),
            "x.yml: bootstrap.dcs.standby_cluster.create_replica_methods",
        ),
    ]);
}

/// A valid section is accepted as a Patroni user writes it (issue 12 item 8).
#[test]
fn a_standby_cluster_in_bootstrap_dcs_is_accepted() {
    let mut v = minimal();
    let section = json!({"host": "10.0.0.9", "port": 5433, "primary_slot_name": "dr",
        "create_replica_methods": ["basebackup"], "restore_command": "cp /a/%f %p",
        "archive_cleanup_command": "true", "recovery_min_apply_delay": "5min"});
    set(&mut v, "bootstrap.dcs.standby_cluster", section);
    let loaded = load_value(&v).expect("a standby cluster is accepted");
    let (d, w) = pgvigil_config::DynamicConfig::from_json(&loaded.config.bootstrap.dcs);
    assert!(w.is_empty(), "{w:?}");
    let sc = d.standby_cluster.expect("active");
    assert_eq!(sc.remote(), Some(("10.0.0.9".to_string(), 5433)));
    assert_eq!(sc.primary_slot_name.as_deref(), Some("dr"));
    assert_eq!(sc.recovery_min_apply_delay.as_deref(), Some("5min"));
}
