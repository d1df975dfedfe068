//! State shared by the listeners, the connections, the etcd watcher and the stats server.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use pgvigil_config::RouterConfig;
use tokio_util::sync::CancellationToken;

use crate::pgproto::{CANNOT_CONNECT_NOW, Refusal};
use crate::topology::{Route, Settings, Topology};

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    Primary = 0,
    Replicas = 1,
}

impl Port {
    pub fn name(self) -> &'static str {
        match self {
            Port::Primary => "primary",
            Port::Replicas => "replicas",
        }
    }
}

/// What the router knows about the cluster right now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The topology of the last successful read, if any.
    pub topology: Option<Arc<Topology>>,
    /// When etcd last answered.
    pub synced_at: Option<Instant>,
    pub synced_wall: Option<SystemTime>,
    /// Since when reads fail (none while etcd answers).
    pub failing_since: Option<Instant>,
    pub failing_since_wall: Option<SystemTime>,
    pub last_error: Option<String>,
    /// etcd has not answered for longer than `stale_topology_timeout`: the last topology is no
    /// longer used for new connections.
    pub expired: bool,
    /// When the etcd watch was last (re-)established.
    pub watch_since: Option<SystemTime>,
}

impl Snapshot {
    /// Whether connections on `route` may stay open. An etcd outage never closes connections:
    /// only a topology that was read and no longer has the route does.
    pub fn keeps(&self, route: &Route) -> bool {
        match &self.topology {
            Some(t) if !self.expired => t.keeps(route),
            _ => true,
        }
    }

    /// The topology to route new connections by, or why there is none.
    pub fn usable(&self, scope: &str, stale_timeout: Duration) -> Result<&Arc<Topology>, Refusal> {
        match &self.topology {
            None => Err(Refusal {
                sqlstate: CANNOT_CONNECT_NOW,
                message: format!("pgvigil router: the topology of cluster {scope} is not known yet"),
                detail: Some(match &self.last_error {
                    Some(e) => format!("the router could not read the cluster from etcd yet: {e}"),
                    None => "the router has not read the cluster from etcd yet".to_string(),
                }),
                hint: Some("retry in a few seconds".to_string()),
            }),
            Some(_) if self.expired => {
                let for_secs = self.synced_at.map_or(0, |s| s.elapsed().as_secs());
                Err(Refusal {
                    sqlstate: CANNOT_CONNECT_NOW,
                    message: format!(
                        "pgvigil router: the topology of cluster {scope} is unknown: etcd has not answered for {for_secs} s"
                    ),
                    detail: self.last_error.clone(),
                    hint: Some(format!(
                        "the router routes by its last known topology for router.stale_topology_timeout ({} s) only",
                        stale_timeout.as_secs()
                    )),
                })
            }
            Some(t) => Ok(t),
        }
    }
}

/// Counters of one member.
#[derive(Default, Debug)]
pub struct MemberCounters {
    pub active: [AtomicU64; 2],
    pub total: [AtomicU64; 2],
    /// Bytes from clients to this server.
    pub bytes_to_server: AtomicU64,
    /// Bytes from this server to clients.
    pub bytes_to_client: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Connections the router closed because their route became invalid.
    pub closed_by_router: AtomicU64,
}

impl MemberCounters {
    pub fn active_total(&self) -> u64 {
        self.active.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
}

/// Router-wide counters and change history.
#[derive(Debug)]
pub struct Stats {
    pub started: SystemTime,
    pub members: Mutex<BTreeMap<String, Arc<MemberCounters>>>,
    pub accepted: [AtomicU64; 2],
    pub active: [AtomicU64; 2],
    /// (port, reason) → count.
    pub refused: Mutex<BTreeMap<(Port, &'static str), u64>>,
    pub leader_changes: AtomicU64,
    /// The primary (member name) as last published, and when that changed.
    pub primary: Mutex<(Option<String>, Option<SystemTime>)>,
    /// member → (what it looked like, when that last changed).
    pub member_changes: Mutex<HashMap<String, (String, SystemTime)>>,
    /// When the last reload happened and how it went.
    pub last_reload: Mutex<Option<(SystemTime, Result<(), String>)>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: SystemTime::now(),
            members: Default::default(),
            accepted: Default::default(),
            active: Default::default(),
            refused: Default::default(),
            leader_changes: Default::default(),
            primary: Default::default(),
            member_changes: Default::default(),
            last_reload: Default::default(),
        }
    }
}

impl Stats {
    pub fn member(&self, name: &str) -> Arc<MemberCounters> {
        let mut members = lock(&self.members);
        if let Some(c) = members.get(name) {
            return c.clone();
        }
        let c = Arc::new(MemberCounters::default());
        members.insert(name.to_string(), c.clone());
        c
    }

    pub fn refused(&self, port: Port, reason: &'static str) {
        *lock(&self.refused).entry((port, reason)).or_default() += 1;
    }

    /// Records member and leader changes of a new topology (for "last change" on the stats
    /// page). Returns the previous primary when it changed.
    pub fn observe(&self, topology: &Topology) {
        let now = SystemTime::now();
        let mut changes = lock(&self.member_changes);
        for m in &topology.members {
            let signature = format!(
                "{}|{}|{}|{}|{:?}",
                m.role, m.state, m.is_leader, m.routing, m.replication_state
            );
            match changes.get_mut(&m.name) {
                Some((old, at)) if *old != signature => {
                    *old = signature;
                    *at = now;
                }
                Some(_) => {}
                None => {
                    changes.insert(m.name.clone(), (signature, now));
                }
            }
        }
        drop(changes);
        let primary = topology.primary.as_ref().map(|p| p.member.clone());
        let mut current = lock(&self.primary);
        if current.0 != primary || current.1.is_none() {
            if current.1.is_some() && primary.is_some() {
                self.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            *current = (primary, Some(now));
        }
    }
}

/// Locks a mutex, ignoring poisoning (the data are counters and caches).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything shared.
pub struct Shared {
    pub config: RwLock<(String, RouterConfig)>,
    snapshot: RwLock<Arc<Snapshot>>,
    routes: Mutex<HashMap<Route, CancellationToken>>,
    pub stats: Stats,
    pub round_robin: AtomicU64,
    /// Cancelled to close every client connection (end of the shutdown grace period).
    pub close_all: CancellationToken,
    /// Wakes the etcd watcher (after a reload).
    pub nudge: tokio::sync::Notify,
}

impl Shared {
    pub fn new(scope: String, config: RouterConfig) -> Arc<Shared> {
        Arc::new(Shared {
            config: RwLock::new((scope, config)),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            routes: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            round_robin: AtomicU64::new(0),
            close_all: CancellationToken::new(),
            nudge: tokio::sync::Notify::new(),
        })
    }

    pub fn scope(&self) -> String {
        self.config.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    pub fn router_config(&self) -> RouterConfig {
        self.config.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    pub fn settings(&self) -> Settings {
        let cfg = self.router_config();
        Settings {
            max_replica_lag: cfg.max_replica_lag,
            primary_serves_reads_fallback: cfg.primary_serves_reads_fallback,
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `snapshot` current, then closes the connections of every route it does not keep.
    ///
    /// The snapshot is replaced before the route table is locked, and [`Shared::register`]
    /// checks the current snapshot with the table locked: a connection either sees the new
    /// snapshot and is refused its stale route, or registers before the sweep and is closed by
    /// it.
    pub fn publish(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snapshot.clone();
        let mut routes = lock(&self.routes);
        routes.retain(|route, token| {
            let keep = snapshot.keeps(route);
            if !keep {
                let b = route.backend();
                let active = self.stats.member(&b.member).active_total();
                if active > 0 {
                    tracing::info!(
                        member = %b.member,
                        address = %b.address(),
                        "closing the connections on {route:?}: the topology changed"
                    );
                }
                token.cancel();
            }
            keep
        });
    }

    /// How many routes have connections registered (for tests).
    #[cfg(test)]
    pub(crate) fn registered_routes(&self) -> usize {
        lock(&self.routes).len()
    }

    /// The cancellation token of `route` for a new connection, if the current snapshot still
    /// routes there.
    pub fn register(&self, route: &Route) -> Option<CancellationToken> {
        let mut routes = lock(&self.routes);
        let snapshot = self.snapshot();
        let stale = self.router_config().stale_topology_timeout;
        let topology = snapshot.usable("", Duration::from_secs(stale)).ok()?;
        let valid = match route {
            Route::Primary(b) => topology.primary.as_ref() == Some(b),
            Route::Replica(_) | Route::ReadsOnPrimary(_) => topology.read_routes().contains(route),
        };
        if !valid {
            return None;
        }
        Some(routes.entry(route.clone()).or_default().clone())
    }
}
