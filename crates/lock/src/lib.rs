//! The leader lock of pgvigil, without I/O.
//!
//! * [`clock`]: `CLOCK_BOOTTIME`, the one clock deadlines are measured on.
//! * [`term`]: the leader's side: which write and which lease carry the key, the fencing
//!   deadline they prove, and the timing argument that makes "a primary stops accepting writes
//!   before anyone else may take the lock" hold.
//! * [`liveness`]: a replica's side: how long a leader that promised the fast takeover has been
//!   silent, and when its key may be taken.
//! * [`heartbeat`]: the `heartbeat` key's value.
//! * [`schedule`]: the leader's driver without I/O: what to send to etcd when, and how each
//!   answer updates the [`LockCore`]; [`store`]: the words of those etcd operations.
//!
//! The agent's `leadership` module performs the I/O around these; the deterministic
//! simulation (`crates/sim`, `docs/simulation.md`) drives the same code through faults with
//! simulated time.

pub mod clock;
pub mod heartbeat;
pub mod liveness;
pub mod schedule;
pub mod store;
pub mod term;

pub use clock::BootInstant;
pub use heartbeat::HeartbeatValue;
pub use liveness::{KeyState, LivenessTracker, Silence};
pub use schedule::{LockSettings, Notice, Op, OpId, OpResult, RequestId, Scheduler, Step};
pub use store::{LeaderKey, TermOpening, Written};
pub use term::{LeaseRecord, LockCore, LockState, PendingStart, Term, TermEnd, TermStart, lease_margin};
