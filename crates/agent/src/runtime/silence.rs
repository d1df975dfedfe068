//! Watching a leader that promised the fast takeover (`docs/leadership.md`): the lock keys'
//! watch events handed to the liveness tracker, when the loop must look at a silent leader
//! again, and the probe that tells a silent leader from a silent etcd member of our own.

use std::time::{Duration, Instant};

use pgvigil_dcs::LockKeyEvent;
use tokio::sync::broadcast;

use super::Agent;

impl Agent {
    /// Hands watch events of the leader and heartbeat keys to the liveness tracker.
    pub(super) fn drain_lock_keys(&self, keys: &mut broadcast::Receiver<LockKeyEvent>) {
        loop {
            match keys.try_recv() {
                Ok(event) => self.leadership.observe_key(event),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    }

    /// When the silence of a leader that promised the fast takeover next needs a look: the
    /// probe of our etcd member, then the end of the promise; once a cycle has looked at a
    /// leader past its promise, once a second while nobody has taken over (our attempt may
    /// have failed, or another member is the one to take over). `None`: no other leader.
    pub(super) fn silence_wake_in(&self) -> Option<Duration> {
        let liveness = self.dynamic.liveness;
        let s = self
            .leadership
            .silence()
            .filter(|s| liveness.enabled && s.leader != self.cfg.name)?;
        let key = (s.leader_revision, s.heartbeat_revision);
        if self.probed_silence != Some(key) {
            return Some(probe_after(&liveness).saturating_sub(s.silent_for));
        }
        let gone_in = s.gone_in(liveness.takeover_margin);
        if gone_in.is_zero()
            && let Some((seen, at)) = self.gone_seen
            && seen == key
        {
            return Some((at + RELOOK_AT_A_GONE_LEADER).saturating_duration_since(Instant::now()));
        }
        Some(gone_in)
    }

    /// Whether a silent leader needs a cycle now (the probe, or its promise ran out).
    pub(super) fn silence_needs_a_cycle(&self) -> bool {
        self.silence_wake_in().is_some_and(|d| d.is_zero())
    }

    /// A leader that promised the fast takeover has been silent for a few heartbeats: make sure
    /// it is the leader that is silent, not our etcd member. One quick read; a member that
    /// does not answer is left for the next (the watch follows), so the read that takes over
    /// later does not spend its attempt timeout on a member that died with the leader's host.
    pub(super) async fn probe_etcd_if_leader_silent(&mut self) {
        let liveness = self.dynamic.liveness;
        let Some(s) = self
            .leadership
            .silence()
            .filter(|s| liveness.enabled && s.leader != self.cfg.name)
        else {
            return;
        };
        let key = (s.leader_revision, s.heartbeat_revision);
        if s.silent_for < probe_after(&liveness) || self.probed_silence == Some(key) {
            return;
        }
        self.probed_silence = Some(key);
        let timeout = liveness.heartbeat_interval.max(Duration::from_secs(1));
        if let Err(e) = self.dcs.probe(timeout).await {
            tracing::warn!(
                "{} has been silent for {:.1} s and our etcd member does not answer ({e}); moving to another",
                s.leader,
                s.silent_for.as_secs_f64()
            );
        }
    }
}

/// How often a member looks again at a leader past its promise that nobody took over yet.
const RELOOK_AT_A_GONE_LEADER: Duration = Duration::from_secs(1);

/// Three missed heartbeats, and at most a third of the promise.
fn probe_after(liveness: &pgvigil_config::Liveness) -> Duration {
    (liveness.heartbeat_interval * 3).min(liveness.fence_after / 3)
}
