//! The whole cluster as read from the DCS in one range request (`docs/patroni-compat.md` §1.1).
//!
//! Parsing is pure and tolerant: unknown keys are ignored, unparsable values count as absent.

use serde_json::{Map, Value};

use crate::keys::Keys;
use crate::values::{FailoverValue, HistoryEntry, MemberData, StatusValue, SyncValue, cluster_timeline};

/// One key as the DCS returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawKv {
    pub key: String,
    pub value: String,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A value together with the revision that wrote it, for compare-and-set updates.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Leader {
    pub name: String,
    /// The etcd lease the key is attached to (0 if none).
    pub lease: i64,
    pub mod_revision: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub name: String,
    pub data: MemberData,
    pub lease: i64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    /// The store revision the read was served at.
    pub revision: i64,
    /// Raw `initialize` value: `""` while a bootstrap is running, the sysid afterwards.
    pub initialize: Option<String>,
    pub config: Option<Versioned<Value>>,
    pub leader: Option<Leader>,
    /// Sorted by name.
    pub members: Vec<Member>,
    pub history: Option<Versioned<Vec<HistoryEntry>>>,
    pub status: StatusValue,
    pub failover: Option<Versioned<FailoverValue>>,
    pub sync: Option<Versioned<SyncValue>>,
    pub failsafe: Option<Map<String, Value>>,
    /// pgvigil's `heartbeat` key, raw (its meaning belongs to the leader lock).
    pub heartbeat: Option<Versioned<String>>,
}

impl ClusterView {
    /// Interprets the keys of one cluster; keys outside `keys.prefix()` are ignored.
    pub fn from_kvs(keys: &Keys, revision: i64, kvs: impl IntoIterator<Item = RawKv>) -> ClusterView {
        let mut view = ClusterView {
            revision,
            ..Default::default()
        };
        for kv in kvs {
            let Some(relative) = keys.relative(&kv.key) else {
                continue;
            };
            let rev = kv.mod_revision;
            match relative {
                "initialize" => view.initialize = Some(kv.value.clone()),
                "config" => {
                    view.config = serde_json::from_str::<Value>(&kv.value)
                        .ok()
                        .filter(Value::is_object)
                        .map(|value| Versioned {
                            value,
                            mod_revision: rev,
                        })
                }
                "leader" if !kv.value.is_empty() => {
                    view.leader = Some(Leader {
                        name: kv.value.clone(),
                        lease: kv.lease,
                        mod_revision: kv.mod_revision,
                    })
                }
                "history" => {
                    view.history = serde_json::from_str(&kv.value).ok().map(|value| Versioned {
                        value,
                        mod_revision: rev,
                    })
                }
                "status" => view.status = StatusValue::parse(&kv.value).unwrap_or_default(),
                "failover" => {
                    view.failover = FailoverValue::parse(&kv.value).map(|value| Versioned {
                        value,
                        mod_revision: rev,
                    })
                }
                "sync" => {
                    view.sync = serde_json::from_str(&kv.value).ok().map(|value| Versioned {
                        value,
                        mod_revision: rev,
                    })
                }
                "failsafe" => view.failsafe = serde_json::from_str(&kv.value).ok(),
                "heartbeat" => {
                    view.heartbeat = Some(Versioned {
                        value: kv.value.clone(),
                        mod_revision: rev,
                    })
                }
                other => {
                    if let Some(name) = other
                        .strip_prefix("members/")
                        .filter(|n| !n.is_empty() && !n.contains('/'))
                        && let Ok(data) = serde_json::from_str::<MemberData>(&kv.value)
                    {
                        view.members.push(Member {
                            name: name.to_string(),
                            data,
                            lease: kv.lease,
                        });
                    }
                }
            }
        }
        view.members.sort_by(|a, b| a.name.cmp(&b.name));
        view
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn leader_name(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.name.as_str())
    }

    /// The member record of the lock holder, if it has one.
    pub fn leader_member(&self) -> Option<&Member> {
        self.leader_name().and_then(|n| self.member(n))
    }

    pub fn is_unlocked(&self) -> bool {
        self.leader.is_none()
    }

    /// `mod_revision` of the `config` key (0 when absent).
    pub fn config_revision(&self) -> i64 {
        self.config.as_ref().map_or(0, |c| c.mod_revision)
    }

    /// The system identifier from `initialize`, when valid (at least 10 digits, §1.3.3).
    pub fn sysid(&self) -> Option<&str> {
        self.initialize.as_deref().filter(|s| is_valid_sysid(s))
    }

    /// Whether the dynamic configuration asks for maintenance mode.
    pub fn is_paused(&self) -> bool {
        self.config
            .as_ref()
            .and_then(|c| c.value.get("pause"))
            .is_some_and(|v| crate::values::tag_is_true(Some(v)))
    }

    pub fn history_entries(&self) -> &[HistoryEntry] {
        self.history.as_ref().map_or(&[], |h| h.value.as_slice())
    }

    /// The timeline the cluster should be on according to `history` (0 when unknown).
    pub fn timeline(&self) -> u64 {
        match &self.history {
            Some(h) => cluster_timeline(&h.value),
            None => 0,
        }
    }

    /// A pending failover/switchover request, if the key holds a non-empty one.
    pub fn pending_failover(&self) -> Option<&FailoverValue> {
        self.failover.as_ref().map(|f| &f.value).filter(|f| !f.is_empty())
    }
}

/// `initialize` is valid when it has at least 10 characters, all digits.
pub fn is_valid_sysid(text: &str) -> bool {
    text.len() >= 10 && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, lease: i64) -> RawKv {
        RawKv {
            key: key.into(),
            value: value.into(),
            mod_revision: 7,
            lease,
        }
    }

    #[test]
    fn parses_a_cluster() {
        let keys = Keys::new("/service", "batman");
        let view = ClusterView::from_kvs(
            &keys,
            9,
            vec![
                kv("/service/batman/leader", "pg2", 42),
                kv(
                    "/service/batman/members/pg2",
                    r#"{"role":"primary","state":"running","conn_url":"postgres://h:1/postgres","api_url":"http://h:2/patroni","version":"4.1.5"}"#,
                    42,
                ),
                kv(
                    "/service/batman/members/pg1",
                    r#"{"role":"replica","state":"running"}"#,
                    41,
                ),
                kv("/service/batman/members/pg3/extra", "{}", 0),
                kv("/service/batman/members/bad", "not json", 0),
                kv("/service/batman/initialize", "7268616322854375442", 0),
                kv("/service/batman/config", r#"{"ttl":30,"pause":true}"#, 0),
                kv("/service/batman/history", r#"[[1,100,"x"]]"#, 0),
                kv("/service/batman/status", r#"{"optime":500}"#, 0),
                kv("/service/batman/failover", "{}", 0),
                kv("/service/batman/heartbeat", r#"{"leader":"pg2"}"#, 42),
                kv("/service/other/leader", "zzz", 0),
            ],
        );
        assert_eq!(view.leader_name(), Some("pg2"));
        assert_eq!(view.leader.as_ref().unwrap().lease, 42);
        assert_eq!(
            view.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["pg1", "pg2"]
        );
        assert_eq!(view.sysid(), Some("7268616322854375442"));
        assert!(view.is_paused());
        assert_eq!(view.timeline(), 2);
        assert_eq!(view.status.optime, 500);
        assert!(view.pending_failover().is_none());
        assert_eq!(view.leader_member().unwrap().data.role, "primary");
        assert_eq!(view.heartbeat.as_ref().map(|h| h.mod_revision), Some(7));
    }

    #[test]
    fn empty_initialize_is_not_a_sysid() {
        let view = ClusterView {
            initialize: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(view.sysid(), None);
        assert!(view.is_unlocked());
    }
}
