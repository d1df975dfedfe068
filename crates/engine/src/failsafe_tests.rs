//! Failsafe mode (`docs/patroni-compat.md` §4.10): a primary that cannot reach the DCS goes on only
//! when every member accepted its `POST /failsafe`; a member the leader did not list may not race.

use serde_json::{Map, json};

use crate::tests::{cluster, config, decide_with, peer, running};
use crate::*;

#[test]
fn primary_without_dcs_continues_only_when_failsafe_confirmed() {
    let pg = running(false, 1, 1000, None);
    let d = decide_with(&config("a"), None, &pg, &Memory::default());
    assert_eq!(d.actions, vec![Action::Demote(DemoteMode::Offline)]);
    let confirmed = Memory {
        failsafe_confirmed: true,
        ..Default::default()
    };
    let d = decide_with(&config("a"), None, &pg, &confirmed);
    assert!(d.actions.is_empty(), "{d:?}");
    assert!(
        d.message
            .contains("failsafe mode is enabled and all members are accessible")
    );
    // A replica has nothing to confirm.
    let replica = running(true, 1, 1000, Some(("127.0.0.1", 5432)));
    assert!(
        decide_with(&config("a"), None, &replica, &confirmed)
            .actions
            .is_empty()
    );
}

#[test]
fn only_members_of_the_failsafe_key_race() {
    let mut view = cluster(None);
    let mut map = Map::new();
    map.insert("a".into(), json!("http://127.0.0.1:8008/a/patroni"));
    view.failsafe = Some(map);
    let pg = running(true, 1, 1000, Some(("127.0.0.1", 5432)));
    let mut cfg = config("bb");
    cfg.failsafe_mode = true;
    let peers = [peer("a", "replica", 900, Map::new())];
    let race = |cfg: &EngineConfig| {
        decide(&crate::tests::inputs(
            cfg,
            Some(&view),
            &pg,
            &Memory::default(),
            Some(&peers),
            None,
        ))
    };
    let d = race(&cfg);
    assert!(!d.actions.contains(&Action::AcquireLock), "{d:?}");
    assert!(d.message.contains("failsafe"), "{}", d.message);
    // Without failsafe mode the key is ignored.
    cfg.failsafe_mode = false;
    assert!(race(&cfg).actions.contains(&Action::AcquireLock));
}
