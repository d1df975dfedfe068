//! The replication slot set of a node (`docs/patroni-compat.md` §5.8): which slots must exist,
//! which are created, advanced or dropped, and what the leader publishes in `status` about them.
//! Patroni's rules (`Cluster.get_replication_slots`, `SlotsHandler.sync_replication_slots`,
//! `AbstractDCS._build_retain_slots`) restated over the engine's inputs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgvigil_api::slots::{slot_name_for, valid_slot_name};
use pgvigil_api::{ClusterView, Member};
use serde_json::{Map, Value};

/// PostgreSQL 11: `pg_replication_slot_advance` exists. Below it Patroni keeps member slots
/// only where they are streamed from and no permanent logical slots (its `can_advance_slots`).
const CAN_ADVANCE_SLOTS: u32 = 110_000;

/// What kind of slot, and for a logical one where it decodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotKind {
    Physical,
    Logical { database: String, plugin: String },
}

/// One `ignore_slots` entry: a slot matching every attribute given is never dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotMatcher {
    pub name: Option<String>,
    /// `physical` or `logical`.
    pub kind: Option<String>,
    pub database: Option<String>,
    pub plugin: Option<String>,
}

/// The slot settings of the dynamic configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotsConfig {
    /// `postgresql.use_slots`.
    pub use_slots: bool,
    /// `member_slots_ttl`: how long the slot of a member whose key is gone is kept; with 0,
    /// nodes keep only the slots that are streamed from them.
    pub member_slots_ttl: Duration,
    /// `slots`: the permanent slots, by name.
    pub permanent: BTreeMap<String, SlotKind>,
    /// `ignore_slots`.
    pub ignore: Vec<SlotMatcher>,
}

impl Default for SlotsConfig {
    fn default() -> Self {
        SlotsConfig {
            use_slots: true,
            member_slots_ttl: Duration::from_secs(1800),
            permanent: BTreeMap::new(),
            ignore: Vec::new(),
        }
    }
}

/// The permanent slots that apply to this kind of cluster (Patroni's `cluster_type`): one
/// marked `primary` only outside a standby cluster, one marked `standby` only in one; in a
/// standby cluster only physical ones (Patroni's `permanent_physical_slots`: nobody there is a
/// primary that could create a logical slot, so there is nothing to copy either).
pub fn permanent_for_cluster(permanent: &Map<String, Value>, standby_cluster: bool) -> Map<String, Value> {
    let excluded = if standby_cluster { "primary" } else { "standby" };
    permanent
        .iter()
        .filter(|(_, v)| v.get("cluster_type").and_then(Value::as_str) != Some(excluded))
        .filter(|(_, v)| !standby_cluster || matches!(permanent_kind(v), Some(SlotKind::Physical)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl SlotsConfig {
    /// From the dynamic configuration's raw `slots` and `ignore_slots` values. The configuration
    /// crate has already reported bad entries (naming the key); here they are skipped, as
    /// Patroni skips them.
    pub fn from_dynamic(
        use_slots: bool,
        member_slots_ttl_secs: u64,
        permanent: &Map<String, Value>,
        ignore: &[Value],
    ) -> SlotsConfig {
        let permanent = permanent
            .iter()
            .filter(|(name, _)| valid_slot_name(name))
            .filter_map(|(name, v)| Some((name.clone(), permanent_kind(v)?)))
            .collect();
        let ignore = ignore
            .iter()
            .filter_map(Value::as_object)
            .map(|m| {
                let text = |key: &str| m.get(key).and_then(Value::as_str).map(str::to_string);
                SlotMatcher {
                    name: text("name"),
                    kind: text("type"),
                    database: text("database"),
                    plugin: text("plugin"),
                }
            })
            .collect();
        SlotsConfig {
            use_slots,
            member_slots_ttl: Duration::from_secs(member_slots_ttl_secs),
            permanent,
            ignore,
        }
    }
}

/// Patroni's reading of one permanent slot's value: empty (`null`, `{}`) is physical; a mapping
/// with `database` and `plugin` is logical unless `type` says otherwise; `type: physical` is
/// physical. Anything else is not a slot.
fn permanent_kind(v: &Value) -> Option<SlotKind> {
    let m = match v {
        Value::Null => return Some(SlotKind::Physical),
        Value::Object(m) => m,
        _ => return None,
    };
    let text = |key: &str| m.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
    let logical = text("database").zip(text("plugin"));
    match (text("type"), logical) {
        (None | Some("logical"), Some((database, plugin))) => Some(SlotKind::Logical {
            database: database.to_string(),
            plugin: plugin.to_string(),
        }),
        (None | Some("physical"), _) => Some(SlotKind::Physical),
        _ => None,
    }
}

/// One slot in the local `pg_replication_slots` (temporary slots and PostgreSQL 17's synced
/// failover slots on a standby are left out by the runtime: nobody manages them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSlot {
    pub name: String,
    pub kind: SlotKind,
    pub active: bool,
    pub restart_lsn: Option<u64>,
    pub confirmed_flush_lsn: Option<u64>,
    /// `xmin` is set: hot-standby feedback reached this slot.
    pub has_xmin: bool,
    /// `wal_status = 'lost'`: the WAL it needs is gone; it can never be used again.
    pub lost: bool,
    /// A logical slot with `failover` (PostgreSQL 17): PostgreSQL's own slot synchronisation
    /// owns it.
    pub failover: bool,
}

/// A logical slot to create, in its database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalSlot {
    pub name: String,
    pub database: String,
    pub plugin: String,
}

/// What the runtime does to this node's slots, in this order: drop, create, advance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// Dropped only if still inactive when the runtime gets to them.
    pub drop: Vec<String>,
    pub create_physical: Vec<String>,
    pub create_logical: Vec<LogicalSlot>,
    /// Inactive physical slots moved forward to a position another node published.
    pub advance: Vec<(String, u64)>,
    /// The copies of permanent logical slots this replica keeps: the runtime moves them
    /// forward and checks whether they are safe to use after a failover.
    pub copies: Vec<LogicalCopy>,
}

/// A replica's copy of a permanent logical slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalCopy {
    pub slot: LogicalSlot,
    /// Where to move it, in its database: the position the leader published, when the copy is
    /// behind it and not in use (PostgreSQL stops at what the replica replayed).
    pub advance_to: Option<u64>,
}

impl SlotPlan {
    pub fn is_empty(&self) -> bool {
        self.drop.is_empty()
            && self.create_physical.is_empty()
            && self.create_logical.is_empty()
            && self.advance.is_empty()
            && self.copies.is_empty()
    }
}

/// What the leader writes into `status` besides `optime`, and the retention clock it keeps.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PublishedSlots {
    /// `status.slots`: slot name → position (restart LSN, or confirmed flush LSN for a logical
    /// slot; the leader's own slot name → its WAL position).
    pub slots: BTreeMap<String, u64>,
    /// `status.retain_slots`: member slots every node keeps, also for members that are gone,
    /// until `member_slots_ttl` after the leader last saw them.
    pub retain_slots: Vec<String>,
    /// When the leader last saw each retained slot's member (the engine's memory of it).
    pub seen: BTreeMap<String, Instant>,
}

/// Without the instants of `seen`: decisions are logged and replayed (the simulation compares
/// traces of two runs), and an `Instant` differs between runs.
impl std::fmt::Debug for PublishedSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishedSlots")
            .field("slots", &self.slots)
            .field("retain_slots", &self.retain_slots)
            .finish_non_exhaustive()
    }
}

/// The facts the slot rules need about this node.
#[derive(Clone, Copy)]
pub struct SlotNode<'a> {
    pub me: &'a str,
    pub nofailover: bool,
    pub nostream: bool,
    pub replicatefrom: Option<&'a str>,
    /// Running as a primary (else a replica).
    pub primary: bool,
    /// A standby cluster's lock holder (§4.11): a replica that the cluster's other members
    /// stream from as they would from a primary.
    pub standby_leader: bool,
    pub server_version: u32,
    /// This node's WAL position (the leader publishes it under its own slot name).
    pub wal_position: u64,
    pub paused: bool,
    pub slots: &'a [LocalSlot],
}

/// One slot the node must have.
#[derive(Clone, Debug, PartialEq)]
struct Wanted {
    kind: SlotKind,
    /// A published position to advance an inactive physical slot to.
    lsn: Option<u64>,
    /// Whether a walsender should be using it here (`None`: unknown, a retained slot).
    expected_active: Option<bool>,
}

pub(crate) fn replicatefrom(m: &Member) -> Option<&str> {
    m.data
        .tags
        .get("replicatefrom")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn status_lsn(cluster: &ClusterView, name: &str) -> u64 {
    match cluster.status.slots.get(name) {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

/// The slots this node must have: member slots, retained slots, permanent slots.
fn wanted(cfg: &SlotsConfig, cluster: &ClusterView, node: &SlotNode<'_>) -> BTreeMap<String, Wanted> {
    let mut out = BTreeMap::new();
    if !cfg.use_slots {
        return out;
    }
    let me = node.me;
    let my_slot = slot_name_for(me);
    let can_advance = node.server_version >= CAN_ADVANCE_SLOTS;
    let retention = can_advance && !cfg.member_slots_ttl.is_zero();
    let leader = cluster.leader_name();
    // Whether `m` streams from this node: from the primary unless it cascades from another
    // existing member; from a replica only when it cascades from it.
    let streams_from_me = |m: &Member| {
        if node.primary || node.standby_leader {
            replicatefrom(m).is_none_or(|up| up == me || cluster.member(up).is_none())
        } else {
            replicatefrom(m) == Some(me) && Some(m.name.as_str()) != leader
        }
    };
    for m in cluster
        .members
        .iter()
        .filter(|m| m.name != me && !m.data.tag_bool("nostream"))
    {
        let keep = if retention {
            // With retention every node keeps a slot for every member, so whoever leads next
            // has it; a node that can never lead keeps only those streamed from it.
            !node.nofailover || replicatefrom(m) == Some(me)
        } else {
            streams_from_me(m)
        };
        if !keep {
            continue;
        }
        let name = slot_name_for(&m.name);
        let mut lsn = status_lsn(cluster, &name);
        if replicatefrom(m).is_some() {
            // It may stream from another node; its own report is what moves the slot here.
            lsn = lsn.max(m.data.xlog_location.unwrap_or(0));
        }
        out.insert(
            name,
            Wanted {
                kind: SlotKind::Physical,
                lsn: (lsn > 0).then_some(lsn),
                expected_active: Some(streams_from_me(m)),
            },
        );
    }
    if !node.nofailover {
        for name in &cluster.status.retain_slots {
            if *name != my_slot && !out.contains_key(name) {
                out.insert(
                    name.clone(),
                    Wanted {
                        kind: SlotKind::Physical,
                        lsn: None,
                        expected_active: None,
                    },
                );
            }
        }
    }
    permanent(cfg, cluster, node, can_advance, &my_slot, &mut out);
    out
}

/// Patroni's `_get_permanent_slots` and `_merge_permanent_slots`.
fn permanent(
    cfg: &SlotsConfig,
    cluster: &ClusterView,
    node: &SlotNode<'_>,
    can_advance: bool,
    my_slot: &str,
    out: &mut BTreeMap<String, Wanted>,
) {
    if node.nofailover {
        // A node that never leads needs no permanent slots: nobody will consume them there.
        return;
    }
    // A node that receives no WAL through a slot on the primary (nostream) gets no logical
    // slots: without its feedback they would not be safe to use after a failover.
    let feedback_path = !node.nostream && !cascade_loops(cluster, node);
    for (name, kind) in &cfg.permanent {
        match kind {
            SlotKind::Physical => {
                if !(can_advance || node.primary) || out.contains_key(name) || name == my_slot {
                    continue;
                }
                let cascading = cluster
                    .members
                    .iter()
                    .find(|m| slot_name_for(&m.name) == *name)
                    .and_then(|m| Some((replicatefrom(m)?, m.data.xlog_location.unwrap_or(0))));
                let lsn = status_lsn(cluster, name).max(cascading.map_or(0, |(_, l)| l));
                out.insert(
                    name.clone(),
                    Wanted {
                        kind: kind.clone(),
                        lsn: (lsn > 0).then_some(lsn),
                        expected_active: Some(cascading.is_none() && (node.primary || node.standby_leader)),
                    },
                );
            }
            SlotKind::Logical { .. } => {
                // Created on the primary; on a replica copied from the primary once it has a
                // position in `status.slots` and moved forward to it each cycle, so that it
                // survives a failover (Patroni's `_ensure_logical_slots_replica`). A name taken
                // by a member's slot stays the member's.
                if can_advance && feedback_path && !out.contains_key(name) {
                    let lsn = status_lsn(cluster, name);
                    out.insert(
                        name.clone(),
                        Wanted {
                            kind: kind.clone(),
                            lsn: (lsn > 0).then_some(lsn),
                            expected_active: None,
                        },
                    );
                }
            }
        }
    }
}

/// This node's `replicatefrom` chain comes back to itself (Patroni's `get_slot_name_on_primary`
/// returns no slot then).
fn cascade_loops(cluster: &ClusterView, node: &SlotNode<'_>) -> bool {
    let mut seen = vec![node.me.to_string()];
    let mut next = node.replicatefrom.filter(|up| *up != node.me).map(str::to_string);
    while let Some(up) = next {
        let Some(m) = cluster.member(&up) else {
            return false;
        };
        if seen.contains(&m.name) {
            return true;
        }
        if m.data.tag_bool("nostream") {
            return true;
        }
        seen.push(m.name.clone());
        next = replicatefrom(m).filter(|u| *u != m.name).map(str::to_string);
    }
    false
}

fn ignored(cfg: &SlotsConfig, slot: &LocalSlot) -> bool {
    let (kind, database, plugin) = match &slot.kind {
        SlotKind::Physical => ("physical", None, None),
        SlotKind::Logical { database, plugin } => ("logical", Some(database.as_str()), Some(plugin.as_str())),
    };
    cfg.ignore.iter().any(|m| {
        m.name.as_deref().is_none_or(|n| n == slot.name)
            && m.kind.as_deref().is_none_or(|k| k.is_empty() || k == kind)
            && m.database
                .as_deref()
                .is_none_or(|d| d.is_empty() || Some(d) == database)
            && m.plugin
                .as_deref()
                .is_none_or(|p| p.is_empty() || Some(p) == plugin)
    })
}

/// The plan for this node's slots: Patroni's `_drop_incorrect_slots`, `_ensure_physical_slots`
/// and, on the primary, `_ensure_logical_slots_primary`.
pub fn plan(cfg: &SlotsConfig, cluster: &ClusterView, node: &SlotNode<'_>) -> SlotPlan {
    let wanted = wanted(cfg, cluster, node);
    let can_advance = node.server_version >= CAN_ADVANCE_SLOTS;
    let mut plan = SlotPlan::default();
    let local: BTreeMap<&str, &LocalSlot> = node.slots.iter().map(|s| (s.name.as_str(), s)).collect();
    // Slots are never dropped in maintenance mode, nor while a walsender uses them.
    let may_drop = |s: &LocalSlot| !node.paused && !s.active;
    for s in node.slots {
        // PostgreSQL 17 synchronises failover slots itself.
        if s.failover && matches!(s.kind, SlotKind::Logical { .. }) {
            continue;
        }
        let drop = match wanted.get(&s.name) {
            // Unknown: dropped unless `ignore_slots` protects it.
            None => !ignored(cfg, s),
            // Wanted but unusable (its WAL is gone) or of another kind: dropped and recreated.
            Some(w) => s.lost || w.kind != s.kind,
        };
        if drop && may_drop(s) {
            plan.drop.push(s.name.clone());
        }
    }
    // Physical slots that hold back the xmin horizon while nothing is expected to stream from
    // them are dropped (and recreated) once a leader exists and this node is not a standby
    // about to take over.
    let clean_xmin = cluster
        .leader_name()
        .is_some_and(|l| l != node.me || node.primary);
    for (name, w) in &wanted {
        let existing = local.get(name.as_str()).filter(|_| !plan.drop.contains(name));
        match (&w.kind, existing) {
            (SlotKind::Physical, None) => plan.create_physical.push(name.clone()),
            (SlotKind::Physical, Some(s)) if can_advance && s.kind == SlotKind::Physical => {
                if w.expected_active == Some(true) || s.active {
                    continue;
                }
                if (clean_xmin && w.expected_active == Some(false) && s.has_xmin || s.restart_lsn.is_none())
                    && may_drop(s)
                {
                    // Dropped now, created again (reserving WAL from here) in the same pass.
                    plan.drop.push(name.clone());
                    plan.create_physical.push(name.clone());
                    continue;
                }
                if let (Some(to), Some(at)) = (w.lsn, s.restart_lsn)
                    && to > at
                    && !s.has_xmin
                {
                    plan.advance.push((name.clone(), to));
                }
            }
            (SlotKind::Logical { database, plugin }, None) if node.primary => {
                plan.create_logical.push(LogicalSlot {
                    name: name.clone(),
                    database: database.clone(),
                    plugin: plugin.clone(),
                });
            }
            // A replica's copy (`copy_logical` brings a missing one): moved forward while
            // nothing decodes from it. PostgreSQL stops at what the replica has replayed.
            (SlotKind::Logical { database, plugin }, Some(s)) if !node.primary && s.kind == w.kind => {
                let behind = |to: &u64| !s.active && s.confirmed_flush_lsn.is_some_and(|at| *to > at);
                plan.copies.push(LogicalCopy {
                    slot: LogicalSlot {
                        name: name.clone(),
                        database: database.clone(),
                        plugin: plugin.clone(),
                    },
                    advance_to: w.lsn.filter(behind),
                });
            }
            _ => {}
        }
    }
    plan
}

/// The permanent logical slots a replica must copy from the primary (Patroni's
/// `_ensure_logical_slots_replica` and `copy_logical_slots`): wanted here, missing (or about to
/// be dropped as unusable), and with a position the leader published, which proves the slot
/// exists there. Copying restarts PostgreSQL, so nothing is copied in maintenance mode.
pub fn to_copy(
    cfg: &SlotsConfig,
    cluster: &ClusterView,
    node: &SlotNode<'_>,
    plan: &SlotPlan,
) -> Vec<LogicalSlot> {
    if node.primary || node.paused {
        return Vec::new();
    }
    wanted(cfg, cluster, node)
        .into_iter()
        .filter_map(|(name, w)| match w.kind {
            SlotKind::Logical { database, plugin } if w.lsn.is_some() => {
                let missing = !node.slots.iter().any(|s| s.name == name) || plan.drop.contains(&name);
                missing.then_some(LogicalSlot {
                    name,
                    database,
                    plugin,
                })
            }
            _ => None,
        })
        .collect()
}

/// Whether this node must run with `hot_standby_feedback = on` (Patroni's
/// `should_enforce_hot_standby_feedback`): as a replica it keeps copies of permanent logical
/// slots, whose catalog rows the primary must not vacuum away, or a member cascading from it
/// does (its feedback reaches the primary only through this node).
pub fn needs_hot_standby_feedback(cfg: &SlotsConfig, cluster: &ClusterView, node: &SlotNode<'_>) -> bool {
    let mut seen = Vec::new();
    feedback_needed(cfg, cluster, node, &mut seen)
}

fn feedback_needed<'a>(
    cfg: &SlotsConfig,
    cluster: &'a ClusterView,
    node: &SlotNode<'a>,
    seen: &mut Vec<&'a str>,
) -> bool {
    let as_replica = SlotNode {
        primary: false,
        standby_leader: false,
        slots: &[],
        ..*node
    };
    if wanted(cfg, cluster, &as_replica)
        .values()
        .any(|w| matches!(w.kind, SlotKind::Logical { .. }))
    {
        return true;
    }
    if !cfg.use_slots || node.nostream || cascade_loops(cluster, node) {
        return false;
    }
    seen.push(node.me);
    let cascading: Vec<&Member> = cluster
        .members
        .iter()
        .filter(|m| replicatefrom(m) == Some(node.me) && Some(m.name.as_str()) != cluster.leader_name())
        .filter(|m| !seen.contains(&m.name.as_str()))
        .collect();
    cascading.into_iter().any(|m| {
        let member = SlotNode {
            me: &m.name,
            nofailover: m.data.failover_priority() <= 0,
            nostream: m.data.tag_bool("nostream"),
            replicatefrom: replicatefrom(m),
            ..as_replica
        };
        feedback_needed(cfg, cluster, &member, seen)
    })
}

/// Whether a replica's copy of a logical slot is safe to decode from once promoted (Patroni's
/// `_ready_logical_slots`): the catalog rows it needs were protected on the primary all along,
/// first by the primary's own slot (`primary_logical`, its `catalog_xmin` when this replica's
/// physical slot there first showed one), then by this replica's feedback through its physical
/// slot (`primary_physical`), which must not be ahead of what the copy needs (`standby_logical`).
pub fn copy_is_safe(primary_logical: u64, primary_physical: u64, standby_logical: u64) -> bool {
    primary_logical <= primary_physical && primary_physical <= standby_logical
}

/// What the leader publishes in `status` (Patroni's `Postgresql.slots`,
/// `Cluster.maybe_filter_permanent_slots` and `AbstractDCS._build_retain_slots`). `seen` is the
/// leader's memory from its previous cycle, `None` when it just became the leader: then the
/// retention clock of every slot in the current `retain_slots` starts now.
pub fn published(
    cfg: &SlotsConfig,
    cluster: &ClusterView,
    node: &SlotNode<'_>,
    seen: Option<&BTreeMap<String, Instant>>,
    now: Instant,
) -> PublishedSlots {
    let mut out = PublishedSlots {
        seen: match seen {
            Some(s) => s.clone(),
            None => cluster
                .status
                .retain_slots
                .iter()
                .map(|n| (n.clone(), now))
                .collect(),
        },
        ..Default::default()
    };
    let can_advance = node.server_version >= CAN_ADVANCE_SLOTS;
    let wanted = wanted(cfg, cluster, node);
    let my_slot = slot_name_for(node.me);
    let mut slots = BTreeMap::new();
    if can_advance {
        for s in node
            .slots
            .iter()
            .filter(|s| wanted.get(&s.name).is_some_and(|w| w.kind == s.kind))
        {
            let at = match s.kind {
                SlotKind::Physical => s.restart_lsn,
                SlotKind::Logical { .. } => s.confirmed_flush_lsn,
            };
            if let Some(at) = at {
                slots.insert(s.name.clone(), at);
            }
        }
        slots.insert(my_slot.clone(), node.wal_position);
    }
    if cfg.member_slots_ttl.is_zero() {
        // Without retention only the permanent slots' positions are of use to the others.
        let members: Vec<String> = cluster.members.iter().map(|m| slot_name_for(&m.name)).collect();
        slots.retain(|name, _| match cfg.permanent.get(name) {
            Some(SlotKind::Physical) => true,
            Some(SlotKind::Logical { .. }) => !members.contains(name),
            None => false,
        });
    }
    if !slots.is_empty() {
        let mut members: Vec<String> = cluster
            .members
            .iter()
            .filter(|m| !m.data.tag_bool("nostream"))
            .map(|m| slot_name_for(&m.name))
            .collect();
        if cluster.member(node.me).is_none() {
            members.push(my_slot);
        }
        for name in slots.keys() {
            if members.contains(name) && cfg.permanent.get(name) != Some(&SlotKind::Physical) {
                out.seen.insert(name.clone(), now);
            }
        }
    }
    out.seen
        .retain(|_, at| now.saturating_duration_since(*at) < cfg.member_slots_ttl);
    out.retain_slots = out.seen.keys().cloned().collect();
    out.slots = slots;
    out
}
