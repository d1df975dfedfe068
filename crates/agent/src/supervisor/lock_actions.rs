//! The actions on the leader lock and the keys that go with it: racing for the key, taking it
//! from a silent leader, adopting it after a restart, releasing it, `initialize`, `status`,
//! `failover`. `Leadership` performs the lock's writes; these only ask and report.

use std::time::{Duration, Instant};

use pgvigil_api::ClusterView;
use pgvigil_dcs::TermOpening;

use super::PgSupervisor;
use super::actions::{Failed, Outcome};

impl PgSupervisor {
    /// Races for the key (`Acquire`) or takes it from a silent leader (`TakeOver`).
    pub(super) async fn acquire_lock(&mut self, how: TermOpening) -> Outcome {
        let ttl = Duration::from_secs(self.dynamic.ttl);
        // Failsafe mode: no race while a leader that posted to us within ttl may still run.
        let failsafe = self.failsafe.clone();
        let Some(_race) = failsafe.begin_race(ttl, Instant::now()) else {
            tracing::info!("not racing: a leader confirmed itself over failsafe within ttl");
            return Ok(false);
        };
        let won = match tokio::time::timeout(self.retry(), self.leadership.open(how)).await {
            Ok(Ok(won)) => won,
            Ok(Err(e)) => return Err(Failed::Recoverable(format!("acquiring the leader lock: {e}"))),
            Err(_) => return Err(Failed::Recoverable("acquiring the leader lock timed out".into())),
        };
        if !won {
            tracing::info!("failed to acquire the leader lock: another member holds it");
            return Ok(true);
        }
        // A failover request that made us leader is cleared by the next decision (the
        // engine's rule for a leader that is the request's candidate).
        tracing::info!("acquired the leader lock");
        Ok(true)
    }

    /// The key names us from before an agent restart: move it to our lease.
    pub(super) async fn adopt_lock(&mut self, leader_revision: i64) -> Outcome {
        let how = TermOpening::Move { leader_revision };
        match tokio::time::timeout(self.retry(), self.leadership.open(how)).await {
            Ok(Ok(true)) => {
                tracing::info!("adopted the leader key");
                Ok(true)
            }
            Ok(Ok(false)) => {
                tracing::info!("the leader key changed before we could adopt it");
                Ok(true)
            }
            Ok(Err(e)) => Err(Failed::Recoverable(format!("adopting the leader key: {e}"))),
            Err(_) => Err(Failed::Recoverable("adopting the leader key timed out".into())),
        }
    }

    pub(super) async fn release_lock(&mut self) -> Outcome {
        // A replica giving the lock up (its pre_promote refused, no watchdog) is no primary:
        // the end of the term must not make the fence stop it, which it would do at once for
        // the postmaster it knows, before the end of this action tells it PostgreSQL is a
        // replica.
        let replica = self.pg.is_running() && self.status.as_ref().is_some_and(|s| s.in_recovery);
        if replica {
            self.leadership.set_postmaster(None);
        }
        let released = tokio::time::timeout(self.retry(), self.leadership.release()).await;
        if replica {
            self.leadership.primary_gone();
        }
        match released {
            Ok(Ok(_)) => {
                self.memory.released_lock_at = Some(Instant::now());
                // A crashed primary that let the key go is no primary any more: peers asked
                // during the race must not take it for a live one (Patroni's `demoted`).
                if self.pg.postmaster_pid().is_none() && self.role == pgvigil_api::Role::Primary {
                    self.role = pgvigil_api::Role::Demoted;
                    // Patroni's `post_recover`: a primary that failed to start while holding the
                    // lock tells `on_role_change` it is demoted as it lets the key go.
                    if self.memory.start_failed {
                        self.callback(super::callbacks::Event::RoleChange, pgvigil_api::Role::Demoted);
                    }
                }
                Ok(true)
            }
            Ok(Err(e)) => Err(Failed::Recoverable(format!("releasing the leader lock: {e}"))),
            Err(_) => Err(Failed::Recoverable("releasing the leader lock timed out".into())),
        }
    }

    pub(super) async fn write_initialize(&mut self) -> Outcome {
        let sysid = match (&self.status, &self.control) {
            (Some(st), _) if !st.system_identifier.is_empty() => st.system_identifier.clone(),
            (_, Some(c)) => c.sysid.clone(),
            _ => return Err(Failed::Recoverable("system identifier unknown".into())),
        };
        self.dcs_call("writing the initialize key", self.dcs.set_initialize(&sysid))
            .await?;
        Ok(false)
    }

    /// Publishes `status` with `optime` (a leader's last position before it lets go).
    pub(super) async fn publish_position(&mut self, view: Option<&ClusterView>, optime: u64) -> Outcome {
        let status = pgvigil_api::StatusValue {
            optime,
            ..view.map(|v| v.status.clone()).unwrap_or_default()
        };
        if let Err(Failed::Recoverable(e) | Failed::Fatal(e)) = self
            .dcs_call("publishing the position", self.dcs.set_status(&status))
            .await
        {
            tracing::warn!("{e}");
        }
        Ok(false)
    }

    /// Clears the `failover` key after it was handled, compare-and-set on its revision.
    pub(super) async fn clear_failover(&mut self, view: Option<&ClusterView>) -> Outcome {
        let revision = view.and_then(|c| c.failover.as_ref()).map(|f| f.mod_revision);
        let empty = pgvigil_api::FailoverValue::default();
        let cleared = self.dcs.set_failover(&empty, revision);
        self.dcs_call("clearing the failover key", cleared).await?;
        Ok(false)
    }
}
