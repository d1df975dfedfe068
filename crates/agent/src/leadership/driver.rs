//! The driver of the leader lock: one OS thread with its own single-threaded tokio runtime and
//! its own etcd connection, so that no blocking call of the HA loop, the REST API or the
//! postmaster watcher can delay a keep-alive, a heartbeat or the deadline they move.
//!
//! What to send when, and what each answer means for the lock, is decided without I/O by
//! [`pgvigil_lock::Scheduler`] (the same code the deterministic simulation drives); this shell
//! performs its operations, one attempt each, on the etcd client and the failsafe prober,
//! reports their answers back, and turns its notices into log lines, replies to the HA loop,
//! wake-ups, watchdog feeds and fence orders.

use std::collections::BTreeMap;
use std::sync::Arc;

use pgvigil_dcs::{Etcd3Dcs, EtcdOptions, LockStore};
use pgvigil_lock::schedule::ATTEMPT_TIMEOUT;
use pgvigil_lock::{BootInstant, Notice, Op, OpId, OpResult, RequestId, Scheduler, Step, TermStart};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{LockSettings, Request, Shared, lock};

pub(super) fn spawn(
    shared: Arc<Shared>,
    mut etcd: EtcdOptions,
    requests: mpsc::UnboundedReceiver<Request>,
    stop: Arc<Notify>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // One attempt must fail well within the fast-takeover promise, so the driver moves to
    // another etcd member and proves the lock again in time; the scheduler sizes its
    // heartbeat pipeline by the same timeout.
    etcd.attempt_timeout = Some(ATTEMPT_TIMEOUT);
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

struct Driver {
    shared: Arc<Shared>,
    store: Arc<dyn LockStore>,
    schedule: Scheduler,
    done_tx: mpsc::UnboundedSender<(OpId, OpResult)>,
    done_rx: mpsc::UnboundedReceiver<(OpId, OpResult)>,
    /// The HA loop's requests waiting for their answer.
    replies: BTreeMap<RequestId, oneshot::Sender<Result<bool, String>>>,
}

impl Driver {
    fn new(shared: Arc<Shared>, store: Arc<dyn LockStore>) -> Driver {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let schedule = Scheduler::new(&shared.me, BootInstant::now());
        Driver {
            shared,
            store,
            schedule,
            done_tx,
            done_rx,
            replies: BTreeMap::new(),
        }
    }

    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>, stop: Arc<Notify>) {
        loop {
            let wake_at = self.poll();
            let sleep = wake_at.saturating_duration_since(BootInstant::now());
            tokio::select! {
                _ = stop.notified() => return,
                Some((id, result)) = self.done_rx.recv() => self.finish(id, result),
                Some(request) = requests.recv() => self.accept(request),
                _ = self.shared.wake_driver.notified() => {}
                // The runtime's timer runs on CLOCK_MONOTONIC; after a suspend it wakes late,
                // which only delays proofs: the deadline itself is on CLOCK_BOOTTIME, in the
                // fences.
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn settings(&self) -> LockSettings {
        *lock(&self.shared.settings)
    }

    /// Starts whatever is due; returns when to look again.
    fn poll(&mut self) -> BootInstant {
        let now = BootInstant::now();
        let settings = self.settings();
        let loop_alive = now < *lock(&self.shared.loop_alive_until);
        let step = {
            let mut core = self.shared.core();
            self.schedule.poll(&mut core, now, &settings, loop_alive)
        };
        self.perform(step);
        self.schedule.next_wakeup()
    }

    fn accept(&mut self, request: Request) {
        let (id, reply) = match request {
            Request::Open { how, reply } => (self.schedule.open(how), reply),
            Request::Release { reply } => (self.schedule.release(), reply),
        };
        self.replies.insert(id, reply);
    }

    /// Applies an answer to the lock state, then hands the new deadline to the fences.
    fn finish(&mut self, id: OpId, result: OpResult) {
        let now = BootInstant::now();
        let settings = self.settings();
        let step = {
            let mut core = self.shared.core();
            self.schedule.on_result(&mut core, id, result, now, &settings)
        };
        self.perform(step);
        self.shared.publish();
    }

    fn perform(&mut self, step: Step) {
        for (id, op) in step.ops {
            self.start(id, op);
        }
        for notice in step.notices {
            self.notice(notice);
        }
    }

    /// Runs one operation on the driver's runtime and reports its answer to the loop.
    fn start(&self, id: OpId, op: Op) {
        let store = self.store.clone();
        let prober = self.shared.failsafe.clone();
        let tx = self.done_tx.clone();
        let text = |e: pgvigil_dcs::DcsError| e.to_string();
        tokio::spawn(async move {
            let result = match op {
                Op::Grant { ttl } => OpResult::Grant(store.grant(ttl).await.map_err(text)),
                Op::KeepAlive { lease } => OpResult::KeepAlive(store.keep_alive(lease).await.map_err(text)),
                Op::Heartbeat { term, lease, value } => {
                    OpResult::Written(store.heartbeat(term, lease, value.as_deref()).await.map_err(text))
                }
                Op::Open {
                    how,
                    lease,
                    heartbeat,
                } => OpResult::Written(
                    store
                        .open_term(how, lease, heartbeat.as_deref())
                        .await
                        .map_err(text),
                ),
                Op::Release { term } => OpResult::Released(store.release(term).await.map_err(text)),
                Op::ReadLeader => OpResult::Read(store.read_leader().await.map_err(text)),
                Op::Revoke { lease } => {
                    let _ = store.revoke(lease).await;
                    OpResult::Revoked
                }
                Op::Failsafe => OpResult::Failsafe(prober.confirm().await),
            };
            let _ = tx.send((id, result));
        });
    }

    fn notice(&mut self, notice: Notice) {
        match notice {
            Notice::Reply { request, answer } => {
                if let Some(reply) = self.replies.remove(&request) {
                    let _ = reply.send(answer);
                }
            }
            Notice::WakeLoop => self.shared.wake_loop.notify_one(),
            Notice::Proved => {
                if let Some(timeout) = self.shared.watchdog.timeout()
                    && self.shared.core().may_feed_watchdog(BootInstant::now(), timeout)
                {
                    self.shared.watchdog.keepalive();
                }
            }
            Notice::TermOpened {
                how,
                revision,
                lease,
                promise,
            } => {
                tracing::info!(
                    revision,
                    lease,
                    promise_ms = promise.map(|p| p.as_millis() as u64),
                    "leadership: {} the leader key",
                    match how {
                        TermStart::Acquired => "acquired",
                        TermStart::TookOver => "took over",
                        TermStart::Moved => "moved",
                    }
                );
                self.shared.fence.retire_predecessors();
            }
            Notice::Moving {
                from_lease,
                to_lease,
                promise,
            } => tracing::info!(
                from_lease,
                to_lease,
                promise_ms = promise.map(|p| p.as_millis() as u64),
                "leadership: moving the term to the configured lease and promise"
            ),
            Notice::LeaseGranted { lease, ttl } => {
                tracing::info!(lease, ttl = ttl.as_secs(), "leadership: granted a lease")
            }
            Notice::GrantFailed(e) => tracing::warn!("leadership: could not get a lease: {e}"),
            Notice::LeaseGone { lease } => {
                tracing::warn!(lease, "leadership: etcd says our lease does not exist any more")
            }
            Notice::KeepAliveFailed { lease, error } => {
                tracing::warn!(lease, "leadership: keep-alive failed: {error}")
            }
            Notice::HeartbeatFailed(e) => tracing::debug!("leadership: heartbeat failed: {e}"),
            Notice::LockLost => {
                tracing::error!("leadership: the leader key changed under us; the lock is lost")
            }
            Notice::Released => tracing::info!("leadership: released the leader key"),
            Notice::ReadFailed(e) => tracing::warn!("leadership: could not read the leader key: {e}"),
            Notice::LoopStalled => tracing::error!(
                "leadership: the HA loop has not reported in time; no longer proving the lock"
            ),
        }
    }
}
