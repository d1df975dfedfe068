//! Failsafe mode, the leader lock's side (`docs/patroni-compat.md` §4.10): when etcd cannot be
//! reached, the leadership driver asks every member of the last `failsafe` key to accept this
//! leader (`POST /failsafe` with `{name, conn_url, api_url, slots}`, in parallel, 2 s each, one
//! retry). A round every member accepted, sent at `t`, proves that none of them will race (fast
//! or not) before `t + ttl`, and members not listed never race: it extends the lock's deadline
//! like a renewal sent at `t` (`pgvigil_lock::term`).

use std::sync::Mutex;
use std::time::Duration;

use pgvigil_rest::{FailsafePost, PeerClient};
use serde_json::{Map, Value};

/// What the leadership driver needs to confirm a leader over REST.
pub struct FailsafeProber {
    peers: PeerClient,
    me: FailsafePost,
    /// The last `failsafe` key seen or written (name → api_url).
    members: Mutex<Option<Map<String, Value>>>,
}

impl FailsafeProber {
    pub fn new(peers: PeerClient, me: FailsafePost) -> FailsafeProber {
        FailsafeProber {
            peers,
            me,
            members: Mutex::new(None),
        }
    }

    pub fn members(&self) -> Option<Map<String, Value>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_members(&self, map: Map<String, Value>) {
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
