//! A replica's view of the leader's heartbeat: since when has the leader key and its
//! heartbeat stayed the same, and did the leader promise the fast takeover?
//!
//! Safety needs one thing from here (see [`crate::term`]): the moment `o` we record for a
//! revision is when *this node* first learned that revision, which is after etcd applied it.
//! Observations come from watch events and from reads, in any order; only a higher revision
//! than the one held counts as news, so a late event can never restart or shorten anything
//! with older data. Any change of either key restarts the silence.

use std::time::Duration;

use crate::clock::BootInstant;
use crate::heartbeat::HeartbeatValue;

/// What one observation says of a key: `value` (`None`: absent or deleted) as of `revision`
/// (its `mod_revision`, or the revision of the delete).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub value: Option<String>,
    pub revision: i64,
}

/// The silence of a leader that promised the fast takeover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Silence {
    pub leader: String,
    /// `mod_revision` of the leader key and of the heartbeat key that a takeover must compare.
    pub leader_revision: i64,
    pub heartbeat_revision: i64,
    /// The promise F.
    pub promise: Duration,
    /// How long neither key has changed, on this node's clock.
    pub silent_for: Duration,
}

impl Silence {
    /// Whether the leader is past its promise plus our `margin`: it has stopped PostgreSQL,
    /// if it is alive at all, and the key may be taken.
    pub fn leader_gone(&self, margin: Duration) -> bool {
        self.silent_for >= self.promise + margin
    }

    /// How long until [`Silence::leader_gone`] would hold.
    pub fn gone_in(&self, margin: Duration) -> Duration {
        (self.promise + margin).saturating_sub(self.silent_for)
    }
}

#[derive(Clone, Debug, Default)]
pub struct LivenessTracker {
    leader: Option<KeyState>,
    heartbeat: Option<KeyState>,
    since: Option<BootInstant>,
}

impl LivenessTracker {
    pub fn new() -> LivenessTracker {
        LivenessTracker::default()
    }

    /// The leader key as seen at `now` (a watch event or a read).
    pub fn observe_leader(&mut self, state: KeyState, now: BootInstant) {
        if Self::newer(&self.leader, &state) {
            self.leader = Some(state);
            self.since = Some(now);
        }
    }

    /// The heartbeat key as seen at `now`.
    pub fn observe_heartbeat(&mut self, state: KeyState, now: BootInstant) {
        if Self::newer(&self.heartbeat, &state) {
            self.heartbeat = Some(state);
            self.since = Some(now);
        }
    }

    /// A read of the cluster served at `read_revision`: the leader key as `(value,
    /// mod_revision)` and the heartbeat key likewise, `None` when absent (recorded as absent
    /// as of the read).
    pub fn observe_read(
        &mut self,
        leader: Option<(&str, i64)>,
        heartbeat: Option<(&str, i64)>,
        read_revision: i64,
        now: BootInstant,
    ) {
        let state = |key: Option<(&str, i64)>| match key {
            Some((value, revision)) => KeyState {
                value: Some(value.to_string()),
                revision,
            },
            None => KeyState {
                value: None,
                revision: read_revision,
            },
        };
        self.observe_leader(state(leader), now);
        self.observe_heartbeat(state(heartbeat), now);
    }

    fn newer(held: &Option<KeyState>, seen: &KeyState) -> bool {
        held.as_ref().is_none_or(|h| seen.revision > h.revision)
    }

    /// The leader's silence, if a leader holds the key with a heartbeat of the same term that
    /// promises the fast takeover. `None` otherwise: no leader, a Patroni leader, a leader that
    /// did not promise, or a heartbeat left over from an earlier term.
    pub fn silence(&self, now: BootInstant) -> Option<Silence> {
        let leader = self.leader.as_ref()?;
        let name = leader.value.as_deref().filter(|v| !v.is_empty())?;
        let hb = self.heartbeat.as_ref()?;
        if hb.revision < leader.revision {
            return None;
        }
        let value = HeartbeatValue::parse(hb.value.as_deref()?)?;
        if value.leader != name {
            return None;
        }
        Some(Silence {
            leader: name.to_string(),
            leader_revision: leader.revision,
            heartbeat_revision: hb.revision,
            promise: value.promise(),
            silent_for: now.saturating_duration_since(self.since?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: f64) -> BootInstant {
        BootInstant::from_nanos((secs * 1e9) as u64)
    }

    fn key(value: Option<&str>, revision: i64) -> KeyState {
        KeyState {
            value: value.map(str::to_string),
            revision,
        }
    }

    fn hb(leader: &str) -> String {
        HeartbeatValue::new(leader, Duration::from_millis(3500), Duration::from_millis(500)).to_json()
    }

    #[test]
    fn silence_counts_from_the_first_observation_of_the_newest_revision() {
        let mut l = LivenessTracker::new();
        l.observe_leader(key(Some("a"), 10), t(1.0));
        l.observe_heartbeat(key(Some(&hb("a")), 10), t(1.0));
        l.observe_heartbeat(key(Some(&hb("a")), 12), t(2.0));
        // A read returning the same revision again is no news.
        l.observe_heartbeat(key(Some(&hb("a")), 12), t(3.0));
        // A late event of an older revision neither.
        l.observe_heartbeat(key(Some(&hb("a")), 11), t(3.5));
        let s = l.silence(t(5.0)).expect("promised");
        assert_eq!(
            (s.leader.as_str(), s.leader_revision, s.heartbeat_revision),
            ("a", 10, 12)
        );
        assert_eq!(s.silent_for, Duration::from_secs(3));
        assert!(!s.leader_gone(Duration::from_millis(500)));
        assert_eq!(s.gone_in(Duration::from_millis(500)), Duration::from_secs(1));
        assert!(l.silence(t(6.0)).unwrap().leader_gone(Duration::from_millis(500)));
    }

    #[test]
    fn no_promise_without_a_heartbeat_of_the_current_term() {
        let mut l = LivenessTracker::new();
        l.observe_leader(key(Some("a"), 10), t(0.0));
        assert_eq!(l.silence(t(100.0)), None, "no heartbeat: a Patroni leader");
        l.observe_heartbeat(key(Some(&hb("a")), 8), t(0.0));
        assert_eq!(l.silence(t(100.0)), None, "written before the leader key: stale");
        l.observe_heartbeat(key(Some(&hb("b")), 11), t(0.0));
        assert_eq!(l.silence(t(100.0)), None, "names another member");
        l.observe_heartbeat(key(Some(r#"{"leader":"a"}"#), 12), t(0.0));
        assert_eq!(l.silence(t(100.0)), None, "no promise in it");
        l.observe_leader(key(None, 13), t(0.0));
        assert_eq!(l.silence(t(100.0)), None, "no leader");
    }

    #[test]
    fn a_read_records_absent_keys_as_of_its_revision() {
        let mut l = LivenessTracker::new();
        let value = hb("a");
        l.observe_read(Some(("a", 10)), Some((&value, 12)), 15, t(1.0));
        assert_eq!(l.silence(t(2.0)).map(|s| s.heartbeat_revision), Some(12));
        // The key was deleted (revision 16), a later read sees nothing.
        l.observe_read(None, None, 17, t(3.0));
        assert_eq!(l.silence(t(9.0)), None);
        // A late watch event of the old key is no news.
        l.observe_leader(key(Some("a"), 10), t(3.5));
        assert_eq!(l.silence(t(9.0)), None);
    }

    #[test]
    fn a_change_of_the_leader_key_restarts_the_silence() {
        let mut l = LivenessTracker::new();
        l.observe_leader(key(Some("a"), 10), t(0.0));
        l.observe_heartbeat(key(Some(&hb("a")), 10), t(0.0));
        l.observe_leader(key(Some("a"), 20), t(4.0));
        l.observe_heartbeat(key(Some(&hb("a")), 20), t(4.1));
        let s = l.silence(t(5.0)).unwrap();
        assert_eq!((s.leader_revision, s.heartbeat_revision), (20, 20));
        assert!(s.silent_for <= Duration::from_millis(901));
    }
}
