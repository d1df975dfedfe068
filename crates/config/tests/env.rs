//! `PATRONI_*` environment overrides (`docs/patroni-compat.md` §3.8).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use pgvigil_config::{Config, load};
use serde_json::json;

fn with_env(vars: &[(&str, &str)]) -> Config {
    let text = serde_json::to_string(&minimal()).unwrap();
    let loaded = load_text_env(text, vars).unwrap();
    assert!(loaded.warnings.is_empty(), "{vars:?}: {:?}", loaded.warnings);
    loaded.config
}

#[test]
fn each_variable_lands_on_its_key() {
    type Check = fn(&Config) -> bool;
    let cases: Vec<(&str, &str, Check)> = vec![
        ("PATRONI_NAME", "node7", |c| c.name == "node7"),
        ("PATRONI_SCOPE", "other", |c| c.scope == "other"),
        ("PATRONI_NAMESPACE", "/ns", |c| c.namespace == "/ns"),
        ("PATRONI_THREAD_POOL_SIZE", "8", |c| c.thread_pool_size == 8),
        ("PATRONI_RESTAPI_LISTEN", "127.0.0.2:9008", |c| {
            c.restapi.connect_address == "127.0.0.2:9008"
        }),
        ("PATRONI_RESTAPI_CONNECT_ADDRESS", "10.0.0.1:9008", |c| {
            c.restapi.connect_address == "10.0.0.1:9008"
        }),
        ("PATRONI_RESTAPI_CERTFILE", "/c.pem", |c| {
            c.restapi.certfile == Some(PathBuf::from("/c.pem"))
        }),
        ("PATRONI_RESTAPI_KEYFILE", "/k.pem", |c| {
            c.restapi.keyfile == Some(PathBuf::from("/k.pem"))
        }),
        ("PATRONI_RESTAPI_KEYFILE_PASSWORD", "kp", |c| {
            c.restapi.keyfile_password.as_deref() == Some("kp")
        }),
        ("PATRONI_RESTAPI_CAFILE", "/ca.pem", |c| {
            c.ctl.cacert == Some(PathBuf::from("/ca.pem"))
        }),
        ("PATRONI_RESTAPI_CIPHERS", "HIGH", |c| {
            c.restapi.ciphers.as_deref() == Some("HIGH")
        }),
        ("PATRONI_RESTAPI_VERIFY_CLIENT", "required", |c| {
            c.restapi.verify_client == pgvigil_config::VerifyClient::Required
        }),
        ("PATRONI_RESTAPI_ALLOWLIST", "10.0.0.0/8,192.168.1.1", |c| {
            c.restapi.allowlist == ["10.0.0.0/8", "192.168.1.1"]
        }),
        ("PATRONI_RESTAPI_ALLOWLIST", "[10.0.0.0/8, host.example]", |c| {
            c.restapi.allowlist == ["10.0.0.0/8", "host.example"]
        }),
        ("PATRONI_RESTAPI_ALLOWLIST_INCLUDE_MEMBERS", "on", |c| {
            c.restapi.allowlist_include_members
        }),
        ("PATRONI_RESTAPI_HTTP_EXTRA_HEADERS", "X-A: 1, X-B: two", |c| {
            c.restapi.http_extra_headers.get("X-A").map(String::as_str) == Some("1")
                && c.restapi.http_extra_headers.get("X-B").map(String::as_str) == Some("two")
        }),
        (
            "PATRONI_RESTAPI_HTTPS_EXTRA_HEADERS",
            "{Strict-Transport-Security: max-age=31536000}",
            |c| {
                c.restapi
                    .https_extra_headers
                    .contains_key("Strict-Transport-Security")
            },
        ),
        ("PATRONI_RESTAPI_REQUEST_QUEUE_SIZE", "64", |c| {
            c.restapi.request_queue_size == 64
        }),
        ("PATRONI_RESTAPI_SERVER_TOKENS", "Minimal", |c| {
            c.restapi.server_tokens == "minimal"
        }),
        ("PATRONI_CTL_INSECURE", "true", |c| c.ctl.insecure),
        ("PATRONI_CTL_CACERT", "/ctl-ca.pem", |c| {
            c.ctl.cacert == Some(PathBuf::from("/ctl-ca.pem"))
        }),
        ("PATRONI_CTL_CERTFILE", "/ctl.pem", |c| {
            c.ctl.certfile == Some(PathBuf::from("/ctl.pem"))
        }),
        ("PATRONI_CTL_KEYFILE", "/ctl.key", |c| {
            c.ctl.keyfile == Some(PathBuf::from("/ctl.key"))
        }),
        ("PATRONI_POSTGRESQL_LISTEN", "0.0.0.0:6432", |c| {
            c.postgresql.listen_addresses_and_port().1 == 6432
        }),
        ("PATRONI_POSTGRESQL_CONNECT_ADDRESS", "10.1.1.1:6432", |c| {
            c.postgresql.connect_address == "10.1.1.1:6432"
        }),
        ("PATRONI_POSTGRESQL_PROXY_ADDRESS", "10.1.1.1:6433", |c| {
            c.postgresql.proxy_address.as_deref() == Some("10.1.1.1:6433")
        }),
        ("PATRONI_POSTGRESQL_CONFIG_DIR", "/etc/pg", |c| {
            c.postgresql.config_dir == Some(PathBuf::from("/etc/pg"))
        }),
        ("PATRONI_POSTGRESQL_DATA_DIR", "/data", |c| {
            c.postgresql.data_dir == Path::new("/data")
        }),
        ("PATRONI_POSTGRESQL_PGPASS", "/tmp/pgpass", |c| {
            c.postgresql.pgpass == Path::new("/tmp/pgpass")
        }),
        ("PATRONI_POSTGRESQL_BIN_DIR", "/usr/lib/postgresql/15/bin", |c| {
            c.postgresql.bin_dir.is_some()
        }),
        ("PATRONI_POSTGRESQL_BIN_PG_CTL", "pg_ctl15", |c| {
            c.postgresql.bin_name["pg_ctl"] == "pg_ctl15"
        }),
        ("PATRONI_SUPERUSER_USERNAME", "admin", |c| {
            c.postgresql.authentication.superuser.username == "admin"
        }),
        ("PATRONI_SUPERUSER_PASSWORD", "pw", |c| {
            c.postgresql.authentication.superuser.password.as_deref() == Some("pw")
        }),
        ("PATRONI_REPLICATION_SSLMODE", "require", |c| {
            c.postgresql.authentication.replication.sslmode.as_deref() == Some("require")
        }),
        ("PATRONI_REPLICATION_CHANNEL_BINDING", "require", |c| {
            c.postgresql.authentication.replication.channel_binding.as_deref() == Some("require")
        }),
        ("PATRONI_REWIND_USERNAME", "rewinder", |c| {
            c.postgresql.authentication.rewind_or_superuser().username == "rewinder"
        }),
        ("PATRONI_ETCD3_HOST", "etcd9:2380", |c| {
            c.etcd3.hosts == ["etcd9:2380"]
        }),
        ("PATRONI_ETCD3_HOSTS", "e1:2379,e2", |c| {
            c.etcd3.hosts == ["e1:2379", "e2:2379"]
        }),
        ("PATRONI_ETCD3_HOSTS", "['e1:2379', 'e2:2379']", |c| {
            c.etcd3.hosts == ["e1:2379", "e2:2379"]
        }),
        ("PATRONI_ETCD3_HOSTS", "[::1]:2379,[::2]:2379", |c| {
            c.etcd3.hosts == ["[::1]:2379", "[::2]:2379"]
        }),
        ("PATRONI_ETCD3_URL", "https://etcd.example:2379", |c| {
            c.etcd3.hosts == ["etcd.example:2379"] && c.etcd3.protocol == "https"
        }),
        ("PATRONI_ETCD3_PROTOCOL", "https", |c| c.etcd3.protocol == "https"),
        ("PATRONI_ETCD3_USERNAME", "eu", |c| {
            c.etcd3.username.as_deref() == Some("eu")
        }),
        ("PATRONI_ETCD3_PASSWORD", "ep", |c| {
            c.etcd3.password.as_deref() == Some("ep")
        }),
        ("PATRONI_ETCD3_CACERT", "/e-ca.pem", |c| c.etcd3.cacert.is_some()),
        ("PATRONI_ETCD3_CERT", "/e.pem", |c| c.etcd3.cert.is_some()),
        ("PATRONI_ETCD3_KEY", "/e.key", |c| c.etcd3.key.is_some()),
        ("PATRONI_LOG_LEVEL", "DEBUG", |c| c.log.level == "DEBUG"),
        ("PATRONI_LOGLEVEL", "WARNING", |c| c.log.level == "WARNING"),
        ("PATRONI_LOG_TYPE", "json", |c| c.log.type_ == "json"),
        ("PATRONI_LOG_DIR", "/var/log/pgvigil", |c| c.log.dir.is_some()),
        ("PATRONI_LOG_FILE_NUM", "9", |c| c.log.file_num == 9),
        ("PATRONI_LOG_MODE", "0600", |c| c.log.mode == Some(0o600)),
        ("PATRONI_LOG_FORMAT", "%(asctime)s %(message)s", |c| {
            c.log.format == Some(json!("%(asctime)s %(message)s"))
        }),
        ("PATRONI_LOG_FORMAT", "message,levelname", |c| {
            c.log.format == Some(json!(["message", "levelname"]))
        }),
        ("PATRONI_LOG_LOGGERS", "pgvigil.dcs: DEBUG", |c| {
            c.log.loggers["pgvigil.dcs"] == "DEBUG"
        }),
        ("PATRONI_LOG_DEDUPLICATE_HEARTBEAT_LOGS", "yes", |c| {
            c.log.deduplicate_heartbeat_logs
        }),
        ("PATRONI_SCOPE", "", |c| c.scope == "demo"),
    ];
    for (var, value, check) in cases {
        let c = with_env(&[(var, value)]);
        assert!(check(&c), "{var}={value}: {c:#?}");
    }
}

#[test]
fn bad_values_name_the_variable() {
    let cases = [
        (
            "PATRONI_CTL_INSECURE",
            "maybe",
            "environment PATRONI_CTL_INSECURE: ctl.insecure: expected a boolean",
        ),
        (
            "PATRONI_RESTAPI_REQUEST_QUEUE_SIZE",
            "lots",
            "environment PATRONI_RESTAPI_REQUEST_QUEUE_SIZE: restapi.request_queue_size: expected an integer, found \"lots\"",
        ),
        (
            "PATRONI_RESTAPI_LISTEN",
            "nowhere",
            "environment PATRONI_RESTAPI_LISTEN: restapi.listen: expected host:port",
        ),
        (
            "PATRONI_RESTAPI_HTTP_EXTRA_HEADERS",
            "{a: [",
            "environment PATRONI_RESTAPI_HTTP_EXTRA_HEADERS: restapi.http_extra_headers: expected a mapping",
        ),
        (
            "PATRONI_ETCD3_HOSTS",
            "- a\n b: [",
            "environment PATRONI_ETCD3_HOSTS: etcd3.hosts: expected a list",
        ),
        (
            "PATRONI_ETCD3_HOSTS",
            "e1:99999",
            "environment PATRONI_ETCD3_HOSTS: etcd3.hosts[0]: invalid port `99999`",
        ),
        (
            "PATRONI_ETCD3_PORT",
            "x",
            "environment PATRONI_ETCD3_PORT: etcd3.port: expected an integer",
        ),
        (
            "PATRONI_LOG_LEVEL",
            "chatty",
            "environment PATRONI_LOG_LEVEL: log.level: expected one of",
        ),
    ];
    for (var, value, expected) in cases {
        let text = serde_json::to_string(&minimal()).unwrap();
        let e = load_text_env(text, &[(var, value)]).unwrap_err().to_string();
        assert!(e.starts_with(expected), "{var}={value}: {e}");
    }
}

#[test]
fn environment_only_configuration() {
    let vars = [
        ("PATRONI_NAME", "n1"),
        ("PATRONI_SCOPE", "s"),
        ("PATRONI_RESTAPI_LISTEN", "127.0.0.1:8008"),
        ("PATRONI_RESTAPI_USERNAME", "admin"),
        ("PATRONI_RESTAPI_PASSWORD", "secret"),
        ("PATRONI_ETCD3_HOSTS", "127.0.0.1:2379"),
        ("PATRONI_POSTGRESQL_LISTEN", "127.0.0.1:5432"),
        ("PATRONI_POSTGRESQL_CONNECT_ADDRESS", "127.0.0.1:5432"),
        ("PATRONI_POSTGRESQL_DATA_DIR", "/tmp/pg"),
        ("PATRONI_SUPERUSER_USERNAME", "postgres"),
        ("PATRONI_REPLICATION_USERNAME", "replicator"),
        ("PATRONI_REPLICATION_PASSWORD", "rep"),
        ("PATRONI_BOGUS", "1"),
        ("PATH", "/usr/bin"),
    ];
    let loaded = load(None, &env(&vars)).unwrap();
    assert_eq!(
        loaded.warnings,
        ["environment PATRONI_BOGUS: not a recognized variable; ignored"]
    );
    let c = loaded.config;
    assert_eq!(c.restapi.authentication.as_ref().unwrap().password, "secret");
    assert_eq!(c.ctl.authentication, c.restapi.authentication);
    assert_eq!(c.etcd3.hosts, ["127.0.0.1:2379"]);
    let e = load(None, &env(&vars[..3])).unwrap_err().to_string();
    assert!(e.starts_with("environment: etcd3: missing (required)"), "{e}");
    let e = load(None, &env(&[("PATRONI_ETCD_HOSTS", "a,b")]))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("environment: name: missing"), "{e}");
}

#[test]
fn generic_dcs_variables_create_their_sections() {
    let text = serde_json::to_string(&minimal()).unwrap();
    let loaded = load_text_env(&text, &[("PATRONI_CONSUL_HOST", "consul:8500")]).unwrap();
    let w = warnings_without_dir(&loaded);
    assert!(
        w[0].starts_with("environment PATRONI_CONSUL_HOST: consul: pgvigil only supports etcd v3"),
        "{w:?}"
    );
    let mut v = minimal();
    set(&mut v, "etcd3", serde_json::Value::Null);
    let text = serde_json::to_string(&v).unwrap();
    let e = load_text_env(&text, &[("PATRONI_ETCD_HOSTS", "e1:2379")])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("environment PATRONI_ETCD_HOSTS: etcd: pgvigil only supports the etcd v3 API"),
        "{e}"
    );
}

#[test]
fn environment_overrides_file_and_patroni_configuration() {
    let mut v = minimal();
    set(&mut v, "restapi.http_extra_headers", json!({"X-File": "1"}));
    let text = serde_json::to_string(&v).unwrap();
    let c = load_text_env(
        &text,
        &[
            ("PATRONI_RESTAPI_HTTP_EXTRA_HEADERS", "X-Env: 2"),
            ("PATRONI_NAME", "env-name"),
        ],
    )
    .unwrap()
    .config;
    assert_eq!(c.name, "env-name");
    assert_eq!(
        c.restapi.http_extra_headers.len(),
        2,
        "mappings merge like Patroni's patch_config"
    );
    let c = load(
        None,
        &env(&[("PATRONI_CONFIGURATION", &text), ("PATRONI_SCOPE", "from-env")]),
    )
    .unwrap()
    .config;
    assert_eq!(c.scope, "from-env");
}
