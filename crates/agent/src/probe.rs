//! The fresh `GET /patroni` document: the loop's snapshot with WAL positions, timeline and
//! role re-read from PostgreSQL (see `pgvigil_rest::StatusProbe`).

use std::sync::Arc;
use std::time::Duration;

use pgvigil_api::rest::{StatusDocument, XlogInfo};
use pgvigil_postgres::Postgres;

pub struct PgProbe(pub Arc<Postgres>);

#[async_trait::async_trait]
impl pgvigil_rest::StatusProbe for PgProbe {
    async fn refresh(&self, base: &StatusDocument) -> Option<StatusDocument> {
        // Only a running server has positions worth refreshing; other states are the loop's.
        if base.state != "running" {
            return None;
        }
        let st = self.0.query_state(Duration::from_millis(900)).await.ok()?;
        let mut doc = base.clone();
        doc.timeline = (st.timeline > 0).then_some(st.timeline);
        if st.in_recovery {
            doc.role = "replica".into();
            doc.xlog = Some(XlogInfo {
                location: None,
                received_location: st.receive_lsn.or(st.replay_lsn),
                replayed_location: st.replay_lsn,
                replayed_timestamp: st.replay_timestamp.clone(),
                paused: Some(st.replay_paused),
            });
            doc.replication_state = st.wal_receiver_streaming.then(|| "streaming".to_string());
            doc.replication = None;
        } else {
            doc.role = "primary".into();
            doc.xlog = Some(XlogInfo {
                location: st.wal_flush_lsn,
                ..Default::default()
            });
            doc.replication_state = None;
            doc.replication = Some(st.replication.clone());
        }
        Some(doc)
    }
}
