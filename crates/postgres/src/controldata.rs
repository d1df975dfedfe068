//! `pg_controldata`, run with `LANG=C LC_ALL=C` and parsed (`docs/patroni-compat.md` §5.1).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::time::Duration;

use pgvigil_api::lsn::parse_lsn;

use crate::command::run_tool;
use crate::{PgError, Postgres};

const CONTROLDATA_TIMEOUT: Duration = Duration::from_secs(30);

/// `Database cluster state` of pg_control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// `shut down`: a clean primary shutdown.
    ShutDown,
    /// `shut down in recovery`: a clean standby shutdown.
    ShutDownInRecovery,
    ShuttingDown,
    InCrashRecovery,
    InArchiveRecovery,
    /// `in production`: a running primary, or one that crashed / was killed.
    InProduction,
    Other(String),
}

impl ClusterState {
    pub fn parse(text: &str) -> ClusterState {
        match text.trim() {
            "shut down" => ClusterState::ShutDown,
            "shut down in recovery" => ClusterState::ShutDownInRecovery,
            "shutting down" => ClusterState::ShuttingDown,
            "in crash recovery" => ClusterState::InCrashRecovery,
            "in archive recovery" => ClusterState::InArchiveRecovery,
            "in production" => ClusterState::InProduction,
            other => ClusterState::Other(other.to_string()),
        }
    }

    /// The server was shut down cleanly (as primary or as standby).
    pub fn is_clean_shutdown(&self) -> bool {
        matches!(self, ClusterState::ShutDown | ClusterState::ShutDownInRecovery)
    }
}

/// The parts of `pg_controldata` output pgvigil uses, plus every line in `raw` (keys without
/// the `Current ` prefix older versions print).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlData {
    pub cluster_state: ClusterState,
    pub system_identifier: String,
    /// `Latest checkpoint location`, bytes.
    pub checkpoint_lsn: u64,
    /// `Latest checkpoint's REDO location`, bytes.
    pub checkpoint_redo_lsn: u64,
    /// `Latest checkpoint's REDO WAL file`.
    pub checkpoint_redo_wal_file: String,
    /// `Latest checkpoint's TimeLineID`.
    pub checkpoint_timeline: u64,
    /// `Latest checkpoint's PrevTimeLineID`.
    pub checkpoint_prev_timeline: u64,
    /// `Minimum recovery ending location`, bytes (0 on a primary).
    pub min_recovery_lsn: u64,
    /// `Min recovery ending loc's timeline` (0 on a primary).
    pub min_recovery_timeline: u64,
    pub wal_level: String,
    pub wal_log_hints: bool,
    /// `Data page checksum version` is not 0.
    pub data_checksums: bool,
    pub max_connections: u64,
    pub max_worker_processes: u64,
    pub max_wal_senders: u64,
    pub max_prepared_xacts: u64,
    pub max_locks_per_xact: u64,
    pub track_commit_timestamp: bool,
    /// `Bytes per WAL segment`.
    pub wal_segment_size: u64,
    pub raw: BTreeMap<String, String>,
}

impl ControlData {
    /// Parses the text `pg_controldata` prints under `LANG=C`.
    pub fn parse(text: &str) -> Result<ControlData, PgError> {
        let mut raw = BTreeMap::new();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim();
            let key = key.strip_prefix("Current ").unwrap_or(key);
            raw.insert(key.to_string(), value.trim().to_string());
        }
        let err = |detail: String| PgError::Parse {
            what: "pg_controldata output".into(),
            detail,
        };
        let get = |key: &str| raw.get(key).map(String::as_str);
        let required = |key: &str| get(key).ok_or_else(|| err(format!("no {key:?} line")));
        let lsn = |key: &str| -> Result<u64, PgError> {
            match get(key) {
                None => Ok(0),
                Some(v) => parse_lsn(v).ok_or_else(|| err(format!("{key}: bad LSN {v:?}"))),
            }
        };
        let num = |key: &str| -> Result<u64, PgError> {
            match get(key) {
                None => Ok(0),
                Some(v) => v.parse().map_err(|_| err(format!("{key}: bad number {v:?}"))),
            }
        };
        let on = |key: &str| get(key) == Some("on");

        let cluster_state = ClusterState::parse(required("Database cluster state")?);
        let system_identifier = required("Database system identifier")?.to_string();
        required("Latest checkpoint location")?;
        required("Latest checkpoint's TimeLineID")?;
        Ok(ControlData {
            cluster_state,
            system_identifier,
            checkpoint_lsn: lsn("Latest checkpoint location")?,
            checkpoint_redo_lsn: lsn("Latest checkpoint's REDO location")?,
            checkpoint_redo_wal_file: get("Latest checkpoint's REDO WAL file")
                .unwrap_or_default()
                .to_string(),
            checkpoint_timeline: num("Latest checkpoint's TimeLineID")?,
            checkpoint_prev_timeline: num("Latest checkpoint's PrevTimeLineID")?,
            min_recovery_lsn: lsn("Minimum recovery ending location")?,
            min_recovery_timeline: num("Min recovery ending loc's timeline")?,
            wal_level: get("wal_level setting").unwrap_or_default().to_string(),
            wal_log_hints: on("wal_log_hints setting"),
            data_checksums: get("Data page checksum version").is_some_and(|v| v != "0"),
            max_connections: num("max_connections setting")?,
            max_worker_processes: num("max_worker_processes setting")?,
            max_wal_senders: num("max_wal_senders setting")?,
            max_prepared_xacts: num("max_prepared_xacts setting")?,
            max_locks_per_xact: num("max_locks_per_xact setting")?,
            track_commit_timestamp: on("track_commit_timestamp setting"),
            wal_segment_size: num("Bytes per WAL segment")?,
            raw,
        })
    }
}

impl Postgres {
    /// Runs `pg_controldata` on the data directory (with `LANG=C LC_ALL=C`) and parses it.
    /// Works whether or not PostgreSQL runs; must not be called while a clone is being written.
    pub async fn controldata(&self) -> Result<ControlData, PgError> {
        let args: Vec<OsString> = vec![self.settings.data_dir.clone().into_os_string()];
        let c = OsStr::new("C");
        let out = run_tool(
            &self.bin("pg_controldata"),
            &args,
            &[("LANG", c), ("LC_ALL", c), ("LC_MESSAGES", c)],
            CONTROLDATA_TIMEOUT,
        )
        .await?;
        ControlData::parse(&out.stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from PostgreSQL 15 right after initdb (abridged to the lines that matter and a
    /// few that contain extra colons or no space after the colon).
    const SAMPLE: &str = "\
pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7712343544830571263
Database cluster state:               shut down in recovery
pg_control last modified:             Thu Nov 26 05:11:52 2026
Latest checkpoint location:           0/1511A68
Latest checkpoint's REDO location:    0/1511A30
Latest checkpoint's REDO WAL file:    000000020000000000000001
Latest checkpoint's TimeLineID:       2
Latest checkpoint's PrevTimeLineID:   1
Latest checkpoint's NextXID:          0:724
Latest checkpoint's oldestCommitTsXid:0
Time of latest checkpoint:            Thu Nov 26 05:11:52 2026
Minimum recovery ending location:     3/AB000060
Min recovery ending loc's timeline:   2
wal_level setting:                    replica
wal_log_hints setting:                on
max_connections setting:              100
max_worker_processes setting:         8
max_wal_senders setting:              10
max_prepared_xacts setting:           0
max_locks_per_xact setting:           64
track_commit_timestamp setting:       off
Bytes per WAL segment:                16777216
Data page checksum version:           0
Mock authentication nonce:            6677f76c1d58bc5c15cff8ac0833de5a0323e06a656493ad763fee64ae93e9ce
";

    #[test]
    fn parses_sample() {
        let cd = ControlData::parse(SAMPLE).unwrap();
        assert_eq!(cd.cluster_state, ClusterState::ShutDownInRecovery);
        assert!(cd.cluster_state.is_clean_shutdown());
        assert_eq!(cd.system_identifier, "7712343544830571263");
        assert_eq!(cd.checkpoint_lsn, 0x1511A68);
        assert_eq!(cd.checkpoint_redo_lsn, 0x1511A30);
        assert_eq!(cd.checkpoint_redo_wal_file, "000000020000000000000001");
        assert_eq!(cd.checkpoint_timeline, 2);
        assert_eq!(cd.checkpoint_prev_timeline, 1);
        assert_eq!(cd.min_recovery_lsn, 0x3_AB00_0060);
        assert_eq!(cd.min_recovery_timeline, 2);
        assert!(cd.wal_log_hints);
        assert!(!cd.data_checksums);
        assert!(!cd.track_commit_timestamp);
        assert_eq!(cd.wal_level, "replica");
        assert_eq!(
            (
                cd.max_connections,
                cd.max_worker_processes,
                cd.max_wal_senders,
                cd.max_prepared_xacts,
                cd.max_locks_per_xact
            ),
            (100, 8, 10, 0, 64)
        );
        assert_eq!(cd.wal_segment_size, 16 << 20);
        assert_eq!(cd.raw["Latest checkpoint's oldestCommitTsXid"], "0");
        assert_eq!(cd.raw["Latest checkpoint's NextXID"], "0:724");
        assert_eq!(cd.raw["pg_control last modified"], "Thu Nov 26 05:11:52 2026");
    }

    #[test]
    fn old_current_prefix_and_states() {
        let text = "Database system identifier: 1\nDatabase cluster state: in production\n\
                    Latest checkpoint location: 0/0\nLatest checkpoint's TimeLineID: 1\n\
                    Current wal_log_hints setting: on\nData page checksum version: 1\n";
        let cd = ControlData::parse(text).unwrap();
        assert_eq!(cd.cluster_state, ClusterState::InProduction);
        assert!(cd.wal_log_hints && cd.data_checksums);
        for (text, state) in [
            ("shut down", ClusterState::ShutDown),
            ("shutting down", ClusterState::ShuttingDown),
            ("in crash recovery", ClusterState::InCrashRecovery),
            ("in archive recovery", ClusterState::InArchiveRecovery),
            ("starting up", ClusterState::Other("starting up".into())),
        ] {
            assert_eq!(ClusterState::parse(text), state);
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(ControlData::parse("").is_err());
        let bad = SAMPLE.replace("0/1511A68\n", "zz\n");
        assert!(ControlData::parse(&bad).is_err());
    }
}
