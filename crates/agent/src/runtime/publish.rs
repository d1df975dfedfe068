//! What the loop publishes for the REST API: the node snapshot, with the status document built
//! from what the supervisor last reported.

use std::sync::Arc;

use pgvigil_api::ClusterView;
use pgvigil_rest::NodeSnapshot;

use super::Agent;
use crate::supervisor::observe::{self, Identity};

impl Agent {
    pub(super) fn publish_snapshot(&self) {
        let id = Identity::of(&self.cfg);
        let reported = self.reported();
        let paused = self.cluster.as_ref().is_some_and(ClusterView::is_paused);
        let unlocked = self.cluster.as_ref().is_none_or(ClusterView::is_unlocked);
        let mut status = observe::status_document(
            &id,
            reported.state,
            reported.role,
            reported.status.as_ref(),
            paused,
            unlocked,
            self.dcs_last_seen,
        );
        status.scheduled_restart = self.operator.scheduled_for_status();
        status.pending_restart_reason = reported.pending_restart_reason.clone();
        if let Some(sync) = self.cluster.as_ref().and_then(|c| c.sync.as_ref())
            && sync.value.contains(&self.cfg.name)
        {
            if self.dynamic.synchronous_mode == pgvigil_config::SyncMode::Quorum {
                status.quorum_standby = Some(true);
            } else {
                status.sync_standby = Some(true);
            }
        }
        let mut snap = NodeSnapshot::initial(&self.cfg.scope, &self.cfg.name);
        snap.status = status;
        snap.cluster = self.cluster.clone();
        snap.leader_until = self.leadership.held_until();
        snap.live_lock = Some(pgvigil_rest::LiveLock(self.leadership.clone()));
        snap.next_run = self.next_run;
        snap.ttl = self.dynamic.ttl;
        snap.loop_wait = self.dynamic.loop_wait;
        snap.maximum_lag_on_failover = self.dynamic.maximum_lag_on_failover;
        snap.paused = paused;
        snap.standby_cluster = self.dynamic.standby_cluster.is_some();
        snap.tags = id.tags.clone();
        snap.failsafe_mode_enabled = self.dynamic.failsafe_mode;
        (snap.failsafe_active, snap.failsafe_members) = self.failsafe_snapshot();
        snap.status.failsafe_mode_is_active = snap.failsafe_active.then_some(true);
        snap.status.watchdog_failed = self.watchdog.failed().then_some(true);
        snap.busy = self
            .running
            .as_ref()
            .and_then(|r| r.what.clone())
            .or_else(|| self.operator.busy().map(str::to_string));
        self.snapshot.send_replace(Arc::new(snap));
    }
}
