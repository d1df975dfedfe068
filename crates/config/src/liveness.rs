//! `pgvigil:` in the dynamic configuration: how fast pgvigil notices a dead leader or a dead
//! synchronous standby (not Patroni settings; Patroni keeps unknown dynamic keys and ignores
//! them).
//!
//! ```yaml
//! bootstrap:
//!   dcs:
//!     pgvigil:
//!       fast_takeover: true       # default; off: a dead leader is replaced when its lease expires
//!       heartbeat_interval: 500ms # H: how often the leader proves the key is its own
//!       fence_after: 3500ms       # F: a leader that proved nothing for this long stops PostgreSQL
//!       takeover_margin: 500ms    # m: replicas take over after F + m of silence
//!       sync_standby_timeout: 2s  # a synchronous standby that flushed nothing for this long
//!                                 # while WAL waits for it is replaced
//! ```
//!
//! Values are seconds (`3.5`) or durations with a unit (`500ms`, `3s`). The leader promises F
//! in its heartbeat only while every member is a pgvigil agent, no watchdog is armed and its
//! fencer process runs; otherwise failover waits for the lease (`ttl`) as with Patroni.

use std::time::Duration;

use serde_json::Value;

use crate::error::ConfigError;
use crate::walk::{Ctx, Obj, describe};

/// The `pgvigil` section of the dynamic configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// `fast_takeover` (default true).
    pub enabled: bool,
    /// `heartbeat_interval` H (default 500 ms).
    pub heartbeat_interval: Duration,
    /// `fence_after` F, the leader's promise (default 3.5 s).
    pub fence_after: Duration,
    /// `takeover_margin` m, added by replicas (default 500 ms).
    pub takeover_margin: Duration,
    /// `sync_standby_timeout` (default 2 s).
    pub sync_standby_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            enabled: true,
            heartbeat_interval: Duration::from_millis(500),
            fence_after: Duration::from_millis(3500),
            takeover_margin: Duration::from_millis(500),
            sync_standby_timeout: Duration::from_secs(2),
        }
    }
}

/// Seconds (`3.5`, `3`) or `<number><unit>` with `ms`, `s` or `min`.
fn duration(v: &Value) -> Option<Duration> {
    if let Some(f) = v.as_f64() {
        return (f.is_finite() && f >= 0.0).then(|| Duration::from_secs_f64(f));
    }
    let s = v.as_str()?.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let factor = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "min" => 60.0,
        _ => return None,
    };
    let secs = num * factor;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Reads the `pgvigil` section; `ttl` bounds the promise (the lease must outlast it).
pub(crate) fn parse_liveness(mut o: Obj<'_>, ctx: &mut Ctx, ttl: u64) -> Result<Liveness, ConfigError> {
    let mut t = Liveness::default();
    if let Some(b) = o.bool(ctx, "fast_takeover")? {
        t.enabled = b;
    }
    for (key, slot) in [
        ("heartbeat_interval", &mut t.heartbeat_interval),
        ("fence_after", &mut t.fence_after),
        ("takeover_margin", &mut t.takeover_margin),
        ("sync_standby_timeout", &mut t.sync_standby_timeout),
    ] {
        if let Some(v) = o.raw(key) {
            match duration(v) {
                Some(d) => *slot = d,
                None => {
                    let msg = format!(
                        "expected seconds or a duration such as 500ms, found {}",
                        describe(v)
                    );
                    ctx.bad::<()>(&o.key_path(key), msg)?;
                }
            }
        }
    }
    let defaults = Liveness {
        enabled: t.enabled,
        ..Liveness::default()
    };
    let problem = if t.fence_after < Duration::from_secs(1) || t.fence_after > Duration::from_secs(ttl) / 2 {
        Some((
            "fence_after",
            format!("must be between 1 s and ttl/2 ({} s)", ttl as f64 / 2.0),
        ))
    } else if t.heartbeat_interval < Duration::from_millis(50) || t.heartbeat_interval > t.fence_after / 3 {
        Some((
            "heartbeat_interval",
            "must be between 50 ms and a third of fence_after".to_string(),
        ))
    } else if t.takeover_margin < Duration::from_millis(100) || t.takeover_margin > t.fence_after {
        Some((
            "takeover_margin",
            "must be between 100 ms and fence_after".to_string(),
        ))
    } else if t.sync_standby_timeout < Duration::from_secs(1)
        || t.sync_standby_timeout > Duration::from_secs(ttl)
    {
        Some((
            "sync_standby_timeout",
            format!("must be between 1 s and ttl ({ttl} s)"),
        ))
    } else {
        None
    };
    if let Some((key, msg)) = problem {
        ctx.bad::<()>(&o.key_path(key), msg)?;
        t = defaults;
    }
    o.finish(ctx);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::yaml::Origins;

    fn parse(v: Value, lenient: bool) -> (Result<Liveness, ConfigError>, Vec<String>) {
        let mut ctx = Ctx::new(Origins::new("test"));
        ctx.lenient = lenient;
        let r = parse_liveness(Obj::new("pgvigil", v.as_object()), &mut ctx, 30);
        (r, ctx.warnings)
    }

    #[test]
    fn defaults_units_and_switch() {
        assert_eq!(parse(json!({}), false).0.unwrap(), Liveness::default());
        let t = parse(
            json!({"fast_takeover": false, "heartbeat_interval": "250ms", "fence_after": 4, "takeover_margin": "0.3s"}),
            false,
        )
        .0
        .unwrap();
        assert!(!t.enabled);
        assert_eq!(t.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(t.fence_after, Duration::from_secs(4));
        assert_eq!(t.takeover_margin, Duration::from_millis(300));
    }

    #[test]
    fn bad_values_name_the_key() {
        let (r, _) = parse(json!({"fence_after": "soon"}), false);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("pgvigil.fence_after") && e.contains("\"soon\""), "{e}");
        let (r, _) = parse(json!({"fence_after": 20}), false);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("pgvigil.fence_after") && e.contains("ttl/2"), "{e}");
        let (r, _) = parse(json!({"heartbeat_interval": 2}), false);
        assert!(r.unwrap_err().to_string().contains("pgvigil.heartbeat_interval"));
        let (r, _) = parse(json!({"takeover_margin": "10ms"}), false);
        assert!(r.unwrap_err().to_string().contains("pgvigil.takeover_margin"));
        let (r, _) = parse(json!({"sync_standby_timeout": "100ms"}), false);
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("pgvigil.sync_standby_timeout")
        );
        let (r, _) = parse(json!({"fast": true}), false);
        assert!(r.is_ok());
        // Lenient (a value in etcd): warning and defaults.
        let (r, w) = parse(json!({"fence_after": 20}), true);
        assert_eq!(r.unwrap(), Liveness::default());
        assert!(w.iter().any(|w| w.contains("pgvigil.fence_after")), "{w:?}");
    }
}
