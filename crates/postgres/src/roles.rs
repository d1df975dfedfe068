//! Roles created after bootstrap (`docs/patroni-compat.md` §5.3 step 4).

use std::time::Duration;

use serde::Serialize;

use crate::{PgError, Postgres};

const ROLES_TIMEOUT: Duration = Duration::from_secs(30);

/// One role for the DO block; the block reads the list from a transaction-local setting, so
/// names and passwords never appear inside SQL text and are quoted by `format('%I'/'%L')`.
#[derive(Serialize)]
struct RoleSpec<'a> {
    name: &'a str,
    password: Option<&'a str>,
    /// `superuser`, `replication` or `rewind`; mapped to fixed attribute lists in SQL.
    kind: &'static str,
}

/// Runs with the statement-logging settings turned off for the transaction, so the password
/// does not reach the server log.
const QUIET: &str = "BEGIN;
SET LOCAL synchronous_commit = 'local';
SET LOCAL log_statement = 'none';
SET LOCAL log_min_duration_statement = -1;
SET LOCAL log_min_error_statement = 'panic';
SELECT pg_catalog.set_config(name, CASE name WHEN 'pgaudit.log' THEN 'none' ELSE 'off' END, true)
  FROM pg_catalog.pg_settings
 WHERE name IN ('pg_stat_statements.track_utility', 'pgaudit.log');";

const ROLES_DO: &str = "DO $pgvigil$
DECLARE
  r record;
  stmt text;
BEGIN
  FOR r IN SELECT * FROM pg_catalog.json_to_recordset(
             pg_catalog.current_setting('pgvigil.roles')::json) AS x(name text, password text, kind text)
  LOOP
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r.name) THEN
      stmt := pg_catalog.format('ALTER ROLE %I WITH ', r.name);
    ELSE
      stmt := pg_catalog.format('CREATE ROLE %I WITH ', r.name);
    END IF;
    stmt := stmt || CASE r.kind WHEN 'superuser' THEN 'SUPERUSER LOGIN'
                                WHEN 'replication' THEN 'REPLICATION LOGIN'
                                ELSE 'LOGIN' END;
    IF r.password IS NOT NULL THEN
      stmt := stmt || pg_catalog.format(' PASSWORD %L', r.password);
    END IF;
    EXECUTE stmt;
    IF r.kind = 'rewind' THEN
      EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO %I', r.name);
      EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO %I', r.name);
      EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO %I', r.name);
      EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO %I', r.name);
    END IF;
  END LOOP;
END
$pgvigil$";

impl Postgres {
    /// Creates or alters the configured roles (§5.3 step 4), in one transaction with
    /// `synchronous_commit = local` and statement logging off: the superuser (`SUPERUSER LOGIN
    /// PASSWORD`) when it has a password, the replication user (`REPLICATION LOGIN [PASSWORD]`),
    /// and a rewind user distinct from the superuser (`LOGIN [PASSWORD]` plus EXECUTE on the
    /// functions pg_rewind needs).
    pub async fn create_roles(&self) -> Result<(), PgError> {
        let s = &self.settings;
        let mut roles = Vec::new();
        if !s.superuser.username.is_empty() && s.superuser.effective_password().is_some() {
            roles.push(RoleSpec {
                name: &s.superuser.username,
                password: s.superuser.effective_password(),
                kind: "superuser",
            });
        }
        if !s.replication.username.is_empty() {
            roles.push(RoleSpec {
                name: &s.replication.username,
                password: s.replication.effective_password(),
                kind: "replication",
            });
        }
        if !s.rewind.username.is_empty() && s.rewind.username != s.superuser.username {
            roles.push(RoleSpec {
                name: &s.rewind.username,
                password: s.rewind.effective_password(),
                kind: "rewind",
            });
        }
        if roles.is_empty() {
            return Ok(());
        }
        let spec = serde_json::to_string(&roles).map_err(|e| PgError::Invalid(e.to_string()))?;
        self.with_conn(
            "creating roles",
            ROLES_TIMEOUT,
            Some(ROLES_TIMEOUT),
            |client| async move {
                let step = |what: &'static str| move |e| PgError::sql(format!("creating roles: {what}"), e);
                client.batch_execute(QUIET).await.map_err(step("BEGIN"))?;
                client
                    .execute(
                        "SELECT pg_catalog.set_config('pgvigil.roles', $1, true)",
                        &[&spec],
                    )
                    .await
                    .map_err(step("set_config"))?;
                client.batch_execute(ROLES_DO).await.map_err(step("DO"))?;
                client.batch_execute("COMMIT").await.map_err(step("COMMIT"))?;
                Ok(())
            },
        )
        .await
    }
}
