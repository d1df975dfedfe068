//! Everything the engine may look at. The runtime builds these from I/O; tests build them by hand.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgvigil_api::ClusterView;
use pgvigil_api::rest::StatusDocument;
pub use pgvigil_lock::{LockState, Silence};
use serde_json::{Map, Value};

/// One decision's worth of facts.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    pub now: Instant,
    pub config: &'a EngineConfig,
    /// The cluster as last read from the DCS, `None` when the read failed (DCS unreachable).
    /// Its `leader` is what etcd held at the read; whether *we* hold the lock is [`Inputs::lock`].
    pub cluster: Option<&'a ClusterView>,
    /// The leader lock as this node's `Leadership` holds it: held (proven for some time
    /// ahead), unproven (the key names us but nothing proves it yet), lapsed, or not held.
    pub lock: LockState,
    /// The current leader promised the fast takeover and has been silent this long (this
    /// node's liveness tracker). `None`: no such leader.
    pub silence: Option<&'a Silence>,
    /// Failsafe mode: a leader that confirmed itself to this node over `POST /failsafe` within
    /// `ttl`; with the leader key gone, the node follows it instead of racing.
    pub failsafe_leader: Option<&'a str>,
    /// `watchdog.mode: required` and the watchdog cannot be activated: this node must not act
    /// as primary.
    pub watchdog_failed: bool,
    /// The PostgreSQL configuration this node would write differs from what PostgreSQL runs
    /// with (dynamic configuration, local reload, synchronous standbys).
    pub config_pending: bool,
    /// The operator request waiting in the agent's queue (`POST /restart`, `POST /reinitialize`),
    /// if any.
    pub request: Option<&'a OperatorRequest>,
    pub pg: &'a LocalPg,
    pub memory: &'a Memory,
    /// The other members' answers to `GET <api_url>`, present only when the engine asked for
    /// them with [`crate::Action::QueryPeers`] in this cycle.
    pub peers: Option<&'a [PeerReport]>,
    /// Seconds until the pending failover's `scheduled_at` (negative: in the past), as the
    /// runtime computed it from the wall clock; `None` when nothing is scheduled.
    pub failover_due_in: Option<f64>,
}

/// The settings the rules depend on: the node's own identity plus the effective dynamic
/// configuration (after the `loop_wait + 2*retry_timeout <= ttl` adjustment).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub name: String,
    /// Published tags of this node (`nofailover`, `failover_priority`, `clonefrom`, ...).
    pub tags: Map<String, Value>,
    pub ttl: Duration,
    pub loop_wait: Duration,
    /// Bytes a replica may be behind `status.optime` and still race for the lock.
    pub maximum_lag_on_failover: u64,
    /// How long a crashed primary holding the lock may take to come back before it gives the
    /// lock up (0 = fail over at once).
    pub primary_start_timeout: Duration,
    pub check_timeline: bool,
    pub use_pg_rewind: bool,
    /// Whether this node has a `bootstrap` section, i.e. may initialize a new cluster.
    pub can_bootstrap: bool,
    /// `postgresql.create_replica_methods` in order (`basebackup` when the list is empty), each
    /// with its `no_leader` flag (`docs/patroni-compat.md` §5.4).
    pub replica_methods: Vec<ReplicaMethod>,
    pub synchronous_mode: crate::sync::SyncMode,
    /// Maintenance mode as last read from the DCS; it still holds while the DCS is unreachable.
    pub paused: bool,
    /// `failsafe_mode` (`docs/patroni-compat.md` §4.10): only members of a non-empty `failsafe` key
    /// may race.
    pub failsafe_mode: bool,
    /// Replicas may take the key from a leader that promised the fast takeover once it has
    /// been silent for its promise plus [`EngineConfig::takeover_margin`].
    pub fast_takeover: bool,
    pub takeover_margin: Duration,
    /// `use_slots`, `member_slots_ttl`, the permanent slots and `ignore_slots` (§5.8).
    pub slots: crate::slots::SlotsConfig,
    /// An active `standby_cluster` section (§4.11): the lock holder is a standby leader that
    /// follows the remote primary and never promotes.
    pub standby_cluster: Option<StandbyCluster>,
}

/// What the engine needs of `standby_cluster` (`docs/patroni-compat.md` §4.11).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StandbyCluster {
    /// `host:port` of the remote primary; `None`: archive recovery only (`restore_command`).
    pub remote: Option<(String, u16)>,
    /// `standby_cluster.create_replica_methods` for the standby leader's bootstrap from the
    /// remote (`basebackup` when empty).
    pub replica_methods: Vec<String>,
}

impl StandbyCluster {
    /// The methods to create the standby leader's data directory from the remote with.
    pub fn bootstrap_methods(&self) -> Vec<String> {
        if self.replica_methods.is_empty() {
            vec!["basebackup".into()]
        } else {
            self.replica_methods.clone()
        }
    }
}

/// One replica creation method as the engine needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaMethod {
    pub name: String,
    /// The method can create a replica without a member to clone from (a restore from a
    /// backup); never true for `basebackup`.
    pub no_leader: bool,
}

impl ReplicaMethod {
    pub fn basebackup() -> Self {
        ReplicaMethod {
            name: "basebackup".into(),
            no_leader: false,
        }
    }
}

impl EngineConfig {
    /// The methods to try, in order, to create a replica from `source` (`from_leader`: only
    /// `basebackup`, as `POST /reinitialize` with `from_leader` asks), or without any source
    /// (only `no_leader` methods; empty when there are none).
    pub fn replica_plan(&self, has_source: bool, from_leader: bool) -> Vec<String> {
        if from_leader {
            return vec!["basebackup".into()];
        }
        if !has_source {
            return self
                .replica_methods
                .iter()
                .filter(|m| m.no_leader && m.name != "basebackup")
                .map(|m| m.name.clone())
                .collect();
        }
        if self.replica_methods.is_empty() {
            return vec!["basebackup".into()];
        }
        self.replica_methods.iter().map(|m| m.name.clone()).collect()
    }

    pub fn nofailover(&self) -> bool {
        pgvigil_api::values::failover_priority(&self.tags) <= 0
    }

    pub fn failover_priority(&self) -> i64 {
        pgvigil_api::values::failover_priority(&self.tags)
    }

    pub fn nostream(&self) -> bool {
        pgvigil_api::values::tag_is_true(self.tags.get("nostream"))
    }

    pub fn replicatefrom(&self) -> Option<&str> {
        self.tags
            .get("replicatefrom")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// The local PostgreSQL as the runtime observed it this cycle.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalPg {
    pub data: DataDir,
    /// A postmaster is alive for this data directory (from `postmaster.pid`, no SQL).
    pub postmaster_alive: bool,
    /// The monitoring query's answer; `None` when PostgreSQL is down, still starting, or did
    /// not answer in time.
    pub observed: Option<Observed>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DataDir {
    /// Missing or empty: the node must bootstrap or clone.
    Empty,
    /// Unusable (no PG_VERSION but files present, unreadable control file, ...).
    Invalid(String),
    Initialized(ControlInfo),
}

/// What `pg_controldata` says; read whenever PostgreSQL is not running.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlInfo {
    pub sysid: String,
    pub state: ControlState,
    pub checkpoint_lsn: u64,
    pub checkpoint_timeline: u64,
    /// `Minimum recovery ending location` and its timeline (meaningful after a recovery stop).
    pub min_recovery_lsn: u64,
    pub min_recovery_timeline: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlState {
    /// `in production`: a primary that is running or crashed.
    InProduction,
    /// `shut down`: a primary stopped cleanly.
    ShutDown,
    /// `shut down in recovery`: a replica stopped cleanly.
    ShutDownInRecovery,
    InArchiveRecovery,
    InCrashRecovery,
    ShuttingDown,
    Other,
}

impl ControlState {
    /// The data directory was last a primary (not a replica in recovery).
    pub fn was_primary(self) -> bool {
        matches!(
            self,
            ControlState::InProduction | ControlState::ShutDown | ControlState::ShuttingDown
        )
    }
}

/// The answer of the per-cycle monitoring query.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub in_recovery: bool,
    pub sysid: String,
    /// Primary: current timeline; replica: the timeline it replays/receives.
    pub timeline: u64,
    /// Primary: flush position; replica: max(receive, replay).
    pub wal_position: u64,
    /// The WAL receiver is streaming.
    pub streaming: bool,
    /// `host:port` of the upstream in the active `primary_conninfo`, if any.
    pub upstream: Option<(String, u16)>,
    /// `server_version_num` (150010 for 15.10).
    pub server_version: u32,
    /// Some setting changed that needs a restart (`pg_settings.pending_restart`).
    pub pending_restart: bool,
    /// The replication slots this node has (`pg_replication_slots`, without temporary ones).
    pub slots: Vec<crate::slots::LocalSlot>,
}

/// A request an operator made through the REST API, waiting in the agent's queue. The engine
/// decides what happens with it like with everything else that changes PostgreSQL.
#[derive(Clone, Debug, PartialEq)]
pub enum OperatorRequest {
    Restart(RestartRequest),
    /// `POST /reinitialize`: wipe and clone again, from the leader or (Patroni's
    /// `from_leader: false`) from a `clonefrom` replica if one runs.
    Reinitialize {
        from_leader: bool,
    },
}

/// `POST /restart` (now or scheduled), with Patroni's filters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestartRequest {
    /// Restart only a member in this role (`primary`/`master`, `replica`, `standby_leader`).
    pub role: Option<String>,
    /// Restart only if the running server is older than this version (`15.10`, `150010`).
    pub postgres_version: Option<String>,
    /// Restart only if a setting is pending a restart.
    pub restart_pending: bool,
    /// Seconds the start may take (Patroni's `timeout`); `None`: `primary_start_timeout`.
    pub timeout: Option<u64>,
    /// Scheduled for a time that has not come yet.
    pub not_yet_due: bool,
    /// Scheduled, and PostgreSQL was restarted by other means since: the request is void.
    pub overtaken: bool,
}

/// Facts the runtime remembers across cycles on the engine's behalf.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// When the runtime last (re)started PostgreSQL as a primary while holding the lock after a
    /// crash; bounds the in-place restart by `primary_start_timeout`.
    pub primary_restart_since: Option<Instant>,
    /// The last attempt to start PostgreSQL failed.
    pub start_failed: bool,
    /// A rewind against the current leader failed; the next step is a re-clone.
    pub rewind_failed: bool,
    /// Failsafe mode (§4.10): the DCS is unreachable, and every member of the last `failsafe`
    /// key accepted this primary's `POST /failsafe` in this cycle, so it may go on.
    pub failsafe_confirmed: bool,
    /// A planned switchover stopped this leader's PostgreSQL; the lock goes once a candidate
    /// has the shutdown checkpoint.
    pub switchover: Option<SwitchoverStop>,
    /// When this node last let the leader key go on purpose (after a crash, a failed or slow
    /// start, a switchover): it stays out of the race for [`crate::RELEASE_BACKOFF`].
    pub released_lock_at: Option<Instant>,
    /// When the `pre_promote` script last refused (or failed to run) a promotion of this node:
    /// for `ttl` after it the node gives the lock up and stays out of the leader race
    /// (`docs/patroni-compat.md` §5.6).
    pub pre_promote_failed_at: Option<Instant>,
    /// PostgreSQL runs as a replica started from a data directory that was a primary on this
    /// timeline: it may hold a history of its own on that timeline (`divergence.rs`), which
    /// its timeline as a replica does not show. Kept until the next start, clone or promotion;
    /// once the replica moves on to a newer timeline the fact no longer matters. (A walreceiver
    /// that connects is no proof: on a forked history it connects, streams, and the startup
    /// process rejects the records.)
    pub former_primary_timeline: Option<u64>,
    /// As the leader: when it last saw each member slot it retains (`status.retain_slots`,
    /// §5.8). `None` when it was not the leader in its last cycle.
    pub retained_slots_seen: Option<BTreeMap<String, Instant>>,
}

/// The state of a planned switchover between stopping the old primary and releasing the lock.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchoverStop {
    /// When PostgreSQL was stopped.
    pub since: Instant,
    /// The start of the shutdown checkpoint record: a candidate past it has every commit.
    pub shutdown_lsn: u64,
    /// The members the request allows to take over.
    pub candidates: Vec<String>,
}

/// One peer's answer during the leader race.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerReport {
    pub name: String,
    /// `None` when the peer did not answer within the timeout or sent something unreadable.
    pub status: Option<StatusDocument>,
}
