//! SQL over one cached local connection (`docs/patroni-compat.md` §5.1 "Local SQL connections",
//! §5.11): the per-cycle monitoring query and the few statements the agent runs. Every call has a
//! deadline; on timeout the query is cancelled server-side and the connection is dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil_api::rest::ReplicationInfo;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::{PgError, Postgres};

const APPLICATION_NAME: &str = "Patroni heartbeat";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CANCEL_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) struct Conn {
    client: Arc<Client>,
}

/// One walsender (`pg_stat_replication`), with its positions as bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalSender {
    pub pid: i32,
    pub usename: Option<String>,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub sync_state: Option<String>,
    pub sync_priority: Option<i32>,
    pub sent_lsn: Option<u64>,
    pub write_lsn: Option<u64>,
    pub flush_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
}

/// One replication slot (`pg_replication_slots`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub slot_name: String,
    /// `physical` or `logical`.
    pub slot_type: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub restart_lsn: Option<u64>,
    pub confirmed_flush_lsn: Option<u64>,
    pub wal_status: Option<String>,
    #[serde(default)]
    pub temporary: bool,
    /// `xmin` is set (hot-standby feedback reached the slot).
    #[serde(default)]
    pub has_xmin: bool,
    /// PostgreSQL 17: a logical slot PostgreSQL synchronises to standbys itself (false before).
    #[serde(default)]
    pub failover: bool,
    /// PostgreSQL 17: on a standby, a slot PostgreSQL synchronised from the primary.
    #[serde(default)]
    pub synced: bool,
}

/// The result of the monitoring query. LSNs are bytes (`pg_wal_lsn_diff(x, '0/0')`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PgStatus {
    pub in_recovery: bool,
    /// Primary: from the current WAL file name. Replica: the walreceiver's timeline; without
    /// a running walreceiver, the newest timeline of the WAL segments in `pg_wal` (or, if they
    /// cannot be listed, the last restartpoint's).
    ///
    /// The restartpoint's timeline alone is not enough: a standby that followed a promotion
    /// onto timeline N+1 keeps reporting N until its next restartpoint (up to
    /// `checkpoint_timeout` later), and judged against the leader's history on timeline N it
    /// looks as if it had diverged past the switch point. The walreceiver writes the WAL it
    /// receives, and recovery recycles old segments, under the timeline it is on, so the
    /// newest segment's timeline is where the local WAL continues.
    pub timeline: u64,
    /// Primary only: `pg_current_wal_flush_lsn()`.
    pub wal_flush_lsn: Option<u64>,
    /// `pg_last_wal_receive_lsn()` (NULL on a primary that never was a standby).
    pub receive_lsn: Option<u64>,
    /// `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<u64>,
    /// `pg_last_xact_replay_timestamp()` as Patroni prints it (`2024-01-02 03:04:05.678901+00:00`).
    pub replay_timestamp: Option<String>,
    pub replay_paused: bool,
    /// A walreceiver exists and its status is `streaming`.
    pub wal_receiver_streaming: bool,
    pub wal_receiver_status: Option<String>,
    pub received_timeline: Option<u64>,
    /// The walreceiver's (password-masked) conninfo.
    pub wal_receiver_conninfo: Option<String>,
    pub wal_receiver_slot_name: Option<String>,
    pub wal_receiver_written_lsn: Option<u64>,
    pub wal_receiver_flushed_lsn: Option<u64>,
    pub wal_receiver_sender_host: Option<String>,
    pub wal_receiver_sender_port: Option<u16>,
    /// `pg_control_checkpoint().timeline_id`.
    pub checkpoint_timeline: u64,
    /// As Patroni prints it: `2024-01-02 03:04:05.678901+00:00`.
    pub postmaster_start_time: String,
    /// `server_version_num`, e.g. 150010.
    pub server_version: u32,
    pub system_identifier: String,
    /// The REST `replication` list.
    pub replication: Vec<ReplicationInfo>,
    /// The same walsenders with positions, for synchronous replication.
    pub walsenders: Vec<WalSender>,
    pub slots: Vec<SlotInfo>,
    pub pending_restart: bool,
    /// Names of the GUCs with `pg_settings.pending_restart`.
    pub pending_restart_params: Vec<String>,
    pub synchronous_standby_names: String,
    pub synchronous_commit: String,
    /// `current_setting('restore_command')`: empty when WAL is not restored from an archive.
    #[serde(default)]
    pub restore_command: String,
}

impl PgStatus {
    /// The position compared in leader races: flush LSN on a primary, the larger of received
    /// and replayed on a replica.
    pub fn wal_position(&self) -> u64 {
        if self.in_recovery {
            self.receive_lsn.unwrap_or(0).max(self.replay_lsn.unwrap_or(0))
        } else {
            self.wal_flush_lsn.unwrap_or(0)
        }
    }

    /// The member key's and status document's `replication_state`, by Patroni's rule
    /// (`replication_state_from_parameters`): on a replica, `streaming` while the WAL receiver
    /// streams, else `in archive recovery` when a `restore_command` is set, else nothing. The
    /// primary has none.
    pub fn replication_state(&self) -> Option<&'static str> {
        if !self.in_recovery {
            None
        } else if self.wal_receiver_streaming {
            Some("streaming")
        } else if !self.restore_command.is_empty() {
            Some("in archive recovery")
        } else {
            None
        }
    }
}

const TS: &str = "'YYYY-MM-DD HH24:MI:SS.USTZH:TZM'";

fn status_query() -> String {
    format!(
        "SELECT pg_catalog.pg_is_in_recovery(),
  CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL ELSE ('x' || pg_catalog.substr(
    pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END,
  CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL
    ELSE pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_flush_lsn(), '0/0')::int8 END,
  pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_receive_lsn(), '0/0')::int8,
  pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_replay_lsn(), '0/0')::int8,
  pg_catalog.to_char(pg_catalog.pg_last_xact_replay_timestamp(), {TS}),
  CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_is_wal_replay_paused() ELSE false END,
  wr.status, wr.received_tli::int8, wr.slot_name::text, wr.conninfo,
  pg_catalog.pg_wal_lsn_diff(wr.written_lsn, '0/0')::int8,
  pg_catalog.pg_wal_lsn_diff(wr.flushed_lsn, '0/0')::int8,
  wr.sender_host, wr.sender_port,
  (SELECT timeline_id FROM pg_catalog.pg_control_checkpoint())::int8,
  pg_catalog.to_char(pg_catalog.pg_postmaster_start_time(), {TS}),
  pg_catalog.current_setting('server_version_num')::int4,
  (SELECT system_identifier FROM pg_catalog.pg_control_system())::text,
  (SELECT pg_catalog.json_agg(r)::text FROM (SELECT pid, usename::text, application_name,
     pg_catalog.host(client_addr) AS client_addr, state, sync_state, sync_priority,
     pg_catalog.pg_wal_lsn_diff(sent_lsn, '0/0')::int8 AS sent_lsn,
     pg_catalog.pg_wal_lsn_diff(write_lsn, '0/0')::int8 AS write_lsn,
     pg_catalog.pg_wal_lsn_diff(flush_lsn, '0/0')::int8 AS flush_lsn,
     pg_catalog.pg_wal_lsn_diff(replay_lsn, '0/0')::int8 AS replay_lsn
     FROM pg_catalog.pg_stat_replication ORDER BY pid) r),
  (SELECT pg_catalog.json_agg(s)::text FROM (SELECT slot_name::text, slot_type, plugin::text,
     database::text, active, temporary, xmin IS NOT NULL AS has_xmin,
     pg_catalog.pg_wal_lsn_diff(restart_lsn, '0/0')::int8 AS restart_lsn,
     pg_catalog.pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::int8 AS confirmed_flush_lsn,
     wal_status,
     COALESCE((pg_catalog.to_jsonb(rs) ->> 'failover')::bool, false) AS failover,
     COALESCE((pg_catalog.to_jsonb(rs) ->> 'synced')::bool, false) AS synced
     FROM pg_catalog.pg_replication_slots rs ORDER BY slot_name) s),
  (SELECT pg_catalog.json_agg(name ORDER BY name)::text FROM pg_catalog.pg_settings
     WHERE pending_restart),
  pg_catalog.current_setting('synchronous_standby_names'),
  pg_catalog.current_setting('synchronous_commit'),
  pg_catalog.current_setting('restore_command')
FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_stat_wal_receiver AS wr ON true"
    )
}

/// The timeline of the greatest WAL segment file name in `pg_wal` (its first 8 hex digits).
const NEWEST_WAL_SEGMENT_TIMELINE: &str =
    "SELECT ('x' || pg_catalog.substr(pg_catalog.max(name COLLATE \"C\"), 1, 8))::bit(32)::int8
  FROM pg_catalog.pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'";

fn parse_json_list<T: for<'de> Deserialize<'de>>(
    what: &str,
    text: Option<String>,
) -> Result<Vec<T>, PgError> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(&t).map_err(|e| PgError::Parse {
            what: what.into(),
            detail: e.to_string(),
        }),
    }
}

fn to_u64(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, PgError> {
    row.try_get(index)
        .map_err(|e| PgError::sql(format!("monitoring query column {index}"), e))
}

fn status_from_row(row: &tokio_postgres::Row) -> Result<PgStatus, PgError> {
    let walsenders: Vec<WalSender> = parse_json_list("pg_stat_replication", col(row, 19)?)?;
    let slots: Vec<SlotInfo> = parse_json_list("pg_replication_slots", col(row, 20)?)?;
    let pending: Vec<String> = parse_json_list("pg_settings", col(row, 21)?)?;
    let in_recovery: bool = col(row, 0)?;
    let received_timeline = to_u64(col(row, 8)?);
    let checkpoint_timeline = to_u64(col(row, 15)?).unwrap_or(0);
    let timeline = if in_recovery {
        received_timeline.unwrap_or(checkpoint_timeline)
    } else {
        to_u64(col(row, 1)?).unwrap_or(checkpoint_timeline)
    };
    let wal_receiver_status: Option<String> = col(row, 7)?;
    let replication = walsenders
        .iter()
        .map(|w| ReplicationInfo {
            usename: w.usename.clone().unwrap_or_default(),
            application_name: w.application_name.clone(),
            client_addr: w.client_addr.clone(),
            state: w.state.clone().unwrap_or_default(),
            sync_state: w.sync_state.clone().unwrap_or_default(),
            sync_priority: w.sync_priority.unwrap_or(0),
        })
        .collect();
    let sender_port: Option<i32> = col(row, 14)?;
    let start_time: Option<String> = col(row, 16)?;
    let version: i32 = col(row, 17)?;
    let sysid: Option<String> = col(row, 18)?;
    Ok(PgStatus {
        in_recovery,
        timeline,
        wal_flush_lsn: to_u64(col(row, 2)?),
        receive_lsn: to_u64(col(row, 3)?),
        replay_lsn: to_u64(col(row, 4)?),
        replay_timestamp: col(row, 5)?,
        replay_paused: col::<Option<bool>>(row, 6)?.unwrap_or(false),
        wal_receiver_streaming: wal_receiver_status.as_deref() == Some("streaming"),
        wal_receiver_status,
        received_timeline,
        wal_receiver_slot_name: col(row, 9)?,
        wal_receiver_conninfo: col(row, 10)?,
        wal_receiver_written_lsn: to_u64(col(row, 11)?),
        wal_receiver_flushed_lsn: to_u64(col(row, 12)?),
        wal_receiver_sender_host: col(row, 13)?,
        wal_receiver_sender_port: sender_port.and_then(|p| u16::try_from(p).ok()),
        checkpoint_timeline,
        postmaster_start_time: start_time.unwrap_or_default(),
        server_version: u32::try_from(version).unwrap_or(0),
        system_identifier: sysid.unwrap_or_default(),
        replication,
        walsenders,
        slots,
        pending_restart: !pending.is_empty(),
        pending_restart_params: pending,
        synchronous_standby_names: col(row, 22)?,
        synchronous_commit: col(row, 23)?,
        restore_command: col(row, 24)?,
    })
}

impl Postgres {
    pub(crate) fn connect_config(&self) -> tokio_postgres::Config {
        let s = &self.settings;
        let mut cfg = tokio_postgres::Config::new();
        match (&s.unix_socket_dir, s.listen_host.as_str()) {
            (Some(dir), _) => {
                cfg.host_path(dir);
            }
            // Patroni connects to `localhost` when PostgreSQL listens on a wildcard or loopback
            // address, so that is the name `sslmode=verify-full` checks; the address stays
            // the IPv4 loopback pgvigil has always used.
            (None, "" | "127.0.0.1") => {
                cfg.host("localhost")
                    .hostaddr(std::net::Ipv4Addr::LOCALHOST.into());
            }
            (_, host) => {
                cfg.host(host);
            }
        }
        s.local_tls.apply(&mut cfg);
        cfg.port(s.port)
            .user(&s.superuser.username)
            .dbname(&s.database)
            .application_name(APPLICATION_NAME)
            .options("-c statement_timeout=2000")
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(password) = s.superuser.effective_password() {
            cfg.password(password);
        }
        cfg
    }

    /// Runs `f` on the cached connection (connecting first when there is none or it closed),
    /// everything bounded by `timeout`. With `statement_timeout` the server-side limit is raised
    /// for this call (the session default is 2 s). Any failure drops the connection; a timeout
    /// also cancels the running statement.
    pub(crate) async fn with_conn<T, F, Fut>(
        &self,
        op: &str,
        timeout: Duration,
        statement_timeout: Option<Duration>,
        f: F,
    ) -> Result<T, PgError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        let deadline = Instant::now() + timeout;
        let timed_out = || PgError::Timeout {
            op: op.to_string(),
            timeout,
        };
        let mut slot = tokio::time::timeout(timeout, self.conn.lock())
            .await
            .map_err(|_| timed_out())?;
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let cfg = self.connect_config();
            let (client, connection) =
                tokio::time::timeout(left, cfg.connect(self.settings.local_tls.connector()))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| {
                        PgError::sql(
                            format!(
                                "{op}: connecting to {}:{}",
                                self.settings
                                    .unix_socket_dir
                                    .as_deref()
                                    .unwrap_or(&self.settings.listen_host),
                                self.settings.port
                            ),
                            e,
                        )
                    })?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "local connection ended");
                }
            });
            *slot = Some(Conn {
                client: Arc::new(client),
            });
        }
        let client = slot.as_ref().map(|c| c.client.clone()).expect("connected");
        let cancel = client.cancel_token();
        let work = async {
            if let Some(st) = statement_timeout {
                let ms = st.as_millis().max(1);
                client
                    .batch_execute(&format!("SET statement_timeout = {ms}"))
                    .await
                    .map_err(|e| PgError::sql(format!("{op}: SET statement_timeout"), e))?;
            }
            let value = f(client.clone()).await?;
            if statement_timeout.is_some() {
                client
                    .batch_execute("RESET statement_timeout")
                    .await
                    .map_err(|e| PgError::sql(format!("{op}: RESET statement_timeout"), e))?;
            }
            Ok(value)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                *slot = None;
                Err(e)
            }
            Err(_) => {
                *slot = None;
                drop(client);
                let tls = self.settings.local_tls.connector();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CANCEL_TIMEOUT, cancel.cancel_query(tls)).await;
                });
                Err(timed_out())
            }
        }
    }

    /// The per-cycle monitoring query (§5.11), one statement; on a standby without a running
    /// walreceiver, a second one for its timeline (see [`PgStatus::timeline`]).
    pub async fn query_state(&self, timeout: Duration) -> Result<PgStatus, PgError> {
        self.with_conn("monitoring query", timeout, None, |client| async move {
            let row = client
                .query_one(&status_query(), &[])
                .await
                .map_err(|e| PgError::sql("monitoring query", e))?;
            let mut status = status_from_row(&row)?;
            if status.in_recovery && status.received_timeline.is_none() {
                // Best effort: pg_ls_waldir() needs superuser or pg_monitor; without it the
                // restartpoint's timeline stands.
                match client.query_one(NEWEST_WAL_SEGMENT_TIMELINE, &[]).await {
                    Ok(row) => {
                        let newest = to_u64(row.get::<_, Option<i64>>(0)).unwrap_or(0);
                        status.timeline = status.timeline.max(newest);
                    }
                    Err(e) => tracing::debug!(error = %e, "could not list pg_wal"),
                }
            }
            Ok(status)
        })
        .await
    }

    /// Runs `sql` (simple protocol, may hold several statements) with `statement_timeout` raised
    /// to `timeout`, e.g. `CHECKPOINT`.
    pub async fn execute(&self, sql: &str, timeout: Duration) -> Result<(), PgError> {
        let op = format!("executing {}", sql.chars().take(60).collect::<String>());
        self.with_conn(&op, timeout, Some(timeout), |client| {
            let op = op.clone();
            async move { client.batch_execute(sql).await.map_err(|e| PgError::sql(op, e)) }
        })
        .await
    }

    /// Runs `sql` (simple protocol) and returns every row as text values.
    pub async fn query_rows(
        &self,
        sql: &str,
        timeout: Duration,
    ) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let op = format!("querying {}", sql.chars().take(60).collect::<String>());
        self.with_conn(&op, timeout, Some(timeout), |client| {
            let op = op.clone();
            async move {
                let messages = client.simple_query(sql).await.map_err(|e| PgError::sql(op, e))?;
                Ok(messages
                    .iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::Row(row) => {
                            Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
                        }
                        _ => None,
                    })
                    .collect())
            }
        })
        .await
    }

    /// `SELECT pg_is_in_recovery()`.
    pub async fn is_in_recovery(&self, timeout: Duration) -> Result<bool, PgError> {
        self.with_conn("pg_is_in_recovery()", timeout, None, |client| async move {
            let row = client
                .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
                .await
                .map_err(|e| PgError::sql("pg_is_in_recovery()", e))?;
            Ok(row.get::<_, bool>(0))
        })
        .await
    }

    /// `pg_is_in_recovery()` and what the startup process waits for (`None` once it is gone):
    /// how a promotion is getting on.
    pub async fn promotion_progress(&self, timeout: Duration) -> Result<(bool, Option<String>), PgError> {
        const SQL: &str = "SELECT pg_catalog.pg_is_in_recovery(), (SELECT wait_event \
             FROM pg_catalog.pg_stat_activity WHERE backend_type = 'startup' LIMIT 1)";
        self.with_conn("promotion progress", timeout, None, |client| async move {
            let row = client
                .query_one(SQL, &[])
                .await
                .map_err(|e| PgError::sql("promotion progress", e))?;
            Ok((row.get::<_, bool>(0), row.get::<_, Option<String>>(1)))
        })
        .await
    }

    /// Drops the cached connection (e.g. after a restart, or before the runtime shuts down).
    pub async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }
}
