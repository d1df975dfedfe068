//! JSON values stored in etcd (`docs/patroni-compat.md` §1.3). All JSON is written compactly, and
//! readers are tolerant: a value that does not parse is treated as absent.

use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::state::{PgState, Role};

/// `members/<name>`: what a node publishes about itself every cycle (§1.3.1).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberData {
    /// `postgres://<connect_address>/<database>`, no credentials.
    #[serde(default)]
    pub conn_url: String,
    /// `http://<restapi connect_address>/patroni`; peers GET exactly this URL in the leader race.
    #[serde(default)]
    pub api_url: String,
    /// PostgreSQL state string (`running`, `stopped`, ...). Kept as text so that an unknown state
    /// written by another implementation does not make the whole member unreadable.
    #[serde(default)]
    pub state: String,
    /// `primary`, `replica`, ... (`master` from old writers means `primary`).
    #[serde(default)]
    pub role: String,
    /// Patroni-compatible version string, see [`crate::PATRONI_COMPAT_VERSION`].
    #[serde(default)]
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_url: Option<String>,
    /// Primary: current WAL flush position; replica: max(receive, replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xlog_location: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<u64>,
    /// `streaming` or `in archive recovery`, replicas only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u64>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tags: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart_reason: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_restart: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
    /// Present (false) on a freshly promoted leader until its post-promotion CHECKPOINT is done;
    /// peers wait for it before running pg_rewind against this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_after_promote: Option<bool>,
    /// Written by pgvigil agents only (`{"version": ...}`); Patroni neither writes nor reads it.
    /// A leader promises the fast takeover only while every member carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgvigil: Option<Value>,
}

impl MemberData {
    /// The member runs pgvigil (not Patroni).
    pub fn is_pgvigil(&self) -> bool {
        self.pgvigil.is_some()
    }

    pub fn role(&self) -> Option<Role> {
        Role::parse(&self.role)
    }

    pub fn state(&self) -> PgState {
        PgState::parse(&self.state).unwrap_or(PgState::Unknown)
    }

    /// `(host, port)` from `conn_url`, as patronictl shows it.
    pub fn host_port(&self) -> Option<(String, u16)> {
        conn_url_host_port(&self.conn_url)
    }

    /// A boolean tag such as `nofailover`; Patroni accepts YAML-ish truthy strings too.
    pub fn tag_bool(&self, name: &str) -> bool {
        tag_is_true(self.tags.get(name))
    }

    pub fn failover_priority(&self) -> i64 {
        failover_priority(&self.tags)
    }
}

/// Whether a tag value counts as true (`true`, or a string like `on`/`yes`/`true`/`1`).
pub fn tag_is_true(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "1"),
        Some(Value::Number(n)) => n.as_i64().is_some_and(|n| n != 0),
        _ => false,
    }
}

/// The effective failover priority of a member's tags: `nofailover` wins and gives 0, otherwise
/// `failover_priority` (default 1).
pub fn failover_priority(tags: &Map<String, Value>) -> i64 {
    if tag_is_true(tags.get("nofailover")) {
        return 0;
    }
    match tags.get("failover_priority") {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(1),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(1),
        _ => 1,
    }
}

/// Splits `postgres://host:port/db` (IPv6 hosts bracketed) into host and port.
pub fn conn_url_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6.split_once(']')?;
        let port = port.strip_prefix(':').map_or(Some(5432), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((authority.to_string(), 5432)),
    }
}

/// `status`: the leader's last known WAL position and slot positions (§1.3.8).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusValue {
    #[serde(default)]
    pub optime: u64,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub slots: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retain_slots: Vec<String>,
}

impl StatusValue {
    /// Parses the value; legacy writers stored a bare integer.
    pub fn parse(text: &str) -> Option<StatusValue> {
        if let Ok(optime) = text.trim().parse::<u64>() {
            return Some(StatusValue {
                optime,
                ..Default::default()
            });
        }
        serde_json::from_str(text).ok()
    }
}

/// `sync`: who the synchronous standbys are (§1.3.5).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncValue {
    #[serde(default)]
    pub leader: Option<String>,
    #[serde(default)]
    pub quorum: u32,
    /// Comma-separated, sorted member names, or null.
    #[serde(default)]
    pub sync_standby: Option<String>,
}

impl SyncValue {
    pub fn members(&self) -> Vec<String> {
        self.sync_standby
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Case-insensitive membership test, as Patroni matches names.
    pub fn contains(&self, name: &str) -> bool {
        self.members().iter().any(|m| m.eq_ignore_ascii_case(name))
    }
}

/// `failover`: a pending switchover or manual failover (§1.3.6). `{}` means none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverValue {
    /// The node to demote (a switchover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The candidate (the REST body calls it `candidate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
}

impl FailoverValue {
    /// Parses JSON or the legacy `leader:candidate` text.
    pub fn parse(text: &str) -> Option<FailoverValue> {
        if let Ok(v) = serde_json::from_str::<FailoverValue>(text) {
            return Some(v);
        }
        let (leader, member) = text.split_once(':')?;
        let some = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        Some(FailoverValue {
            leader: some(leader),
            member: some(member),
            scheduled_at: None,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.leader.as_deref().unwrap_or("").is_empty() && self.member.as_deref().unwrap_or("").is_empty()
    }
}

/// One line of `history`: `[parent_timeline, switch_lsn, reason, timestamp, new_leader]` (§1.3.7).
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub parent_timeline: u64,
    pub switch_lsn: u64,
    pub reason: String,
    pub timestamp: Option<String>,
    pub new_leader: Option<String>,
}

impl Serialize for HistoryEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let len = 3 + usize::from(self.timestamp.is_some()) + usize::from(self.new_leader.is_some());
        let mut seq = s.serialize_seq(Some(len))?;
        seq.serialize_element(&self.parent_timeline)?;
        seq.serialize_element(&self.switch_lsn)?;
        seq.serialize_element(&self.reason)?;
        if let Some(ts) = &self.timestamp {
            seq.serialize_element(ts)?;
        }
        if let Some(leader) = &self.new_leader {
            seq.serialize_element(leader)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for HistoryEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let items = Vec::<Value>::deserialize(d)?;
        let int = |v: Option<&Value>| {
            v.and_then(Value::as_u64)
                .ok_or_else(|| D::Error::custom("bad history line"))
        };
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        Ok(HistoryEntry {
            parent_timeline: int(items.first())?,
            switch_lsn: int(items.get(1))?,
            reason: text(items.get(2)).unwrap_or_default(),
            timestamp: text(items.get(3)),
            new_leader: text(items.get(4)),
        })
    }
}

/// The cluster timeline implied by a history: last parent + 1 (1 for an empty history).
pub fn cluster_timeline(history: &[HistoryEntry]) -> u64 {
    history.last().map_or(1, |h| h.parent_timeline + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_example_from_spec_parses() {
        let text = r#"{"conn_url":"postgres://10.0.0.2:5432/postgres","api_url":"http://10.0.0.2:8008/patroni","state":"running",
 "role":"replica","version":"4.1.4","xlog_location":67419744,"replay_lsn":67419744,"receive_lsn":67419744,
 "replication_state":"streaming","timeline":3,"tags":{"clonefrom":true}}"#;
        let m: MemberData = serde_json::from_str(text).unwrap();
        assert_eq!(m.role(), Some(Role::Replica));
        assert_eq!(m.state(), PgState::Running);
        assert_eq!(m.host_port(), Some(("10.0.0.2".into(), 5432)));
        assert!(m.tag_bool("clonefrom"));
        assert_eq!(m.failover_priority(), 1);
    }

    #[test]
    fn member_serializes_compactly_without_absent_fields() {
        let m = MemberData {
            state: "running".into(),
            role: "primary".into(),
            ..Default::default()
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(!text.contains("tags") && !text.contains("xlog_location") && !text.contains(' '));
    }

    #[test]
    fn conn_url_forms() {
        assert_eq!(
            conn_url_host_port("postgres://[::1]:5433/postgres"),
            Some(("::1".into(), 5433))
        );
        assert_eq!(
            conn_url_host_port("postgres://h/postgres"),
            Some(("h".into(), 5432))
        );
        assert_eq!(conn_url_host_port("nonsense"), None);
    }

    #[test]
    fn history_round_trip() {
        let text = r#"[[1,25623960,"no recovery target specified","2024-09-23T16:57:57+02:00","node2"],[2,30000000,"x"]]"#;
        let h: Vec<HistoryEntry> = serde_json::from_str(text).unwrap();
        assert_eq!(h[0].new_leader.as_deref(), Some("node2"));
        assert_eq!(h[1].timestamp, None);
        assert_eq!(serde_json::to_string(&h).unwrap(), text);
        assert_eq!(cluster_timeline(&h), 3);
        assert_eq!(cluster_timeline(&[]), 1);
    }

    #[test]
    fn failover_legacy_and_empty() {
        assert!(FailoverValue::parse("{}").unwrap().is_empty());
        let f = FailoverValue::parse("a:b").unwrap();
        assert_eq!((f.leader.as_deref(), f.member.as_deref()), (Some("a"), Some("b")));
    }

    #[test]
    fn priorities() {
        let tags: Map<String, Value> =
            serde_json::from_str(r#"{"nofailover":true,"failover_priority":5}"#).unwrap();
        assert_eq!(failover_priority(&tags), 0);
        let tags: Map<String, Value> = serde_json::from_str(r#"{"failover_priority":3}"#).unwrap();
        assert_eq!(failover_priority(&tags), 3);
    }

    #[test]
    fn status_legacy_integer() {
        assert_eq!(StatusValue::parse("123").unwrap().optime, 123);
        assert_eq!(
            StatusValue::parse(r#"{"optime":5,"slots":{"a":1}}"#)
                .unwrap()
                .slots
                .len(),
            1
        );
        assert_eq!(StatusValue::parse("garbage"), None);
    }
}
