//! The pure part of the operator endpoints (`patroni-compat.md` §2.6): body validation with
//! Patroni's messages and status codes, the `PATCH /config` merge, the switchover feasibility
//! rules that do not need the network, and the interpretation of the DCS while a switchover is
//! polled. The handlers in `routes.rs` add the I/O.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use pgvigil_api::rest::StatusDocument;
use pgvigil_api::{ClusterView, Member};
use pgvigil_config::{DynamicConfig, SyncMode};
use serde_json::{Map, Value};

use crate::{ApiReply, RestartRequest};

/// A timestamp as an operator wrote it: with or without a time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    Aware(DateTime<FixedOffset>),
    Naive(NaiveDateTime),
}

/// Parses the timestamp forms people write for `dateutil.parser.parse`: ISO 8601 / RFC 3339
/// with `T` or a space between date and time, optional seconds and fractions, and a zone of
/// `Z`, `UTC`, `GMT`, `±H`, `±HH`, `±HHMM` or `±HH:MM`; a date alone means midnight.
pub fn parse_timestamp(text: &str) -> Option<Stamp> {
    let s = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(Stamp::Aware(dt));
    }
    let (date_text, rest) = match s.char_indices().find(|&(_, c)| c == 'T' || c == 't' || c == ' ') {
        Some((i, _)) => (&s[..i], s[i + 1..].trim_start()),
        None => (s, ""),
    };
    let date = NaiveDate::parse_from_str(date_text, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(date_text, "%Y%m%d"))
        .ok()?;
    let time_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == ':' || c == '.' || c == ','))
        .unwrap_or(rest.len());
    let (time_text, zone_text) = (rest[..time_len].replace(',', "."), rest[time_len..].trim());
    let time = if time_text.is_empty() {
        NaiveTime::MIN
    } else {
        ["%H:%M:%S%.f", "%H:%M:%S", "%H:%M", "%H%M%S%.f", "%H%M%S", "%H%M"]
            .iter()
            .find_map(|f| NaiveTime::parse_from_str(&time_text, f).ok())?
    };
    let naive = date.and_time(time);
    if zone_text.is_empty() {
        return Some(Stamp::Naive(naive));
    }
    let offset = parse_zone(zone_text)?;
    offset.from_local_datetime(&naive).single().map(Stamp::Aware)
}

fn parse_zone(text: &str) -> Option<FixedOffset> {
    if matches!(text.to_ascii_uppercase().as_str(), "Z" | "UTC" | "GMT") {
        return FixedOffset::east_opt(0);
    }
    let sign = match text.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits: String = text[1..].chars().filter(|&c| c != ':').collect();
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hours, minutes) = match digits.len() {
        1 | 2 => (digits.parse::<i32>().ok()?, 0),
        3 => (digits[..1].parse::<i32>().ok()?, digits[1..].parse::<i32>().ok()?),
        _ => (digits[..2].parse::<i32>().ok()?, digits[2..].parse::<i32>().ok()?),
    };
    if hours > 23 || minutes > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60))
}

/// Python's `datetime.isoformat()` of an aware timestamp (what Patroni writes into the
/// `failover` key and the scheduled restart).
pub fn isoformat(at: &DateTime<FixedOffset>) -> String {
    use chrono::Timelike;
    if at.nanosecond() / 1000 == 0 {
        at.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
    } else {
        format!(
            "{}.{:06}{}",
            at.format("%Y-%m-%dT%H:%M:%S"),
            at.nanosecond() / 1000 % 1_000_000,
            at.format("%:z")
        )
    }
}

/// `parse_schedule` of Patroni's API: 422 unparsable, 400 without a zone, 422 in the past.
pub fn parse_schedule(
    value: &Value,
    action: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<FixedOffset>, ApiReply> {
    let unparsable = || {
        ApiReply::new(
            422,
            "Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601",
        )
    };
    let Some(text) = value.as_str() else {
        return Err(unparsable());
    };
    match parse_timestamp(text) {
        None => Err(unparsable()),
        Some(Stamp::Naive(_)) => Err(ApiReply::new(
            400,
            format!("Timezone information is mandatory for the scheduled {action}"),
        )),
        Some(Stamp::Aware(at)) if at.with_timezone(&Utc) < now => Err(ApiReply::new(
            422,
            format!("Cannot schedule {action} in the past"),
        )),
        Some(Stamp::Aware(at)) => Ok(at),
    }
}

/// Python's `parse_bool`: `on/true/yes/1` and `off/false/no/0`, any case, of the value's text.
pub fn parse_bool(value: &Value) -> Option<bool> {
    let text = match value {
        Value::Bool(b) => return Some(*b),
        Value::String(s) => s.to_ascii_lowercase(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    match text.as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// A duration in whole seconds: a number, or text with an optional unit (`ms`, `s`, `min`,
/// `h`, `d`), rounded like Patroni's `parse_int(value, 's')`.
pub fn parse_seconds(value: &Value) -> Option<i64> {
    let (number, unit) = match value {
        Value::Number(n) => (n.as_f64()?, String::new()),
        Value::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
                .unwrap_or(s.len());
            (s[..split].parse::<f64>().ok()?, s[split..].trim().to_string())
        }
        _ => return None,
    };
    let factor = match unit.as_str() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return None,
    };
    let seconds = number * factor;
    if !seconds.is_finite() || seconds.abs() > 1e15 {
        return None;
    }
    Some(round_half_even(seconds) as i64)
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Patroni's `postgres_version_to_int` check: `X.Y` (X ≥ 10) or `X.Y.Z`.
pub fn check_postgres_version(text: &str) -> Result<(), String> {
    let parts: Option<Vec<u32>> = text.split('.').map(|p| p.trim().parse().ok()).collect();
    let Some(parts) = parts else {
        return Err(format!("Invalid PostgreSQL version: {text}"));
    };
    if parts.len() < 2 || (parts.len() == 2 && parts[0] < 10) || parts.len() > 3 {
        return Err(format!(
            "Invalid PostgreSQL version format: X.Y or X.Y.Z is accepted: {text}"
        ));
    }
    Ok(())
}

/// Validates a `POST /restart` body the way Patroni does, key by key in the order given; the
/// first problem decides the answer.
pub fn validate_restart(
    body: &Map<String, Value>,
    paused: bool,
    now: DateTime<Utc>,
) -> Result<RestartRequest, ApiReply> {
    if paused && body.contains_key("schedule") {
        return Err(ApiReply::new(500, "Can't schedule restart in the paused state"));
    }
    let mut request = RestartRequest::default();
    for (key, value) in body {
        match key.as_str() {
            "schedule" => request.schedule = Some(parse_schedule(value, "restart", now)?),
            "role" => match value.as_str() {
                Some(role @ ("primary" | "standby_leader" | "replica")) => {
                    request.role = Some(role.to_string())
                }
                _ => {
                    return Err(ApiReply::new(
                        400,
                        "PostgreSQL role should be either primary, standby_leader, or replica",
                    ));
                }
            },
            "postgres_version" => match value.as_str() {
                Some(text) => {
                    check_postgres_version(text).map_err(|e| ApiReply::new(400, e))?;
                    request.postgres_version = Some(text.to_string());
                }
                None => {
                    return Err(ApiReply::new(
                        400,
                        format!("postgres_version should be a string like \"16.4\", not {value}"),
                    ));
                }
            },
            "timeout" => match parse_seconds(value) {
                Some(t) if t > 0 => request.timeout = Some(t as u64),
                _ => {
                    return Err(ApiReply::new(
                        400,
                        "Timeout should be a positive number of seconds",
                    ));
                }
            },
            "restart_pending" => match parse_bool(value) {
                Some(b) => request.restart_pending = b,
                None => {
                    return Err(ApiReply::new(
                        400,
                        format!("restart_pending should be a boolean, not {value}"),
                    ));
                }
            },
            other => {
                return Err(ApiReply::new(
                    400,
                    format!("Unknown filter for the scheduled restart: {other}"),
                ));
            }
        }
    }
    Ok(request)
}

/// Python's `str()` of a JSON value, which is how Patroni compares configuration scalars.
pub fn python_str(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Patroni's `patch_config`: merges `patch` into `config`; `null` deletes a key, objects merge
/// recursively, other values replace when their text differs. Returns whether anything changed.
pub fn patch_config(config: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    let mut changed = false;
    for (name, value) in patch {
        match value {
            Value::Null => {
                if config.remove(name).is_some_and(|old| !old.is_null()) {
                    changed = true;
                }
            }
            Value::Object(sub) => match config.get_mut(name) {
                Some(Value::Object(existing)) => changed |= patch_config(existing, sub),
                _ => {
                    config.insert(name.clone(), value.clone());
                    changed = true;
                }
            },
            _ => match config.get(name) {
                Some(old) if python_str(old) == python_str(value) => {}
                _ => {
                    config.insert(name.clone(), value.clone());
                    changed = true;
                }
            },
        }
    }
    changed
}

/// Patroni's `deep_compare`: same keys, nested objects compared recursively, other values by
/// their text.
pub fn deep_compare(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    if a.len() != b.len() || a.keys().any(|k| !b.contains_key(k)) {
        return false;
    }
    a.iter().all(|(k, va)| match (va, &b[k]) {
        (Value::Object(x), Value::Object(y)) => deep_compare(x, y),
        (Value::Object(_), _) | (_, Value::Object(_)) => false,
        (x, y) => python_str(x) == python_str(y),
    })
}

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

/// A validated `POST /switchover` or `POST /failover` (rules 1-5 of §2.6).
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
    use super::*;
    use pgvigil_api::cluster::RawKv;
    use pgvigil_api::rest::XlogInfo;
    use pgvigil_api::{Keys, MemberData};
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap()
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn timestamps() {
        let aware = |s: &str| match parse_timestamp(s) {
            Some(Stamp::Aware(t)) => t,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(
            isoformat(&aware("2030-07-30T12:00:00+00:00")),
            "2030-07-30T12:00:00+00:00"
        );
        assert_eq!(
            isoformat(&aware("2030-07-30 12:00Z")),
            "2030-07-30T12:00:00+00:00"
        );
        assert_eq!(
            isoformat(&aware("2030-07-30T12:00:05.25+0200")),
            "2030-07-30T12:00:05.250000+02:00"
        );
        assert_eq!(
            isoformat(&aware("2023-05-29T04:32:31-3")),
            "2023-05-29T04:32:31-03:00"
        );
        assert_eq!(
            isoformat(&aware("2030-07-30T12:00 UTC")),
            "2030-07-30T12:00:00+00:00"
        );
        assert!(matches!(
            parse_timestamp("2030-07-30T12:00"),
            Some(Stamp::Naive(_))
        ));
        assert!(matches!(parse_timestamp("2030-07-30"), Some(Stamp::Naive(_))));
        for bad in [
            "",
            "tomorrow",
            "2030-13-01T00:00Z",
            "2030-07-30T25:00Z",
            "2030-07-30T12:00+99",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn schedules() {
        let s = |v: Value| parse_schedule(&v, "restart", now());
        assert!(s(json!("2030-01-01T13:00:00+00:00")).is_ok());
        assert_eq!(
            s(json!("2029-01-01T13:00:00+00:00")).unwrap_err(),
            ApiReply::new(422, "Cannot schedule restart in the past")
        );
        assert_eq!(
            s(json!("2031-01-01T13:00:00")).unwrap_err(),
            ApiReply::new(400, "Timezone information is mandatory for the scheduled restart")
        );
        for bad in [json!("next week"), json!(5), json!(null), json!({})] {
            assert_eq!(s(bad).unwrap_err().status, 422);
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(parse_bool(&json!("ON")), Some(true));
        assert_eq!(parse_bool(&json!(0)), Some(false));
        assert_eq!(parse_bool(&json!("maybe")), None);
        assert_eq!(parse_bool(&json!([])), None);
        assert_eq!(parse_seconds(&json!(30)), Some(30));
        assert_eq!(parse_seconds(&json!("30")), Some(30));
        assert_eq!(parse_seconds(&json!("2min")), Some(120));
        assert_eq!(parse_seconds(&json!("1500 ms")), Some(2));
        assert_eq!(parse_seconds(&json!("-5")), Some(-5));
        assert_eq!(parse_seconds(&json!("5 parsecs")), None);
        assert_eq!(parse_seconds(&json!(true)), None);
        assert!(check_postgres_version("16.4").is_ok());
        assert!(check_postgres_version("9.6.24").is_ok());
        assert_eq!(
            check_postgres_version("9.6").unwrap_err(),
            "Invalid PostgreSQL version format: X.Y or X.Y.Z is accepted: 9.6"
        );
        assert_eq!(
            check_postgres_version("a.b").unwrap_err(),
            "Invalid PostgreSQL version: a.b"
        );
    }

    #[test]
    fn restart_bodies() {
        let v = |body: Value, paused: bool| validate_restart(&obj(body), paused, now());
        let ok = v(
            json!({"schedule": "2030-01-02T00:00:00+01:00", "role": "replica", "postgres_version": "17.1",
                   "timeout": "60", "restart_pending": true}),
            false,
        )
        .unwrap();
        assert_eq!(ok.role.as_deref(), Some("replica"));
        assert_eq!(ok.timeout, Some(60));
        assert!(ok.restart_pending);
        assert_eq!(isoformat(&ok.schedule.unwrap()), "2030-01-02T00:00:00+01:00");
        assert_eq!(v(json!({}), false).unwrap(), RestartRequest::default());

        let err = |body: Value, paused: bool| v(body, paused).unwrap_err();
        assert_eq!(
            err(json!({"schedule": "garbage"}), true),
            ApiReply::new(500, "Can't schedule restart in the paused state")
        );
        assert_eq!(err(json!({"role": "leader"}), false).status, 400);
        assert_eq!(err(json!({"role": 1}), false).status, 400);
        assert_eq!(err(json!({"postgres_version": "16"}), false).status, 400);
        assert!(
            err(json!({"postgres_version": 16.4}), false)
                .body
                .contains("postgres_version")
        );
        assert_eq!(
            err(json!({"timeout": 0}), false),
            ApiReply::new(400, "Timeout should be a positive number of seconds")
        );
        assert_eq!(err(json!({"timeout": [1]}), false).status, 400);
        assert!(
            err(json!({"restart_pending": {}}), false)
                .body
                .contains("restart_pending")
        );
        assert_eq!(
            err(json!({"role": "replica", "bogus": 1}), false),
            ApiReply::new(400, "Unknown filter for the scheduled restart: bogus")
        );
        // The first problem in body order wins.
        assert_eq!(
            err(json!({"bogus": 1, "timeout": -1}), false).body,
            "Unknown filter for the scheduled restart: bogus"
        );
        assert_eq!(err(json!({"schedule": "2031-01-01T00:00"}), false).status, 400);
        assert_eq!(err(json!({"schedule": "2020-01-01T00:00Z"}), false).status, 422);
    }

    #[test]
    fn patching() {
        let mut config = obj(
            json!({"ttl": 30, "postgresql": {"parameters": {"max_connections": 100, "work_mem": "4MB"}},
                                    "pause": true}),
        );
        assert!(!patch_config(&mut config, &obj(json!({"ttl": "30"}))));
        assert!(!patch_config(&mut config, &obj(json!({"missing": null}))));
        assert!(patch_config(
            &mut config,
            &obj(json!({"pause": null, "loop_wait": 5,
                        "postgresql": {"parameters": {"work_mem": null, "max_connections": 200}}}))
        ));
        assert_eq!(
            Value::Object(config.clone()),
            json!({"ttl": 30, "postgresql": {"parameters": {"max_connections": 200}}, "loop_wait": 5})
        );
        assert!(patch_config(&mut config, &obj(json!({"ttl": {"x": 1}}))));
        assert_eq!(config["ttl"], json!({"x": 1}));
        let mut c = obj(json!({"flag": true}));
        assert!(!patch_config(&mut c, &obj(json!({"flag": "True"}))));
        assert!(patch_config(&mut c, &obj(json!({"flag": "true"}))));
    }

    #[test]
    fn comparing() {
        assert!(deep_compare(
            &obj(json!({"a": 1, "b": {"c": "2"}})),
            &obj(json!({"b": {"c": 2}, "a": "1"}))
        ));
        assert!(!deep_compare(
            &obj(json!({"a": 1})),
            &obj(json!({"a": 1, "b": 2}))
        ));
        assert!(!deep_compare(&obj(json!({"a": {}})), &obj(json!({"a": null}))));
        assert!(!deep_compare(&obj(json!({"a": [1]})), &obj(json!({"a": [2]}))));
        assert!(!deep_compare(&obj(json!({"1": null})), &obj(json!({}))));
    }

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
