//! Replication slots (`docs/patroni-compat.md` §5.8): the statements that carry out the engine's
//! slot plan. Which slots to create, drop or advance is decided by the engine; each call here
//! does one slot, so one failure does not hold up the others.

use std::time::Duration;

use pgvigil_api::lsn::format_lsn;
use pgvigil_api::slots::valid_slot_name;

use crate::{PgError, Postgres};

const SLOTS_TIMEOUT: Duration = Duration::from_secs(10);
/// Advancing a logical slot decodes the WAL in between; Patroni gives it all the time it needs
/// on a thread of its own, ours runs on the supervisor's task, off the loop.
const ADVANCE_TIMEOUT: Duration = Duration::from_secs(60);
/// SQLSTATE `object_in_use`: the slot became active between our check and the drop.
const OBJECT_IN_USE: &str = "55006";

fn check_name(name: &str) -> Result<(), PgError> {
    if valid_slot_name(name) {
        Ok(())
    } else {
        Err(PgError::Invalid(format!(
            "{name:?} is not a valid replication slot name"
        )))
    }
}

impl Postgres {
    /// Creates a physical slot that reserves WAL at once, unless one of that name exists.
    pub async fn create_physical_slot(&self, name: &str) -> Result<(), PgError> {
        check_name(name)?;
        let op = format!("creating replication slot {name}");
        let what = op.clone();
        self.with_conn(&what, SLOTS_TIMEOUT, Some(SLOTS_TIMEOUT), |client| async move {
            client
                .execute(
                    "SELECT pg_catalog.pg_create_physical_replication_slot($1, true)
                      WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots
                                         WHERE slot_name = $1)",
                    &[&name],
                )
                .await
                .map_err(|e| PgError::sql(op, e))
                .map(drop)
        })
        .await
    }

    /// Runs `work` on a connection of its own to `database` (a logical slot belongs to one),
    /// with `statement_timeout` set to `timeout` and the whole bounded a little beyond it.
    async fn in_database<T, F, Fut>(
        &self,
        database: &str,
        op: &str,
        timeout: Duration,
        work: F,
    ) -> Result<T, PgError>
    where
        F: FnOnce(tokio_postgres::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, PgError>>,
    {
        let mut cfg = self.connect_config();
        cfg.dbname(database)
            .options(format!("-c statement_timeout={}", timeout.as_millis()));
        let run = async {
            let (client, connection) = cfg
                .connect(self.settings.local_tls.connector())
                .await
                .map_err(|e| PgError::sql(format!("{op}: connecting"), e))?;
            let conn = tokio::spawn(connection);
            let done = work(client).await;
            let _ = conn.await;
            done
        };
        tokio::time::timeout(timeout + Duration::from_secs(2), run)
            .await
            .map_err(|_| PgError::Timeout {
                op: op.to_string(),
                timeout,
            })?
    }

    /// Creates a logical slot in `database` with `plugin`, unless one of that name exists. The
    /// creation waits for transactions running at that moment, hence the longer timeout.
    pub async fn create_logical_slot(&self, name: &str, database: &str, plugin: &str) -> Result<(), PgError> {
        check_name(name)?;
        let op = format!("creating logical replication slot {name} in database {database}");
        let what = op.clone();
        self.in_database(database, &what, SLOTS_TIMEOUT, |client| async move {
            client
                .execute(
                    "SELECT pg_catalog.pg_create_logical_replication_slot($1, $2)
                      WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots
                                         WHERE slot_name = $1)",
                    &[&name, &plugin],
                )
                .await
                .map_err(|e| PgError::sql(op, e))
                .map(drop)
        })
        .await
    }

    /// Moves an inactive logical slot forward to `lsn`, in its database, but never past what a
    /// replica has replayed (or a primary flushed) nor backwards: then nothing happens
    /// (Patroni's `min(lsn, replay_lsn)`). Decoding the WAL in between may take a while.
    pub async fn advance_logical_slot(&self, name: &str, database: &str, lsn: u64) -> Result<(), PgError> {
        check_name(name)?;
        let op = format!("advancing logical replication slot {name}");
        let to = format_lsn(lsn);
        let what = op.clone();
        self.in_database(database, &what, ADVANCE_TIMEOUT, |client| async move {
            client
                .execute(
                    "SELECT pg_catalog.pg_replication_slot_advance(slot_name, target)
                       FROM (SELECT slot_name, confirmed_flush_lsn,
                                    LEAST($2::text::pg_lsn,
                                          CASE WHEN pg_catalog.pg_is_in_recovery()
                                               THEN pg_catalog.pg_last_wal_replay_lsn()
                                               ELSE pg_catalog.pg_current_wal_flush_lsn() END) AS target
                               FROM pg_catalog.pg_replication_slots
                              WHERE slot_name = $1 AND slot_type = 'logical' AND NOT active) s
                      WHERE target > confirmed_flush_lsn",
                    &[&name, &to],
                )
                .await
                .map_err(|e| PgError::sql(op, e))
                .map(drop)
        })
        .await
    }

    /// Drops the slot if it exists and no walsender or decoding session uses it. Returns
    /// whether it was dropped.
    pub async fn drop_slot(&self, name: &str) -> Result<bool, PgError> {
        let op = format!("dropping replication slot {name}");
        let what = op.clone();
        self.with_conn(&what, SLOTS_TIMEOUT, Some(SLOTS_TIMEOUT), |client| async move {
            let dropped = client
                .execute(
                    "SELECT pg_catalog.pg_drop_replication_slot(slot_name)
                       FROM pg_catalog.pg_replication_slots
                      WHERE slot_name = $1 AND NOT active AND NOT temporary",
                    &[&name],
                )
                .await;
            match dropped {
                Ok(n) => Ok(n > 0),
                // It became active between our check and the drop: it stays.
                Err(e) if e.code().map(|c| c.code()) == Some(OBJECT_IN_USE) => Ok(false),
                Err(e) => Err(PgError::sql(op, e)),
            }
        })
        .await
    }

    /// Moves an inactive slot forward to `lsn` (PostgreSQL stops at what it has replayed).
    pub async fn advance_slot(&self, name: &str, lsn: u64) -> Result<(), PgError> {
        let op = format!("advancing replication slot {name}");
        let to = format_lsn(lsn);
        let what = op.clone();
        self.with_conn(&what, SLOTS_TIMEOUT, Some(SLOTS_TIMEOUT), |client| async move {
            client
                .execute(
                    "SELECT pg_catalog.pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&name, &to],
                )
                .await
                .map_err(|e| PgError::sql(op, e))
                .map(drop)
        })
        .await
    }
}
