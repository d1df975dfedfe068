//! Performing the engine's actions. Every step is bounded: external commands by their own
//! timeouts, DCS calls by `retry_timeout`.

use std::time::{Duration, Instant};

use pgvigil_api::{ClusterView, PgState, Role};
use pgvigil_dcs::TermOpening;
use pgvigil_engine::slots::{PublishedSlots, SlotPlan};
use pgvigil_engine::{Action, DemoteMode, StartAs};
use pgvigil_postgres::{ClusterState, StopMode};

use super::callbacks::Event;
use super::config::Recovery;
use super::{PgSupervisor, history, observe};

#[derive(Debug)]
pub enum Failed {
    /// The agent must exit.
    Fatal(String),
    /// This cycle ends; the next one decides again.
    Recoverable(String),
}

pub(super) type Outcome = Result<bool, Failed>;

pub(super) fn recoverable(what: &str) -> impl FnOnce(pgvigil_postgres::PgError) -> Failed + '_ {
    move |e| Failed::Recoverable(format!("{what}: {e}"))
}

impl PgSupervisor {
    pub(super) fn retry(&self) -> Duration {
        Duration::from_secs(self.dynamic.retry_timeout)
    }

    pub(super) fn pg_ctl_timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.postgresql.pg_ctl_timeout.max(1))
    }

    /// Performs one action; `Ok(true)` asks for another cycle at once.
    pub(super) async fn execute(&mut self, action: Action, view: Option<&ClusterView>) -> Outcome {
        match action {
            Action::Bootstrap => self.bootstrap().await,
            Action::BootstrapStandby { methods } => self.bootstrap_standby(&methods).await,
            Action::CreateReplica { source, methods } => {
                self.create_replica(view, source.as_deref(), &methods).await
            }
            Action::Start(StartAs::Primary) => self.start_primary().await,
            Action::Start(StartAs::Replica { upstream }) => {
                self.start_replica(view, upstream.as_deref()).await
            }
            Action::Start(StartAs::Remote) => self.start_in_recovery(view, None, true).await,
            Action::Promote => self.promote().await,
            Action::Demote(mode) => self.demote(mode).await,
            Action::Follow { upstream } => self.follow(view, upstream.as_deref()).await,
            Action::FollowRemote => self.follow_remote().await,
            Action::DemoteCluster => self.demote_cluster().await,
            Action::Rewind { source } => self.rewind(view, &source).await,
            Action::Reinitialize { source, methods } => self.reinitialize(view, &source, &methods).await,
            // The cycle gathers peers itself before deciding again.
            Action::QueryPeers => Ok(true),
            Action::AcquireLock => self.acquire_lock(TermOpening::Acquire).await,
            Action::TakeOver {
                from,
                leader_revision,
                heartbeat_revision,
                config_revision,
            } => {
                tracing::warn!("taking the leader key from {from}, silent past its promise");
                let how = TermOpening::TakeOver {
                    leader_revision,
                    heartbeat_revision,
                    config_revision,
                };
                self.acquire_lock(how).await
            }
            Action::AdoptLock { leader_revision } => self.adopt_lock(leader_revision).await,
            Action::ReleaseLock => self.release_lock().await,
            Action::ApplyConfig => {
                self.apply_config().await;
                Ok(false)
            }
            Action::WriteInitialize => self.write_initialize().await,
            Action::LeaderHousekeeping { slots, published } => {
                self.leader_housekeeping(view, &slots, published).await
            }
            Action::ManageSlots(plan) => {
                self.memory.retained_slots_seen = None;
                self.manage_slots(&plan).await;
                self.keep_logical_copies(&plan.copies).await;
                Ok(false)
            }
            Action::CopyLogicalSlots(slots) => self.copy_logical_slots(view, &slots).await,
            Action::StopForSwitchover { candidates } => self.stop_for_switchover(candidates).await,
            Action::PublishPosition { optime } => self.publish_position(view, optime).await,
            Action::Restart { timeout } => self
                .restart_postgres(timeout)
                .await
                .map(|()| true)
                .map_err(Failed::Recoverable),
            // The loop's operator queue answers the request before the actions run.
            Action::AnswerRequest { .. } => Ok(false),
            Action::ClearFailover => self.clear_failover(view).await,
            Action::Fatal(message) => Err(Failed::Fatal(message)),
        }
    }

    pub(super) async fn dcs_call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, pgvigil_dcs::DcsError>>,
    ) -> Result<T, Failed> {
        match tokio::time::timeout(self.retry(), call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failed::Recoverable(format!("{what}: {e}"))),
            Err(_) => Err(Failed::Recoverable(format!(
                "{what}: timed out after {:?}",
                self.retry()
            ))),
        }
    }

    pub(super) fn member_addr(view: Option<&ClusterView>, name: &str) -> Result<(String, u16), Failed> {
        view.and_then(|c| c.member(name))
            .and_then(|m| m.data.host_port())
            .ok_or_else(|| Failed::Recoverable(format!("member {name} has no usable conn_url")))
    }

    pub(super) fn write_pgpass(&self) -> Result<(), Failed> {
        self.pg
            .write_pgpass(&[("*".to_string(), 0)])
            .map_err(recoverable("writing the pgpass file"))
    }

    /// Starts PostgreSQL as a primary: only with a permit from `Leadership`, asked again once
    /// the postmaster is up and the fence knows it (the lock may have lapsed during the start).
    async fn start_primary(&mut self) -> Outcome {
        if !self.leadership.permits_primary() {
            return Err(Failed::Recoverable(
                "not starting postgres as a primary: the leader lock is not proven".into(),
            ));
        }
        self.memory.primary_restart_since.get_or_insert_with(Instant::now);
        let files = self.config_files(Recovery::None);
        let started = self.start_with(files, Some(Role::Primary)).await;
        self.leadership.set_postmaster(self.pg.postmaster_pid());
        if !self.leadership.permits_primary() {
            // A fencing stop: no before_stop may delay it.
            let _ = self.pg.stop(StopMode::Immediate, self.pg_ctl_timeout()).await;
            if started.is_ok() {
                self.callback(Event::Stop, Role::Primary);
            }
            self.state = PgState::Stopped;
            return Err(Failed::Recoverable(
                "stopped postgres again: the leader lock lapsed while it started".into(),
            ));
        }
        started
    }

    pub(super) async fn start_replica(
        &mut self,
        view: Option<&ClusterView>,
        upstream: Option<&str>,
    ) -> Outcome {
        self.start_in_recovery(view, upstream, false).await
    }

    /// Starts PostgreSQL in recovery, following `upstream` or, with `remote`, a standby
    /// cluster's remote primary (§4.11).
    pub(super) async fn start_in_recovery(
        &mut self,
        view: Option<&ClusterView>,
        upstream: Option<&str>,
        remote: bool,
    ) -> Outcome {
        // A former primary (demoted, or stopped for a switchover) coming back as a replica is a
        // role change for the callbacks, not a start (Patroni's `follow`).
        let role_change = self.cb_called && matches!(self.role, Role::Primary | Role::Demoted);
        // From now on we are a replica, even if the start fails: peers racing for the lock
        // must not see a "primary still alive" in a node that gave the lock up.
        self.role = Role::Replica;
        // PostgreSQL is stopped: a past term has nothing left to fence. Left armed, its fence
        // would stop the replica we start as soon as the cycle hands it the new postmaster,
        // and the next cycle would start it again (found by the simulation).
        if self.pg.postmaster_pid().is_none() {
            self.leadership.primary_gone();
            // What the data directory was, read now (a rewind or clone may just have changed
            // it): as a replica it will report the timeline it replays, not that it once wrote
            // its own WAL there (`Memory::former_primary_timeline`).
            self.memory.former_primary_timeline = match self.pg.controldata().await {
                Ok(cd)
                    if observe::control_info(&cd, self.has_backup_label())
                        .state
                        .was_primary() =>
                {
                    Some(cd.checkpoint_timeline)
                }
                _ => None,
            };
        }
        self.follows_remote = remote;
        let files = if remote {
            self.configured_upstream = self.remote_addr();
            self.config_files(Recovery::Remote)
        } else {
            let files = self.config_files(Recovery::Follow(upstream));
            // The upstream the files name: none with `nostream`, whoever the caller named (after
            // a clone or a rewind it is the leader); else the next cycle would "re-point" it.
            let streams = files
                .recovery
                .as_ref()
                .is_some_and(|r| r.primary_conninfo.is_some());
            self.configured_upstream = upstream
                .filter(|_| streams)
                .and_then(|u| Self::member_addr(view, u).ok());
            files
        };
        self.write_pgpass()?;
        let started = self
            .start_with(files, (!role_change).then_some(Role::Replica))
            .await;
        if role_change {
            // Patroni calls it whether or not the start succeeded.
            self.callback(Event::RoleChange, Role::Replica);
        }
        started
    }

    /// Starts PostgreSQL with `files`; a `primary`'s postmaster is handed to the fences before
    /// it runs (an agent frozen or killed during the start must not leave it unfenced).
    /// `on_start` runs with `on_start`'s role once it is up (`None`: the caller runs the
    /// callback that fits).
    async fn start_with(&mut self, files: pgvigil_postgres::ConfigFiles, on_start: Option<Role>) -> Outcome {
        let primary = on_start == Some(Role::Primary);
        self.write_config(&files)
            .map_err(recoverable("writing the configuration"))?;
        self.state = PgState::Starting;
        // A replica starts with `primary_slot_name` set, and a standby after pg_rewind (or one
        // whose checkpoint is behind the leader) accepts connections only once it has streamed
        // up to a consistent point, through that slot. The leader creates slots for the members
        // it sees in etcd; a member back from a long outage has no key any more (it expired
        // with its lease) and the cycle publishes it only after this start returns. Publish it
        // now, so the leader creates the slot while PostgreSQL waits for it.
        self.publish_member().await;
        // A primary's permit is asked again at the last moment (publishing the member key may
        // have taken up to retry_timeout), with the fences already holding its postmaster.
        let leadership = &self.leadership;
        let withdrawn = std::sync::atomic::AtomicBool::new(false);
        let announce = |pid| {
            if !primary {
                return true;
            }
            leadership.set_postmaster(Some(pid));
            let permitted = leadership.permits_primary();
            withdrawn.store(!permitted, std::sync::atomic::Ordering::Relaxed);
            permitted
        };
        match self.pg.start_announced(self.pg_ctl_timeout(), announce).await {
            Ok(()) => {
                self.state = PgState::Running;
                self.memory.start_failed = false;
                if let Some(role) = on_start {
                    self.callback(Event::Start, role);
                }
                Ok(true)
            }
            Err(_) if withdrawn.load(std::sync::atomic::Ordering::Relaxed) => {
                self.state = PgState::Stopped;
                Err(Failed::Recoverable(
                    "not starting postgres as a primary: the leader lock lapsed before it ran".into(),
                ))
            }
            Err(e) => {
                self.state = PgState::StartFailed;
                self.memory.start_failed = true;
                Err(Failed::Recoverable(format!("failed to start postgres: {e}")))
            }
        }
    }

    async fn promote(&mut self) -> Outcome {
        // The lock must be in hand with a deadline ahead; the fence already holds it and the
        // postmaster, so a promotion that outlives the lock is stopped at the deadline.
        if !self.leadership.permits_primary() {
            return Err(Failed::Recoverable(
                "not promoting: the leader lock is not proven".into(),
            ));
        }
        // The fencing script runs with the lock in hand and before anything changes; its
        // refusal is the engine's to act on (release the lock, back off for ttl).
        if !self.pre_promote_allows().await {
            tracing::warn!("not promoting: the pre_promote script failed");
            self.memory.pre_promote_failed_at = Some(Instant::now());
            return Ok(true);
        }
        // The script may have taken long: the lock must still be proven.
        if !self.leadership.permits_primary() {
            return Err(Failed::Recoverable(
                "not promoting: the leader lock is not proven after pre_promote".into(),
            ));
        }
        self.leadership.set_postmaster(self.pg.postmaster_pid());
        self.failsafe.clear();
        // The first commits of the new primary must already wait for the standbys the old one
        // trusted (strict and quorum modes), so the GUC changes before the promotion.
        let mode = super::sync::engine_mode(self.dynamic.synchronous_mode);
        if let Some(view) = self.cluster.clone() {
            let strict = self.dynamic.synchronous_mode_strict;
            let guc = pgvigil_engine::sync::before_promotion(&self.cfg.name, mode, strict, &view);
            if let Some(guc) = guc {
                // A reload wakes the startup process and can delay the promotion (see
                // `Postgres::promote`): skip it when PostgreSQL already runs with this value.
                // The files catch up at the next configuration change.
                let running = self.status.as_ref().map(|s| s.synchronous_standby_names.as_str());
                let needs_reload = running != Some(guc.as_str());
                self.standby_names = Some(guc);
                if needs_reload {
                    self.apply_config().await;
                }
            }
        }
        if let (Some(view), Some(st)) = (self.cluster.clone(), self.status.as_ref()) {
            self.reserve_timelines(&view, st.timeline);
        }
        let timeout = Duration::from_secs(self.dynamic.loop_wait.max(30));
        self.pg
            .promote(timeout)
            .await
            .map_err(recoverable("promotion failed"))?;
        self.role = Role::Primary;
        self.memory = Default::default();
        self.promoted_with_logical_copies();
        self.callback(Event::RoleChange, Role::Primary);
        // Without a checkpoint pg_control still shows the old timeline and pg_rewind against us
        // would fail; our member key shows the new timeline only after this returns.
        if let Err(e) = self.pg.execute("CHECKPOINT", Duration::from_secs(300)).await {
            tracing::warn!("post-promotion checkpoint failed: {e}");
        }
        // The cycle's observation predates the promotion and still says "in recovery": the
        // end-of-cycle watchdog check would take us for a replica and disarm the watchdog we
        // just armed, leaving a new primary unguarded until the next cycle. Observe again.
        self.status = match self.pg.query_state(Duration::from_secs(2)).await {
            Ok(st) => Some(st),
            Err(e) => {
                tracing::debug!("monitoring query after promotion failed: {e}");
                None
            }
        };
        tracing::info!("promoted to primary");
        Ok(true)
    }

    /// Makes the coming promotion start a timeline number above every one the cluster's
    /// `history` knows (`history::reservations`): a node behind the cluster's timeline would
    /// otherwise reuse a number another promotion already started. Best effort: without the
    /// files the promotion still happens, and the divergence check finds the clash later.
    fn reserve_timelines(&self, view: &ClusterView, own_timeline: u64) {
        let Some(published) = view.history.as_ref().map(|h| h.value.as_slice()) else {
            return;
        };
        let pg_wal = self.pg.data_dir().join("pg_wal");
        let own_history = if own_timeline > 1 {
            std::fs::read_to_string(pg_wal.join(format!("{own_timeline:08X}.history"))).unwrap_or_default()
        } else {
            String::new()
        };
        for (timeline, text) in history::reservations(own_timeline, &own_history, published) {
            let path = pg_wal.join(format!("{timeline:08X}.history"));
            if path.exists() {
                continue;
            }
            tracing::warn!(
                "timeline {timeline} was started by another promotion this node never received; \
                 reserving it so that ours starts a new timeline"
            );
            let tmp = path.with_extension("history.pgvigil-tmp");
            if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
                tracing::warn!("could not write {}: {e}", path.display());
            }
        }
    }

    async fn demote(&mut self, mode: DemoteMode) -> Outcome {
        self.state = PgState::Stopping;
        let stop = match mode {
            DemoteMode::ImmediateNoLock => StopMode::Immediate,
            DemoteMode::Offline => StopMode::Fast,
        };
        // A primary that must not run as one (the lock is another's, unproven, or etcd is
        // gone): no before_stop may delay its stop, unlike in Patroni.
        let role = self.current_role();
        let was_running = self.pg.is_running();
        self.pg
            .stop(stop, self.pg_ctl_timeout())
            .await
            .map_err(recoverable("stopping postgres to demote"))?;
        if was_running {
            self.callback(Event::Stop, role);
        }
        self.state = PgState::Stopped;
        self.role = Role::Demoted;
        self.configured_upstream = None;
        self.follows_remote = false;
        self.standby_names = None;
        if mode == DemoteMode::Offline {
            // Keep serving reads without an upstream until etcd is back.
            return self.start_replica(None, None).await;
        }
        Ok(true)
    }

    async fn follow(&mut self, view: Option<&ClusterView>, upstream: Option<&str>) -> Outcome {
        self.follows_remote = false;
        self.rewrite_recovery(Recovery::Follow(upstream)).await?;
        self.callback(Event::Reload, Role::Replica);
        self.configured_upstream = upstream.and_then(|u| Self::member_addr(view, u).ok());
        Ok(false)
    }

    /// Writes the configuration with `recovery` and reloads PostgreSQL.
    pub(super) async fn rewrite_recovery(&mut self, recovery: Recovery<'_>) -> Result<(), Failed> {
        self.write_pgpass()?;
        let files = self.config_files(recovery);
        self.write_config(&files)
            .map_err(recoverable("writing the configuration"))?;
        self.pg.reload().await.map_err(recoverable("reloading postgres"))
    }

    async fn rewind(&mut self, view: Option<&ClusterView>, source: &str) -> Outcome {
        let (host, port) = Self::member_addr(view, source)?;
        let role = self.current_role();
        self.stop_postgres(StopMode::Fast, self.pg_ctl_timeout(), Some(role))
            .await
            .map_err(recoverable("stopping for pg_rewind"))?;
        self.state = PgState::Stopped;
        self.write_pgpass()?;
        let timeout = Duration::from_secs(3600);
        tracing::info!("running pg_rewind from {source}");
        if let Err(e) = self.pg.rewind(&host, port, timeout).await {
            self.memory.rewind_failed = true;
            return Err(Failed::Recoverable(format!(
                "pg_rewind from {source} failed: {e}"
            )));
        }
        self.memory.rewind_failed = false;
        let leader = view.and_then(ClusterView::leader_name).map(str::to_string);
        self.start_replica(view, leader.as_deref().or(Some(source))).await
    }

    /// The leader's per-cycle duties: publish its position, its slots' positions and the slots
    /// to retain, and the timeline history, manage the synchronous standbys, and carry out the
    /// slot plan.
    async fn leader_housekeeping(
        &mut self,
        view: Option<&ClusterView>,
        slots: &SlotPlan,
        published: PublishedSlots,
    ) -> Outcome {
        self.memory.primary_restart_since = None;
        self.memory.start_failed = false;
        self.memory.retained_slots_seen = Some(published.seen);
        let Some(st) = self.status.clone() else {
            return Ok(false);
        };
        let Some(view) = view else { return Ok(false) };
        let status = pgvigil_api::StatusValue {
            optime: super::observe::wal_position(&st),
            slots: published
                .slots
                .into_iter()
                .map(|(name, lsn)| (name, serde_json::Value::from(lsn)))
                .collect(),
            retain_slots: published.retain_slots,
        };
        if let Err(Failed::Recoverable(e)) = self
            .dcs_call("publishing status", self.dcs.set_status(&status))
            .await
        {
            tracing::warn!("{e}");
        }
        if view.timeline() != st.timeline {
            self.publish_history(view, st.timeline).await;
        }
        self.manage_sync(view).await;
        self.manage_slots(slots).await;
        Ok(false)
    }

    /// Carries out the engine's slot plan (`docs/patroni-compat.md` §5.8): drops, then creations, then advances. Each
    /// slot on its own: a failure is logged and the others go ahead (the next cycle's plan
    /// tries again).
    async fn manage_slots(&self, plan: &SlotPlan) {
        for name in &plan.drop {
            match self.pg.drop_slot(name).await {
                Ok(true) => tracing::info!(slot = %name, "dropped replication slot"),
                Ok(false) => tracing::info!(slot = %name, "replication slot in use or gone, not dropped"),
                Err(e) => tracing::warn!(slot = %name, "could not drop replication slot: {e}"),
            }
        }
        for name in &plan.create_physical {
            match self.pg.create_physical_slot(name).await {
                Ok(()) => tracing::info!(slot = %name, "created physical replication slot"),
                Err(e) => tracing::warn!(slot = %name, "could not create physical replication slot: {e}"),
            }
        }
        for s in &plan.create_logical {
            match self.pg.create_logical_slot(&s.name, &s.database, &s.plugin).await {
                Ok(()) => tracing::info!(
                    slot = %s.name, database = %s.database, plugin = %s.plugin,
                    "created logical replication slot"
                ),
                Err(e) => tracing::warn!(slot = %s.name, "could not create logical replication slot: {e}"),
            }
        }
        for (name, lsn) in &plan.advance {
            if let Err(e) = self.pg.advance_slot(name, *lsn).await {
                tracing::warn!(slot = %name, "could not advance replication slot: {e}");
            }
        }
    }

    async fn publish_history(&self, view: &ClusterView, timeline: u64) {
        let entries = if timeline <= 1 {
            Vec::new()
        } else {
            let path = self
                .pg
                .data_dir()
                .join("pg_wal")
                .join(format!("{timeline:08X}.history"));
            match std::fs::read_to_string(&path) {
                Ok(text) => history::fill_skipped(history::parse_history_file(&text), timeline),
                Err(e) => {
                    tracing::warn!("could not read {}: {e}", path.display());
                    return;
                }
            }
        };
        let now = chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
        let entries = history::enrich(
            entries,
            view.history_entries(),
            &now,
            &self.cfg.name,
            self.dynamic.max_timelines_history as usize,
        );
        if let Err(Failed::Recoverable(e)) = self
            .dcs_call("publishing history", self.dcs.set_history(&entries))
            .await
        {
            tracing::warn!("{e}");
        }
    }

    /// SIGTERM: stop PostgreSQL (unless paused) and hand the lock over.
    pub async fn shutdown(&mut self) {
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        if paused {
            tracing::info!("paused: leaving PostgreSQL running and keeping the leader key");
            self.watchdog.disable();
            return;
        }
        let was_leader = self.leadership.holds_lock();
        if self.pg.is_running() {
            self.state = PgState::Stopping;
            self.publish_member().await;
            let role = self.current_role();
            if let Err(e) = self
                .stop_postgres(StopMode::Fast, self.pg_ctl_timeout(), Some(role))
                .await
            {
                // The fencer process goes on enforcing the deadline once we are gone.
                tracing::error!("could not stop PostgreSQL, keeping the leader key: {e}");
                return;
            }
        }
        self.state = PgState::Stopped;
        self.status = None;
        if was_leader {
            // Only now, with PostgreSQL down, is the last position final. Patroni records it
            // in `/status` when it deletes the leader key; so do we, and the timeline too: a
            // promotion that finished while we were shutting down never reached the cycle that
            // publishes `history`, and without it the next leader and the other members could
            // not know that timeline exists (`docs/patroni-compat.md` §4.14).
            if let Ok(cd) = self.pg.controldata().await {
                let view = self.cluster.clone();
                if let Some(view) = &view
                    && cd.cluster_state == ClusterState::ShutDown
                    && view.timeline() < cd.checkpoint_timeline
                {
                    tracing::info!(
                        "publishing timeline {} before releasing the leader key",
                        cd.checkpoint_timeline
                    );
                    self.publish_history(view, cd.checkpoint_timeline).await;
                }
                self.publish_position(view.as_ref(), cd.checkpoint_lsn).await.ok();
            }
            match self.release_lock().await {
                Ok(_) => tracing::info!("released the leader lock"),
                Err(Failed::Recoverable(e) | Failed::Fatal(e)) => tracing::error!("{e}"),
            }
        }
        // PostgreSQL is stopped: nothing left for a machine reset to protect.
        self.watchdog.disable();
        self.publish_member().await;
        self.callbacks.flush(Duration::from_secs(5));
    }
}
