//! Noticing a synchronous standby that stopped answering, within seconds.
//!
//! When a synchronous standby's host dies or is cut off, commits on the primary wait for it,
//! but nothing PostgreSQL shows changes for a long time: its walsender stays `streaming`
//! until `wal_sender_timeout` (60 s by default) and its member key stays until its lease
//! expires (`ttl`). So the leader watches the standbys' flush positions itself: while
//! synchronous replication is on, a task samples `pg_stat_replication` every
//! [`SAMPLE_EVERY`]; a standby that has WAL outstanding (sent beyond what it flushed) and has
//! not flushed anything further for `sync_standby_timeout` is **stalled**. The sync manager
//! treats a stalled standby as not streaming, so another streaming replica is named (or, not
//! strict, replication goes on without one) and commits resume; a standby that flushes again
//! is a candidate again.
//!
//! A slow standby that keeps flushing is never stalled, however far behind: that is what
//! `maximum_lag_on_syncnode` is for. An idle primary sends nothing, so nothing can stall.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgvigil_postgres::Postgres;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the standbys' positions are sampled while synchronous replication is on.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);

const QUERY: &str = "SELECT application_name, \
     pg_catalog.pg_wal_lsn_diff(sent_lsn, '0/0')::int8, \
     pg_catalog.pg_wal_lsn_diff(flush_lsn, '0/0')::int8 \
     FROM pg_catalog.pg_stat_replication";

/// Progress of one standby.
#[derive(Clone, Copy, Debug)]
struct Progress {
    flushed: u64,
    /// When `flushed` last moved (or the standby was first seen).
    moved_at: Instant,
    /// It had WAL outstanding at the last sample.
    behind: bool,
    /// Its stall was already reported (once per stall, not at every sample).
    reported: bool,
}

/// The standbys' progress, shared by the sampler and the HA loop.
#[derive(Default)]
pub struct SyncWatch {
    standbys: Mutex<HashMap<String, Progress>>,
    /// `Some(timeout)` while the sampler should run: leader with synchronous replication on.
    enabled: Mutex<Option<Duration>>,
    enabled_changed: Notify,
}

impl SyncWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Progress>> {
        self.standbys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts (with the stall timeout) or stops the sampling.
    pub fn enable(&self, timeout: Option<Duration>) {
        let mut enabled = self.enabled.lock().unwrap_or_else(|e| e.into_inner());
        if *enabled != timeout {
            *enabled = timeout;
            if timeout.is_none() {
                self.lock().clear();
            }
            self.enabled_changed.notify_one();
        }
    }

    fn timeout(&self) -> Option<Duration> {
        *self.enabled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one sample: `(application_name, sent, flushed)` per walsender. Returns whether a
    /// standby became stalled or disconnected with it: either may be one PostgreSQL waits for,
    /// and the loop should choose again now rather than at its next `loop_wait` (a standby that
    /// shuts down takes its walsender with it at once).
    pub fn record(&self, now: Instant, sample: &[(String, u64, u64)], timeout: Duration) -> bool {
        let mut standbys = self.lock();
        let before = standbys.len();
        standbys.retain(|name, _| sample.iter().any(|(n, _, _)| n == name));
        let disconnected = standbys.len() < before;
        for (name, sent, flushed) in sample {
            let entry = standbys.entry(name.clone()).or_insert(Progress {
                flushed: *flushed,
                moved_at: now,
                behind: false,
                reported: false,
            });
            if *flushed > entry.flushed {
                entry.flushed = *flushed;
                entry.moved_at = now;
            }
            // Caught up: nothing to wait for, so the clock restarts from here.
            if *sent <= *flushed {
                entry.moved_at = now;
            }
            entry.behind = *sent > *flushed;
        }
        let mut newly = disconnected;
        for p in standbys.values_mut() {
            let now_stalled = stalled(p, now, timeout);
            newly |= now_stalled && !p.reported;
            p.reported = now_stalled;
        }
        newly
    }

    /// Whether `name` is stalled now.
    pub fn is_stalled(&self, name: &str, now: Instant) -> bool {
        let Some(timeout) = self.timeout() else {
            return false;
        };
        let standbys = self.lock();
        standbys
            .iter()
            .any(|(n, p)| n.eq_ignore_ascii_case(name) && stalled(p, now, timeout))
    }
}

fn stalled(p: &Progress, now: Instant, timeout: Duration) -> bool {
    p.behind && now.saturating_duration_since(p.moved_at) >= timeout
}

/// Samples while enabled; wakes the HA loop (`wake`) when a standby stalls.
pub async fn sample(watch: Arc<SyncWatch>, pg: Arc<Postgres>, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        let Some(timeout) = watch.timeout() else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = watch.enabled_changed.notified() => continue,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
        let Ok(rows) = pg.query_rows(QUERY, Duration::from_secs(2)).await else {
            continue;
        };
        let sample: Vec<(String, u64, u64)> = rows
            .into_iter()
            .filter_map(|r| {
                let name = r.first()?.clone()?;
                let num = |i: usize| r.get(i).cloned().flatten().and_then(|v| v.parse::<u64>().ok());
                Some((name, num(1).unwrap_or(0), num(2).unwrap_or(0)))
            })
            .collect();
        if watch.record(Instant::now(), &sample, timeout) {
            tracing::warn!(
                "a standby stopped flushing WAL or disconnected; choosing the synchronous standbys again"
            );
            wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, secs: f64) -> Instant {
        base + Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_standby_with_wal_outstanding_and_no_progress_stalls() {
        let w = SyncWatch::default();
        let t = Duration::from_secs(2);
        w.enable(Some(t));
        let b = Instant::now();
        assert!(!w.record(b, &[("b".into(), 100, 100), ("c".into(), 100, 100)], t));
        // b stops answering while writes go on; c keeps flushing.
        assert!(!w.record(at(b, 1.0), &[("b".into(), 200, 100), ("c".into(), 200, 200)], t));
        assert!(!w.is_stalled("b", at(b, 1.9)));
        assert!(w.record(at(b, 2.1), &[("b".into(), 300, 100), ("c".into(), 300, 300)], t));
        assert!(w.is_stalled("B", at(b, 2.1)), "names compare case-insensitively");
        assert!(!w.is_stalled("c", at(b, 2.1)));
        // Reported once, not at every sample.
        assert!(!w.record(at(b, 2.6), &[("b".into(), 300, 100), ("c".into(), 300, 300)], t));
        // It flushes again: a candidate again.
        w.record(at(b, 3.0), &[("b".into(), 300, 150)], t);
        assert!(!w.is_stalled("b", at(b, 3.0)));
    }

    #[test]
    fn a_standby_that_disconnects_is_reported_once() {
        let w = SyncWatch::default();
        let t = Duration::from_secs(2);
        w.enable(Some(t));
        let b = Instant::now();
        assert!(!w.record(b, &[("b".into(), 100, 100), ("c".into(), 100, 100)], t));
        assert!(
            w.record(at(b, 0.5), &[("c".into(), 100, 100)], t),
            "b's walsender is gone"
        );
        assert!(!w.record(at(b, 1.0), &[("c".into(), 100, 100)], t));
        assert!(!w.record(at(b, 1.5), &[("b".into(), 100, 100), ("c".into(), 100, 100)], t));
    }

    #[test]
    fn idle_or_slow_but_moving_standbys_never_stall_and_disabling_forgets() {
        let w = SyncWatch::default();
        let t = Duration::from_secs(2);
        w.enable(Some(t));
        let b = Instant::now();
        for i in 0u32..10 {
            // Nothing outstanding (idle primary).
            w.record(
                at(b, f64::from(i)),
                &[("idle".into(), 50, 50), ("slow".into(), 1000, 10 * u64::from(i))],
                t,
            );
        }
        assert!(!w.is_stalled("idle", at(b, 10.0)));
        assert!(!w.is_stalled("slow", at(b, 10.0)));
        w.record(at(b, 10.0), &[("slow".into(), 1000, 90)], t);
        assert!(w.is_stalled("slow", at(b, 12.5)));
        w.enable(None);
        assert!(!w.is_stalled("slow", at(b, 12.5)));
    }
}
