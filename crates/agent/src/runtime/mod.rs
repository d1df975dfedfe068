//! The HA loop: it composes the agent's parts — [`Leadership`] (the lock), the PostgreSQL
//! [`PgSupervisor`], the [`OperatorQueue`] — around the pure engine, and never blocks on a long
//! action.
//!
//! One cycle (neon's `timeline_manager` and Patroni's `run_cycle`):
//! 1. promise `Leadership` to report again soon; read the cluster (bounded by
//!    `retry_timeout`); adopt a changed dynamic configuration;
//! 2. the supervisor observes PostgreSQL (pid file, one monitoring query, `pg_controldata`
//!    when it is down);
//! 3. decide, with the lock as `Leadership` holds it and the operator's pending request,
//!    querying peers if the engine asks;
//! 4. hand the supervisor and the decision's actions to a task. While it runs the loop keeps
//!    reading etcd, publishing what it knows, answering the REST API and refusing conflicting
//!    requests; when the task returns the supervisor, a new cycle starts at once;
//! 5. sleep until `loop_wait` elapses or something happens: a leader/config change in etcd,
//!    the postmaster dying, the lock lost or the fence acting, a silent leader's promise
//!    running out, an API command, a signal.
//!
//! See `docs/architecture.md` for the parts and who owns what.

mod dynamic;
mod failsafe;
mod publish;
mod silence;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pgvigil_api::ClusterView;
use pgvigil_config::{Config, DynamicConfig};
use pgvigil_dcs::{Dcs, DcsEvent, LockKeyEvent};
use pgvigil_engine::{Action, Decision, EngineConfig, Inputs, PeerReport};
use pgvigil_rest::{ApiCommand, FailsafeState, NodeSnapshot, PeerClient};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::leadership::watchdog::Watchdog;
use crate::leadership::{Leadership, LockSettings};
use crate::operator::{Forward, OperatorQueue, failover_due_in};
use crate::supervisor::{Performed, PgSupervisor, Reported};

/// Why the agent stopped.
#[derive(Debug)]
pub enum Exit {
    /// SIGTERM/SIGINT: PostgreSQL stopped (unless paused), lock released.
    Shutdown,
    /// A condition the agent cannot fix (foreign data directory, failed bootstrap).
    Fatal(String),
}

/// Channels into the loop from the outside world.
pub struct Wakeups {
    pub dcs_events: broadcast::Receiver<DcsEvent>,
    /// Every write of the leader and heartbeat keys, for the liveness tracker.
    pub lock_keys: broadcast::Receiver<LockKeyEvent>,
    /// `Leadership` has news: the lock was lost, lapsed or proven, or the fence acted.
    pub lock_news: Arc<Notify>,
    pub commands: mpsc::Receiver<ApiCommand>,
    pub reload: mpsc::Receiver<()>,
    pub postmaster_changed: watch::Receiver<Option<i32>>,
    pub shutdown: CancellationToken,
}

/// A decision's actions being performed by the supervisor on a task.
struct Running {
    handle: JoinHandle<(PgSupervisor, Result<Performed, String>)>,
    /// What it does when that takes long (a restart, a clone, a switchover's stop), for the
    /// snapshot and for refusing conflicting requests; `None` for routine work.
    what: Option<String>,
}

/// The parts the loop is built from (see `wiring`).
pub struct Parts {
    pub cfg: Config,
    pub config_path: Option<PathBuf>,
    pub dynamic: DynamicConfig,
    pub dcs: Arc<dyn Dcs>,
    pub leadership: Arc<Leadership>,
    pub supervisor: PgSupervisor,
    pub operator: OperatorQueue,
    pub snapshot: watch::Sender<Arc<NodeSnapshot>>,
    pub peers: PeerClient,
    pub failsafe: Arc<FailsafeState>,
    pub watchdog: Arc<Watchdog>,
}

pub struct Agent {
    cfg: Arc<Config>,
    config_path: Option<PathBuf>,
    /// The dynamic configuration in force (the supervisor gets a copy when it is home).
    dynamic: DynamicConfig,
    /// `mod_revision` of the DCS `config` key last applied (0 = bootstrap.dcs or cache).
    dynamic_revision: i64,
    dcs: Arc<dyn Dcs>,
    leadership: Arc<Leadership>,
    /// Home between decisions; away on `running` while it performs one.
    supervisor: Option<PgSupervisor>,
    running: Option<Running>,
    /// A cycle came due (an event or its time) while the supervisor was away: decide as soon
    /// as it is back.
    deferred_cycle: bool,
    /// What the supervisor last reported (also while it is away).
    reported: Arc<Mutex<Reported>>,
    operator: OperatorQueue,
    snapshot: watch::Sender<Arc<NodeSnapshot>>,
    peers: PeerClient,
    /// Leaders' `POST /failsafe` calls, shared with the REST API.
    failsafe: Arc<FailsafeState>,
    watchdog: Arc<Watchdog>,
    cluster: Option<ClusterView>,
    dcs_last_seen: Option<u64>,
    /// When the loop wakes next: the next cycle, or earlier to look at a silent leader.
    next_run: Instant,
    /// When the next cycle is due (`loop_wait` after the last, or earlier when asked).
    cycle_due: Instant,
    /// A silent leader past its promise that a cycle has already looked at: no more early
    /// wake-ups for it (another member may be the one to take over).
    gone_seen: Option<((i64, i64), Instant)>,
    /// The decision asked to be made again this soon.
    recheck_in: Option<Duration>,
    /// The (leader, heartbeat) revisions whose silence already made us probe our etcd member.
    probed_silence: Option<(i64, i64)>,
}

impl Agent {
    pub fn new(parts: Parts) -> Agent {
        Agent {
            reported: parts.supervisor.reported(),
            cfg: Arc::new(parts.cfg),
            config_path: parts.config_path,
            dynamic: parts.dynamic,
            dynamic_revision: 0,
            dcs: parts.dcs,
            leadership: parts.leadership,
            supervisor: Some(parts.supervisor),
            running: None,
            deferred_cycle: false,
            operator: parts.operator,
            snapshot: parts.snapshot,
            peers: parts.peers,
            failsafe: parts.failsafe,
            watchdog: parts.watchdog,
            cluster: None,
            dcs_last_seen: None,
            next_run: Instant::now(),
            cycle_due: Instant::now(),
            gone_seen: None,
            recheck_in: None,
            probed_silence: None,
        }
    }

    /// How `Leadership` keeps the lock, from the dynamic configuration and what the view says
    /// about the members. The fast-takeover promise is made only while every member is a
    /// pgvigil agent (a Patroni member would not take over by it, and a Patroni leader never
    /// promises), no watchdog is armed (its timeout is far longer than the promise), and the
    /// fencer process runs (it keeps the promise if this agent freezes or dies).
    fn lock_settings(&self, view: Option<&ClusterView>) -> LockSettings {
        let ttl = Duration::from_secs(self.dynamic.ttl);
        let loop_wait = Duration::from_secs(self.dynamic.loop_wait);
        let fast = self.dynamic.liveness;
        let all_pgvigil = view.is_some_and(|v| {
            v.members
                .iter()
                .all(|m| m.name == self.cfg.name || m.data.is_pgvigil())
        });
        let promise =
            (fast.enabled && all_pgvigil && !self.watchdog.is_active() && self.leadership.has_fencer())
                .then_some(fast.fence_after);
        LockSettings {
            ttl,
            // At least three renewals per TTL, so one lost keep-alive never brings the lease's
            // deadline close.
            renew_every: loop_wait.min(ttl / 3).max(Duration::from_millis(500)),
            heartbeat_interval: fast.heartbeat_interval,
            promise,
            failsafe_mode: self.dynamic.failsafe_mode,
        }
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            name: self.cfg.name.clone(),
            tags: self.cfg.tags.to_published(),
            ttl: Duration::from_secs(self.dynamic.ttl),
            loop_wait: Duration::from_secs(self.dynamic.loop_wait),
            maximum_lag_on_failover: self.dynamic.maximum_lag_on_failover,
            primary_start_timeout: Duration::from_secs(self.dynamic.primary_start_timeout),
            check_timeline: self.dynamic.check_timeline,
            use_pg_rewind: self.cfg.use_pg_rewind(&self.dynamic),
            can_bootstrap: true,
            replica_methods: crate::supervisor::replica_methods(&self.cfg.postgresql, &self.dynamic),
            synchronous_mode: crate::supervisor::sync::engine_mode(self.dynamic.synchronous_mode),
            paused: self.dynamic.pause,
            failsafe_mode: self.dynamic.failsafe_mode,
            fast_takeover: self.dynamic.liveness.enabled,
            takeover_margin: self.dynamic.liveness.takeover_margin,
            slots: pgvigil_engine::slots::SlotsConfig::from_dynamic(
                self.dynamic.use_slots,
                self.dynamic.member_slots_ttl,
                &pgvigil_engine::slots::permanent_for_cluster(
                    &self.dynamic.permanent_slots,
                    self.dynamic.standby_cluster.is_some(),
                ),
                &self.dynamic.ignore_slots,
            ),
            standby_cluster: self
                .dynamic
                .standby_cluster
                .as_ref()
                .map(|sc| pgvigil_engine::StandbyCluster {
                    remote: sc.remote(),
                    replica_methods: sc.create_replica_methods.clone(),
                }),
        }
    }

    /// Runs cycles until shutdown or a fatal condition.
    pub async fn run(mut self, mut wake: Wakeups) -> Exit {
        loop {
            if wake.shutdown.is_cancelled() {
                return self.shutdown().await;
            }
            self.drain_lock_keys(&mut wake.lock_keys);
            let rerun = if self.running.is_some() {
                self.cycle_while_busy().await;
                false
            } else {
                match self.cycle().await {
                    Ok(rerun) => rerun,
                    Err(fatal) => {
                        tracing::error!("{fatal}");
                        return Exit::Fatal(fatal);
                    }
                }
            };
            self.schedule_next(rerun);
            self.publish_snapshot();
            if rerun {
                continue;
            }
            self.leadership.loop_alive_for(
                self.next_run.saturating_duration_since(Instant::now()) + self.stall_allowance(),
            );
            let am_leader = self.leadership.holds_lock();
            loop {
                tokio::select! {
                    _ = wake.shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until(self.next_run.into()) => {
                        if Instant::now() < self.cycle_due && !self.silence_needs_a_cycle() {
                            // An early wake-up for a silent leader that has been heard from
                            // since: no cycle, the nap goes on.
                            self.next_run = self.wake_at(Instant::now());
                            self.leadership.loop_alive_for(
                                self.next_run.saturating_duration_since(Instant::now())
                                    + self.stall_allowance(),
                            );
                            continue;
                        }
                    }
                    _ = wake.lock_news.notified() => {}
                    done = async { (&mut self.running.as_mut().expect("guarded").handle).await },
                        if self.running.is_some() =>
                    {
                        match self.task_done(done) {
                            Err(fatal) => {
                                tracing::error!("{fatal}");
                                return Exit::Fatal(fatal);
                            }
                            // Routine work done, nothing new: the nap goes on.
                            Ok(false) => continue,
                            Ok(true) => {}
                        }
                    }
                    key = wake.lock_keys.recv() => {
                        match key {
                            Ok(event) => self.leadership.observe_key(event),
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => {
                                tokio::time::sleep_until(self.next_run.into()).await;
                                break;
                            }
                        }
                        // A heartbeat is news for the tracker, not a reason to run a cycle;
                        // the timer above covers its promise running out.
                        continue;
                    }
                    Some(()) = wake.reload.recv() => self.reload_local_config(),
                    Some(cmd) = wake.commands.recv() => {
                        let started = self.reported().status.map(|s| s.postmaster_start_time);
                        match self.operator.command(cmd, started) {
                            Some(Forward::Reload) => self.reload_local_config(),
                            Some(Forward::Wake) | None => {}
                        }
                    }
                    _ = wake.postmaster_changed.changed() => {}
                    event = wake.dcs_events.recv() => {
                        // An uninteresting change (member keys move with every WAL position)
                        // does not end the nap, but must not hide the next interesting one
                        // (a released leader key, a switchover request) either.
                        if !wakes_us(&event, am_leader) {
                            if !matches!(event, Err(broadcast::error::RecvError::Closed)) {
                                continue;
                            }
                            tokio::time::sleep_until(self.next_run.into()).await;
                        }
                    }
                }
                break;
            }
            let now = Instant::now();
            self.cycle_due = self.cycle_due.min(now);
            self.next_run = self.next_run.min(now);
        }
    }

    /// When to run the next cycle: at once, at the decision's recheck, at a scheduled
    /// switchover, when a silent leader needs a look, else `loop_wait` after the last.
    fn schedule_next(&mut self, rerun: bool) {
        let loop_wait = Duration::from_secs(self.dynamic.loop_wait);
        let now = Instant::now();
        self.cycle_due = if rerun {
            now
        } else {
            (self.cycle_due + loop_wait).max(now)
        };
        if let Some(d) = self.recheck_in.take() {
            self.cycle_due = self.cycle_due.min(now + d);
        }
        // A scheduled switchover acts at its exact time, not at the next tick.
        if let Some(due) = failover_due_in(self.cluster.as_ref()).filter(|d| *d > 0.0 && d.is_finite()) {
            self.cycle_due = self.cycle_due.min(now + Duration::from_secs_f64(due));
        }
        self.next_run = self.wake_at(now);
    }

    /// The next cycle, or earlier when a silent leader needs a look.
    fn wake_at(&self, now: Instant) -> Instant {
        match self.silence_wake_in() {
            Some(d) => self.cycle_due.min(now + d),
            None => self.cycle_due,
        }
    }

    /// How long past its next promised report the loop may be before `Leadership` stops
    /// proving the lock: one DCS read and one set of bounded actions.
    fn stall_allowance(&self) -> Duration {
        Duration::from_secs(self.dynamic.retry_timeout * 2 + self.dynamic.loop_wait)
    }

    fn reported(&self) -> Reported {
        self.reported.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the cluster (bounded by `retry_timeout`) and adopts what it says about the lock's
    /// keys, the dynamic configuration and maintenance mode.
    async fn read_cluster(&mut self) -> Option<ClusterView> {
        let retry = Duration::from_secs(self.dynamic.retry_timeout);
        let cluster = match tokio::time::timeout(retry, self.dcs.get_cluster()).await {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                tracing::warn!("could not read the cluster from etcd: {e}");
                None
            }
            Err(_) => {
                tracing::warn!("reading the cluster from etcd timed out after {retry:?}");
                None
            }
        };
        if let Some(c) = &cluster {
            self.dcs_last_seen = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            self.leadership.observe_view(c);
            self.apply_dynamic_config(c).await;
            self.leadership.set_paused(c.is_paused());
        }
        self.cluster = cluster.clone();
        cluster
    }

    /// A cycle while the supervisor is away: keep the view fresh for the REST API, keep an eye
    /// on a silent leader, and answer requests that waited too long.
    async fn cycle_while_busy(&mut self) {
        self.deferred_cycle = true;
        self.leadership.loop_alive_for(self.stall_allowance());
        self.probe_etcd_if_leader_silent().await;
        self.read_cluster().await;
        let what = self
            .running
            .as_ref()
            .and_then(|r| r.what.clone())
            .unwrap_or_else(|| "the node is busy".into());
        self.operator.expire(&what);
    }

    /// One cycle with the supervisor home. `Ok(true)` asks for another cycle at once.
    async fn cycle(&mut self) -> Result<bool, String> {
        self.leadership.loop_alive_for(self.stall_allowance());
        self.probe_etcd_if_leader_silent().await;
        let cluster = self.read_cluster().await;
        let view = cluster.as_ref();
        let mut sup = self
            .supervisor
            .take()
            .expect("the supervisor is home between decisions");
        if !Arc::ptr_eq(&sup.cfg, &self.cfg) {
            sup.set_config(self.cfg.clone());
        }
        if sup.dynamic != self.dynamic {
            sup.set_dynamic(self.dynamic.clone());
        }
        sup.set_cluster(cluster.clone());
        let pg = sup.observe().await;
        let failsafe_leader = self.failsafe_step(view, &sup).await;
        sup.memory.failsafe_confirmed = self.dynamic.failsafe_mode && self.leadership.failsafe_holds();
        let engine_cfg = self.engine_config();
        let view_names_me = view.and_then(ClusterView::leader_name) == Some(self.cfg.name.as_str());
        // A required watchdog is armed whenever this node holds the lock; the engine keeps a
        // node whose watchdog cannot be armed from acting as primary. Not for a standby
        // cluster's leader, which accepts no writes (Patroni arms it only to promote).
        let watchdog_failed = self.leadership.holds_lock()
            && !view.is_some_and(ClusterView::is_paused)
            && self.dynamic.standby_cluster.is_none()
            && !sup.arm_watchdog();
        let config_pending = sup.config_pending();
        let started = sup.status().map(|s| s.postmaster_start_time.clone());
        let request = self.operator.request(started.as_deref());
        let silence = self.leadership.silence();
        if let Some(s) = &silence
            && s.leader_gone(self.dynamic.liveness.takeover_margin)
        {
            self.gone_seen = Some(((s.leader_revision, s.heartbeat_revision), Instant::now()));
        }
        let mut peers: Option<Vec<PeerReport>> = None;
        let decision = loop {
            let decision = pgvigil_engine::decide(&Inputs {
                now: Instant::now(),
                config: &engine_cfg,
                cluster: view,
                lock: self.leadership.lock_state(view_names_me),
                silence: silence.as_ref(),
                failsafe_leader: failsafe_leader.as_deref(),
                watchdog_failed,
                config_pending,
                request: request.as_ref(),
                pg: &pg,
                memory: &sup.memory,
                peers: peers.as_deref(),
                failover_due_in: failover_due_in(view),
            });
            if decision.actions.first() == Some(&Action::QueryPeers) && peers.is_none() {
                peers = Some(
                    self.query_peers(view, silence.as_ref().map(|s| s.leader.as_str()))
                        .await,
                );
                continue;
            }
            break decision;
        };
        self.log_decision(&decision);
        if let Some(state) = decision.report {
            sup.set_state(state);
        }
        self.operator.decided(&decision.actions);
        self.recheck_in = decision.recheck_in;
        if view.is_some() {
            self.leadership.configure(self.lock_settings(view));
        }
        let actions: Vec<Action> = decision
            .actions
            .into_iter()
            .filter(|a| !matches!(a, Action::AnswerRequest { .. } | Action::QueryPeers))
            .collect();
        if actions.is_empty() {
            sup.after_actions();
            sup.publish_member().await;
            self.supervisor = Some(sup);
            return Ok(false);
        }
        let what = describe(&actions);
        let handle = tokio::spawn(async move {
            let outcome = sup.perform(actions).await;
            (sup, outcome)
        });
        self.running = Some(Running { handle, what });
        Ok(false)
    }

    /// The supervisor is back from a decision: `Err` for a fatal outcome, else whether to
    /// decide again at once.
    fn task_done(
        &mut self,
        done: Result<(PgSupervisor, Result<Performed, String>), tokio::task::JoinError>,
    ) -> Result<bool, String> {
        self.running = None;
        let (sup, outcome) = done.map_err(|e| format!("the task performing a decision failed: {e}"))?;
        self.supervisor = Some(sup);
        let performed = outcome?;
        self.operator.finished(&match &performed.failure {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        });
        // At once when the lock was taken, PostgreSQL started or promoted, or a cycle was
        // deferred while the task ran (an event came, or its time); otherwise the next cycle
        // comes at its time or with the next event.
        let rerun = performed.rerun || std::mem::take(&mut self.deferred_cycle);
        if rerun {
            self.next_run = Instant::now();
        }
        Ok(rerun)
    }

    fn log_decision(&self, decision: &Decision) {
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let prefix = if paused { "PAUSE: " } else { "" };
        tracing::info!("{prefix}{}", decision.message);
    }

    /// Every other member's `GET api_url`, in parallel. A leader that promised the fast
    /// takeover and stayed silent past it (`silent`) is not asked: if it is alive it has
    /// stopped PostgreSQL already, and if its host is dead the question would cost the whole
    /// timeout of the takeover.
    async fn query_peers(&self, cluster: Option<&ClusterView>, silent: Option<&str>) -> Vec<PeerReport> {
        let Some(cluster) = cluster else { return Vec::new() };
        let timeout = Duration::from_secs(2);
        let calls = cluster
            .members
            .iter()
            .filter(|m| m.name != self.cfg.name && !m.data.api_url.is_empty())
            .filter(|m| Some(m.name.as_str()) != silent)
            .map(|m| async move {
                PeerReport {
                    name: m.name.clone(),
                    status: self.peers.fetch_status(&m.data.api_url, timeout).await,
                }
            });
        futures::future::join_all(calls).await
    }

    /// SIGHUP / `POST /reload`: re-read the local configuration file. PostgreSQL's files
    /// follow when the engine next allows it.
    fn reload_local_config(&mut self) {
        let env: std::collections::BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("PATRONI_"))
            .collect();
        match pgvigil_config::load(self.config_path.as_deref(), &env) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    tracing::warn!("{w}");
                }
                if loaded.config.name != self.cfg.name || loaded.config.scope != self.cfg.scope {
                    tracing::error!("reload ignored: name and scope cannot change while running");
                    return;
                }
                self.cfg = Arc::new(loaded.config);
                tracing::info!(
                    "reloaded the local configuration; PostgreSQL's follows when the next cycle allows"
                );
            }
            Err(e) => tracing::error!("reload failed, keeping the previous configuration: {e}"),
        }
    }

    /// SIGTERM: let a running task finish, then stop PostgreSQL (unless paused) and hand the
    /// lock over; the fences are disarmed last.
    async fn shutdown(mut self) -> Exit {
        if let Some(running) = self.running.take() {
            if let Some(what) = &running.what {
                tracing::info!("{what}: waiting for it to finish before shutting down");
            }
            // The loop still reports to `Leadership` meanwhile: the lock stays proven (and
            // the fence quiet) for as long as the task takes.
            let mut handle = running.handle;
            let done = loop {
                self.leadership.loop_alive_for(self.stall_allowance());
                tokio::select! {
                    done = &mut handle => break done,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            };
            if let Ok((sup, _)) = done {
                self.supervisor = Some(sup);
            }
        }
        if let Some(mut sup) = self.supervisor.take() {
            // Stopping PostgreSQL may take up to `pg_ctl_timeout`; the lock stays proven for
            // it, and is released right after.
            let stop = Duration::from_secs(self.cfg.postgresql.pg_ctl_timeout.max(1));
            self.leadership.loop_alive_for(stop + self.stall_allowance());
            sup.shutdown().await;
        }
        self.leadership.shutdown();
        Exit::Shutdown
    }
}

/// What a decision's long action is, for `busy` answers; `None` when every action is routine
/// (housekeeping, publishing, applying configuration), which must not turn requests away.
fn describe(actions: &[Action]) -> Option<String> {
    actions.iter().find_map(|a| {
        let what = match a {
            Action::Restart { .. } => "restart in progress",
            Action::Reinitialize { .. } => "reinitialize in progress",
            Action::CreateReplica { .. } => "creating a replica",
            Action::Bootstrap => "bootstrap in progress",
            Action::StopForSwitchover { .. } => "switchover in progress",
            Action::Rewind { .. } => "pg_rewind in progress",
            Action::Promote => "promotion in progress",
            Action::Start(_) => "postgres is starting",
            Action::Demote(_) => "postgres is stopping",
            Action::CopyLogicalSlots(_) => "copying logical slots from the primary",
            _ => return None,
        };
        Some(what.to_string())
    })
}

/// Which DCS changes end the nap early (`docs/patroni-compat.md` §1.6): the leader key, the config
/// and a failover request always; status and sync changes when we are not the leader.
fn wakes_us(event: &Result<DcsEvent, broadcast::error::RecvError>, am_leader: bool) -> bool {
    match event {
        Ok(
            DcsEvent::LeaderChanged
            | DcsEvent::ConfigChanged
            | DcsEvent::FailoverChanged
            | DcsEvent::WatchRestarted,
        ) => true,
        Ok(DcsEvent::StatusChanged | DcsEvent::SyncChanged) => !am_leader,
        // Member keys change whenever a WAL position moves; nothing to react to at once.
        Ok(DcsEvent::MembersChanged | DcsEvent::Other) => false,
        // Lagged: we missed events, so look now.
        Err(broadcast::error::RecvError::Lagged(_)) => true,
        Err(broadcast::error::RecvError::Closed) => false,
    }
}
