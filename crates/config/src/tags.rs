//! `tags` (`docs/patroni-compat.md` §3.7): the member's tags, and the form in which they are
//! published in the DCS member key and the REST status document.

use serde_json::{Map, Value};

/// `tags` section. Built-in tags are typed; anything else is a custom tag kept in `other`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tags {
    /// `nofailover` (default false): never become leader. When not set explicitly it follows
    /// `failover_priority` (`failover_priority: 0` means `nofailover`), as in Patroni.
    pub nofailover: bool,
    /// `failover_priority` (≥ 0, default 1): higher wins among equally advanced candidates;
    /// `nofailover` takes precedence if both are given (with a warning when they contradict).
    pub failover_priority: Option<i64>,
    /// `nosync` (default false): never a synchronous standby. When not set explicitly it
    /// follows `sync_priority` (`sync_priority: 0` means `nosync`).
    pub nosync: bool,
    /// `sync_priority` (≥ 0, default 1): higher is preferred as synchronous standby.
    pub sync_priority: Option<i64>,
    /// `noloadbalance` (default false): `GET /replica` answers 503.
    pub noloadbalance: bool,
    /// `clonefrom` (default false): preferred source for new replicas' base backups.
    pub clonefrom: bool,
    /// `replicatefrom`: stream from this member instead of the leader (cascading).
    pub replicatefrom: Option<String>,
    /// `nostream` (default false): no streaming replication, archive recovery only.
    pub nostream: bool,
    /// Custom tags, published as they are and usable in `?tag_<k>=<v>` health-check filters.
    pub other: Map<String, Value>,
}

impl Tags {
    /// The tags as published in the member key / REST API: boolean built-ins only when true,
    /// except that `nofailover` is kept when `failover_priority` is present and `nosync` when
    /// `sync_priority` is present; priorities, `replicatefrom` and custom tags when set.
    pub fn to_published(&self) -> Map<String, Value> {
        let mut out = Map::new();
        if self.clonefrom {
            out.insert("clonefrom".into(), Value::Bool(true));
        }
        if self.nofailover || self.failover_priority.is_some() {
            out.insert("nofailover".into(), Value::Bool(self.nofailover));
        }
        if let Some(p) = self.failover_priority {
            out.insert("failover_priority".into(), Value::from(p));
        }
        if self.noloadbalance {
            out.insert("noloadbalance".into(), Value::Bool(true));
        }
        if self.nosync || self.sync_priority.is_some() {
            out.insert("nosync".into(), Value::Bool(self.nosync));
        }
        if let Some(p) = self.sync_priority {
            out.insert("sync_priority".into(), Value::from(p));
        }
        if let Some(r) = &self.replicatefrom {
            out.insert("replicatefrom".into(), Value::String(r.clone()));
        }
        if self.nostream {
            out.insert("nostream".into(), Value::Bool(true));
        }
        for (k, v) in &self.other {
            out.insert(k.clone(), v.clone());
        }
        out
    }

    /// Effective failover priority: 0 with `nofailover`, else `failover_priority` (default 1).
    pub fn failover_priority(&self) -> i64 {
        if self.nofailover {
            0
        } else {
            self.failover_priority.unwrap_or(1)
        }
    }

    /// Effective synchronous-standby priority: 0 with `nosync`, else `sync_priority` (default 1).
    pub fn sync_priority(&self) -> i64 {
        if self.nosync {
            0
        } else {
            self.sync_priority.unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn published_form() {
        let cases: Vec<(Tags, Value)> = vec![
            (Tags::default(), json!({})),
            (
                Tags {
                    nofailover: true,
                    noloadbalance: true,
                    clonefrom: true,
                    nostream: true,
                    nosync: true,
                    ..Tags::default()
                },
                json!({"clonefrom": true, "nofailover": true, "noloadbalance": true, "nosync": true, "nostream": true}),
            ),
            (
                Tags {
                    failover_priority: Some(3),
                    sync_priority: Some(2),
                    ..Tags::default()
                },
                json!({"nofailover": false, "failover_priority": 3, "nosync": false, "sync_priority": 2}),
            ),
            (
                Tags {
                    replicatefrom: Some("node2".into()),
                    other: json!({"dc": "east", "rack": 4}).as_object().unwrap().clone(),
                    ..Tags::default()
                },
                json!({"replicatefrom": "node2", "dc": "east", "rack": 4}),
            ),
        ];
        for (tags, expected) in cases {
            assert_eq!(Value::Object(tags.to_published()), expected, "{tags:?}");
        }
    }

    #[test]
    fn priorities() {
        assert_eq!(Tags::default().failover_priority(), 1);
        assert_eq!(Tags::default().sync_priority(), 1);
        let t = Tags {
            nofailover: true,
            failover_priority: Some(5),
            ..Tags::default()
        };
        assert_eq!(t.failover_priority(), 0);
        let t = Tags {
            failover_priority: Some(5),
            sync_priority: Some(0),
            nosync: true,
            ..Tags::default()
        };
        assert_eq!(t.failover_priority(), 5);
        assert_eq!(t.sync_priority(), 0);
    }
}
