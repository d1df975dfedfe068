//! Custom bootstrap and replica creation methods on real clusters (`docs/patroni-compat.md`
//! §5.3, §5.4): a new cluster cloned from a standalone PostgreSQL by a user's script, with a
//! `post_bootstrap` script; replicas created by a user's method, by `basebackup` after a failing
//! one, and from a backup while the cluster has no leader.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use pgvigil_testkit::cluster::{
    ClusterOptions, REPLICATION_PASSWORD, REPLICATION_USER, TestCluster, psql_at,
};
use pgvigil_testkit::{shared_tmp_dir, wait_until};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");
const HEALTHY: Duration = Duration::from_secs(240);

/// Runs `cmd` as the `postgres` user when the test runs as root (PostgreSQL refuses root).
fn as_postgres(cmd: &mut Command) -> &mut Command {
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .expect("user lookup")
            .expect("running as root needs a postgres user");
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd
}

/// A PostgreSQL program, found as the agent finds it (Debian keeps them off `PATH`).
fn pg_bin(name: &str) -> PathBuf {
    pgvigil_postgres::find_bin_dir()
        .expect("PostgreSQL 15 binaries")
        .join(name)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `<dir>/<name>.sh`, which records its arguments in `<dir>/<name>.args`, one a line,
/// then runs `body`.
fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(format!("{name}.sh"));
    let record = format!("printf '%s\\n' \"$@\" > {}/{name}.args", dir.display());
    fs::write(&path, format!("#!/bin/sh\nset -e\n{record}\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

fn log_count(cluster: &TestCluster, i: usize, needle: &str) -> usize {
    fs::read_to_string(&cluster.nodes[i].log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// The start of a custom bootstrap script: its arguments read, the source cloned into the data
/// directory.
const CLONE: &str = r#"for a in "$@"; do case "$a" in --datadir=*) d="${a#--datadir=}";; --source-port=*) p="${a#--source-port=}";; --archive=*) w="${a#--archive=}";; esac; done
pg_basebackup -D "$d" -h 127.0.0.1 -p "$p" -U postgres -X stream -c fast"#;

/// [`script`] starting with [`CLONE`].
fn clone_script(dir: &Path, name: &str, rest: &str) {
    script(dir, name, &format!("{CLONE}\n{rest}"));
}

/// A standalone PostgreSQL 15 outside any cluster, archiving its WAL: the source a custom
/// bootstrap clones. Stopped (by its data directory's postmaster.pid) on drop.
struct Standalone {
    dir: tempfile::TempDir,
    port: u16,
}

impl Standalone {
    /// Started, with a table `t` holding `row`; with a directory for the scripts.
    fn start(row: &str) -> (Standalone, tempfile::TempDir) {
        let dir = shared_tmp_dir("pgvigil-standalone-").expect("temporary directory");
        let port = pgvigil_testkit::free_port();
        let data = dir.path().join("data");
        let archive = dir.path().join("archive");
        run(as_postgres(Command::new("mkdir").arg(&archive)));
        run(as_postgres(
            Command::new(pg_bin("initdb")).arg("--pgdata").arg(&data).args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
            ]),
        ));
        // On the command line, not in postgresql.conf: a clone must not archive into our
        // archive. max_connections as the cluster's: a recovering clone may not have fewer.
        let options = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{dir}' \
             -c archive_mode=on -c archive_command='cp %p {archive}/%f' -c fsync=off -c max_connections=50",
            dir = dir.path().display(),
            archive = archive.display()
        );
        let standalone = Standalone { dir, port };
        run(as_postgres(
            Command::new(pg_bin("pg_ctl"))
                .arg("--pgdata")
                .arg(&data)
                .arg("--log")
                .arg(standalone.dir.path().join("postgres.log"))
                .args(["--wait", "--options", &options, "start"]),
        ));
        let sql = format!("CREATE TABLE t(x text); INSERT INTO t VALUES ('{row}')");
        psql_at(standalone.port, &sql).unwrap();
        (
            standalone,
            shared_tmp_dir("pgvigil-methods-").expect("temporary directory"),
        )
    }

    fn archive(&self) -> PathBuf {
        self.dir.path().join("archive")
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = as_postgres(
            Command::new(pg_bin("pg_ctl"))
                .arg("--pgdata")
                .arg(self.dir.path().join("data"))
                .args(["--mode=immediate", "stop"]),
        )
        .output();
    }
}

/// Node 1 bootstraps the cluster by cloning a standalone PostgreSQL with its own
/// `pg_basebackup` script and replaying the standalone's archive up to a restore point
/// (`recovery_target_name`); `post_bootstrap` creates a role. Node 2's
/// replica comes from a user's method that runs `pg_basebackup` itself with the connection
/// string it is given; node 3's first method fails and `basebackup` takes over.
#[test]
fn a_cluster_cloned_by_a_custom_bootstrap_gets_replicas_from_custom_methods_and_the_fallback() {
    let (source, scripts) = Standalone::start("from the source");
    let s = scripts.path();
    clone_script(
        s,
        "clone",
        r#"# Written after the backup, so only the archive has them: one row before the target, one after.
q() { psql -X -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$p" -U postgres -d postgres -c "$1"; }
q "INSERT INTO t VALUES ('replayed from the archive')"
q "SELECT pg_create_restore_point('target')"
q "INSERT INTO t VALUES ('past the target')"
f=$(q "SELECT pg_walfile_name(pg_switch_wal())")
i=0
until [ -f "$w/$f" ]; do i=$((i+1)); [ "$i" -lt 600 ] || exit 1; sleep 0.1; done"#,
    );
    script(
        s,
        "post",
        r#"for dsn; do :; done
exec psql -X -v ON_ERROR_STOP=1 -d "$dsn" -c "CREATE ROLE app LOGIN""#,
    );
    script(
        s,
        "mine",
        r#"for a in "$@"; do case "$a" in --datadir=*) d="${a#--datadir=}";; --connstring=*) c="${a#--connstring=}";; esac; done
exec pg_basebackup -D "$d" -d "$c" -X stream -c fast"#,
    );
    script(
        s,
        "broken",
        r#"touch "${3#--datadir=}/left-behind"
exit 3"#,
    );
    let bootstrap = format!(
        "  method: clone\n  clone:\n    command: {s}/clone.sh\n    source-port: {port}\n    archive: {archive}\n    \
         recovery_conf:\n      restore_command: cp {archive}/%f %p\n      recovery_target_name: target\n      \
         recovery_target_action: promote\n  post_bootstrap: \"{s}/post.sh $HOME 'two words'\"\n",
        s = s.display(),
        port = source.port,
        archive = source.archive().display()
    );
    let options = ClusterOptions {
        extra_bootstrap_yaml: vec![bootstrap],
        extra_postgresql_yaml: vec![
            String::new(),
            format!(
                "  create_replica_methods:\n  - mine\n  - basebackup\n  mine:\n    command: {}/mine.sh\n    custom-flag: true\n",
                s.display()
            ),
            format!(
                "  create_replica_methods: [broken, basebackup]\n  broken:\n    command: {}/broken.sh\n",
                s.display()
            ),
        ],
        // Only node 1 may bootstrap.
        extra_node_yaml: vec![
            String::new(),
            "tags:\n  nofailover: true\n".into(),
            "tags:\n  nofailover: true\n".into(),
        ],
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    // A failed bootstrap is fatal for node 1: say why at once instead of waiting for health.
    wait_until("node1 to finish its bootstrap", HEALTHY, || {
        let log = fs::read_to_string(&cluster.nodes[0].log).unwrap_or_default();
        assert!(!log.contains("bootstrap failed"), "{log}");
        log.contains("initialized a new cluster").then_some(())
    })
    .unwrap();
    let leader = cluster.wait_healthy(HEALTHY).expect("cluster becomes healthy");
    assert_eq!(leader, 0, "{}", cluster.diagnostics());
    let node = |i: usize| &cluster.nodes[i];

    // The script got Patroni's arguments: --scope, --datadir, then the section's own.
    assert_eq!(
        lines(&s.join("clone.args")),
        [
            format!("--scope={}", cluster.scope),
            format!("--datadir={}", node(0).data_dir.display()),
            format!("--source-port={}", source.port),
            format!("--archive={}", source.archive().display()),
        ]
    );
    // The clone's data, replayed from the archive up to the restore point and promoted onto a
    // new timeline.
    let rows = "SELECT string_agg(x, ',' ORDER BY x) FROM t";
    let expected = "from the source,replayed from the archive";
    assert_eq!(cluster.psql(0, rows).unwrap(), expected);
    let doc = cluster.cluster_doc().unwrap();
    let timeline = doc["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "node1")
        .map(|m| m["timeline"].clone());
    assert_eq!(timeline, Some(Value::from(2)), "{doc}");
    // post_bootstrap ran without a shell (its words as written, nothing expanded), with a
    // superuser connection string without the password appended.
    let post = lines(&s.join("post.args"));
    assert_eq!(post.len(), 3, "{post:?}");
    assert_eq!(post[..2], ["$HOME", "two words"], "{post:?}");
    assert!(
        post[2].contains("user=postgres") && post[2].contains(&format!("port={}", node(0).pg_port)),
        "{post:?}"
    );
    assert!(!post[2].contains("password"), "{post:?}");
    assert_eq!(
        cluster
            .psql(0, "SELECT rolname FROM pg_roles WHERE rolname = 'app'")
            .unwrap(),
        "app"
    );
    // The trust lines that let the agent in during the bootstrap are gone; the recovery
    // settings too.
    let hba = fs::read_to_string(node(0).data_dir.join("pg_hba.conf")).unwrap();
    assert!(!hba.contains("127.0.0.1/32 trust"), "{hba}");
    assert!(!node(0).data_dir.join("recovery.signal").exists());
    assert_eq!(cluster.psql(0, "SHOW recovery_target_name").unwrap(), "");

    // Node 2: the user's method, with its option first and then Patroni's four.
    let mine = lines(&s.join("mine.args"));
    assert_eq!(
        mine[..4],
        [
            "--custom-flag=True".to_string(),
            format!("--scope={}", cluster.scope),
            "--role=replica".into(),
            format!("--datadir={}", node(1).data_dir.display()),
        ]
    );
    let conn = mine[4].strip_prefix("--connstring=").expect("connstring last");
    for part in [
        "host=127.0.0.1".to_string(),
        format!("port={}", node(0).pg_port),
        format!("user={REPLICATION_USER}"),
    ] {
        assert!(conn.contains(&part), "{conn}");
    }
    assert!(!conn.contains("password"), "{conn}");
    assert_eq!(log_count(&cluster, 1, "replica has been created using mine"), 1);

    // Node 3: the failing method ran, its leftovers were removed, basebackup took over.
    assert!(s.join("broken.args").exists());
    assert_eq!(log_count(&cluster, 2, "with method broken failed"), 1);
    assert_eq!(
        log_count(&cluster, 2, "replica has been created using basebackup"),
        1
    );
    assert!(!node(2).data_dir.join("left-behind").exists());
    for i in [1, 2] {
        assert_eq!(cluster.psql(i, rows).unwrap(), expected);
    }
}

/// `keep_existing_recovery_conf`: the script writes its own recovery settings, as pgBackRest or
/// Barman do (`recovery.signal` and `restore_command`/targets in `postgresql.auto.conf`);
/// pgvigil recovers with them, then removes them.
#[test]
fn a_custom_bootstrap_keeping_the_scripts_recovery_settings_recovers_with_them() {
    let (source, scripts) = Standalone::start("restored");
    let s = scripts.path();
    clone_script(
        s,
        "restore",
        r#"cat >> "$d/postgresql.auto.conf" <<END
restore_command = 'cp $w/%f %p'
recovery_target = 'immediate'
recovery_target_action = 'promote'
END
touch "$d/recovery.signal""#,
    );
    let bootstrap = format!(
        "  method: restore\n  restore:\n    command: {s}/restore.sh\n    keep_existing_recovery_conf: true\n    \
         source-port: {port}\n    archive: {archive}\n",
        s = s.display(),
        port = source.port,
        archive = source.archive().display()
    );
    let options = ClusterOptions {
        nodes: 1,
        extra_bootstrap_yaml: vec![bootstrap],
        ..Default::default()
    };
    let cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), 0);
    assert_eq!(cluster.psql(0, "SELECT x FROM t").unwrap(), "restored");
    assert_eq!(cluster.psql(0, "SELECT pg_is_in_recovery()").unwrap(), "f");
    assert_eq!(
        lines(&s.join("restore.args"))[..2],
        [
            format!("--scope={}", cluster.scope),
            format!("--datadir={}", cluster.nodes[0].data_dir.display()),
        ]
    );
    // The script's settings did the recovery (a new timeline), and are gone now.
    let doc = cluster.cluster_doc().unwrap();
    assert_eq!(doc["members"][0]["timeline"], Value::from(2), "{doc}");
    let auto_conf = fs::read_to_string(cluster.nodes[0].data_dir.join("postgresql.auto.conf")).unwrap();
    assert!(!auto_conf.contains("restore_command"), "{auto_conf}");
    assert_eq!(cluster.psql(0, "SHOW restore_command").unwrap(), "");
}

/// The value of `/service/<scope>/<key>` in etcd, read with etcdctl (empty when absent).
fn etcd_value(cluster: &TestCluster, key: &str) -> Option<String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", cluster.etcd.endpoints().join(",")))
        .args(["get", "--print-value-only"])
        .arg(format!("/service/{}/{key}", cluster.scope))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The `status` key's `optime`.
fn status_optime(cluster: &TestCluster) -> Option<u64> {
    let v: Value = serde_json::from_str(&etcd_value(cluster, "status")?).ok()?;
    v["optime"].as_u64()
}

/// A cluster whose only member stopped (no leader, `initialize` set); a new member restores
/// a base backup taken earlier with a `no_leader` method. It comes up as a replica without an
/// upstream and, being further behind the last leader position than
/// `maximum_lag_on_failover`, stays one: no promotion of an old backup. When the old member
/// returns it leads and the restored one streams from it.
#[test]
fn a_replica_restored_without_a_leader_stays_a_replica_and_follows_the_leader_that_returns() {
    let backup_root = shared_tmp_dir("pgvigil-backup-").expect("temporary directory");
    let b = backup_root.path();
    script(
        b,
        "restore",
        &format!(
            r#"for a in "$@"; do case "$a" in --datadir=*) d="${{a#--datadir=}}";; esac; done
cp -a {b}/base/. "$d"/"#,
            b = b.display()
        ),
    );
    let options = ClusterOptions {
        nodes: 2,
        deferred: vec![1],
        extra_postgresql_yaml: vec![
            String::new(),
            format!(
                "  create_replica_methods: [restore, basebackup]\n  restore:\n    command: {}/restore.sh\n    no_leader: true\n",
                b.display()
            ),
        ],
        ..Default::default()
    };
    let mut cluster = TestCluster::start(AGENT.as_ref(), options).expect("cluster starts");
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), 0);
    cluster.psql(0, "CREATE TABLE t(x int)").unwrap();
    run(as_postgres(
        Command::new(pg_bin("pg_basebackup"))
            .arg("--pgdata")
            .arg(b.join("base"))
            .arg(format!(
                "--dbname=host=127.0.0.1 port={} user={REPLICATION_USER}",
                cluster.nodes[0].pg_port
            ))
            .args(["-X", "stream", "-c", "fast"])
            .env("PGPASSWORD", REPLICATION_PASSWORD),
    ));
    // Well past maximum_lag_on_failover (1 MiB) after the backup.
    cluster
        .psql(0, "INSERT INTO t SELECT generate_series(1, 200000)")
        .unwrap();
    let lsn: u64 = cluster
        .psql(0, "SELECT pg_current_wal_lsn() - '0/0'")
        .unwrap()
        .parse()
        .unwrap();
    wait_until("the leader to publish its position", HEALTHY, || {
        status_optime(&cluster).filter(|&o| o >= lsn)
    })
    .unwrap();
    // The only member goes away cleanly: PostgreSQL stopped, the leader key released.
    cluster.signal_agent(0, Signal::SIGTERM).unwrap();
    wait_until("the leader key to go", HEALTHY, || {
        etcd_value(&cluster, "leader").filter(String::is_empty)
    })
    .unwrap();

    cluster.start_agent(1).unwrap();
    let restored = wait_until("node2 to restore and run as a replica", HEALTHY, || {
        let doc = pgvigil_testkit::http::get(cluster.nodes[1].api_port, "/patroni")
            .ok()?
            .json()
            .ok()?;
        (doc["state"] == "running" && doc["role"] == "replica").then_some(doc)
    })
    .unwrap();
    let args = lines(&b.join("restore.args"));
    assert!(args.contains(&"--no_leader=True".to_string()), "{args:?}");
    assert!(args.contains(&"--role=replica".to_string()), "{args:?}");
    assert_eq!(args.last().map(String::as_str), Some("--connstring="), "{args:?}");
    assert_eq!(log_count(&cluster, 1, "trying to bootstrap (without leader)"), 1);
    // Several cycles later it is still a replica in recovery, held back by the lag limit.
    wait_until("node2 to decline the leader race three times", HEALTHY, || {
        (log_count(&cluster, 1, "exceeds maximum replication lag") >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {restored}\n{}", cluster.diagnostics()));
    assert_eq!(cluster.psql(1, "SELECT pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(cluster.leader(), None);

    cluster.start_agent(0).unwrap();
    assert_eq!(cluster.wait_healthy(HEALTHY).unwrap(), 0);
    wait_until(
        "node2 to stream the rows written after the backup",
        HEALTHY,
        || (cluster.psql(1, "SELECT count(*) FROM t").ok()? == "200000").then_some(()),
    )
    .unwrap();
}
