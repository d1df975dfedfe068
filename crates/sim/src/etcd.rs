//! The fake etcd: one linearizable store with revisions, leases that expire on the etcd
//! leader's clock, and a change log the world turns into watch events.
//!
//! What it keeps of real etcd (v3.4), because the timing argument depends on it:
//! * every write transaction gets one new revision; `mod_revision`, `create_revision` and
//!   value compares behave as etcd's (a missing key has revision 0 and no value);
//! * a put on a lease that does not exist fails the whole transaction with an error;
//! * a lease expires `ttl` after its grant or last keep-alive, on the etcd leader's clock
//!   (itself off by a few hundred ppm); a keep-alive of an expired lease answers "not found";
//!   revoking deletes every key on it in one revision;
//! * when a new etcd leader takes over, every lease is extended to now + ttl + 1 s (etcd's
//!   `Promote` with the election timeout), so a lease can outlive its holder by a whole TTL;
//! * while etcd has no leader (election, lost quorum, every member stalled) nothing is answered
//!   and nothing expires.

use std::collections::BTreeMap;
use std::time::Duration;

use pgvigil_api::Keys;
use pgvigil_api::cluster::RawKv;
use pgvigil_lock::{LeaderKey, TermOpening, Written};

use crate::time::{HostClock, Nanos};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    ttl: Duration,
    expires_at: Nanos,
}

/// One change of one key, as a watch reports it: `value` `None` for a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Option<String>,
    pub revision: i64,
}

#[derive(Clone, Debug)]
pub enum Request {
    Grant {
        ttl: Duration,
    },
    KeepAlive {
        lease: i64,
    },
    Revoke {
        lease: i64,
    },
    OpenTerm {
        how: TermOpening,
        lease: i64,
        name: String,
        heartbeat: Option<String>,
    },
    Heartbeat {
        term: i64,
        lease: i64,
        value: Option<String>,
    },
    Release {
        term: i64,
    },
    ReadLeader,
    /// The whole cluster prefix (the HA loop's read).
    Range,
    /// A put of `key`, on `lease` when not 0.
    Put {
        key: String,
        value: String,
        lease: i64,
    },
}

#[derive(Clone, Debug)]
pub enum Response {
    Granted(i64),
    KeepAlive(bool),
    Revoked,
    Written(Written),
    Released(bool),
    Leader(Option<LeaderKey>),
    Range {
        revision: i64,
        kvs: Vec<RawKv>,
    },
    Put,
    /// etcd refused the request as a whole (a put on a lease that does not exist).
    Error(String),
}

/// The key names the lock and the watches look at, built once.
#[derive(Clone, Debug)]
pub struct KeyNames {
    pub leader: String,
    pub heartbeat: String,
    pub config: String,
}

impl KeyNames {
    pub fn new(keys: &Keys) -> KeyNames {
        KeyNames {
            leader: keys.leader(),
            heartbeat: keys.heartbeat(),
            config: keys.config(),
        }
    }
}

pub struct Etcd {
    pub keys: Keys,
    names: KeyNames,
    revision: i64,
    kvs: BTreeMap<String, Kv>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
    /// No leader until this real time: requests go unanswered, leases do not expire.
    down_until: Nanos,
    /// The etcd leader's clock (for lease expiry).
    clock: HostClock,
    /// Changes not yet handed to the watches.
    changes: Vec<Change>,
}

impl Etcd {
    pub fn new(keys: Keys, clock: HostClock) -> Etcd {
        Etcd {
            names: KeyNames::new(&keys),
            keys,
            revision: 1,
            kvs: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease: 0x1000,
            down_until: 0,
            clock,
            changes: Vec::new(),
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn get(&self, key: &str) -> Option<&Kv> {
        self.kvs.get(key)
    }

    pub fn is_up(&self, now: Nanos) -> bool {
        now >= self.down_until
    }

    /// Changes since the last call, in revision order.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// etcd answers nothing until `until` (every member stalled, or no quorum).
    pub fn outage(&mut self, until: Nanos) {
        self.down_until = self.down_until.max(until);
    }

    /// A new etcd leader (with its own clock) takes over at `now`: every lease is extended
    /// to now + its ttl + the election timeout, as etcd's lessor `Promote` does.
    pub fn new_leader(&mut self, now: Nanos, clock: HostClock) {
        self.clock = clock;
        for lease in self.leases.values_mut() {
            lease.expires_at = now + self.clock.real_duration(lease.ttl + Duration::from_secs(1));
        }
    }

    /// Revokes the leases that expired by `now` (only while etcd has a leader).
    pub fn expire(&mut self, now: Nanos) {
        if !self.is_up(now) {
            return;
        }
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .kvs
            .iter()
            .filter(|(_, kv)| kv.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        for key in keys {
            self.kvs.remove(&key);
            self.changes.push(Change {
                key,
                value: None,
                revision: self.revision,
            });
        }
    }

    fn mod_revision(&self, key: &str) -> i64 {
        self.kvs.get(key).map_or(0, |kv| kv.mod_revision)
    }

    fn create_revision(&self, key: &str) -> i64 {
        self.kvs.get(key).map_or(0, |kv| kv.create_revision)
    }

    /// Applies one transaction's writes (`Some`: put on the lease, `None`: delete) at a new
    /// revision. Fails as a whole, writing nothing, when a put names a lease that does not
    /// exist. A transaction that changes nothing keeps the revision.
    fn write(&mut self, ops: Vec<(String, Option<(String, i64)>)>) -> Result<i64, String> {
        for (_, put) in &ops {
            if let Some((_, lease)) = put
                && *lease != 0
                && !self.leases.contains_key(lease)
            {
                return Err("etcdserver: requested lease not found".into());
            }
        }
        let changes = ops
            .iter()
            .any(|(key, put)| put.is_some() || self.kvs.contains_key(key));
        if !changes {
            return Ok(self.revision);
        }
        self.revision += 1;
        let revision = self.revision;
        for (key, put) in ops {
            match put {
                Some((value, lease)) => {
                    let create_revision = self.kvs.get(&key).map_or(revision, |kv| kv.create_revision);
                    self.kvs.insert(
                        key.clone(),
                        Kv {
                            value: value.clone(),
                            create_revision,
                            mod_revision: revision,
                            lease,
                        },
                    );
                    self.changes.push(Change {
                        key,
                        value: Some(value),
                        revision,
                    });
                }
                None => {
                    if self.kvs.remove(&key).is_some() {
                        self.changes.push(Change {
                            key,
                            value: None,
                            revision,
                        });
                    }
                }
            }
        }
        Ok(revision)
    }

    /// Serves one request at `now`; `None` when etcd has no leader (the client times out).
    pub fn serve(&mut self, request: Request, now: Nanos) -> Option<Response> {
        if !self.is_up(now) {
            return None;
        }
        self.expire(now);
        let leader = self.names.leader.clone();
        let heartbeat = self.names.heartbeat.clone();
        let response = match request {
            Request::Grant { ttl } => {
                self.next_lease += 1;
                let id = self.next_lease;
                let expires_at = now + self.clock.real_duration(ttl);
                self.leases.insert(id, Lease { ttl, expires_at });
                Response::Granted(id)
            }
            Request::KeepAlive { lease } => match self.leases.get_mut(&lease) {
                Some(l) => {
                    l.expires_at = now + self.clock.real_duration(l.ttl);
                    Response::KeepAlive(true)
                }
                None => Response::KeepAlive(false),
            },
            Request::Revoke { lease } => {
                self.revoke(lease);
                Response::Revoked
            }
            Request::OpenTerm {
                how,
                lease,
                name,
                heartbeat: value,
            } => {
                let config = self.names.config.clone();
                let ok = match how {
                    TermOpening::Acquire => self.create_revision(&leader) == 0,
                    TermOpening::TakeOver {
                        leader_revision,
                        heartbeat_revision,
                        config_revision,
                    } => {
                        self.mod_revision(&leader) == leader_revision
                            && self.mod_revision(&heartbeat) == heartbeat_revision
                            && if config_revision == 0 {
                                self.create_revision(&config) == 0
                            } else {
                                self.mod_revision(&config) == config_revision
                            }
                    }
                    TermOpening::Move { leader_revision } => {
                        self.mod_revision(&leader) == leader_revision
                            && self.kvs.get(&leader).is_some_and(|kv| kv.value == name)
                    }
                };
                if ok {
                    let ops = vec![
                        (leader, Some((name, lease))),
                        (heartbeat, value.map(|v| (v, lease))),
                    ];
                    match self.write(ops) {
                        Ok(revision) => Response::Written(Written::Applied(revision)),
                        Err(e) => Response::Error(e),
                    }
                } else {
                    Response::Written(Written::Refused)
                }
            }
            Request::Heartbeat { term, lease, value } => {
                if self.mod_revision(&leader) != term {
                    Response::Written(Written::Refused)
                } else {
                    match value {
                        Some(v) => match self.write(vec![(heartbeat, Some((v, lease)))]) {
                            Ok(revision) => Response::Written(Written::Applied(revision)),
                            Err(e) => Response::Error(e),
                        },
                        None => Response::Written(Written::Applied(0)),
                    }
                }
            }
            Request::Release { term } => {
                if self.mod_revision(&leader) == term {
                    let _ = self.write(vec![(leader, None), (heartbeat, None)]);
                    Response::Released(true)
                } else {
                    Response::Released(false)
                }
            }
            Request::ReadLeader => Response::Leader(self.kvs.get(&leader).map(|kv| LeaderKey {
                value: kv.value.clone(),
                lease: kv.lease,
                mod_revision: kv.mod_revision,
            })),
            Request::Range => {
                let prefix = self.keys.prefix().to_string();
                let kvs = self
                    .kvs
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, kv)| RawKv {
                        key: k.clone(),
                        value: kv.value.clone(),
                        mod_revision: kv.mod_revision,
                        lease: kv.lease,
                    })
                    .collect();
                Response::Range {
                    revision: self.revision,
                    kvs,
                }
            }
            Request::Put { key, value, lease } => match self.write(vec![(key, Some((value, lease)))]) {
                Ok(_) => Response::Put,
                Err(e) => Response::Error(e),
            },
        };
        Some(response)
    }

    /// The leader key's holder, for the checker and the fault targeting.
    pub fn leader_name(&self) -> Option<&str> {
        self.kvs.get(&self.names.leader).map(|kv| kv.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SEC;

    fn etcd() -> Etcd {
        Etcd::new(Keys::new("/service", "sim"), HostClock::new(0, 0, 0))
    }

    fn open(e: &mut Etcd, how: TermOpening, lease: i64, name: &str, now: Nanos) -> Response {
        let request = Request::OpenTerm {
            how,
            lease,
            name: name.into(),
            heartbeat: Some(format!("hb-{name}")),
        };
        e.serve(request, now).unwrap()
    }

    fn lease(e: &mut Etcd, ttl: u64, now: Nanos) -> i64 {
        match e.serve(
            Request::Grant {
                ttl: Duration::from_secs(ttl),
            },
            now,
        ) {
            Some(Response::Granted(id)) => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lease_expires_after_its_ttl_taking_its_keys_in_one_revision() {
        let mut e = etcd();
        let l = lease(&mut e, 10, 0);
        let Response::Written(Written::Applied(rev)) = open(&mut e, TermOpening::Acquire, l, "a", 0) else {
            panic!()
        };
        assert_eq!(e.get(&e.keys.leader()).map(|kv| kv.mod_revision), Some(rev));
        e.take_changes();
        e.expire(10 * SEC - 1);
        assert_eq!(e.leader_name(), Some("a"));
        e.expire(10 * SEC);
        assert_eq!(e.leader_name(), None);
        let changes = e.take_changes();
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| c.value.is_none() && c.revision == rev + 1));
        assert!(matches!(
            e.serve(Request::KeepAlive { lease: l }, 11 * SEC),
            Some(Response::KeepAlive(false))
        ));
    }

    #[test]
    fn a_new_etcd_leader_extends_every_lease_and_an_outage_answers_nothing() {
        let mut e = etcd();
        let l = lease(&mut e, 10, 0);
        open(&mut e, TermOpening::Acquire, l, "a", 0);
        e.outage(5 * SEC);
        assert!(e.serve(Request::ReadLeader, 4 * SEC).is_none());
        e.new_leader(5 * SEC, HostClock::new(0, 0, 0));
        e.expire(15 * SEC);
        assert_eq!(e.leader_name(), Some("a"), "extended to 5 + 10 + 1");
        e.expire(16 * SEC);
        assert_eq!(e.leader_name(), None);
    }

    #[test]
    fn term_writes_compare_like_the_real_transactions() {
        let mut e = etcd();
        let la = lease(&mut e, 30, 0);
        let lb = lease(&mut e, 30, 0);
        let Response::Written(Written::Applied(r1)) = open(&mut e, TermOpening::Acquire, la, "a", 0) else {
            panic!()
        };
        assert!(matches!(
            open(&mut e, TermOpening::Acquire, lb, "b", 0),
            Response::Written(Written::Refused)
        ));
        // A heartbeat of the term moves the heartbeat key only.
        let hb = Request::Heartbeat {
            term: r1,
            lease: la,
            value: Some("x".into()),
        };
        let Some(Response::Written(Written::Applied(r2))) = e.serve(hb, 1) else {
            panic!()
        };
        let takeover = |hb_rev| TermOpening::TakeOver {
            leader_revision: r1,
            heartbeat_revision: hb_rev,
            config_revision: 0,
        };
        assert!(matches!(
            open(&mut e, takeover(r1), lb, "b", 2),
            Response::Written(Written::Refused)
        ));
        let Response::Written(Written::Applied(r3)) = open(&mut e, takeover(r2), lb, "b", 2) else {
            panic!()
        };
        // The old leader's heartbeat, release and move now fail their compare.
        let hb = Request::Heartbeat {
            term: r1,
            lease: la,
            value: Some("x".into()),
        };
        assert!(matches!(
            e.serve(hb, 3),
            Some(Response::Written(Written::Refused))
        ));
        assert!(matches!(
            e.serve(Request::Release { term: r1 }, 3),
            Some(Response::Released(false))
        ));
        assert!(matches!(
            open(&mut e, TermOpening::Move { leader_revision: r3 }, la, "a", 3),
            Response::Written(Written::Refused)
        ));
        // A put on a lease that does not exist fails as a whole.
        assert!(matches!(
            open(&mut e, TermOpening::Move { leader_revision: r3 }, 999, "b", 3),
            Response::Error(_)
        ));
        assert_eq!(e.leader_name(), Some("b"));
    }
}
