//! Failsafe mode, the runtime side (`patroni-compat.md` §4.10). With `failsafe_mode: true` a
//! primary survives an etcd outage as long as it can reach every member over REST.
//!
//! * **Leader, etcd reachable**: after each cycle's read it publishes the `failsafe` key: every
//!   member with an `api_url`, plus itself. Members not listed may not race ([the engine's
//!   rule](pgvigil_engine)).
//! * **Leader, etcd unreachable**: when a lease renewal fails, the lease guardian calls
//!   [`FailsafeProber::confirm`]: `POST /failsafe` with `{name, conn_url, api_url, slots}` to
//!   every other member of the last known `failsafe` key, in parallel, 2 s each, one retry. If
//!   all answer 200, the guardian extends the leader's deadline to `sent + ttl - margin` (like a
//!   renewal sent at that moment) and feeds the watchdog; the HA loop sees the confirmation
//!   ([`pgvigil_engine::Memory::failsafe_confirmed`]) and keeps PostgreSQL running. Otherwise
//!   the old deadline stands: the HA loop demotes (`offline`) and the guardian fences at the
//!   deadline at the latest.
//! * **Replica**: a 200 answer promises not to race for `ttl` seconds
//!   ([`pgvigil_rest::FailsafeState`]). An unlocked view is patched with the leader that posted
//!   within `ttl`, so the replica follows it instead of racing, and the race itself re-checks
//!   under the same lock the REST handler uses ([`FailsafeState::begin_race`]).
//!
//! Why this is safe: a confirmation sent at `t` means every listed member received the post at
//! `t' >= t` and will not race before `t' + ttl`; members that are not listed never race; so no
//! other node can become leader before `t + ttl`, and the guardian stops PostgreSQL at
//! `t + ttl - margin` unless a new renewal or confirmation came first.
//!
//! [`FailsafeState::begin_race`]: pgvigil_rest::FailsafeState::begin_race

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgvigil_api::ClusterView;
use pgvigil_api::cluster::Leader;
use pgvigil_rest::{FailsafePost, PeerClient};
use serde_json::{Map, Value};

use super::Agent;

/// What the lease guardian needs to confirm a leader over REST.
pub struct FailsafeProber {
    peers: PeerClient,
    me: FailsafePost,
    enabled: AtomicBool,
    /// The last `failsafe` key seen or written (name → api_url).
    members: Mutex<Option<Map<String, Value>>>,
}

impl FailsafeProber {
    pub fn new(peers: PeerClient, me: FailsafePost) -> FailsafeProber {
        FailsafeProber {
            peers,
            me,
            enabled: AtomicBool::new(false),
            members: Mutex::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    pub fn members(&self) -> Option<Map<String, Value>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_members(&self, map: Map<String, Value>) {
        *self.members.lock().unwrap_or_else(|e| e.into_inner()) = Some(map);
    }

    /// Posts to every other member of the last known `failsafe` key; true if all accepted. A
    /// map listing only this node passes; no map at all does not.
    pub async fn confirm(&self) -> bool {
        let Some(map) = self.members() else {
            tracing::warn!("failsafe: no failsafe key known; cannot confirm the leadership");
            return false;
        };
        let body = self.me.to_json();
        let calls = map
            .iter()
            .filter(|(name, _)| **name != self.me.name)
            .map(|(name, url)| {
                let url = url.as_str().unwrap_or("").to_string();
                let body = &body;
                async move {
                    for _ in 0..2 {
                        if let Some((status, _lsn)) =
                            self.peers.post_failsafe(&url, body, Duration::from_secs(2)).await
                        {
                            return (name.clone(), status == 200, Some(status));
                        }
                    }
                    (name.clone(), false, None)
                }
            });
        let answers = futures::future::join_all(calls).await;
        let refused: Vec<String> = answers
            .iter()
            .filter(|(_, ok, _)| !ok)
            .map(|(name, _, status)| match status {
                Some(code) => format!("{name} ({code})"),
                None => format!("{name} (no answer)"),
            })
            .collect();
        if refused.is_empty() {
            tracing::info!(
                "failsafe: all {} other members accepted; continuing as the leader",
                answers.len()
            );
            true
        } else {
            tracing::warn!("failsafe: not confirmed by {}", refused.join(", "));
            false
        }
    }
}

impl Agent {
    /// The `failsafe` key a leader writes: every member with an `api_url`, and itself.
    fn failsafe_map(&self, view: &ClusterView) -> Map<String, Value> {
        let mut map: Map<String, Value> = view
            .members
            .iter()
            .filter(|m| !m.data.api_url.is_empty())
            .map(|m| (m.name.clone(), Value::String(m.data.api_url.clone())))
            .collect();
        let (_, api_url, _) = self.identity();
        map.insert(self.cfg.name.clone(), Value::String(api_url));
        map
    }

    /// The cycle's failsafe step, after the DCS read and the observation of PostgreSQL:
    /// publishes the key (leader), follows a leader that vouched for itself (replica, unlocked
    /// view), and tells the engine whether the guardian holds a failsafe confirmation.
    pub(super) async fn failsafe_step(&mut self, cluster: Option<ClusterView>) -> Option<ClusterView> {
        let enabled = self.dynamic.failsafe_mode;
        self.failsafe_prober.enabled.store(enabled, Ordering::SeqCst);
        let timing = self.lease_timing();
        self.memory.failsafe_confirmed = enabled && self.lease.failsafe_confirmed(&timing, Instant::now());
        if !enabled {
            return cluster;
        }
        let Some(mut view) = cluster else {
            // etcd is unreachable: a leader not yet confirmed asks now rather than wait for
            // the guardian's next failed renewal.
            if self.lease.holds_lock() && !self.memory.failsafe_confirmed {
                let sent = Instant::now();
                let accepted = self.failsafe_prober.confirm().await;
                self.lease.record_failsafe(sent, accepted);
                self.memory.failsafe_confirmed = accepted;
            }
            return None;
        };
        if let Some(map) = view.failsafe.clone() {
            self.failsafe_prober.set_members(map);
        }
        if self.lease.holds_lock() {
            self.failsafe.clear();
            let map = self.failsafe_map(&view);
            if view.failsafe.as_ref() != Some(&map) {
                match tokio::time::timeout(timing.retry_timeout, self.dcs.set_failsafe(&map)).await {
                    Ok(Ok(())) => self.failsafe_prober.set_members(map),
                    Ok(Err(e)) => tracing::warn!("could not write the failsafe key: {e}"),
                    Err(_) => tracing::warn!("writing the failsafe key timed out"),
                }
            }
        } else if view.is_unlocked()
            && let Some(post) = self.failsafe.leader_alive(timing.ttl, Instant::now())
        {
            tracing::info!(
                "failsafe: no leader key, but {} confirmed its leadership over REST within ttl; following it",
                post.name
            );
            view.leader = Some(Leader {
                name: post.name,
                lease: 0,
                mod_revision: 0,
            });
        }
        Some(view)
    }

    /// Whether the REST snapshot should say failsafe mode is active (a leader running on
    /// failsafe confirmations), and the members it knows.
    pub(super) fn failsafe_snapshot(&self) -> (bool, Option<Map<String, Value>>) {
        let active = self.dynamic.failsafe_mode
            && self.lease.holds_lock()
            && self
                .lease
                .failsafe_confirmed(&self.lease_timing(), Instant::now());
        let members = self
            .dynamic
            .failsafe_mode
            .then(|| self.failsafe_prober.members())
            .flatten();
        (active, members)
    }
}
