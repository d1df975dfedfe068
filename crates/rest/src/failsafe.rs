//! Failsafe mode, the REST side (`docs/patroni-compat.md` §2.6 `POST /failsafe`, §4.10).
//!
//! A primary that cannot reach etcd asks every member of the last known `failsafe` map, with
//! `POST /failsafe`, whether it may go on; it does only if all of them answer `200 Accepted`.
//! A replica that answers 200 promises not to race for the leader lock for `ttl` seconds: the
//! runtime treats the poster as a live leader for that long ([`FailsafeState::leader_alive`])
//! and checks, under the same lock, before it races ([`FailsafeState::begin_race`]). A replica
//! that is racing at that moment refuses the POST, so a 200 and a lock taken by the replier
//! can never overlap.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// What a leader posted (`{name, conn_url, api_url, slots}`).
#[derive(Clone, Debug, PartialEq)]
pub struct FailsafePost {
    pub name: String,
    pub conn_url: String,
    pub api_url: String,
    pub slots: Map<String, Value>,
}

impl FailsafePost {
    /// Reads a request body; `None` when `name` is missing.
    pub fn from_json(body: &Map<String, Value>) -> Option<FailsafePost> {
        let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let name = text("name");
        if name.is_empty() {
            return None;
        }
        Some(FailsafePost {
            name,
            conn_url: text("conn_url"),
            api_url: text("api_url"),
            slots: body
                .get("slots")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        })
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "conn_url": self.conn_url,
            "api_url": self.api_url,
            "slots": self.slots,
        })
    }
}

#[derive(Debug, Default)]
struct Inner {
    last: Option<(Instant, FailsafePost)>,
    racing: bool,
}

/// Shared by the REST server (which records posts) and the HA loop (which reads them and
/// races only when no leader vouched for itself within `ttl`).
#[derive(Debug, Default)]
pub struct FailsafeState {
    inner: Mutex<Inner>,
}

/// Held while the HA loop races for the lock; posts are refused meanwhile.
pub struct RaceGuard<'a> {
    state: &'a FailsafeState,
}

impl Drop for RaceGuard<'_> {
    fn drop(&mut self) {
        self.state.lock().racing = false;
    }
}

impl FailsafeState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a leader's post unless this node is racing for the lock right now; returns
    /// whether it was accepted.
    pub fn accept(&self, post: FailsafePost, now: Instant) -> bool {
        let mut inner = self.lock();
        if inner.racing {
            return false;
        }
        inner.last = Some((now, post));
        true
    }

    /// The leader that posted within the last `ttl`, if any.
    pub fn leader_alive(&self, ttl: Duration, now: Instant) -> Option<FailsafePost> {
        let inner = self.lock();
        let (at, post) = inner.last.as_ref()?;
        (now.saturating_duration_since(*at) < ttl).then(|| post.clone())
    }

    /// Starts a race for the leader lock, unless a leader posted within `ttl`. The race lasts
    /// as long as the guard.
    pub fn begin_race(&self, ttl: Duration, now: Instant) -> Option<RaceGuard<'_>> {
        let mut inner = self.lock();
        if inner
            .last
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < ttl)
        {
            return None;
        }
        inner.racing = true;
        Some(RaceGuard { state: self })
    }

    /// Forgets the last post (this node became the leader).
    pub fn clear(&self) {
        self.lock().last = None;
    }
}

/// How a node answers `POST /failsafe`: status, body, and the `lsn` header when known.
pub fn answer(
    enabled: bool,
    running_as_primary: bool,
    state: &FailsafeState,
    body: &Map<String, Value>,
    lsn: Option<u64>,
    now: Instant,
) -> (u16, &'static str, Option<u64>) {
    if !enabled {
        return (502, "", None);
    }
    if running_as_primary {
        return (500, "Running as a leader", None);
    }
    let Some(post) = FailsafePost::from_json(body) else {
        return (400, "", None);
    };
    if !state.accept(post, now) {
        return (503, "Racing for the leader lock", None);
    }
    (200, "Accepted", lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(name: &str) -> Map<String, Value> {
        serde_json::json!({"name": name, "conn_url": "postgres://h:5432/postgres", "api_url": "http://h:8008/patroni", "slots": {}})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn answers_like_patroni() {
        let s = FailsafeState::default();
        let now = Instant::now();
        assert_eq!(answer(false, false, &s, &body("a"), None, now).0, 502);
        assert_eq!(
            answer(true, true, &s, &body("a"), None, now),
            (500, "Running as a leader", None)
        );
        assert_eq!(answer(true, false, &s, &Map::new(), None, now).0, 400);
        assert_eq!(
            answer(true, false, &s, &body("a"), Some(7), now),
            (200, "Accepted", Some(7))
        );
        assert_eq!(s.leader_alive(Duration::from_secs(30), now).unwrap().name, "a");
    }

    #[test]
    fn a_post_blocks_races_for_ttl_and_a_race_blocks_posts() {
        let s = FailsafeState::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        {
            let _race = s.begin_race(ttl, t0).expect("nobody posted");
            assert!(!s.accept(FailsafePost::from_json(&body("a")).unwrap(), t0));
        }
        assert!(s.accept(FailsafePost::from_json(&body("a")).unwrap(), t0));
        assert!(s.begin_race(ttl, t0 + Duration::from_secs(29)).is_none());
        assert!(s.leader_alive(ttl, t0 + Duration::from_secs(30)).is_none());
        assert!(s.begin_race(ttl, t0 + Duration::from_secs(30)).is_some());
        s.accept(FailsafePost::from_json(&body("b")).unwrap(), t0);
        s.clear();
        assert!(s.leader_alive(ttl, t0).is_none());
    }
}
