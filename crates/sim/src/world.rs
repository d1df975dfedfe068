//! The simulated world: three hosts, the fake etcd, the network between them, the faults of
//! the plan, and the checker, driven event by event in real-time order.

use std::time::Instant;

use pgvigil_api::Keys;

use crate::agent::Agent;
use crate::check::Checker;
use crate::ctx::{Ctx, Stats, Trace, Variant, trace};
use crate::etcd::{Etcd, KeyNames, Request};
use crate::event::{AgentEvent, Event, Heal, HostEvent};
use crate::node::{Host, HostState};
use crate::pg::{Data, Proc, SYSID};
use crate::plan::{Fault, NODES, Plan, Target};
use crate::rng::Rng;
use crate::time::{HostClock, MS, Nanos, Queue, SEC};

pub struct Node {
    pub host: Host,
    pub agent: Option<Agent>,
}

pub struct World {
    pub now: Nanos,
    pub plan: Plan,
    variant: Variant,
    rng: Rng,
    queue: Queue<Event>,
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub trace: Trace,
    pub stats: Stats,
    ids: u64,
    epoch: Instant,
    keys: Keys,
    names: KeyNames,
    pub problems: Vec<String>,
    sources: Vec<Option<(Data, u64)>>,
    pub checker: Checker,
}

/// Builds the [`Ctx`] and splits the other fields, so both can be borrowed at once.
macro_rules! parts {
    ($w:expr) => {{
        let w = &mut *$w;
        let ctx = Ctx {
            now: w.now,
            queue: &mut w.queue,
            rng: &mut w.rng,
            plan: &w.plan,
            variant: w.variant,
            trace: &mut w.trace,
            stats: &mut w.stats,
            ids: &mut w.ids,
            epoch: w.epoch,
            keys: &w.keys,
            names: &w.names,
            problems: &mut w.problems,
            sources: &w.sources,
        };
        (ctx, &mut w.nodes, &mut w.etcd, &mut w.checker)
    }};
}

impl World {
    pub fn new(plan: Plan, variant: Variant, trace: bool) -> World {
        let mut rng = Rng::new(plan.seed ^ 0x005E_ED0F_D1CE);
        let keys = Keys::new("/service", "sim");
        let mut etcd = Etcd::new(keys.clone(), HostClock::new(0, 0, plan.etcd_ppm));
        // An initialized cluster without a leader: every member has a data directory.
        for (key, value) in [
            (keys.initialize(), SYSID.to_string()),
            (keys.config(), r#"{"ttl":30}"#.to_string()),
        ] {
            etcd.serve(Request::Put { key, value, lease: 0 }, 0);
        }
        etcd.take_changes();
        let nodes = (0..NODES)
            .map(|i| {
                let offset = rng.range(100 * SEC, 100_000 * SEC);
                Node {
                    host: Host::new(i, HostClock::new(0, offset, plan.clock_ppm[i])),
                    agent: None,
                }
            })
            .collect();
        let mut world = World {
            now: 0,
            variant,
            rng,
            queue: Queue::new(),
            etcd,
            nodes,
            trace: Trace::new(trace, 400),
            stats: Stats::default(),
            ids: 0,
            epoch: Instant::now(),
            names: KeyNames::new(&keys),
            keys,
            problems: Vec::new(),
            sources: vec![None; NODES],
            checker: Checker::default(),
            plan,
        };
        for i in 0..NODES {
            let at = world.plan.first_start[i];
            world.queue.push(
                at,
                Event::Heal {
                    node: i,
                    what: Heal::AgentStart,
                },
            );
        }
        for (at, fault) in world.plan.faults.clone() {
            world.queue.push(at, Event::Fault(fault));
        }
        world.queue.push(100 * MS, Event::EtcdTick);
        world
    }

    /// Runs to the end of the plan or the first failure.
    pub fn run(&mut self) {
        while let Some(at) = self.queue.peek_time() {
            if at > self.plan.end {
                break;
            }
            if at > self.now {
                // Nothing changes between events: checking once per instant covers all time.
                self.checker
                    .check(self.now, &self.nodes, &self.etcd, &self.plan, &mut self.stats);
                if self.checker.failure.is_some() || !self.problems.is_empty() {
                    return;
                }
                self.now = at;
            }
            let Some((_, event)) = self.queue.pop() else { break };
            self.stats.events += 1;
            self.dispatch(event);
        }
        self.checker
            .check(self.now, &self.nodes, &self.etcd, &self.plan, &mut self.stats);
        self.checker.finish(&self.plan, &self.nodes, self.now);
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::ToEtcd {
                node,
                agent,
                call,
                attempt,
                request,
            } => self.deliver_to_etcd(node, agent, call, attempt, request),
            Event::Agent { node, agent, what } => self.deliver_to_agent(node, agent, what),
            Event::Host { node, boot, what } => self.deliver_to_host(node, boot, what),
            Event::PeerQuery {
                from,
                from_agent,
                to,
                query,
            } => self.peer_query(from, from_agent, to, query),
            Event::Fault(fault) => self.fault(fault),
            Event::Heal { node, what } => self.heal(node, what),
            Event::EtcdTick => {
                self.etcd.expire(self.now);
                self.deliver_changes();
                self.queue.push(self.now + 500 * MS, Event::EtcdTick);
            }
            Event::EtcdLeader => {
                let ppm = self.rng.range(0, 400) as i64 - 200;
                self.etcd
                    .new_leader(self.now, HostClock::new(self.now, self.now, ppm));
                let (ctx, _, _, _) = parts!(self);
                trace!(ctx, "etcd: a new leader extends every lease");
            }
        }
    }

    fn deliver_to_etcd(&mut self, node: usize, agent: u64, call: u64, attempt: u32, request: Request) {
        if self.nodes[node].host.cut_from_etcd(self.now) {
            return;
        }
        let Some(response) = self.etcd.serve(request, self.now) else {
            return;
        };
        self.deliver_changes();
        let (mut ctx, nodes, _, _) = parts!(self);
        let slow = nodes[node].host.slow;
        if ctx.lost(slow) {
            return;
        }
        let delay = ctx.delay(slow);
        let event = Event::Agent {
            node,
            agent,
            what: AgentEvent::Response {
                call,
                attempt,
                response,
            },
        };
        ctx.after(delay, event);
    }

    /// Hands etcd's new changes to every agent's watch.
    fn deliver_changes(&mut self) {
        let changes = self.etcd.take_changes();
        if changes.is_empty() {
            return;
        }
        let (mut ctx, nodes, _, _) = parts!(self);
        for node in nodes.iter_mut() {
            if let Some(agent) = node.agent.as_mut() {
                for change in &changes {
                    agent.watch_change(&mut ctx, change.clone());
                }
            }
        }
    }

    /// Whether an event for this host must wait (`Some(held)`) or be dropped (`None` inside).
    fn hold(&mut self, node: usize, event: Event, agent_process: bool) -> Option<Event> {
        let now = self.now;
        let host = &mut self.nodes[node].host;
        match host.state {
            HostState::Dead => None,
            HostState::Stalled(_) => {
                host.held_host.push(event);
                None
            }
            HostState::Up if agent_process && now < host.agent_stalled_until => {
                host.held_agent.push(event);
                None
            }
            HostState::Up => Some(event),
        }
    }

    fn deliver_to_agent(&mut self, node: usize, agent: u64, what: AgentEvent) {
        if self.nodes[node].agent.as_ref().map(|a| a.inc) != Some(agent) {
            return;
        }
        let event = Event::Agent { node, agent, what };
        let Some(Event::Agent { what, .. }) = self.hold(node, event, true) else {
            return;
        };
        let host = &self.nodes[node].host;
        let lost = match &what {
            AgentEvent::Response { .. } => host.cut_from_etcd(self.now),
            AgentEvent::PeerAnswer { .. } => host.cut_from_peers(self.now),
            _ => false,
        };
        if lost {
            return;
        }
        self.replicate(node);
        if matches!(what, AgentEvent::JobTimer { .. }) {
            self.sources = self
                .nodes
                .iter()
                .map(|n| {
                    (n.host.is_running() && n.host.pg.proc == Proc::Running)
                        .then(|| (n.host.pg.data.clone(), n.host.pg.lsn(self.now)))
                })
                .collect();
        }
        let (mut ctx, nodes, _, _) = parts!(self);
        let Node { host, agent } = &mut nodes[node];
        if let Some(agent) = agent.as_mut() {
            agent.handle(&mut ctx, host, what);
        }
    }

    /// A replica takes its upstream's WAL and timeline when it can follow it.
    fn replicate(&mut self, node: usize) {
        let pg = &self.nodes[node].host.pg;
        let upstream = pg
            .upstream
            .filter(|u| *u != node && pg.proc == Proc::Running && !pg.data.primary);
        let source = upstream.and_then(|u| {
            let up = &self.nodes[u].host;
            (up.is_running() && up.pg.proc == Proc::Running && !up.cut_from_peers(self.now))
                .then(|| (up.pg.data.clone(), up.pg.lsn(self.now)))
        });
        let cut = self.nodes[node].host.cut_from_peers(self.now);
        let pg = &mut self.nodes[node].host.pg;
        match source {
            Some((data, lsn)) if !cut => {
                pg.follow(&data, lsn);
            }
            _ => pg.streaming = false,
        }
    }

    fn deliver_to_host(&mut self, node: usize, boot: u64, what: HostEvent) {
        if self.nodes[node].host.boot != boot {
            return;
        }
        // The agent's fence thread is frozen with the agent.
        let in_agent = match what {
            HostEvent::FenceTimer { fence, .. } => self.nodes[node]
                .host
                .fences
                .iter()
                .any(|f| f.id == fence && !f.process),
            _ => false,
        };
        let event = Event::Host { node, boot, what };
        if self.hold(node, event, in_agent).is_none() {
            return;
        }
        let (mut ctx, nodes, _, checker) = parts!(self);
        let Node { host, agent } = &mut nodes[node];
        let agent_inc = agent.as_ref().map(|a| a.inc);
        match what {
            HostEvent::PgDone { pg } if pg == host.pg.pid => {
                let was_alive = host.pg.alive();
                match host.pg.proc {
                    Proc::Starting { .. } => host.pg.started(ctx.now),
                    Proc::Promoting => host.pg.promoted(ctx.now),
                    Proc::Stopping => {
                        host.pg.exited(ctx.now, true);
                        host.pg_exited(&mut ctx);
                    }
                    Proc::Stopped | Proc::Running => return,
                }
                trace!(
                    ctx,
                    "{}: postgres {pg} is now {:?} (primary: {})",
                    host.name,
                    host.pg.proc,
                    host.pg.data.primary
                );
                if host.pg.writable() && host.pg.permit.is_none() {
                    checker.fail(
                        ctx.now,
                        format!("{} became a primary without a permit of its LockCore", host.name),
                    );
                }
                if let Some(inc) = agent_inc {
                    host.tell_agent_pg(&mut ctx, inc);
                    if was_alive != host.pg.alive() {
                        watcher(&mut ctx, node, inc);
                    }
                }
            }
            HostEvent::PgDone { .. } => {}
            HostEvent::FenceTimer { fence, seq } => host.fence_timer(&mut ctx, fence, seq),
            HostEvent::Kill { pg, fence } => {
                if host.kill_lands(&mut ctx, pg, fence) {
                    checker.fenced.push((ctx.now, node));
                    trace!(ctx, "{}: postgres {pg} stopped by fence {fence}", host.name);
                    if let Some(agent) = agent.as_mut() {
                        host.tell_agent_pg(&mut ctx, agent.inc);
                        watcher(&mut ctx, node, agent.inc);
                        // The fence thread wakes the HA loop after acting.
                        agent.wake_loop(&mut ctx);
                    }
                }
            }
        }
    }

    fn peer_query(&mut self, from: usize, from_agent: u64, to: usize, query: u64) {
        let event = Event::PeerQuery {
            from,
            from_agent,
            to,
            query,
        };
        if self.nodes[to].host.cut_from_peers(self.now) || self.hold(to, event, true).is_none() {
            return;
        }
        let status = self.nodes[to].agent.as_ref().and_then(Agent::status);
        let (mut ctx, nodes, _, _) = parts!(self);
        let slow = nodes[to].host.slow;
        if ctx.lost(slow) {
            return;
        }
        let delay = ctx.delay(slow);
        let event = Event::Agent {
            node: from,
            agent: from_agent,
            what: AgentEvent::PeerAnswer {
                query,
                status: status.map(Box::new),
            },
        };
        ctx.after(delay, event);
    }

    /// Which node a fault strikes.
    fn target(&mut self, target: Target) -> usize {
        match target {
            Target::Node(i) => i,
            Target::Leader => self
                .nodes
                .iter()
                .position(|n| n.host.writable())
                .or_else(|| {
                    let name = self.etcd.leader_name()?;
                    self.nodes.iter().position(|n| n.host.name == name)
                })
                .unwrap_or_else(|| self.rng.index(NODES)),
        }
    }

    fn fault(&mut self, fault: Fault) {
        self.stats.faults += 1;
        let now = self.now;
        let node = match fault {
            Fault::AgentStall { target, .. }
            | Fault::AgentCrash { target, .. }
            | Fault::HostDeath { target, .. }
            | Fault::HostStall { target, .. }
            | Fault::Partition { target, .. }
            | Fault::SlowLink { target, .. }
            | Fault::PgCrash { target } => self.target(target),
            Fault::EtcdOutage { .. } => 0,
        };
        let heal = |what| Event::Heal { node, what };
        let (mut ctx, nodes, etcd, _) = parts!(self);
        trace!(ctx, "FAULT {fault:?} on node{}", node + 1);
        let Node { host, agent } = &mut nodes[node];
        match fault {
            Fault::AgentStall { for_, .. } => {
                if let Some(a) = agent.as_ref().filter(|_| host.state != HostState::Dead) {
                    host.agent_stalled_until = host.agent_stalled_until.max(now + for_);
                    ctx.at(host.agent_stalled_until, heal(Heal::AgentResume { agent: a.inc }));
                }
            }
            Fault::AgentCrash { restart_after, .. } => {
                if let Some(a) = agent.take() {
                    host.orphan_fences(&mut ctx, a.inc);
                    host.held_agent.clear();
                    host.agent_stalled_until = 0;
                    ctx.after(restart_after, heal(Heal::AgentStart));
                }
            }
            Fault::HostDeath { reboot_after, .. } => {
                if host.state != HostState::Dead {
                    host.state = HostState::Dead;
                    *agent = None;
                    host.pg.host_died(now);
                    host.fences.clear();
                    host.held_agent.clear();
                    host.held_host.clear();
                    host.agent_stalled_until = 0;
                    ctx.after(reboot_after, heal(Heal::HostBoot));
                }
            }
            Fault::HostStall { for_, .. } => {
                if let HostState::Up | HostState::Stalled(_) = host.state {
                    let until = match host.state {
                        HostState::Stalled(u) => u.max(now + for_),
                        _ => now + for_,
                    };
                    host.state = HostState::Stalled(until);
                    ctx.at(until, heal(Heal::HostResume));
                }
            }
            Fault::Partition { for_, full, .. } => {
                if full {
                    host.cut_all_until = host.cut_all_until.max(now + for_);
                } else {
                    host.cut_etcd_until = host.cut_etcd_until.max(now + for_);
                }
                ctx.after(for_, heal(Heal::Link));
            }
            Fault::SlowLink {
                for_, loss, delay, ..
            } => {
                host.slow = Some(crate::ctx::Slow {
                    until: now + for_,
                    loss,
                    delay,
                });
                ctx.after(for_, heal(Heal::Link));
            }
            Fault::PgCrash { .. } => {
                if host.is_running() && host.pg.alive() {
                    host.pg.exited(now, false);
                    host.pg_exited(&mut ctx);
                    if let Some(a) = agent.as_ref() {
                        host.tell_agent_pg(&mut ctx, a.inc);
                        watcher(&mut ctx, node, a.inc);
                    }
                }
            }
            Fault::EtcdOutage { for_, new_leader } => {
                etcd.outage(now + for_);
                if new_leader {
                    ctx.after(for_, Event::EtcdLeader);
                }
            }
        }
    }

    fn heal(&mut self, node: usize, what: Heal) {
        let now = self.now;
        let (mut ctx, nodes, _, _) = parts!(self);
        let Node { host, agent } = &mut nodes[node];
        match what {
            Heal::AgentResume { agent: inc } => {
                if agent.as_ref().is_some_and(|a| a.inc == inc) && now >= host.agent_stalled_until {
                    trace!(ctx, "{}: agent resumes", host.name);
                    for event in std::mem::take(&mut host.held_agent) {
                        ctx.after(0, event);
                    }
                }
            }
            Heal::AgentStart => match host.state {
                HostState::Up if agent.is_none() => {
                    let mut a = Agent::start(&mut ctx, host);
                    a.start_cycle(&mut ctx, host);
                    *agent = Some(a);
                }
                HostState::Stalled(until) => ctx.at(until, Event::Heal { node, what }),
                _ => {}
            },
            Heal::HostBoot => {
                if host.state == HostState::Dead {
                    host.state = HostState::Up;
                    host.boot += 1;
                    let offset = ctx.draw((5 * SEC, 30 * SEC));
                    host.clock = HostClock::new(now, offset, host.clock.ppm());
                    trace!(ctx, "{}: boots", host.name);
                    let delay = ctx.draw((SEC, 5 * SEC));
                    ctx.after(
                        delay,
                        Event::Heal {
                            node,
                            what: Heal::AgentStart,
                        },
                    );
                }
            }
            Heal::HostResume => {
                if let HostState::Stalled(until) = host.state
                    && now >= until
                {
                    host.state = HostState::Up;
                    host.resumed_at = Some(now);
                    trace!(ctx, "{}: host resumes", host.name);
                    for event in std::mem::take(&mut host.held_host) {
                        ctx.after(0, event);
                    }
                }
            }
            Heal::Link => {
                if !host.cut_from_etcd(now)
                    && let Some(a) = agent.as_mut()
                {
                    a.reconnect_watch(&mut ctx);
                }
            }
        }
    }
}

/// The agent's postmaster watcher notices within its poll interval.
fn watcher(ctx: &mut Ctx, node: usize, agent: u64) {
    let delay = ctx.draw((0, ctx.plan.timings.watcher));
    ctx.after(
        delay,
        Event::Agent {
            node,
            agent,
            what: AgentEvent::PostmasterChanged,
        },
    );
}
