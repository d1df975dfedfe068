//! The runtime around the pure engine: it gathers facts (etcd, PostgreSQL, peers), asks
//! [`pgvigil_engine::decide`], performs the actions with timeouts, and publishes the result.
//!
//! Shape of one cycle (neon's `timeline_manager` and Patroni's `run_cycle`):
//! 1. promise the lease guardian to report again soon, read the cluster (bounded by
//!    `retry_timeout`), apply a changed dynamic configuration;
//! 2. observe PostgreSQL (pid file, one monitoring query, `pg_controldata` when it is down);
//! 3. decide, querying peers if the engine asks, then perform the actions in order;
//! 4. publish the member key and the REST snapshot;
//! 5. sleep until `loop_wait` elapses or something happens: a leader/config change in etcd, the
//!    postmaster dying, the guardian fencing, an API command, a signal.

mod actions;
mod dynamic;
pub mod failsafe;
pub mod history;
pub mod lease;
mod observe;
mod operator;
mod pgconf;
mod sync;
pub mod watchdog;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgvigil_api::{ClusterView, PgState, Role};
use pgvigil_config::{Config, DynamicConfig};
use pgvigil_dcs::{Dcs, DcsEvent};
use pgvigil_engine::{Action, DataDir, Decision, EngineConfig, Inputs, LocalPg, Memory, PeerReport};
use pgvigil_postgres::{DataDirState, PgStatus, Postgres};
use pgvigil_rest::{ApiCommand, FailsafePost, FailsafeState, NodeSnapshot, PeerClient};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::lease::{LeaseShared, LeaseTiming};
use self::observe::Identity;

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
    lease: Arc<LeaseShared>,
    timing: watch::Sender<LeaseTiming>,
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
    /// Confirms our leadership over REST when etcd is unreachable (also used by the guardian).
    failsafe_prober: Arc<failsafe::FailsafeProber>,
    watchdog: Arc<watchdog::Watchdog>,
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        config_path: Option<PathBuf>,
        dcs: Arc<dyn Dcs>,
        pg: Arc<Postgres>,
        lease: Arc<LeaseShared>,
        timing: watch::Sender<LeaseTiming>,
        snapshot: watch::Sender<Arc<NodeSnapshot>>,
        dynamic: DynamicConfig,
    ) -> Self {
        let peers = PeerClient::for_config(&cfg);
        let watchdog = Arc::new(watchdog::Watchdog::new(cfg.watchdog.clone()));
        lease.set_watchdog(watchdog.clone());
        let me = FailsafePost {
            name: cfg.name.clone(),
            conn_url: format!(
                "postgres://{}/{}",
                cfg.postgresql.connect_address, cfg.postgresql.database
            ),
            api_url: cfg.restapi.api_url(),
            slots: Default::default(),
        };
        let failsafe_prober = Arc::new(failsafe::FailsafeProber::new(peers.clone(), me));
        lease.set_failsafe_prober(failsafe_prober.clone());
        Agent {
            failsafe: Arc::default(),
            failsafe_prober,
            watchdog,
            cfg,
            config_path,
            dynamic,
            dynamic_revision: 0,
            dcs,
            pg,
            lease,
            timing,
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

    fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            ttl: Duration::from_secs(self.dynamic.ttl),
            loop_wait: Duration::from_secs(self.dynamic.loop_wait),
            retry_timeout: Duration::from_secs(self.dynamic.retry_timeout),
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
        }
    }

    /// Runs cycles until shutdown or a fatal condition.
    pub async fn run(mut self, mut wake: Wakeups) -> Exit {
        loop {
            if wake.shutdown.is_cancelled() {
                return self.shutdown().await;
            }
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
            self.publish_snapshot();
            if rerun {
                continue;
            }
            self.lease
                .loop_alive_until(self.next_run + self.stall_allowance());
            let am_leader = self.lease.holds_lock();
            loop {
                tokio::select! {
                    _ = wake.shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until(self.next_run.into()) => {}
                    _ = self.lease.wake_loop.notified() => {}
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

    /// One cycle. `Ok(true)` asks for another cycle at once.
    async fn cycle(&mut self) -> Result<bool, String> {
        let now = Instant::now();
        self.lease.loop_alive_until(now + self.stall_allowance());
        if self.lease.take_fenced() {
            tracing::warn!("PostgreSQL was fenced by the lease guardian");
            self.state = PgState::Stopped;
            self.role = Role::Demoted;
        }
        let timing = self.lease_timing();
        let cluster = match tokio::time::timeout(timing.retry_timeout, self.dcs.get_cluster()).await {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                tracing::warn!("could not read the cluster from etcd: {e}");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "reading the cluster from etcd timed out after {:?}",
                    timing.retry_timeout
                );
                None
            }
        };
        if let Some(c) = &cluster {
            self.dcs_last_seen = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            self.apply_dynamic_config(c).await;
            self.lease.set_paused(c.is_paused());
        }
        let cluster = match cluster {
            Some(c) => Some(self.confirm_leadership(c).await),
            None => None,
        };
        self.cluster = cluster.clone();

        let mut pg = self.observe().await;
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
        let cluster = self.failsafe_step(cluster).await;
        let engine_cfg = self.engine_config();
        let timing = self.lease_timing();
        // Acting as leader requires a lease that provably outlives this cycle's first steps;
        // without it the engine sees what it would see with etcd gone.
        let view = cluster.as_ref().filter(|c| {
            c.leader_name() != Some(self.cfg.name.as_str()) || self.lease.is_valid(&timing, Instant::now())
        });
        let mut peers: Option<Vec<PeerReport>> = None;
        let decision = loop {
            let decision = pgvigil_engine::decide(&Inputs {
                now: Instant::now(),
                config: &engine_cfg,
                cluster: view,
                pg: &pg,
                memory: &self.memory,
                peers: peers.as_deref(),
                failover_due_in: operator::failover_due_in(view),
            });
            if decision.actions.first() == Some(&Action::QueryPeers) && peers.is_none() {
                peers = Some(self.query_peers(view).await);
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
        self.publish_member().await;
        Ok(rerun)
    }

    fn log_decision(&self, decision: &Decision) {
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let prefix = if paused { "PAUSE: " } else { "" };
        tracing::info!("{prefix}{}", decision.message);
    }

    /// Makes the lock ours for real when the view says we hold it: the key must carry our
    /// current lease (after an agent restart or a lease re-grant it may still carry the old
    /// one). Returns the view with the leader removed when the lock turned out not to be ours.
    async fn confirm_leadership(&mut self, mut cluster: ClusterView) -> ClusterView {
        let me = self.cfg.name.as_str();
        let Some(leader) = cluster.leader.as_ref().filter(|l| l.name == me) else {
            self.lease.set_holds_lock(false);
            return cluster;
        };
        let ours = self.dcs.current_lease().map(|l| l.id);
        if ours != Some(leader.lease) {
            let retry = Duration::from_secs(self.dynamic.retry_timeout);
            match tokio::time::timeout(retry, self.dcs.update_leader(Some(leader.lease))).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    tracing::warn!("the leader key is no longer ours");
                    cluster.leader = None;
                }
                Ok(Err(e)) => tracing::warn!("could not move the leader key to our lease: {e}"),
                Err(_) => tracing::warn!("moving the leader key to our lease timed out"),
            }
        }
        self.lease.set_holds_lock(cluster.leader.is_some());
        cluster
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

    async fn query_peers(&self, cluster: Option<&ClusterView>) -> Vec<PeerReport> {
        let Some(cluster) = cluster else { return Vec::new() };
        let timeout = Duration::from_secs(2);
        let calls = cluster
            .members
            .iter()
            .filter(|m| m.name != self.cfg.name && !m.data.api_url.is_empty())
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
        let api_url = self.cfg.restapi.api_url();
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
        let retry = Duration::from_secs(self.dynamic.retry_timeout);
        match tokio::time::timeout(retry, self.dcs.touch_member(&data)).await {
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
        let timing = self.lease_timing();
        let leader_until = if self.lease.holds_lock() {
            self.lease.valid_until(&timing)
        } else {
            None
        };
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
                self.written_parameters = None;
                tracing::info!("reloaded the local configuration");
                self.reload_parameters_if_changed().await;
            }
            Err(e) => tracing::error!("reload failed, keeping the previous configuration: {e}"),
        }
    }
}

/// Which DCS changes end the nap early (§1.6): the leader key, the config and a failover request
/// always; status and sync changes when we are not the leader.
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
