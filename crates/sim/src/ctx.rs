//! What every part of the simulation may use while handling one event: the clock of real
//! time, the queue, the random stream, the plan, and the run's trace and counters.

use std::collections::VecDeque;
use std::time::Instant;

use crate::event::Event;
use crate::plan::Plan;
use crate::rng::Rng;
use crate::time::{Nanos, Queue, secs_f};

/// Deliberate mistakes, to show that the checker catches them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Variant {
    /// The fences act this long after the deadline `LockCore` computed.
    pub fence_late: Nanos,
    /// The fences learn the postmaster of a primary being started only once the start
    /// returned (pgvigil before `Postgres::start_announced`).
    pub unannounced_start: bool,
    /// A replica starts while the fences still hold a past term's deadline (pgvigil before
    /// `start_replica` released it): the fence stops the replica, again and again.
    pub replica_start_keeps_old_fence: bool,
}

/// Counters over one run, summed over many by the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub acquired: u64,
    pub took_over: u64,
    pub promotions: u64,
    pub primary_starts: u64,
    pub fenced_by_agent: u64,
    pub fenced_by_fencer: u64,
    pub demotions: u64,
    pub faults: u64,
    /// Real time from the last fault healing to a leader, in ms.
    pub recovery_ms: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.events += o.events;
        self.acquired += o.acquired;
        self.took_over += o.took_over;
        self.promotions += o.promotions;
        self.primary_starts += o.primary_starts;
        self.fenced_by_agent += o.fenced_by_agent;
        self.fenced_by_fencer += o.fenced_by_fencer;
        self.demotions += o.demotions;
        self.faults += o.faults;
        self.recovery_ms = self.recovery_ms.max(o.recovery_ms);
    }
}

/// The last lines of what happened, kept only when asked for (a failing seed is run again
/// with it on).
pub struct Trace {
    pub on: bool,
    lines: VecDeque<String>,
    cap: usize,
}

impl Trace {
    pub fn new(on: bool, cap: usize) -> Trace {
        Trace {
            on,
            lines: VecDeque::new(),
            cap,
        }
    }

    pub fn push(&mut self, now: Nanos, line: String) {
        if self.lines.len() == self.cap {
            self.lines.pop_front();
        }
        self.lines.push_back(format!("{:>9.3} {line}", secs_f(now)));
    }

    pub fn text(&self) -> String {
        self.lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// Logs to the trace when it is on, without formatting anything otherwise.
macro_rules! trace {
    ($ctx:expr, $($arg:tt)*) => {
        if $ctx.trace.on {
            let line = format!($($arg)*);
            $ctx.trace.push($ctx.now, line);
        }
    };
}
pub(crate) use trace;

/// A host's link when it is degraded.
#[derive(Clone, Copy, Debug)]
pub struct Slow {
    pub until: Nanos,
    pub loss: f64,
    pub delay: Nanos,
}

pub struct Ctx<'a> {
    pub now: Nanos,
    pub queue: &'a mut Queue<Event>,
    pub rng: &'a mut Rng,
    pub plan: &'a Plan,
    pub variant: Variant,
    pub trace: &'a mut Trace,
    pub stats: &'a mut Stats,
    pub ids: &'a mut u64,
    /// The `Instant` the engine's clock starts from (it only takes differences).
    pub epoch: Instant,
    pub keys: &'a pgvigil_api::Keys,
    pub names: &'a crate::etcd::KeyNames,
    /// What the run found wrong with itself (not safety: the model or the engine surprised).
    pub problems: &'a mut Vec<String>,
    /// Each host's PostgreSQL data and position while it runs (a rewind's source).
    pub sources: &'a [Option<(crate::pg::Data, u64)>],
}

impl Ctx<'_> {
    pub fn at(&mut self, at: Nanos, event: Event) {
        self.queue.push(at.max(self.now), event);
    }

    pub fn after(&mut self, delay: Nanos, event: Event) {
        self.queue.push(self.now + delay, event);
    }

    pub fn id(&mut self) -> u64 {
        *self.ids += 1;
        *self.ids
    }

    pub fn draw(&mut self, range: (Nanos, Nanos)) -> Nanos {
        self.rng.range(range.0, range.1)
    }

    /// One message's one-way delay on a link that may be degraded.
    pub fn delay(&mut self, slow: Option<Slow>) -> Nanos {
        let net = &self.plan.net;
        let mut d = self.rng.range(net.delay.0, net.delay.1);
        if self.rng.chance(net.spike_chance) {
            d += self.rng.range(net.spike.0, net.spike.1);
        }
        if let Some(s) = slow.filter(|s| s.until > self.now) {
            d += self.rng.range(s.delay / 2, s.delay * 3 / 2);
        }
        d
    }

    pub fn lost(&mut self, slow: Option<Slow>) -> bool {
        let extra = slow.filter(|s| s.until > self.now).map_or(0.0, |s| s.loss);
        self.rng.chance(self.plan.net.loss + extra)
    }
}
