//! TLS everywhere, configured as a Patroni user writes it (issue 12, item 1): etcd over HTTPS
//! with client certificates, REST over HTTPS with `verify_client: required`, PostgreSQL 15
//! accepting only `hostssl ... clientcert=verify-ca`, and the real `patronictl` 4.1.5 reading
//! the same file. Plus bad TLS files refused before anything starts.

mod operator_support;

use std::process::Command;
use std::time::Duration;

use operator_support::{AGENT, HEALTHY, patronictl, pgvigilctl};
use pgvigil_testkit::cluster::{ClusterOptions, TestCluster, psql_with};
use pgvigil_testkit::{free_port, http, spawn_owned, wait_until};

#[test]
fn tls_cluster_replicates_switches_over_and_patronictl_works() {
    let options = ClusterOptions {
        nodes: 2,
        tls: true,
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    let replica = 1 - leader;
    let pki = cluster.pki.as_ref().expect("TLS cluster");

    // The agent's own connection (verify-full, client certificate) and the replica's
    // walreceiver (primary_conninfo with the replication role's keys) both use TLS with the
    // configured client certificates: pg_hba accepts nothing else.
    let heartbeat = cluster
        .psql(
            leader,
            "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'Patroni heartbeat'",
        )
        .unwrap();
    assert!(
        heartbeat.starts_with("t|") && heartbeat.contains("CN=postgres"),
        "{heartbeat}"
    );
    let walsender = cluster
        .psql(
            leader,
            "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid)",
        )
        .unwrap();
    assert!(
        walsender.starts_with("t|") && walsender.contains("CN=replicator"),
        "{walsender}"
    );
    cluster
        .psql(
            leader,
            "CREATE TABLE tls_probe (id int); INSERT INTO tls_probe VALUES (42)",
        )
        .unwrap();
    wait_until("the row to reach the replica", Duration::from_secs(30), || {
        (cluster.psql(replica, "SELECT id FROM tls_probe").ok()? == "42").then_some(())
    })
    .unwrap();

    // The member keys advertise https API URLs.
    let doc = cluster
        .cluster_doc()
        .expect("GET /cluster over HTTPS with a client certificate");
    for m in doc["members"].as_array().unwrap() {
        assert!(
            m["api_url"].as_str().unwrap().starts_with("https://127.0.0.1:"),
            "{m}"
        );
    }

    // verify_client: required: a client without certificate gets no answer at all.
    let no_cert = pgvigil_tls::client_config(&pgvigil_tls::ClientSettings {
        ca: Some(pgvigil_tls::ConfFile::new("ca", &pki.ca)),
        ..Default::default()
    })
    .unwrap();
    http::use_tls(Some(no_cert));
    assert!(http::get(cluster.nodes[leader].api_port, "/patroni").is_err());
    http::use_tls(Some(pki.client_config().unwrap()));
    http::use_tls(None);
    assert!(
        http::get(cluster.nodes[leader].api_port, "/patroni").is_err(),
        "plain HTTP must not be served"
    );
    http::use_tls(Some(pki.client_config().unwrap()));

    // HAProxy's health checks over HTTPS with a client certificate, as haproxy-config writes
    // them: port "5000" reaches only the leader, "5001" only the replica. (Without --check-crt
    // every check is refused by verify_client: required and nothing is reachable.)
    let haproxy = Haproxy::start(&cluster, pki);
    let via = |port: u16| {
        psql_with(port, "SELECT inet_server_port()", &pki.libpq_env())
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
    };
    wait_until(
        "HAProxy's TLS health checks to settle",
        Duration::from_secs(60),
        || {
            (0..6)
                .all(|_| {
                    via(haproxy.primary) == Some(cluster.nodes[leader].pg_port)
                        && via(haproxy.replicas) == Some(cluster.nodes[replica].pg_port)
                })
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", haproxy.log_tail(), cluster.diagnostics()));
    drop(haproxy);

    // The real patronictl, with the node's own file (etcd3 and ctl sections over TLS).
    let list = patronictl(&cluster, 0, &["list"], None, Duration::from_secs(60)).expect_ok("patronictl list");
    for n in &cluster.nodes {
        assert!(list.stdout.contains(&n.name), "{list}");
    }
    assert!(
        list.stdout.contains("Leader") && list.stdout.contains("streaming"),
        "{list}"
    );
    pgvigilctl(&cluster, 0, &["list"], None, Duration::from_secs(60)).expect_ok("pgvigilctl list");

    // A switchover through patronictl goes over the leader's HTTPS API with ctl's client
    // certificate; the leader checks the candidate over HTTPS too.
    let candidate = cluster.nodes[replica].name.clone();
    let old = cluster.nodes[leader].name.clone();
    patronictl(
        &cluster,
        0,
        &[
            "switchover",
            "--leader",
            &old,
            "--candidate",
            &candidate,
            "--force",
        ],
        None,
        Duration::from_secs(120),
    )
    .expect_ok("patronictl switchover");
    let new_leader = cluster
        .wait_healthy(HEALTHY)
        .expect("healthy after the switchover");
    assert_eq!(new_leader, replica, "{}", cluster.diagnostics());
}

/// etcd user/password authentication on top of TLS with client certificates. The agent
/// (native gRPC) sends its token; without it etcd would take the certificate's common name as
/// the user, which does not exist. (patronictl cannot be used here: etcd refuses requests that
/// carry a client certificate with a common name through its JSON gateway, which patronictl
/// uses, once authentication is on; `pgvigilctl` talks gRPC.)
#[test]
fn etcd_password_authentication_over_tls() {
    let options = ClusterOptions {
        nodes: 1,
        tls: true,
        etcd_password: Some("etcd-root-secret".into()),
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    let list = pgvigilctl(&cluster, 0, &["list"], None, Duration::from_secs(60)).expect_ok("pgvigilctl list");
    assert!(
        list.stdout.contains("node1") && list.stdout.contains("Leader"),
        "{list}"
    );
    // Without the password, the same configuration is refused by etcd.
    let config = std::fs::read_to_string(&cluster.nodes[0].config).unwrap();
    let without = cluster.root().join("no-password.yml");
    std::fs::write(
        &without,
        config.replace("  username: root\n  password: 'etcd-root-secret'\n", ""),
    )
    .unwrap();
    let mut cmd = Command::new(operator_support::pgvigilctl_bin());
    cmd.arg("-c").arg(&without).arg("list");
    let refused = operator_support::run(cmd, None, Duration::from_secs(60));
    assert!(!refused.ok() && refused.stderr.contains("etcd"), "{refused}");
}

#[test]
fn use_unix_socket_puts_the_agents_connection_on_the_socket() {
    let options = ClusterOptions {
        nodes: 1,
        use_unix_socket: true,
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    // A Unix-socket backend has no client address.
    let heartbeat = cluster
        .psql(
            leader,
            "SELECT client_addr IS NULL, client_port FROM pg_stat_activity \
             WHERE application_name = 'Patroni heartbeat'",
        )
        .unwrap();
    assert_eq!(heartbeat, "t|-1", "{}", cluster.diagnostics());
}

/// The real HAProxy with `pgvigilctl haproxy-config --check-crt --check-ca`.
struct Haproxy {
    child: std::process::Child,
    log: std::path::PathBuf,
    primary: u16,
    replicas: u16,
}

impl Haproxy {
    fn start(cluster: &TestCluster, pki: &pgvigil_testkit::cluster::ClusterPki) -> Haproxy {
        let (primary, replicas, stats) = (free_port(), free_port(), free_port());
        let dir = cluster.root();
        let pem = dir.join("haproxy-client.pem");
        let both = std::fs::read_to_string(&pki.nodes[0].cert).unwrap()
            + &std::fs::read_to_string(&pki.nodes[0].key).unwrap();
        std::fs::write(&pem, both).unwrap();
        let mut cmd = Command::new(operator_support::pgvigilctl_bin());
        cmd.arg("-c").arg(&cluster.nodes[0].config).arg("haproxy-config");
        cmd.args([
            "--primary-port",
            &primary.to_string(),
            "--replica-port",
            &replicas.to_string(),
        ]);
        cmd.args(["--stats-port", &stats.to_string()]);
        cmd.arg("--check-crt").arg(&pem).arg("--check-ca").arg(&pki.ca);
        let text = operator_support::run(cmd, None, Duration::from_secs(30))
            .expect_ok("haproxy-config")
            .stdout;
        assert!(text.contains("check-ssl crt "), "{text}");
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, &text).unwrap();
        let log = dir.join("haproxy.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("/usr/sbin/haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(std::process::Stdio::null());
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        let child = spawn_owned(cmd).expect("haproxy starts");
        Haproxy {
            child,
            log,
            primary,
            replicas,
        }
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node configuration with a TLS mistake; the agent must exit before creating anything.
fn refused(edit: impl Fn(&str, &std::path::Path) -> String) -> (i32, String, bool) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pgvigil_tls::test_pki::TestPki::new(&dir.path().join("pki"), "CA").unwrap();
    let other = pgvigil_tls::test_pki::TestPki::new(&dir.path().join("other"), "other CA").unwrap();
    let node = pki.issue("node", "node", &["127.0.0.1"]).unwrap();
    other.issue("stranger", "stranger", &["127.0.0.1"]).unwrap();
    let data = dir.path().join("data");
    let base = format!(
        "scope: s\nname: pg1\nrestapi:\n  listen: 127.0.0.1:1\n  certfile: {cert}\n  keyfile: {key}\n\
         ctl:\n  cacert: {ca}\n\
         etcd3:\n  hosts: 127.0.0.1:2\npostgresql:\n  listen: 127.0.0.1:3\n  connect_address: 127.0.0.1:3\n\
         \x20 data_dir: {data}\n  authentication:\n    superuser:\n      username: postgres\n\
         \x20     sslmode: verify-full\n      sslrootcert: {ca}\n    replication:\n      username: rep\n\
         \x20 parameters:\n    ssl: 'on'\n    ssl_cert_file: {cert}\n",
        cert = node.cert.display(),
        key = node.key.display(),
        ca = pki.ca_cert().display(),
        data = data.display(),
    );
    let yaml = edit(&base, dir.path());
    let path = dir.path().join("bad.yml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(AGENT)
        .arg(&path)
        .env_remove("PATRONI_NAME")
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    (code, text, data.exists())
}

#[test]
fn bad_tls_files_stop_the_agent_before_anything_starts() {
    if nix::unistd::geteuid().is_root() {
        // The agent refuses root before it reads any file; run the check as postgres.
        return run_as_postgres_or_fail();
    }
    check_bad_tls_files();
}

/// Rewrites the good configuration (given the test directory) into a bad one.
type Edit = Box<dyn Fn(&str, &std::path::Path) -> String>;

fn check_bad_tls_files() {
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing certificate",
            Box::new(|y: &str, d: &std::path::Path| {
                y.replace(&format!("{}/pki/node.crt", d.display()), "/nonexistent/node.crt")
            }),
            "restapi.certfile (/nonexistent/node.crt): file not found",
        ),
        (
            "key of another certificate",
            Box::new(|y: &str, d: &std::path::Path| {
                y.replace(
                    &format!("{}/pki/node.key", d.display()),
                    &format!("{}/other/stranger.key", d.display()),
                )
            }),
            "restapi.keyfile",
        ),
        (
            "a CA file that holds no certificate",
            Box::new(|y: &str, d: &std::path::Path| {
                y.replace(
                    &format!("{}/pki/ca.crt", d.display()),
                    &format!("{}/pki/node.key", d.display()),
                )
            }),
            "postgresql.authentication.superuser.sslrootcert",
        ),
        (
            "REST certificate of another CA than the peers trust",
            Box::new(|y: &str, d: &std::path::Path| {
                y.replace(
                    &format!("ctl:\n  cacert: {}/pki/ca.crt", d.display()),
                    &format!("ctl:\n  cacert: {}/other/ca.crt", d.display()),
                )
            }),
            "restapi.certfile",
        ),
        (
            "PostgreSQL certificate of another CA than sslrootcert",
            Box::new(|y: &str, d: &std::path::Path| {
                y.replace(
                    &format!("sslrootcert: {}/pki/ca.crt", d.display()),
                    &format!("sslrootcert: {}/other/ca.crt", d.display()),
                )
            }),
            "postgresql.parameters.ssl_cert_file",
        ),
        (
            "unreadable key",
            Box::new(|y: &str, d: &std::path::Path| {
                let key = d.join("pki/node.key");
                std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
                y.to_string()
            }),
            "restapi.keyfile",
        ),
        (
            "etcd client key without certificate",
            Box::new(|y: &str, d: &std::path::Path| {
                y.replace(
                    "  hosts: 127.0.0.1:2\n",
                    &format!(
                        "  hosts: 127.0.0.1:2\n  protocol: https\n  key: {}/pki/node.key\n",
                        d.display()
                    ),
                )
            }),
            "etcd3.key",
        ),
    ];
    for (what, edit, expected) in cases {
        let (code, err, data_created) = refused(edit);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains(expected), "{what}: expected {expected:?} in:\n{err}");
        assert!(!data_created, "{what}: the data directory was created");
    }
}

/// Root re-runs this test binary's case as `postgres` (the agent refuses root). Fails loudly
/// when that is impossible under CI.
fn run_as_postgres_or_fail() {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("pgvigil-tls-bad-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&exe)
        .args(["--exact", "bad_tls_files_as_postgres", "--ignored", "--nocapture"])
        .env("TMPDIR", dir.path())
        .current_dir(dir.path())
        .output()
        .expect("runuser runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "as postgres:\n{text}"
    );
}

#[test]
#[ignore = "started as postgres by bad_tls_files_stop_the_agent_before_anything_starts"]
fn bad_tls_files_as_postgres() {
    check_bad_tls_files();
}
