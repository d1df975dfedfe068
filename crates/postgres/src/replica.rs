//! Creating a data directory: `initdb` (`docs/patroni-compat.md` §5.3), `pg_basebackup` (§5.4);
//! repairing one: `pg_rewind` (§5.5).

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::time::{Duration, Instant};

use crate::command::run_tool;
use crate::controldata::ControlData;
use crate::datadir::{empty_dir, remove_if_exists};
use crate::{PgError, Postgres};

const INITDB_TIMEOUT: Duration = Duration::from_secs(300);
/// Pause between the two `pg_basebackup` attempts (Patroni: 5 s).
const BASEBACKUP_RETRY_PAUSE: Duration = Duration::from_secs(5);

fn arg(prefix: &str, value: impl AsRef<OsStr>) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(value);
    s
}

impl Postgres {
    /// Runs `initdb --pgdata=<data_dir> --username=<superuser> [--pwfile=<tmp>] <extra_args>`.
    /// The password goes through a temporary 0600 file, never the command line. A non-empty data
    /// directory is the caller's business (initdb refuses it).
    pub async fn initdb(&self, extra_args: &[String]) -> Result<(), PgError> {
        let s = &self.settings;
        let mut args = vec![
            arg("--pgdata=", &s.data_dir),
            arg("--username=", &s.superuser.username),
        ];
        // Kept alive until initdb finished; removed on drop.
        let mut pwfile = None;
        if let Some(password) = s.superuser.effective_password() {
            let mut file = tempfile::Builder::new()
                .prefix("pgvigil-pwfile.")
                .tempfile()
                .map_err(|e| PgError::io("create", std::env::temp_dir(), e))?;
            writeln!(file, "{password}")
                .and_then(|_| file.flush())
                .map_err(|e| PgError::io("write", file.path(), e))?;
            args.push(arg("--pwfile=", file.path()));
            pwfile = Some(file);
        }
        args.extend(extra_args.iter().map(OsString::from));
        let timeout = self.default_timeout().max(INITDB_TIMEOUT);
        let result = run_tool(&self.bin("initdb"), &args, &[], timeout).await;
        drop(pwfile);
        result.map(|_| ())
    }

    /// Clones the data directory from `source_host:source_port` (§5.4):
    /// `pg_basebackup --pgdata=<data_dir> -X stream --dbname="host=.. port=.. user=<replication>
    /// dbname=.." <extra_args>`, the password coming from the pgpass file (`PGPASSFILE`). The
    /// directory is emptied before each of the two attempts (5 s apart) and after a final failure.
    /// Write the pgpass file first; pass `--checkpoint=fast` in `extra_args` not to wait for a
    /// spread checkpoint on the source.
    pub async fn basebackup(
        &self,
        source_host: &str,
        source_port: u16,
        extra_args: &[String],
        timeout: Duration,
    ) -> Result<(), PgError> {
        if let Some(pid) = self.postmaster_pid() {
            return Err(PgError::StillRunning {
                op: "pg_basebackup",
                pid,
            });
        }
        let s = &self.settings;
        let deadline = Instant::now() + timeout;
        let dsn = self.tool_dsn(source_host, source_port, &s.replication);
        let mut args = vec![
            arg("--pgdata=", &s.data_dir),
            "-X".into(),
            "stream".into(),
            arg("--dbname=", &dsn),
        ];
        args.extend(extra_args.iter().map(OsString::from));
        let env = [("PGPASSFILE", s.pgpass.as_os_str())];
        let mut attempt = 1;
        loop {
            empty_dir(&s.data_dir)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match run_tool(&self.bin("pg_basebackup"), &args, &env, left).await {
                Ok(_) => {
                    tracing::info!(source = %format!("{source_host}:{source_port}"), "base backup done");
                    return Ok(());
                }
                Err(e) => e,
            };
            tracing::warn!(attempt, error = %err, "pg_basebackup failed");
            let left = deadline.saturating_duration_since(Instant::now());
            if attempt >= 2 || left <= BASEBACKUP_RETRY_PAUSE {
                empty_dir(&s.data_dir)?;
                return Err(err);
            }
            attempt += 1;
            tokio::time::sleep(BASEBACKUP_RETRY_PAUSE).await;
        }
    }

    /// Whether `pg_rewind` can be used on this data directory: the binary exists and the cluster
    /// has `wal_log_hints` or data checksums (§5.5; `use_pg_rewind` is the caller's).
    pub fn can_rewind(&self, cd: &ControlData) -> bool {
        self.bin("pg_rewind").is_file() && (cd.wal_log_hints || cd.data_checksums)
    }

    /// Rewinds the (stopped) data directory to the timeline of `source_host:source_port`:
    /// `pg_rewind -D <data_dir> --source-server "<dsn without password>"` with `PGPASSFILE`,
    /// `LANG=C` and `PGOPTIONS=-c statement_timeout=0`, as the rewind user (the superuser when
    /// none is set). PostgreSQL 15's pg_rewind runs crash recovery itself on an unclean target;
    /// for that the signal files are removed first. pg_rewind copies the source's configuration
    /// files: call [`Postgres::write_config`] before starting.
    pub async fn rewind(
        &self,
        source_host: &str,
        source_port: u16,
        timeout: Duration,
    ) -> Result<(), PgError> {
        if let Some(pid) = self.postmaster_pid() {
            return Err(PgError::StillRunning { op: "pg_rewind", pid });
        }
        let s = &self.settings;
        let user = if s.rewind.username.is_empty() {
            &s.superuser
        } else {
            &s.rewind
        };
        // Single-user crash recovery refuses to run in standby mode.
        remove_if_exists(&s.data_dir.join("standby.signal"))?;
        remove_if_exists(&s.data_dir.join("recovery.signal"))?;
        let dsn = self.tool_dsn(source_host, source_port, user);
        let mut args = vec![
            "-D".into(),
            s.data_dir.clone().into_os_string(),
            arg("--source-server=", &dsn),
        ];
        if s.config_dir != s.data_dir {
            args.push(arg("--config-file=", s.config_dir.join("postgresql.conf")));
        }
        let c = OsStr::new("C");
        let env = [
            ("PGPASSFILE", s.pgpass.as_os_str()),
            ("LANG", c),
            ("LC_ALL", c),
            ("PGOPTIONS", OsStr::new("-c statement_timeout=0")),
        ];
        let out = run_tool(&self.bin("pg_rewind"), &args, &env, timeout).await?;
        tracing::info!(
            source = %format!("{source_host}:{source_port}"),
            output = %crate::error::tail(&format!("{}\n{}", out.stdout, out.stderr), 500),
            "pg_rewind done"
        );
        Ok(())
    }
}
