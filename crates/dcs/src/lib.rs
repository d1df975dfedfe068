//! The DCS (distributed configuration store) interface of pgvigil and its etcd v3 implementation.
//!
//! The key layout, values and atomic operations are Patroni's (`patroni-compat.md` §1), so Python
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

use std::time::{Duration, Instant};

use pgvigil_api::{ClusterView, FailoverValue, HistoryEntry, MemberData, StatusValue, SyncValue};
use serde_json::{Map, Value};

pub use error::DcsError;
pub use etcd::{Etcd3Dcs, EtcdOptions, EtcdTls};

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

/// Our etcd lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    /// The TTL it was granted with, in seconds (what the caller asked for).
    pub ttl: u64,
    /// When the grant or keep-alive request that last (re)established it was *sent*: etcd expires
    /// the lease no earlier than `sent_at + ttl`.
    pub sent_at: Instant,
}

impl LeaseInfo {
    /// The earliest instant at which etcd may expire the lease, unless it is kept alive again.
    pub fn expires_at(&self) -> Instant {
        self.sent_at + Duration::from_secs(self.ttl)
    }
}

/// The DCS operations of the HA agent (`patroni-compat.md` §1.5).
///
/// Errors: [`DcsError::Unavailable`] means the DCS could not be reached (or has no quorum)
/// within the deadline; the outcome of a write that failed that way is unknown.
#[async_trait::async_trait]
pub trait Dcs: Send + Sync + 'static {
    fn keys(&self) -> &pgvigil_api::Keys;

    /// Linearizable range read of the whole cluster prefix.
    async fn get_cluster(&self) -> Result<ClusterView, DcsError>;

    /// Change events on the prefix. A background watch task (started by the first call)
    /// reconnects with backoff and sends [`DcsEvent::WatchRestarted`] each time the watch is
    /// (re-)established, the first time included: callers should then re-read.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DcsEvent>;

    /// Keeps our lease alive, granting a new one (TTL = `ttl` seconds) if there is none, it
    /// expired, or `ttl` changed (the old lease is left to expire, not revoked: keys move to the
    /// new lease through [`Dcs::update_leader`] and [`Dcs::touch_member`]). Returns the lease and
    /// when the request that (re)established it was sent.
    async fn refresh_lease(&self, ttl: u64) -> Result<LeaseInfo, DcsError>;

    fn current_lease(&self) -> Option<LeaseInfo>;

    /// TXN compare `CREATE(leader) == 0` → `PUT leader=<name>` with our lease (granted first if
    /// we have none). `Ok(false)`: someone else holds it.
    async fn attempt_to_acquire_leader(&self) -> Result<bool, DcsError>;

    /// Ensures the leader key is ours and carries our current lease. Nothing is written when
    /// `cached_leader_lease` is our lease. Otherwise TXN `VALUE(leader) == name` → PUT with our
    /// lease, else nested `CREATE(leader) == 0` → PUT. `Ok(false)`: the key belongs to someone
    /// else. Does not keep the lease alive: call [`Dcs::refresh_lease`] first.
    async fn update_leader(&self, cached_leader_lease: Option<i64>) -> Result<bool, DcsError>;

    /// Unconditional `PUT leader=<name>` with our lease (end of bootstrap only).
    async fn take_leader(&self) -> Result<(), DcsError>;

    /// TXN `VALUE(leader) == name` → DELETE leader. `Ok(true)` if deleted.
    async fn delete_leader(&self) -> Result<bool, DcsError>;

    /// `PUT members/<name>` with our lease, skipped when value and lease are unchanged since our
    /// last successful write (and the key was not seen changed or deleted since).
    async fn touch_member(&self, data: &MemberData) -> Result<(), DcsError>;

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

    /// Revokes our lease (graceful shutdown, after the leader key was released): our member key
    /// disappears at once. Best effort: the local lease is forgotten even if the call fails.
    async fn revoke_lease(&self) -> Result<(), DcsError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dcs_is_object_safe_and_options_hide_the_password() {
        fn takes_dyn(_: Option<&dyn Dcs>) {}
        takes_dyn(None);
        let opts = EtcdOptions {
            password: Some("secret".into()),
            ..Default::default()
        };
        assert!(!format!("{opts:?}").contains("secret"));
    }

    #[test]
    fn lease_expiry_is_sent_at_plus_ttl() {
        let sent_at = Instant::now();
        let lease = LeaseInfo {
            id: 1,
            ttl: 30,
            sent_at,
        };
        assert_eq!(lease.expires_at(), sent_at + Duration::from_secs(30));
    }
}
