//! `POST /switchover` and `POST /failover`: body validation, the feasibility rules that do not
//! need the network, and the interpretation of the DCS while a switchover is polled.

use chrono::{DateTime, FixedOffset, Utc};
use pgvigil_api::rest::StatusDocument;
use pgvigil_api::{ClusterView, Member};
use pgvigil_config::{DynamicConfig, SyncMode};
use serde_json::{Map, Value};

use super::values::*;
use crate::ApiReply;

/// `switchover` or `failover`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverAction {
    Switchover,
    Failover,
}

impl FailoverAction {
    pub fn name(self) -> &'static str {
        match self {
            FailoverAction::Switchover => "switchover",
            FailoverAction::Failover => "failover",
        }
    }

    /// `Switchover` / `Failover`.
    pub fn title(self) -> &'static str {
        match self {
            FailoverAction::Switchover => "Switchover",
            FailoverAction::Failover => "Failover",
        }
    }

    /// `switch` / `fail` (for `switched over`, `failed over`).
    fn stem(self) -> &'static str {
        match self {
            FailoverAction::Switchover => "switch",
            FailoverAction::Failover => "fail",
        }
    }
}

/// A validated `POST /switchover` or `POST /failover` (rules 1-5 of `docs/patroni-compat.md` §2.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverRequest {
    /// After rule 4 (a failover naming a leader is a switchover).
    pub action: FailoverAction,
    pub leader: Option<String>,
    pub candidate: Option<String>,
    pub scheduled_at: Option<DateTime<FixedOffset>>,
}

fn optional_name(body: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiReply> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiReply::new(
            400,
            format!("{key} should be a member name (a string), not {other}"),
        )),
    }
}

/// Rules 1-5 of `do_POST_failover`, in Patroni's order.
pub fn validate_failover(
    body: &Map<String, Value>,
    action: FailoverAction,
    paused: bool,
    now: DateTime<Utc>,
) -> Result<FailoverRequest, ApiReply> {
    let leader = optional_name(body, "leader")?;
    let candidate = match optional_name(body, "candidate")? {
        Some(c) => Some(c),
        None => optional_name(body, "member")?,
    };
    let scheduled = match body.get("scheduled_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v) => Some(v),
    };
    let bad = |message: &str| Err(ApiReply::new(400, message));
    if action == FailoverAction::Failover && candidate.is_none() {
        return bad("Failover could be performed only to a specific candidate");
    }
    if action == FailoverAction::Switchover && leader.is_none() {
        return bad("Switchover could be performed only from a specific leader");
    }
    let mut scheduled_at = None;
    if let Some(value) = scheduled {
        if action == FailoverAction::Failover {
            return bad("Failover can't be scheduled");
        }
        if paused {
            return bad("Can't schedule switchover in the paused state");
        }
        scheduled_at = Some(parse_schedule(value, action.name(), now)?);
    }
    if paused && candidate.is_none() {
        return bad("Switchover is possible only to a specific candidate in a paused state");
    }
    let action = if action == FailoverAction::Failover && leader.is_some() {
        FailoverAction::Switchover
    } else {
        action
    };
    if leader == candidate {
        return bad("Switchover target and source are the same");
    }
    Ok(FailoverRequest {
        action,
        leader,
        candidate,
        scheduled_at,
    })
}

/// Synchronous mode other than quorum, outside a standby cluster: only `/sync` members may be
/// switchover targets.
pub fn strict_sync_mode(view: &ClusterView) -> bool {
    let Some(config) = &view.config else {
        return false;
    };
    let (dynamic, _) = DynamicConfig::from_json(&config.value);
    dynamic.synchronous_mode == SyncMode::On && dynamic.standby_cluster.is_none()
}

/// The network-free part of rule 6: the members whose status decides feasibility, or the 412
/// message.
pub fn feasibility_members<'a>(
    view: &'a ClusterView,
    action: FailoverAction,
    leader: Option<&str>,
    candidate: Option<&str>,
) -> Result<Vec<&'a Member>, String> {
    if let Some(leader) = leader
        && view.leader_name() != Some(leader)
    {
        return Err("leader name does not match".into());
    }
    let strict_sync = strict_sync_mode(view);
    let in_sync = |name: &str| view.sync.as_ref().is_some_and(|s| s.value.contains(name));
    if let Some(candidate) = candidate {
        if action == FailoverAction::Switchover && strict_sync && !in_sync(candidate) {
            return Err("candidate name does not match with sync_standby".into());
        }
        let members: Vec<&Member> = view.members.iter().filter(|m| m.name == candidate).collect();
        if members.is_empty() {
            return Err("candidate does not exists".into());
        }
        return Ok(members);
    }
    let action = action.name();
    if strict_sync {
        let members: Vec<&Member> = view.members.iter().filter(|m| in_sync(&m.name)).collect();
        if members.is_empty() {
            return Err(format!("{action} is not possible: can not find sync_standby"));
        }
        return Ok(members);
    }
    let leader_name = view.leader_name();
    let members: Vec<&Member> = view
        .members
        .iter()
        .filter(|m| {
            leader_name.is_none() || (Some(m.name.as_str()) != leader_name && !m.data.api_url.is_empty())
        })
        .collect();
    if members.is_empty() {
        return Err(format!(
            "{action} is not possible: cluster does not have members except leader"
        ));
    }
    Ok(members)
}

/// Patroni's `nofailover` of a status document's tags: the `nofailover` tag when present,
/// otherwise `failover_priority <= 0`.
fn no_failover(tags: &Map<String, Value>) -> bool {
    if let Some(v) = tags.get("nofailover") {
        return pgvigil_api::values::tag_is_true(Some(v));
    }
    match tags.get("failover_priority") {
        Some(Value::Number(n)) => n.as_i64().is_some_and(|p| p <= 0),
        Some(Value::String(s)) => s.trim().parse::<i64>().is_ok_and(|p| p <= 0),
        _ => false,
    }
}

/// Why a member cannot take over, judging by its answer to `GET api_url` (`None` = no usable
/// answer); `None` when it can.
pub fn failover_limitation(status: Option<&StatusDocument>) -> Option<&'static str> {
    let Some(status) = status.filter(|s| s.xlog.is_some()) else {
        return Some("not reachable");
    };
    if no_failover(&status.tags) {
        return Some("not allowed to promote");
    }
    if status.watchdog_failed == Some(true) {
        return Some("not watchdog capable");
    }
    None
}

/// One poll of an immediate switchover: the final answer once the DCS shows an outcome.
pub fn poll_outcome(
    view: &ClusterView,
    old_leader: Option<&str>,
    candidate: Option<&str>,
    action: FailoverAction,
) -> Option<ApiReply> {
    if let Some(now) = view.leader_name()
        && Some(now) != old_leader
    {
        let stem = action.stem();
        return Some(match candidate {
            Some(c) if c != now => {
                let mut title = stem.to_string();
                title[..1].make_ascii_uppercase();
                ApiReply::new(200, format!("{title}ed over to \"{now}\" instead of \"{c}\""))
            }
            _ => ApiReply::new(200, format!("Successfully {stem}ed over to \"{now}\"")),
        });
    }
    if view.pending_failover().is_none() {
        return Some(ApiReply::new(503, format!("{} failed", action.title())));
    }
    None
}

/// How long an immediate switchover is polled: `2 * max(10, loop_wait)` seconds.
pub fn poll_seconds(loop_wait: u64) -> u64 {
    2 * loop_wait.max(10)
}

/// The answer when polling ends without an outcome.
pub fn poll_timeout(action: FailoverAction, seconds: u64) -> ApiReply {
    ApiReply::new(
        503,
        format!(
            "{} status unknown after {seconds} seconds; operation may still be in progress",
            action.title()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{now, obj};
    use super::*;
    use pgvigil_api::cluster::RawKv;
    use pgvigil_api::rest::XlogInfo;
    use pgvigil_api::{Keys, MemberData};
    use serde_json::json;

    #[test]
    fn failover_rules_in_order() {
        use FailoverAction::*;
        let v = |body: Value, action, paused| validate_failover(&obj(body), action, paused, now());
        let msg = |body: Value, action, paused| v(body, action, paused).unwrap_err();
        assert_eq!(
            msg(json!({"leader": "a"}), Failover, false),
            ApiReply::new(400, "Failover could be performed only to a specific candidate")
        );
        assert_eq!(
            msg(json!({"candidate": "b"}), Switchover, false),
            ApiReply::new(400, "Switchover could be performed only from a specific leader")
        );
        assert_eq!(
            msg(
                json!({"candidate": "b", "scheduled_at": "2030-01-01T13:00Z"}),
                Failover,
                false
            )
            .body,
            "Failover can't be scheduled"
        );
        assert_eq!(
            msg(
                json!({"leader": "a", "candidate": "b", "scheduled_at": "2030-01-01T13:00Z"}),
                Switchover,
                true
            )
            .body,
            "Can't schedule switchover in the paused state"
        );
        assert_eq!(
            msg(
                json!({"leader": "a", "scheduled_at": "2020-01-01T13:00Z"}),
                Switchover,
                false
            )
            .status,
            422
        );
        assert_eq!(
            msg(
                json!({"leader": "a", "scheduled_at": "2031-01-01T13:00"}),
                Switchover,
                false
            )
            .status,
            400
        );
        assert_eq!(
            msg(json!({"leader": "a"}), Switchover, true).body,
            "Switchover is possible only to a specific candidate in a paused state"
        );
        assert_eq!(
            msg(json!({"leader": "a", "candidate": "a"}), Switchover, false).body,
            "Switchover target and source are the same"
        );
        assert!(
            msg(json!({"leader": 5}), Switchover, false)
                .body
                .contains("leader")
        );
        assert!(
            msg(json!({"candidate": ["x"]}), Failover, false)
                .body
                .contains("candidate")
        );

        // A failover naming the leader is a switchover; `member` is an alias of `candidate`.
        let r = v(json!({"leader": "a", "member": "b"}), Failover, false).unwrap();
        assert_eq!(r.action, Switchover);
        assert_eq!(r.candidate.as_deref(), Some("b"));
        // patronictl sends `"candidate": null` for "any".
        let r = v(
            json!({"leader": "a", "candidate": null, "scheduled_at": "2030-01-01T13:00+00:00"}),
            Switchover,
            false,
        )
        .unwrap();
        assert_eq!(r.candidate, None);
        assert_eq!(isoformat(&r.scheduled_at.unwrap()), "2030-01-01T13:00:00+00:00");
    }

    fn view(config: &str, sync: Option<&str>) -> ClusterView {
        let keys = Keys::new("/service", "b");
        let kv = |key: &str, value: &str| RawKv {
            key: format!("/service/b/{key}"),
            value: value.into(),
            mod_revision: 3,
            lease: 0,
        };
        let member = |name: &str, api: &str| {
            let data = MemberData {
                api_url: api.into(),
                conn_url: "postgres://h:5432/postgres".into(),
                ..Default::default()
            };
            kv(&format!("members/{name}"), &serde_json::to_string(&data).unwrap())
        };
        let mut kvs = vec![
            kv("leader", "a"),
            member("a", "http://h:1/patroni"),
            member("b", "http://h:2/patroni"),
            member("c", ""),
            kv("config", config),
        ];
        if let Some(s) = sync {
            kvs.push(kv("sync", s));
        }
        ClusterView::from_kvs(&keys, 9, kvs)
    }

    fn names(r: Result<Vec<&Member>, String>) -> Result<Vec<String>, String> {
        r.map(|v| v.iter().map(|m| m.name.clone()).collect())
    }

    #[test]
    fn feasibility_without_network() {
        use FailoverAction::*;
        let v = view("{}", None);
        assert_eq!(
            names(feasibility_members(&v, Switchover, Some("b"), None)),
            Err("leader name does not match".into())
        );
        assert_eq!(
            names(feasibility_members(&v, Switchover, Some("a"), Some("x"))),
            Err("candidate does not exists".into())
        );
        assert_eq!(
            names(feasibility_members(&v, Switchover, Some("a"), Some("c"))),
            Ok(vec!["c".into()])
        );
        // Without a candidate: non-leaders with an api_url.
        assert_eq!(
            names(feasibility_members(&v, Switchover, Some("a"), None)),
            Ok(vec!["b".into()])
        );
        let mut lonely = v.clone();
        lonely.members.retain(|m| m.name != "b");
        assert_eq!(
            names(feasibility_members(&lonely, Switchover, Some("a"), None)),
            Err("switchover is not possible: cluster does not have members except leader".into())
        );

        let sync = view(
            r#"{"synchronous_mode": true}"#,
            Some(r#"{"leader":"a","sync_standby":"c"}"#),
        );
        assert!(strict_sync_mode(&sync));
        assert_eq!(
            names(feasibility_members(&sync, Switchover, Some("a"), Some("b"))),
            Err("candidate name does not match with sync_standby".into())
        );
        // A failover may go to an asynchronous node.
        assert_eq!(
            names(feasibility_members(&sync, Failover, None, Some("b"))),
            Ok(vec!["b".into()])
        );
        assert_eq!(
            names(feasibility_members(&sync, Switchover, Some("a"), None)),
            Ok(vec!["c".into()])
        );
        let no_sync = view(r#"{"synchronous_mode": "on"}"#, None);
        assert_eq!(
            names(feasibility_members(&no_sync, Switchover, Some("a"), None)),
            Err("switchover is not possible: can not find sync_standby".into())
        );
        let quorum = view(r#"{"synchronous_mode": "quorum"}"#, None);
        assert!(!strict_sync_mode(&quorum));
        assert_eq!(
            names(feasibility_members(&quorum, Switchover, Some("a"), Some("b"))),
            Ok(vec!["b".into()])
        );
    }

    #[test]
    fn limitations() {
        let mut s = StatusDocument {
            xlog: Some(XlogInfo::default()),
            ..Default::default()
        };
        assert_eq!(failover_limitation(Some(&s)), None);
        assert_eq!(failover_limitation(None), Some("not reachable"));
        s.tags.insert("failover_priority".into(), json!(0));
        assert_eq!(failover_limitation(Some(&s)), Some("not allowed to promote"));
        s.tags.insert("nofailover".into(), json!(false));
        assert_eq!(failover_limitation(Some(&s)), None);
        s.watchdog_failed = Some(true);
        assert_eq!(failover_limitation(Some(&s)), Some("not watchdog capable"));
        s.xlog = None;
        assert_eq!(failover_limitation(Some(&s)), Some("not reachable"));
    }

    #[test]
    fn polling() {
        use FailoverAction::*;
        let mut v = view("{}", None);
        v.failover = pgvigil_api::FailoverValue::parse(r#"{"leader":"a","member":"b"}"#).map(|value| {
            pgvigil_api::Versioned {
                value,
                mod_revision: 4,
            }
        });
        assert_eq!(poll_outcome(&v, Some("a"), Some("b"), Switchover), None);
        v.leader.as_mut().unwrap().name = "b".into();
        assert_eq!(
            poll_outcome(&v, Some("a"), Some("b"), Switchover),
            Some(ApiReply::new(200, "Successfully switched over to \"b\""))
        );
        assert_eq!(
            poll_outcome(&v, Some("a"), Some("c"), Switchover),
            Some(ApiReply::new(200, "Switched over to \"b\" instead of \"c\""))
        );
        assert_eq!(
            poll_outcome(&v, Some("a"), None, Failover),
            Some(ApiReply::new(200, "Successfully failed over to \"b\""))
        );
        v.leader.as_mut().unwrap().name = "a".into();
        v.failover = None;
        assert_eq!(
            poll_outcome(&v, Some("a"), Some("b"), Failover),
            Some(ApiReply::new(503, "Failover failed"))
        );
        // No leader yet but the key is still there: keep polling.
        v.leader = None;
        v.failover =
            pgvigil_api::FailoverValue::parse(r#"{"member":"b"}"#).map(|value| pgvigil_api::Versioned {
                value,
                mod_revision: 4,
            });
        assert_eq!(poll_outcome(&v, Some("a"), Some("b"), Failover), None);
        assert_eq!(poll_seconds(2), 20);
        assert_eq!(poll_seconds(15), 30);
        assert_eq!(
            poll_timeout(Switchover, 20).body,
            "Switchover status unknown after 20 seconds; operation may still be in progress"
        );
    }
}
