//! The vocabulary of the leader lock's etcd operations, shared by the scheduler (which decides
//! them), the etcd client (`pgvigil-dcs`, which performs them) and the simulation's fake etcd.

/// How a term-opening write finds the leader key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermOpening {
    /// The key must be absent (create-if-absent).
    Acquire,
    /// The key must still be at `leader_revision` and the heartbeat at `heartbeat_revision`
    /// (a silent leader that promised the fast takeover); the `config` key must still be at
    /// `config_revision` (0: absent), so that a pause written meanwhile stops the takeover.
    TakeOver {
        leader_revision: i64,
        heartbeat_revision: i64,
        config_revision: i64,
    },
    /// The key must still be at `leader_revision` and name us: our own term moving to another
    /// lease or promise, or a key from before an agent restart being adopted.
    Move { leader_revision: i64 },
}

impl TermOpening {
    /// The leader key revision the write replaces (0: it creates the key).
    pub fn replaces(self) -> i64 {
        match self {
            TermOpening::Acquire => 0,
            TermOpening::TakeOver { leader_revision, .. } | TermOpening::Move { leader_revision } => {
                leader_revision
            }
        }
    }
}

/// The answer to a term-opening write or a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Applied; the leader key is now at this `mod_revision` (for heartbeats: the revision of
    /// the heartbeat write, or 0 when nothing was written).
    Applied(i64),
    /// The compare failed; nothing was written.
    Refused,
}

/// The leader key as stored: value, lease, `mod_revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderKey {
    pub value: String,
    pub lease: i64,
    pub mod_revision: i64,
}
