//! The driver of the leader lock: one OS thread with its own single-threaded tokio runtime and
//! its own etcd connection, so that no blocking call of the HA loop, the REST API or the
//! postmaster watcher can delay a keep-alive, a heartbeat or the deadline they move.
//!
//! Every etcd call here is one attempt; the send time is read before the call, so a deadline
//! is only ever computed from the attempt that was answered (or an earlier time). Heartbeats
//! are pipelined (one every H whatever the previous one is doing): a slow answer delays the
//! proof, not the next heartbeat.

use std::sync::Arc;
use std::time::Duration;

use pgvigil_dcs::{Etcd3Dcs, EtcdOptions, LockStore, TermOpening, Written};
use pgvigil_lock::{BootInstant, HeartbeatValue, TermStart};
use tokio::sync::{Notify, mpsc};

use super::{Request, Shared, lock};

/// Heartbeats in flight at most: beyond that etcd is not answering and more would only queue.
const MAX_HEARTBEATS_IN_FLIGHT: usize = 4;
/// Retry delay after a failed keep-alive or grant.
const RETRY: Duration = Duration::from_millis(500);
/// Failsafe rounds at most this often.
const FAILSAFE_EVERY: Duration = Duration::from_secs(1);
/// Without an accepted proof for this long, a leader in failsafe mode asks the members.
const FAILSAFE_AFTER: Duration = Duration::from_millis(1500);

pub(super) fn spawn(
    shared: Arc<Shared>,
    mut etcd: EtcdOptions,
    requests: mpsc::UnboundedReceiver<Request>,
    stop: Arc<Notify>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // One attempt must fail well within the fast-takeover promise, so the driver moves to
    // another etcd member and proves the lock again in time.
    etcd.attempt_timeout = Some(etcd.attempt_timeout.unwrap_or(Duration::from_secs(2)));
    std::thread::Builder::new()
        .name("pgvigil-leadership".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("leadership: cannot build its runtime: {e}");
                    return;
                }
            };
            runtime.block_on(async move {
                let store: Arc<dyn LockStore> = match Etcd3Dcs::connect(etcd).await {
                    Ok(dcs) => Arc::new(dcs),
                    Err(e) => {
                        tracing::error!("leadership: invalid etcd settings: {e}");
                        return;
                    }
                };
                Driver::new(shared, store).run(requests, stop).await;
            });
        })
}

/// Results of the calls the driver started, reported back to its loop.
enum Done {
    Grant {
        ttl: Duration,
        sent: BootInstant,
        result: Result<i64, String>,
    },
    KeepAlive {
        lease: i64,
        sent: BootInstant,
        result: Result<bool, String>,
    },
    Heartbeat {
        term: i64,
        sent: BootInstant,
        result: Result<Written, String>,
    },
    Open {
        how: TermOpening,
        lease: i64,
        promise: Option<Duration>,
        sent: BootInstant,
        result: Result<Written, String>,
        reply: Option<tokio::sync::oneshot::Sender<Result<bool, String>>>,
    },
    Release {
        sent: BootInstant,
        result: Result<bool, String>,
        reply: tokio::sync::oneshot::Sender<Result<bool, String>>,
    },
    ReadLeader {
        result: Result<Option<pgvigil_dcs::LeaderKey>, String>,
    },
    Failsafe {
        sent: BootInstant,
        accepted: bool,
    },
}

struct Driver {
    shared: Arc<Shared>,
    store: Arc<dyn LockStore>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    grant_in_flight: bool,
    next_grant: BootInstant,
    /// Per lease: when the next keep-alive is due, and whether one is in flight.
    keep_alive: Vec<(i64, BootInstant, bool)>,
    heartbeats_in_flight: usize,
    next_heartbeat: BootInstant,
    move_in_flight: bool,
    read_in_flight: bool,
    failsafe_in_flight: bool,
    last_failsafe: Option<BootInstant>,
    /// Send time of the last accepted proof of any kind (heartbeat, keep-alive).
    last_proof: Option<BootInstant>,
    /// Opens waiting for a lease.
    waiting: Vec<(TermOpening, tokio::sync::oneshot::Sender<Result<bool, String>>)>,
    loop_stalled_logged: bool,
}

impl Driver {
    fn new(shared: Arc<Shared>, store: Arc<dyn LockStore>) -> Driver {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let now = BootInstant::now();
        Driver {
            shared,
            store,
            done_tx,
            done_rx,
            grant_in_flight: false,
            next_grant: now,
            keep_alive: Vec::new(),
            heartbeats_in_flight: 0,
            next_heartbeat: now,
            move_in_flight: false,
            read_in_flight: false,
            failsafe_in_flight: false,
            last_failsafe: None,
            last_proof: None,
            waiting: Vec::new(),
            loop_stalled_logged: false,
        }
    }

    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>, stop: Arc<Notify>) {
        loop {
            let wake_at = self.step();
            let sleep = wake_at.saturating_duration_since(BootInstant::now());
            tokio::select! {
                _ = stop.notified() => return,
                Some(done) = self.done_rx.recv() => self.finish(done),
                Some(request) = requests.recv() => self.accept(request),
                _ = self.shared.wake_driver.notified() => {}
                // The runtime's timer runs on CLOCK_MONOTONIC; after a suspend it wakes late,
                // which only delays proofs: the deadline itself is on CLOCK_BOOTTIME, in the
                // fences.
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn settings(&self) -> super::LockSettings {
        *lock(&self.shared.settings)
    }

    /// Starts whatever is due; returns when to look again.
    fn step(&mut self) -> BootInstant {
        let now = BootInstant::now();
        let settings = self.settings();
        let mut wake = now + Duration::from_secs(1);
        let loop_alive = now < *lock(&self.shared.loop_alive_until);
        if !loop_alive && !self.loop_stalled_logged {
            tracing::error!("leadership: the HA loop has not reported in time; no longer proving the lock");
        }
        self.loop_stalled_logged = !loop_alive;

        // A lease with the configured TTL for new terms and the member key.
        let current = self.shared.core().current_lease().copied();
        if current.is_none_or(|l| l.ttl != settings.ttl) && !self.grant_in_flight {
            if now >= self.next_grant {
                self.start_grant(settings.ttl);
            } else {
                wake = wake.min(self.next_grant);
            }
        }
        if current.is_some() && !self.waiting.is_empty() {
            for (how, reply) in std::mem::take(&mut self.waiting) {
                self.start_open(how, Some(reply));
            }
        }

        // Keep-alives, while the loop reports.
        let keep = self.shared.core().leases_to_keep();
        self.keep_alive
            .retain(|(id, _, _)| keep.iter().any(|l| l.id == *id));
        for lease in keep {
            if !self.keep_alive.iter().any(|(id, _, _)| *id == lease.id) {
                self.keep_alive
                    .push((lease.id, now + settings.renew_every, false));
            }
        }
        if loop_alive {
            for i in 0..self.keep_alive.len() {
                let (id, due, in_flight) = self.keep_alive[i];
                if in_flight {
                    continue;
                }
                if now >= due {
                    self.keep_alive[i].2 = true;
                    self.start_keep_alive(id);
                } else {
                    wake = wake.min(due);
                }
            }
        }

        let term = self.shared.core().term().copied();
        if let Some(term) = term {
            // The term moves when its lease or promise is not what the settings ask for.
            let current = self.shared.core().current_lease().copied();
            if let Some(current) = current
                && (current.id != term.lease || term.promise != settings.promise)
                && !self.move_in_flight
                && self.shared.core().pending().is_none()
            {
                tracing::info!(
                    from_lease = term.lease,
                    to_lease = current.id,
                    promise_ms = settings.promise.map(|p| p.as_millis() as u64),
                    "leadership: moving the term to the configured lease and promise"
                );
                self.move_in_flight = true;
                self.start_open(
                    TermOpening::Move {
                        leader_revision: term.revision,
                    },
                    None,
                );
            }
            // Heartbeats, pipelined, while the loop reports.
            if loop_alive {
                if now >= self.next_heartbeat && self.heartbeats_in_flight < MAX_HEARTBEATS_IN_FLIGHT {
                    self.start_heartbeat(term.revision, term.lease, term.promise, settings);
                    self.next_heartbeat = now + settings.heartbeat_interval;
                }
                wake = wake.min(self.next_heartbeat);
            }
            // Failsafe: etcd has not accepted a proof for a while.
            if settings.failsafe_mode && loop_alive && !self.failsafe_in_flight {
                let stale = self
                    .last_proof
                    .is_none_or(|p| now.saturating_duration_since(p) >= FAILSAFE_AFTER);
                let due = self
                    .last_failsafe
                    .is_none_or(|f| now.saturating_duration_since(f) >= FAILSAFE_EVERY);
                if stale && due {
                    self.start_failsafe(now);
                }
                wake = wake.min(now + FAILSAFE_EVERY);
            }
        }
        if let Some(deadline) = self.shared.core().term_deadline()
            && deadline > now
        {
            // Tell the HA loop when the lock lapses.
            wake = wake.min(deadline);
        }
        self.notice_lapse(now);
        wake
    }

    /// Wakes the HA loop once when the term's deadline passes.
    fn notice_lapse(&mut self, now: BootInstant) {
        if self
            .shared
            .core()
            .term_deadline()
            .is_some_and(|d| d <= now && d + Duration::from_secs(1) > now)
        {
            self.shared.wake_loop.notify_one();
        }
    }

    /// Runs `call` on the driver's runtime and reports its result to the loop.
    fn spawn<F>(&self, call: F)
    where
        F: std::future::Future<Output = Done> + Send + 'static,
    {
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(call.await);
        });
    }

    fn start_grant(&mut self, ttl: Duration) {
        self.grant_in_flight = true;
        let store = self.store.clone();
        let sent = BootInstant::now();
        self.spawn(async move {
            let result = store.grant(ttl).await.map_err(|e| e.to_string());
            Done::Grant { ttl, sent, result }
        });
    }

    fn start_keep_alive(&self, lease: i64) {
        let store = self.store.clone();
        let sent = BootInstant::now();
        self.spawn(async move {
            let result = store.keep_alive(lease).await.map_err(|e| e.to_string());
            Done::KeepAlive { lease, sent, result }
        });
    }

    fn start_heartbeat(
        &mut self,
        term: i64,
        lease: i64,
        promise: Option<Duration>,
        settings: super::LockSettings,
    ) {
        self.heartbeats_in_flight += 1;
        let value = self.heartbeat_value(promise, settings);
        let store = self.store.clone();
        let sent = BootInstant::now();
        self.spawn(async move {
            let result = store
                .heartbeat(term, lease, value.as_deref())
                .await
                .map_err(|e| e.to_string());
            Done::Heartbeat { term, sent, result }
        });
    }

    /// The heartbeat key's value for a term promising `promise` (none without a promise).
    fn heartbeat_value(&self, promise: Option<Duration>, settings: super::LockSettings) -> Option<String> {
        promise.map(|p| HeartbeatValue::new(&self.shared.me, p, settings.heartbeat_interval).to_json())
    }

    fn start_open(
        &mut self,
        how: TermOpening,
        reply: Option<tokio::sync::oneshot::Sender<Result<bool, String>>>,
    ) {
        let Some(lease) = self.shared.core().current_lease().map(|l| l.id) else {
            match reply {
                Some(reply) => self.waiting.push((how, reply)),
                None => self.move_in_flight = false,
            }
            return;
        };
        let settings = self.settings();
        let promise = settings.promise;
        let value = self.heartbeat_value(promise, settings);
        let store = self.store.clone();
        let sent = BootInstant::now();
        self.spawn(async move {
            let result = store
                .open_term(how, lease, value.as_deref())
                .await
                .map_err(|e| e.to_string());
            Done::Open {
                how,
                lease,
                promise,
                sent,
                result,
                reply,
            }
        });
    }

    fn start_read(&mut self) {
        if self.read_in_flight {
            return;
        }
        self.read_in_flight = true;
        let store = self.store.clone();
        self.spawn(async move {
            let result = store.read_leader().await.map_err(|e| e.to_string());
            Done::ReadLeader { result }
        });
    }

    fn start_failsafe(&mut self, now: BootInstant) {
        self.failsafe_in_flight = true;
        self.last_failsafe = Some(now);
        let prober = self.shared.failsafe.clone();
        self.spawn(async move {
            let accepted = prober.confirm().await;
            Done::Failsafe { sent: now, accepted }
        });
    }

    fn accept(&mut self, request: Request) {
        match request {
            Request::Open { how, reply } => self.start_open(how, Some(reply)),
            Request::Release { reply } => {
                let Some(term) = self.shared.core().term().copied() else {
                    let _ = reply.send(Ok(false));
                    return;
                };
                let store = self.store.clone();
                let sent = BootInstant::now();
                self.spawn(async move {
                    let result = store.release(term.revision).await.map_err(|e| e.to_string());
                    Done::Release { sent, result, reply }
                });
            }
        }
    }

    fn proof(&mut self, sent: BootInstant) {
        self.last_proof = Some(self.last_proof.map_or(sent, |p| p.max(sent)));
        let mut core = self.shared.core();
        core.failsafe_over();
        let timeout = self.shared.watchdog.timeout();
        if let Some(timeout) = timeout
            && core.may_feed_watchdog(BootInstant::now(), timeout)
        {
            drop(core);
            self.shared.watchdog.keepalive();
        }
    }

    /// Applies a result to the lock state, then hands the new deadline to the fences.
    fn finish(&mut self, done: Done) {
        let now = BootInstant::now();
        let held_before = self.shared.core().lock_state(now, false).is_held();
        match done {
            Done::Grant { ttl, sent, result } => {
                self.grant_in_flight = false;
                match result {
                    Ok(id) => {
                        tracing::info!(lease = id, ttl = ttl.as_secs(), "leadership: granted a lease");
                        self.shared.core().lease_granted(id, ttl, sent);
                        let settings = self.settings();
                        self.keep_alive.push((id, sent + settings.renew_every, false));
                        self.shared.wake_loop.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!("leadership: could not get a lease: {e}");
                        self.next_grant = now + RETRY;
                        for (_, reply) in self.waiting.drain(..) {
                            let _ = reply.send(Err(format!("no etcd lease: {e}")));
                        }
                    }
                }
            }
            Done::KeepAlive { lease, sent, result } => {
                let settings = self.settings();
                let term_lease = self.shared.core().term().map(|t| t.lease);
                let next = match result {
                    Ok(true) => {
                        self.shared.core().keep_alive_ok(lease, sent);
                        if term_lease == Some(lease) {
                            self.proof(sent);
                        }
                        sent + settings.renew_every
                    }
                    Ok(false) => {
                        tracing::warn!(lease, "leadership: etcd says our lease does not exist any more");
                        self.shared.core().lease_gone(lease, now);
                        self.shared.wake_loop.notify_one();
                        now
                    }
                    Err(e) => {
                        tracing::warn!(lease, "leadership: keep-alive failed: {e}");
                        now + RETRY
                    }
                };
                if let Some(entry) = self.keep_alive.iter_mut().find(|(id, _, _)| *id == lease) {
                    *entry = (lease, next, false);
                }
            }
            Done::Heartbeat { term, sent, result } => {
                self.heartbeats_in_flight -= 1;
                match result {
                    Ok(Written::Applied(_)) => {
                        self.shared.core().heartbeat_ok(term, sent);
                        if self.shared.core().term().is_some_and(|t| t.revision == term) {
                            self.proof(sent);
                        }
                    }
                    Ok(Written::Refused) => {
                        let must_read = self.shared.core().heartbeat_refused(term, now);
                        if must_read {
                            self.start_read();
                        } else if self.shared.core().term().is_none() {
                            tracing::error!("leadership: the leader key changed under us; the lock is lost");
                            self.shared.wake_loop.notify_one();
                        }
                    }
                    Err(e) => tracing::debug!("leadership: heartbeat failed: {e}"),
                }
            }
            Done::Open {
                how,
                lease,
                promise,
                sent,
                result,
                reply,
            } => {
                let start = match how {
                    TermOpening::Acquire => TermStart::Acquired,
                    TermOpening::TakeOver { .. } => TermStart::TookOver,
                    TermOpening::Move { .. } => TermStart::Moved,
                };
                let replaces = match how {
                    TermOpening::Acquire => 0,
                    TermOpening::TakeOver { leader_revision, .. } | TermOpening::Move { leader_revision } => {
                        leader_revision
                    }
                };
                if reply.is_none() {
                    self.move_in_flight = false;
                }
                let answer = match result {
                    Ok(Written::Applied(revision)) => {
                        self.shared
                            .core()
                            .term_started(start, revision, lease, promise, sent);
                        self.last_proof = Some(sent);
                        self.next_heartbeat = now;
                        tracing::info!(
                            revision,
                            lease,
                            promise_ms = promise.map(|p| p.as_millis() as u64),
                            "leadership: {} the leader key",
                            match start {
                                TermStart::Acquired => "acquired",
                                TermStart::TookOver => "took over",
                                TermStart::Moved => "moved",
                            }
                        );
                        for old in self.shared.core().drop_unused_leases() {
                            let store = self.store.clone();
                            tokio::spawn(async move {
                                let _ = store.revoke(old).await;
                            });
                        }
                        self.shared.fence.retire_predecessors();
                        Ok(true)
                    }
                    Ok(Written::Refused) => {
                        self.shared.core().term_start_refused();
                        if start == TermStart::Moved && reply.is_none() {
                            // Our own term's key changed: find out whether we still hold it.
                            self.start_read();
                        }
                        Ok(false)
                    }
                    Err(e) => {
                        self.shared
                            .core()
                            .term_start_unknown(start, lease, promise, replaces, sent);
                        self.start_read();
                        Err(format!("the outcome is unknown: {e}"))
                    }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
            Done::Release { sent, result, reply } => {
                if matches!(result, Ok(true)) {
                    tracing::info!("leadership: released the leader key");
                    self.shared.core().released(sent);
                } else if let Ok(false) = result {
                    // The key was not ours any more: nothing of ours to release.
                    self.shared.core().released(sent);
                }
                let _ = reply.send(result);
            }
            Done::ReadLeader { result } => {
                self.read_in_flight = false;
                match result {
                    Ok(key) => {
                        let me = self.shared.me.clone();
                        let key = key.as_ref().map(|k| (k.value.as_str(), k.lease, k.mod_revision));
                        self.shared.core().leader_key_read(&me, key, now);
                    }
                    Err(e) => {
                        tracing::warn!("leadership: could not read the leader key: {e}");
                        // Try again shortly; until then the pending write stays pending.
                        let tx = self.done_tx.clone();
                        let store = self.store.clone();
                        self.read_in_flight = true;
                        tokio::spawn(async move {
                            tokio::time::sleep(RETRY).await;
                            let result = store.read_leader().await.map_err(|e| e.to_string());
                            let _ = tx.send(Done::ReadLeader { result });
                        });
                    }
                }
            }
            Done::Failsafe { sent, accepted } => {
                self.failsafe_in_flight = false;
                if accepted {
                    let ttl = self.settings().ttl;
                    self.shared.core().failsafe_confirmed(sent, ttl);
                    if let Some(timeout) = self.shared.watchdog.timeout()
                        && self.shared.core().may_feed_watchdog(now, timeout)
                    {
                        self.shared.watchdog.keepalive();
                    }
                }
                self.shared.wake_loop.notify_one();
            }
        }
        let held_after = self.shared.core().lock_state(now, false).is_held();
        if held_before != held_after {
            self.shared.wake_loop.notify_one();
        }
        self.shared.publish();
    }
}
