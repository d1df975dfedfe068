//! A deterministic simulation of pgvigil's leader lock (`docs/simulation.md`).
//!
//! Three hosts run the real [`pgvigil_lock::LockCore`], [`pgvigil_lock::Scheduler`] and
//! [`pgvigil_lock::LivenessTracker`] and the real [`pgvigil_engine::decide`], inside a model
//! of the agent's HA loop, against a fake etcd, a network that delays, loses and partitions,
//! clocks that drift, and PostgreSQL processes that take time to start, promote and stop. One
//! seed fixes everything: the settings, the timings, the faults, every message delay. No
//! threads, no sockets, no real time: a seed replays exactly.
//!
//! After every instant the checker ([`check`]) asserts that at most one host runs a writable
//! PostgreSQL, and at the end that a leader came back after the faults healed.

mod actions;
mod agent;
pub mod check;
mod ctx;
mod etcd;
mod event;
mod haloop;
mod node;
mod pg;
pub mod plan;
mod rng;
mod time;
mod world;

pub use check::Failure;
pub use ctx::{Stats, Variant};
pub use plan::{FaultMix, Plan};

/// How to run a seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub mix: FaultMix,
    pub variant: Variant,
    /// Keep the last lines of what happened, for a failure report.
    pub trace: bool,
}

/// What one seed did.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub stats: Stats,
    pub failure: Option<Failure>,
    /// Things the model did not expect (an engine decision it does not simulate).
    pub problems: Vec<String>,
    /// With `Options::trace`: the last lines before the end.
    pub trace: String,
    pub plan: Plan,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.failure.is_none() && self.problems.is_empty()
    }
}

/// Runs one seed to its end or its first failure.
pub fn run(seed: u64, options: &Options) -> Outcome {
    let plan = Plan::generate(seed, options.mix);
    let mut world = world::World::new(plan, options.variant, options.trace);
    world.run();
    Outcome {
        seed,
        stats: world.stats,
        failure: world.checker.failure.clone(),
        problems: world.problems.clone(),
        trace: world.trace.text(),
        plan: world.plan.clone(),
    }
}
