//! The HA decision engine.
//!
//! ```text
//!   etcd range read ──► ClusterView ─┐
//!   pg_controldata / monitoring SQL ─┼─► decide(&Inputs) ──► Decision { actions, message }
//!   peers' GET /patroni (if asked) ──┤                                 │
//!   config, Memory, now ─────────────┘                                 ▼
//!                                                          runtime performs the actions
//!                                                          (timeouts), feeds back Memory
//! ```
//!
//! [`decide`] never performs I/O and never reads a clock: everything it knows arrives in
//! [`Inputs`]. When it needs something the runtime has not gathered yet (the peers' status during
//! a leader race) it asks for it with [`Action::QueryPeers`] and is called again. After an action
//! that changes the cluster (taking the lock, promoting, starting PostgreSQL) the runtime runs
//! another cycle at once instead of waiting for the next tick.
//!
//! The rules follow Patroni's `Ha._run_cycle` (`docs/patroni-compat.md` §4.2-§4.7), restricted to
//! what pgvigil implements so far; each rule has a unit test in `tests.rs`.

mod actions;
mod decide;
mod divergence;
mod failover;
mod inputs;
pub mod operator;
mod race;
pub mod slots;
mod standby;
pub mod sync;

pub use actions::{Action, Decision, DemoteMode, StartAs};
pub use decide::decide;
pub use divergence::{Divergence, LocalEnd, divergence};
pub use inputs::{
    ControlInfo, ControlState, DataDir, EngineConfig, Inputs, LocalPg, LockState, Memory, Observed,
    OperatorRequest, PeerReport, ReplicaMethod, RestartRequest, Silence, StandbyCluster, SwitchoverStop,
};
pub use race::{RELEASE_BACKOFF, RaceVerdict, race_verdict};

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod failsafe_tests;
#[cfg(test)]
mod following_tests;
#[cfg(test)]
mod lock_tests;
#[cfg(test)]
mod logical_slots_tests;
#[cfg(test)]
mod nostream_tests;
#[cfg(test)]
mod operator_tests;
#[cfg(test)]
mod pause_tests;
#[cfg(test)]
mod pre_promote_tests;
#[cfg(test)]
mod properties;
#[cfg(test)]
mod slots_tests;
#[cfg(test)]
mod standby_tests;
#[cfg(test)]
mod sync_tests;
#[cfg(test)]
mod tests;
