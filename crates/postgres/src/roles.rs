//! Roles created after bootstrap (`docs/patroni-compat.md` §5.3 step 4) and physical replication
//! slots (§5.8).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::{PgError, Postgres};

const ROLES_TIMEOUT: Duration = Duration::from_secs(30);
const SLOTS_TIMEOUT: Duration = Duration::from_secs(10);
/// SQLSTATE `object_in_use`: the slot became active between our check and the drop.
const OBJECT_IN_USE: &str = "55006";

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

/// The slot name of a member (§5.8): lower-cased; `-` and `.` become `_`; any other character
/// outside `[a-z0-9_]` becomes `u` + its code point in (at least) 4 decimal digits; at most 63
/// characters.
pub fn slot_name_for(member: &str) -> String {
    let mut out = String::new();
    for c in member.to_lowercase().chars() {
        match c {
            'a'..='z' | '0'..='9' | '_' => out.push(c),
            '-' | '.' => out.push('_'),
            other => out.push_str(&format!("u{:04}", other as u32)),
        }
    }
    out.chars().take(63).collect()
}

fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Postgres {
    /// Same as the free function [`slot_name_for`].
    pub fn slot_name_for(member: &str) -> String {
        slot_name_for(member)
    }

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

    /// Makes the physical slots match `wanted`: creates the missing ones
    /// (`pg_create_physical_replication_slot(name, true)` guarded by "not exists") and drops
    /// inactive physical slots not in `wanted`. Active slots and logical slots are never dropped.
    pub async fn ensure_physical_slots(&self, wanted: &[String]) -> Result<(), PgError> {
        if let Some(bad) = wanted.iter().find(|n| !valid_slot_name(n)) {
            return Err(PgError::Invalid(format!(
                "{bad:?} is not a valid replication slot name"
            )));
        }
        let wanted: BTreeSet<String> = wanted.iter().cloned().collect();
        self.with_conn(
            "managing replication slots",
            SLOTS_TIMEOUT,
            Some(SLOTS_TIMEOUT),
            |client| async move {
                let err = |what: String| move |e| PgError::sql(what, e);
                let rows = client
                    .query(
                        "SELECT slot_name::text, slot_type, active FROM pg_catalog.pg_replication_slots",
                        &[],
                    )
                    .await
                    .map_err(err("listing replication slots".into()))?;
                let existing: Vec<(String, String, bool)> =
                    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
                for name in &wanted {
                    if existing.iter().any(|(n, _, _)| n == name) {
                        continue;
                    }
                    client
                        .execute(
                            "SELECT pg_catalog.pg_create_physical_replication_slot($1, true)
                              WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots
                                                 WHERE slot_name = $1)",
                            &[name],
                        )
                        .await
                        .map_err(err(format!("creating replication slot {name}")))?;
                    tracing::info!(slot = %name, "created physical replication slot");
                }
                for (name, kind, active) in &existing {
                    if kind != "physical" || *active || wanted.contains(name) {
                        continue;
                    }
                    let dropped = client
                        .execute(
                            "SELECT pg_catalog.pg_drop_replication_slot(slot_name)
                               FROM pg_catalog.pg_replication_slots
                              WHERE slot_name = $1 AND slot_type = 'physical' AND NOT active",
                            &[name],
                        )
                        .await;
                    match dropped {
                        Ok(_) => tracing::info!(slot = %name, "dropped physical replication slot"),
                        Err(e) if e.code().map(|c| c.code()) == Some(OBJECT_IN_USE) => {
                            tracing::info!(slot = %name, "slot became active, not dropped");
                        }
                        Err(e) => return Err(PgError::sql(format!("dropping replication slot {name}"), e)),
                    }
                }
                Ok(())
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        assert_eq!(slot_name_for("node-1"), "node_1");
        assert_eq!(slot_name_for("Pg.Node_2"), "pg_node_2");
        assert_eq!(slot_name_for("a b"), "au0032b");
        assert_eq!(slot_name_for("x@y"), "xu0064y");
        assert_eq!(slot_name_for("é"), "u0233");
        assert_eq!(slot_name_for("😀"), "u128512");
        assert_eq!(slot_name_for(&"a".repeat(70)).len(), 63);
        assert_eq!(slot_name_for(&"-".repeat(70)), "_".repeat(63));
        // Truncation happens after the replacement.
        let long = format!("{}#", "b".repeat(61));
        assert_eq!(slot_name_for(&long), format!("{}u0", "b".repeat(61)));
        for name in ["node-1", "Pg.Node_2", "a b", "😀"] {
            assert!(valid_slot_name(&slot_name_for(name)));
        }
        assert!(!valid_slot_name("Bad"));
        assert!(!valid_slot_name(""));
    }
}
