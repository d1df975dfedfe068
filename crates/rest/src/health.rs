//! Health-check status codes (`docs/patroni-compat.md` §2.3) and probes (§2.4). Pure functions of
//! the snapshot, the request path and its query: nothing here touches PostgreSQL or the DCS.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::snapshot::NodeSnapshot;

/// The status code of `GET <path>?<query>` for every path that Patroni answers status-only or
/// through its generic health-check handler: `/liveness` and `/readiness` (selected by the
/// first path segment) and the substring rules of §2.3 otherwise (`/` counts as `/primary`).
pub fn health_code(path: &str, query: &[(String, String)], snap: &NodeSnapshot, now: Instant) -> u16 {
    match first_segment(path) {
        "liveness" => liveness_code(snap, now),
        "readiness" => readiness_code(query, snap, now),
        _ => generic_code(path, query, snap, now),
    }
}

/// The first path segment, which selects Patroni's `do_<METHOD>_<segment>` handler.
pub fn first_segment(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or("")
}

/// The generic handler of §2.3 (also what `HEAD`/`OPTIONS` run on any other path).
pub fn generic_code(path: &str, query: &[(String, String)], snap: &NodeSnapshot, now: Instant) -> u16 {
    let path = if path == "/" { "/primary" } else { path };
    let s = &snap.status;
    let cluster_available = snap.cluster.is_some();

    let leader_optime = i128::from(snap.leader_optime());
    let replayed = i128::from(s.xlog.as_ref().and_then(|x| x.replayed_location).unwrap_or(0));
    let lag_limit = query_first(query, "lag")
        .and_then(parse_bytes)
        .unwrap_or(i128::from(i64::MAX));
    let lagging = leader_optime != 0 && leader_optime > replayed.saturating_add(lag_limit);
    let replication_state_matches = match query_first(query, "replication_state") {
        Some(wanted) => s.replication_state.as_deref() == Some(wanted),
        None => true,
    };
    let ok = |cond: bool| if cond { 200 } else { 503 };

    let running = s.state == "running";
    let mut replica =
        ok(!noloadbalance(snap) && !lagging && s.role == "replica" && running && replication_state_matches);

    let (leader, primary, standby_leader);
    if !cluster_available && s.pause == Some(true) {
        leader = ok(matches!(s.role.as_str(), "primary" | "standby_leader"));
        primary = ok(s.role == "primary");
        standby_leader = ok(s.role == "standby_leader");
    } else if snap.is_leader(now) {
        leader = 200;
        if snap.standby_cluster {
            primary = 503;
            replica = 503;
            standby_leader = ok(matches!(s.role.as_str(), "replica" | "standby_leader"));
        } else {
            primary = 200;
            standby_leader = 503;
        }
    } else {
        (leader, primary, standby_leader) = (503, 503, 503);
    }
    let primary_or_standby_leader = primary == 200 || standby_leader == 200;
    let is_sync = s.sync_standby == Some(true);
    let is_quorum = s.quorum_standby == Some(true);

    let mut ignore_tags = false;
    let mut code = 503;
    if path.contains("standby_leader") || path.contains("standby-leader") {
        code = standby_leader;
        ignore_tags = true;
    } else if path.contains("leader") {
        code = leader;
        ignore_tags = true;
    } else if path.contains("master") || path.contains("primary") || path.contains("read-write") {
        code = primary;
        ignore_tags = true;
    } else if path.contains("replica") {
        code = replica;
    } else if path.contains("read-only") && !path.contains("sync") && !path.contains("quorum") {
        code = if primary_or_standby_leader { 200 } else { replica };
    } else if path.contains("health") {
        code = ok(running);
    } else if cluster_available {
        code = match path {
            "/sync" | "/synchronous" if is_sync => replica,
            "/quorum" if is_quorum => replica,
            "/async" | "/asynchronous" if !is_sync && !is_quorum => replica,
            "/read-only-quorum" if primary_or_standby_leader => 200,
            "/read-only-quorum" if is_quorum => replica,
            "/read-only-sync" | "/read-only-synchronous" if primary_or_standby_leader => 200,
            "/read-only-sync" | "/read-only-synchronous" if is_sync => replica,
            _ => 503,
        };
    }

    if !ignore_tags && code == 200 && !tags_match(query, snap) {
        code = 503;
    }
    code
}

/// `GET /liveness`: 200 when paused, or while the next HA cycle is due less than `ttl` (running
/// primary) or `2*ttl` (anything else) ago.
pub fn liveness_code(snap: &NodeSnapshot, now: Instant) -> u16 {
    let running_primary = snap.status.role == "primary" && snap.status.state == "running";
    let threshold = Duration::from_secs(snap.ttl.saturating_mul(if running_primary { 1 } else { 2 }));
    if snap.paused || snap.next_run + threshold > now {
        200
    } else {
        503
    }
}

/// `GET /readiness?lag=&mode=apply|write`.
pub fn readiness_code(query: &[(String, String)], snap: &NodeSnapshot, now: Instant) -> u16 {
    match readiness_failure(query, snap, now) {
        None => 200,
        Some(reason) => {
            tracing::debug!("Readiness check failure: {reason}");
            503
        }
    }
}

/// Why the node is not ready, or `None` when it is.
pub fn readiness_failure(query: &[(String, String)], snap: &NodeSnapshot, now: Instant) -> Option<String> {
    if snap.is_leader(now) {
        return None;
    }
    let s = &snap.status;
    if s.state != "running" {
        return Some("PostgreSQL is not running".into());
    }
    if s.replication_state.as_deref() != Some("streaming") {
        return Some("PostgreSQL replication state is not streaming".into());
    }
    let latest_end_lsn = snap.wal_receiver_latest_end_lsn.unwrap_or(0);
    if snap.cluster.is_none() && latest_end_lsn == 0 {
        return if snap.failsafe_active {
            None
        } else {
            Some("DCS is not accessible".into())
        };
    }
    let write = query_first(query, "mode") == Some("write");
    let xlog = s.xlog.as_ref();
    let location = if write {
        xlog.and_then(|x| x.received_location)
    } else {
        xlog.and_then(|x| x.replayed_location)
    };
    let lag = i128::from(snap.leader_optime()) - i128::from(location.unwrap_or(0));
    let max_lag = query_first(query, "lag")
        .and_then(parse_bytes)
        .unwrap_or(i128::from(snap.maximum_lag_on_failover));
    if lag > max_lag {
        let mode = if write { "write" } else { "apply" };
        return Some(format!(
            "Replication {mode} lag {lag} exceeds maximum allowable {max_lag}"
        ));
    }
    None
}

fn noloadbalance(snap: &NodeSnapshot) -> bool {
    pgvigil_api::values::tag_is_true(snap.tags.get("noloadbalance"))
}

/// `tag_<key>=<value>` filters: every one must name an existing tag with that value (non-string
/// tag values compare as lower-cased text: `true`, `1.4`).
fn tags_match(query: &[(String, String)], snap: &NodeSnapshot) -> bool {
    let mut seen = HashSet::new();
    for (key, wanted) in query {
        if wanted.is_empty() || !seen.insert(key.as_str()) {
            continue;
        }
        let Some(tag) = key.strip_prefix("tag_") else {
            continue;
        };
        let actual = match snap.tags.get(tag) {
            None | Some(Value::Null) => return false,
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string().to_lowercase(),
        };
        if actual != *wanted {
            return false;
        }
    }
    true
}

/// The first non-empty value of a query parameter (Python's `parse_qs` drops blank values).
pub fn query_first<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, v)| k == key && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// Parses a size in bytes the way Patroni's `parse_int(value, 'B')` does: an integer (decimal,
/// `0x` hex or `0`-prefixed octal) or a decimal fraction, optionally followed by one of the
/// case-sensitive units `B`, `kB`, `MB`, `GB`, `TB`. Unparsable text gives `None` (callers then
/// use their default, like Patroni).
pub fn parse_bytes(text: &str) -> Option<i128> {
    let text = text.trim();
    let (mut value, mut rest) = match strtol(text) {
        Some((v, rest)) => (Some(Number::Int(v)), rest),
        None => (None, text),
    };
    if rest.starts_with(['.', 'e', 'E']) {
        (value, rest) = match strtod(text) {
            Some((v, rest)) => (Some(Number::Float(v)), rest),
            None => (None, text),
        };
    }
    let value = value?;
    let unit = rest.trim();
    if unit.is_empty() {
        return value.round();
    }
    // (bytes per unit, rounding granularity: the next smaller unit)
    let (factor, granularity): (f64, f64) = match unit {
        "TB" => (1024f64.powi(4), 1024f64.powi(3)),
        "GB" => (1024f64.powi(3), 1024f64.powi(2)),
        "MB" => (1024f64.powi(2), 1024.0),
        "kB" => (1024.0, 1.0),
        "B" => (1.0, 0.0),
        _ => return None,
    };
    let mut bytes = value.as_f64() * factor;
    if granularity > 0.0 {
        bytes = (bytes / granularity).round_ties_even() * granularity;
    }
    Number::Float(bytes).round()
}

#[derive(Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    /// Python's `round()`: ties to even; non-finite values do not parse.
    fn round(self) -> Option<i128> {
        match self {
            Number::Int(i) => Some(i),
            Number::Float(f) if f.is_finite() => Some(f.round_ties_even() as i128),
            Number::Float(_) => None,
        }
    }
}

/// `strtol(3)` with base 0 on an already trimmed string: the integer prefix and the rest.
fn strtol(text: &str) -> Option<(i128, &str)> {
    let (negative, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let sign_len = text.len() - body.len();
    let (radix, start) = if body.starts_with("0x") && body[2..].starts_with(|c: char| c.is_ascii_hexdigit()) {
        (16, 2)
    } else if body.starts_with('0') {
        (8, 1)
    } else if body.starts_with(|c: char| c.is_ascii_digit()) {
        (10, 0)
    } else {
        return None;
    };
    let digits = body[start..]
        .find(|c: char| !c.is_digit(radix))
        .map_or(body.len() - start, |n| n);
    let mut value: i128 = 0;
    for c in body[start..start + digits].chars() {
        let d = i128::from(c.to_digit(radix).unwrap_or(0));
        value = value.saturating_mul(i128::from(radix)).saturating_add(d);
    }
    let end = sign_len + start + digits;
    Some((if negative { -value } else { value }, &text[end..]))
}

/// `strtod(3)` restricted to Patroni's pattern `[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?`.
fn strtod(text: &str) -> Option<(f64, &str)> {
    let bytes = text.as_bytes();
    let digits_from = |i: usize| bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    let mut i = usize::from(matches!(bytes.first(), Some(b'-' | b'+')));
    let int_digits = digits_from(i);
    i += int_digits;
    if bytes.get(i) == Some(&b'.') && digits_from(i + 1) > 0 {
        i += 1 + digits_from(i + 1);
    } else if int_digits == 0 {
        return None;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(bytes.get(i + 1), Some(b'-' | b'+')));
        let exp_digits = digits_from(i + 1 + sign);
        if exp_digits > 0 {
            i += 1 + sign + exp_digits;
        }
    }
    let value: f64 = text[..i].parse().ok()?;
    Some((value, &text[i..]))
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
