//! The fresh `GET /patroni` document: the loop's snapshot with WAL positions, timeline and
//! role re-read from PostgreSQL (see `pgvigil_rest::StatusProbe`).

use std::sync::Arc;
use std::time::Duration;

use pgvigil_api::rest::StatusDocument;
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
        doc.role = if st.in_recovery { "replica" } else { "primary" }.into();
        crate::supervisor::observe::apply_positions(&mut doc, &st);
        Some(doc)
    }
}
