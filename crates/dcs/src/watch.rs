//! The background watch on the cluster prefix.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use pgvigil_api::Keys;

use crate::etcd::Inner;
use crate::{DcsError, DcsEvent, KeyState, LockKeyEvent};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Watches the prefix forever: read the current revision, watch from the next one, forward
/// events; on any error wait (backoff) and start over. Each (re-)established watch is announced
/// with [`DcsEvent::WatchRestarted`]. Ends only when the task is aborted.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    loop {
        let mut established = false;
        let error = session(&inner, &mut established).await;
        if established {
            backoff = MIN_BACKOFF;
        }
        if established || !failing {
            tracing::warn!(%error, "DCS watch interrupted, re-establishing");
        } else {
            tracing::debug!(%error, "DCS watch still failing");
        }
        failing = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One watch stream, from creation until it fails. Returns why it ended.
async fn session(inner: &Inner, established: &mut bool) -> DcsError {
    match session_inner(inner, established).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

async fn session_inner(inner: &Inner, established: &mut bool) -> Result<Never, DcsError> {
    let mut moves = inner.moves.subscribe();
    moves.mark_unchanged();
    let deadline = inner.deadline();
    let prefix = inner.keys.prefix();
    let range_end = inner.keys.range_end();
    let revision = inner
        .call(deadline, "watch: reading the revision", |mut c| {
            let options = GetOptions::new().with_range(range_end.clone()).with_count_only();
            async move {
                c.get(prefix, Some(options))
                    .await
                    .map(|r| r.header().map_or(0, |h| h.revision()))
            }
        })
        .await?;
    let mut stream = inner
        .call(deadline, "watch: creating the watch", |mut c| {
            let options = WatchOptions::new()
                .with_range(range_end.clone())
                .with_start_revision(revision + 1)
                .with_prev_key();
            async move { c.watch(prefix, Some(options)).await }
        })
        .await?;
    let created = tokio::time::timeout_at(deadline, stream.message())
        .await
        .map_err(|_| DcsError::Unavailable("watch: no confirmation in time".into()))?
        .map_err(DcsError::from)?;
    match created {
        Some(r) if r.created() && !r.canceled() => {}
        Some(r) => {
            return Err(DcsError::Unavailable(format!(
                "watch: not created: {}",
                r.cancel_reason()
            )));
        }
        None => {
            return Err(DcsError::Unavailable(
                "watch: stream closed before confirmation".into(),
            ));
        }
    }
    tracing::debug!(revision, "DCS watch established");
    *established = true;
    let _ = inner.events.send(DcsEvent::WatchRestarted);

    let name = inner.opts.member_name.as_str();
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            // Operations found the endpoint this stream is on unresponsive and moved on; a
            // hung member would keep the stream silent until HTTP/2 keep-alive gave up.
            _ = moves.changed() => {
                return Err(DcsError::Unavailable("the etcd endpoint in use changed".into()));
            }
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return Err(DcsError::Unavailable("watch stream closed".into())),
            Err(e) => return Err(DcsError::from(e)),
        };
        if response.canceled() {
            return Err(DcsError::Unavailable(format!(
                "watch canceled by etcd: {} (compact revision {})",
                response.cancel_reason(),
                response.compact_revision()
            )));
        }
        let mut batch: Vec<DcsEvent> = Vec::new();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let put = matches!(event.event_type(), EventType::Put);
            let value = String::from_utf8_lossy(kv.value());
            inner.state().observe(
                &inner.keys,
                name,
                &key,
                put.then_some((value.as_ref(), kv.lease())),
            );
            // A re-PUT of the same value on the same lease changes nothing for readers.
            let no_op = put
                && event
                    .prev_kv()
                    .is_some_and(|prev| prev.value() == kv.value() && prev.lease() == kv.lease());
            let state = || KeyState {
                value: put.then(|| value.to_string()),
                revision: kv.mod_revision(),
            };
            match inner.keys.relative(&key) {
                Some("leader") => drop(inner.lock_events.send(LockKeyEvent::Leader(state()))),
                Some("heartbeat") => drop(inner.lock_events.send(LockKeyEvent::Heartbeat(state()))),
                _ => {}
            }
            let kind = classify(&inner.keys, &key);
            if !no_op && !batch.contains(&kind) {
                batch.push(kind);
            }
        }
        for event in batch {
            let _ = inner.events.send(event);
        }
    }
}

/// The event kind of a change to `key`.
pub(crate) fn classify(keys: &Keys, key: &str) -> DcsEvent {
    match keys.relative(key) {
        Some("leader") => DcsEvent::LeaderChanged,
        Some("config") => DcsEvent::ConfigChanged,
        Some("status" | "optime/leader") => DcsEvent::StatusChanged,
        Some("failover") => DcsEvent::FailoverChanged,
        Some("sync") => DcsEvent::SyncChanged,
        Some(r) if r.starts_with("members/") => DcsEvent::MembersChanged,
        _ => DcsEvent::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_events() {
        let keys = Keys::new("/service", "b");
        assert_eq!(classify(&keys, "/service/b/leader"), DcsEvent::LeaderChanged);
        assert_eq!(classify(&keys, "/service/b/config"), DcsEvent::ConfigChanged);
        assert_eq!(classify(&keys, "/service/b/status"), DcsEvent::StatusChanged);
        assert_eq!(
            classify(&keys, "/service/b/optime/leader"),
            DcsEvent::StatusChanged
        );
        assert_eq!(classify(&keys, "/service/b/members/x"), DcsEvent::MembersChanged);
        assert_eq!(classify(&keys, "/service/b/failover"), DcsEvent::FailoverChanged);
        assert_eq!(classify(&keys, "/service/b/sync"), DcsEvent::SyncChanged);
        assert_eq!(classify(&keys, "/service/b/initialize"), DcsEvent::Other);
        assert_eq!(classify(&keys, "/service/b/history"), DcsEvent::Other);
    }
}
