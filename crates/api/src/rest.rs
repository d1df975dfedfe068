//! Documents served by the REST API (`docs/patroni-compat.md` §2).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `GET /patroni` and the body of every health check (§2.2).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDocument {
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postmaster_start_time: Option<String>,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xlog: Option<XlogInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Vec<ReplicationInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_standby: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum_standby: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_unlocked: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_mode_is_active: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dcs_last_seen: Option<u64>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tags: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_system_identifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart_reason: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_restart: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_failed: Option<bool>,
    pub patroni: PatroniInfo,
}

impl StatusDocument {
    /// The WAL position peers compare in the leader race: the primary's flush position, or the
    /// larger of a replica's received and replayed positions.
    pub fn wal_position(&self) -> u64 {
        match &self.xlog {
            Some(x) => x
                .location
                .unwrap_or(0)
                .max(x.received_location.unwrap_or(0))
                .max(x.replayed_location.unwrap_or(0)),
            None => 0,
        }
    }

    /// A peer counts as primary when it reports `xlog.location` or the primary role.
    pub fn is_primary(&self) -> bool {
        self.xlog.as_ref().is_some_and(|x| x.location.is_some())
            || matches!(self.role.as_str(), "primary" | "master")
    }
}

/// `xlog` of the status document: `location` on a primary, the other fields on a replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct XlogInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_location: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_location: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// One walsender as listed under `replication`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationInfo {
    pub usename: String,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub sync_state: String,
    pub sync_priority: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PatroniInfo {
    pub version: String,
    pub scope: String,
    pub name: String,
}

/// `GET /cluster` (§2.5).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterDocument {
    pub members: Vec<ClusterMemberInfo>,
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_switchover: Option<Value>,
}

/// One member of `GET /cluster`. Lags are bytes, or the string `unknown`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterMemberInfo {
    pub name: String,
    /// `leader`, `standby_leader`, `sync_standby`, `quorum_standby` or `replica`.
    pub role: String,
    pub state: String,
    pub api_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart_reason: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_restart: Option<Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tags: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lag: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lag: Option<Value>,
}

/// Builds the `/cluster` document from a DCS view, the way Patroni's `cluster_as_json` does.
/// Shared by the agent's REST API and `pgvigilctl list`, so both show the same thing.
pub fn cluster_document(scope: &str, view: &crate::ClusterView) -> ClusterDocument {
    use crate::lsn::format_lsn;
    let leader = view.leader_name();
    let sync = view.sync.as_ref().map(|s| &s.value);
    let quorum_mode = view
        .config
        .as_ref()
        .and_then(|c| c.value.get("synchronous_mode"))
        .and_then(Value::as_str)
        .is_some_and(|m| m == "quorum");
    let optime = view.status.optime;
    let members = view
        .members
        .iter()
        .map(|m| {
            let is_leader = Some(m.name.as_str()) == leader;
            let role = if is_leader {
                if m.data.role == "standby_leader" {
                    "standby_leader"
                } else {
                    "leader"
                }
            } else if sync.is_some_and(|s| s.contains(&m.name)) {
                if quorum_mode {
                    "quorum_standby"
                } else {
                    "sync_standby"
                }
            } else {
                "replica"
            };
            let state = match (&m.data.replication_state, is_leader) {
                (Some(rs), false) => rs.clone(),
                _ => m.data.state.clone(),
            };
            let (host, port) = m
                .data
                .host_port()
                .map_or((None, None), |(h, p)| (Some(h), Some(p)));
            let lag_of = |lsn: Option<u64>| -> Value {
                match lsn {
                    Some(l) if optime > 0 => Value::from(optime.saturating_sub(l)),
                    _ => Value::from("unknown"),
                }
            };
            let mut info = ClusterMemberInfo {
                name: m.name.clone(),
                role: role.to_string(),
                state,
                api_url: m.data.api_url.clone(),
                host,
                port,
                timeline: m.data.timeline,
                pending_restart: m.data.pending_restart,
                pending_restart_reason: m.data.pending_restart_reason.clone(),
                scheduled_restart: m.data.scheduled_restart.clone(),
                tags: m.data.tags.clone(),
                ..Default::default()
            };
            if !is_leader {
                info.lsn = m.data.xlog_location.map(format_lsn);
                info.lag = Some(lag_of(m.data.xlog_location));
                info.receive_lsn = m.data.receive_lsn.map(format_lsn);
                info.receive_lag = Some(lag_of(m.data.receive_lsn));
                info.replay_lsn = m.data.replay_lsn.map(format_lsn);
                info.replay_lag = Some(lag_of(m.data.replay_lsn));
            }
            info
        })
        .collect();
    let scheduled_switchover = view.pending_failover().and_then(|f| {
        let at = f.scheduled_at.as_ref()?;
        let mut s = Map::new();
        s.insert("at".into(), Value::from(at.clone()));
        if let Some(from) = &f.leader {
            s.insert("from".into(), Value::from(from.clone()));
        }
        if let Some(to) = &f.member {
            s.insert("to".into(), Value::from(to.clone()));
        }
        Some(Value::Object(s))
    });
    ClusterDocument {
        members,
        scope: scope.to_string(),
        pause: view.is_paused().then_some(true),
        scheduled_switchover,
    }
}
