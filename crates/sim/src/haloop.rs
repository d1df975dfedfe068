//! The HA loop of one agent, as the runtime (`crates/agent/src/runtime/mod.rs`) runs it: read
//! the cluster, observe PostgreSQL, ask the real `pgvigil_engine::decide` (with the peers when
//! it asks), perform the actions ([`crate::actions`]), publish the member key, sleep until
//! `loop_wait` or a wake-up. Each step that waits (etcd, peers, PostgreSQL) is a state here.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use pgvigil_api::rest::{PatroniInfo, StatusDocument, XlogInfo};
use pgvigil_api::{ClusterView, MemberData, PATRONI_COMPAT_VERSION, PgState, Role};
use pgvigil_engine::{
    Action, ControlInfo, DataDir, EngineConfig, Inputs, LocalPg, Memory, Observed, PeerReport, Silence,
};
use pgvigil_lock::{BootInstant, LockSettings};

use crate::actions::Job;
use crate::agent::{Agent, Purpose};
use crate::ctx::{Ctx, trace};
use crate::etcd::{Request, Response};
use crate::event::{AgentEvent, CallId, Event};
use crate::node::Host;
use crate::pg::{Proc, SYSID};
use crate::time::{SEC, nanos};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Asleep,
    Reading(CallId),
    Querying,
    Acting,
    Publishing(CallId),
}

/// What one cycle gathered.
pub struct Cycle {
    pub view: Option<ClusterView>,
    pub pg: LocalPg,
    pub silence: Option<Silence>,
    pub peers: Option<Vec<PeerReport>>,
    pub actions: VecDeque<Action>,
    pub rerun: bool,
}

/// What PostgreSQL's monitoring query answered.
#[derive(Clone, Copy, Debug)]
pub struct Status {
    pub in_recovery: bool,
    pub timeline: u64,
    pub lsn: u64,
    pub streaming: bool,
}

pub struct HaLoop {
    pub memory: Memory,
    pub state: PgState,
    /// Our role when PostgreSQL cannot tell.
    pub role: Role,
    pub snapshot: Option<StatusDocument>,
    pub next_run: BootInstant,
    pub seq: u64,
    pub wake_pending: bool,
    pub phase: Phase,
    pub cycle: Option<Cycle>,
    pub job: Option<Job>,
    pub job_seq: u64,
    pub status: Option<Status>,
    pub control: Option<ControlInfo>,
    pub configured_upstream: Option<usize>,
    member_written: Option<(String, i64)>,
    /// Peer queries of this cycle: `None` until answered or timed out.
    queries: BTreeMap<u64, (String, Option<Option<StatusDocument>>)>,
}

impl HaLoop {
    pub fn new(now: BootInstant) -> HaLoop {
        HaLoop {
            memory: Memory::default(),
            state: PgState::Stopped,
            role: Role::Uninitialized,
            snapshot: None,
            next_run: now,
            seq: 0,
            wake_pending: false,
            phase: Phase::Asleep,
            cycle: None,
            job: None,
            job_seq: 0,
            status: None,
            control: None,
            configured_upstream: None,
            member_written: None,
            queries: BTreeMap::new(),
        }
    }

    pub fn role(&self) -> Role {
        match self.status {
            Some(s) if s.in_recovery => Role::Replica,
            Some(_) => Role::Primary,
            None => self.role,
        }
    }
}

pub fn conn_host(idx: usize) -> String {
    format!("10.0.0.{}", idx + 1)
}

pub fn node_of(name: &str) -> Option<usize> {
    name.strip_prefix("node")?.parse::<usize>().ok()?.checked_sub(1)
}

impl Agent {
    pub fn now_instant(&self, ctx: &Ctx, host: &Host) -> std::time::Instant {
        ctx.epoch + Duration::from_nanos(host.local(ctx.now).as_nanos())
    }

    /// Something the loop reacts to happened (lock news, a leader key change, the
    /// postmaster): a cycle at once, or right after the current one.
    pub fn wake_loop(&mut self, ctx: &mut Ctx) {
        if self.ha.phase == Phase::Asleep {
            let event = self.event(AgentEvent::LoopWake { seq: self.ha.seq });
            ctx.after(0, event);
        } else {
            self.ha.wake_pending = true;
        }
    }

    pub fn loop_event(&mut self, ctx: &mut Ctx, host: &mut Host, what: AgentEvent) {
        match what {
            AgentEvent::LoopWake { seq } => {
                if seq == self.ha.seq && self.ha.phase == Phase::Asleep {
                    self.start_cycle(ctx, host);
                }
            }
            AgentEvent::PostmasterChanged => self.wake_loop(ctx),
            AgentEvent::PeerAnswer { query, status } => {
                self.peer_answer(ctx, host, query, Some(status.map(|s| *s)))
            }
            AgentEvent::PeerTimeout { query } => self.peer_answer(ctx, host, query, None),
            other => self.job_event(ctx, host, other),
        }
    }

    pub fn start_cycle(&mut self, ctx: &mut Ctx, host: &mut Host) {
        self.ha.seq += 1;
        self.ha.wake_pending = false;
        let now = host.local(ctx.now);
        self.ha.next_run = self.ha.next_run.min(now);
        self.loop_alive_for(ctx, host, Agent::stall_allowance(ctx));
        let call = self.loop_call(ctx, host, Purpose::Read, Request::Range);
        self.ha.phase = Phase::Reading(call);
    }

    pub fn loop_response(
        &mut self,
        ctx: &mut Ctx,
        host: &mut Host,
        call: CallId,
        response: Option<Response>,
    ) {
        match self.ha.phase {
            Phase::Reading(c) if c == call => self.read_done(ctx, host, response),
            Phase::Publishing(c) if c == call => self.finish_cycle(ctx, host),
            Phase::Acting => self.job_write_done(ctx, host, call, response),
            _ => {}
        }
    }

    fn read_done(&mut self, ctx: &mut Ctx, host: &mut Host, response: Option<Response>) {
        let view = match response {
            Some(Response::Range { revision, kvs }) => Some(ClusterView::from_kvs(ctx.keys, revision, kvs)),
            _ => None,
        };
        let now = host.local(ctx.now);
        if let Some(v) = &view {
            let leader = v.leader.as_ref().map(|l| (l.name.as_str(), l.mod_revision));
            let heartbeat = v.heartbeat.as_ref().map(|h| (h.value.as_str(), h.mod_revision));
            self.tracker.observe_read(leader, heartbeat, v.revision, now);
        } else {
            trace!(ctx, "{}: could not read the cluster", self.name);
        }
        let pg = self.observe(host, ctx.now);
        self.ha.cycle = Some(Cycle {
            view,
            pg,
            silence: self.tracker.silence(now),
            peers: None,
            actions: VecDeque::new(),
            rerun: false,
        });
        self.decide(ctx, host);
    }

    /// What the runtime's `observe` gathers: the postmaster, one monitoring query,
    /// `pg_controldata` when PostgreSQL is down.
    pub fn observe(&mut self, host: &Host, now: crate::time::Nanos) -> LocalPg {
        let pg = &host.pg;
        let alive = pg.alive();
        self.ha.status = match pg.proc {
            Proc::Running | Proc::Promoting => Some(Status {
                in_recovery: !(pg.proc == Proc::Running && pg.data.primary),
                timeline: pg.data.timeline,
                lsn: pg.lsn(now),
                streaming: pg.streaming,
            }),
            _ => None,
        };
        if self.ha.status.is_some() {
            self.ha.state = PgState::Running;
        } else if alive {
            if self.ha.state == PgState::Running {
                self.ha.state = PgState::Starting;
            }
        } else if matches!(self.ha.state, PgState::Running | PgState::Starting) {
            self.ha.state = PgState::Crashed;
        }
        if !alive || self.ha.control.is_none() || self.ha.status.is_none() {
            self.ha.control = Some(pg.control());
        }
        let upstream = self.ha.configured_upstream.map(|u| (conn_host(u), 5432u16));
        LocalPg {
            data: DataDir::Initialized(self.ha.control.clone().unwrap_or_else(|| pg.control())),
            postmaster_alive: alive,
            observed: self.ha.status.map(|s| Observed {
                in_recovery: s.in_recovery,
                sysid: SYSID.into(),
                timeline: s.timeline,
                wal_position: s.lsn,
                streaming: s.streaming,
                upstream,
                server_version: 160_000,
                pending_restart: false,
                // The simulation models no replication slots.
                slots: Vec::new(),
            }),
        }
    }

    pub fn engine_config(&self, ctx: &Ctx) -> EngineConfig {
        let s = &ctx.plan.settings;
        EngineConfig {
            name: self.name.clone(),
            tags: Default::default(),
            ttl: s.ttl,
            loop_wait: s.loop_wait,
            maximum_lag_on_failover: 1_048_576,
            primary_start_timeout: Duration::from_secs(300),
            check_timeline: false,
            use_pg_rewind: true,
            can_bootstrap: true,
            replica_methods: Vec::new(),
            synchronous_mode: pgvigil_engine::sync::SyncMode::Off,
            paused: false,
            failsafe_mode: false,
            fast_takeover: s.fast_takeover,
            takeover_margin: s.takeover_margin,
            slots: pgvigil_engine::slots::SlotsConfig {
                use_slots: false,
                ..Default::default()
            },
            standby_cluster: None,
        }
    }

    /// `decide`, again after the peers answered when it asked for them.
    pub fn decide(&mut self, ctx: &mut Ctx, host: &mut Host) {
        let cfg = self.engine_config(ctx);
        let now = host.local(ctx.now);
        let instant = self.now_instant(ctx, host);
        let Some(cycle) = self.ha.cycle.as_ref() else {
            return;
        };
        let view_names_me =
            cycle.view.as_ref().and_then(ClusterView::leader_name) == Some(self.name.as_str());
        let decision = pgvigil_engine::decide(&Inputs {
            now: instant,
            config: &cfg,
            cluster: cycle.view.as_ref(),
            lock: self.core.lock_state(now, view_names_me),
            silence: cycle.silence.as_ref(),
            failsafe_leader: None,
            watchdog_failed: false,
            config_pending: false,
            request: None,
            pg: &cycle.pg,
            memory: &self.ha.memory,
            peers: cycle.peers.as_deref(),
            failover_due_in: None,
        });
        if decision.actions.first() == Some(&Action::QueryPeers) && cycle.peers.is_none() {
            self.query_peers(ctx, host);
            return;
        }
        trace!(ctx, "{}: {} {:?}", self.name, decision.message, decision.actions);
        if let Some(cycle) = self.ha.cycle.as_mut() {
            cycle.actions = decision.actions.into();
        }
        self.ha.phase = Phase::Acting;
        self.next_action(ctx, host);
    }

    /// Asks every other member but a silent leader past its promise, 2 s each.
    fn query_peers(&mut self, ctx: &mut Ctx, host: &mut Host) {
        let Some(cycle) = self.ha.cycle.as_ref() else {
            return;
        };
        let silent = cycle.silence.as_ref().map(|s| s.leader.clone());
        let targets: Vec<(usize, String)> = cycle
            .view
            .iter()
            .flat_map(|v| v.members.iter())
            .filter(|m| m.name != self.name && !m.data.api_url.is_empty())
            .filter(|m| Some(&m.name) != silent.as_ref())
            .filter_map(|m| node_of(&m.name).map(|i| (i, m.name.clone())))
            .collect();
        self.ha.queries.clear();
        self.ha.phase = Phase::Querying;
        for (to, name) in targets {
            let query = ctx.id();
            self.ha.queries.insert(query, (name, None));
            let timeout = self.event(AgentEvent::PeerTimeout { query });
            ctx.after(2 * SEC, timeout);
            if host.cut_from_peers(ctx.now) || ctx.lost(host.slow) {
                continue;
            }
            let delay = ctx.delay(host.slow);
            let event = Event::PeerQuery {
                from: self.node,
                from_agent: self.inc,
                to,
                query,
            };
            ctx.after(delay, event);
        }
        self.peers_done(ctx, host);
    }

    fn peer_answer(
        &mut self,
        ctx: &mut Ctx,
        host: &mut Host,
        query: u64,
        answer: Option<Option<StatusDocument>>,
    ) {
        if self.ha.phase != Phase::Querying {
            return;
        }
        if let Some((_, slot @ None)) = self.ha.queries.get_mut(&query) {
            *slot = Some(answer.flatten());
            self.peers_done(ctx, host);
        }
    }

    fn peers_done(&mut self, ctx: &mut Ctx, host: &mut Host) {
        if self.ha.queries.values().any(|(_, a)| a.is_none()) {
            return;
        }
        let reports = std::mem::take(&mut self.ha.queries)
            .into_values()
            .map(|(name, status)| PeerReport {
                name,
                status: status.flatten(),
            })
            .collect();
        if let Some(cycle) = self.ha.cycle.as_mut() {
            cycle.peers = Some(reports);
        }
        self.decide(ctx, host);
    }

    /// After the actions: the fences learn the postmaster, a past term's fence is released
    /// once no primary is left, `Leadership` gets the settings, the member key is published.
    pub fn end_actions(&mut self, ctx: &mut Ctx, host: &mut Host) {
        let pid = host.pg.alive().then_some(host.pg.pid);
        self.set_postmaster(ctx, host, pid);
        let primary = pid.is_some() && self.ha.status.is_none_or(|s| !s.in_recovery);
        if !primary && !self.holds_lock(host, ctx.now) {
            self.primary_gone(ctx, host);
        }
        let view = self.ha.cycle.as_ref().and_then(|c| c.view.as_ref());
        if let Some(view) = view {
            let settings = self.lock_settings(ctx, view);
            if settings != self.settings {
                self.settings = settings;
                self.driver_poll(ctx, host);
            }
        }
        self.publish_member(ctx, host);
    }

    /// `Agent::lock_settings` of the runtime: the promise only while every member is pgvigil
    /// (always, here) and the fencer runs.
    fn lock_settings(&self, ctx: &Ctx, view: &ClusterView) -> LockSettings {
        let s = &ctx.plan.settings;
        let all_pgvigil = view
            .members
            .iter()
            .all(|m| m.name == self.name || m.data.is_pgvigil());
        LockSettings {
            ttl: s.ttl,
            renew_every: s.loop_wait.min(s.ttl / 3).max(Duration::from_millis(500)),
            heartbeat_interval: s.heartbeat_interval,
            promise: (s.fast_takeover && all_pgvigil).then_some(s.fence_after),
            failsafe_mode: false,
        }
    }

    fn member_data(&self) -> MemberData {
        let mut m = MemberData {
            conn_url: format!("postgres://{}:5432/postgres", conn_host(self.node)),
            api_url: format!("http://{}:8008/patroni", conn_host(self.node)),
            state: self.ha.state.as_str().to_string(),
            role: self.ha.role().as_str().to_string(),
            version: PATRONI_COMPAT_VERSION.to_string(),
            pgvigil: Some(serde_json::json!({"version": "sim"})),
            ..Default::default()
        };
        if let Some(st) = self.ha.status.filter(|_| self.ha.state == PgState::Running) {
            m.xlog_location = Some(st.lsn);
            m.timeline = Some(st.timeline);
            if st.in_recovery && st.streaming {
                m.replication_state = Some("streaming".into());
            }
        }
        m
    }

    fn publish_member(&mut self, ctx: &mut Ctx, host: &mut Host) {
        match self.send_member(ctx, host) {
            Some(call) => self.ha.phase = Phase::Publishing(call),
            None => self.finish_cycle(ctx, host),
        }
    }

    /// Writes our member key on our lease unless it is unchanged (or there is no lease yet).
    pub fn send_member(&mut self, ctx: &mut Ctx, host: &mut Host) -> Option<CallId> {
        let lease = self.core.current_lease().map(|l| l.id)?;
        let data = self.member_data();
        let value = serde_json::to_string(&data).expect("member data serializes");
        let written = (value.clone(), lease);
        if self.ha.member_written.as_ref() == Some(&written) {
            return None;
        }
        self.ha.member_written = Some(written);
        let key = ctx.keys.member(&self.name);
        Some(self.loop_call(ctx, host, Purpose::Write, Request::Put { key, value, lease }))
    }

    fn finish_cycle(&mut self, ctx: &mut Ctx, host: &mut Host) {
        let now = host.local(ctx.now);
        let rerun = self.ha.cycle.as_ref().is_some_and(|c| c.rerun);
        let loop_wait = ctx.plan.settings.loop_wait;
        self.ha.next_run = if rerun {
            now
        } else {
            (self.ha.next_run + loop_wait).max(now)
        };
        // A silent leader's promise runs out: look again right then.
        if ctx.plan.settings.fast_takeover
            && let Some(s) = self.tracker.silence(now)
        {
            self.ha.next_run = self
                .ha
                .next_run
                .min(now + s.gone_in(ctx.plan.settings.takeover_margin));
        }
        self.ha.snapshot = Some(self.status_document());
        self.ha.phase = Phase::Asleep;
        self.ha.cycle = None;
        if rerun || self.ha.wake_pending {
            let event = self.event(AgentEvent::LoopWake { seq: self.ha.seq });
            ctx.after(0, event);
            return;
        }
        let sleep = self.ha.next_run.saturating_duration_since(now);
        self.loop_alive_for(ctx, host, sleep + Agent::stall_allowance(ctx));
        let at = host.clock.real_time_of(self.ha.next_run);
        let event = self.event(AgentEvent::LoopWake { seq: self.ha.seq });
        ctx.at(at.max(ctx.now + nanos(Duration::from_millis(1))), event);
    }

    /// The REST status document peers read in a leader race.
    fn status_document(&self) -> StatusDocument {
        let mut doc = StatusDocument {
            state: self.ha.state.as_str().to_string(),
            role: self.ha.role().as_str().to_string(),
            patroni: PatroniInfo {
                version: PATRONI_COMPAT_VERSION.to_string(),
                scope: "sim".into(),
                name: self.name.clone(),
            },
            ..Default::default()
        };
        if let Some(st) = self.ha.status.filter(|_| self.ha.state == PgState::Running) {
            doc.timeline = Some(st.timeline);
            doc.xlog = Some(if st.in_recovery {
                XlogInfo {
                    received_location: Some(st.lsn),
                    replayed_location: Some(st.lsn),
                    ..Default::default()
                }
            } else {
                XlogInfo {
                    location: Some(st.lsn),
                    ..Default::default()
                }
            });
        }
        doc
    }
}
