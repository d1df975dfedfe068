//! The [`Dcs`] operations on etcd v3: each one a read, a put or a transaction bounded by
//! `retry_timeout`, with the leader and member keys on this node's lease
//! (`patroni-compat.md` §1.4-1.5).

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use pgvigil_api::cluster::RawKv;
use pgvigil_api::{ClusterView, FailoverValue, HistoryEntry, Keys, MemberData, StatusValue, SyncValue};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use super::Etcd3Dcs;
use crate::{Dcs, DcsError, DcsEvent, LeaseInfo};

fn kv_value(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.value()).into_owned()
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, DcsError> {
    serde_json::to_string(value).map_err(|e| DcsError::Other(format!("serializing a DCS value: {e}")))
}

#[async_trait::async_trait]
impl Dcs for Etcd3Dcs {
    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    async fn get_cluster(&self) -> Result<ClusterView, DcsError> {
        let inner = &*self.inner;
        let prefix = inner.keys.prefix();
        let range_end = inner.keys.range_end();
        let mut response = inner
            .call(inner.deadline(), "reading the cluster", |mut c| {
                let options = GetOptions::new().with_range(range_end.clone());
                async move { c.get(prefix, Some(options)).await }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let kvs: Vec<RawKv> = response
            .take_kvs()
            .into_iter()
            .map(|kv| RawKv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv_value(&kv),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })
            .collect();
        {
            let mut state = inner.state();
            let name = inner.name();
            for key in [
                inner.keys.member(name),
                inner.keys.status(),
                inner.keys.failsafe(),
            ] {
                let found = kvs.iter().find(|kv| kv.key == key);
                state.observe(
                    &inner.keys,
                    name,
                    &key,
                    found.map(|kv| (kv.value.as_str(), kv.lease)),
                );
            }
        }
        Ok(ClusterView::from_kvs(&inner.keys, revision, kvs))
    }

    fn subscribe(&self) -> broadcast::Receiver<DcsEvent> {
        let receiver = self.inner.events.subscribe();
        let mut task = self.watch_task.lock().unwrap_or_else(|e| e.into_inner());
        if task.as_ref().is_none_or(|t| t.is_finished()) {
            let inner = self.inner.clone();
            *task = Some(self.inner.runtime.spawn(crate::watch::run(inner)));
        }
        receiver
    }

    async fn refresh_lease(&self, ttl: u64) -> Result<LeaseInfo, DcsError> {
        let inner = &*self.inner;
        let deadline = inner.deadline();
        let _guard = tokio::time::timeout_at(deadline, inner.lease_lock.lock())
            .await
            .map_err(|_| DcsError::Unavailable("waiting for a concurrent lease operation".into()))?;
        let current = {
            let mut state = inner.state();
            state.ttl = Some(ttl);
            state.lease
        };
        if let Some(lease) = current.filter(|l| l.ttl == ttl) {
            let alive = inner
                .call(deadline, "lease keep-alive", |mut c| async move {
                    let sent_at = std::time::Instant::now();
                    match c.lease_keep_alive(lease.id).await {
                        // The stream is closed when keeper and stream are dropped.
                        Ok(_) => Ok(Some(sent_at)),
                        Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("lease not found") => {
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    }
                })
                .await?;
            match alive {
                Some(sent_at) => {
                    let refreshed = LeaseInfo { sent_at, ..lease };
                    let mut state = inner.state();
                    if state.lease.is_some_and(|l| l.id == lease.id) {
                        state.lease = Some(refreshed);
                    }
                    return Ok(refreshed);
                }
                None => {
                    tracing::info!(lease = lease.id, "our lease expired, granting a new one");
                    inner.drop_lease(lease.id);
                }
            }
        } else if let Some(lease) = current {
            tracing::info!(
                lease = lease.id,
                old_ttl = lease.ttl,
                ttl,
                "ttl changed, granting a new lease"
            );
        }
        inner.grant(deadline, ttl).await
    }

    fn current_lease(&self) -> Option<LeaseInfo> {
        self.inner.state().lease
    }

    async fn attempt_to_acquire_leader(&self) -> Result<bool, DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.leader();
        let name = inner.name();
        let deadline = inner.deadline();
        inner
            .with_lease(deadline, |lease| {
                // The failure branch reads the key, so that a retry after a lost answer still
                // recognises our own successful write.
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        name,
                        Some(PutOptions::new().with_lease(lease.id)),
                    )])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                async move {
                    let response = inner.txn(deadline, "acquiring the leader key", txn).await?;
                    if response.succeeded() {
                        return Ok(true);
                    }
                    let ours = response.op_responses().into_iter().any(|r| match r {
                        TxnOpResponse::Get(get) => get
                            .kvs()
                            .iter()
                            .any(|kv| kv.value() == name.as_bytes() && kv.lease() == lease.id),
                        _ => false,
                    });
                    Ok(ours)
                }
            })
            .await
    }

    async fn update_leader(&self, cached_leader_lease: Option<i64>) -> Result<bool, DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.leader();
        let name = inner.name();
        let deadline = inner.deadline();
        let lease = inner.ensure_lease(deadline).await?;
        if cached_leader_lease == Some(lease.id) {
            return Ok(true);
        }
        inner
            .with_lease(deadline, |lease| {
                let put = || TxnOp::put(key.as_str(), name, Some(PutOptions::new().with_lease(lease.id)));
                let recreate = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([put()]);
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, name)])
                    .and_then([put()])
                    .or_else([TxnOp::txn(recreate)]);
                async move {
                    let response = inner.txn(deadline, "updating the leader key", txn).await?;
                    if response.succeeded() {
                        return Ok(true);
                    }
                    Ok(response.op_responses().into_iter().any(|r| match r {
                        TxnOpResponse::Txn(nested) => nested.succeeded(),
                        _ => false,
                    }))
                }
            })
            .await
    }

    async fn take_leader(&self) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.leader();
        let deadline = inner.deadline();
        inner
            .with_lease(deadline, |lease| {
                inner.put(
                    deadline,
                    "taking the leader key",
                    &key,
                    inner.name(),
                    Some(lease.id),
                )
            })
            .await
    }

    async fn delete_leader(&self) -> Result<bool, DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.leader();
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, inner.name())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let response = inner
            .txn(inner.deadline(), "deleting the leader key", txn)
            .await?;
        Ok(response.succeeded()
            && response.op_responses().into_iter().any(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted() > 0,
                _ => false,
            }))
    }

    async fn touch_member(&self, data: &MemberData) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.member(inner.name());
        let value = to_json(data)?;
        let deadline = inner.deadline();
        inner
            .with_lease(deadline, |lease| {
                let (key, value) = (&key, &value);
                async move {
                    let unchanged = inner.state().member_written.as_ref() == Some(&(value.clone(), lease.id));
                    if unchanged {
                        return Ok(());
                    }
                    inner
                        .put(deadline, "writing our member key", key, value, Some(lease.id))
                        .await?;
                    inner.state().member_written = Some((value.clone(), lease.id));
                    Ok(())
                }
            })
            .await
    }

    async fn initialize_race(&self) -> Result<bool, DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.initialize();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), "", None)]);
        Ok(inner
            .txn(inner.deadline(), "initialize race", txn)
            .await?
            .succeeded())
    }

    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        let inner = &*self.inner;
        inner
            .put(
                inner.deadline(),
                "writing initialize",
                &inner.keys.initialize(),
                sysid,
                None,
            )
            .await
    }

    async fn cancel_initialization(&self) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.initialize();
        inner
            .call(inner.deadline(), "deleting initialize", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await
            .map(drop)
    }

    async fn set_config(&self, value: &Value, mod_revision: Option<i64>) -> Result<bool, DcsError> {
        let key = self.inner.keys.config();
        self.inner
            .put_versioned("writing config", &key, to_json(value)?, mod_revision)
            .await
    }

    async fn set_failover(&self, value: &FailoverValue, mod_revision: Option<i64>) -> Result<bool, DcsError> {
        let key = self.inner.keys.failover();
        self.inner
            .put_versioned("writing failover", &key, to_json(value)?, mod_revision)
            .await
    }

    async fn set_sync(&self, value: &SyncValue, mod_revision: Option<i64>) -> Result<bool, DcsError> {
        let key = self.inner.keys.sync();
        self.inner
            .put_versioned("writing sync", &key, to_json(value)?, mod_revision)
            .await
    }

    async fn delete_sync(&self, mod_revision: Option<i64>) -> Result<bool, DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.sync();
        let deadline = inner.deadline();
        match mod_revision {
            None => inner
                .call(deadline, "deleting sync", |mut c| {
                    let key = key.clone();
                    async move { c.delete(key, None).await }
                })
                .await
                .map(|_| true),
            Some(rev) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(key.as_str(), None)]);
                Ok(inner.txn(deadline, "deleting sync", txn).await?.succeeded())
            }
        }
    }

    async fn set_history(&self, history: &[HistoryEntry]) -> Result<(), DcsError> {
        let inner = &*self.inner;
        inner
            .put(
                inner.deadline(),
                "writing history",
                &inner.keys.history(),
                &to_json(history)?,
                None,
            )
            .await
    }

    async fn set_status(&self, status: &StatusValue) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let value = to_json(status)?;
        if inner.state().status_written.as_ref() == Some(&value) {
            return Ok(());
        }
        inner
            .put(
                inner.deadline(),
                "writing status",
                &inner.keys.status(),
                &value,
                None,
            )
            .await?;
        inner.state().status_written = Some(value);
        Ok(())
    }

    async fn set_failsafe(&self, map: &Map<String, Value>) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let value = to_json(map)?;
        if inner.state().failsafe_written.as_ref() == Some(&value) {
            return Ok(());
        }
        inner
            .put(
                inner.deadline(),
                "writing failsafe",
                &inner.keys.failsafe(),
                &value,
                None,
            )
            .await?;
        inner.state().failsafe_written = Some(value);
        Ok(())
    }

    async fn delete_cluster(&self) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let prefix = inner.keys.prefix();
        let range_end = inner.keys.range_end();
        inner.state().forget_writes();
        inner
            .call(inner.deadline(), "deleting the cluster", |mut c| {
                let options = DeleteOptions::new().with_range(range_end.clone());
                async move { c.delete(prefix, Some(options)).await }
            })
            .await?;
        inner.state().forget_writes();
        Ok(())
    }

    async fn revoke_lease(&self) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let deadline = inner.deadline();
        let _guard = tokio::time::timeout_at(deadline, inner.lease_lock.lock())
            .await
            .map_err(|_| DcsError::Unavailable("waiting for a concurrent lease operation".into()))?;
        let lease = {
            let mut state = inner.state();
            state.member_written = None;
            state.lease.take()
        };
        let Some(lease) = lease else {
            return Ok(());
        };
        let result = inner
            .call(deadline, "revoking our lease", |mut c| async move {
                c.lease_revoke(lease.id).await
            })
            .await;
        match result {
            Err(e) if e.is_lease_not_found() => Ok(()),
            other => other.map(drop),
        }
    }
}
