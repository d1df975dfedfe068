//! One simulated host: its clock, PostgreSQL, the fences (the agent's thread and the fencer
//! process), its links, and the agent (in [`crate::agent`]).

use pgvigil_lock::BootInstant;

use crate::ctx::{Ctx, Slow, trace};
use crate::event::{AgentEvent, Event, HostEvent};
use crate::pg::Pg;
use crate::time::{HostClock, Nanos};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostState {
    Up,
    /// Nothing on the host runs (its clock does) until this real time.
    Stalled(Nanos),
    Dead,
}

/// One of the two fences of an agent: its thread (`process: false`, frozen and killed with
/// the agent) or the `pgvigil fencer` process (survives it).
#[derive(Clone, Debug)]
pub struct Fence {
    pub id: u64,
    /// The agent incarnation that started it.
    pub owner: u64,
    pub process: bool,
    pub deadline: Option<BootInstant>,
    /// The postmaster it stops.
    pub postmaster: Option<u64>,
    /// Bumped by each new order: older timers are void.
    pub seq: u64,
    /// The agent is gone (the pipe closed): enforce the last order, then exit.
    pub orphan: bool,
}

impl Fence {
    fn armed(&self) -> Option<(BootInstant, u64)> {
        Some((self.deadline?, self.postmaster?))
    }
}

pub struct Host {
    pub idx: usize,
    pub name: String,
    /// Counts boots: events of an earlier boot are dropped.
    pub boot: u64,
    pub state: HostState,
    pub clock: HostClock,
    pub pg: Pg,
    pub fences: Vec<Fence>,
    /// The agent is frozen (SIGSTOP) until this real time.
    pub agent_stalled_until: Nanos,
    /// Events held while the agent (`agent`) or the whole host (`host`) is frozen.
    pub held_agent: Vec<Event>,
    pub held_host: Vec<Event>,
    pub cut_etcd_until: Nanos,
    pub cut_all_until: Nanos,
    pub slow: Option<Slow>,
    /// Incarnations of the agent started so far.
    pub agents: u64,
    /// When the host last resumed from a whole-host stall.
    pub resumed_at: Option<Nanos>,
}

impl Host {
    pub fn new(idx: usize, clock: HostClock) -> Host {
        Host {
            idx,
            name: format!("node{}", idx + 1),
            boot: 1,
            state: HostState::Up,
            clock,
            pg: Pg::new(),
            fences: Vec::new(),
            agent_stalled_until: 0,
            held_agent: Vec::new(),
            held_host: Vec::new(),
            cut_etcd_until: 0,
            cut_all_until: 0,
            slow: None,
            agents: 0,
            resumed_at: None,
        }
    }

    pub fn local(&self, now: Nanos) -> BootInstant {
        self.clock.read(now)
    }

    pub fn is_running(&self) -> bool {
        self.state == HostState::Up
    }

    pub fn cut_from_etcd(&self, now: Nanos) -> bool {
        now < self.cut_etcd_until || now < self.cut_all_until
    }

    pub fn cut_from_peers(&self, now: Nanos) -> bool {
        now < self.cut_all_until
    }

    /// PostgreSQL here accepts writes now.
    pub fn writable(&self) -> bool {
        self.is_running() && self.pg.writable()
    }

    pub fn host_event(&self, what: HostEvent) -> Event {
        Event::Host {
            node: self.idx,
            boot: self.boot,
            what,
        }
    }

    /// Starts the two fences of agent `owner`; the fencers of earlier agents stay.
    pub fn start_fences(&mut self, ctx: &mut Ctx, owner: u64) {
        for process in [false, true] {
            let id = ctx.id();
            self.fences.push(Fence {
                id,
                owner,
                process,
                deadline: None,
                postmaster: None,
                seq: 0,
                orphan: false,
            });
        }
    }

    /// The agent `owner` hands its fences a new order.
    pub fn order(
        &mut self,
        ctx: &mut Ctx,
        owner: u64,
        deadline: Option<BootInstant>,
        postmaster: Option<u64>,
    ) {
        let late = ctx.variant.fence_late;
        let mut timers = Vec::new();
        for f in self.fences.iter_mut().filter(|f| f.owner == owner && !f.orphan) {
            if (f.deadline, f.postmaster) == (deadline, postmaster) {
                continue;
            }
            f.deadline = deadline;
            f.postmaster = postmaster;
            f.seq += 1;
            if let Some((d, _)) = f.armed() {
                timers.push((self.clock.real_time_of(d) + late, f.id, f.seq));
            }
        }
        for (at, fence, seq) in timers {
            let event = self.host_event(HostEvent::FenceTimer { fence, seq });
            ctx.at(at, event);
        }
    }

    /// The agent `owner` died: its thread is gone, its fencer enforces the last order alone.
    pub fn orphan_fences(&mut self, ctx: &mut Ctx, owner: u64) {
        self.fences.retain(|f| f.owner != owner || f.process);
        for f in self.fences.iter_mut().filter(|f| f.owner == owner) {
            f.orphan = true;
        }
        self.reap_orphans(ctx);
    }

    /// An orphaned fencer exits once it has nothing left to stop.
    fn reap_orphans(&mut self, ctx: &mut Ctx) {
        let pg = &self.pg;
        self.fences.retain(|f| {
            let keep = !f.orphan || f.armed().is_some_and(|(_, p)| p == pg.pid && pg.alive());
            if !keep {
                trace!(ctx, "{}: orphaned fencer {} exits", self.name, f.id);
            }
            keep
        });
    }

    /// A new agent retires the fencers of earlier ones.
    pub fn retire_predecessors(&mut self, owner: u64) {
        self.fences.retain(|f| f.owner == owner);
    }

    /// A fence's timer fired: stop PostgreSQL if the deadline passed with it still running.
    pub fn fence_timer(&mut self, ctx: &mut Ctx, fence: u64, seq: u64) {
        let now_local = self.local(ctx.now);
        let Some(f) = self.fences.iter().find(|f| f.id == fence && f.seq == seq) else {
            return;
        };
        let Some((deadline, pg)) = f.armed() else { return };
        if now_local < deadline || pg != self.pg.pid || !self.pg.alive() {
            return;
        }
        trace!(
            ctx,
            "{}: fence {} ({}) stops postgres {pg}: deadline passed",
            self.name,
            f.id,
            if f.process { "fencer" } else { "agent thread" }
        );
        let latency = ctx.draw(ctx.plan.timings.kill);
        let event = self.host_event(HostEvent::Kill { pg, fence });
        ctx.after(latency, event);
    }

    /// A fence's stop lands. Returns whether PostgreSQL was stopped by it.
    pub fn kill_lands(&mut self, ctx: &mut Ctx, pg: u64, fence: u64) -> bool {
        if pg != self.pg.pid || !self.pg.alive() {
            return false;
        }
        self.pg.exited(ctx.now, false);
        let process = self.fences.iter().find(|f| f.id == fence).map(|f| f.process);
        match process {
            Some(true) => ctx.stats.fenced_by_fencer += 1,
            _ => ctx.stats.fenced_by_agent += 1,
        }
        // The fencer disarms after acting; an orphan then exits.
        if let Some(f) = self.fences.iter_mut().find(|f| f.id == fence && f.process) {
            f.deadline = None;
        }
        self.reap_orphans(ctx);
        true
    }

    /// PostgreSQL exited (stop, kill, crash): the orphaned fencers have nothing left to do.
    pub fn pg_exited(&mut self, ctx: &mut Ctx) {
        self.reap_orphans(ctx);
    }

    /// The agent's `pg_ctl` returns after `PostgreSQL` finished a step (or died).
    pub fn tell_agent_pg(&self, ctx: &mut Ctx, agent: u64) {
        let latency = ctx.draw(ctx.plan.timings.pg_ctl);
        let event = Event::Agent {
            node: self.idx,
            agent,
            what: AgentEvent::PgCtl { pg: self.pg.pid },
        };
        ctx.after(latency, event);
    }
}
