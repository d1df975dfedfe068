//! The lease guardian: keeps this node's etcd lease alive and fences a primary that can no longer
//! prove it holds the lock.
//!
//! # Timing argument
//!
//! Let `T` be the lease TTL and `s` the moment the last *successful* keep-alive request was
//! **sent**. etcd processed it at some `r >= s` and reset the lease to expire at `r + T` on its own
//! clock; etcd never shortens a lease (a new etcd leader even extends them), so no other node can
//! create the `leader` key before `s + T`. The guardian fences at `s + T - M`, with the margin
//! `M = max(2 s, T/10)` covering timer jitter, clock-rate drift over `T`, and the time an
//! immediate shutdown needs to stop every backend (milliseconds). Hence the old primary stops
//! accepting writes strictly before a replica can take the lock, whatever the HA loop is doing.
//!
//! The guardian is its own task: it never waits on SQL or on the REST API, and it sleeps exactly
//! until the next renewal or the fencing deadline, whichever comes first. It renews only while the
//! HA loop reports progress ([`LeaseShared::loop_alive_until`]), so a stuck loop cannot keep a
//! leader in place forever: the lease runs out and the same deadline fences it. A frozen process
//! (SIGSTOP) cannot fence itself; that is what a hardware watchdog is for: the guardian feeds it
//! after every successful renewal ([`super::watchdog`]).
//!
//! In failsafe mode (§4.10) a round of `POST /failsafe` that every member accepted, sent at `t`,
//! counts like a renewal sent at `t`: those members promised not to race for `T` seconds from
//! receipt, and no other member may race ([`super::failsafe`]). The guardian runs such a round
//! itself when a renewal fails, so the deadline moves on even while the HA loop is still
//! waiting for etcd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pgvigil_dcs::Dcs;
use pgvigil_postgres::Postgres;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// A copyable value behind a std mutex: a few words, never held across an await, and a
/// poisoned lock still holds a valid value.
struct Mutex<T>(std::sync::Mutex<T>);

impl<T: Copy> Mutex<T> {
    fn new(v: T) -> Self {
        Mutex(std::sync::Mutex::new(v))
    }
    fn get(&self) -> T {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set(&self, v: T) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }
}

/// The lease timings currently in force (they follow the dynamic configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub loop_wait: Duration,
    pub retry_timeout: Duration,
}

impl LeaseTiming {
    /// The fencing margin `M` of the timing argument above.
    pub fn margin(&self) -> Duration {
        (self.ttl / 10).max(Duration::from_secs(2))
    }

    /// How often a healthy lease is refreshed: every `loop_wait`, but at least three times per
    /// TTL so that one lost keep-alive never brings the deadline close.
    pub fn renew_every(&self) -> Duration {
        self.loop_wait.min(self.ttl / 3).max(Duration::from_millis(500))
    }
}

/// State shared between the guardian, the HA loop and the REST snapshot.
pub struct LeaseShared {
    /// Send time of the last successful keep-alive or grant of the current lease.
    last_renewal: Mutex<Option<Instant>>,
    /// The HA loop believes it holds the leader key. Fencing applies only then.
    holds_lock: AtomicBool,
    /// The loop's promise of when it will report again; past it, renewals stop.
    loop_alive_until: Mutex<Instant>,
    /// Set when the guardian fenced PostgreSQL; the loop reads and clears it.
    fenced: AtomicBool,
    /// Maintenance mode: like Patroni, a paused primary keeps running even without the lock;
    /// no replica races while paused, so there is nobody to split the brain with.
    paused: AtomicBool,
    /// Send time of the last failsafe round every member accepted.
    failsafe_confirmed: Mutex<Option<Instant>>,
    /// The most recent failsafe round failed (the deadline above still stands: the members'
    /// promises outlive it, but the HA loop should demote now).
    failsafe_failed: AtomicBool,
    watchdog: OnceLock<Arc<super::watchdog::Watchdog>>,
    failsafe: OnceLock<Arc<super::failsafe::FailsafeProber>>,
    /// Wakes the HA loop after fencing.
    pub wake_loop: Notify,
}

impl LeaseShared {
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(LeaseShared {
            last_renewal: Mutex::new(None),
            holds_lock: AtomicBool::new(false),
            loop_alive_until: Mutex::new(now + Duration::from_secs(60)),
            fenced: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            failsafe_confirmed: Mutex::new(None),
            failsafe_failed: AtomicBool::new(false),
            watchdog: OnceLock::new(),
            failsafe: OnceLock::new(),
            wake_loop: Notify::new(),
        })
    }

    pub fn record_renewal(&self, sent_at: Instant) {
        let newer = self.last_renewal.get().is_none_or(|old| sent_at > old);
        if newer {
            self.last_renewal.set(Some(sent_at));
        }
    }

    /// The moment after which this node must not act as primary: `s + T - M`, where `s` is the
    /// send time of the last renewal or of the last accepted failsafe round.
    pub fn valid_until(&self, timing: &LeaseTiming) -> Option<Instant> {
        let s = match (self.last_renewal.get(), self.failsafe_confirmed.get()) {
            (Some(r), Some(f)) => Some(r.max(f)),
            (r, f) => r.or(f),
        };
        s.map(|s| s + timing.ttl.saturating_sub(timing.margin()))
    }

    /// The outcome of a failsafe round sent at `sent_at`: `accepted` when every member said
    /// 200.
    pub fn record_failsafe(&self, sent_at: Instant, accepted: bool) {
        self.failsafe_failed.store(!accepted, Ordering::SeqCst);
        if accepted && self.failsafe_confirmed.get().is_none_or(|old| sent_at > old) {
            self.failsafe_confirmed.set(Some(sent_at));
        }
    }

    /// Whether the latest failsafe round succeeded and still keeps this node leader at `now`.
    pub fn failsafe_confirmed(&self, timing: &LeaseTiming, now: Instant) -> bool {
        !self.failsafe_failed.load(Ordering::SeqCst)
            && self
                .failsafe_confirmed
                .get()
                .is_some_and(|f| now < f + timing.ttl.saturating_sub(timing.margin()))
    }

    pub fn set_watchdog(&self, watchdog: Arc<super::watchdog::Watchdog>) {
        let _ = self.watchdog.set(watchdog);
    }

    pub fn set_failsafe_prober(&self, prober: Arc<super::failsafe::FailsafeProber>) {
        let _ = self.failsafe.set(prober);
    }

    fn feed_watchdog(&self) {
        if let Some(w) = self.watchdog.get() {
            w.keepalive();
        }
    }

    /// The lease is known to outlive `now` by the fencing margin.
    pub fn is_valid(&self, timing: &LeaseTiming, now: Instant) -> bool {
        self.valid_until(timing).is_some_and(|until| now < until)
    }

    pub fn set_holds_lock(&self, holds: bool) {
        self.holds_lock.store(holds, Ordering::SeqCst);
    }

    pub fn holds_lock(&self) -> bool {
        self.holds_lock.load(Ordering::SeqCst)
    }

    /// Called by the HA loop before each cycle or long action: it promises to report again
    /// before `until`.
    pub fn loop_alive_until(&self, until: Instant) {
        self.loop_alive_until.set(until);
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub fn take_fenced(&self) -> bool {
        self.fenced.swap(false, Ordering::SeqCst)
    }
}

/// Refreshes the lease once and records the result; used by the guardian and, before taking
/// the lock, by the HA loop.
pub async fn refresh(dcs: &dyn Dcs, shared: &LeaseShared, timing: &LeaseTiming) -> bool {
    match tokio::time::timeout(timing.retry_timeout, dcs.refresh_lease(timing.ttl.as_secs())).await {
        Ok(Ok(info)) => {
            shared.record_renewal(info.sent_at);
            true
        }
        Ok(Err(e)) => {
            tracing::warn!("could not refresh the etcd lease: {e}");
            false
        }
        Err(_) => {
            tracing::warn!(
                "could not refresh the etcd lease within {:?}",
                timing.retry_timeout
            );
            false
        }
    }
}

/// Runs until cancelled.
pub async fn guardian(
    dcs: Arc<dyn Dcs>,
    postgres: Arc<Postgres>,
    shared: Arc<LeaseShared>,
    mut timing: watch::Receiver<LeaseTiming>,
    cancel: CancellationToken,
) {
    let mut next_renewal = Instant::now();
    loop {
        let t = *timing.borrow_and_update();
        let now = Instant::now();
        if now >= next_renewal {
            let loop_alive = now < shared.loop_alive_until.get();
            let ok = if loop_alive {
                refresh(dcs.as_ref(), &shared, &t).await
            } else {
                tracing::error!("the HA loop has not reported in time; not renewing the lease");
                false
            };
            if ok {
                shared.failsafe_confirmed.set(None);
                shared.failsafe_failed.store(false, Ordering::SeqCst);
                if shared.holds_lock() {
                    shared.feed_watchdog();
                }
            } else if loop_alive && shared.holds_lock() {
                failsafe_round(&shared, &t).await;
            }
            // After a failure retry every second until the deadline.
            next_renewal = Instant::now()
                + if ok {
                    t.renew_every()
                } else {
                    Duration::from_secs(1)
                };
        }
        let now = Instant::now();
        if shared.holds_lock() && !shared.paused.load(Ordering::SeqCst) && !shared.is_valid(&t, now) {
            fence(&postgres, &shared);
        }
        let mut wake_at = next_renewal;
        if shared.holds_lock()
            && let Some(deadline) = shared.valid_until(&t)
        {
            wake_at = wake_at.min(deadline.max(now));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = timing.changed() => next_renewal = Instant::now(),
            _ = tokio::time::sleep_until(wake_at.into()) => {}
        }
    }
}

/// After a failed renewal, in failsafe mode: confirm over REST, at most once per renewal period.
async fn failsafe_round(shared: &LeaseShared, t: &LeaseTiming) {
    let Some(prober) = shared.failsafe.get().filter(|p| p.enabled()) else {
        return;
    };
    let now = Instant::now();
    if shared
        .failsafe_confirmed
        .get()
        .is_some_and(|f| now.saturating_duration_since(f) < t.renew_every())
    {
        return;
    }
    let accepted = prober.confirm().await;
    shared.record_failsafe(now, accepted);
    if accepted {
        shared.feed_watchdog();
    }
}

fn fence(postgres: &Postgres, shared: &LeaseShared) {
    shared.set_holds_lock(false);
    match postgres.kill_immediately() {
        Ok(true) => {
            // PostgreSQL is gone: nothing left for a machine reset to stop.
            if let Some(w) = shared.watchdog.get() {
                w.disable();
            }
            tracing::error!("lease about to expire: stopped PostgreSQL immediately to stop accepting writes")
        }
        Ok(false) => tracing::warn!("lease about to expire; PostgreSQL was not running"),
        Err(e) => tracing::error!("lease about to expire and PostgreSQL could not be stopped: {e}"),
    }
    shared.fenced.store(true, Ordering::SeqCst);
    shared.wake_loop.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(ttl: u64) -> LeaseTiming {
        LeaseTiming {
            ttl: Duration::from_secs(ttl),
            loop_wait: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn deadline_is_send_time_plus_ttl_minus_margin() {
        let now = Instant::now();
        let shared = LeaseShared::new(now);
        let t = timing(30);
        assert!(!shared.is_valid(&t, now), "no renewal yet means no leadership");
        shared.record_renewal(now);
        assert_eq!(shared.valid_until(&t), Some(now + Duration::from_secs(27)));
        assert!(shared.is_valid(&t, now + Duration::from_secs(26)));
        assert!(!shared.is_valid(&t, now + Duration::from_secs(27)));
        // An older send time arriving late never moves the deadline back.
        shared.record_renewal(now - Duration::from_secs(5));
        assert_eq!(shared.valid_until(&t), Some(now + Duration::from_secs(27)));
    }

    #[test]
    fn failsafe_round_counts_like_a_renewal_and_a_failed_one_stops_the_loop() {
        let now = Instant::now();
        let shared = LeaseShared::new(now);
        let t = timing(30);
        shared.record_renewal(now);
        assert!(!shared.failsafe_confirmed(&t, now));
        let later = now + Duration::from_secs(20);
        shared.record_failsafe(later, true);
        assert_eq!(shared.valid_until(&t), Some(later + Duration::from_secs(27)));
        assert!(shared.failsafe_confirmed(&t, later + Duration::from_secs(26)));
        assert!(!shared.failsafe_confirmed(&t, later + Duration::from_secs(27)));
        // A failed round: the promises already given still hold the deadline, but the HA loop
        // must not count on failsafe any more.
        shared.record_failsafe(later + Duration::from_secs(5), false);
        assert_eq!(shared.valid_until(&t), Some(later + Duration::from_secs(27)));
        assert!(!shared.failsafe_confirmed(&t, later + Duration::from_secs(6)));
    }

    #[test]
    fn margin_and_renewal_period() {
        assert_eq!(timing(20).margin(), Duration::from_secs(2));
        assert_eq!(timing(60).margin(), Duration::from_secs(6));
        assert_eq!(timing(30).renew_every(), Duration::from_secs(10));
        assert_eq!(timing(20).renew_every(), Duration::from_secs(20) / 3);
    }
}
