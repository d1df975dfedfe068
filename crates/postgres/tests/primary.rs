//! A single PostgreSQL 15 instance: bootstrap, configuration, monitoring, roles, slots, stop
//! modes and fencing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgvigil_postgres::{ClusterState, DataDirState, PgError, StopMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_monitor_roles_slots() {
    let node = Node::new("node-a");
    assert_eq!(node.pg.data_dir_state(), DataDirState::Empty);
    assert!(!node.pg.is_running());

    node.pg
        .initdb(&["--no-sync".into(), "--auth=trust".into()])
        .await
        .expect("initdb");
    assert_eq!(node.pg.data_dir_state(), DataDirState::Initialized);
    assert_eq!(node.pg.data_dir_major_version(), Some(15));
    let cd = node.pg.controldata().await.expect("controldata");
    assert_eq!(cd.cluster_state, ClusterState::ShutDown);
    assert_eq!(cd.checkpoint_timeline, 1);
    assert!(!cd.wal_log_hints, "initdb default");

    node.pg.write_config(&node.files(None)).expect("write_config");
    let data = node.path("data");
    assert!(data.join("postgresql.base.conf").is_file());
    let conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    assert!(conf.contains("include 'postgresql.base.conf'"), "{conf}");
    assert!(conf.contains(&format!("port = '{}'", node.port)), "{conf}");
    assert!(!data.join("standby.signal").exists());
    // Writing twice must not turn the generated file into the base file.
    node.pg
        .write_config(&node.files(None))
        .expect("write_config again");
    let base = std::fs::read_to_string(data.join("postgresql.base.conf")).unwrap();
    assert!(!base.contains("pgvigil"), "base file is initdb's");
    let args: Vec<String> = node
        .pg
        .postmaster_args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert!(args.contains(&"--wal_log_hints=on".to_string()), "{args:?}");
    assert!(args.contains(&format!("--port={}", node.port)), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--fsync")), "{args:?}");

    let started = Instant::now();
    node.start().await;
    eprintln!("start took {:?}", started.elapsed());
    let pid = node.pg.postmaster_pid().expect("running");
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: i32 = ppid[ppid.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, std::process::id() as i32, "postmaster is not our child");
    // Starting again is a no-op.
    node.pg.start(SHORT).await.expect("second start");
    assert_eq!(node.pg.postmaster_pid(), Some(pid));

    let st = node.state().await;
    assert!(!st.in_recovery);
    assert_eq!(st.timeline, 1);
    assert!(st.wal_flush_lsn.unwrap() > 0);
    assert_eq!(st.wal_position(), st.wal_flush_lsn.unwrap());
    assert!(st.server_version >= 150000 && st.server_version < 160000);
    assert_eq!(st.system_identifier, cd.system_identifier);
    assert!(
        st.postmaster_start_time.len() >= 26 && st.postmaster_start_time.contains('+'),
        "{}",
        st.postmaster_start_time
    );
    assert!(!st.wal_receiver_streaming && st.wal_receiver_conninfo.is_none());
    assert!(st.replication.is_empty() && st.slots.is_empty());
    assert!(!st.pending_restart, "{:?}", st.pending_restart_params);

    // Roles: created, then altered (idempotent), with the rewind grants.
    node.pg.create_roles().await.expect("create_roles");
    node.pg.create_roles().await.expect("create_roles again");
    let roles = node
        .pg
        .query_rows(
            "SELECT rolname, rolsuper, rolreplication, rolcanlogin FROM pg_roles \
             WHERE rolname IN ('vigil_admin', 'replicator', 'rewinder') ORDER BY rolname",
            SHORT,
        )
        .await
        .unwrap();
    let roles: Vec<Vec<String>> = roles
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.unwrap()).collect())
        .collect();
    assert_eq!(
        roles,
        vec![
            vec!["replicator", "f", "t", "t"],
            vec!["rewinder", "f", "f", "t"],
            vec!["vigil_admin", "t", "t", "t"],
        ]
    );
    let grants = node
        .scalar(
            "SELECT has_function_privilege('rewinder', 'pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)', 'EXECUTE') \
             AND has_function_privilege('rewinder', 'pg_catalog.pg_ls_dir(text, boolean, boolean)', 'EXECUTE')",
        )
        .await;
    assert_eq!(grants.as_deref(), Some("t"));
    // The passwords work over TCP (scram), quotes and backslashes included.
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(node.port)
        .user(REPLICATION)
        .password(REPLICATION_PASSWORD)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("replicator logs in with its password");
    tokio::spawn(conn);
    drop(client);
    // No password reached the server log (log_statement = all in these tests).
    let log = node.log_text();
    assert!(log.contains("SET LOCAL log_statement"), "statements are logged");
    assert!(!log.contains("re:pl") && !log.contains("rw pass"), "{log}");

    // Slots.
    for name in ["node_b", "node_c"] {
        node.pg.create_physical_slot(name).await.expect("create slot");
    }
    // Creating one that exists is a no-op.
    node.pg
        .create_physical_slot("node_c")
        .await
        .expect("create again");
    assert!(node.pg.drop_slot("node_b").await.expect("drop a slot"));
    assert!(!node.pg.drop_slot("node_b").await.expect("drop a missing slot"));
    let st = node.state().await;
    let names: Vec<&str> = st.slots.iter().map(|s| s.slot_name.as_str()).collect();
    assert_eq!(names, vec!["node_c"]);
    assert_eq!(st.slots[0].slot_type, "physical");
    assert!(!st.slots[0].active && st.slots[0].restart_lsn.is_some());
    assert!(!st.slots[0].temporary && !st.slots[0].has_xmin && !st.slots[0].failover);
    assert!(matches!(
        node.pg.create_physical_slot("Bad-Name").await,
        Err(PgError::Invalid(_))
    ));
    // A logical slot, created through a connection to its database.
    node.pg
        .create_logical_slot("cdc", "postgres", "test_decoding")
        .await
        .expect("create a logical slot");
    let st = node.state().await;
    let cdc = st
        .slots
        .iter()
        .find(|s| s.slot_name == "cdc")
        .expect("cdc exists");
    assert_eq!(cdc.slot_type, "logical");
    assert_eq!(cdc.plugin.as_deref(), Some("test_decoding"));
    assert_eq!(cdc.database.as_deref(), Some("postgres"));
    assert!(node.pg.drop_slot("cdc").await.expect("drop the logical slot"));

    // execute, and a statement that outlives its timeout is cancelled server-side.
    node.pg.execute("CHECKPOINT", SHORT).await.expect("checkpoint");
    let t = Instant::now();
    let err = node
        .pg
        .execute("SELECT pg_sleep(30)", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let deadline = Instant::now() + SHORT;
    loop {
        let sleeping = node
            .scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'")
            .await;
        if sleeping.as_deref() == Some("0") {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep was not cancelled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A postmaster-context change needs a restart: reload, then pending_restart shows it.
    let mut files = node.files(None);
    files.parameters.insert("max_connections".into(), "35".into());
    node.pg.write_config(&files).expect("write_config");
    node.pg.reload().await.expect("reload");
    let st = node.wait_for("pending restart", |s| s.pending_restart).await;
    assert_eq!(st.pending_restart_params, vec!["max_connections"]);

    node.pg.stop(StopMode::Fast, LONG).await.expect("stop");
    assert!(!node.pg.is_running());
    let cd = node.pg.controldata().await.unwrap();
    assert_eq!(cd.cluster_state, ClusterState::ShutDown);
    assert!(cd.wal_log_hints);
    assert!(node.pg.can_rewind(&cd));
    node.pg
        .stop(StopMode::Fast, SHORT)
        .await
        .expect("stop when stopped");
    assert!(matches!(node.pg.reload().await, Err(PgError::NotRunning(_))));
    assert!(!node.pg.kill_immediately().unwrap());
    assert!(node.pg.query_state(SHORT).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_modes_and_fencing() {
    let node = Node::new("node-s");
    node.init_primary().await;

    node.pg.stop(StopMode::Smart, LONG).await.expect("smart stop");
    assert!(!node.pg.is_running());
    assert_eq!(
        node.pg.controldata().await.unwrap().cluster_state,
        ClusterState::ShutDown
    );

    node.start().await;
    node.pg
        .stop(StopMode::Immediate, LONG)
        .await
        .expect("immediate stop");
    assert!(!node.pg.is_running());
    assert_eq!(
        node.pg.controldata().await.unwrap().cluster_state,
        ClusterState::InProduction,
        "an immediate shutdown leaves a crashed cluster"
    );

    // Crash recovery on the next start.
    node.start().await;
    node.state().await;

    // A smart shutdown waits for sessions; the stop escalates when the timeout passes.
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(node.port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let t = Instant::now();
    node.pg
        .stop(StopMode::Smart, Duration::from_secs(1))
        .await
        .expect("escalated stop");
    assert!(!node.pg.is_running());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(client);

    // Fencing: kill_immediately is synchronous and the server stops accepting connections.
    node.start().await;
    node.state().await;
    let pid = node.pg.postmaster_pid().unwrap();
    let t = Instant::now();
    assert!(node.pg.kill_immediately().expect("kill"));
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
    let deadline = Instant::now() + SHORT;
    while node.pg.is_running() {
        assert!(Instant::now() < deadline, "postmaster {pid} survived SIGQUIT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("postmaster gone {:?} after SIGQUIT", t.elapsed());
    let refused = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(node.port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2))
        .connect(tokio_postgres::NoTls)
        .await;
    assert!(refused.is_err());
    assert!(!node.pg.kill_immediately().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_is_reported() {
    let node = Node::new("node-f");
    node.pg
        .initdb(&["--no-sync".into(), "--auth=trust".into()])
        .await
        .expect("initdb");
    let mut files = node.files(None);
    files.parameters.insert("shared_buffers".into(), "lots".into());
    node.pg.write_config(&files).unwrap();
    let t = Instant::now();
    let err = node.pg.start(LONG).await.unwrap_err();
    assert!(matches!(err, PgError::StartFailed(_)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(!node.pg.is_running());

    // A stale postmaster.pid naming a live non-postgres process does not block the start.
    node.pg.write_config(&node.files(None)).unwrap();
    let me = std::process::id();
    std::fs::write(
        node.path("data/postmaster.pid"),
        format!("{me}\n{}\n", node.path("data").display()),
    )
    .unwrap();
    assert!(!node.pg.is_running(), "our own pid is not a postmaster");
    node.start().await;
    assert!(node.pg.is_running());
}

/// A custom bootstrap's recovery (`docs/patroni-compat.md` §5.3): `recovery_conf` becomes an
/// archive recovery (`recovery.signal`, the settings as given); `keep_existing_recovery_conf`
/// leaves the signal files and `postgresql.auto.conf` as a restore tool wrote them; afterwards
/// the ordinary configuration removes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_bootstraps_recovery_is_written_kept_or_removed() {
    let node = Node::new("node-r");
    node.pg
        .initdb(&["--no-sync".into(), "--auth=trust".into()])
        .await
        .expect("initdb");
    let data = node.path("data");
    let auto_conf = data.join("postgresql.auto.conf");
    let restored = "restore_command = 'pgbackrest archive-get %f \"%p\"'\n";

    let mut files = node.files(None);
    let settings = [
        ("restore_command", "cp /archive/%f %p"),
        ("recovery_target", "immediate"),
    ];
    files.restore = pgvigil_postgres::Restore::Settings(
        settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    node.pg.write_config(&files).unwrap();
    assert!(data.join("recovery.signal").is_file());
    assert!(!data.join("standby.signal").exists());
    let conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    assert!(conf.contains("recovery_target = 'immediate'"), "{conf}");
    assert!(!conf.contains("recovery_target_name"), "no empty targets: {conf}");

    // What pgBackRest or Barman leave behind stays.
    std::fs::remove_file(data.join("recovery.signal")).unwrap();
    std::fs::write(data.join("standby.signal"), "").unwrap();
    std::fs::write(&auto_conf, restored).unwrap();
    let mut files = node.files(None);
    files.restore = pgvigil_postgres::Restore::KeepExisting;
    node.pg.write_config(&files).unwrap();
    assert!(data.join("standby.signal").is_file());
    assert_eq!(std::fs::read_to_string(&auto_conf).unwrap(), restored);

    // Once the bootstrap is done, no recovery is left anywhere.
    node.pg.write_config(&node.files(None)).unwrap();
    assert!(!data.join("standby.signal").exists());
    assert!(!data.join("recovery.signal").exists());
    assert!(
        !std::fs::read_to_string(&auto_conf)
            .unwrap()
            .contains("restore_command")
    );
}
