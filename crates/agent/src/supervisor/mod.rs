//! The PostgreSQL supervisor: the one part of the agent that touches PostgreSQL.
//!
//! It knows what runs — the process, its role and state, the parameters last written, the
//! upstream it follows, the synchronous standbys it waits for — and performs the engine's
//! actions ([`actions`], [`operations`]). The HA loop (`runtime`) lends it to a task for each
//! decision's actions and gets it back with the outcome, so the loop keeps reacting to etcd,
//! the lock and operators while PostgreSQL starts, stops, clones or restarts. What the loop
//! publishes meanwhile comes from [`Reported`], which the supervisor keeps current.

mod actions;
mod bootstrap;
pub mod callbacks;
mod clone;
mod config;
mod custom_bootstrap;
pub mod history;
mod lock_actions;
mod logical_slots;
pub mod observe;
mod operations;
mod pgconf;
mod standby;
pub mod sync;
pub mod sync_watch;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgvigil_api::{ClusterView, PgState, Role};
use pgvigil_config::{Config, DynamicConfig};
use pgvigil_dcs::Dcs;
use pgvigil_engine::{Action, DataDir, LocalPg, Memory};
use pgvigil_postgres::{DataDirState, PgStatus, Postgres};
use pgvigil_rest::FailsafeState;
use serde_json::Value;

pub use self::actions::Failed;
pub use self::clone::replica_methods;
pub use self::observe::Identity;
use crate::leadership::Leadership;
use crate::leadership::watchdog::Watchdog;
pub use crate::supervisor::sync_watch::SyncWatch;

/// What the HA loop publishes about PostgreSQL, kept current by the supervisor (also while it
/// is away on a task).
#[derive(Clone, Debug)]
pub struct Reported {
    pub state: PgState,
    pub role: Role,
    pub status: Option<PgStatus>,
    pub pending_restart_reason: Option<Value>,
}

impl Default for Reported {
    fn default() -> Self {
        Reported {
            state: PgState::Stopped,
            role: Role::Uninitialized,
            status: None,
            pending_restart_reason: None,
        }
    }
}

/// How a decision's actions went (a fatal failure is the `Err` of [`PgSupervisor::perform`]).
#[derive(Clone, Debug, Default)]
pub struct Performed {
    /// Something changed that the engine should look at at once (the lock taken, PostgreSQL
    /// started or promoted).
    pub rerun: bool,
    /// An action failed and the rest were skipped; the next cycle decides again.
    pub failure: Option<String>,
}

/// The parts of the agent the supervisor works with.
pub struct Context {
    pub dcs: Arc<dyn Dcs>,
    pub leadership: Arc<Leadership>,
    pub failsafe: Arc<FailsafeState>,
    pub watchdog: Arc<Watchdog>,
    pub sync_watch: Arc<SyncWatch>,
    /// The `scheduled_restart` object of the member key, kept by the loop's operator queue.
    pub scheduled_restart: Arc<Mutex<Option<Value>>>,
}

pub struct PgSupervisor {
    pub(crate) cfg: Arc<Config>,
    pub(crate) dynamic: DynamicConfig,
    dcs: Arc<dyn Dcs>,
    pg: Arc<Postgres>,
    leadership: Arc<Leadership>,
    failsafe: Arc<FailsafeState>,
    watchdog: Arc<Watchdog>,
    sync_watch: Arc<SyncWatch>,
    /// Facts the engine needs across cycles (restart timers, failures, a switchover stop).
    pub(crate) memory: Memory,
    /// What we report as PostgreSQL's state between observations (e.g. `creating replica`).
    state: PgState,
    /// Our role when PostgreSQL cannot tell (stopped, uninitialized, demoted).
    role: Role,
    status: Option<PgStatus>,
    control: Option<pgvigil_engine::ControlInfo>,
    /// The cluster as read for the decision being performed.
    cluster: Option<ClusterView>,
    /// `host:port` our `primary_conninfo` points at, as last written.
    configured_upstream: Option<(String, u16)>,
    /// The recovery settings point at a standby cluster's remote primary (`docs/patroni-compat.md` §4.11), not at a
    /// member: a reload or restart keeps them so.
    follows_remote: bool,
    /// Parameters last written to `postgresql.conf`, to reload only on change.
    written_parameters: Option<std::collections::BTreeMap<String, String>>,
    /// The configuration files may differ from what we would write (a reload or a new dynamic
    /// configuration since the last write).
    config_dirty: bool,
    /// `synchronous_standby_names` chosen by the sync manager; `None` leaves the user's value.
    standby_names: Option<String>,
    /// Our flush position (an LSN) when `standby_names` last changed: a newly listed standby
    /// counts as synchronous once it confirmed this far.
    standby_names_changed_at_lsn: u64,
    /// `{guc: {old_value, new_value}}` while a restart is pending.
    pending_restart_reason: Option<Value>,
    reported: Arc<Mutex<Reported>>,
    scheduled_restart: Arc<Mutex<Option<Value>>>,
    /// Runs the configured callbacks in the background (`callbacks.rs`).
    callbacks: callbacks::CallbackExecutor,
    /// A start, stop, restart or role-change callback was handed over since the agent started.
    cb_called: bool,
    /// `hot_standby_feedback` must be on: this node keeps (or feeds a member that keeps) copies
    /// of permanent logical slots (§3.9, §5.8).
    hot_standby_feedback: bool,
    /// Copies of logical slots not yet known to be safe after a failover.
    readiness: logical_slots::Readiness,
}

impl PgSupervisor {
    pub fn new(cfg: Arc<Config>, dynamic: DynamicConfig, pg: Arc<Postgres>, ctx: Context) -> PgSupervisor {
        PgSupervisor {
            cfg,
            dynamic,
            dcs: ctx.dcs,
            pg,
            leadership: ctx.leadership,
            failsafe: ctx.failsafe,
            watchdog: ctx.watchdog,
            sync_watch: ctx.sync_watch,
            memory: Memory::default(),
            state: PgState::Stopped,
            role: Role::Uninitialized,
            status: None,
            control: None,
            cluster: None,
            configured_upstream: None,
            follows_remote: false,
            written_parameters: None,
            config_dirty: false,
            standby_names: None,
            standby_names_changed_at_lsn: 0,
            pending_restart_reason: None,
            reported: Arc::default(),
            scheduled_restart: ctx.scheduled_restart,
            callbacks: callbacks::CallbackExecutor::start(),
            cb_called: false,
            hot_standby_feedback: false,
            readiness: Default::default(),
        }
    }

    /// What the loop publishes, shared with it.
    pub fn reported(&self) -> Arc<Mutex<Reported>> {
        self.reported.clone()
    }

    /// Copies what is published into [`Reported`].
    fn report(&self) {
        let mut r = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        *r = Reported {
            state: self.state,
            role: self.current_role(),
            status: self.status.clone(),
            pending_restart_reason: self.pending_restart_reason.clone(),
        };
    }

    /// A new local configuration (reload): written into PostgreSQL's files when the engine
    /// next allows it.
    pub fn set_config(&mut self, cfg: Arc<Config>) {
        self.cfg = cfg;
        self.config_dirty = true;
    }

    /// A new dynamic configuration.
    pub fn set_dynamic(&mut self, dynamic: DynamicConfig) {
        self.dynamic = dynamic;
        self.config_dirty = true;
        self.refresh_hot_standby_feedback();
    }

    pub fn set_cluster(&mut self, cluster: Option<ClusterView>) {
        self.cluster = cluster;
        self.refresh_hot_standby_feedback();
    }

    /// The state the engine says to report (e.g. `stopped` for a PostgreSQL found down in
    /// maintenance mode); published with the member key after the decision.
    pub fn set_state(&mut self, state: PgState) {
        self.state = state;
        self.report();
    }

    pub fn status(&self) -> Option<&PgStatus> {
        self.status.as_ref()
    }

    pub fn current_role(&self) -> Role {
        let role = observe::role(self.status.as_ref(), self.role);
        // A standby cluster's lock holder in recovery is its standby leader (§4.11): published
        // so, `patronictl list` shows `Standby Leader`, and the replicas follow it.
        if role == Role::Replica && self.dynamic.standby_cluster.is_some() && self.leadership.holds_lock() {
            return Role::StandbyLeader;
        }
        role
    }

    /// Observes PostgreSQL: pid file, one monitoring query, `pg_controldata` when it is down.
    pub async fn observe(&mut self) -> LocalPg {
        let local = self.observe_inner().await;
        // A primary found running (after an agent restart): its synchronous standbys are what
        // PostgreSQL waits for now, not the user's setting. Adopting them keeps the first
        // configuration change from loosening them.
        if self.dynamic.synchronous_mode.is_enabled()
            && self.standby_names.is_none()
            && let Some(st) = self.status.as_ref().filter(|s| !s.in_recovery)
        {
            self.standby_names = Some(st.synchronous_standby_names.clone());
        }
        self.refresh_pending_restart_reason().await;
        self.callback_for_running();
        self.report();
        local
    }

    async fn observe_inner(&mut self) -> LocalPg {
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
                    Ok(cd) => self.control = Some(observe::control_info(&cd, self.has_backup_label())),
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

    /// Performs a decision's actions in order; stops at the first failure. `Ok(true)`: decide
    /// again at once. Then tells `Leadership` what runs and keeps the watchdog and the sync
    /// watch in step with the role, and publishes the member key.
    pub async fn perform(&mut self, actions: Vec<Action>) -> Result<Performed, String> {
        let view = self.cluster.clone();
        let mut done = Performed::default();
        for action in actions {
            match self.execute(action, view.as_ref()).await {
                Ok(again) => done.rerun |= again,
                Err(Failed::Fatal(message)) => {
                    self.report();
                    return Err(message);
                }
                Err(Failed::Recoverable(message)) => {
                    tracing::error!("{message}");
                    done = Performed {
                        rerun: false,
                        failure: Some(message),
                    };
                    break;
                }
            }
        }
        self.after_actions();
        self.publish_member().await;
        Ok(done)
    }

    /// Tells `Leadership` what runs now: the postmaster for the fence, and whether a primary is
    /// left for a past term's fence or an earlier agent's fencer to stop. Disarms the watchdog
    /// unless this node leads a running primary outside maintenance mode; watches the
    /// synchronous standbys while it leads in synchronous mode.
    pub fn after_actions(&mut self) {
        let pid = self.pg.postmaster_pid();
        self.leadership.set_postmaster(pid);
        let primary = pid.is_some() && self.status.as_ref().is_none_or(|s| !s.in_recovery);
        let holds = self.leadership.holds_lock();
        if !primary && !holds {
            self.leadership.primary_gone();
        }
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let leading = holds && self.current_role() == Role::Primary;
        if !leading || paused {
            self.watchdog.disable();
        }
        self.sync_watch.enable(
            (leading && self.dynamic.synchronous_mode.is_enabled())
                .then_some(self.dynamic.liveness.sync_standby_timeout),
        );
        if !holds {
            self.memory.switchover = None;
        }
        self.report();
    }

    /// Arms (or re-arms) the watchdog for the current `ttl`; false when it is required and
    /// cannot be used.
    pub fn arm_watchdog(&self) -> bool {
        self.watchdog.activate(Duration::from_secs(self.dynamic.ttl))
    }

    /// The member's identity as published.
    pub fn identity(&self) -> Identity {
        Identity::of(&self.cfg)
    }

    /// Writes our member key (on the lease `Leadership` keeps alive).
    /// A `backup_label` in the data directory: a clone or rewind not yet started.
    pub(crate) fn has_backup_label(&self) -> bool {
        self.pg.data_dir().join("backup_label").exists()
    }

    pub async fn publish_member(&mut self) {
        let id = self.identity();
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let mut data =
            observe::member_data(&id, self.state, self.current_role(), self.status.as_ref(), paused);
        data.pending_restart_reason = self.pending_restart_reason.clone();
        data.scheduled_restart = self.scheduled_restart_field();
        self.report();
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

    /// The `scheduled_restart` field of the member key (set by the loop's operator queue).
    fn scheduled_restart_field(&self) -> Option<Value> {
        self.scheduled_restart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
