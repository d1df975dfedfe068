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
    /// The built-in tags that the file sets, as written: what is published (Patroni publishes
    /// `failover_priority: '1'` as the string `"1"`). A boolean written as a string is kept as
    /// the boolean it was read as, because Patroni readers take any non-empty string as true.
    pub written: Map<String, Value>,
    /// Custom tags, published as they are and usable in `?tag_<k>=<v>` health-check filters.
    pub other: Map<String, Value>,
}

/// The built-in tags that are booleans (published only when true, see [`Tags::to_published`]).
pub const BOOLEAN_TAGS: [&str; 5] = ["clonefrom", "nofailover", "noloadbalance", "nosync", "nostream"];

impl Tags {
    /// The tags as published in the member key / REST API, as Patroni's `_filter_tags` does it:
    /// the built-in tags the file sets, as written, except a false boolean — but `nofailover`
    /// is kept when `failover_priority` is set too, and `nosync` with `sync_priority`, so that
    /// readers see both halves of a contradiction and apply the same rule (the boolean wins);
    /// then the custom tags.
    pub fn to_published(&self) -> Map<String, Value> {
        let mut out = Map::new();
        for (k, v) in &self.written {
            let keep = match k.as_str() {
                "nofailover" => v == &Value::Bool(true) || self.written.contains_key("failover_priority"),
                "nosync" => v == &Value::Bool(true) || self.written.contains_key("sync_priority"),
                k if BOOLEAN_TAGS.contains(&k) => v == &Value::Bool(true),
                _ => true,
            };
            if keep {
                out.insert(k.clone(), v.clone());
            }
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

    fn written(tags: Value) -> Tags {
        Tags {
            written: tags.as_object().unwrap().clone(),
            ..Tags::default()
        }
    }

    #[test]
    fn published_form() {
        let cases: Vec<(Tags, Value)> = vec![
            (Tags::default(), json!({})),
            (
                written(
                    json!({"clonefrom": true, "nofailover": true, "noloadbalance": true, "nosync": true, "nostream": true}),
                ),
                json!({"clonefrom": true, "nofailover": true, "noloadbalance": true, "nosync": true, "nostream": true}),
            ),
            // False booleans are left out, unless their priority is set too.
            (
                written(json!({"clonefrom": false, "nofailover": false, "nosync": false, "nostream": false})),
                json!({}),
            ),
            (
                written(
                    json!({"nofailover": false, "failover_priority": 3, "nosync": true, "sync_priority": 2}),
                ),
                json!({"nofailover": false, "failover_priority": 3, "nosync": true, "sync_priority": 2}),
            ),
            // Values as written: a priority written as a string stays one; a priority alone
            // does not add the boolean.
            (
                written(json!({"failover_priority": "1", "sync_priority": 0})),
                json!({"failover_priority": "1", "sync_priority": 0}),
            ),
            (
                Tags {
                    other: json!({"dc": "east", "rack": 4}).as_object().unwrap().clone(),
                    ..written(json!({"replicatefrom": "node2"}))
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
