//! Failsafe mode, the HA loop's side (`docs/patroni-compat.md` §4.10). With `failsafe_mode: true` a
//! primary survives an etcd outage as long as it can reach every member over REST.
//!
//! * **Leader, etcd reachable**: after each cycle's read it publishes the `failsafe` key: every
//!   member with an `api_url`, plus itself. Members not listed may not race (the engine's rule).
//! * **Leader, etcd unreachable**: the leadership driver confirms the lock over REST
//!   ([`crate::leadership::failsafe`]); while a confirmation holds, the engine keeps PostgreSQL
//!   running ([`pgvigil_engine::Memory::failsafe_confirmed`]), otherwise it demotes (`offline`)
//!   and the fence stops PostgreSQL at the deadline at the latest.
//! * **Replica**: a 200 answer promises not to race for `ttl` seconds
//!   ([`pgvigil_rest::FailsafeState`]). The engine follows the leader that posted within `ttl`
//!   instead of racing or taking over ([`pgvigil_engine::Inputs::failsafe_leader`]), and the
//!   race itself re-checks under the same lock the REST handler uses
//!   ([`FailsafeState::begin_race`]).
//!
//! [`FailsafeState::begin_race`]: pgvigil_rest::FailsafeState::begin_race

use std::time::{Duration, Instant};

use pgvigil_api::ClusterView;
use serde_json::{Map, Value};

use super::Agent;
use crate::supervisor::PgSupervisor;

impl Agent {
    /// The `failsafe` key a leader writes: every member with an `api_url`, and itself.
    fn failsafe_map(&self, view: &ClusterView, sup: &PgSupervisor) -> Map<String, Value> {
        let mut map: Map<String, Value> = view
            .members
            .iter()
            .filter(|m| !m.data.api_url.is_empty())
            .map(|m| (m.name.clone(), Value::String(m.data.api_url.clone())))
            .collect();
        let api_url = sup.identity().api_url;
        map.insert(self.cfg.name.clone(), Value::String(api_url));
        map
    }

    /// The cycle's failsafe step, after the DCS read: keeps the prober's member list current,
    /// publishes the key (leader), and returns the leader that vouched for itself to us within
    /// ttl, if any.
    pub(super) async fn failsafe_step(
        &mut self,
        cluster: Option<&ClusterView>,
        sup: &PgSupervisor,
    ) -> Option<String> {
        let enabled = self.dynamic.failsafe_mode;
        let prober = self.leadership.failsafe().clone();
        if !enabled {
            return None;
        }
        let ttl = Duration::from_secs(self.dynamic.ttl);
        if let Some(view) = cluster {
            if let Some(map) = view.failsafe.clone() {
                prober.set_members(map);
            }
            if self.leadership.holds_lock() {
                self.failsafe.clear();
                let map = self.failsafe_map(view, sup);
                if view.failsafe.as_ref() != Some(&map) {
                    let retry = Duration::from_secs(self.dynamic.retry_timeout);
                    match tokio::time::timeout(retry, self.dcs.set_failsafe(&map)).await {
                        Ok(Ok(())) => prober.set_members(map),
                        Ok(Err(e)) => tracing::warn!("could not write the failsafe key: {e}"),
                        Err(_) => tracing::warn!("writing the failsafe key timed out"),
                    }
                }
                return None;
            }
        }
        self.failsafe
            .leader_alive(ttl, Instant::now())
            .map(|post| post.name)
    }

    /// Whether the REST snapshot should say failsafe mode is active (a leader running on
    /// failsafe confirmations), and the members it knows.
    pub(super) fn failsafe_snapshot(&self) -> (bool, Option<Map<String, Value>>) {
        let active = self.dynamic.failsafe_mode && self.leadership.failsafe_holds();
        let members = self
            .dynamic
            .failsafe_mode
            .then(|| self.leadership.failsafe().members())
            .flatten();
        (active, members)
    }
}
