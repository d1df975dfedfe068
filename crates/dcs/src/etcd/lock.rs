//! The leader lock's transactions on etcd ([`LockStore`]): every write of a term compares the
//! leader key's `mod_revision` with the one the term's opening write produced, so it can only
//! succeed while nobody else has written the key since (`pgvigil-lock`'s timing argument).

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use super::Etcd3Dcs;
use crate::{DcsError, LeaderKey, LockStore, TermOpening, Written};

#[async_trait::async_trait]
impl LockStore for Etcd3Dcs {
    async fn grant(&self, ttl: Duration) -> Result<i64, DcsError> {
        let secs = i64::try_from(ttl.as_secs().max(1))
            .map_err(|_| DcsError::Other(format!("ttl {ttl:?} too large")))?;
        let response = self
            .inner
            .call_once(
                "lease grant",
                |mut c| async move { c.lease_grant(secs, None).await },
            )
            .await?;
        if !response.error().is_empty() {
            return Err(DcsError::Other(format!("lease grant: {}", response.error())));
        }
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, DcsError> {
        self.inner
            .call_once("lease keep-alive", |mut c| async move {
                match c.lease_keep_alive(lease).await {
                    // The stream closes when keeper and stream are dropped.
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("lease not found") => {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
    }

    async fn revoke(&self, lease: i64) -> Result<(), DcsError> {
        let result = self
            .inner
            .call_once(
                "revoking a lease",
                |mut c| async move { c.lease_revoke(lease).await },
            )
            .await;
        match result {
            Err(e) if e.is_lease_not_found() => Ok(()),
            other => other.map(drop),
        }
    }

    async fn open_term(
        &self,
        how: TermOpening,
        lease: i64,
        heartbeat: Option<&str>,
    ) -> Result<Written, DcsError> {
        let inner = &*self.inner;
        let (leader, hb, config) = (inner.keys.leader(), inner.keys.heartbeat(), inner.keys.config());
        let name = inner.name();
        let compares = match how {
            TermOpening::Acquire => vec![Compare::create_revision(leader.as_str(), CompareOp::Equal, 0)],
            TermOpening::TakeOver {
                leader_revision,
                heartbeat_revision,
                config_revision,
            } => vec![
                Compare::mod_revision(leader.as_str(), CompareOp::Equal, leader_revision),
                Compare::mod_revision(hb.as_str(), CompareOp::Equal, heartbeat_revision),
                if config_revision == 0 {
                    Compare::create_revision(config.as_str(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(config.as_str(), CompareOp::Equal, config_revision)
                },
            ],
            TermOpening::Move { leader_revision } => vec![
                Compare::mod_revision(leader.as_str(), CompareOp::Equal, leader_revision),
                Compare::value(leader.as_str(), CompareOp::Equal, name),
            ],
        };
        let on_lease = || Some(PutOptions::new().with_lease(lease));
        let mut ops = vec![TxnOp::put(leader.as_str(), name, on_lease())];
        ops.push(match heartbeat {
            Some(value) => TxnOp::put(hb.as_str(), value, on_lease()),
            None => TxnOp::delete(hb.as_str(), None),
        });
        let txn = Txn::new().when(compares).and_then(ops);
        let response = inner
            .call_once("opening a leader term", |mut c| async move { c.txn(txn).await })
            .await?;
        Ok(if response.succeeded() {
            Written::Applied(response.header().map_or(0, |h| h.revision()))
        } else {
            Written::Refused
        })
    }

    async fn heartbeat(
        &self,
        term_revision: i64,
        lease: i64,
        heartbeat: Option<&str>,
    ) -> Result<Written, DcsError> {
        let inner = &*self.inner;
        let leader = inner.keys.leader();
        let mut txn = Txn::new().when([Compare::mod_revision(
            leader.as_str(),
            CompareOp::Equal,
            term_revision,
        )]);
        if let Some(value) = heartbeat {
            let options = Some(PutOptions::new().with_lease(lease));
            txn = txn.and_then([TxnOp::put(inner.keys.heartbeat(), value, options)]);
        }
        let response = inner
            .call_once("leader heartbeat", |mut c| async move { c.txn(txn).await })
            .await?;
        Ok(match (response.succeeded(), heartbeat) {
            (false, _) => Written::Refused,
            (true, Some(_)) => Written::Applied(response.header().map_or(0, |h| h.revision())),
            (true, None) => Written::Applied(0),
        })
    }

    async fn release(&self, term_revision: i64) -> Result<bool, DcsError> {
        let inner = &*self.inner;
        let leader = inner.keys.leader();
        let txn = Txn::new()
            .when([Compare::mod_revision(
                leader.as_str(),
                CompareOp::Equal,
                term_revision,
            )])
            .and_then([
                TxnOp::delete(leader.as_str(), None),
                TxnOp::delete(inner.keys.heartbeat(), None),
            ]);
        let response = inner
            .call_once(
                "releasing the leader key",
                |mut c| async move { c.txn(txn).await },
            )
            .await?;
        Ok(response.succeeded())
    }

    async fn read_leader(&self) -> Result<Option<LeaderKey>, DcsError> {
        let inner = &*self.inner;
        let key = inner.keys.leader();
        let mut response = inner
            .call_once(
                "reading the leader key",
                |mut c| async move { c.get(key, None).await },
            )
            .await?;
        Ok(response.take_kvs().into_iter().next().map(|kv| LeaderKey {
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
        }))
    }
}
