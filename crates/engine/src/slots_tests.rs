//! The slot set (`docs/patroni-compat.md` §5.8): one test per rule, on leader `a` of
//! [`crate::tests::cluster`] (members `a`, `bb`, `ccc`) unless it says otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use pgvigil_api::ClusterView;
use serde_json::{Map, Value, json};

use crate::slots::{LocalSlot, LogicalSlot, PublishedSlots, SlotKind, SlotPlan, SlotsConfig};
use crate::tests::{cluster, config, decide_with, running, test_now};
use crate::*;

pub(crate) fn physical(name: &str, restart_lsn: u64) -> LocalSlot {
    LocalSlot {
        name: name.into(),
        kind: SlotKind::Physical,
        active: false,
        restart_lsn: Some(restart_lsn),
        confirmed_flush_lsn: None,
        has_xmin: false,
        lost: false,
        failover: false,
    }
}

pub(crate) fn logical(name: &str, database: &str, plugin: &str) -> LocalSlot {
    LocalSlot {
        kind: SlotKind::Logical {
            database: database.into(),
            plugin: plugin.into(),
        },
        confirmed_flush_lsn: Some(700),
        ..physical(name, 600)
    }
}

/// The dynamic configuration's `slots` and `ignore_slots`, as the agent reads them.
pub(crate) fn slots_config(permanent: Value, ignore: Value) -> SlotsConfig {
    let permanent: Map<String, Value> = serde_json::from_value(permanent).unwrap();
    let ignore: Vec<Value> = serde_json::from_value(ignore).unwrap();
    SlotsConfig::from_dynamic(true, 1800, &permanent, &ignore)
}

/// Node `name` with a permanent logical slot `cdc` and a permanent physical slot `arch`.
pub(crate) fn cdc_and_arch(name: &str) -> EngineConfig {
    cfg(
        name,
        slots_config(
            json!({"cdc": {"database": "app", "plugin": "pgoutput"}, "arch": null}),
            json!([]),
        ),
    )
}

pub(crate) fn cfg(name: &str, slots: SlotsConfig) -> EngineConfig {
    EngineConfig {
        slots,
        ..config(name)
    }
}

/// `name`'s decision on `view`, running (as primary unless `replica`) with these local slots.
pub(crate) fn decide_slots(
    cfg: &EngineConfig,
    view: &ClusterView,
    replica: bool,
    slots: Vec<LocalSlot>,
    memory: &Memory,
) -> Decision {
    // A nostream replica has no WAL receiver: it recovers from the archive.
    let upstream = (replica && !cfg.nostream()).then_some(("127.0.0.1", 5433));
    let mut pg = running(replica, 1, 1000, upstream);
    pg.observed.as_mut().unwrap().slots = slots;
    decide_with(cfg, Some(view), &pg, memory)
}

/// The leader's plan and what it publishes.
fn leader(
    cfg: &EngineConfig,
    view: &ClusterView,
    slots: Vec<LocalSlot>,
    memory: &Memory,
) -> (SlotPlan, PublishedSlots) {
    let d = decide_slots(cfg, view, false, slots, memory);
    match d.actions.first() {
        Some(Action::LeaderHousekeeping { slots, published }) => (slots.clone(), published.clone()),
        other => panic!("expected housekeeping, got {other:?} ({})", d.message),
    }
}

/// A replica's plan (`bb` following `a`); empty when it decided nothing about slots.
pub(crate) fn replica(
    cfg: &EngineConfig,
    view: &ClusterView,
    slots: Vec<LocalSlot>,
    memory: &Memory,
) -> SlotPlan {
    let d = decide_slots(cfg, view, true, slots, memory);
    match d.actions.as_slice() {
        [Action::ManageSlots(plan)] | [Action::ManageSlots(plan), Action::CopyLogicalSlots(_)] => {
            plan.clone()
        }
        [] | [Action::CopyLogicalSlots(_)] => SlotPlan::default(),
        other => panic!("unexpected actions {other:?} ({})", d.message),
    }
}

fn member_slots() -> Vec<LocalSlot> {
    vec![physical("bb", 900), physical("ccc", 900)]
}

fn with(mut slots: Vec<LocalSlot>, more: impl IntoIterator<Item = LocalSlot>) -> Vec<LocalSlot> {
    slots.extend(more);
    slots
}

#[test]
fn the_leader_drops_an_unknown_slot_but_never_an_ignored_or_permanent_one() {
    let view = cluster(Some("a"));
    let local = || {
        with(
            member_slots(),
            [
                physical("stray", 500),
                physical("backup_tool", 500),
                logical("cdc", "app", "pgoutput"),
                logical("other_cdc", "app", "test_decoding"),
                physical("kept", 500),
            ],
        )
    };
    let c = cfg(
        "a",
        slots_config(
            json!({"kept": null, "cdc": {"type": "logical", "database": "app", "plugin": "pgoutput"}}),
            json!([{"name": "backup_tool"}, {"type": "logical", "database": "app", "plugin": "test_decoding"}]),
        ),
    );
    let (plan, _) = leader(&c, &view, local(), &Memory::default());
    assert_eq!(plan.drop, ["stray"]);
    assert!(
        plan.create_physical.is_empty() && plan.create_logical.is_empty(),
        "{plan:?}"
    );

    // Without the configuration, all four are unknown.
    let (plan, _) = leader(
        &cfg("a", SlotsConfig::default()),
        &view,
        local(),
        &Memory::default(),
    );
    assert_eq!(plan.drop, ["stray", "backup_tool", "cdc", "other_cdc", "kept"]);
}

#[test]
fn an_ignore_matcher_must_match_every_attribute_it_names() {
    let view = cluster(Some("a"));
    let c = cfg(
        "a",
        slots_config(
            json!({}),
            json!([{"name": "cdc", "plugin": "wal2json"}, {"type": "physical", "name": "p"}]),
        ),
    );
    let local = with(
        member_slots(),
        [logical("cdc", "app", "pgoutput"), logical("p", "app", "x")],
    );
    let (plan, _) = leader(&c, &view, local, &Memory::default());
    assert_eq!(plan.drop, ["cdc", "p"]);
}

#[test]
fn the_leader_creates_missing_member_and_permanent_slots_but_none_for_itself() {
    let view = cluster(Some("a"));
    let c = cfg(
        "a",
        slots_config(
            json!({"archiver": null, "a": {"type": "physical"}, "cdc": {"database": "app", "plugin": "pgoutput"}}),
            json!([]),
        ),
    );
    let (plan, _) = leader(&c, &view, vec![], &Memory::default());
    assert_eq!(plan.create_physical, ["archiver", "bb", "ccc"]);
    assert_eq!(
        plan.create_logical,
        [LogicalSlot {
            name: "cdc".into(),
            database: "app".into(),
            plugin: "pgoutput".into()
        }]
    );
    assert!(plan.drop.is_empty());
    // Once they exist there is nothing to do.
    let local = with(
        member_slots(),
        [physical("archiver", 900), logical("cdc", "app", "pgoutput")],
    );
    let (plan, _) = leader(&c, &view, local, &Memory::default());
    assert_eq!(plan, SlotPlan::default());
}

#[test]
fn a_permanent_slot_of_another_kind_or_plugin_is_dropped_and_created_again() {
    let view = cluster(Some("a"));
    let c = cdc_and_arch("a");
    let local = with(
        member_slots(),
        [
            logical("cdc", "app", "wal2json"),
            logical("arch", "app", "pgoutput"),
        ],
    );
    let (plan, _) = leader(&c, &view, local, &Memory::default());
    assert_eq!(plan.drop, ["cdc", "arch"]);
    assert_eq!(plan.create_physical, ["arch"]);
    assert_eq!(plan.create_logical.len(), 1);
}

#[test]
fn nothing_is_dropped_in_maintenance_mode_nor_while_in_use() {
    let mut view = cluster(Some("a"));
    let c = cfg("a", SlotsConfig::default());
    let mut busy = physical("busy", 500);
    busy.active = true;
    let (plan, _) = leader(
        &c,
        &view,
        with(member_slots(), [busy.clone(), physical("stray", 1)]),
        &Memory::default(),
    );
    assert_eq!(plan.drop, ["stray"]);
    view.config.as_mut().unwrap().value = json!({"pause": true});
    let (plan, _) = leader(
        &c,
        &view,
        with(member_slots(), [busy, physical("stray", 1)]),
        &Memory::default(),
    );
    assert!(plan.drop.is_empty(), "{plan:?}");
}

#[test]
fn postgresql_17_failover_slots_are_left_alone() {
    let view = cluster(Some("a"));
    let mut slot = logical("sub", "app", "pgoutput");
    slot.failover = true;
    let (plan, _) = leader(
        &cfg("a", SlotsConfig::default()),
        &view,
        with(member_slots(), [slot]),
        &Memory::default(),
    );
    assert!(plan.drop.is_empty(), "{plan:?}");
}

#[test]
fn a_wanted_slot_whose_wal_is_lost_is_recreated() {
    let view = cluster(Some("a"));
    let mut lost = physical("ccc", 100);
    lost.lost = true;
    let (plan, _) = leader(
        &cfg("a", SlotsConfig::default()),
        &view,
        vec![physical("bb", 900), lost],
        &Memory::default(),
    );
    assert_eq!(plan.drop, ["ccc"]);
    assert_eq!(plan.create_physical, ["ccc"]);
}

#[test]
fn the_leader_publishes_slot_positions_and_the_member_slots_to_retain() {
    let view = cluster(Some("a"));
    let c = cdc_and_arch("a");
    let local = with(
        member_slots(),
        [
            logical("cdc", "app", "pgoutput"),
            physical("arch", 800),
            physical("stray", 5),
        ],
    );
    let (_, published) = leader(&c, &view, local.clone(), &Memory::default());
    let expected: BTreeMap<String, u64> = [
        ("a", 1000),
        ("arch", 800),
        ("bb", 900),
        ("ccc", 900),
        ("cdc", 700),
    ]
    .map(|(n, l)| (n.to_string(), l))
    .into();
    assert_eq!(published.slots, expected);
    assert_eq!(published.retain_slots, ["a", "bb", "ccc"]);

    // Without member slot retention only the permanent slots are published, and none retained.
    let mut c0 = c.clone();
    c0.slots.member_slots_ttl = Duration::ZERO;
    let (_, published) = leader(&c0, &view, local, &Memory::default());
    assert_eq!(published.slots.keys().collect::<Vec<_>>(), ["arch", "cdc"]);
    assert!(published.retain_slots.is_empty());
}

#[test]
fn a_departed_members_slot_is_kept_for_member_slots_ttl_then_dropped() {
    let mut view = cluster(Some("a"));
    view.members.retain(|m| m.name != "ccc");
    view.status.retain_slots = vec!["a".into(), "bb".into(), "ccc".into()];
    let c = cfg("a", SlotsConfig::default());
    let now = test_now();
    // Seen 10 minutes ago: still retained, the slot stays.
    let seen = |ago: u64| Memory {
        retained_slots_seen: Some(
            [("a", now), ("bb", now), ("ccc", now - Duration::from_secs(ago))]
                .map(|(n, t)| (n.to_string(), t))
                .into(),
        ),
        ..Default::default()
    };
    let (plan, published) = leader(&c, &view, member_slots(), &seen(600));
    assert!(plan.drop.is_empty(), "{plan:?}");
    assert_eq!(published.retain_slots, ["a", "bb", "ccc"]);
    // Past member_slots_ttl it is no longer retained...
    let (_, published) = leader(&c, &view, member_slots(), &seen(1800));
    assert_eq!(published.retain_slots, ["a", "bb"]);
    // ... and once `status` says so, every node drops it.
    view.status.retain_slots = published.retain_slots;
    let (plan, _) = leader(&c, &view, member_slots(), &seen(1800));
    assert_eq!(plan.drop, ["ccc"]);
    let plan = replica(
        &cfg("bb", SlotsConfig::default()),
        &view,
        vec![physical("a", 900), physical("ccc", 900)],
        &Memory::default(),
    );
    assert_eq!(plan.drop, ["ccc"]);
}

#[test]
fn a_new_leader_starts_the_retention_clock_of_the_published_retained_slots() {
    let mut view = cluster(Some("a"));
    view.members.retain(|m| m.name != "ccc");
    view.status.retain_slots = vec!["bb".into(), "ccc".into()];
    let (plan, published) = leader(
        &cfg("a", SlotsConfig::default()),
        &view,
        member_slots(),
        &Memory::default(),
    );
    assert!(plan.drop.is_empty(), "{plan:?}");
    assert_eq!(published.seen.get("ccc"), Some(&test_now()));
}

#[test]
fn replicas_keep_member_and_permanent_slots_advanced_to_the_published_positions() {
    let mut view = cluster(Some("a"));
    view.status.slots = [("a", 5000), ("ccc", 4000), ("arch", 3000), ("cdc", 2000)]
        .map(|(n, l)| (n.to_string(), json!(l)))
        .into_iter()
        .collect();
    let c = cdc_and_arch("bb");
    // Nothing yet: physical ones are created; logical ones only come from the primary (copied,
    // `logical_slots_tests.rs`), never created on a replica.
    let plan = replica(&c, &view, vec![], &Memory::default());
    assert_eq!(plan.create_physical, ["a", "arch", "ccc"]);
    assert!(plan.create_logical.is_empty() && plan.drop.is_empty(), "{plan:?}");
    // They exist: inactive ones move forward to what the leader published, the copy of the
    // logical slot too.
    let local = vec![
        physical("a", 4500),
        physical("ccc", 4000),
        physical("arch", 100),
        logical("cdc", "app", "pgoutput"),
        physical("stray", 1),
    ];
    let plan = replica(&c, &view, local, &Memory::default());
    assert_eq!(
        plan.advance,
        [("a".to_string(), 5000), ("arch".to_string(), 3000)]
    );
    assert_eq!(plan.copies.len(), 1, "{plan:?}");
    assert_eq!(plan.copies[0].advance_to, Some(2000));
    assert_eq!(plan.drop, ["stray"]);
    assert!(plan.create_physical.is_empty());
}

#[test]
fn a_replica_that_never_leads_keeps_only_the_slots_streamed_from_it() {
    let mut view = cluster(Some("a"));
    view.members[2]
        .data
        .tags
        .insert("replicatefrom".into(), json!("bb"));
    let mut c = cfg("bb", slots_config(json!({"arch": null}), json!([])));
    c.tags.insert("nofailover".into(), json!(true));
    let plan = replica(
        &c,
        &view,
        vec![physical("a", 10), physical("arch", 10)],
        &Memory::default(),
    );
    assert_eq!(plan.create_physical, ["ccc"]);
    assert_eq!(plan.drop, ["a", "arch"]);
}

#[test]
fn without_retention_the_leader_keeps_only_slots_streamed_from_it() {
    let mut view = cluster(Some("a"));
    view.members[2]
        .data
        .tags
        .insert("replicatefrom".into(), json!("bb"));
    let mut c = cfg("a", SlotsConfig::default());
    c.slots.member_slots_ttl = Duration::ZERO;
    let (plan, _) = leader(&c, &view, member_slots(), &Memory::default());
    assert_eq!(plan.drop, ["ccc"]);
    // bb keeps ccc's slot: ccc streams from it.
    let mut cb = cfg("bb", SlotsConfig::default());
    cb.slots.member_slots_ttl = Duration::ZERO;
    let plan = replica(&cb, &view, vec![physical("a", 10)], &Memory::default());
    assert_eq!(plan.create_physical, ["ccc"]);
    assert_eq!(plan.drop, ["a"]);
}

#[test]
fn use_slots_off_drops_every_unprotected_slot() {
    let view = cluster(Some("a"));
    let mut c = cfg(
        "a",
        slots_config(json!({"arch": null}), json!([{"name": "keep"}])),
    );
    c.slots.use_slots = false;
    let local = with(member_slots(), [physical("arch", 1), physical("keep", 1)]);
    let (plan, _) = leader(&c, &view, local, &Memory::default());
    assert_eq!(plan.drop, ["bb", "ccc", "arch"]);
}

#[test]
fn a_replica_with_nothing_to_do_stays_idle_and_forgets_a_leaders_retention_clock() {
    let view = cluster(Some("a"));
    let c = cfg("bb", SlotsConfig::default());
    let plan = replica(
        &c,
        &view,
        vec![physical("a", 10), physical("ccc", 10)],
        &Memory::default(),
    );
    assert_eq!(plan, SlotPlan::default());
    let was_leader = Memory {
        retained_slots_seen: Some(BTreeMap::new()),
        ..Default::default()
    };
    let d = decide_slots(
        &c,
        &view,
        true,
        vec![physical("a", 10), physical("ccc", 10)],
        &was_leader,
    );
    assert_eq!(d.actions, [Action::ManageSlots(SlotPlan::default())]);
}

#[test]
fn bad_permanent_slot_entries_are_skipped() {
    let c = slots_config(
        json!({"Bad-Name": null, "n1": 5, "n2": {"type": "logical"}, "n3": {"type": "other"}, "ok": {}}),
        json!(["not a mapping", {"name": "x"}]),
    );
    assert_eq!(c.permanent.keys().collect::<Vec<_>>(), ["ok"]);
    assert_eq!(c.ignore.len(), 1);
}
