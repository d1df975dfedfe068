//! The `heartbeat` key: the leader's proof of life for the fast takeover.
//!
//! Written only by a pgvigil leader that promises to stop accepting writes within
//! `fences_within_ms` of its last successful heartbeat (see [`crate::term`]). The key lives
//! beside `leader` (`/<namespace>/<scope>/heartbeat`), on the same lease, and is written in the
//! same transaction that starts a term, so a replica can tell the heartbeat of the current term
//! from a stale one: it applies only while it names the holder of the leader key and is at
//! least as new as the leader key. Patroni ignores the key; a Patroni leader never writes it,
//! so a pgvigil replica waits for its lease to expire exactly as Patroni's replicas do.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatValue {
    /// The leader that wrote it (the value of the leader key).
    pub leader: String,
    /// The promise F: the leader stops PostgreSQL at `s + F`, `s` being when it sent its last
    /// heartbeat that etcd accepted.
    pub fences_within_ms: u64,
    /// How often the leader writes it (informational: the replicas do not depend on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

impl HeartbeatValue {
    pub fn new(leader: &str, promise: Duration, interval: Duration) -> HeartbeatValue {
        HeartbeatValue {
            leader: leader.to_string(),
            fences_within_ms: u64::try_from(promise.as_millis()).unwrap_or(u64::MAX),
            interval_ms: Some(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    pub fn promise(&self) -> Duration {
        Duration::from_millis(self.fences_within_ms)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a heartbeat value always serializes")
    }

    /// `None` for anything that is not a heartbeat with a positive promise: an unreadable key
    /// promises nothing.
    pub fn parse(text: &str) -> Option<HeartbeatValue> {
        serde_json::from_str::<HeartbeatValue>(text)
            .ok()
            .filter(|v| v.fences_within_ms > 0 && !v.leader.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let v = HeartbeatValue::new("node1", Duration::from_millis(3500), Duration::from_millis(500));
        assert_eq!(
            v.to_json(),
            r#"{"leader":"node1","fences_within_ms":3500,"interval_ms":500}"#
        );
        assert_eq!(HeartbeatValue::parse(&v.to_json()), Some(v));
        assert_eq!(
            HeartbeatValue::parse(r#"{"leader":"a","fences_within_ms":0}"#),
            None
        );
        assert_eq!(
            HeartbeatValue::parse(r#"{"leader":"","fences_within_ms":5}"#),
            None
        );
        assert_eq!(HeartbeatValue::parse("not json"), None);
        assert_eq!(
            HeartbeatValue::parse(r#"{"leader":"a","fences_within_ms":5}"#).map(|v| v.promise()),
            Some(Duration::from_millis(5))
        );
    }
}
