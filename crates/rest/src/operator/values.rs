//! Scalars in operator request bodies as Patroni reads them: timestamps with or without a
//! zone, booleans, seconds, PostgreSQL versions, and Python's `str()` of a value.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use serde_json::Value;

use crate::ApiReply;

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

#[cfg(test)]
mod tests {
    use super::super::fixtures::now;
    use super::*;
    use serde_json::json;

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
}
