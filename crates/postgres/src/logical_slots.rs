//! Copies of permanent logical slots on a replica (`docs/patroni-compat.md` §5.8): reading a
//! slot's state file on the primary, installing it in our `pg_replslot` while PostgreSQL is
//! stopped, and the primary's side of the check that a copy is safe to use after a failover.
//! What to copy and when is the engine's decision.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use pgvigil_api::slots::valid_slot_name;

use crate::conninfo::conninfo_escape;
use crate::{PgError, Postgres};

/// A logical slot as the primary has it, with the content of its state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryLogicalSlot {
    pub name: String,
    pub database: String,
    pub plugin: String,
    /// `catalog_xmin` (0 when unset).
    pub catalog_xmin: u64,
    pub confirmed_flush_lsn: u64,
    /// `pg_replslot/<name>/state`.
    pub state: Vec<u8>,
}

fn name_array(names: &[String]) -> Result<String, PgError> {
    match names.iter().find(|n| !valid_slot_name(n)) {
        // Valid names are `[a-z0-9_]`: nothing to quote in an array literal.
        None => Ok(format!("'{{{}}}'::name[]", names.join(","))),
        Some(bad) => Err(PgError::Invalid(format!(
            "{bad:?} is not a valid replication slot name"
        ))),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn bad_row(what: &str, line: &str) -> PgError {
    PgError::Parse {
        what: what.into(),
        detail: format!("unexpected row {line:?}"),
    }
}

/// The user that reads files on the primary: the rewind user, which has the grants for
/// `pg_read_binary_file` (Patroni uses its credentials too), else the superuser.
fn reader(pg: &Postgres) -> &crate::PgUser {
    let s = &pg.settings;
    if s.rewind.username.is_empty() {
        &s.superuser
    } else {
        &s.rewind
    }
}

impl Postgres {
    /// Rows of `sql` run on the primary at `host:port` (through `psql`, so the user's TLS
    /// keywords and the pgpass file apply as for `pg_rewind`), tab-separated.
    async fn primary_rows(
        &self,
        host: &str,
        port: u16,
        sql: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, PgError> {
        let s = &self.settings;
        let dsn = format!(
            "{} connect_timeout=3 application_name={} options={}",
            self.tool_dsn(host, port, reader(self)),
            conninfo_escape(&format!("{} slot copy", s.name)),
            conninfo_escape(&format!("-c statement_timeout={}", timeout.as_millis())),
        );
        let out = self.psql(dsn, sql, timeout + Duration::from_secs(5)).await?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The logical slots among `names` on the primary at `host:port`, with their state files
    /// (Patroni's query in `copy_logical_slots`). A server in recovery answers nothing.
    pub async fn primary_logical_slots(
        &self,
        host: &str,
        port: u16,
        names: &[String],
        timeout: Duration,
    ) -> Result<Vec<PrimaryLogicalSlot>, PgError> {
        let sql = format!(
            "SELECT slot_name, datname, plugin, coalesce(catalog_xmin::text, '0'),
                    pg_catalog.pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint,
                    pg_catalog.encode(pg_catalog.pg_read_binary_file('pg_replslot/' || slot_name || '/state'), 'hex')
               FROM pg_catalog.pg_get_replication_slots() JOIN pg_catalog.pg_database ON datoid = oid
              WHERE slot_type = 'logical' AND NOT temporary AND NOT pg_catalog.pg_is_in_recovery()
                AND slot_name = ANY({})",
            name_array(names)?
        );
        let rows = self.primary_rows(host, port, &sql, timeout).await?;
        rows.iter()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                let bad = || bad_row("the primary's logical slots", line);
                let [name, database, plugin, xmin, lsn, state] = f[..] else {
                    return Err(bad());
                };
                Ok(PrimaryLogicalSlot {
                    name: name.into(),
                    database: database.into(),
                    plugin: plugin.into(),
                    catalog_xmin: xmin.parse().map_err(|_| bad())?,
                    confirmed_flush_lsn: lsn.parse().map_err(|_| bad())?,
                    state: decode_hex(state).ok_or_else(bad)?,
                })
            })
            .collect()
    }

    /// `catalog_xmin` (0 when unset) of the slots among `names` on the primary at
    /// `host:port`; a slot it does not have is left out (Patroni's
    /// `check_logical_slots_readiness` query).
    pub async fn primary_catalog_xmins(
        &self,
        host: &str,
        port: u16,
        names: &[String],
        timeout: Duration,
    ) -> Result<Vec<(String, u64)>, PgError> {
        let sql = format!(
            "SELECT slot_name, coalesce(catalog_xmin::text, '0') FROM pg_catalog.pg_get_replication_slots()
              WHERE NOT pg_catalog.pg_is_in_recovery() AND slot_name = ANY({})",
            name_array(names)?
        );
        let rows = self.primary_rows(host, port, &sql, timeout).await?;
        rows.iter()
            .map(|line| {
                let bad = || bad_row("the primary's slots", line);
                let (name, xmin) = line.split_once('\t').ok_or_else(bad)?;
                Ok((name.to_string(), xmin.parse().map_err(|_| bad())?))
            })
            .collect()
    }

    /// `catalog_xmin` (0 when unset) of our logical slots.
    pub async fn local_catalog_xmins(&self, timeout: Duration) -> Result<Vec<(String, u64)>, PgError> {
        let rows = self
            .query_rows(
                "SELECT slot_name, coalesce(catalog_xmin::text, '0') FROM pg_catalog.pg_replication_slots
                  WHERE slot_type = 'logical' AND NOT temporary",
                timeout,
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| match &r[..] {
                [Some(name), Some(xmin)] => Some((name.clone(), xmin.parse().ok()?)),
                _ => None,
            })
            .collect())
    }

    /// Writes a slot's state file into `pg_replslot/<name>` (PostgreSQL must be stopped: it
    /// reads slots at start-up). Built in `<name>.tmp`, which PostgreSQL ignores and removes,
    /// then renamed into place; the file and both directories are fsynced, as PostgreSQL does
    /// for its own slots.
    pub fn install_slot_state(&self, name: &str, state: &[u8]) -> Result<(), PgError> {
        if let Some(pid) = self.postmaster_pid() {
            return Err(PgError::StillRunning {
                op: "installing a replication slot",
                pid,
            });
        }
        if !valid_slot_name(name) {
            return Err(PgError::Invalid(format!(
                "{name:?} is not a valid replication slot name"
            )));
        }
        let replslot = self.settings.data_dir.join("pg_replslot");
        // Group access when the data directory allows it (initdb --allow-group-access).
        let group = fs::metadata(&self.settings.data_dir)
            .map(|m| m.permissions().mode() & 0o050 != 0)
            .unwrap_or(false);
        let (dir_mode, file_mode) = if group { (0o750, 0o640) } else { (0o700, 0o600) };
        let dir = replslot.join(name);
        let tmp = replslot.join(format!("{name}.tmp"));
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |e| PgError::io(op, path, e)
        };
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
        }
        fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(dir_mode)).map_err(io("chmod", &tmp))?;
        let file = tmp.join("state");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file_mode)
            .open(&file)
            .map_err(io("create", &file))?;
        f.write_all(state).map_err(io("write", &file))?;
        f.sync_all().map_err(io("fsync", &file))?;
        sync_dir(&tmp)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        fs::rename(&tmp, &dir).map_err(io("rename", &tmp))?;
        sync_dir(&dir)?;
        sync_dir(&replslot)
    }
}

fn sync_dir(dir: &Path) -> Result<(), PgError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PgError::io("fsync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_names() {
        assert_eq!(decode_hex("00a1FF\n"), Some(vec![0, 0xa1, 0xff]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(
            name_array(&["cdc".into(), "b_2".into()]).unwrap(),
            "'{cdc,b_2}'::name[]"
        );
        assert!(name_array(&["x'y".into()]).is_err());
    }
}
