//! The leader's side of the lock: which write and which lease carry the leader key, and until
//! when that proves nobody else can have taken it: the **fencing deadline**.
//!
//! # Timing argument
//!
//! A *term* starts with one etcd transaction that this node sent at `t0` and etcd applied at
//! revision `LR`: it puts `leader = <me>` on one of our leases `L` and, when the term carries
//! the fast-takeover promise `F`, puts `heartbeat` in the same revision. Every later write of
//! the term compares `mod_revision(leader) == LR`, so it succeeds only while nobody else wrote
//! the leader key since. Another node can come to hold the key in exactly two ways:
//!
//! * **T1, lease expiry.** etcd deletes the key when `L` expires. Let `k` be the send time of
//!   the last keep-alive of `L` that etcd answered with `TTL > 0` (or of the grant). etcd reset
//!   the expiry to `r + TTL` on its own clock for some `r >= k`, never shortens a lease (a new
//!   etcd leader even extends it), so the key exists until at least `k + TTL`. We count `T1` as
//!   over at `k + TTL - M` with `M = max(2 s, TTL/10)` (timer jitter, clock-rate error over
//!   TTL, the milliseconds an immediate shutdown takes). A *new* lease never counts here: a
//!   grant is not a renewal of `L` (hole 1 of the leadership issue), and a TTL change keeps
//!   `L` alive until a compare-and-swap has moved the key to the new lease (hole 2).
//! * **T2, fast takeover** (only in a term with promise `F`). A replica that first learned of
//!   heartbeat revision `R` at `o` on its clock may, from `o + F + m`, swap the key by a
//!   transaction that compares `mod_revision(heartbeat) == R` and `mod_revision(leader) ==
//!   LR`. Let `s` be the send time of our last heartbeat that etcd accepted (the term's
//!   opening write counts as one). A later accepted heartbeat would have changed `R`, so the
//!   takeover can only compare against the revision of a heartbeat sent at or before `s` ...
//!   or of one whose answer we never saw, sent later than `s`. Either way the replica learned
//!   of it after it was applied, so after it was sent, so `o >= s` for the heartbeat `s` or a
//!   later one, and the takeover happens at or after `s + F + m`. We fence at `s + F`. The
//!   margin `m` (the replicas' setting) covers the fencer's wake-up, the kill, and the rate
//!   difference of two clocks over `F`.
//!
//! Failsafe mode adds one proof for both: a round of `POST /failsafe` sent at `f` that every
//! member of the `failsafe` key accepted makes each of them promise not to race (fast or not)
//! before `f + ttl` (receipt is later than `f`), and members not listed never race.
//!
//! The deadline is `min(T1, T2)`, each the latest of its proofs. The fence (in the agent and in
//! the separate fencer process) stops PostgreSQL when the deadline passes without a newer one.
//!
//! What the argument assumes, each tested in this crate or the simulation: send times are taken
//! before the request leaves (a late clock read only makes the deadline earlier); the leader's
//! clock does not run slower than a replica's by more than `m` over `F`, and both count time
//! while suspended (`CLOCK_BOOTTIME`, [`crate::clock`]); an answer we never got is treated as a
//! failure, never as a success; a replica's first observation of a revision is not earlier than
//! etcd applying it (watch events and reads come after the commit).

use std::time::Duration;

use crate::clock::BootInstant;

/// The lease margin `M` of T1 for a lease of `ttl`.
pub fn lease_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_secs(2))
}

/// One of our etcd leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    /// The TTL it was granted with.
    pub ttl: Duration,
    /// Send time of the grant, or of the last keep-alive that found it alive.
    pub renewed: BootInstant,
    /// etcd said it does not exist any more (expired or revoked).
    pub gone: bool,
}

impl LeaseRecord {
    /// T1 for a key on this lease.
    pub fn safe_until(&self) -> BootInstant {
        self.renewed + self.ttl.saturating_sub(lease_margin(self.ttl))
    }
}

/// How a term began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermStart {
    /// Create-if-absent on a free leader key.
    Acquired,
    /// Took the key from a silent leader that promised fast takeover.
    TookOver,
    /// Rewrote our own key: a TTL change moving it to a new lease, a changed promise, or
    /// adopting a key that names us from before an agent restart.
    Moved,
}

/// The current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    /// `mod_revision` of the leader key written by the term's opening transaction.
    pub revision: i64,
    /// The lease that carries the key.
    pub lease: i64,
    /// The fast-takeover promise `F` made in this term, if any.
    pub promise: Option<Duration>,
    /// Send time of the opening write.
    pub started: BootInstant,
    /// Send time of the last accepted heartbeat (the opening write counts).
    pub proven: BootInstant,
    pub how: TermStart,
}

/// A term-opening write whose answer never came: it may have been applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingStart {
    pub lease: i64,
    pub promise: Option<Duration>,
    /// The revision of the leader key the write replaced (0: it created the key).
    pub replaces: i64,
    /// The earliest send time among its attempts: if it was applied, replicas learned of it
    /// no earlier than this.
    pub first_sent: BootInstant,
    pub how: TermStart,
}

/// Why the last term ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// We deleted the key (PostgreSQL was already stopped or demoted).
    Released,
    /// etcd refused a write of the term, or its lease is gone: somebody else may hold the key.
    Lost,
}

/// The lock as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockState {
    /// We hold the key, provably for `valid_for` more.
    Held {
        valid_for: Duration,
    },
    /// The key names us, but no term of ours carries it: after an agent restart. The node may
    /// adopt the key (compare-and-swap on its revision) but must not act as primary before.
    Unproven,
    /// We have a term, but its deadline passed (etcd could not be reached in time): the fence
    /// stopped PostgreSQL. If nobody took the key meanwhile, the next accepted heartbeat proves
    /// the term again.
    Lapsed,
    NotHeld,
}

impl LockState {
    pub fn is_held(self) -> bool {
        matches!(self, LockState::Held { .. })
    }
}

/// A failsafe round every member accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FailsafeProof {
    sent: BootInstant,
    ttl: Duration,
}

/// The leader lock without I/O: the runtime reports what it sent and what etcd answered; this
/// says what is proven, until when, and what may be done.
#[derive(Clone, Debug, Default)]
pub struct LockCore {
    leases: Vec<LeaseRecord>,
    /// The lease new terms and our member key use (the newest grant).
    current_lease: Option<i64>,
    term: Option<Term>,
    pending: Option<PendingStart>,
    failsafe: Option<FailsafeProof>,
    /// The deadline of the last term, kept after it ended until the runtime reports that
    /// PostgreSQL cannot be a primary any more: the fence is level-triggered.
    ended: Option<(TermEnd, BootInstant)>,
}

impl LockCore {
    pub fn new() -> LockCore {
        LockCore::default()
    }

    pub fn term(&self) -> Option<&Term> {
        self.term.as_ref()
    }

    pub fn pending(&self) -> Option<&PendingStart> {
        self.pending.as_ref()
    }

    pub fn leases(&self) -> &[LeaseRecord] {
        &self.leases
    }

    pub fn lease(&self, id: i64) -> Option<&LeaseRecord> {
        self.leases.iter().find(|l| l.id == id)
    }

    /// The lease for new terms and the member key, unless etcd said it is gone.
    pub fn current_lease(&self) -> Option<&LeaseRecord> {
        self.current_lease
            .and_then(|id| self.lease(id))
            .filter(|l| !l.gone)
    }

    /// How the last term ended, if it did and PostgreSQL may still be a primary.
    pub fn ended(&self) -> Option<TermEnd> {
        self.ended.map(|(how, _)| how)
    }

    // --- leases ----------------------------------------------------------------------------

    /// A grant sent at `sent` was answered with lease `id`. It becomes the current lease; the
    /// term's lease, if different, stays as it is (a grant proves nothing about it).
    pub fn lease_granted(&mut self, id: i64, ttl: Duration, sent: BootInstant) {
        self.leases.retain(|l| l.id != id);
        self.leases.push(LeaseRecord {
            id,
            ttl,
            renewed: sent,
            gone: false,
        });
        self.current_lease = Some(id);
    }

    /// A keep-alive of `id` sent at `sent` was answered with `TTL > 0`.
    pub fn keep_alive_ok(&mut self, id: i64, sent: BootInstant) {
        if let Some(l) = self.leases.iter_mut().find(|l| l.id == id && !l.gone) {
            l.renewed = l.renewed.max(sent);
        }
    }

    /// etcd answered that `id` does not exist. If it carried the key, the key is gone too and
    /// anyone may hold it now: the term is lost at `now`.
    pub fn lease_gone(&mut self, id: i64, now: BootInstant) {
        if let Some(l) = self.leases.iter_mut().find(|l| l.id == id) {
            l.gone = true;
        }
        if self.term.is_some_and(|t| t.lease == id) {
            self.end_term(TermEnd::Lost, now);
        }
        if self.pending.is_some_and(|p| p.lease == id) {
            self.pending = None;
        }
    }

    /// Leases that need keep-alives: the current one and the term's.
    pub fn leases_to_keep(&self) -> Vec<LeaseRecord> {
        self.leases
            .iter()
            .filter(|l| !l.gone)
            .filter(|l| {
                Some(l.id) == self.current_lease
                    || self.term.is_some_and(|t| t.lease == l.id)
                    || self.pending.is_some_and(|p| p.lease == l.id)
            })
            .copied()
            .collect()
    }

    /// Forgets leases that carry nothing of ours any more (after a move); the caller may revoke
    /// them. Returns their ids.
    pub fn drop_unused_leases(&mut self) -> Vec<i64> {
        let keep: Vec<i64> = self.leases_to_keep().iter().map(|l| l.id).collect();
        let (kept, dropped): (Vec<_>, Vec<_>) = self.leases.drain(..).partition(|l| keep.contains(&l.id));
        self.leases = kept;
        dropped.into_iter().filter(|l| !l.gone).map(|l| l.id).collect()
    }

    // --- terms -----------------------------------------------------------------------------

    /// A term-opening write (sent at `sent`, on `lease`) was applied at `revision`.
    pub fn term_started(
        &mut self,
        how: TermStart,
        revision: i64,
        lease: i64,
        promise: Option<Duration>,
        sent: BootInstant,
    ) {
        // A retried write: replicas may have seen the first attempt's commit, so count from
        // the earliest send that may have been applied.
        let sent = match self.pending {
            Some(p) if p.lease == lease => p.first_sent.min(sent),
            _ => sent,
        };
        self.pending = None;
        self.ended = None;
        self.term = Some(Term {
            revision,
            lease,
            promise,
            started: sent,
            proven: sent,
            how,
        });
    }

    /// A term-opening write got no answer. Until we learn what etcd holds, it may have been
    /// applied; a move also leaves the old term's heartbeats failing.
    pub fn term_start_unknown(
        &mut self,
        how: TermStart,
        lease: i64,
        promise: Option<Duration>,
        replaces: i64,
        sent: BootInstant,
    ) {
        let first_sent = match self.pending {
            Some(p) if p.lease == lease && p.replaces == replaces => p.first_sent.min(sent),
            _ => sent,
        };
        self.pending = Some(PendingStart {
            lease,
            promise,
            replaces,
            first_sent,
            how,
        });
    }

    /// A term-opening write was refused (its compare failed): nothing was written.
    pub fn term_start_refused(&mut self) {
        self.pending = None;
    }

    /// A heartbeat of term `revision`, sent at `sent`, was accepted.
    pub fn heartbeat_ok(&mut self, revision: i64, sent: BootInstant) {
        if let Some(t) = self.term.as_mut().filter(|t| t.revision == revision) {
            t.proven = t.proven.max(sent);
        }
    }

    /// A write of term `revision` was refused: the leader key changed since the term began.
    /// Returns true when the runtime must read the leader key before deciding (a term-opening
    /// write of ours may be what changed it); otherwise the term is lost at `now`.
    pub fn heartbeat_refused(&mut self, revision: i64, now: BootInstant) -> bool {
        if self.term.is_none_or(|t| t.revision != revision) {
            return false;
        }
        if self.pending.is_some() {
            return true;
        }
        self.end_term(TermEnd::Lost, now);
        false
    }

    /// What etcd holds for the leader key (`None`: absent), read after an unknown or refused
    /// write. Resolves a pending term-opening write; a term whose key is not ours any more is
    /// lost.
    pub fn leader_key_read(&mut self, me: &str, key: Option<(&str, i64, i64)>, now: BootInstant) {
        let ours = key.filter(|(value, lease, _)| *value == me && self.lease(*lease).is_some());
        if let (Some(p), Some((_, lease, revision))) = (self.pending, ours)
            && lease == p.lease
            && revision > p.replaces
            && self.term.is_none_or(|t| revision > t.revision)
        {
            self.term_started(p.how, revision, lease, p.promise, p.first_sent);
            return;
        }
        self.pending = None;
        if let Some(t) = self.term {
            let still = ours.is_some_and(|(_, lease, revision)| lease == t.lease && revision == t.revision);
            if !still {
                self.end_term(TermEnd::Lost, now);
            }
        }
    }

    /// We deleted the key (request sent at `sent`). PostgreSQL must already have stopped being
    /// a primary; if it has not, the fence stops it now.
    pub fn released(&mut self, sent: BootInstant) {
        self.pending = None;
        self.end_term(TermEnd::Released, sent);
    }

    fn end_term(&mut self, how: TermEnd, at: BootInstant) {
        let deadline = self.term_deadline().map_or(at, |d| d.min(at));
        self.term = None;
        let keep = match self.ended {
            Some((_, earlier)) => earlier.min(deadline),
            None => deadline,
        };
        self.ended = Some((how, keep));
    }

    /// The runtime saw PostgreSQL stopped or in recovery after the term ended: nothing is left
    /// to fence.
    pub fn primary_gone(&mut self) {
        self.ended = None;
    }

    /// Every member accepted a failsafe round sent at `sent`; they promised not to race for
    /// `ttl` from receipt.
    pub fn failsafe_confirmed(&mut self, sent: BootInstant, ttl: Duration) {
        if self.failsafe.is_none_or(|f| sent > f.sent) {
            self.failsafe = Some(FailsafeProof { sent, ttl });
        }
    }

    /// etcd is reachable again: only its proofs count from now on.
    pub fn failsafe_over(&mut self) {
        self.failsafe = None;
    }

    /// Whether a failsafe confirmation still keeps us leader at `now`.
    pub fn failsafe_holds(&self, now: BootInstant) -> bool {
        self.failsafe
            .is_some_and(|f| now < f.sent + f.ttl.saturating_sub(lease_margin(f.ttl)))
    }

    // --- what is proven --------------------------------------------------------------------

    /// The current term's deadline: `min(T1, T2)` of the module documentation.
    pub fn term_deadline(&self) -> Option<BootInstant> {
        let t = self.term?;
        let failsafe = self
            .failsafe
            .map(|f| f.sent + f.ttl.saturating_sub(lease_margin(f.ttl)));
        let with_failsafe = |d: BootInstant| failsafe.map_or(d, |f| d.max(f));
        let t1 = match self.lease(t.lease) {
            Some(l) if !l.gone => with_failsafe(l.safe_until()),
            _ => t.started,
        };
        let t2 = t.promise.map(|f| with_failsafe(t.proven + f));
        Some(t2.map_or(t1, |t2| t1.min(t2)))
    }

    /// The deadline the fence enforces: the term's, or the one left by a term that ended while
    /// PostgreSQL may still be a primary. `None`: nothing to fence.
    pub fn fence_deadline(&self) -> Option<BootInstant> {
        match (self.term_deadline(), self.ended) {
            (Some(d), Some((_, e))) => Some(d.min(e)),
            (Some(d), None) => Some(d),
            (None, Some((_, e))) => Some(e),
            (None, None) => None,
        }
    }

    /// The lock for the engine: held while the term's deadline is ahead; `view_names_me` is
    /// whether the last DCS read showed our name in the leader key.
    pub fn lock_state(&self, now: BootInstant, view_names_me: bool) -> LockState {
        match self.term_deadline() {
            Some(d) if now < d => LockState::Held {
                valid_for: d.saturating_duration_since(now),
            },
            Some(_) => LockState::Lapsed,
            None if view_names_me && self.ended() != Some(TermEnd::Released) => LockState::Unproven,
            None => LockState::NotHeld,
        }
    }

    /// Whether PostgreSQL may be promoted or started as a primary now: the term must outlive
    /// `now + slack` (the time until the fence is told about the new postmaster).
    pub fn permits_primary(&self, now: BootInstant, slack: Duration) -> bool {
        self.term_deadline().is_some_and(|d| now + slack < d)
    }

    /// Whether a watchdog with `timeout` may be fed at `now`: the machine reset it schedules
    /// must come no later than the deadline (hole 6 of the leadership issue: a keep-alive
    /// answered late must not move the reset past the point where another node may lead).
    pub fn may_feed_watchdog(&self, now: BootInstant, timeout: Duration) -> bool {
        self.term_deadline().is_some_and(|d| now + timeout <= d)
    }
}

#[cfg(test)]
#[path = "term_tests.rs"]
mod tests;
