//! The runtime around the pure engine: it gathers facts (etcd, PostgreSQL, peers), asks
//! [`pgvigil_engine::decide`], performs the actions with timeouts, and publishes the result.
//!
//! Shape of one cycle (neon's `timeline_manager` and Patroni's `run_cycle`):
//! 1. promise [`Leadership`] to report again soon, read the cluster (bounded by
//!    `retry_timeout`), adopt a changed dynamic configuration;
//! 2. observe PostgreSQL (pid file, one monitoring query, `pg_controldata` when it is down);
//! 3. decide, with the lock as `Leadership` holds it, querying peers if the engine asks, then
//!    perform the actions in order;
//! 4. publish the member key and the REST snapshot, tell `Leadership` the settings;
//! 5. sleep until `loop_wait` elapses or something happens: a leader/config change in etcd, the
//!    postmaster dying, the lock lost or the fence acting, a silent leader's promise running
//!    out, an API command, a signal.

mod actions;
mod dynamic;
mod failsafe;
pub mod history;
mod observe;
mod operator;
mod pgconf;
mod sync;
pub mod sync_watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgvigil_api::{ClusterView, PgState, Role};
use pgvigil_config::{Config, DynamicConfig};
use pgvigil_dcs::{Dcs, DcsEvent, LockKeyEvent};
use pgvigil_engine::{Action, DataDir, Decision, EngineConfig, Inputs, LocalPg, Memory, PeerReport};
use pgvigil_postgres::{DataDirState, PgStatus, Postgres};
use pgvigil_rest::{ApiCommand, FailsafeState, NodeSnapshot, PeerClient};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::observe::Identity;
use crate::leadership::watchdog::Watchdog;
use crate::leadership::{Leadership, LockSettings};

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

pub struct Agent {
    cfg: Config,
    config_path: Option<PathBuf>,
    dynamic: DynamicConfig,
    /// `mod_revision` of the DCS `config` key last applied (0 = bootstrap.dcs or cache).
    dynamic_revision: i64,
    dcs: Arc<dyn Dcs>,
    pg: Arc<Postgres>,
    leadership: Leadership,
    snapshot: watch::Sender<Arc<NodeSnapshot>>,
    peers: PeerClient,
    memory: Memory,
    /// What we report as PostgreSQL's state between observations (e.g. `creating replica`).
    state: PgState,
    /// Our role when PostgreSQL cannot tell (stopped, uninitialized, demoted).
    role: Role,
    status: Option<PgStatus>,
    control: Option<pgvigil_engine::ControlInfo>,
    cluster: Option<ClusterView>,
    dcs_last_seen: Option<u64>,
    /// `host:port` our `primary_conninfo` points at, as last written.
    configured_upstream: Option<(String, u16)>,
    /// Parameters last written to `postgresql.conf`, to reload only on change.
    written_parameters: Option<std::collections::BTreeMap<String, String>>,
    /// The configuration files may differ from what we would write (a reload or a new dynamic
    /// configuration since the last write).
    config_dirty: bool,
    next_run: Instant,
    scheduled_restart: Option<operator::ScheduledRestart>,
    /// An operator asked for a reinitialize (`Some(from_leader)`), done next cycle.
    pending_reinit: Option<bool>,
    /// `{guc: {old_value, new_value}}` while a restart is pending.
    pending_restart_reason: Option<serde_json::Value>,
    /// `synchronous_standby_names` chosen by the sync manager; `None` leaves the user's value.
    sync_guc: Option<String>,
    /// Our flush position when `sync_guc` last changed.
    sync_guc_changed_at: u64,
    /// Leaders' `POST /failsafe` calls, shared with the REST API.
    failsafe: Arc<FailsafeState>,
    watchdog: Arc<Watchdog>,
    /// Synchronous standbys that stopped flushing (sampled by its own task on the leader).
    sync_watch: Arc<sync_watch::SyncWatch>,
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        config_path: Option<PathBuf>,
        dcs: Arc<dyn Dcs>,
        pg: Arc<Postgres>,
        leadership: Leadership,
        snapshot: watch::Sender<Arc<NodeSnapshot>>,
        dynamic: DynamicConfig,
        peers: PeerClient,
        sync_watch: Arc<sync_watch::SyncWatch>,
    ) -> Self {
        Agent {
            sync_watch,
            failsafe: Arc::default(),
            watchdog: leadership.watchdog().clone(),
            cfg,
            config_path,
            dynamic,
            dynamic_revision: 0,
            dcs,
            pg,
            leadership,
            snapshot,
            peers,
            memory: Memory::default(),
            state: PgState::Stopped,
            role: Role::Uninitialized,
            status: None,
            control: None,
            cluster: None,
            dcs_last_seen: None,
            configured_upstream: None,
            written_parameters: None,
            config_dirty: false,
            next_run: Instant::now(),
            scheduled_restart: None,
            pending_reinit: None,
            pending_restart_reason: None,
            sync_guc: None,
            sync_guc_changed_at: 0,
        }
    }

    /// Shares `POST /failsafe` calls with the REST API (see [`failsafe`]).
    pub fn with_failsafe(mut self, state: Arc<FailsafeState>) -> Self {
        self.failsafe = state;
        self
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
            use_pg_rewind: self
                .cfg
                .postgresql
                .use_pg_rewind
                .unwrap_or(self.dynamic.use_pg_rewind),
            can_bootstrap: true,
            synchronous_mode: sync::engine_mode(self.dynamic.synchronous_mode),
            paused: self.dynamic.pause,
            failsafe_mode: self.dynamic.failsafe_mode,
            fast_takeover: self.dynamic.liveness.enabled,
            takeover_margin: self.dynamic.liveness.takeover_margin,
        }
    }

    /// Runs cycles until shutdown or a fatal condition.
    pub async fn run(mut self, mut wake: Wakeups) -> Exit {
        loop {
            if wake.shutdown.is_cancelled() {
                return self.shutdown().await;
            }
            self.drain_lock_keys(&mut wake.lock_keys);
            let rerun = match self.cycle().await {
                Ok(rerun) => rerun,
                Err(fatal) => {
                    tracing::error!("{fatal}");
                    return Exit::Fatal(fatal);
                }
            };
            let loop_wait = Duration::from_secs(self.dynamic.loop_wait);
            let now = Instant::now();
            self.next_run = if rerun {
                now
            } else {
                (self.next_run + loop_wait).max(now)
            };
            // A scheduled switchover acts at its exact time, not at the next tick.
            if let Some(due) =
                operator::failover_due_in(self.cluster.as_ref()).filter(|d| *d > 0.0 && d.is_finite())
            {
                self.next_run = self.next_run.min(now + Duration::from_secs_f64(due));
            }
            // A silent leader's promise runs out: look again right then.
            let takeover_in = self
                .leadership
                .silence()
                .filter(|_| self.dynamic.liveness.enabled)
                .map(|s| s.gone_in(self.dynamic.liveness.takeover_margin));
            if let Some(d) = takeover_in {
                self.next_run = self.next_run.min(now + d);
            }
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
                    _ = tokio::time::sleep_until(self.next_run.into()) => {}
                    _ = wake.lock_news.notified() => {}
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
                    Some(()) = wake.reload.recv() => self.reload_local_config().await,
                    Some(cmd) = wake.commands.recv() => self.handle_command(cmd).await,
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
            self.next_run = self.next_run.min(Instant::now());
        }
    }

    /// How long past its next promised report the loop may be before the guardian stops
    /// renewing: one DCS read and one set of bounded actions.
    fn stall_allowance(&self) -> Duration {
        Duration::from_secs(self.dynamic.retry_timeout * 2 + self.dynamic.loop_wait)
    }

    /// Hands watch events of the leader and heartbeat keys to the liveness tracker.
    fn drain_lock_keys(&self, keys: &mut broadcast::Receiver<LockKeyEvent>) {
        loop {
            match keys.try_recv() {
                Ok(event) => self.leadership.observe_key(event),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    }

    /// One cycle. `Ok(true)` asks for another cycle at once.
    async fn cycle(&mut self) -> Result<bool, String> {
        self.leadership.loop_alive_for(self.stall_allowance());
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

        let mut pg = self.observe().await;
        // A primary found running (after an agent restart): its synchronous standbys are what
        // PostgreSQL waits for now, not the user's setting. Adopting them keeps the first
        // configuration change from loosening them.
        if self.dynamic.synchronous_mode.is_enabled()
            && self.sync_guc.is_none()
            && let Some(st) = self.status.as_ref().filter(|s| !s.in_recovery)
        {
            self.sync_guc = Some(st.synchronous_standby_names.clone());
        }
        if self.pending_reinit.is_some() {
            match self.run_pending_reinit(cluster.as_ref()).await {
                Ok(_) => pg = self.observe().await,
                Err(actions::Failed::Fatal(m) | actions::Failed::Recoverable(m)) => tracing::error!("{m}"),
            }
        }
        if self.scheduled_restart.is_some() && !cluster.as_ref().is_some_and(ClusterView::is_paused) {
            self.run_due_restart().await;
        }
        self.refresh_pending_restart_reason().await;
        let failsafe_leader = self.failsafe_step(cluster.as_ref()).await;
        let engine_cfg = self.engine_config();
        let view = cluster.as_ref();
        let view_names_me = view.and_then(ClusterView::leader_name) == Some(self.cfg.name.as_str());
        // A required watchdog is armed whenever this node holds the lock; the engine keeps a
        // node whose watchdog cannot be armed from acting as primary.
        let watchdog_failed =
            self.leadership.holds_lock() && !view.is_some_and(ClusterView::is_paused) && !self.arm_watchdog();
        let config_pending = self.config_pending();
        let silence = self.leadership.silence();
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
                pg: &pg,
                memory: &self.memory,
                peers: peers.as_deref(),
                failover_due_in: operator::failover_due_in(view),
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
        let mut rerun = false;
        for action in decision.actions {
            match self.execute(action, view).await {
                Ok(again) => rerun |= again,
                Err(actions::Failed::Fatal(message)) => return Err(message),
                Err(actions::Failed::Recoverable(message)) => {
                    tracing::error!("{message}");
                    rerun = false;
                    break;
                }
            }
        }
        self.watchdog_after_cycle();
        self.after_actions();
        // Watch the synchronous standbys while leading a primary in synchronous mode.
        let leading = self.leadership.holds_lock() && self.current_role() == Role::Primary;
        self.sync_watch.enable(
            (leading && self.dynamic.synchronous_mode.is_enabled())
                .then_some(self.dynamic.liveness.sync_standby_timeout),
        );
        if view.is_some() {
            self.leadership.configure(self.lock_settings(view));
        }
        self.publish_member().await;
        Ok(rerun)
    }

    /// Tells `Leadership` what runs now: the postmaster for the fence, and whether a primary is
    /// left for a past term's fence or an earlier agent's fencer to stop.
    fn after_actions(&mut self) {
        let pid = self.pg.postmaster_pid();
        self.leadership.set_postmaster(pid);
        let primary = pid.is_some() && self.status.as_ref().is_none_or(|s| !s.in_recovery);
        if !primary && !self.leadership.holds_lock() {
            self.leadership.primary_gone();
        }
    }

    /// End of every cycle: the watchdog stays armed only while this node holds the lock with a
    /// running primary outside maintenance mode.
    fn watchdog_after_cycle(&self) {
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let leading = self.leadership.holds_lock() && self.current_role() == Role::Primary;
        if !leading || paused {
            self.watchdog.disable();
        }
    }

    /// Arms (or re-arms) the watchdog for the current `ttl`; false when it is required and
    /// cannot be used.
    fn arm_watchdog(&self) -> bool {
        self.watchdog.activate(Duration::from_secs(self.dynamic.ttl))
    }

    fn log_decision(&self, decision: &Decision) {
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let prefix = if paused { "PAUSE: " } else { "" };
        tracing::info!("{prefix}{}", decision.message);
    }

    async fn observe(&mut self) -> LocalPg {
        let data = match self.pg.data_dir_state() {
            DataDirState::Empty => DataDir::Empty,
            DataDirState::Invalid(why) => DataDir::Invalid(why),
            DataDirState::Initialized => DataDir::Empty, // replaced below
        };
        let alive = self.pg.is_running();
        self.status = None;
        if alive && !matches!(data, DataDir::Invalid(_)) {
            match self
                .pg
                .query_state(Duration::from_secs(self.dynamic.retry_timeout.max(2) / 2))
                .await
            {
                Ok(st) => {
                    self.status = Some(st);
                    self.state = PgState::Running;
                }
                Err(e) => {
                    tracing::debug!("monitoring query failed: {e}");
                    if self.state == PgState::Running {
                        self.state = PgState::Starting;
                    }
                }
            }
        } else if self.state == PgState::Running || self.state == PgState::Starting {
            self.state = PgState::Crashed;
        }
        let data = if matches!(self.pg.data_dir_state(), DataDirState::Initialized) {
            if !alive || self.control.is_none() || self.status.is_none() {
                match self.pg.controldata().await {
                    Ok(cd) => self.control = Some(observe::control_info(&cd)),
                    Err(e) => {
                        return LocalPg {
                            data: DataDir::Invalid(format!("pg_controldata failed: {e}")),
                            postmaster_alive: alive,
                            observed: None,
                        };
                    }
                }
            }
            match &self.control {
                Some(c) => DataDir::Initialized(c.clone()),
                None => DataDir::Invalid("no control data".into()),
            }
        } else {
            self.control = None;
            data
        };
        if matches!(data, DataDir::Empty) {
            self.role = Role::Uninitialized;
        }
        let observed = self
            .status
            .as_ref()
            .map(|st| observe::observed(st, self.configured_upstream.as_ref()));
        LocalPg {
            data,
            postmaster_alive: alive,
            observed,
        }
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

    fn identity(&self) -> (String, String, serde_json::Map<String, serde_json::Value>) {
        let conn_url = format!(
            "postgres://{}/{}",
            self.cfg.postgresql.connect_address, self.cfg.postgresql.database
        );
        let api_url = format!("http://{}/patroni", self.cfg.restapi.connect_address);
        (conn_url, api_url, self.cfg.tags.to_published())
    }

    fn current_role(&self) -> Role {
        observe::role(self.status.as_ref(), self.role)
    }

    async fn publish_member(&mut self) {
        let (conn_url, api_url, tags) = self.identity();
        let id = Identity {
            scope: &self.cfg.scope,
            name: &self.cfg.name,
            conn_url: &conn_url,
            api_url: &api_url,
            tags: &tags,
        };
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let mut data =
            observe::member_data(&id, self.state, self.current_role(), self.status.as_ref(), paused);
        (data.scheduled_restart, data.pending_restart_reason) = self.operator_fields();
        let Some(lease) = self.leadership.member_lease() else {
            tracing::debug!("no etcd lease yet; the member key waits");
            return;
        };
        let retry = Duration::from_secs(self.dynamic.retry_timeout);
        match tokio::time::timeout(retry, self.dcs.touch_member(&data, lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("could not publish our member key: {e}"),
            Err(_) => tracing::warn!("publishing our member key timed out"),
        }
    }

    fn publish_snapshot(&self) {
        let (conn_url, api_url, tags) = self.identity();
        let id = Identity {
            scope: &self.cfg.scope,
            name: &self.cfg.name,
            conn_url: &conn_url,
            api_url: &api_url,
            tags: &tags,
        };
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let unlocked = self.cluster.as_ref().is_none_or(ClusterView::is_unlocked);
        let mut status = observe::status_document(
            &id,
            self.state,
            self.current_role(),
            self.status.as_ref(),
            paused,
            unlocked,
            self.dcs_last_seen,
        );
        let (scheduled, reason) = self.operator_fields();
        if let Some(mut scheduled) = scheduled {
            if let Some(m) = scheduled.as_object_mut() {
                m.remove("postmaster_start_time");
            }
            status.scheduled_restart = Some(scheduled);
        }
        status.pending_restart_reason = reason;
        if let Some(sync) = self.cluster.as_ref().and_then(|c| c.sync.as_ref())
            && sync.value.contains(&self.cfg.name)
        {
            if self.dynamic.synchronous_mode == pgvigil_config::SyncMode::Quorum {
                status.quorum_standby = Some(true);
            } else {
                status.sync_standby = Some(true);
            }
        }
        let leader_until = self.leadership.held_until();
        let mut snap = NodeSnapshot::initial(&self.cfg.scope, &self.cfg.name);
        snap.status = status;
        snap.cluster = self.cluster.clone();
        snap.leader_until = leader_until;
        snap.next_run = self.next_run;
        snap.ttl = self.dynamic.ttl;
        snap.loop_wait = self.dynamic.loop_wait;
        snap.maximum_lag_on_failover = self.dynamic.maximum_lag_on_failover;
        snap.paused = paused;
        snap.tags = tags;
        snap.failsafe_mode_enabled = self.dynamic.failsafe_mode;
        (snap.failsafe_active, snap.failsafe_members) = self.failsafe_snapshot();
        snap.status.failsafe_mode_is_active = snap.failsafe_active.then_some(true);
        snap.status.watchdog_failed = self.watchdog.failed().then_some(true);
        self.snapshot.send_replace(Arc::new(snap));
    }

    /// SIGHUP / `POST /reload`: re-read the local configuration file and apply it.
    async fn reload_local_config(&mut self) {
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
                self.cfg = loaded.config;
                self.config_dirty = true;
                tracing::info!(
                    "reloaded the local configuration; PostgreSQL's follows when the next cycle allows"
                );
            }
            Err(e) => tracing::error!("reload failed, keeping the previous configuration: {e}"),
        }
    }
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
