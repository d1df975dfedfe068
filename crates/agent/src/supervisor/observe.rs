//! Turning what PostgreSQL says into the engine's inputs and the documents we publish (member
//! key, REST status document).

use pgvigil_api::rest::{PatroniInfo, StatusDocument, XlogInfo};
use pgvigil_api::{MemberData, PATRONI_COMPAT_VERSION, PgState, Role};
use pgvigil_engine::slots::{LocalSlot, SlotKind};
use pgvigil_engine::{ControlInfo, ControlState, Observed};
use pgvigil_postgres::{ClusterState, ControlData, PgStatus, SlotInfo};
use serde_json::{Map, Value};

/// The engine's view of `pg_controldata`. `backup_label` present: a base backup (or a rewound
/// directory) not yet started; its control file is the source's, often `in production`, but
/// it never wrote WAL of its own, so it is reported as a directory in archive recovery, not
/// as a former primary (the divergence rules treat a former primary very differently).
pub fn control_info(cd: &ControlData, backup_label: bool) -> ControlInfo {
    ControlInfo {
        sysid: cd.system_identifier.clone(),
        state: match cd.cluster_state {
            ClusterState::InProduction | ClusterState::ShutDown if backup_label => {
                ControlState::InArchiveRecovery
            }
            ClusterState::ShutDown => ControlState::ShutDown,
            ClusterState::ShutDownInRecovery => ControlState::ShutDownInRecovery,
            ClusterState::ShuttingDown => ControlState::ShuttingDown,
            ClusterState::InCrashRecovery => ControlState::InCrashRecovery,
            ClusterState::InArchiveRecovery => ControlState::InArchiveRecovery,
            ClusterState::InProduction => ControlState::InProduction,
            _ => ControlState::Other,
        },
        checkpoint_lsn: cd.checkpoint_lsn,
        checkpoint_timeline: cd.checkpoint_timeline,
        min_recovery_lsn: cd.min_recovery_lsn,
        min_recovery_timeline: cd.min_recovery_timeline,
    }
}

/// The WAL position peers compare: the primary's flush position, else max(receive, replay).
pub fn wal_position(st: &PgStatus) -> u64 {
    if st.in_recovery {
        st.receive_lsn.unwrap_or(0).max(st.replay_lsn.unwrap_or(0))
    } else {
        st.wal_flush_lsn.unwrap_or(0)
    }
}

/// `host=... port=...` of a libpq conninfo string (the WAL receiver's or ours).
pub fn conninfo_host_port(conninfo: &str) -> Option<(String, u16)> {
    let mut host = None;
    let mut port = 5432;
    for part in conninfo.split_whitespace() {
        if let Some(h) = part.strip_prefix("host=") {
            host = Some(h.trim_matches('\'').to_string());
        } else if let Some(p) = part.strip_prefix("port=") {
            port = p.trim_matches('\'').parse().ok()?;
        }
    }
    Some((host?, port))
}

pub fn observed(st: &PgStatus, configured_upstream: Option<&(String, u16)>) -> Observed {
    let upstream = st
        .wal_receiver_conninfo
        .as_deref()
        .and_then(conninfo_host_port)
        .or_else(|| configured_upstream.cloned());
    Observed {
        in_recovery: st.in_recovery,
        sysid: st.system_identifier.clone(),
        timeline: st.timeline,
        wal_position: wal_position(st),
        streaming: st.wal_receiver_streaming,
        upstream,
        server_version: st.server_version,
        pending_restart: st.pending_restart,
        slots: st.slots.iter().filter_map(local_slot).collect(),
    }
}

/// A slot as the engine's slot rules see it (`docs/patroni-compat.md` §5.8). Temporary slots and, on PostgreSQL 17,
/// failover slots PostgreSQL synchronised to this standby belong to nobody the agent manages:
/// Patroni does not see them either.
fn local_slot(s: &SlotInfo) -> Option<LocalSlot> {
    if s.temporary || (s.failover && s.synced) {
        return None;
    }
    let kind = match s.slot_type.as_str() {
        "physical" => SlotKind::Physical,
        "logical" => SlotKind::Logical {
            database: s.database.clone().unwrap_or_default(),
            plugin: s.plugin.clone().unwrap_or_default(),
        },
        _ => return None,
    };
    Some(LocalSlot {
        name: s.slot_name.clone(),
        kind,
        active: s.active,
        restart_lsn: s.restart_lsn,
        confirmed_flush_lsn: s.confirmed_flush_lsn,
        has_xmin: s.has_xmin,
        lost: s.wal_status.as_deref() == Some("lost"),
        failover: s.failover,
    })
}

/// Inputs to the published documents that come from the configuration rather than PostgreSQL.
pub struct Identity {
    pub scope: String,
    pub name: String,
    pub conn_url: String,
    pub api_url: String,
    pub tags: Map<String, Value>,
}

impl Identity {
    /// The member's identity as published, from the configuration.
    pub fn of(cfg: &pgvigil_config::Config) -> Identity {
        Identity {
            scope: cfg.scope.clone(),
            name: cfg.name.clone(),
            conn_url: format!(
                "postgres://{}/{}",
                cfg.postgresql.connect_address, cfg.postgresql.database
            ),
            api_url: cfg.restapi.api_url(),
            tags: cfg.tags.to_published(),
        }
    }
}

/// The role we report: from PostgreSQL when it answers, else what the runtime last knew.
pub fn role(st: Option<&PgStatus>, fallback: Role) -> Role {
    match st {
        Some(s) if s.in_recovery => Role::Replica,
        Some(_) => Role::Primary,
        None => fallback,
    }
}

pub fn member_data(
    id: &Identity,
    state: PgState,
    role: Role,
    st: Option<&PgStatus>,
    paused: bool,
) -> MemberData {
    let mut m = MemberData {
        conn_url: id.conn_url.clone(),
        api_url: id.api_url.clone(),
        state: state.as_str().to_string(),
        role: role.as_str().to_string(),
        version: PATRONI_COMPAT_VERSION.to_string(),
        tags: id.tags.clone(),
        pause: paused.then_some(true),
        // Tells a pgvigil leader that this member takes over by the fast-takeover promise.
        pgvigil: Some(serde_json::json!({"version": env!("CARGO_PKG_VERSION")})),
        ..Default::default()
    };
    if let Some(st) = st.filter(|_| state == PgState::Running) {
        m.xlog_location = Some(wal_position(st));
        m.timeline = (st.timeline > 0).then_some(st.timeline);
        if st.in_recovery {
            m.receive_lsn = st.receive_lsn;
            m.replay_lsn = st.replay_lsn;
            m.replication_state = st.replication_state().map(str::to_string);
        }
        if st.pending_restart {
            m.pending_restart = Some(true);
        }
    }
    m
}

pub fn status_document(
    id: &Identity,
    state: PgState,
    role: Role,
    st: Option<&PgStatus>,
    paused: bool,
    cluster_unlocked: bool,
    dcs_last_seen: Option<u64>,
) -> StatusDocument {
    let mut doc = StatusDocument {
        state: state.as_str().to_string(),
        role: role.as_str().to_string(),
        tags: id.tags.clone(),
        pause: paused.then_some(true),
        cluster_unlocked: cluster_unlocked.then_some(true),
        dcs_last_seen,
        patroni: PatroniInfo {
            version: PATRONI_COMPAT_VERSION.to_string(),
            scope: id.scope.clone(),
            name: id.name.clone(),
        },
        ..Default::default()
    };
    let Some(st) = st.filter(|_| state == PgState::Running) else {
        return doc;
    };
    doc.postmaster_start_time = Some(st.postmaster_start_time.clone()).filter(|t| !t.is_empty());
    doc.server_version = Some(st.server_version);
    doc.database_system_identifier = Some(st.system_identifier.clone()).filter(|s| !s.is_empty());
    doc.pending_restart = st.pending_restart.then_some(true);
    apply_positions(&mut doc, st);
    doc
}

/// The parts of a status document that come from the monitoring query: timeline, WAL
/// positions, replication. Used for the loop's snapshot and for the fresh `GET /patroni`
/// answer (`crate::probe`), so both say the same.
pub fn apply_positions(doc: &mut StatusDocument, st: &PgStatus) {
    doc.timeline = (st.timeline > 0).then_some(st.timeline);
    if st.in_recovery {
        doc.xlog = Some(XlogInfo {
            location: None,
            received_location: st.receive_lsn.or(st.replay_lsn),
            replayed_location: st.replay_lsn,
            replayed_timestamp: st.replay_timestamp.clone(),
            paused: Some(st.replay_paused),
        });
        doc.replication_state = st.replication_state().map(str::to_string);
        doc.replication = None;
    } else {
        doc.xlog = Some(XlogInfo {
            location: st.wal_flush_lsn,
            ..Default::default()
        });
        doc.replication_state = None;
        doc.replication = Some(st.replication.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the marker a leader never promises the fast takeover to a cluster of pgvigil
    /// members (`Agent::lock_settings` requires every member to carry it).
    fn identity() -> Identity {
        Identity {
            scope: "s".into(),
            name: "a".into(),
            conn_url: "postgres://h:5432/postgres".into(),
            api_url: "http://h:8008/patroni".into(),
            tags: Map::new(),
        }
    }

    #[test]
    fn member_data_marks_a_pgvigil_member() {
        let id = identity();
        let m = member_data(&id, PgState::Stopped, Role::Replica, None, false);
        assert!(m.is_pgvigil());
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["pgvigil"]["version"], env!("CARGO_PKG_VERSION"));
    }

    /// Patroni's rule, whatever the tags: a replica streams while its WAL receiver does, is in
    /// archive recovery without one when it has a `restore_command`, and says nothing else.
    #[test]
    fn replication_state_in_the_member_key_and_the_status_document() {
        let id = identity();
        let st = |in_recovery: bool, streaming: bool, restore_command: &str| PgStatus {
            in_recovery,
            wal_receiver_streaming: streaming,
            restore_command: restore_command.into(),
            ..Default::default()
        };
        let archive = "cp /archive/%f %p";
        for (status, expected) in [
            (st(true, true, ""), Some("streaming")),
            (st(true, true, archive), Some("streaming")),
            (st(true, false, archive), Some("in archive recovery")),
            (st(true, false, ""), None),
            (st(false, false, archive), None),
        ] {
            let role = role(Some(&status), Role::Replica);
            let m = member_data(&id, PgState::Running, role, Some(&status), false);
            assert_eq!(m.replication_state.as_deref(), expected, "{status:?}");
            let doc = status_document(&id, PgState::Running, role, Some(&status), false, false, None);
            assert_eq!(doc.replication_state.as_deref(), expected, "{status:?}");
        }
    }

    /// Temporary slots and PostgreSQL 17's synced failover slots on a standby are nobody's to
    /// manage: the engine never sees them, so never drops them.
    #[test]
    fn the_engine_sees_only_slots_it_may_manage() {
        let slot = |name: &str, f: fn(&mut SlotInfo)| {
            let mut s = SlotInfo {
                slot_name: name.into(),
                slot_type: "logical".into(),
                plugin: Some("pgoutput".into()),
                database: Some("app".into()),
                restart_lsn: Some(10),
                confirmed_flush_lsn: Some(20),
                wal_status: Some("reserved".into()),
                ..Default::default()
            };
            f(&mut s);
            s
        };
        let st = PgStatus {
            slots: vec![
                slot("plain", |_| {}),
                slot("temp", |s| s.temporary = true),
                slot("synced", |s| (s.failover, s.synced) = (true, true)),
                slot("failover", |s| s.failover = true),
                slot("lost", |s| {
                    s.slot_type = "physical".into();
                    s.wal_status = Some("lost".into());
                    s.has_xmin = true;
                }),
            ],
            ..Default::default()
        };
        let seen = observed(&st, None).slots;
        let names: Vec<&str> = seen.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["plain", "failover", "lost"]);
        assert_eq!(
            seen[0].kind,
            SlotKind::Logical {
                database: "app".into(),
                plugin: "pgoutput".into()
            }
        );
        assert!(seen[1].failover);
        assert!(seen[2].lost && seen[2].has_xmin && seen[2].kind == SlotKind::Physical);
    }

    #[test]
    fn conninfo_parsing() {
        let c = "user=replicator passfile=/x host=127.0.0.1 port=5433 dbname=postgres application_name=a";
        assert_eq!(conninfo_host_port(c), Some(("127.0.0.1".into(), 5433)));
        assert_eq!(conninfo_host_port("host='h' port='7'"), Some(("h".into(), 7)));
        assert_eq!(conninfo_host_port("port=7"), None);
    }
}
