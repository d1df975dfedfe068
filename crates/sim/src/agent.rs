//! One incarnation of the pgvigil agent on a simulated host: the leadership driver (the real
//! [`Scheduler`] and [`LockCore`]), the liveness tracker, the watch, the network calls, and
//! the HA loop ([`crate::haloop`]). Every decision is the real code's; this file only does
//! the I/O the agent's `leadership` module does, against simulated etcd and time.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use pgvigil_api::Role;
use pgvigil_api::rest::StatusDocument;
use pgvigil_lock::schedule::{ATTEMPT_TIMEOUT, PRIMARY_SLACK};
use pgvigil_lock::{
    BootInstant, KeyState, LivenessTracker, LockCore, LockSettings, Notice, Op, OpId, OpResult, Scheduler,
    Step, TermStart,
};

use crate::ctx::{Ctx, trace};
use crate::etcd::{Change, Request, Response};
use crate::event::{AgentEvent, CallId, Event};
use crate::haloop::HaLoop;
use crate::node::Host;
use crate::time::{MS, Nanos, SEC, nanos};

/// The leadership driver's attempt timeout.
const LOCK_ATTEMPT: Nanos = ATTEMPT_TIMEOUT.as_nanos() as Nanos;

/// Who waits for a network call.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// The scheduler's op.
    Lock(OpId),
    /// The HA loop's read of the cluster.
    Read,
    /// The HA loop's writes (member key, status, history, initialize).
    Write,
}

#[derive(Clone, Debug)]
struct Call {
    purpose: Purpose,
    request: Request,
    attempt: u32,
    started: Nanos,
    attempt_timeout: Nanos,
    /// The caller gives up after this long in all.
    budget: Nanos,
}

pub struct Agent {
    pub inc: u64,
    pub node: usize,
    pub name: String,
    pub core: LockCore,
    pub sched: Scheduler,
    pub tracker: LivenessTracker,
    pub settings: LockSettings,
    pub loop_alive_until: BootInstant,
    /// The postmaster the fences are told about.
    pub postmaster: Option<u64>,
    calls: BTreeMap<CallId, Call>,
    /// The earliest driver timer pending (polls are idempotent: an early one only looks).
    driver_timer: Nanos,
    /// Watch events on their way, with when they arrive.
    watch: VecDeque<(Nanos, Change)>,
    watch_last: Nanos,
    pub ha: HaLoop,
}

impl Agent {
    pub fn start(ctx: &mut Ctx, host: &mut Host) -> Agent {
        host.agents += 1;
        let inc = host.agents;
        let now = host.local(ctx.now);
        let ttl = ctx.plan.settings.ttl;
        host.start_fences(ctx, inc);
        trace!(ctx, "{}: agent {inc} starts", host.name);
        Agent {
            inc,
            node: host.idx,
            name: host.name.clone(),
            core: LockCore::new(),
            sched: Scheduler::new(&host.name, now),
            tracker: LivenessTracker::new(),
            settings: LockSettings {
                ttl,
                ..LockSettings::default()
            },
            loop_alive_until: now + Duration::from_secs(60),
            postmaster: None,
            calls: BTreeMap::new(),
            driver_timer: Nanos::MAX,
            watch: VecDeque::new(),
            watch_last: 0,
            ha: HaLoop::new(now),
        }
    }

    pub fn event(&self, what: AgentEvent) -> Event {
        Event::Agent {
            node: self.node,
            agent: self.inc,
            what,
        }
    }

    pub fn handle(&mut self, ctx: &mut Ctx, host: &mut Host, what: AgentEvent) {
        match what {
            AgentEvent::Response {
                call,
                attempt,
                response,
            } => self.response(ctx, host, call, attempt, Some(response)),
            AgentEvent::CallTimeout { call, attempt } => self.response(ctx, host, call, attempt, None),
            AgentEvent::WatchPump => self.pump_watch(ctx, host),
            AgentEvent::DriverWake => {
                if ctx.now >= self.driver_timer {
                    self.driver_timer = Nanos::MAX;
                }
                self.driver_poll(ctx, host);
            }
            other => self.loop_event(ctx, host, other),
        }
    }

    // --- the leadership driver --------------------------------------------------------------

    /// `Scheduler::poll`, the ops it starts, and the timer for the next poll.
    pub fn driver_poll(&mut self, ctx: &mut Ctx, host: &mut Host) {
        let now = host.local(ctx.now);
        let alive = now < self.loop_alive_until;
        let step = self.sched.poll(&mut self.core, now, &self.settings, alive);
        self.perform(ctx, host, step);
        let at = host.clock.real_time_of(self.sched.next_wakeup()).max(ctx.now);
        if at < self.driver_timer {
            self.driver_timer = at;
            let event = self.event(AgentEvent::DriverWake);
            ctx.at(at, event);
        }
    }

    fn perform(&mut self, ctx: &mut Ctx, host: &mut Host, step: Step) {
        for (id, op) in step.ops {
            let request = match op {
                Op::Grant { ttl } => Request::Grant { ttl },
                Op::KeepAlive { lease } => Request::KeepAlive { lease },
                Op::Heartbeat { term, lease, value } => Request::Heartbeat { term, lease, value },
                Op::Open {
                    how,
                    lease,
                    heartbeat,
                } => Request::OpenTerm {
                    how,
                    lease,
                    name: self.name.clone(),
                    heartbeat,
                },
                Op::Release { term } => Request::Release { term },
                Op::ReadLeader => Request::ReadLeader,
                Op::Revoke { lease } => Request::Revoke { lease },
                // Failsafe mode is not simulated: a round nobody confirms.
                Op::Failsafe => {
                    let now = host.local(ctx.now);
                    let step = self.sched.on_result(
                        &mut self.core,
                        id,
                        OpResult::Failsafe(false),
                        now,
                        &self.settings,
                    );
                    self.perform(ctx, host, step);
                    continue;
                }
            };
            self.call(ctx, host, Purpose::Lock(id), request, LOCK_ATTEMPT, LOCK_ATTEMPT);
        }
        for notice in step.notices {
            match notice {
                // To the HA loop's task, as the oneshot channel does.
                Notice::Reply { request, answer } => {
                    let event = self.event(AgentEvent::LockReply { request, answer });
                    ctx.after(0, event);
                }
                Notice::WakeLoop => self.wake_loop(ctx),
                Notice::TermOpened { how, revision, .. } => {
                    match how {
                        TermStart::Acquired => ctx.stats.acquired += 1,
                        TermStart::TookOver => ctx.stats.took_over += 1,
                        TermStart::Moved => {}
                    }
                    trace!(
                        ctx,
                        "{}: {how:?} the leader key at revision {revision}", self.name
                    );
                    host.retire_predecessors(self.inc);
                }
                // Accepted proofs are the steady state: not worth a trace line each.
                Notice::Proved => {}
                other => trace!(ctx, "{}: leadership: {other:?}", self.name),
            }
        }
    }

    fn lock_result(
        &mut self,
        ctx: &mut Ctx,
        host: &mut Host,
        id: OpId,
        request: &Request,
        response: Option<Response>,
    ) {
        let result = match (request, response) {
            (Request::Grant { .. }, Some(Response::Granted(lease))) => OpResult::Grant(Ok(lease)),
            (Request::Grant { .. }, other) => OpResult::Grant(Err(error(other))),
            (Request::KeepAlive { .. }, Some(Response::KeepAlive(alive))) => OpResult::KeepAlive(Ok(alive)),
            (Request::KeepAlive { .. }, other) => OpResult::KeepAlive(Err(error(other))),
            (Request::Heartbeat { .. } | Request::OpenTerm { .. }, Some(Response::Written(w))) => {
                OpResult::Written(Ok(w))
            }
            (Request::Heartbeat { .. } | Request::OpenTerm { .. }, other) => {
                OpResult::Written(Err(error(other)))
            }
            (Request::Release { .. }, Some(Response::Released(done))) => OpResult::Released(Ok(done)),
            (Request::Release { .. }, other) => OpResult::Released(Err(error(other))),
            (Request::ReadLeader, Some(Response::Leader(key))) => OpResult::Read(Ok(key)),
            (Request::ReadLeader, other) => OpResult::Read(Err(error(other))),
            _ => OpResult::Revoked,
        };
        let now = host.local(ctx.now);
        let step = self
            .sched
            .on_result(&mut self.core, id, result, now, &self.settings);
        self.perform(ctx, host, step);
        self.publish(ctx, host);
        // The answer may make something due at once (a move, a read, the next heartbeat).
        self.driver_poll(ctx, host);
    }

    /// Hands the fence deadline and the postmaster to both fences.
    pub fn publish(&self, ctx: &mut Ctx, host: &mut Host) {
        host.order(ctx, self.inc, self.core.fence_deadline(), self.postmaster);
    }

    /// `Leadership::loop_alive_for`: the HA loop reports again within `within`.
    pub fn loop_alive_for(&mut self, ctx: &mut Ctx, host: &mut Host, within: Duration) {
        self.loop_alive_until = host.local(ctx.now) + within;
        self.driver_poll(ctx, host);
    }

    pub fn set_postmaster(&mut self, ctx: &mut Ctx, host: &mut Host, pg: Option<u64>) {
        if self.postmaster != pg {
            self.postmaster = pg;
            self.publish(ctx, host);
        }
    }

    /// `Leadership::permits_primary`.
    pub fn permits_primary(&self, host: &Host, now: Nanos) -> bool {
        self.core.permits_primary(host.local(now), PRIMARY_SLACK)
    }

    /// `Leadership::primary_gone`.
    pub fn primary_gone(&mut self, ctx: &mut Ctx, host: &mut Host) {
        if self.core.ended().is_some() {
            self.core.primary_gone();
            self.publish(ctx, host);
        }
        host.retire_predecessors(self.inc);
    }

    // --- network calls --------------------------------------------------------------------

    /// Sends `request` to etcd; `attempt_timeout` per attempt, retried until `budget`.
    pub fn call(
        &mut self,
        ctx: &mut Ctx,
        host: &Host,
        purpose: Purpose,
        request: Request,
        attempt_timeout: Nanos,
        budget: Nanos,
    ) -> CallId {
        let id = ctx.id();
        let call = Call {
            purpose,
            request,
            attempt: 0,
            started: ctx.now,
            attempt_timeout,
            budget,
        };
        self.calls.insert(id, call);
        self.send(ctx, host, id);
        id
    }

    fn send(&mut self, ctx: &mut Ctx, host: &Host, id: CallId) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        call.attempt += 1;
        let (attempt, timeout) = (call.attempt, call.attempt_timeout);
        let request = call.request.clone();
        let event = self.event(AgentEvent::CallTimeout { call: id, attempt });
        ctx.after(timeout, event);
        if host.cut_from_etcd(ctx.now) || ctx.lost(host.slow) {
            return;
        }
        let delay = ctx.delay(host.slow);
        let event = Event::ToEtcd {
            node: self.node,
            agent: self.inc,
            call: id,
            attempt,
            request,
        };
        ctx.after(delay, event);
    }

    /// An answer (`Some`) or a timeout (`None`) of one attempt.
    fn response(
        &mut self,
        ctx: &mut Ctx,
        host: &mut Host,
        id: CallId,
        attempt: u32,
        response: Option<Response>,
    ) {
        let Some(call) = self.calls.get(&id) else { return };
        if call.attempt != attempt {
            return;
        }
        let retry = response.is_none() && ctx.now + call.attempt_timeout <= call.started + call.budget;
        if retry {
            self.send(ctx, host, id);
            return;
        }
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        match call.purpose {
            Purpose::Lock(op) => self.lock_result(ctx, host, op, &call.request, response),
            Purpose::Read | Purpose::Write => self.loop_response(ctx, host, id, response),
        }
    }

    // --- the watch ---------------------------------------------------------------------------

    /// A change committed now reaches this agent's watch after a delay, in order.
    pub fn watch_change(&mut self, ctx: &mut Ctx, change: Change) {
        let delay = ctx.draw(ctx.plan.net.watch_delay) + ctx.draw(ctx.plan.net.delay);
        let at = (ctx.now + delay).max(self.watch_last);
        self.watch_last = at;
        self.watch.push_back((at, change));
        let event = self.event(AgentEvent::WatchPump);
        ctx.at(at, event);
    }

    /// Delivers what has arrived, unless the host is cut off (then the stream resumes, from
    /// the last revision it delivered, once the link heals).
    fn pump_watch(&mut self, ctx: &mut Ctx, host: &mut Host) {
        if host.cut_from_etcd(ctx.now) {
            return;
        }
        let now = host.local(ctx.now);
        while self.watch.front().is_some_and(|(at, _)| *at <= ctx.now) {
            let Some((_, change)) = self.watch.pop_front() else {
                break;
            };
            let state = KeyState {
                value: change.value.clone(),
                revision: change.revision,
            };
            if change.key == ctx.names.leader {
                self.tracker.observe_leader(state, now);
                self.wake_loop(ctx);
            } else if change.key == ctx.names.heartbeat {
                self.tracker.observe_heartbeat(state, now);
            } else if change.key == ctx.names.config {
                self.wake_loop(ctx);
            }
        }
    }

    /// The link healed: the watch catches up after reconnecting.
    pub fn reconnect_watch(&mut self, ctx: &mut Ctx) {
        let at = ctx.now + 50 * MS;
        self.watch_last = self.watch_last.max(at);
        let event = self.event(AgentEvent::WatchPump);
        ctx.at(at, event);
    }

    /// The REST API's `GET /patroni`: the snapshot of the last cycle.
    pub fn status(&self) -> Option<StatusDocument> {
        self.ha.snapshot.clone()
    }

    pub fn role(&self) -> Role {
        self.ha.role()
    }

    pub fn holds_lock(&self, host: &Host, now: Nanos) -> bool {
        self.core.lock_state(host.local(now), false).is_held()
    }

    pub fn stall_allowance(ctx: &Ctx) -> Duration {
        let s = &ctx.plan.settings;
        s.retry_timeout * 2 + s.loop_wait
    }

    /// The HA loop's etcd calls: attempts of a third of `retry_timeout` (at least 1 s, one
    /// per endpoint), retried until `retry_timeout`.
    pub fn loop_call(&mut self, ctx: &mut Ctx, host: &Host, purpose: Purpose, request: Request) -> CallId {
        let retry = nanos(ctx.plan.settings.retry_timeout);
        let attempt = (retry / 3).max(SEC).min(retry);
        self.call(ctx, host, purpose, request, attempt, retry)
    }
}

fn error(response: Option<Response>) -> String {
    match response {
        Some(Response::Error(e)) => e,
        Some(other) => format!("unexpected answer {other:?}"),
        None => "timed out".into(),
    }
}
