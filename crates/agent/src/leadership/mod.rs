//! `Leadership`: the one part of the agent that owns the leader lock.
//!
//! It holds the lock's state ([`pgvigil_lock::LockCore`]: which lease and which write carry the
//! key, the fencing deadline they prove), performs every write of the lock on its own etcd
//! connection from its own thread ([`driver`]), enforces the deadline with the fence thread
//! and the fencer process ([`fence`], [`fencer`]), feeds the watchdog, confirms itself over
//! failsafe when etcd is unreachable, and on a replica tracks how long a leader that promised
//! the fast takeover has been silent ([`pgvigil_lock::LivenessTracker`]).
//!
//! The HA loop talks to it through [`Leadership`]: it reads the lock state for the engine,
//! asks it to acquire, take over, adopt or release the key, tells it the settings (TTL,
//! promise) and the postmaster's pid, and promises to report again before a point in time:
//! a loop that stops reporting stops the proofs, so a hung agent loses the lock and its fence
//! stops PostgreSQL. Nothing here waits on SQL, REST (but the failsafe posts, on the driver's
//! own runtime) or the filesystem. The timing argument is in `pgvigil_lock::term`.

mod driver;
pub mod failsafe;
mod fence;
pub mod fencer;
mod kill;
mod sys;
pub mod watchdog;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pgvigil_api::ClusterView;
use pgvigil_dcs::{EtcdOptions, LockKeyEvent, TermOpening};
use pgvigil_lock::schedule::PRIMARY_SLACK;
use pgvigil_lock::{BootInstant, LivenessTracker, LockCore, LockState, Silence};
use tokio::sync::{Notify, mpsc, oneshot};

use self::failsafe::FailsafeProber;
use self::fence::{Fence, FenceOrder};
use self::watchdog::Watchdog;

pub use pgvigil_lock::LockSettings;

/// What the driver is asked to do by the HA loop.
enum Request {
    Open {
        how: TermOpening,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    Release {
        reply: oneshot::Sender<Result<bool, String>>,
    },
}

/// State shared by the HA loop, the driver thread and the fence. Every lock is held for a few
/// instructions, never across an await.
struct Shared {
    me: String,
    core: Mutex<LockCore>,
    tracker: Mutex<LivenessTracker>,
    settings: Mutex<LockSettings>,
    loop_alive_until: Mutex<BootInstant>,
    paused: AtomicBool,
    postmaster: Mutex<Option<i32>>,
    /// Wakes the HA loop: the lock was lost, lapsed or proven again, or the fence acted.
    wake_loop: Arc<Notify>,
    /// Wakes the driver: settings, a request, the loop's liveness.
    wake_driver: Notify,
    fence: Fence,
    watchdog: Arc<Watchdog>,
    failsafe: Arc<FailsafeProber>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, LockCore> {
        lock(&self.core)
    }

    /// Hands the current deadline and postmaster to the fences.
    fn publish(&self) {
        let order = FenceOrder {
            deadline: self.core().fence_deadline(),
            postmaster: *lock(&self.postmaster),
            paused: self.paused.load(Ordering::SeqCst),
        };
        self.fence.order(order);
    }
}

/// The REST API's health checks ask the lock itself, at the moment of each request.
impl pgvigil_rest::LockProof for Leadership {
    fn held_until(&self) -> Option<std::time::Instant> {
        Leadership::held_until(self)
    }
}

/// The handle the HA loop holds.
pub struct Leadership {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Request>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: Arc<Notify>,
}

impl Leadership {
    /// Starts the fence, the fencer process and the driver thread with its own etcd client
    /// (`etcd`, with a short attempt timeout).
    pub fn start(
        etcd: EtcdOptions,
        data_dir: &Path,
        watchdog: Arc<Watchdog>,
        failsafe: Arc<FailsafeProber>,
        settings: LockSettings,
        wake_loop: Arc<Notify>,
    ) -> anyhow::Result<Leadership> {
        let fenced_wake = wake_loop.clone();
        let fence = Fence::start(data_dir, true, move || fenced_wake.notify_one())?;
        let shared = Arc::new(Shared {
            me: etcd.member_name.clone(),
            core: Mutex::new(LockCore::new()),
            tracker: Mutex::new(LivenessTracker::new()),
            settings: Mutex::new(settings),
            loop_alive_until: Mutex::new(BootInstant::now() + Duration::from_secs(60)),
            paused: AtomicBool::new(false),
            postmaster: Mutex::new(None),
            wake_loop,
            wake_driver: Notify::new(),
            fence,
            watchdog,
            failsafe,
        });
        let (requests, receiver) = mpsc::unbounded_channel();
        let stop = Arc::new(Notify::new());
        let thread = driver::spawn(shared.clone(), etcd, receiver, stop.clone())?;
        Ok(Leadership {
            shared,
            requests,
            thread: Mutex::new(Some(thread)),
            stop,
        })
    }

    /// The lock for the engine; `view_names_me`: the last DCS read showed our name in the key.
    pub fn lock_state(&self, view_names_me: bool) -> LockState {
        self.shared.core().lock_state(BootInstant::now(), view_names_me)
    }

    pub fn holds_lock(&self) -> bool {
        self.lock_state(false).is_held()
    }

    /// Until when the lock is proven, as an `Instant` for the REST snapshot.
    pub fn held_until(&self) -> Option<std::time::Instant> {
        let deadline = self.shared.core().term_deadline()?;
        let now = BootInstant::now();
        (deadline > now).then(|| std::time::Instant::now() + deadline.saturating_duration_since(now))
    }

    /// The lease our member key goes on.
    pub fn member_lease(&self) -> Option<i64> {
        self.shared.core().current_lease().map(|l| l.id)
    }

    /// Whether PostgreSQL may be promoted or started as a primary now.
    pub fn permits_primary(&self) -> bool {
        self.shared
            .core()
            .permits_primary(BootInstant::now(), PRIMARY_SLACK)
    }

    /// Whether a failsafe round still keeps this node leader (etcd unreachable).
    pub fn failsafe_holds(&self) -> bool {
        self.shared.core().failsafe_holds(BootInstant::now())
    }

    /// Whether the fencer process runs: without it an agent that freezes cannot keep a promise.
    pub fn has_fencer(&self) -> bool {
        self.shared.fence.has_fencer_process()
    }

    pub fn configure(&self, settings: LockSettings) {
        let changed = {
            let mut current = lock(&self.shared.settings);
            let changed = *current != settings;
            *current = settings;
            changed
        };
        if changed {
            self.shared.wake_driver.notify_one();
        }
    }

    /// The HA loop promises to report again within `within`; past that the driver stops
    /// proving the lock.
    pub fn loop_alive_for(&self, within: Duration) {
        *lock(&self.shared.loop_alive_until) = BootInstant::now() + within;
        self.shared.wake_driver.notify_one();
    }

    /// The postmaster the fence stops (from the HA loop's watcher), `None` when none runs.
    pub fn set_postmaster(&self, pid: Option<i32>) {
        let changed = {
            let mut current = lock(&self.shared.postmaster);
            let changed = *current != pid;
            *current = pid;
            changed
        };
        if changed {
            self.shared.publish();
        }
    }

    pub fn set_paused(&self, paused: bool) {
        if self.shared.paused.swap(paused, Ordering::SeqCst) != paused {
            self.shared.publish();
        }
    }

    /// PostgreSQL was seen stopped or in recovery: whatever a past term left to fence is done,
    /// and so are the fencers of earlier agents.
    pub fn primary_gone(&self) {
        let had = self.shared.core().ended().is_some();
        if had {
            self.shared.core().primary_gone();
            self.shared.publish();
        }
        self.shared.fence.retire_predecessors();
    }

    /// A DCS read: the leader and heartbeat keys as of its revision.
    pub fn observe_view(&self, view: &ClusterView) {
        let leader = view.leader.as_ref().map(|l| (l.name.as_str(), l.mod_revision));
        let heartbeat = view
            .heartbeat
            .as_ref()
            .map(|h| (h.value.as_str(), h.mod_revision));
        lock(&self.shared.tracker).observe_read(leader, heartbeat, view.revision, BootInstant::now());
    }

    /// A watch event of the leader or heartbeat key.
    pub fn observe_key(&self, event: LockKeyEvent) {
        let now = BootInstant::now();
        let mut tracker = lock(&self.shared.tracker);
        match event {
            LockKeyEvent::Leader(state) => tracker.observe_leader(state, now),
            LockKeyEvent::Heartbeat(state) => tracker.observe_heartbeat(state, now),
        }
    }

    /// The silence of a leader that promised the fast takeover.
    pub fn silence(&self) -> Option<Silence> {
        lock(&self.shared.tracker).silence(BootInstant::now())
    }

    /// Opens a term (acquire, take over or adopt the key). `Ok(false)`: etcd refused (the key
    /// was not as expected). `Err`: the outcome is unknown or no lease could be had.
    pub async fn open(&self, how: TermOpening) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.request(Request::Open { how, reply }, answer).await
    }

    /// Deletes the key if our term still holds it. PostgreSQL must already be stopped or no
    /// longer a primary: the fence stops whatever is left at once.
    pub async fn release(&self) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.request(Request::Release { reply }, answer).await
    }

    async fn request(
        &self,
        request: Request,
        answer: oneshot::Receiver<Result<bool, String>>,
    ) -> Result<bool, String> {
        self.requests
            .send(request)
            .map_err(|_| "the leadership driver has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the leadership driver dropped the request".to_string())?
    }

    pub fn failsafe(&self) -> &Arc<FailsafeProber> {
        &self.shared.failsafe
    }

    /// Clean shutdown: the driver stops (the lease is left to expire unless released before),
    /// both fences are disarmed and the fencer process ends.
    pub fn shutdown(&self) {
        self.stop.notify_one();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        self.shared.fence.shutdown();
    }
}
