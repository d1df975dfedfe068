//! The [`Dcs`] operations on etcd v3: each one a read, a put or a transaction bounded by
//! `retry_timeout`, with the leader and member keys on this node's lease
//! (`docs/patroni-compat.md` §1.4-1.5).

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, Txn, TxnOp};
use pgvigil_api::cluster::RawKv;
use pgvigil_api::{ClusterView, FailoverValue, HistoryEntry, Keys, MemberData, StatusValue, SyncValue};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use super::Etcd3Dcs;
use crate::{Dcs, DcsError, DcsEvent, LockKeyEvent};

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

    async fn probe(&self, timeout: std::time::Duration) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let prefix = inner.keys.prefix();
        let range_end = inner.keys.range_end();
        inner
            .call_once_within("probing the etcd endpoint", timeout, |mut c| {
                let options = GetOptions::new().with_range(range_end).with_count_only();
                async move { c.get(prefix, Some(options)).await }
            })
            .await
            .map(drop)
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

    fn subscribe_lock_keys(&self) -> broadcast::Receiver<LockKeyEvent> {
        let receiver = self.inner.lock_events.subscribe();
        // The same watch feeds both channels.
        drop(self.subscribe());
        receiver
    }

    async fn touch_member(&self, data: &MemberData, lease: i64) -> Result<(), DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.member(inner.name());
        let value = to_json(data)?;
        let unchanged = inner.state().member_written.as_ref() == Some(&(value.clone(), lease));
        if unchanged {
            return Ok(());
        }
        inner
            .put(
                inner.deadline(),
                "writing our member key",
                &key,
                &value,
                Some(lease),
            )
            .await?;
        inner.state().member_written = Some((value, lease));
        Ok(())
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
}
