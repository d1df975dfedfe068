//! Two PostgreSQL 15 instances: clone with pg_basebackup, stream through a slot, promote the
//! standby, let the old primary diverge, rewind it and make it follow the new primary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgvigil_postgres::{ClusterState, DataDirState, PgError, StopMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_stream_promote_rewind() {
    let a = Node::new("node-a");
    let b = Node::new("node-b");
    let t0 = Instant::now();

    // Primary A, with a slot for B.
    a.init_primary().await;
    a.pg.create_physical_slot("node_b").await.unwrap();
    a.pg.execute(
        "CREATE TABLE t(id int primary key, origin text); INSERT INTO t VALUES (1, 'a')",
        SHORT,
    )
    .await
    .unwrap();

    // B refuses to clone while running, then clones from A with the pgpass file only.
    b.pg.write_pgpass(&[("127.0.0.1".into(), a.port)]).unwrap();
    b.pg.basebackup("127.0.0.1", a.port, &["--checkpoint=fast".into()], LONG)
        .await
        .unwrap_or_else(|e| panic!("basebackup: {e}\n{}", a.log_tail()));
    assert_eq!(b.pg.data_dir_state(), DataDirState::Initialized);
    eprintln!("clone done after {:?}", t0.elapsed());
    b.pg.write_config(&b.files(Some(b.follow(&a)))).unwrap();
    assert!(b.path("data/standby.signal").is_file());
    let conf = std::fs::read_to_string(b.path("data/postgresql.conf")).unwrap();
    assert!(
        conf.contains("# recovery.conf\nprimary_conninfo = 'user=replicator passfile="),
        "{conf}"
    );
    b.start().await;

    let st = b
        .wait_for("streaming", |s| s.in_recovery && s.wal_receiver_streaming)
        .await;
    assert_eq!(st.timeline, 1);
    assert_eq!(st.received_timeline, Some(1));
    assert_eq!(st.wal_receiver_slot_name.as_deref(), Some("node_b"));
    let conninfo = st.wal_receiver_conninfo.clone().unwrap();
    assert!(conninfo.contains("application_name=node-b"), "{conninfo}");
    assert!(st.wal_flush_lsn.is_none());
    assert_eq!(st.system_identifier, a.state().await.system_identifier);
    assert!(matches!(
        b.pg.basebackup("127.0.0.1", a.port, &[], SHORT).await,
        Err(PgError::StillRunning { .. })
    ));

    // A sees B's walsender on its slot; B catches up with A's writes.
    a.pg.execute("INSERT INTO t VALUES (2, 'a')", SHORT)
        .await
        .unwrap();
    let sa = a
        .wait_for("walsender of node-b", |s| {
            s.replication
                .iter()
                .any(|r| r.application_name == "node-b" && r.state == "streaming")
                && s.slots.iter().any(|sl| sl.slot_name == "node_b" && sl.active)
        })
        .await;
    let target = sa.wal_flush_lsn.unwrap();
    let r = &sa.replication[0];
    assert_eq!(
        (r.usename.as_str(), r.sync_state.as_str()),
        (REPLICATION, "async")
    );
    assert_eq!(r.client_addr.as_deref(), Some("127.0.0.1"));
    let sb = b
        .wait_for("replay of A's writes", |s| {
            s.receive_lsn.unwrap_or(0) >= target && s.replay_lsn.unwrap_or(0) >= target
        })
        .await;
    assert!(sb.replay_timestamp.is_some(), "{sb:?}");
    assert!(sb.wal_position() >= target);
    assert_eq!(b.scalar("SELECT count(*) FROM t").await.as_deref(), Some("2"));

    // Promote B while A keeps running (split brain on purpose).
    b.pg.create_physical_slot("node_a").await.unwrap();
    b.pg.promote(LONG).await.expect("promote");
    let sb = b.state().await;
    assert!(!sb.in_recovery);
    assert_eq!(sb.timeline, 2);
    b.pg.write_config(&b.files(None)).unwrap();
    assert!(!b.path("data/standby.signal").exists());

    // The replication-protocol view of the fork: B is on timeline 2, forked from 1; A still on 1.
    let idb = b.pg.identify_system("127.0.0.1", b.port, SHORT).await.unwrap();
    assert_eq!(idb.timeline, 2);
    assert_eq!(idb.system_identifier, sb.system_identifier);
    let history =
        b.pg.timeline_history("127.0.0.1", b.port, 2, SHORT)
            .await
            .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].parent_timeline, 1);
    assert!(history[0].switch_lsn >= target, "{history:?}");
    assert!(history[0].switch_lsn <= idb.xlogpos);
    let ida = a.pg.identify_system("127.0.0.1", a.port, SHORT).await.unwrap();
    assert_eq!(ida.timeline, 1);
    b.pg.execute("CHECKPOINT; INSERT INTO t VALUES (3, 'b')", SHORT)
        .await
        .unwrap();

    // A diverges: writes on timeline 1 after the fork point.
    a.pg.execute(
        "INSERT INTO t SELECT g, 'a-diverged' FROM generate_series(100, 1100) g",
        SHORT,
    )
    .await
    .unwrap();
    a.pg.stop(StopMode::Fast, LONG).await.unwrap();
    let cd = a.pg.controldata().await.unwrap();
    assert_eq!(cd.cluster_state, ClusterState::ShutDown);
    assert_eq!(cd.checkpoint_timeline, 1);
    assert!(a.pg.can_rewind(&cd));

    // Rewind A from B, as the rewind user, and make it follow B.
    a.pg.write_pgpass(&[("127.0.0.1".into(), b.port)]).unwrap();
    let t = Instant::now();
    a.pg.rewind("127.0.0.1", b.port, LONG)
        .await
        .unwrap_or_else(|e| panic!("rewind: {e}\n{}", b.log_tail()));
    eprintln!("rewind took {:?}", t.elapsed());
    a.pg.write_config(&a.files(Some(a.follow(&b)))).unwrap();
    a.start().await;
    let sa = a
        .wait_for("A streaming from B on timeline 2", |s| {
            s.in_recovery && s.wal_receiver_streaming && s.timeline == 2
        })
        .await;
    assert_eq!(sa.wal_receiver_slot_name.as_deref(), Some("node_a"));
    let ida = a.pg.identify_system("127.0.0.1", a.port, SHORT).await.unwrap();
    assert_eq!(ida.timeline, 2, "a standby reports the timeline it replays");
    let target = b.state().await.wal_flush_lsn.unwrap();
    a.wait_for("A replays B's writes", |s| s.replay_lsn.unwrap_or(0) >= target)
        .await;
    let rows =
        a.pg.query_rows("SELECT id, origin FROM t ORDER BY id", SHORT)
            .await
            .unwrap();
    let rows: Vec<(String, String)> = rows
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("1".to_string(), "a".to_string()),
            ("2".into(), "a".into()),
            ("3".into(), "b".into())
        ],
        "the diverged rows are gone"
    );
    b.wait_for("B sees A on slot node_a", |s| {
        s.replication.iter().any(|r| r.application_name == "node-a")
            && s.slots.iter().any(|sl| sl.slot_name == "node_a" && sl.active)
    })
    .await;

    // Stopping a standby leaves "shut down in recovery"; then stop B too.
    a.pg.stop(StopMode::Fast, LONG).await.unwrap();
    assert_eq!(
        a.pg.controldata().await.unwrap().cluster_state,
        ClusterState::ShutDownInRecovery
    );
    b.pg.stop(StopMode::Fast, LONG).await.unwrap();
    eprintln!("scenario took {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(240));
}
