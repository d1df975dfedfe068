//! What the REST API answers from: a snapshot the runtime publishes after every HA cycle and
//! whenever the local state changes. Health answers never wait on PostgreSQL or the DCS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil_api::rest::{PatroniInfo, StatusDocument};
use pgvigil_api::{ClusterView, PATRONI_COMPAT_VERSION};
use serde_json::{Map, Value};

/// Until when this node's leader lock is proven, as of now (the agent's `Leadership`).
pub trait LockProof: Send + Sync {
    fn held_until(&self) -> Option<Instant>;
}

/// A shared [`LockProof`] in the snapshot.
#[derive(Clone)]
pub struct LiveLock(pub Arc<dyn LockProof>);

impl std::fmt::Debug for LiveLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LiveLock").field(&self.0.held_until()).finish()
    }
}

/// The node as of the last refresh.
#[derive(Clone, Debug)]
pub struct NodeSnapshot {
    pub scope: String,
    pub name: String,
    /// The status document (`GET /patroni`, body of every health check) as of the last refresh.
    pub status: StatusDocument,
    /// The cached DCS view; `None` when older than `ttl` (stale) or never read.
    pub cluster: Option<ClusterView>,
    /// `is_leader = now < leader_until` as of the snapshot; see [`NodeSnapshot::live_lock`].
    pub leader_until: Option<Instant>,
    /// The leader lock's proof, asked at the moment of each request. With the fast takeover
    /// the proof moves with every heartbeat (0.5 s) and lasts a few seconds, while snapshots
    /// come once per HA cycle (`loop_wait`, 10 s by default): a snapshot's `leader_until`
    /// would run out between cycles and `/primary` would answer 503 from a healthy leader.
    pub live_lock: Option<LiveLock>,
    /// Scheduled start of the next HA cycle (`/liveness`).
    pub next_run: Instant,
    pub ttl: u64,
    pub loop_wait: u64,
    pub maximum_lag_on_failover: u64,
    /// Maintenance mode, as the HA loop sees it.
    pub paused: bool,
    /// Whether the dynamic configuration describes a standby cluster (`standby_cluster` set). The
    /// lock holder of a standby cluster is a standby leader: `/primary` answers 503 there.
    pub standby_cluster: bool,
    /// Effective tags (`noloadbalance`, `tag_<k>=<v>` filters, `failover_priority`).
    pub tags: Map<String, Value>,
    /// `latest_end_lsn` of the WAL receiver (replicas), used as a lower bound of the leader's
    /// position when the DCS `status` is older.
    pub wal_receiver_latest_end_lsn: Option<u64>,
    pub failsafe_mode_enabled: bool,
    pub failsafe_active: bool,
    /// The last known `failsafe` member map (kept when the DCS view goes stale); `GET /failsafe`
    /// and `patroni_failsafe_member`.
    pub failsafe_members: Option<Map<String, Value>>,
    /// A long operation the agent is performing (a restart, a reinitialize, ...): operator
    /// requests that conflict with it are refused with this reason instead of waiting.
    pub busy: Option<String>,
}

impl NodeSnapshot {
    /// The snapshot served before the first HA cycle: PostgreSQL `stopped`, role
    /// `uninitialized`, no DCS view, Patroni's default timings.
    pub fn initial(scope: &str, name: &str) -> Self {
        NodeSnapshot {
            scope: scope.to_string(),
            name: name.to_string(),
            status: StatusDocument {
                state: "stopped".into(),
                role: "uninitialized".into(),
                cluster_unlocked: Some(true),
                dcs_last_seen: Some(0),
                patroni: PatroniInfo {
                    version: PATRONI_COMPAT_VERSION.into(),
                    scope: scope.to_string(),
                    name: name.to_string(),
                },
                ..Default::default()
            },
            cluster: None,
            leader_until: None,
            live_lock: None,
            next_run: Instant::now(),
            ttl: 30,
            loop_wait: 10,
            maximum_lag_on_failover: 1_048_576,
            paused: false,
            standby_cluster: false,
            tags: Map::new(),
            wal_receiver_latest_end_lsn: None,
            failsafe_mode_enabled: false,
            failsafe_active: false,
            failsafe_members: None,
            busy: None,
        }
    }

    /// Whether this node holds the leader lock, proven past `now` (a local clock, not a DCS
    /// read): asked of the live proof when there is one, else as of the snapshot.
    pub fn is_leader(&self, now: Instant) -> bool {
        let until = match &self.live_lock {
            Some(live) => live.0.held_until(),
            None => self.leader_until,
        };
        until.is_some_and(|until| now < until)
    }

    /// `max(status.optime, wal receiver latest_end_lsn)`, with 0 for unknown parts.
    pub fn leader_optime(&self) -> u64 {
        let dcs = self.cluster.as_ref().map_or(0, |c| c.status.optime);
        dcs.max(self.wal_receiver_latest_end_lsn.unwrap_or(0))
    }

    /// The Patroni version to advertise (status document, `Server` header, metrics).
    pub fn version(&self) -> &str {
        if self.status.patroni.version.is_empty() {
            PATRONI_COMPAT_VERSION
        } else {
            &self.status.patroni.version
        }
    }

    /// The `ttl` as a duration.
    pub fn ttl_duration(&self) -> Duration {
        Duration::from_secs(self.ttl)
    }
}
