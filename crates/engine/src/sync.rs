//! Synchronous replication on the leader (`docs/patroni-compat.md` §4.9): which standbys PostgreSQL
//! waits for (`synchronous_standby_names`, "the GUC") and which ones the `sync` key names as
//! safe to promote. Pure: the runtime gathers the facts and performs one step at a time.
//!
//! The invariant that makes failover lossless: a member is in `/sync` only while PostgreSQL
//! waits for it. So members are added to the GUC first and to `/sync` only once they are
//! confirmed synchronous; they leave `/sync` first and the GUC afterwards. In quorum mode the
//! key and the GUC list the same members, changed one at a time so that any set of standbys able
//! to acknowledge a commit always intersects any set able to prove a candidate up to date.

use pgvigil_api::values::failover_priority;
use pgvigil_api::{ClusterView, Member, SyncValue};

/// What Patroni 4.1.5 puts in the GUC when strict mode has no standby to wait for: `*` (in
/// quorum mode `ANY 1 (*)`), so commits block until some standby confirms them. Safe: with
/// nobody in `/sync` no standby may be promoted (§4.9), so a commit a standby outside `/sync`
/// confirmed is not lost by a failover; the primary names real standbys as soon as they stream.
pub const STRICT_ANY: &str = "*";
/// The name later Patroni releases put there instead; read as the same "nobody yet".
pub const STRICT_PLACEHOLDER: &str = "__patroni_strict_sync_replica_placeholder__";

/// `*` or the placeholder: a GUC entry that stands for no member.
fn names_no_member(name: &str) -> bool {
    name == STRICT_ANY || name == STRICT_PLACEHOLDER
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    Off,
    On,
    Quorum,
}

/// One walsender as `pg_stat_replication` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct WalSender {
    pub application_name: String,
    pub state: String,
    /// `async`, `sync`, `potential` or `quorum`.
    pub sync_state: String,
    /// The position this standby confirmed (flush, or write/replay per `synchronous_commit`).
    pub lsn: u64,
}

#[derive(Clone, Debug)]
pub struct SyncInput<'a> {
    pub me: &'a str,
    pub mode: SyncMode,
    pub strict: bool,
    pub node_count: usize,
    /// Bytes a standby may lag behind the most advanced candidate; <= 0 disables the check.
    pub maximum_lag_on_syncnode: i64,
    pub cluster: &'a ClusterView,
    /// The running `synchronous_standby_names`.
    pub current_guc: &'a str,
    pub walsenders: &'a [WalSender],
    /// Our flush position when the GUC last changed: a newly listed standby counts as
    /// synchronous once it confirmed this far.
    pub guc_changed_at: u64,
    /// Our own flush position (0 when unknown).
    pub primary_lsn: u64,
}

/// The next step towards the target state. `None` when converged.
#[derive(Clone, Debug, PartialEq)]
pub enum SyncStep {
    /// Compare-and-set the `sync` key to this value.
    WriteKey(SyncValue),
    /// Set `synchronous_standby_names` and reload.
    SetGuc(String),
    /// Synchronous mode is off: delete the key (if ours) and stop managing the GUC.
    DeleteKey,
}

/// A parsed `synchronous_standby_names`: how many to wait for, among which names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Guc {
    pub quorum: bool,
    pub num: usize,
    pub names: Vec<String>,
}

impl Guc {
    pub fn parse(text: &str) -> Guc {
        let text = text.trim();
        if text.is_empty() {
            return Guc::default();
        }
        let (quorum, rest) = match text.get(..4) {
            Some(p) if p.eq_ignore_ascii_case("ANY ") => (true, &text[4..]),
            _ => match text.get(..6) {
                Some(p) if p.eq_ignore_ascii_case("FIRST ") => (false, &text[6..]),
                _ => (false, text),
            },
        };
        let rest = rest.trim();
        let (num, list) = match rest.find('(') {
            Some(open) => {
                let num = rest[..open].trim().parse().unwrap_or(1);
                (num, rest[open + 1..].trim_end_matches(')'))
            }
            None => (1, rest),
        };
        let names = list
            .split(',')
            .map(|n| n.trim().trim_matches('"').to_string())
            .filter(|n| !n.is_empty())
            .collect();
        Guc { quorum, num, names }
    }

    pub fn render(&self) -> String {
        if self.names.is_empty() {
            return String::new();
        }
        let mut names: Vec<String> = self.names.iter().map(|n| quote(n)).collect();
        names.sort();
        if self.quorum {
            format!("ANY {} ({})", self.num, names.join(","))
        } else if names.len() == 1 {
            names.remove(0)
        } else {
            format!("{} ({})", self.num, names.join(","))
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Names that are not plain lower-case identifiers are double-quoted in the GUC (`*` is not a
/// name but "any standby").
fn quote(name: &str) -> String {
    let plain = name == STRICT_ANY
        || name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

fn key(me: &str, members: Vec<String>, quorum: u32) -> SyncValue {
    let members = sorted(members);
    SyncValue {
        leader: Some(me.to_string()),
        quorum,
        sync_standby: (!members.is_empty()).then(|| members.join(",")),
    }
}

/// A member's `sync_priority` (0 for `nosync`, 1 by default).
fn sync_priority(m: &Member) -> i64 {
    let tags = &m.data.tags;
    match tags.get("sync_priority").and_then(serde_json::Value::as_i64) {
        Some(p) => p,
        None if pgvigil_api::values::tag_is_true(tags.get("nosync")) => 0,
        None => 1,
    }
}

/// Patroni's `_should_cascade`: a member whose `replicatefrom` names another eligible member
/// is meant to stream from that one, so it is no candidate (even while connected to us) once
/// the first member up its chain without the tag streams from us. `depth` bounds a chain that
/// loops.
fn should_cascade(eligible: &[&Member], streaming: &[&str], member: &Member, depth: usize) -> bool {
    let Some(up) = crate::slots::replicatefrom(member) else {
        return false;
    };
    let Some(upstream) = eligible.iter().find(|m| m.name.eq_ignore_ascii_case(up)) else {
        return false;
    };
    if crate::slots::replicatefrom(upstream).is_none() {
        return streaming.iter().any(|s| s.eq_ignore_ascii_case(&upstream.name));
    }
    depth > 0 && should_cascade(eligible, streaming, upstream, depth - 1)
}

/// Streaming members that may be synchronous, best first: by `sync_priority`, then those
/// already synchronous, then by position; `nofailover` members last. Members lagging more than
/// `maximum_lag_on_syncnode` behind the best are left out, and so are members meant to
/// cascade from another standby (`replicatefrom`).
pub fn candidates(input: &SyncInput<'_>) -> Vec<String> {
    // Running members other than us that may be synchronous, and which of them stream from us.
    let eligible: Vec<&Member> = input
        .cluster
        .members
        .iter()
        .filter(|m| {
            m.data.state == "running" && sync_priority(m) > 0 && !m.name.eq_ignore_ascii_case(input.me)
        })
        .collect();
    let member = |name: &str| {
        eligible
            .iter()
            .copied()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    };
    let streaming: Vec<&str> = input
        .walsenders
        .iter()
        .filter(|w| w.state == "streaming" && member(&w.application_name).is_some())
        .map(|w| w.application_name.as_str())
        .collect();
    let mut found: Vec<(i64, bool, u64, bool, String)> = input
        .walsenders
        .iter()
        .filter(|w| w.state == "streaming")
        .filter_map(|w| {
            let m = member(&w.application_name)?;
            if should_cascade(&eligible, &streaming, m, eligible.len()) {
                return None;
            }
            let tags = &m.data.tags;
            let priority = sync_priority(m);
            let is_sync = matches!(w.sync_state.as_str(), "sync" | "quorum");
            Some((
                priority,
                is_sync,
                w.lsn,
                failover_priority(tags) <= 0,
                m.name.clone(),
            ))
        })
        .collect();
    // As Patroni: the lag is measured from the most advanced candidate, or from the primary's
    // own position when there is only one (so a lone stuck standby is dropped too).
    let best = match found.len() {
        1 => input.primary_lsn,
        _ => found.iter().map(|f| f.2).max().unwrap_or(0),
    };
    if input.maximum_lag_on_syncnode > 0 {
        let limit = input.maximum_lag_on_syncnode as u64;
        found.retain(|f| best.saturating_sub(f.2) <= limit);
    }
    found.sort_by(|a, b| {
        a.3.cmp(&b.3)
            .then(b.0.cmp(&a.0))
            .then(b.1.cmp(&a.1))
            .then(b.2.cmp(&a.2))
            .then(a.4.cmp(&b.4))
    });
    found.into_iter().map(|f| f.4).collect()
}

/// A standby PostgreSQL really waits for: listed, reported synchronous, and past the position
/// where the GUC last changed (or already trusted in `/sync`).
fn confirmed(input: &SyncInput<'_>, name: &str, in_key: bool) -> bool {
    let want = if input.mode == SyncMode::Quorum {
        "quorum"
    } else {
        "sync"
    };
    input.walsenders.iter().any(|w| {
        w.application_name.eq_ignore_ascii_case(name)
            && w.sync_state == want
            && (w.lsn >= input.guc_changed_at || in_key)
    })
}

/// The next step, or `None` when the GUC and the key are where they should be.
pub fn next_step(input: &SyncInput<'_>) -> Option<SyncStep> {
    let ours = input
        .cluster
        .sync
        .as_ref()
        .map(|s| &s.value)
        .filter(|s| s.leader.as_deref() == Some(input.me));
    if input.mode == SyncMode::Off {
        return input.cluster.sync.is_some().then_some(SyncStep::DeleteKey);
    }
    let Some(current_key) = ours else {
        // First take ownership of the state, with nobody trusted yet.
        return Some(SyncStep::WriteKey(key(input.me, Vec::new(), 0)));
    };
    let guc = Guc::parse(input.current_guc);
    let in_key = current_key.members();
    let wanted = candidates(input);
    match input.mode {
        SyncMode::On => classic_step(input, &guc, &in_key, current_key, wanted),
        SyncMode::Quorum => quorum_step(input, &guc, &in_key, current_key, wanted),
        SyncMode::Off => None,
    }
}

fn classic_step(
    input: &SyncInput<'_>,
    guc: &Guc,
    in_key: &[String],
    current_key: &SyncValue,
    wanted: Vec<String>,
) -> Option<SyncStep> {
    let count = input.node_count.max(1);
    let mut target: Vec<String> = wanted.into_iter().take(count).collect();
    let strict_hold = input.strict && target.is_empty();
    if strict_hold {
        // Nobody to wait for: keep waiting for the trusted ones, never fall back to async.
        target = in_key.to_vec();
    }
    // 1. Shrink the key to members still wanted, still listed and still confirmed.
    let keep: Vec<String> = in_key
        .iter()
        .filter(|n| strict_hold || target.iter().any(|t| t.eq_ignore_ascii_case(n)))
        .filter(|n| guc.contains(n))
        .filter(|n| strict_hold || confirmed(input, n, true))
        .cloned()
        .collect();
    if sorted(keep.clone()) != sorted(in_key.to_vec()) || current_key.quorum != 0 {
        return Some(SyncStep::WriteKey(key(input.me, keep, 0)));
    }
    // 2. Make the GUC list exactly the target.
    let desired_guc = if target.is_empty() && input.strict {
        Guc {
            quorum: false,
            num: 1,
            names: vec![STRICT_ANY.to_string()],
        }
    } else {
        Guc {
            quorum: false,
            num: count.min(target.len().max(1)),
            names: target.clone(),
        }
    };
    if desired_guc.render() != guc.render() {
        return Some(SyncStep::SetGuc(desired_guc.render()));
    }
    // 3. Trust newly confirmed members.
    let grown: Vec<String> = target
        .iter()
        .filter(|n| confirmed(input, n, in_key.contains(n)))
        .cloned()
        .collect();
    if sorted(grown.clone()) != sorted(in_key.to_vec()) && grown.len() > in_key.len() {
        return Some(SyncStep::WriteKey(key(input.me, grown, 0)));
    }
    None
}

fn quorum_step(
    input: &SyncInput<'_>,
    guc: &Guc,
    in_key: &[String],
    current_key: &SyncValue,
    wanted: Vec<String>,
) -> Option<SyncStep> {
    let guc_names = sorted(
        guc.names
            .iter()
            .filter(|n| !names_no_member(n))
            .cloned()
            .collect(),
    );
    let key_names = sorted(in_key.to_vec());
    let key_quorum = current_key.quorum as usize;
    let count = input.node_count.max(1);
    let active = sorted(wanted);
    // The GUC and the key name the same set; numsync + quorum = |set|.
    let target_num = |set: usize| {
        if input.strict {
            count.min(set).max(1)
        } else {
            count.min(set)
        }
    };
    let render = |names: &[String], num: usize| -> String {
        if names.is_empty() {
            if input.strict {
                Guc {
                    quorum: true,
                    num: 1,
                    names: vec![STRICT_ANY.into()],
                }
                .render()
            } else {
                String::new()
            }
        } else {
            Guc {
                quorum: true,
                num: num.max(1),
                names: names.to_vec(),
            }
            .render()
        }
    };
    // Removals: the GUC first (fewer acknowledgers), then the key (fewer voters).
    if let Some(gone) = guc_names.iter().find(|n| !active.contains(n)) {
        if input.strict && active.is_empty() {
            return None; // strict: keep waiting for the ones we had
        }
        let rest: Vec<String> = guc_names.iter().filter(|n| *n != gone).cloned().collect();
        return Some(SyncStep::SetGuc(render(&rest, guc.num.min(rest.len()))));
    }
    if let Some(gone) = key_names
        .iter()
        .find(|n| !guc_names.contains(n) && !active.contains(n))
    {
        let rest: Vec<String> = key_names.iter().filter(|n| *n != gone).cloned().collect();
        let num = guc.num.max(1);
        return Some(SyncStep::WriteKey(key(
            input.me,
            rest.clone(),
            rest.len().saturating_sub(num) as u32,
        )));
    }
    // Additions: the key first (more voters needed), then the GUC. When nothing waits yet the
    // GUC goes first, and the key follows once the standby is confirmed.
    if let Some(new) = active.iter().find(|n| !key_names.contains(n)) {
        if guc_names.is_empty() {
            return Some(SyncStep::SetGuc(render(std::slice::from_ref(new), target_num(1))));
        }
        if !guc_names.contains(new) || confirmed(input, new, false) {
            let mut grown = key_names.clone();
            grown.push(new.clone());
            let quorum = grown.len().saturating_sub(guc.num);
            return Some(SyncStep::WriteKey(key(input.me, grown, quorum as u32)));
        }
        return None;
    }
    if let Some(new) = key_names.iter().find(|n| !guc_names.contains(n)) {
        let mut grown = guc_names.clone();
        grown.push(new.clone());
        return Some(SyncStep::SetGuc(render(&grown, guc.num)));
    }
    // Same set: adjust numsync. Raise numsync before lowering quorum; raise quorum before
    // lowering numsync.
    let want_num = target_num(key_names.len());
    let want_quorum = key_names.len().saturating_sub(want_num);
    if guc.num < want_num {
        return Some(SyncStep::SetGuc(render(&key_names, want_num)));
    }
    if key_quorum > want_quorum && guc.num >= want_num {
        return Some(SyncStep::WriteKey(key(
            input.me,
            key_names.clone(),
            want_quorum as u32,
        )));
    }
    if key_quorum < want_quorum {
        return Some(SyncStep::WriteKey(key(
            input.me,
            key_names.clone(),
            want_quorum as u32,
        )));
    }
    if guc.num > want_num {
        return Some(SyncStep::SetGuc(render(&key_names, want_num)));
    }
    if key_names.len() == guc_names.len() && !key_names.is_empty() && key_quorum + guc.num != key_names.len()
    {
        return Some(SyncStep::WriteKey(key(
            input.me,
            key_names.clone(),
            (key_names.len() - guc.num) as u32,
        )));
    }
    // Classic mode's `N (a,b)` left over from a change of mode, with the right standbys and
    // number: the same as `ANY N (a,b)`, which accepts every set of acknowledgers it accepted
    // and more, all of them meeting the key's quorum (checked just above).
    if !guc.quorum && !guc_names.is_empty() {
        return Some(SyncStep::SetGuc(render(&guc_names, guc.num)));
    }
    None
}

/// The GUC to set before promoting, so that the very first commits of the new primary already
/// wait for the standbys the old primary trusted (§4.9 "before promotion").
pub fn before_promotion(me: &str, mode: SyncMode, strict: bool, cluster: &ClusterView) -> Option<String> {
    let sync = cluster.sync.as_ref().map(|s| &s.value);
    let voters: Vec<String> = sync
        .map(|s| s.members())
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n != me)
        .collect();
    match mode {
        SyncMode::Off => None,
        SyncMode::On if !strict => Some(String::new()),
        SyncMode::On => Some(if voters.is_empty() {
            STRICT_ANY.to_string()
        } else {
            Guc {
                quorum: false,
                num: 1,
                names: voters,
            }
            .render()
        }),
        SyncMode::Quorum => {
            let Some(sync) = sync else {
                return Some(String::new());
            };
            let was_voter = sync.contains(me);
            let n = voters.len() as i64 - sync.quorum as i64 - 1 + i64::from(!was_voter);
            let n = if strict { n.max(1) } else { n.max(0) } as usize;
            if voters.is_empty() || n == 0 {
                return Some(if strict {
                    Guc {
                        quorum: true,
                        num: 1,
                        names: vec![STRICT_ANY.into()],
                    }
                    .render()
                } else {
                    String::new()
                });
            }
            Some(
                Guc {
                    quorum: true,
                    num: n,
                    names: voters,
                }
                .render(),
            )
        }
    }
}
