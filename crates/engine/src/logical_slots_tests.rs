//! Copies of permanent logical slots on replicas (`docs/patroni-compat.md` §5.8): which are
//! copied from the primary, advanced, dropped, and where `hot_standby_feedback` is needed. On
//! [`crate::tests::cluster`] (members `a`, `bb`, `ccc`), `bb` a replica of leader `a`.

use pgvigil_api::ClusterView;
use serde_json::json;

use crate::slots::{LogicalCopy, LogicalSlot, SlotNode, copy_is_safe, needs_hot_standby_feedback};
use crate::slots_tests::{cdc_and_arch, decide_slots, logical, physical, replica, slots_config};
use crate::tests::cluster;
use crate::*;

/// `a` leads and published `cdc` at 2000.
fn published() -> ClusterView {
    let mut view = cluster(Some("a"));
    view.status.slots = [("a", 5000), ("cdc", 2000)]
        .map(|(n, l)| (n.to_string(), json!(l)))
        .into_iter()
        .collect();
    view
}

fn cdc() -> LogicalSlot {
    LogicalSlot {
        name: "cdc".into(),
        database: "app".into(),
        plugin: "pgoutput".into(),
    }
}

/// The member slots `bb` keeps with retention.
fn members() -> Vec<crate::slots::LocalSlot> {
    vec![physical("a", 5000), physical("ccc", 1000)]
}

fn actions(cfg: &EngineConfig, view: &ClusterView, slots: Vec<crate::slots::LocalSlot>) -> Vec<Action> {
    decide_slots(cfg, view, true, slots, &Memory::default()).actions
}

#[test]
fn a_replica_copies_a_permanent_logical_slot_once_the_leader_published_its_position() {
    let c = cdc_and_arch("bb");
    let local = || with_arch(members());
    // Published: copied (after the plan, which creates nothing logical itself).
    let acts = actions(&c, &published(), local());
    assert_eq!(
        acts.last(),
        Some(&Action::CopyLogicalSlots(vec![cdc()])),
        "{acts:?}"
    );
    assert!(matches!(&acts[..], [Action::CopyLogicalSlots(_)]), "{acts:?}");
    // Not published yet (the primary has not created it): nothing to copy.
    let acts = actions(&c, &cluster(Some("a")), local());
    assert!(
        !acts.iter().any(|a| matches!(a, Action::CopyLogicalSlots(_))),
        "{acts:?}"
    );
    // The primary creates it; it never copies.
    let d = decide_slots(
        &cdc_and_arch("a"),
        &published(),
        false,
        vec![],
        &Memory::default(),
    );
    assert!(
        !d.actions.iter().any(|a| matches!(a, Action::CopyLogicalSlots(_))),
        "{d:?}"
    );
}

fn with_arch(mut slots: Vec<crate::slots::LocalSlot>) -> Vec<crate::slots::LocalSlot> {
    slots.push(physical("arch", 0));
    slots.last_mut().unwrap().restart_lsn = Some(3000);
    slots
}

#[test]
fn no_copy_in_maintenance_mode_nor_on_nostream_or_nofailover_replicas() {
    let mut paused = published();
    paused.config = Some(pgvigil_api::Versioned {
        value: json!({"ttl": 30, "pause": true}),
        mod_revision: 2,
    });
    let c = cdc_and_arch("bb");
    let acts = actions(&c, &paused, with_arch(members()));
    assert!(
        !acts.iter().any(|a| matches!(a, Action::CopyLogicalSlots(_))),
        "{acts:?}"
    );
    for tag in ["nostream", "nofailover"] {
        let mut c = cdc_and_arch("bb");
        c.tags.insert(tag.into(), json!(true));
        let acts = actions(&c, &published(), with_arch(members()));
        assert!(
            !acts.iter().any(|a| matches!(a, Action::CopyLogicalSlots(_))),
            "{tag}: {acts:?}"
        );
        // A copy such a node has is not one it may keep.
        let plan = replica(
            &c,
            &published(),
            vec![logical("cdc", "app", "pgoutput")],
            &Memory::default(),
        );
        assert!(plan.drop.contains(&"cdc".to_string()), "{tag}: {plan:?}");
    }
}

#[test]
fn a_replica_keeps_its_copy_and_moves_it_forward_to_the_published_position() {
    let c = cdc_and_arch("bb");
    // Behind (700 < 2000): advanced in its database; kept, and looked after.
    let plan = replica(
        &c,
        &published(),
        with_arch(with_members(logical("cdc", "app", "pgoutput"))),
        &Memory::default(),
    );
    assert_eq!(plan.copies, [copy(Some(2000))]);
    assert!(plan.drop.is_empty() && plan.create_logical.is_empty(), "{plan:?}");
    let acts = actions(
        &c,
        &published(),
        with_arch(with_members(logical("cdc", "app", "pgoutput"))),
    );
    assert!(
        !acts.iter().any(|a| matches!(a, Action::CopyLogicalSlots(_))),
        "{acts:?}"
    );
    // Already there, or in use: nothing to advance, still looked after every cycle.
    let mut ahead = logical("cdc", "app", "pgoutput");
    ahead.confirmed_flush_lsn = Some(2000);
    let mut active = logical("cdc", "app", "pgoutput");
    active.active = true;
    for s in [ahead, active] {
        let plan = replica(&c, &published(), with_arch(with_members(s)), &Memory::default());
        assert_eq!(plan.copies, [copy(None)], "{plan:?}");
    }
}

fn copy(advance_to: Option<u64>) -> LogicalCopy {
    LogicalCopy {
        slot: cdc(),
        advance_to,
    }
}

fn with_members(s: crate::slots::LocalSlot) -> Vec<crate::slots::LocalSlot> {
    let mut slots = members();
    slots.push(s);
    slots
}

#[test]
fn a_copy_of_another_plugin_is_dropped_and_copied_again() {
    let c = cdc_and_arch("bb");
    let local = with_arch(with_members(logical("cdc", "app", "wal2json")));
    let acts = actions(&c, &published(), local);
    match &acts[..] {
        [Action::ManageSlots(plan), Action::CopyLogicalSlots(copy)] => {
            assert_eq!(plan.drop, ["cdc"]);
            assert!(plan.copies.is_empty(), "{plan:?}");
            assert_eq!(copy, &[cdc()]);
        }
        other => panic!("{other:?}"),
    }
}

fn node<'a>(me: &'a str, nofailover: bool, nostream: bool) -> SlotNode<'a> {
    SlotNode {
        me,
        nofailover,
        nostream,
        replicatefrom: None,
        primary: false,
        standby_leader: false,
        server_version: 150_000,
        wal_position: 0,
        paused: false,
        slots: &[],
    }
}

#[test]
fn hot_standby_feedback_is_needed_where_copies_are_kept_or_fed_through() {
    let view = published();
    let logical_cfg = cdc_and_arch("bb").slots;
    let physical_only = slots_config(json!({"arch": null}), json!([]));
    assert!(needs_hot_standby_feedback(
        &logical_cfg,
        &view,
        &node("bb", false, false)
    ));
    // The primary runs with it too (Patroni asks as for a replica): it is one after a switchover.
    assert!(needs_hot_standby_feedback(
        &logical_cfg,
        &view,
        &node("a", false, false)
    ));
    assert!(!needs_hot_standby_feedback(
        &physical_only,
        &view,
        &node("bb", false, false)
    ));
    assert!(!needs_hot_standby_feedback(
        &logical_cfg,
        &view,
        &node("bb", false, true)
    ));
    // A node that never leads keeps no copy, unless a member cascading from it does: its
    // feedback reaches the primary through this node.
    assert!(!needs_hot_standby_feedback(
        &logical_cfg,
        &view,
        &node("bb", true, false)
    ));
    let mut cascade = view.clone();
    cascade.members[2]
        .data
        .tags
        .insert("replicatefrom".into(), json!("bb"));
    assert!(needs_hot_standby_feedback(
        &logical_cfg,
        &cascade,
        &node("bb", true, false)
    ));
    cascade.members[2]
        .data
        .tags
        .insert("nostream".into(), json!(true));
    assert!(!needs_hot_standby_feedback(
        &logical_cfg,
        &cascade,
        &node("bb", true, false)
    ));
}

#[test]
fn a_copy_is_safe_once_the_replicas_feedback_took_over_protecting_its_catalog_rows() {
    // The primary's slot held rows from 100; our physical slot's feedback holds from 120,
    // and the copy needs rows from 130: protected all along.
    assert!(copy_is_safe(100, 120, 130));
    assert!(copy_is_safe(100, 100, 100));
    // Our feedback started after rows the primary's slot still needed could be vacuumed.
    assert!(!copy_is_safe(130, 120, 140));
    // The copy needs rows older than our feedback protects.
    assert!(!copy_is_safe(100, 120, 110));
}
