//! `POST /restart` bodies.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::values::*;
use crate::{ApiReply, RestartRequest};

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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{now, obj};
    use super::*;
    use serde_json::json;

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
}
