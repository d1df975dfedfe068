//! A replica's copies of the permanent logical slots (`docs/patroni-compat.md` §5.8), as Patroni
//! keeps them (`SlotsHandler.copy_logical_slots`, `check_logical_slots_readiness`): the state
//! file read on the primary and installed here while PostgreSQL is down, the check that a copy
//! is safe to decode from once promoted, and `hot_standby_feedback`, without which the primary
//! would vacuum away the catalog rows a copy needs. Which slots, and when, is the engine's.

use std::collections::BTreeMap;
use std::time::Duration;

use pgvigil_api::ClusterView;
use pgvigil_api::slots::slot_name_for;
use pgvigil_engine::slots::{self, LogicalCopy, LogicalSlot, SlotNode, SlotsConfig};
use pgvigil_postgres::PrimaryLogicalSlot;

use super::PgSupervisor;
use super::actions::{Failed, Outcome, recoverable};

/// Reading the primary's slots (a few small files) and its slot positions.
const PRIMARY_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Copies whose safety after a failover is not established yet (Patroni's
/// `_logical_slots_processing_queue`): slot name → the slot's `catalog_xmin` on the primary
/// when this replica's physical slot there first carried feedback (`None`: not seen yet).
#[derive(Debug, Default)]
pub(super) struct Readiness {
    pending: BTreeMap<String, Option<u64>>,
    /// The copies found at start-up have been queued (they are checked like new ones).
    loaded: bool,
}

impl PgSupervisor {
    /// The slot rules' view of this node as a replica would be, for `hot_standby_feedback`.
    fn feedback_wanted(&self, view: &ClusterView) -> bool {
        // In a standby cluster only physical permanent slots apply (§4.11): no feedback is
        // enforced for logical ones, as Patroni's `set_enforce_hot_standby_feedback`.
        let cfg = SlotsConfig::from_dynamic(
            self.dynamic.use_slots,
            self.dynamic.member_slots_ttl,
            &slots::permanent_for_cluster(
                &self.dynamic.permanent_slots,
                self.dynamic.standby_cluster.is_some(),
            ),
            &self.dynamic.ignore_slots,
        );
        let tags = self.cfg.tags.to_published();
        let node = SlotNode {
            me: &self.cfg.name,
            nofailover: pgvigil_api::values::failover_priority(&tags) <= 0,
            nostream: self.cfg.tags.nostream,
            replicatefrom: tags
                .get("replicatefrom")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty()),
            primary: false,
            standby_leader: false,
            server_version: self
                .status
                .as_ref()
                .map_or(super::pgconf::PG_MAJOR * 10_000, |s| s.server_version),
            wal_position: 0,
            paused: view.is_paused(),
            slots: &[],
        };
        slots::needs_hot_standby_feedback(&cfg, view, &node)
    }

    /// Follows the cluster: whether `hot_standby_feedback` must be on (Patroni's
    /// `set_enforce_hot_standby_feedback`, §3.9). Without a cluster read the last answer
    /// stands, so an etcd outage does not turn it off.
    pub(super) fn refresh_hot_standby_feedback(&mut self) {
        if let Some(view) = self.cluster.as_ref() {
            self.hot_standby_feedback = self.feedback_wanted(view);
        }
    }

    /// `CopyLogicalSlots`: reads the slots' state files on the primary and, if any matches the
    /// configuration, restarts PostgreSQL with them installed in `pg_replslot` (PostgreSQL
    /// loads slots only at start-up). The restart is the same as an operator's, off the loop.
    pub(super) async fn copy_logical_slots(
        &mut self,
        view: Option<&ClusterView>,
        wanted: &[LogicalSlot],
    ) -> Outcome {
        let Some(leader) = view.and_then(ClusterView::leader_name) else {
            return Ok(false);
        };
        let (host, port) = Self::member_addr(view, leader)?;
        self.write_pgpass()?;
        let names: Vec<String> = wanted.iter().map(|s| s.name.clone()).collect();
        let found = self
            .pg
            .primary_logical_slots(&host, port, &names, PRIMARY_QUERY_TIMEOUT)
            .await
            .map_err(recoverable("reading the logical slots on the primary"))?;
        let copies: Vec<PrimaryLogicalSlot> =
            found.into_iter().filter(|p| matches_config(p, wanted)).collect();
        if copies.is_empty() {
            tracing::info!(slots = ?names, "the primary ({leader}) has none of the logical slots to copy yet");
            return Ok(false);
        }
        self.can_load(copies.len()).await.map_err(Failed::Recoverable)?;
        let copied: Vec<&str> = copies.iter().map(|c| c.name.as_str()).collect();
        tracing::info!(slots = ?copied, "copying logical slots from the primary ({leader}); restarting PostgreSQL to load them");
        self.restart_postgres_with(None, |pg| {
            copies
                .iter()
                .try_for_each(|c| pg.install_slot_state(&c.name, &c.state))
                .map_err(|e| format!("installing the copied slots: {e}"))
        })
        .await
        .map_err(|e| Failed::Recoverable(format!("copying logical slots: {e}")))?;
        for c in &copies {
            self.readiness.pending.insert(c.name.clone(), None);
        }
        Ok(true)
    }

    /// PostgreSQL refuses to start with a logical slot below `wal_level = logical` or with more
    /// slots than `max_replication_slots`: a copy that would keep the replica down is not made.
    async fn can_load(&self, copies: usize) -> Result<(), String> {
        let sql = "SELECT pg_catalog.current_setting('wal_level'),
                          pg_catalog.current_setting('max_replication_slots')::int
                            - (SELECT count(*) FROM pg_catalog.pg_replication_slots)";
        let rows = self
            .pg
            .query_rows(sql, Duration::from_secs(5))
            .await
            .map_err(|e| format!("checking wal_level and max_replication_slots: {e}"))?;
        let (level, free) = match rows.first().map(Vec::as_slice) {
            Some([Some(level), Some(free)]) => (level.clone(), free.parse::<i64>().unwrap_or(0)),
            _ => return Err("checking wal_level and max_replication_slots: no answer".into()),
        };
        if level != "logical" {
            return Err(format!(
                "not copying logical slots: wal_level is {level} here, PostgreSQL would not start with them"
            ));
        }
        if free < copies as i64 {
            return Err(format!(
                "not copying {copies} logical slots: only {free} free in max_replication_slots"
            ));
        }
        Ok(())
    }

    /// Carries out a replica's plan for its copies: moves each forward (one that cannot be,
    /// because its WAL is gone or it was invalidated, is dropped, so the next cycle copies it
    /// again, as Patroni does), then checks the ones not yet known to be safe.
    pub(super) async fn keep_logical_copies(&mut self, copies: &[LogicalCopy]) {
        for c in copies {
            let (s, Some(lsn)) = (&c.slot, c.advance_to) else {
                continue;
            };
            match self.pg.advance_logical_slot(&s.name, &s.database, lsn).await {
                Ok(()) => {}
                Err(e) if matches!(e.sqlstate(), Some("58P01" | "55000")) => {
                    tracing::warn!(slot = %s.name, "dropping the copy of the logical slot, to copy it again: {e}");
                    if let Err(e) = self.pg.drop_slot(&s.name).await {
                        tracing::warn!(slot = %s.name, "could not drop replication slot: {e}");
                    }
                }
                Err(e) => tracing::warn!(slot = %s.name, "could not advance logical replication slot: {e}"),
            }
        }
        if !self.readiness.loaded {
            self.readiness.loaded = true;
            for c in copies {
                self.readiness.pending.entry(c.slot.name.clone()).or_insert(None);
            }
        }
        self.readiness
            .pending
            .retain(|name, _| copies.iter().any(|c| c.slot.name == *name));
        if !self.readiness.pending.is_empty() {
            self.check_readiness().await;
        }
    }

    /// Patroni's `check_logical_slots_readiness`: asks the primary for the `catalog_xmin` of
    /// this replica's physical slot there and of the pending slots, and marks each copy safe
    /// once the physical slot's has overtaken the primary slot's and is not past the copy's.
    async fn check_readiness(&mut self) {
        let Some(view) = self.cluster.clone() else { return };
        let Some(leader) = view.leader_name().map(str::to_string) else {
            return;
        };
        let Ok((host, port)) = Self::member_addr(Some(&view), &leader) else {
            return;
        };
        let physical = slot_on_primary(&view, &self.cfg.name);
        let mut names: Vec<String> = self
            .readiness
            .pending
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        names.push(physical.clone());
        let on_primary = match self
            .pg
            .primary_catalog_xmins(&host, port, &names, PRIMARY_QUERY_TIMEOUT)
            .await
        {
            Ok(rows) => rows.into_iter().collect::<BTreeMap<_, _>>(),
            Err(e) => {
                tracing::warn!("could not check the physical slot {physical} on the primary: {e}");
                return;
            }
        };
        let Some(&physical_xmin) = on_primary.get(&physical) else {
            tracing::warn!("the physical slot {physical} does not exist on the primary");
            return;
        };
        if physical_xmin == 0 {
            // No feedback reached the primary through our slot yet: just started, not
            // streaming, or hot_standby_feedback off (only the last is worth a warning).
            let sql = "SELECT pg_catalog.current_setting('hot_standby_feedback')::boolean";
            match self.pg.query_rows(sql, Duration::from_secs(5)).await.as_deref() {
                Ok([row]) if row.first() == Some(&Some("t".to_string())) => {
                    tracing::debug!(
                        "logical slot copies wait for feedback to reach the primary's slot {physical}"
                    );
                }
                _ => tracing::warn!(
                    "logical slot failover requires hot_standby_feedback; the primary's slot {physical} has no catalog_xmin"
                ),
            }
            return;
        }
        for (name, xmin) in &on_primary {
            if let Some(v @ None) = self.readiness.pending.get_mut(name) {
                *v = Some(*xmin);
            }
        }
        let local: BTreeMap<String, u64> = match self.pg.local_catalog_xmins(Duration::from_secs(5)).await {
            Ok(rows) => rows.into_iter().collect(),
            Err(e) => {
                tracing::warn!("could not read the local logical slots: {e}");
                return;
            }
        };
        self.readiness.pending.retain(|name, primary_logical| {
            let Some(&standby) = local.get(name) else {
                return false;
            };
            let safe = primary_logical.is_some_and(|p| slots::copy_is_safe(p, physical_xmin, standby));
            if safe {
                tracing::info!(slot = %name, "logical slot is safe to be used after a failover");
            }
            !safe
        });
    }

    /// At promotion: the copies not known to be safe are kept (a consumer may still find its
    /// changes there), with a warning (Patroni's `on_promote`).
    pub(super) fn promoted_with_logical_copies(&mut self) {
        let pending = std::mem::take(&mut self.readiness.pending);
        if !pending.is_empty() {
            let names: Vec<&String> = pending.keys().collect();
            tracing::warn!("logical replication slots that might be unsafe to use after promote: {names:?}");
        }
    }
}

/// The primary's slot must be the one configured: same database and plugin (Patroni's
/// `compare_slots`); a mismatch is left for the primary's own plan to fix.
fn matches_config(p: &PrimaryLogicalSlot, wanted: &[LogicalSlot]) -> bool {
    let Some(w) = wanted.iter().find(|w| w.name == p.name) else {
        return false;
    };
    let same = w.database == p.database && w.plugin == p.plugin;
    if !same {
        tracing::warn!(
            slot = %p.name,
            "not copying the logical slot: configured for database {} plugin {}, the primary's is for {} {}",
            w.database, w.plugin, p.database, p.plugin
        );
    }
    same
}

/// The physical slot on the primary through which this node's feedback arrives: its own, or
/// that of the first member of its `replicatefrom` chain that streams from the primary
/// (Patroni's `get_slot_name_on_primary`).
fn slot_on_primary(view: &ClusterView, me: &str) -> String {
    let leader = view.leader_name();
    let mut current = me.to_string();
    let mut seen = vec![current.clone()];
    while let Some(up) = view
        .member(&current)
        .and_then(|m| m.data.tags.get("replicatefrom"))
        .and_then(|v| v.as_str())
        .filter(|up| Some(*up) != leader && view.member(up).is_some() && !seen.iter().any(|s| s == up))
    {
        current = up.to_string();
        seen.push(current.clone());
    }
    slot_name_for(&current)
}
