//! The `router:` section: settings of `pgvigil router CONFIG.yml`, the client router that sends
//! port 5000 to the primary and port 5001 to the replicas, learning the topology from the
//! cluster's etcd keys. The agent ignores this section; Patroni ignores it too, so the same file
//! keeps working with `patroni` and `patronictl`.
//!
//! ```yaml
//! router:
//!   primary_listen: 127.0.0.1:5000     # read-write: the running primary holding the leader key
//!   replicas_listen: 127.0.0.1:5001    # read-only: streaming replicas within max_replica_lag
//!   stats_listen: 127.0.0.1:7000       # HTML page (/), JSON (/stats.json), Prometheus (/metrics)
//!   max_replica_lag: 100MB             # bytes, or with a unit: kB, MB, GB, TB
//!   primary_serves_reads_fallback: false
//!   stale_topology_timeout: 30         # seconds
//!   connect_timeout: 3                 # seconds
//!   shutdown_timeout: 10               # seconds
//!   threads: 1                         # threads that carry client connections
//! ```

use crate::error::ConfigError;
use crate::postgresql::split_host_port;
use crate::walk::{Ctx, Obj, as_i64, describe};

/// `router` section. Every key is optional.
///
/// The listen addresses default to the loopback interface: a router that accepts connections
/// from the network is a decision to make explicitly (set `0.0.0.0:5000` or the host's address,
/// and protect PostgreSQL with `pg_hba.conf` as usual: the router does not authenticate, it only
/// forwards bytes, so PostgreSQL sees the router's address as the client address).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// `primary_listen` (default `127.0.0.1:5000`): `host:port` for read-write connections.
    /// They go to the member that holds the leader key and whose member key says it is a
    /// running primary; when there is none, new connections are refused at once with a
    /// PostgreSQL error (SQLSTATE 57P03), and when the leader changes every connection to the
    /// former leader is closed.
    pub primary_listen: String,
    /// `replicas_listen` (default `127.0.0.1:5001`): `host:port` for read-only connections,
    /// balanced round-robin over running, streaming replicas within `max_replica_lag`, skipping
    /// members tagged `noloadbalance`.
    pub replicas_listen: String,
    /// `stats_listen` (default `127.0.0.1:7000`): `host:port` of the stats server: an HTML page
    /// at `/`, the same as JSON at `/stats.json`, Prometheus metrics at `/metrics`.
    pub stats_listen: String,
    /// `max_replica_lag` (default `100MB`): a replica more than this many bytes behind the
    /// leader gets no new read-only connections (established ones stay). An integer (bytes) or a
    /// size with a unit (`kB`, `MB`, `GB`, `TB`, powers of 1024); `-1` or `unlimited` turns the
    /// limit off. The lag is computed from the member keys (leader position minus replayed
    /// position), which the agents refresh every `loop_wait`, each at its own moment: the
    /// estimate can be off by `loop_wait` seconds of WAL (and by a 16 MB segment switch on an
    /// idle primary), so keep the limit well above that. The default is autobase's value for
    /// the same HAProxy check.
    pub max_replica_lag: Option<u64>,
    /// `primary_serves_reads_fallback` (default false): when no replica qualifies, send
    /// read-only connections to the primary instead of refusing them. Off by default, like
    /// HAProxy's `/replica` check: a read-only port that silently lands on the primary hides a
    /// broken replica set and can overload the primary.
    pub primary_serves_reads_fallback: bool,
    /// `stale_topology_timeout` (default 30, seconds, at least 1): how long the router keeps
    /// routing new connections by the last topology it read when etcd cannot be reached. Past
    /// it new connections are refused (the topology is unknown); established connections are
    /// never closed because of an etcd outage. Keep it at or below the cluster's `ttl`: a
    /// primary that cannot reach etcd demotes itself before its lease expires anyway.
    pub stale_topology_timeout: u64,
    /// `connect_timeout` (default 3, seconds, at least 1): how long to wait for PostgreSQL to
    /// accept the router's connection before refusing the client (for replicas the next
    /// replica is tried first).
    pub connect_timeout: u64,
    /// `shutdown_timeout` (default 10, seconds): on SIGTERM or SIGINT the router stops
    /// accepting, lets established connections finish for this long, then closes the rest.
    /// 0 closes them at once.
    pub shutdown_timeout: u64,
    /// `threads` (default 1, at least 1): how many threads carry client connections. Each
    /// connection stays on one thread, which runs its own event loop, so no thread is woken on
    /// another's behalf. One thread forwards tens of thousands of queries per second (the work
    /// per query is mostly the kernel's: two reads, two writes); raise it only when the router's
    /// CPU use approaches one core, and leave it at 1 where the router shares a few cores with
    /// PostgreSQL or the application, since a second thread adds wake-ups, not capacity. Read
    /// at start-up only: a reload that changes it is applied at the next start.
    pub threads: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            primary_listen: "127.0.0.1:5000".to_string(),
            replicas_listen: "127.0.0.1:5001".to_string(),
            stats_listen: "127.0.0.1:7000".to_string(),
            max_replica_lag: Some(100 * 1024 * 1024),
            primary_serves_reads_fallback: false,
            stale_topology_timeout: 30,
            connect_timeout: 3,
            shutdown_timeout: 10,
            threads: 1,
        }
    }
}

/// Parses a size in bytes: an integer, or a number followed by `B`, `kB`, `MB`, `GB` or `TB`
/// (powers of 1024, as PostgreSQL and Patroni's `?lag=` use them; the unit is matched without
/// regard to case). Returns `None` for anything else.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return None,
    };
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(factor);
    }
    let f: f64 = number.parse().ok()?;
    let bytes = f * factor as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then(|| bytes.round() as u64)
}

pub(crate) fn parse_router(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<RouterConfig, ConfigError> {
    let mut r = RouterConfig::default();
    for (key, slot) in [
        ("primary_listen", &mut r.primary_listen),
        ("replicas_listen", &mut r.replicas_listen),
        ("stats_listen", &mut r.stats_listen),
    ] {
        if let Some(value) = o.string(ctx, key)? {
            let ok = split_host_port(&value, None).is_some_and(|(host, port)| !host.is_empty() && port > 0);
            if !ok {
                let msg =
                    format!("expected host:port (e.g. 127.0.0.1:5000 or 0.0.0.0:5000), found {value:?}");
                return Err(ctx.error(&o.key_path(key), msg));
            }
            *slot = value.trim().to_string();
        }
    }
    let addresses = [
        ("primary_listen", &r.primary_listen),
        ("replicas_listen", &r.replicas_listen),
        ("stats_listen", &r.stats_listen),
    ];
    for (i, (a, va)) in addresses.iter().enumerate() {
        for (b, vb) in &addresses[i + 1..] {
            if va == vb {
                let msg = format!("{va} is also router.{a}: each listener needs its own address");
                return Err(ctx.error(&o.key_path(b), msg));
            }
        }
    }
    if let Some(v) = o.raw("max_replica_lag") {
        let path = o.key_path("max_replica_lag");
        let unlimited = matches!(v, serde_json::Value::String(s) if s.trim().eq_ignore_ascii_case("unlimited"))
            || as_i64(v) == Some(-1);
        r.max_replica_lag = if unlimited {
            None
        } else {
            let parsed = match v {
                serde_json::Value::String(s) => parse_size(s),
                other => as_i64(other).and_then(|n| u64::try_from(n).ok()),
            };
            match parsed {
                Some(n) => Some(n),
                None => {
                    let msg = format!(
                        "expected a size in bytes (e.g. 16777216 or 16MB; -1 or unlimited for no limit), found {}",
                        describe(v)
                    );
                    return Err(ctx.error(&path, msg));
                }
            }
        };
    }
    if let Some(b) = o.bool(ctx, "primary_serves_reads_fallback")? {
        r.primary_serves_reads_fallback = b;
    }
    if let Some(n) = o.i64_min(ctx, "stale_topology_timeout", 1)? {
        r.stale_topology_timeout = n as u64;
    }
    if let Some(n) = o.i64_min(ctx, "connect_timeout", 1)? {
        r.connect_timeout = n as u64;
    }
    if let Some(n) = o.u64(ctx, "shutdown_timeout")? {
        r.shutdown_timeout = n;
    }
    if let Some(n) = o.i64_min(ctx, "threads", 1)? {
        r.threads = n as u64;
    }
    o.finish(ctx);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size(" 10 mb "), Some(10 << 20));
        assert_eq!(parse_size("1kB"), Some(1024));
        assert_eq!(parse_size("1.5GB"), Some(3 << 29));
        assert_eq!(parse_size("2TB"), Some(2 << 40));
        assert_eq!(parse_size("5B"), Some(5));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("10 parsecs"), None);
        assert_eq!(parse_size("-5"), None);
        assert_eq!(parse_size(""), None);
    }
}
