//! Types shared by the agent, the CLI and the tests.
//!
//! Everything that crosses a process boundary lives here: the etcd key layout and the JSON values
//! stored under it (Patroni's format, `docs/patroni-compat.md` §1), the parsed [`ClusterView`], and the
//! REST API documents (§2). Keeping one definition means the agent, `pgvigilctl` and the
//! integration tests cannot drift apart.

pub mod cluster;
pub mod keys;
pub mod lsn;
pub mod rest;
pub mod slots;
pub mod state;
pub mod values;

pub use cluster::{ClusterView, Leader, Member, Versioned};
pub use keys::Keys;
pub use state::{PgState, Role};
pub use values::{FailoverValue, HistoryEntry, MemberData, StatusValue, SyncValue};

/// The version advertised in member keys. Python Patroni peers parse it as a tuple of integers
/// and change behaviour below certain versions (`docs/patroni-compat.md` §1.8), so it must look like a
/// current Patroni release rather than pgvigil's own version.
pub const PATRONI_COMPAT_VERSION: &str = "4.1.5";
