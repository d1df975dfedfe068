//! Replication-protocol questions (`docs/patroni-compat.md` §5.5): `IDENTIFY_SYSTEM` and
//! `TIMELINE_HISTORY` over a physical replication connection (`replication=true`), which
//! tokio-postgres cannot open; we ask `psql`, as the replication user with the pgpass file. The
//! data for the divergence check; the decision itself belongs to the engine.

use std::ffi::{OsStr, OsString};
use std::time::Duration;

use pgvigil_api::lsn::parse_lsn;

use crate::command::run_tool;
use crate::conninfo::conninfo_escape;
use crate::{PgError, Postgres};

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_identifier: String,
    /// The server's current timeline (on a standby: the one it replays).
    pub timeline: u64,
    /// Current WAL flush position (standby: last replayed/received), bytes.
    pub xlogpos: u64,
}

/// One line of a timeline history file: timeline `parent_timeline` ended at `switch_lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineHistoryEntry {
    pub parent_timeline: u64,
    pub switch_lsn: u64,
    pub reason: String,
}

/// Parses the content of a `0000000N.history` file (blank and `#` lines skipped).
pub fn parse_timeline_history(text: &str) -> Result<Vec<TimelineHistoryEntry>, PgError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(3, ['\t', ' ']);
        let bad = || PgError::Parse {
            what: "timeline history".into(),
            detail: format!("bad line {line:?}"),
        };
        let parent_timeline = fields
            .next()
            .and_then(|f| f.trim().parse().ok())
            .ok_or_else(bad)?;
        let switch_lsn = fields.next().and_then(|f| parse_lsn(f.trim())).ok_or_else(bad)?;
        let reason = fields.next().unwrap_or_default().trim().to_string();
        out.push(TimelineHistoryEntry {
            parent_timeline,
            switch_lsn,
            reason,
        });
    }
    Ok(out)
}

impl Postgres {
    async fn replication_command(
        &self,
        host: &str,
        port: u16,
        command: &str,
        timeout: Duration,
    ) -> Result<String, PgError> {
        let s = &self.settings;
        let dsn = format!(
            "{} replication=true connect_timeout=3 application_name={}",
            self.tool_dsn(host, port, &s.replication),
            conninfo_escape(&format!("{} replication check", s.name)),
        );
        self.psql(dsn, command, timeout).await
    }

    /// `command` run by `psql` on `dsn` with the pgpass file: unaligned, tab-separated rows.
    pub(crate) async fn psql(
        &self,
        dsn: String,
        command: &str,
        timeout: Duration,
    ) -> Result<String, PgError> {
        let args: Vec<OsString> = ["-X", "-A", "-t", "-q", "-F", "\t", "-v", "ON_ERROR_STOP=1"]
            .iter()
            .map(OsString::from)
            .chain(["-c".into(), command.into(), "-d".into(), dsn.into()])
            .collect();
        let env = [
            ("PGPASSFILE", self.settings.pgpass.as_os_str()),
            ("LC_ALL", OsStr::new("C")),
        ];
        let out = run_tool(&self.bin("psql"), &args, &env, timeout).await?;
        Ok(out.stdout)
    }

    /// `IDENTIFY_SYSTEM` on `host:port` (ours or the leader's).
    pub async fn identify_system(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<SystemIdentity, PgError> {
        let text = self
            .replication_command(host, port, "IDENTIFY_SYSTEM", timeout)
            .await?;
        let line = text.lines().next().unwrap_or_default();
        let fields: Vec<&str> = line.split('\t').collect();
        let bad = || PgError::Parse {
            what: "IDENTIFY_SYSTEM".into(),
            detail: format!("unexpected answer {line:?}"),
        };
        if fields.len() < 3 {
            return Err(bad());
        }
        Ok(SystemIdentity {
            system_identifier: fields[0].to_string(),
            timeline: fields[1].parse().map_err(|_| bad())?,
            xlogpos: parse_lsn(fields[2]).ok_or_else(bad)?,
        })
    }

    /// `TIMELINE_HISTORY <timeline>` on `host:port`: how the server got to `timeline`. Timeline 1
    /// has no history (empty list).
    pub async fn timeline_history(
        &self,
        host: &str,
        port: u16,
        timeline: u64,
        timeout: Duration,
    ) -> Result<Vec<TimelineHistoryEntry>, PgError> {
        if timeline <= 1 {
            return Ok(Vec::new());
        }
        let text = self
            .replication_command(host, port, &format!("TIMELINE_HISTORY {timeline}"), timeout)
            .await?;
        // One row: file name, tab, file content (which spans several lines).
        let content = text.split_once('\t').map(|(_, c)| c).unwrap_or_default();
        parse_timeline_history(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_lines() {
        let text = "1\t0/3000148\tno recovery target specified\n\n\
                    # comment\n2\t1/A0000000\tbefore 2024-01-01\n3\t1/B0\n";
        let h = parse_timeline_history(text).unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(
            h[0],
            TimelineHistoryEntry {
                parent_timeline: 1,
                switch_lsn: 0x300_0148,
                reason: "no recovery target specified".into()
            }
        );
        assert_eq!(h[1].switch_lsn, 0x1_A000_0000);
        assert_eq!(h[2].reason, "");
        assert!(parse_timeline_history("x\t0/1\n").is_err());
        assert!(parse_timeline_history("1\tnope\n").is_err());
    }
}
