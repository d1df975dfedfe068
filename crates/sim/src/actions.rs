//! Performing the engine's actions, as `crates/agent/src/runtime/actions.rs` does: the same
//! permits, the same order of steps, the same reports to `Leadership`; PostgreSQL's work takes
//! simulated time and is waited for as a [`Job`].

use std::time::Duration;

use pgvigil_api::{HistoryEntry, PgState, Role, StatusValue};
use pgvigil_engine::{Action, DemoteMode, StartAs};
use pgvigil_lock::{RequestId, TermOpening};

use crate::agent::{Agent, Purpose};
use crate::ctx::{Ctx, trace};
use crate::etcd::{Request, Response};
use crate::event::{AgentEvent, CallId, HostEvent};
use crate::haloop::{Phase, Status, node_of};
use crate::node::Host;
use crate::pg::{Proc, SYSID};
use crate::time::{Nanos, nanos};

/// `pg_ctl_timeout`'s default.
const PG_CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// An action waiting for something.
#[derive(Clone, Debug)]
pub enum Job {
    /// The scheduler's answer to an open or release request.
    Lock { request: RequestId, kind: LockKind },
    /// `pg_ctl` returning for postmaster `pg`.
    Pg { pg: u64, then: AfterPg },
    /// A job timer.
    Wait { then: AfterWait },
    /// An etcd write of the HA loop.
    Write { call: CallId, then: AfterWrite },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Race,
    Adopt,
    Release,
}

#[derive(Clone, Copy, Debug)]
pub enum AfterPg {
    StartedPrimary,
    StartedReplica,
    Promoted,
    Stopped(AfterStop),
}

#[derive(Clone, Copy, Debug)]
pub enum AfterStop {
    Demoted,
    Offline,
    Rewind {
        source: usize,
        reinit: bool,
    },
    /// The lock lapsed while PostgreSQL started as a primary.
    Lapsed,
}

#[derive(Clone, Copy, Debug)]
pub enum AfterWait {
    Checkpoint,
    Rewound {
        source: usize,
        reinit: bool,
    },
    /// A lock request's answer did not come within `retry_timeout`.
    LockTimeout,
}

#[derive(Clone, Debug)]
pub enum AfterWrite {
    /// `status` written; `history` to write next.
    Status {
        history: Option<String>,
    },
    /// The member key published before a start.
    Start {
        primary: bool,
        upstream: Option<usize>,
    },
    Done,
    Initialize,
}

/// An action's result: `Ok(again)`, or the message of a recoverable failure.
type Outcome = Result<bool, String>;

enum Progress {
    Done(Outcome),
    Wait(Job),
}

impl Agent {
    /// Starts the next action of the cycle, or ends the actions.
    pub fn next_action(&mut self, ctx: &mut Ctx, host: &mut Host) {
        loop {
            let Some(action) = self.ha.cycle.as_mut().and_then(|c| c.actions.pop_front()) else {
                return self.end_actions(ctx, host);
            };
            match self.start_action(ctx, host, action) {
                Progress::Done(outcome) => {
                    if !self.apply_outcome(ctx, outcome) {
                        return self.end_actions(ctx, host);
                    }
                }
                Progress::Wait(job) => {
                    self.ha.job = Some(job);
                    return;
                }
            }
        }
    }

    /// Returns whether the cycle goes on with the next action.
    fn apply_outcome(&mut self, ctx: &mut Ctx, outcome: Outcome) -> bool {
        let Some(cycle) = self.ha.cycle.as_mut() else {
            return false;
        };
        match outcome {
            Ok(again) => {
                cycle.rerun |= again;
                true
            }
            Err(message) => {
                trace!(ctx, "{}: {message}", self.name);
                cycle.rerun = false;
                cycle.actions.clear();
                false
            }
        }
    }

    fn finish_job(&mut self, ctx: &mut Ctx, host: &mut Host, progress: Progress) {
        match progress {
            Progress::Wait(job) => self.ha.job = Some(job),
            Progress::Done(outcome) => {
                self.ha.job = None;
                if self.apply_outcome(ctx, outcome) {
                    self.next_action(ctx, host);
                } else {
                    self.end_actions(ctx, host);
                }
            }
        }
    }

    fn job_timer(&mut self, ctx: &mut Ctx, after: Nanos) {
        self.ha.job_seq += 1;
        let event = self.event(AgentEvent::JobTimer { seq: self.ha.job_seq });
        ctx.after(after, event);
    }

    fn retry(ctx: &Ctx) -> Duration {
        ctx.plan.settings.retry_timeout
    }

    fn start_action(&mut self, ctx: &mut Ctx, host: &mut Host, action: Action) -> Progress {
        match action {
            Action::AcquireLock => self.lock_request(ctx, host, TermOpening::Acquire, LockKind::Race),
            Action::TakeOver {
                from,
                leader_revision,
                heartbeat_revision,
                config_revision,
            } => {
                trace!(ctx, "{}: taking the leader key from {from}", self.name);
                let how = TermOpening::TakeOver {
                    leader_revision,
                    heartbeat_revision,
                    config_revision,
                };
                self.lock_request(ctx, host, how, LockKind::Race)
            }
            Action::AdoptLock { leader_revision } => {
                let how = TermOpening::Move { leader_revision };
                self.lock_request(ctx, host, how, LockKind::Adopt)
            }
            Action::ReleaseLock => {
                let request = self.sched.release();
                self.driver_poll(ctx, host);
                self.job_timer(ctx, nanos(Self::retry(ctx)));
                Progress::Wait(Job::Lock {
                    request,
                    kind: LockKind::Release,
                })
            }
            Action::Promote => self.promote(ctx, host),
            Action::Start(StartAs::Primary) => self.start_primary(ctx, host),
            Action::Start(StartAs::Replica { upstream }) => {
                let upstream = upstream.as_deref().and_then(node_of);
                self.start_replica(ctx, host, upstream)
            }
            Action::Demote(mode) => {
                let next = match mode {
                    DemoteMode::ImmediateNoLock => AfterStop::Demoted,
                    DemoteMode::Offline => AfterStop::Offline,
                };
                self.stop(ctx, host, next)
            }
            Action::Follow { upstream } => {
                let upstream = upstream.as_deref().and_then(node_of);
                self.ha.configured_upstream = upstream;
                host.pg.upstream = upstream;
                Progress::Done(Ok(false))
            }
            Action::Rewind { source } => self.rewind_from(ctx, host, &source, false),
            Action::Reinitialize { source, .. } => self.rewind_from(ctx, host, &source, true),
            Action::LeaderHousekeeping { .. } => self.housekeeping(ctx, host),
            Action::WriteInitialize => {
                let request = Request::Put {
                    key: ctx.keys.initialize(),
                    value: SYSID.into(),
                    lease: 0,
                };
                let call = self.loop_call(ctx, host, Purpose::Write, request);
                Progress::Wait(Job::Write {
                    call,
                    then: AfterWrite::Initialize,
                })
            }
            // Replication slots are not modelled.
            Action::ManageSlots(_) | Action::CopyLogicalSlots(_) => Progress::Done(Ok(false)),
            Action::ApplyConfig | Action::QueryPeers => {
                Progress::Done(Ok(matches!(action, Action::QueryPeers)))
            }
            other => {
                ctx.problems.push(format!(
                    "{}: the engine decided {other:?}, which the simulation never sets up",
                    self.name
                ));
                Progress::Done(Err("not simulated".into()))
            }
        }
    }

    fn lock_request(&mut self, ctx: &mut Ctx, host: &mut Host, how: TermOpening, kind: LockKind) -> Progress {
        let request = self.sched.open(how);
        self.driver_poll(ctx, host);
        self.job_timer(ctx, nanos(Self::retry(ctx)));
        Progress::Wait(Job::Lock { request, kind })
    }

    /// Promotion: only with a permit; the fence knows the postmaster before it starts.
    fn promote(&mut self, ctx: &mut Ctx, host: &mut Host) -> Progress {
        if !self.permits_primary(host, ctx.now) {
            return Progress::Done(Err("not promoting: the leader lock is not proven".into()));
        }
        if host.pg.proc != Proc::Running || host.pg.data.primary {
            return Progress::Done(Err("not promoting: postgres is not a running replica".into()));
        }
        host.pg.permit = Some(self.inc);
        self.set_postmaster(ctx, host, Some(host.pg.pid));
        let timeout = ctx.plan.settings.loop_wait.max(Duration::from_secs(30));
        self.loop_alive_for(ctx, host, timeout + Duration::from_secs(300) + Self::retry(ctx));
        host.pg.promote();
        Self::await_pg(ctx, host, ctx.plan.timings.promote, AfterPg::Promoted)
    }

    /// Start as a primary: a permit before, again at the last moment before postgres runs
    /// (with the fences holding its postmaster), and again once it is up.
    fn start_primary(&mut self, ctx: &mut Ctx, host: &mut Host) -> Progress {
        if !self.permits_primary(host, ctx.now) {
            return Progress::Done(Err(
                "not starting postgres as a primary: the leader lock is not proven".into(),
            ));
        }
        let now = self.now_instant(ctx, host);
        self.ha.memory.primary_restart_since.get_or_insert(now);
        ctx.stats.primary_starts += 1;
        self.begin_start(ctx, host, true, None)
    }

    fn start_replica(&mut self, ctx: &mut Ctx, host: &mut Host, upstream: Option<usize>) -> Progress {
        self.ha.role = Role::Replica;
        self.ha.configured_upstream = upstream;
        // PostgreSQL is stopped: a past term has nothing left to fence, or its fence would stop
        // the replica about to start.
        if !host.pg.alive() && !ctx.variant.replica_start_keeps_old_fence {
            self.primary_gone(ctx, host);
        }
        self.begin_start(ctx, host, false, upstream)
    }

    /// `start_with`: the member key is published first (the leader creates our slot
    /// meanwhile), then postgres starts.
    fn begin_start(
        &mut self,
        ctx: &mut Ctx,
        host: &mut Host,
        primary: bool,
        upstream: Option<usize>,
    ) -> Progress {
        self.ha.state = PgState::Starting;
        self.loop_alive_for(ctx, host, PG_CTL_TIMEOUT + Self::retry(ctx));
        match self.send_member(ctx, host) {
            Some(call) => Progress::Wait(Job::Write {
                call,
                then: AfterWrite::Start { primary, upstream },
            }),
            None => self.spawn_pg(ctx, host, primary, upstream),
        }
    }

    /// `Postgres::start_announced`: a primary's postmaster is handed to the fences, and the
    /// permit asked, before postgres runs.
    fn spawn_pg(
        &mut self,
        ctx: &mut Ctx,
        host: &mut Host,
        primary: bool,
        upstream: Option<usize>,
    ) -> Progress {
        if primary && !ctx.variant.unannounced_start {
            self.set_postmaster(ctx, host, Some(host.pg.pid + 1));
            if !self.permits_primary(host, ctx.now) {
                self.ha.state = PgState::Stopped;
                return Progress::Done(Err(
                    "not starting postgres as a primary: the leader lock lapsed before it ran".into(),
                ));
            }
        }
        host.pg.start(primary, upstream);
        if primary {
            host.pg.permit = Some(self.inc);
        }
        let then = if primary {
            AfterPg::StartedPrimary
        } else {
            AfterPg::StartedReplica
        };
        Self::await_pg(ctx, host, ctx.plan.timings.start, then)
    }

    fn stop(&mut self, ctx: &mut Ctx, host: &mut Host, next: AfterStop) -> Progress {
        self.ha.state = PgState::Stopping;
        if !host.pg.alive() {
            return self.stopped(ctx, host, next);
        }
        host.pg.stop();
        Self::await_pg(ctx, host, ctx.plan.timings.stop, AfterPg::Stopped(next))
    }

    /// PostgreSQL's current step takes a draw from `took`; `pg_ctl` returns after it.
    fn await_pg(ctx: &mut Ctx, host: &Host, took: (Nanos, Nanos), then: AfterPg) -> Progress {
        let pg = host.pg.pid;
        let after = ctx.draw(took);
        let event = host.host_event(HostEvent::PgDone { pg });
        ctx.after(after, event);
        Progress::Wait(Job::Pg { pg, then })
    }

    fn stopped(&mut self, ctx: &mut Ctx, host: &mut Host, next: AfterStop) -> Progress {
        self.ha.state = PgState::Stopped;
        self.ha.status = None;
        match next {
            AfterStop::Demoted => {
                ctx.stats.demotions += 1;
                self.ha.role = Role::Demoted;
                self.ha.configured_upstream = None;
                Progress::Done(Ok(true))
            }
            AfterStop::Offline => {
                ctx.stats.demotions += 1;
                self.ha.role = Role::Demoted;
                self.start_replica(ctx, host, None)
            }
            AfterStop::Rewind { source, reinit } => self.rewind(ctx, source, reinit),
            AfterStop::Lapsed => Progress::Done(Err(
                "stopped postgres again: the leader lock lapsed while it started".into(),
            )),
        }
    }

    /// pg_rewind (or a new base backup) from `source`, PostgreSQL stopped first.
    fn rewind_from(&mut self, ctx: &mut Ctx, host: &mut Host, source: &str, reinit: bool) -> Progress {
        let Some(source) = node_of(source) else {
            return Progress::Done(Err(format!("no such member {source}")));
        };
        self.loop_alive_for(ctx, host, Duration::from_secs(3600) + Self::retry(ctx));
        if host.pg.alive() {
            self.stop(ctx, host, AfterStop::Rewind { source, reinit })
        } else {
            self.rewind(ctx, source, reinit)
        }
    }

    fn rewind(&mut self, ctx: &mut Ctx, source: usize, reinit: bool) -> Progress {
        let mut took = ctx.draw(ctx.plan.timings.rewind);
        if reinit {
            took *= 3;
        }
        self.job_timer(ctx, took);
        Progress::Wait(Job::Wait {
            then: AfterWait::Rewound { source, reinit },
        })
    }

    fn housekeeping(&mut self, ctx: &mut Ctx, host: &mut Host) -> Progress {
        self.ha.memory.primary_restart_since = None;
        self.ha.memory.start_failed = false;
        let (Some(st), Some(view)) = (
            self.ha.status,
            self.ha.cycle.as_ref().and_then(|c| c.view.as_ref()),
        ) else {
            return Progress::Done(Ok(false));
        };
        let status = StatusValue {
            optime: st.lsn,
            ..view.status.clone()
        };
        let history = (view.timeline() != st.timeline).then(|| {
            let entries: Vec<HistoryEntry> = host
                .pg
                .data
                .history
                .iter()
                .map(|(parent, switch)| HistoryEntry {
                    parent_timeline: *parent,
                    switch_lsn: *switch,
                    reason: "no recovery target specified".into(),
                    timestamp: None,
                    new_leader: None,
                })
                .collect();
            serde_json::to_string(&entries).expect("history serializes")
        });
        let request = Request::Put {
            key: ctx.keys.status(),
            value: serde_json::to_string(&status).expect("status serializes"),
            lease: 0,
        };
        let call = self.loop_call(ctx, host, Purpose::Write, request);
        Progress::Wait(Job::Write {
            call,
            then: AfterWrite::Status { history },
        })
    }

    // --- what jobs wait for ------------------------------------------------------------------

    pub fn job_event(&mut self, ctx: &mut Ctx, host: &mut Host, what: AgentEvent) {
        let Some(job) = self.ha.job.clone() else { return };
        if self.ha.phase != Phase::Acting {
            return;
        }
        let progress = match (job, what) {
            (Job::Lock { request, kind }, AgentEvent::LockReply { request: r, answer }) if r == request => {
                Progress::Done(match (kind, answer) {
                    (_, Ok(_)) => Ok(true),
                    (LockKind::Race, Err(e)) => Err(format!("acquiring the leader lock: {e}")),
                    (LockKind::Adopt, Err(e)) => Err(format!("adopting the leader key: {e}")),
                    (LockKind::Release, Err(e)) => Err(format!("releasing the leader lock: {e}")),
                })
            }
            (Job::Lock { .. }, AgentEvent::JobTimer { seq }) if seq == self.ha.job_seq => {
                self.wait_done(ctx, host, AfterWait::LockTimeout)
            }
            (Job::Wait { then }, AgentEvent::JobTimer { seq }) if seq == self.ha.job_seq => {
                self.wait_done(ctx, host, then)
            }
            (Job::Pg { pg, then }, AgentEvent::PgCtl { pg: p }) if p == pg => {
                self.pg_done(ctx, host, pg, then)
            }
            _ => return,
        };
        self.finish_job(ctx, host, progress);
    }

    fn pg_done(&mut self, ctx: &mut Ctx, host: &mut Host, pg: u64, then: AfterPg) -> Progress {
        let running = host.pg.pid == pg && host.pg.proc == Proc::Running;
        match then {
            AfterPg::StartedPrimary | AfterPg::StartedReplica if !running => {
                self.ha.state = PgState::StartFailed;
                self.ha.memory.start_failed = true;
                Progress::Done(Err("failed to start postgres".into()))
            }
            AfterPg::StartedPrimary => {
                self.set_postmaster(ctx, host, Some(pg));
                if !self.permits_primary(host, ctx.now) {
                    return self.stop(ctx, host, AfterStop::Lapsed);
                }
                self.ha.state = PgState::Running;
                self.ha.memory.start_failed = false;
                Progress::Done(Ok(true))
            }
            AfterPg::StartedReplica => {
                self.ha.state = PgState::Running;
                self.ha.memory.start_failed = false;
                Progress::Done(Ok(true))
            }
            AfterPg::Promoted if running && host.pg.data.primary => {
                ctx.stats.promotions += 1;
                self.ha.role = Role::Primary;
                self.ha.memory = Default::default();
                let took = ctx.draw(ctx.plan.timings.checkpoint);
                self.job_timer(ctx, took);
                Progress::Wait(Job::Wait {
                    then: AfterWait::Checkpoint,
                })
            }
            AfterPg::Promoted => Progress::Done(Err("promotion failed".into())),
            AfterPg::Stopped(next) if !host.pg.alive() => self.stopped(ctx, host, next),
            AfterPg::Stopped(_) => Progress::Done(Err("postgres did not stop".into())),
        }
    }

    fn wait_done(&mut self, ctx: &mut Ctx, host: &mut Host, then: AfterWait) -> Progress {
        match then {
            AfterWait::LockTimeout => Progress::Done(Err("the leader lock request timed out".into())),
            AfterWait::Checkpoint => {
                // The cycle's observation predates the promotion: observe again.
                if host.pg.writable() {
                    self.ha.status = Some(Status {
                        in_recovery: false,
                        timeline: host.pg.data.timeline,
                        lsn: host.pg.lsn(ctx.now),
                        streaming: false,
                    });
                }
                Progress::Done(Ok(true))
            }
            AfterWait::Rewound { source, reinit } => {
                let Some(Some((data, lsn))) = ctx.sources.get(source).cloned() else {
                    if !reinit {
                        self.ha.memory.rewind_failed = true;
                    }
                    return Progress::Done(Err(format!("pg_rewind from node{} failed", source + 1)));
                };
                host.pg.copy_from(&data, lsn);
                self.ha.control = None;
                self.ha.memory.rewind_failed = false;
                let leader = self
                    .ha
                    .cycle
                    .as_ref()
                    .and_then(|c| c.view.as_ref())
                    .and_then(|v| v.leader_name())
                    .and_then(node_of);
                self.start_replica(ctx, host, leader.or(Some(source)))
            }
        }
    }

    pub fn job_write_done(
        &mut self,
        ctx: &mut Ctx,
        host: &mut Host,
        call: CallId,
        response: Option<Response>,
    ) {
        let Some(Job::Write { call: c, then }) = self.ha.job.clone() else {
            return;
        };
        if c != call {
            return;
        }
        let ok = matches!(response, Some(Response::Put));
        let progress = match then {
            AfterWrite::Status { history: Some(value) } => {
                let request = Request::Put {
                    key: ctx.keys.history(),
                    value,
                    lease: 0,
                };
                let call = self.loop_call(ctx, host, Purpose::Write, request);
                Progress::Wait(Job::Write {
                    call,
                    then: AfterWrite::Done,
                })
            }
            AfterWrite::Status { history: None } | AfterWrite::Done => Progress::Done(Ok(false)),
            AfterWrite::Start { primary, upstream } => self.spawn_pg(ctx, host, primary, upstream),
            AfterWrite::Initialize if ok => Progress::Done(Ok(false)),
            AfterWrite::Initialize => Progress::Done(Err("writing the initialize key failed".into())),
        };
        self.finish_job(ctx, host, progress);
    }
}
