//! Where connections go, computed from one read of the cluster's etcd keys. Pure: no I/O, no
//! clock.
//!
//! * Port 5000 (primary): the member holding the leader key, if its member key says it is a
//!   `running` `primary` and has a usable `conn_url`. Nothing else: a leader that is still
//!   promoting, a demoted one, or a member claiming to be primary without the key gets nothing.
//! * Port 5001 (replicas): members other than the leader whose member key says `role: replica`,
//!   `state: running`, `replication_state: streaming`, without the `noloadbalance` tag, and
//!   whose replay position is within `max_replica_lag` bytes of the leader's position.
//!   Optionally the primary when no replica qualifies.
//!
//! Connections are tied to a [`Route`]; when a new topology no longer [`Topology::keeps`] a
//! route, the router closes every connection on it (the leader changed, the member left, a
//! replica was promoted).

use pgvigil_api::{ClusterView, Member, PgState, Role};
use serde::Serialize;

/// The routing settings of `router:` that shape the topology.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Replicas further behind (bytes) get no new read-only connections; `None`: no limit.
    pub max_replica_lag: Option<u64>,
    /// Read-only connections go to the primary when no replica qualifies.
    pub primary_serves_reads_fallback: bool,
}

/// A PostgreSQL server to forward to, from a member's `conn_url`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Backend {
    pub member: String,
    pub host: String,
    pub port: u16,
}

impl Backend {
    /// `host:port` (IPv6 hosts bracketed) for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What a client connection is attached to. Connections on a route are closed together when the
/// route stops being valid.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Port 5000 to the primary.
    Primary(Backend),
    /// Port 5001 to a replica.
    Replica(Backend),
    /// Port 5001 to the primary (`primary_serves_reads_fallback`).
    ReadsOnPrimary(Backend),
}

impl Route {
    pub fn backend(&self) -> &Backend {
        match self {
            Route::Primary(b) | Route::Replica(b) | Route::ReadsOnPrimary(b) => b,
        }
    }
}

/// One member as the stats page shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemberView {
    pub name: String,
    /// The role from the member key (`primary`, `replica`, ...), `leader` appended for the lock
    /// holder is not done here: see `is_leader`.
    pub role: String,
    pub state: String,
    pub is_leader: bool,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub replication_state: Option<String>,
    pub timeline: Option<u64>,
    /// Bytes behind the leader (replicas), when known.
    pub lag: Option<u64>,
    pub noloadbalance: bool,
    /// `primary`, `replica`, `primary (also reads)` or `excluded: <why>`.
    pub routing: String,
}

/// The routing decision for one cluster view.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub scope: String,
    /// etcd revision of the read.
    pub revision: i64,
    /// The leader key's value, if any.
    pub leader: Option<String>,
    /// Where port 5000 goes.
    pub primary: Option<Backend>,
    /// Why there is no primary (empty when there is one).
    pub no_primary_reason: String,
    /// Where port 5001 goes, in member-name order.
    pub replicas: Vec<Backend>,
    /// Port 5001 uses the primary because no replica qualifies.
    pub reads_on_primary: bool,
    /// Why no replica qualifies (empty when one does).
    pub no_replica_reason: String,
    /// The leader's WAL position used for lag (max of `status.optime` and its member key).
    pub leader_position: u64,
    pub members: Vec<MemberView>,
}

fn backend_of(m: &Member) -> Option<Backend> {
    let (host, port) = m.data.host_port()?;
    (!host.is_empty()).then(|| Backend {
        member: m.name.clone(),
        host,
        port,
    })
}

/// Human-readable byte counts: `512 B`, `16.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl Topology {
    pub fn compute(scope: &str, view: &ClusterView, settings: &Settings) -> Topology {
        let leader = view.leader_name().map(str::to_string);
        let leader_member = view.leader_member();
        let leader_position = view
            .status
            .optime
            .max(leader_member.and_then(|m| m.data.xlog_location).unwrap_or(0));

        let (primary, no_primary_reason) = match (&leader, leader_member) {
            (None, _) => (None, "no member holds the leader key ".to_string()),
            (Some(name), None) => (None, format!("the leader {name} has no member key")),
            (Some(name), Some(m)) => {
                let role = m.data.role();
                let state = m.data.state();
                if role != Some(Role::Primary) || state != PgState::Running {
                    let reason = format!(
                        "the leader {name} is not a running primary (its member key says role {:?}, state {:?})",
                        m.data.role, m.data.state
                    );
                    (None, reason)
                } else {
                    match backend_of(m) {
                        Some(b) => (Some(b), String::new()),
                        None => (
                            None,
                            format!("the leader {name} has no usable conn_url ({:?})", m.data.conn_url),
                        ),
                    }
                }
            }
        };

        let mut replicas = Vec::new();
        let mut members = Vec::new();
        let mut excluded = Vec::new();
        for m in &view.members {
            let is_leader = leader.as_deref() == Some(m.name.as_str());
            let position = m.data.replay_lsn.or(m.data.xlog_location);
            let lag = match position {
                Some(p) if !is_leader => Some(leader_position.saturating_sub(p)),
                _ => None,
            };
            let noloadbalance = m.data.tag_bool("noloadbalance");
            let backend = backend_of(m);
            let exclusion: Option<String> = if is_leader {
                None
            } else if m.data.role() != Some(Role::Replica) {
                Some(format!("role {}", m.data.role))
            } else if m.data.state() != PgState::Running {
                Some(format!("state {}", m.data.state))
            } else if m.data.replication_state.as_deref() != Some("streaming") {
                Some(format!(
                    "not streaming ({})",
                    m.data
                        .replication_state
                        .as_deref()
                        .unwrap_or("no replication state")
                ))
            } else if noloadbalance {
                Some("noloadbalance".to_string())
            } else if let (Some(limit), lag) = (settings.max_replica_lag, lag) {
                match lag {
                    None => Some("lag unknown".to_string()),
                    Some(l) if l > limit => Some(format!(
                        "lag {} > max_replica_lag {}",
                        human_bytes(l),
                        human_bytes(limit)
                    )),
                    Some(_) => None,
                }
            } else {
                None
            };
            let exclusion =
                exclusion.or_else(|| (backend.is_none()).then(|| "no usable conn_url".to_string()));
            let routing = if is_leader {
                if primary.as_ref().is_some_and(|p| p.member == m.name) {
                    "primary".to_string()
                } else {
                    "excluded: leader, but not a running primary".to_string()
                }
            } else {
                match (&exclusion, backend) {
                    (None, Some(b)) => {
                        replicas.push(b);
                        "replica".to_string()
                    }
                    (Some(why), _) => {
                        excluded.push(format!("{} ({why})", m.name));
                        format!("excluded: {why}")
                    }
                    (None, None) => unreachable!("a missing backend is an exclusion"),
                }
            };
            members.push(MemberView {
                name: m.name.clone(),
                role: m.data.role.clone(),
                state: m.data.state.clone(),
                is_leader,
                host: m.data.host_port().map(|(h, _)| h),
                port: m.data.host_port().map(|(_, p)| p),
                replication_state: m.data.replication_state.clone(),
                timeline: m.data.timeline,
                lag,
                noloadbalance,
                routing,
            });
        }
        let reads_on_primary =
            replicas.is_empty() && settings.primary_serves_reads_fallback && primary.is_some();
        if reads_on_primary
            && let Some(p) = &primary
            && let Some(mv) = members.iter_mut().find(|mv| mv.name == p.member)
        {
            mv.routing = "primary (also reads: no replica qualifies)".to_string();
        }
        let no_replica_reason = if !replicas.is_empty() {
            String::new()
        } else {
            let limit = settings.max_replica_lag.map_or_else(
                || "no lag limit".to_string(),
                |l| format!("max_replica_lag {}", human_bytes(l)),
            );
            let mut reason = format!("no running, streaming replica without noloadbalance within {limit}");
            if !excluded.is_empty() {
                reason.push_str(&format!("; excluded: {}", excluded.join(", ")));
            }
            reason
        };
        Topology {
            scope: scope.to_string(),
            revision: view.revision,
            leader,
            primary,
            no_primary_reason,
            replicas,
            reads_on_primary,
            no_replica_reason,
            leader_position,
            members,
        }
    }

    /// Whether connections on `route` may stay open under this topology.
    ///
    /// A replica route stays valid while the member is a non-leader replica at the same
    /// address, even if it is momentarily lagging or excluded: only new connections avoid it.
    pub fn keeps(&self, route: &Route) -> bool {
        match route {
            Route::Primary(b) | Route::ReadsOnPrimary(b) => self.primary.as_ref() == Some(b),
            Route::Replica(b) => self.members.iter().any(|m| {
                m.name == b.member
                    && !m.is_leader
                    && Role::parse(&m.role) == Some(Role::Replica)
                    && m.host.as_deref() == Some(b.host.as_str())
                    && m.port == Some(b.port)
            }),
        }
    }

    /// The routes new read-only connections may use, round-robin order: the replicas, or the
    /// primary as a fallback.
    pub fn read_routes(&self) -> Vec<Route> {
        if !self.replicas.is_empty() {
            return self.replicas.iter().cloned().map(Route::Replica).collect();
        }
        match (&self.primary, self.reads_on_primary) {
            (Some(p), true) => vec![Route::ReadsOnPrimary(p.clone())],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use pgvigil_api::cluster::RawKv;
    use pgvigil_api::{Keys, MemberData};

    use super::*;

    const SETTINGS: Settings = Settings {
        max_replica_lag: Some(1 << 20),
        primary_serves_reads_fallback: false,
    };

    fn member(name: &str, port: u16, role: &str, state: &str, f: impl FnOnce(&mut MemberData)) -> RawKv {
        let mut data = MemberData {
            conn_url: format!("postgres://127.0.0.1:{port}/postgres"),
            api_url: format!("http://127.0.0.1:{}/patroni", port + 1000),
            role: role.into(),
            state: state.into(),
            ..Default::default()
        };
        if role == "replica" {
            data.replication_state = Some("streaming".into());
            data.replay_lsn = Some(1000);
            data.xlog_location = Some(1000);
        } else {
            data.xlog_location = Some(1000);
        }
        f(&mut data);
        RawKv {
            key: format!("/service/c/members/{name}"),
            value: serde_json::to_string(&data).unwrap(),
            mod_revision: 1,
            lease: 1,
        }
    }

    fn leader(name: &str) -> RawKv {
        RawKv {
            key: "/service/c/leader".into(),
            value: name.into(),
            mod_revision: 2,
            lease: 1,
        }
    }

    fn topology(kvs: Vec<RawKv>, settings: &Settings) -> Topology {
        let view = ClusterView::from_kvs(&Keys::new("/service", "c"), 9, kvs);
        Topology::compute("c", &view, settings)
    }

    fn healthy() -> Vec<RawKv> {
        vec![
            leader("a"),
            member("a", 5432, "primary", "running", |_| {}),
            member("b", 5433, "replica", "running", |_| {}),
            member("c", 5434, "replica", "running", |_| {}),
        ]
    }

    fn names(t: &Topology) -> Vec<&str> {
        t.replicas.iter().map(|b| b.member.as_str()).collect()
    }

    #[test]
    fn healthy_cluster_routes_primary_and_replicas() {
        let t = topology(healthy(), &SETTINGS);
        let p = t.primary.clone().unwrap();
        assert_eq!(
            (p.member.as_str(), p.port, p.address()),
            ("a", 5432, "127.0.0.1:5432".to_string())
        );
        assert_eq!(names(&t), ["b", "c"]);
        assert!(!t.reads_on_primary);
        assert!(t.no_primary_reason.is_empty() && t.no_replica_reason.is_empty());
        assert_eq!(t.members[0].routing, "primary");
        assert_eq!(t.members[1].routing, "replica");
        assert_eq!(t.members[1].lag, Some(0));
        assert_eq!(t.read_routes().len(), 2);
    }

    #[test]
    fn master_is_primary_too() {
        let mut kvs = healthy();
        kvs[1] = member("a", 5432, "master", "running", |_| {});
        assert!(topology(kvs, &SETTINGS).primary.is_some());
    }

    #[test]
    fn no_primary_without_leader_key_or_when_the_leader_is_not_a_running_primary() {
        let mut kvs = healthy();
        kvs.remove(0);
        let t = topology(kvs, &SETTINGS);
        assert_eq!(t.primary, None);
        assert!(
            t.no_primary_reason.contains("no member holds the leader key"),
            "{}",
            t.no_primary_reason
        );
        // Replicas still serve reads while the cluster elects a leader.
        assert_eq!(names(&t), ["b", "c"]);

        // The lock holder is still promoting: its member key says replica.
        let mut kvs = healthy();
        kvs[0] = leader("b");
        let t = topology(kvs, &SETTINGS);
        assert_eq!(t.primary, None);
        assert!(
            t.no_primary_reason.contains("leader b is not a running primary"),
            "{}",
            t.no_primary_reason
        );
        // ... and a member claiming primary without the key gets no writes.
        assert_eq!(t.members[0].routing, "excluded: role primary");
        assert_eq!(names(&t), ["c"]);

        let mut kvs = healthy();
        kvs[1] = member("a", 5432, "primary", "stopping", |_| {});
        assert!(topology(kvs, &SETTINGS).primary.is_none());

        let mut kvs = healthy();
        kvs[0] = leader("zz");
        let t = topology(kvs, &SETTINGS);
        assert!(t.no_primary_reason.contains("zz has no member key"));

        let mut kvs = healthy();
        kvs[1] = member("a", 5432, "primary", "running", |d| d.conn_url = "garbage".into());
        let t = topology(kvs, &SETTINGS);
        assert!(
            t.no_primary_reason.contains("no usable conn_url"),
            "{}",
            t.no_primary_reason
        );
    }

    #[test]
    fn replicas_are_filtered() {
        let mut kvs = healthy();
        kvs[2] = member("b", 5433, "replica", "running", |d| {
            d.tags.insert("noloadbalance".into(), true.into());
        });
        kvs[3] = member("c", 5434, "replica", "running", |d| {
            d.replication_state = Some("in archive recovery".into())
        });
        kvs.push(member("d", 5435, "replica", "starting", |_| {}));
        kvs.push(member("e", 5436, "replica", "running", |d| {
            d.replay_lsn = Some(0)
        }));
        kvs.push(member("f", 5437, "replica", "running", |d| {
            d.replay_lsn = Some(900)
        }));
        kvs.push(member("g", 5438, "uninitialized", "creating replica", |_| {}));
        kvs.push(member("h", 5439, "replica", "running", |d| {
            d.conn_url = String::new()
        }));
        let mut status = RawKv {
            key: "/service/c/status".into(),
            value: format!(r#"{{"optime":{}}}"#, (2 << 20) + 500),
            mod_revision: 3,
            lease: 0,
        };
        kvs.push(status.clone());
        let t = topology(kvs.clone(), &SETTINGS);
        assert_eq!(t.leader_position, (2 << 20) + 500);
        // Every replica but f is excluded, each for its own reason.
        assert_eq!(names(&t), Vec::<&str>::new());
        let routing: Vec<(&str, &str)> = t
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.routing.as_str()))
            .collect();
        assert_eq!(
            routing,
            [
                ("a", "primary"),
                ("b", "excluded: noloadbalance"),
                ("c", "excluded: not streaming (in archive recovery)"),
                ("d", "excluded: state starting"),
                ("e", "excluded: lag 2.0 MiB > max_replica_lag 1.0 MiB"),
                ("f", "excluded: lag 2.0 MiB > max_replica_lag 1.0 MiB"),
                ("g", "excluded: role uninitialized"),
                ("h", "excluded: lag 2.0 MiB > max_replica_lag 1.0 MiB"),
            ]
        );
        assert!(
            t.no_replica_reason.contains("excluded: b (noloadbalance)"),
            "{}",
            t.no_replica_reason
        );
        // Within the limit once the leader position is close.
        status.value = r#"{"optime":1500}"#.into();
        kvs.pop();
        kvs.push(status);
        let t = topology(kvs.clone(), &SETTINGS);
        assert_eq!(names(&t), ["e", "f"]);
        assert_eq!(t.members[7].routing, "excluded: no usable conn_url");
        // No limit: lag does not matter.
        let t = topology(
            kvs,
            &Settings {
                max_replica_lag: None,
                ..SETTINGS
            },
        );
        assert_eq!(names(&t), ["e", "f"]);
    }

    #[test]
    fn reads_fall_back_to_the_primary_only_when_asked() {
        let kvs = vec![leader("a"), member("a", 5432, "primary", "running", |_| {})];
        let t = topology(kvs.clone(), &SETTINGS);
        assert!(t.read_routes().is_empty());
        assert!(t.no_replica_reason.starts_with("no running, streaming replica"));
        let t = topology(
            kvs,
            &Settings {
                primary_serves_reads_fallback: true,
                ..SETTINGS
            },
        );
        assert!(t.reads_on_primary);
        assert_eq!(
            t.read_routes(),
            [Route::ReadsOnPrimary(t.primary.clone().unwrap())]
        );
        assert!(t.members[0].routing.starts_with("primary (also reads"));
        // Healthy replicas win over the fallback.
        let t = topology(
            healthy(),
            &Settings {
                primary_serves_reads_fallback: true,
                ..SETTINGS
            },
        );
        assert!(!t.reads_on_primary);
    }

    #[test]
    fn routes_survive_only_while_their_member_keeps_its_role() {
        let before = topology(healthy(), &SETTINGS);
        let a = before.primary.clone().unwrap();
        let b = before.replicas[0].clone();
        let primary = Route::Primary(a.clone());
        let reads_on_a = Route::ReadsOnPrimary(a.clone());
        let replica_b = Route::Replica(b.clone());
        assert!(before.keeps(&primary) && before.keeps(&reads_on_a) && before.keeps(&replica_b));

        // A lagging replica keeps its established connections.
        let mut kvs = healthy();
        kvs[2] = member("b", 5433, "replica", "running", |d| d.replay_lsn = Some(0));
        kvs.push(RawKv {
            key: "/service/c/status".into(),
            value: r#"{"optime":999999999}"#.into(),
            mod_revision: 3,
            lease: 0,
        });
        let lagging = topology(kvs, &SETTINGS);
        assert!(lagging.replicas.iter().all(|r| r.member != "b"));
        assert!(lagging.keeps(&replica_b));

        // The leader key moves to b and b is promoted: the old primary's connections go, and so
        // do read-only connections to b (now the primary).
        let after = topology(
            vec![
                leader("b"),
                member("a", 5432, "replica", "stopped", |_| {}),
                member("b", 5433, "primary", "running", |_| {}),
                member("c", 5434, "replica", "running", |_| {}),
            ],
            &SETTINGS,
        );
        assert!(!after.keeps(&primary));
        assert!(!after.keeps(&reads_on_a));
        assert!(!after.keeps(&replica_b));
        assert!(after.keeps(&Route::Primary(after.primary.clone().unwrap())));
        assert!(after.keeps(&Route::Replica(before.replicas[1].clone())));

        // The leader key disappears: the primary route closes at once.
        let mut kvs = healthy();
        kvs.remove(0);
        assert!(!topology(kvs, &SETTINGS).keeps(&primary));

        // Same name, new address: a different backend.
        let mut kvs = healthy();
        kvs[1] = member("a", 6000, "primary", "running", |_| {});
        assert!(!topology(kvs, &SETTINGS).keeps(&primary));
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
