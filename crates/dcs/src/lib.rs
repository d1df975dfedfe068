//! The DCS (distributed configuration store) interface of pgvigil and its etcd v3 implementation.
//!
//! The key layout, values and atomic operations are Patroni's (`docs/patroni-compat.md` §1), so Python
//! Patroni nodes, `patronictl`, vip-manager and HAProxy/confd templates see the same data.
//!
//! * [`Dcs`]: the one interface the HA runtime talks to.
//! * [`Etcd3Dcs`]: the etcd v3 (native gRPC) implementation.
//!
//! Every operation is bounded by [`EtcdOptions::retry_timeout`]: within that deadline failed
//! attempts that did not reach an etcd leader (connection refused, no leader, attempt timeout)
//! are retried with backoff, then the operation fails with [`DcsError::Unavailable`]. One
//! attempt may take `retry_timeout / number of endpoints` (at least 1 s), so with a single
//! endpoint a hung etcd costs one attempt and a refused connection many quick ones. A write
//! retried after an attempt timed out may already have been applied: the leader race recognises
//! its own earlier success (the failure branch reads the key back); for compare-and-set writes a
//! retry can report a conflict for our own write, which callers handle like any conflict (re-read).

mod error;
mod etcd;
mod watch;

use pgvigil_api::{ClusterView, FailoverValue, HistoryEntry, MemberData, StatusValue, SyncValue};
use serde_json::{Map, Value};

pub use error::DcsError;
pub use etcd::{Etcd3Dcs, EtcdOptions, EtcdTls};
pub use pgvigil_lock::KeyState;
/// The words of the lock's operations live beside the scheduler that decides them.
pub use pgvigil_lock::{LeaderKey, TermOpening, Written};

/// What changed in the DCS, as seen by the watch (one event per changed key kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DcsEvent {
    /// `leader` was created, deleted, or changed value or lease.
    LeaderChanged,
    ConfigChanged,
    /// `status` (or the legacy `optime/leader`) changed.
    StatusChanged,
    /// A `members/<name>` key changed.
    MembersChanged,
    FailoverChanged,
    SyncChanged,
    /// Any other key below the prefix (`initialize`, `history`, `failsafe`, ...).
    Other,
    /// The watch was (re-)established after an error or at start: events may have been missed,
    /// re-read the cluster. Subscribers that see `RecvError::Lagged` should do the same.
    WatchRestarted,
}

/// A change of the leader or heartbeat key, with its value and revision, for a replica's
/// [`pgvigil_lock::LivenessTracker`]. Sent for every write of those keys, also for re-writes
/// of the same value (each heartbeat is one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockKeyEvent {
    Leader(KeyState),
    Heartbeat(KeyState),
}

/// The leader lock's etcd operations, used only by the agent's `Leadership` component. Each
/// is **one attempt** (bounded by the client's attempt timeout): the caller records the send
/// time before calling and decides about retries, so that a deadline is never computed from
/// an attempt other than the one that was answered. An `Err` from a write means its outcome is
/// unknown.
#[async_trait::async_trait]
pub trait LockStore: Send + Sync + 'static {
    /// Grants a lease of `ttl`; returns its id.
    async fn grant(&self, ttl: std::time::Duration) -> Result<i64, DcsError>;

    /// One keep-alive of `lease`: `Ok(true)` if etcd answered with TTL > 0, `Ok(false)` if it
    /// said the lease does not exist.
    async fn keep_alive(&self, lease: i64) -> Result<bool, DcsError>;

    async fn revoke(&self, lease: i64) -> Result<(), DcsError>;

    /// Puts `leader = <our name>` on `lease` under the condition of `how`, and in the same
    /// transaction puts `heartbeat` (on the same lease) or deletes it when `heartbeat` is
    /// `None`.
    async fn open_term(
        &self,
        how: TermOpening,
        lease: i64,
        heartbeat: Option<&str>,
    ) -> Result<Written, DcsError>;

    /// If the leader key is still at `term_revision`: puts `heartbeat` on `lease`, or with
    /// `None` writes nothing (a proof that the key is unchanged, for terms without a promise).
    async fn heartbeat(
        &self,
        term_revision: i64,
        lease: i64,
        heartbeat: Option<&str>,
    ) -> Result<Written, DcsError>;

    /// If the leader key is still at `term_revision`: deletes it and the heartbeat. `Ok(false)`
    /// if it had changed.
    async fn release(&self, term_revision: i64) -> Result<bool, DcsError>;

    /// Reads the leader key.
    async fn read_leader(&self) -> Result<Option<LeaderKey>, DcsError>;
}

/// The DCS operations of the HA agent (`docs/patroni-compat.md` §1.5).
///
/// Errors: [`DcsError::Unavailable`] means the DCS could not be reached (or has no quorum)
/// within the deadline; the outcome of a write that failed that way is unknown.
#[async_trait::async_trait]
pub trait Dcs: Send + Sync + 'static {
    fn keys(&self) -> &pgvigil_api::Keys;

    /// Linearizable range read of the whole cluster prefix.
    async fn get_cluster(&self) -> Result<ClusterView, DcsError>;

    /// One cheap linearizable read (a count of the prefix) on the endpoint in use, within
    /// `timeout`. An endpoint that does not answer in time is left for the next one, as any
    /// failed attempt does, and the watch follows. A replica calls it when the leader falls
    /// silent, so that its own etcd member dying with the leader's host costs `timeout`, not
    /// the attempt timeout of the read that takes over.
    async fn probe(&self, timeout: std::time::Duration) -> Result<(), DcsError>;

    /// Change events on the prefix. A background watch task (started by the first call)
    /// reconnects with backoff and sends [`DcsEvent::WatchRestarted`] each time the watch is
    /// (re-)established, the first time included: callers should then re-read.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DcsEvent>;

    /// Changes of the leader and heartbeat keys (started with the watch by [`Dcs::subscribe`]).
    fn subscribe_lock_keys(&self) -> tokio::sync::broadcast::Receiver<LockKeyEvent>;

    /// `PUT members/<name>` on `lease` (the agent's current lease, from its `Leadership`),
    /// skipped when value and lease are unchanged since our last successful write (and the key
    /// was not seen changed or deleted since).
    async fn touch_member(&self, data: &MemberData, lease: i64) -> Result<(), DcsError>;

    /// Bootstrap race: TXN `CREATE(initialize) == 0` → `PUT initialize=""` (no lease).
    /// `Ok(true)`: we won.
    async fn initialize_race(&self) -> Result<bool, DcsError>;

    /// Plain `PUT initialize=<sysid>`.
    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError>;

    /// `DELETE initialize`.
    async fn cancel_initialization(&self) -> Result<(), DcsError>;

    /// With `Some(rev)`: TXN `MOD(config) == rev` → PUT (`Ok(false)` on conflict; `Some(0)`
    /// means "only if absent"); `None`: plain PUT (`Ok(true)`).
    async fn set_config(&self, value: &Value, mod_revision: Option<i64>) -> Result<bool, DcsError>;

    /// Like [`Dcs::set_config`], for `failover`.
    async fn set_failover(&self, value: &FailoverValue, mod_revision: Option<i64>) -> Result<bool, DcsError>;

    /// Like [`Dcs::set_config`], for `sync`.
    async fn set_sync(&self, value: &SyncValue, mod_revision: Option<i64>) -> Result<bool, DcsError>;

    /// With `Some(rev)`: TXN `MOD(sync) == rev` → DELETE (`Ok(false)` on conflict); `None`:
    /// plain DELETE (`Ok(true)`).
    async fn delete_sync(&self, mod_revision: Option<i64>) -> Result<bool, DcsError>;

    /// Plain PUT of `history`, compact JSON.
    async fn set_history(&self, history: &[HistoryEntry]) -> Result<(), DcsError>;

    /// Plain PUT of `status`, skipped if unchanged since our last write.
    async fn set_status(&self, status: &StatusValue) -> Result<(), DcsError>;

    /// Plain PUT of `failsafe`, skipped if unchanged since our last write.
    async fn set_failsafe(&self, map: &Map<String, Value>) -> Result<(), DcsError>;

    /// Deletes the whole prefix (`patronictl remove`).
    async fn delete_cluster(&self) -> Result<(), DcsError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dcs_and_lock_store_are_object_safe_and_options_hide_the_password() {
        fn takes_dyn(_: Option<&dyn Dcs>, _: Option<&dyn LockStore>) {}
        takes_dyn(None, None);
        let opts = EtcdOptions {
            password: Some("secret".into()),
            ..Default::default()
        };
        assert!(!format!("{opts:?}").contains("secret"));
    }
}
