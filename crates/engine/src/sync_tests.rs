//! The synchronous replication state machine, stepped until it converges, and the sync-aware
//! race rules.

use pgvigil_api::cluster::Versioned;
use pgvigil_api::{ClusterView, SyncValue};
use serde_json::Map;

use crate::sync::*;
use crate::tests::{cluster, config, peer, running};
use crate::*;

fn ws(name: &str, sync_state: &str, lsn: u64) -> WalSender {
    WalSender {
        application_name: name.into(),
        state: "streaming".into(),
        sync_state: sync_state.into(),
        lsn,
    }
}

fn with_key(mut view: ClusterView, members: &[&str], quorum: u32) -> ClusterView {
    view.sync = Some(Versioned {
        value: SyncValue {
            leader: Some("a".into()),
            quorum,
            sync_standby: (!members.is_empty()).then(|| members.join(",")),
        },
        mod_revision: 3,
    });
    view
}

fn step(
    view: &ClusterView,
    mode: SyncMode,
    strict: bool,
    guc: &str,
    senders: &[WalSender],
) -> Option<SyncStep> {
    next_step(&SyncInput {
        me: "a",
        mode,
        strict,
        node_count: 1,
        maximum_lag_on_syncnode: -1,
        cluster: view,
        current_guc: guc,
        walsenders: senders,
        guc_changed_at: 100,
        primary_lsn: 0,
    })
}

#[test]
fn guc_parse_and_render() {
    let g = Guc::parse("ANY 2 (b,\"Node-1\",c)");
    assert!(g.quorum && g.num == 2);
    assert_eq!(g.names, ["b", "Node-1", "c"]);
    assert_eq!(g.render(), "ANY 2 (\"Node-1\",b,c)");
    assert_eq!(Guc::parse("bb").render(), "bb");
    assert_eq!(Guc::parse("2 (x,y)").render(), "2 (x,y)");
    assert_eq!(Guc::parse("").render(), "");
}

#[test]
fn classic_mode_adds_to_the_guc_first_and_trusts_after_confirmation() {
    let view = cluster(Some("a"));
    assert_eq!(
        step(&view, SyncMode::On, false, "", &[]),
        Some(SyncStep::WriteKey(SyncValue {
            leader: Some("a".into()),
            quorum: 0,
            sync_standby: None
        }))
    );
    let view = with_key(cluster(Some("a")), &[], 0);
    let senders = [ws("bb", "async", 50), ws("ccc", "async", 40)];
    assert_eq!(
        step(&view, SyncMode::On, false, "", &senders),
        Some(SyncStep::SetGuc("bb".into()))
    );
    // Listed but not yet confirmed: nothing to do.
    let senders = [ws("bb", "sync", 50), ws("ccc", "async", 40)];
    assert_eq!(step(&view, SyncMode::On, false, "bb", &senders), None);
    let senders = [ws("bb", "sync", 150), ws("ccc", "async", 140)];
    let Some(SyncStep::WriteKey(k)) = step(&view, SyncMode::On, false, "bb", &senders) else {
        panic!()
    };
    assert_eq!(k.sync_standby.as_deref(), Some("bb"));
    let view = with_key(cluster(Some("a")), &["bb"], 0);
    assert_eq!(step(&view, SyncMode::On, false, "bb", &senders), None);
}

#[test]
fn classic_mode_removes_from_the_key_before_the_guc() {
    let view = with_key(cluster(Some("a")), &["bb"], 0);
    // bb is gone, ccc streams: first forget bb in the key, then switch the GUC.
    let senders = [ws("ccc", "async", 150)];
    let Some(SyncStep::WriteKey(k)) = step(&view, SyncMode::On, false, "bb", &senders) else {
        panic!()
    };
    assert_eq!(k.sync_standby, None);
    let view = with_key(cluster(Some("a")), &[], 0);
    assert_eq!(
        step(&view, SyncMode::On, false, "bb", &senders),
        Some(SyncStep::SetGuc("ccc".into()))
    );
    // Nobody left and not strict: stop waiting.
    assert_eq!(
        step(&view, SyncMode::On, false, "ccc", &[]),
        Some(SyncStep::SetGuc(String::new()))
    );
}

#[test]
fn strict_mode_never_falls_back_to_async() {
    let view = with_key(cluster(Some("a")), &["bb"], 0);
    assert_eq!(
        step(&view, SyncMode::On, true, "bb", &[]),
        None,
        "keeps waiting for bb"
    );
    let view = with_key(cluster(Some("a")), &[], 0);
    assert_eq!(
        step(&view, SyncMode::On, true, "", &[]),
        Some(SyncStep::SetGuc(STRICT_ANY.into()))
    );
    // A GUC written by a later Patroni (its placeholder) is read as "nobody" too.
    assert_eq!(
        step(&view, SyncMode::On, true, STRICT_PLACEHOLDER, &[]),
        Some(SyncStep::SetGuc(STRICT_ANY.into()))
    );
}

#[test]
fn strict_quorum_mode_without_a_standby_waits_for_any_one_as_patroni_writes_it() {
    let view = with_key(cluster(Some("a")), &[], 0);
    assert_eq!(
        step(&view, SyncMode::Quorum, true, "", &[]),
        Some(SyncStep::SetGuc("ANY 1 (*)".into()))
    );
    assert_eq!(step(&view, SyncMode::Quorum, true, "ANY 1 (*)", &[]), None);
    // A standby streams: named in the GUC first, then in the key once confirmed.
    let senders = [ws("bb", "quorum", 150)];
    assert_eq!(
        step(&view, SyncMode::Quorum, true, "ANY 1 (*)", &senders),
        Some(SyncStep::SetGuc("ANY 1 (bb)".into()))
    );
}

#[test]
fn maximum_lag_on_syncnode_drops_a_lagging_standby_even_a_lone_one() {
    let view = with_key(cluster(Some("a")), &["bb"], 0);
    let with_lag = |senders: &[WalSender], primary_lsn: u64| {
        candidates(&SyncInput {
            me: "a",
            mode: SyncMode::On,
            strict: false,
            node_count: 1,
            maximum_lag_on_syncnode: 1000,
            cluster: &view,
            current_guc: "bb",
            walsenders: senders,
            guc_changed_at: 100,
            primary_lsn,
        })
    };
    // bb is synchronous but stuck 5000 bytes behind ccc: ccc is chosen.
    assert_eq!(
        with_lag(&[ws("bb", "sync", 1000), ws("ccc", "async", 6000)], 6000),
        ["ccc"]
    );
    // Within the limit the synchronous one stays first.
    assert_eq!(
        with_lag(&[ws("bb", "sync", 5500), ws("ccc", "async", 6000)], 6000),
        ["bb", "ccc"]
    );
    // Alone, it is measured against the primary, as in Patroni.
    assert!(with_lag(&[ws("bb", "sync", 1000)], 6000).is_empty());
    assert_eq!(
        with_lag(&[ws("bb", "sync", 1000)], 0),
        ["bb"],
        "primary position unknown"
    );
}

#[test]
fn a_member_meant_to_cascade_from_a_streaming_standby_is_no_candidate() {
    let mut view = with_key(cluster(Some("a")), &[], 0);
    let set_upstream = |view: &mut ClusterView, up: &str| {
        view.members[2]
            .data
            .tags
            .insert("replicatefrom".into(), serde_json::json!(up));
    };
    let pick = |view: &ClusterView, senders: &[WalSender]| {
        candidates(&SyncInput {
            me: "a",
            mode: SyncMode::On,
            strict: false,
            node_count: 2,
            maximum_lag_on_syncnode: -1,
            cluster: view,
            current_guc: "",
            walsenders: senders,
            guc_changed_at: 100,
            primary_lsn: 0,
        })
    };
    let both = [ws("bb", "async", 150), ws("ccc", "async", 150)];
    set_upstream(&mut view, "bb");
    // ccc streams from us while bb does too: it is meant to follow bb, so it is left out.
    assert_eq!(pick(&view, &both), ["bb"]);
    // bb does not stream from us: ccc's fallback to the primary makes it a candidate.
    assert_eq!(pick(&view, &[ws("ccc", "async", 150)]), ["ccc"]);
    // replicatefrom naming the primary itself (Patroni's basic_replication feature): a candidate.
    set_upstream(&mut view, "a");
    assert_eq!(pick(&view, &both), ["bb", "ccc"]);
    // A loop of replicatefrom tags leads to no standby streaming from us: both count.
    set_upstream(&mut view, "bb");
    view.members[1]
        .data
        .tags
        .insert("replicatefrom".into(), serde_json::json!("ccc"));
    assert_eq!(pick(&view, &both), ["bb", "ccc"]);
}

#[test]
fn nosync_members_are_never_chosen() {
    let mut view = with_key(cluster(Some("a")), &[], 0);
    view.members[1]
        .data
        .tags
        .insert("nosync".into(), serde_json::json!(true));
    let senders = [ws("bb", "async", 150), ws("ccc", "async", 140)];
    assert_eq!(
        step(&view, SyncMode::On, false, "", &senders),
        Some(SyncStep::SetGuc("ccc".into()))
    );
}

#[test]
fn quorum_mode_converges_to_any_n_of_all_streaming_members() {
    let senders = [ws("bb", "quorum", 150), ws("ccc", "quorum", 150)];
    let mut view = with_key(cluster(Some("a")), &[], 0);
    let mut guc = String::new();
    let mut steps = 0;
    while let Some(s) = step(&view, SyncMode::Quorum, false, &guc, &senders) {
        match s {
            SyncStep::SetGuc(g) => guc = g,
            SyncStep::WriteKey(k) => {
                view.sync = Some(Versioned {
                    value: k,
                    mod_revision: 4,
                })
            }
            SyncStep::DeleteKey => panic!("unexpected delete"),
        }
        steps += 1;
        assert!(steps < 10, "does not converge");
    }
    assert_eq!(guc, "ANY 1 (bb,ccc)");
    let key = &view.sync.as_ref().unwrap().value;
    assert_eq!((key.sync_standby.as_deref(), key.quorum), (Some("bb,ccc"), 1));
}

#[test]
fn quorum_mode_turns_a_classic_guc_into_any() {
    // synchronous_node_count 2 in classic mode, then quorum mode: same standbys, same number.
    let senders = [ws("bb", "sync", 150), ws("ccc", "sync", 150)];
    let mut view = with_key(cluster(Some("a")), &["bb", "ccc"], 0);
    let input = |view: &ClusterView, guc: &str| {
        next_step(&SyncInput {
            me: "a",
            mode: SyncMode::Quorum,
            strict: false,
            node_count: 2,
            maximum_lag_on_syncnode: -1,
            cluster: view,
            current_guc: guc,
            walsenders: &senders,
            guc_changed_at: 100,
            primary_lsn: 0,
        })
    };
    assert_eq!(
        input(&view, "2 (bb,ccc)"),
        Some(SyncStep::SetGuc("ANY 2 (bb,ccc)".into()))
    );
    assert_eq!(input(&view, "ANY 2 (bb,ccc)"), None);
    view = with_key(view, &["bb", "ccc"], 0);
    assert_eq!(input(&view, "ANY 2 (bb,ccc)"), None);
}

#[test]
fn mode_off_deletes_the_key() {
    let view = with_key(cluster(Some("a")), &["bb"], 0);
    assert_eq!(
        step(&view, SyncMode::Off, false, "bb", &[]),
        Some(SyncStep::DeleteKey)
    );
    assert_eq!(step(&cluster(Some("a")), SyncMode::Off, false, "", &[]), None);
}

#[test]
fn promotion_guc_keeps_waiting_in_strict_and_quorum_modes() {
    let view = with_key(cluster(Some("a")), &["bb", "ccc"], 1);
    assert_eq!(
        before_promotion("bb", SyncMode::On, false, &view),
        Some(String::new())
    );
    assert_eq!(
        before_promotion("bb", SyncMode::On, true, &view),
        Some("ccc".into())
    );
    assert_eq!(
        before_promotion("bb", SyncMode::Quorum, false, &view),
        Some(String::new())
    );
    let view = with_key(cluster(Some("a")), &[], 0);
    assert_eq!(
        before_promotion("bb", SyncMode::On, true, &view),
        Some(STRICT_ANY.into())
    );
    assert_eq!(
        before_promotion("bb", SyncMode::Quorum, true, &view),
        Some("ANY 1 (*)".into())
    );
}

fn race_with(cfg: &EngineConfig, view: &ClusterView, own: u64, peers: &[PeerReport]) -> Decision {
    let pg = running(true, 1, own, None);
    decide(&crate::tests::inputs(
        cfg,
        Some(view),
        &pg,
        &Memory::default(),
        Some(peers),
        None,
    ))
}

#[test]
fn classic_mode_only_sync_standbys_race() {
    let mut view = with_key(cluster(None), &["bb"], 0);
    view.sync.as_mut().unwrap().value.leader = Some("a".into());
    let mut cfg = config("ccc");
    cfg.synchronous_mode = SyncMode::On;
    let d = race_with(&cfg, &view, 5000, &[]);
    assert!(d.actions.is_empty(), "{d:?}");
    let mut cfg = config("bb");
    cfg.synchronous_mode = SyncMode::On;
    assert_eq!(
        race_with(&cfg, &view, 900, &[peer("ccc", "replica", 1000, Map::new())]).actions,
        vec![Action::AcquireLock]
    );
}

#[test]
fn quorum_mode_needs_enough_voters_not_ahead() {
    let view = with_key(cluster(None), &["bb", "ccc"], 1);
    let mut cfg = config("bb");
    cfg.synchronous_mode = SyncMode::Quorum;
    // ccc is reachable and not ahead: one vote, quorum 1.
    let d = race_with(&cfg, &view, 1000, &[peer("ccc", "replica", 1000, Map::new())]);
    assert_eq!(d.actions, vec![Action::AcquireLock]);
    // ccc unreachable: nobody proves bb has every acknowledged commit.
    let d = race_with(
        &cfg,
        &view,
        1000,
        &[PeerReport {
            name: "ccc".into(),
            status: None,
        }],
    );
    assert!(d.actions.is_empty(), "{d:?}");
}

#[test]
fn lone_survivor_outside_the_quorum_does_not_promote() {
    // The new leader died before trusting anyone: its writes may exist nowhere else.
    let mut view = cluster(None);
    view.members.retain(|m| m.name == "ccc");
    view.sync = Some(Versioned {
        value: SyncValue {
            leader: Some("bb".into()),
            quorum: 0,
            sync_standby: None,
        },
        mod_revision: 3,
    });
    let mut cfg = config("ccc");
    cfg.synchronous_mode = SyncMode::Quorum;
    let d = race_with(&cfg, &view, 1000, &[]);
    assert!(d.actions.is_empty(), "{d:?}");
    // A voter with quorum 0 may.
    view.sync.as_mut().unwrap().value.sync_standby = Some("ccc".into());
    assert_eq!(
        race_with(&cfg, &view, 1000, &[]).actions,
        vec![Action::AcquireLock]
    );
}

/// The synchronous standby's host died: its walsender still says `streaming`, but the leader's
/// watch marks it `stalled` (no flush progress with WAL outstanding). The key lets it go first,
/// then the GUC names the other streaming replica, which is trusted once confirmed.
#[test]
fn a_stalled_synchronous_standby_is_replaced_by_a_streaming_one() {
    let view = with_key(cluster(Some("a")), &["bb"], 0);
    let mut stalled = ws("bb", "sync", 100);
    stalled.state = "stalled".into();
    let senders = [stalled.clone(), ws("ccc", "async", 150)];
    assert_eq!(
        step(&view, SyncMode::On, false, "bb", &senders),
        Some(SyncStep::WriteKey(SyncValue {
            leader: Some("a".into()),
            quorum: 0,
            sync_standby: None
        }))
    );
    let view = with_key(cluster(Some("a")), &[], 0);
    assert_eq!(
        step(&view, SyncMode::On, false, "bb", &senders),
        Some(SyncStep::SetGuc("ccc".into()))
    );
    let confirmed = [stalled, ws("ccc", "sync", 150)];
    assert_eq!(
        step(&view, SyncMode::On, false, "ccc", &confirmed),
        Some(SyncStep::WriteKey(SyncValue {
            leader: Some("a".into()),
            quorum: 0,
            sync_standby: Some("ccc".into())
        }))
    );
    // Strict mode with no other replica: keep waiting for the one we had, never loosen.
    let view = with_key(cluster(Some("a")), &["bb"], 0);
    let alone = [ws("bb", "sync", 100)].map(|mut w| {
        w.state = "stalled".into();
        w
    });
    assert_eq!(step(&view, SyncMode::On, true, "bb", &alone), None);
}
