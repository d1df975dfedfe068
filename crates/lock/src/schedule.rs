//! The leadership driver's decisions, without I/O: what to send to etcd and when (grants,
//! keep-alives, pipelined heartbeats, term moves, reads after an unknown outcome, failsafe
//! rounds), and how each answer updates the [`LockCore`].
//!
//! The shell (the agent's `leadership::driver`, or the simulation) calls [`Scheduler::poll`]
//! whenever something may be due, performs the [`Op`]s it returns (each one attempt, started
//! at once), reports every answer with [`Scheduler::on_result`], and sleeps until
//! [`Scheduler::next_wakeup`] or the next answer. Send times are the `now` of the `poll` that
//! produced the op: read before the request leaves, so a deadline computed from them is never
//! later than the true one (see [`crate::term`]).
//!
//! Heartbeats are pipelined: one every H whatever the previous ones are doing, so a slow
//! answer delays the proof, not the next heartbeat; at most [`MAX_HEARTBEATS_IN_FLIGHT`] wait
//! at once. Keep-alives too: one `renew_every` after the last one etcd accepted, and while
//! one goes unanswered another every [`RETRY`], so a lost keep-alive costs half a second, not
//! the 2 s of an attempt's timeout (with `ttl: 10` two lost ones in a row fenced a healthy
//! leader; the simulation found it). Keep-alives and heartbeats stop while the HA loop does
//! not report (`loop_alive` false): a hung agent loses the lock and its fence stops
//! PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock::BootInstant;
use crate::heartbeat::HeartbeatValue;
use crate::store::{LeaderKey, TermOpening, Written};
use crate::term::{LockCore, TermStart};

/// How long one etcd attempt of the driver may take before it counts as failed.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Heartbeats in flight at least allowed; with a short H, as many as go out during one
/// [`ATTEMPT_TIMEOUT`] (see [`Scheduler::heartbeat_pipeline`]). Beyond that etcd is not
/// answering and more would only queue.
pub const MAX_HEARTBEATS_IN_FLIGHT: usize = 4;
/// Keep-alives of one lease in flight at most.
pub const MAX_KEEP_ALIVES_IN_FLIGHT: usize = 4;
/// Retry delay after a failed grant or read; while a keep-alive goes unanswered, another
/// follows this often.
pub const RETRY: Duration = Duration::from_millis(500);
/// Failsafe rounds at most this often.
pub const FAILSAFE_EVERY: Duration = Duration::from_secs(1);
/// Without an accepted proof for this long, a leader in failsafe mode asks the members.
pub const FAILSAFE_AFTER: Duration = Duration::from_millis(1500);
/// Slack required between now and the deadline before PostgreSQL may become a primary: the
/// time until the fence learns the new postmaster.
pub const PRIMARY_SLACK: Duration = Duration::from_millis(300);
/// Without anything due, the scheduler looks again this often.
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// How the lock is kept; the HA loop sets it from the dynamic configuration each cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockSettings {
    /// TTL of the lease that carries the key and our member key (Patroni's `ttl`).
    pub ttl: Duration,
    /// How often leases are kept alive.
    pub renew_every: Duration,
    /// How often the leader proves the key is still its own (heartbeat H).
    pub heartbeat_interval: Duration,
    /// The fast-takeover promise F for new terms; `None`: lease expiry only.
    pub promise: Option<Duration>,
    /// Failsafe mode: confirm over REST when etcd cannot be reached.
    pub failsafe_mode: bool,
}

impl Default for LockSettings {
    fn default() -> Self {
        LockSettings {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            heartbeat_interval: Duration::from_millis(500),
            promise: None,
            failsafe_mode: false,
        }
    }
}

/// Identifies one operation the scheduler started; its answer is reported with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(u64);

/// Identifies one request of the HA loop (open or release a term); answered by
/// [`Notice::Reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(u64);

/// One etcd call (or failsafe round) to perform now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Grant {
        ttl: Duration,
    },
    KeepAlive {
        lease: i64,
    },
    /// If the leader key is still at `term`: put `value` as the heartbeat key on `lease`, or
    /// with `None` write nothing.
    Heartbeat {
        term: i64,
        lease: i64,
        value: Option<String>,
    },
    /// Put the leader key (our name) on `lease` under `how`'s compare, and the heartbeat key
    /// (`Some`) or delete it (`None`) in the same transaction.
    Open {
        how: TermOpening,
        lease: i64,
        heartbeat: Option<String>,
    },
    /// Delete the leader and heartbeat keys if the leader key is still at `term`.
    Release {
        term: i64,
    },
    ReadLeader,
    /// Fire and forget: a lease that carries nothing of ours any more.
    Revoke {
        lease: i64,
    },
    /// Ask every member of the last `failsafe` key to accept this leader.
    Failsafe,
}

/// The answer to an [`Op`]. An `Err` of a write means its outcome is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Grant(Result<i64, String>),
    /// `Ok(true)`: TTL > 0; `Ok(false)`: etcd says the lease does not exist.
    KeepAlive(Result<bool, String>),
    /// A heartbeat or a term-opening write.
    Written(Result<Written, String>),
    /// `Ok(true)`: deleted; `Ok(false)`: the key was not at our term's revision.
    Released(Result<bool, String>),
    Read(Result<Option<LeaderKey>, String>),
    /// Every member accepted the round.
    Failsafe(bool),
    Revoked,
}

/// Something the shell should know: replies to the HA loop, wake-ups, and what to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    Reply {
        request: RequestId,
        answer: Result<bool, String>,
    },
    /// The lock changed in a way the HA loop must look at now.
    WakeLoop,
    /// An accepted proof of the current term (heartbeat, keep-alive of its lease, failsafe
    /// round): a watchdog may be fed if [`LockCore::may_feed_watchdog`] allows.
    Proved,
    TermOpened {
        how: TermStart,
        revision: i64,
        lease: i64,
        promise: Option<Duration>,
    },
    /// The term is moving to the configured lease or promise.
    Moving {
        from_lease: i64,
        to_lease: i64,
        promise: Option<Duration>,
    },
    LeaseGranted {
        lease: i64,
        ttl: Duration,
    },
    GrantFailed(String),
    LeaseGone {
        lease: i64,
    },
    KeepAliveFailed {
        lease: i64,
        error: String,
    },
    HeartbeatFailed(String),
    /// A write of the term was refused: the leader key changed under us.
    LockLost,
    Released,
    ReadFailed(String),
    /// The HA loop stopped reporting: proofs stop.
    LoopStalled,
}

/// What one call of the scheduler asks the shell to do.
#[derive(Debug, Default)]
pub struct Step {
    pub ops: Vec<(OpId, Op)>,
    pub notices: Vec<Notice>,
}

/// What the scheduler remembers of an op in flight.
#[derive(Clone, Copy, Debug)]
enum InFlight {
    Grant {
        ttl: Duration,
    },
    KeepAlive {
        lease: i64,
    },
    Heartbeat {
        term: i64,
    },
    Open {
        how: TermOpening,
        lease: i64,
        promise: Option<Duration>,
        request: Option<RequestId>,
    },
    Release {
        request: RequestId,
    },
    Read,
    Revoke,
    Failsafe,
}

/// Keep-alive bookkeeping of one lease.
#[derive(Clone, Copy, Debug)]
struct KeepAliveSlot {
    lease: i64,
    /// When the next keep-alive goes out: `renew_every` after the newest accepted one, or
    /// [`RETRY`] after the last one sent while none was accepted since.
    due: BootInstant,
    in_flight: usize,
}

/// A request of the HA loop not yet started.
#[derive(Clone, Copy, Debug)]
enum Queued {
    Open(TermOpening, RequestId),
    Release(RequestId),
}

/// How an answer moves a lease's next keep-alive.
enum Due {
    At(BootInstant),
    NoLaterThan(BootInstant),
    Unchanged,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    Idle,
    InFlight,
    RetryAt(BootInstant),
}

/// The driver's schedule. The [`LockCore`] it updates is passed in, so the HA loop can read it
/// under its own lock.
#[derive(Debug)]
pub struct Scheduler {
    me: String,
    next_id: u64,
    in_flight: BTreeMap<OpId, (BootInstant, InFlight)>,
    requests: Vec<Queued>,
    grant_in_flight: bool,
    next_grant: BootInstant,
    keep_alive: Vec<KeepAliveSlot>,
    heartbeats_in_flight: usize,
    next_heartbeat: BootInstant,
    move_in_flight: bool,
    read: ReadState,
    failsafe_in_flight: bool,
    last_failsafe: Option<BootInstant>,
    /// Send time of the last accepted proof of any kind (heartbeat, keep-alive).
    last_proof: Option<BootInstant>,
    /// Opens waiting for a lease.
    waiting: Vec<(TermOpening, RequestId)>,
    loop_stalled: bool,
    /// The term deadline whose passing the HA loop was told about.
    lapse_noticed: Option<BootInstant>,
    wake_at: BootInstant,
}

impl Scheduler {
    /// A scheduler for the member `me` (the leader key's value), starting at `now`.
    pub fn new(me: &str, now: BootInstant) -> Scheduler {
        Scheduler {
            me: me.to_string(),
            next_id: 0,
            in_flight: BTreeMap::new(),
            requests: Vec::new(),
            grant_in_flight: false,
            next_grant: now,
            keep_alive: Vec::new(),
            heartbeats_in_flight: 0,
            next_heartbeat: now,
            move_in_flight: false,
            read: ReadState::Idle,
            failsafe_in_flight: false,
            last_failsafe: None,
            last_proof: None,
            waiting: Vec::new(),
            loop_stalled: false,
            lapse_noticed: None,
            wake_at: now,
        }
    }

    /// Asks for a term-opening write; started by the next [`Scheduler::poll`], answered by a
    /// [`Notice::Reply`]: `Ok(true)` applied, `Ok(false)` refused, `Err` unknown or no lease.
    pub fn open(&mut self, how: TermOpening) -> RequestId {
        let id = self.request_id();
        self.requests.push(Queued::Open(how, id));
        id
    }

    /// Asks to delete the key if our term still holds it; `Ok(false)` when there is no term.
    pub fn release(&mut self) -> RequestId {
        let id = self.request_id();
        self.requests.push(Queued::Release(id));
        id
    }

    fn request_id(&mut self) -> RequestId {
        self.next_id += 1;
        RequestId(self.next_id)
    }

    /// When the shell should call [`Scheduler::poll`] again at the latest (as of the last
    /// poll).
    pub fn next_wakeup(&self) -> BootInstant {
        self.wake_at
    }

    /// How many heartbeats may wait for an answer at once: enough that heartbeats lost on the
    /// way (each holding its place until its attempt times out) do not stop the next ones
    /// within one attempt timeout. With 4 and H = 64 ms, a few lost heartbeats kept any
    /// from going out for up to 2 s and a leader promising F < 2 s fenced itself on a healthy
    /// but lossy network (found by the simulation).
    pub fn heartbeat_pipeline(interval: Duration) -> usize {
        let per_attempt = ATTEMPT_TIMEOUT.as_nanos() / interval.as_nanos().max(1);
        usize::try_from(per_attempt + 1)
            .unwrap_or(usize::MAX)
            .max(MAX_HEARTBEATS_IN_FLIGHT)
    }

    /// Operations in flight (their answers are still awaited).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Starts whatever is due at `now`. `loop_alive`: the HA loop reported within its promise.
    pub fn poll(
        &mut self,
        core: &mut LockCore,
        now: BootInstant,
        settings: &LockSettings,
        loop_alive: bool,
    ) -> Step {
        let mut step = Step::default();
        for request in std::mem::take(&mut self.requests) {
            match request {
                Queued::Open(how, id) => self.start_open(core, &mut step, how, Some(id), settings, now),
                Queued::Release(id) => match core.term() {
                    Some(term) => {
                        let term = term.revision;
                        self.start(
                            &mut step,
                            now,
                            Op::Release { term },
                            InFlight::Release { request: id },
                        );
                    }
                    None => step.notices.push(Notice::Reply {
                        request: id,
                        answer: Ok(false),
                    }),
                },
            }
        }
        let mut wake = now + IDLE_WAKE;
        if !loop_alive && !self.loop_stalled {
            step.notices.push(Notice::LoopStalled);
        }
        self.loop_stalled = !loop_alive;

        // A lease with the configured TTL for new terms and the member key.
        let current = core.current_lease().copied();
        if current.is_none_or(|l| l.ttl != settings.ttl) && !self.grant_in_flight {
            if now >= self.next_grant {
                self.grant_in_flight = true;
                let ttl = settings.ttl;
                self.start(&mut step, now, Op::Grant { ttl }, InFlight::Grant { ttl });
            } else {
                wake = wake.min(self.next_grant);
            }
        }
        if current.is_some() && !self.waiting.is_empty() {
            for (how, id) in std::mem::take(&mut self.waiting) {
                self.start_open(core, &mut step, how, Some(id), settings, now);
            }
        }

        // Keep-alives, while the loop reports.
        let keep = core.leases_to_keep();
        self.keep_alive
            .retain(|slot| keep.iter().any(|l| l.id == slot.lease));
        for lease in &keep {
            if !self.keep_alive.iter().any(|slot| slot.lease == lease.id) {
                self.keep_alive.push(KeepAliveSlot {
                    lease: lease.id,
                    due: now + settings.renew_every,
                    in_flight: 0,
                });
            }
        }
        if loop_alive {
            for i in 0..self.keep_alive.len() {
                let slot = self.keep_alive[i];
                if slot.in_flight >= MAX_KEEP_ALIVES_IN_FLIGHT {
                    continue;
                }
                if now >= slot.due {
                    self.keep_alive[i].in_flight += 1;
                    self.keep_alive[i].due = now + RETRY;
                    let lease = slot.lease;
                    self.start(
                        &mut step,
                        now,
                        Op::KeepAlive { lease },
                        InFlight::KeepAlive { lease },
                    );
                }
                wake = wake.min(self.keep_alive[i].due);
            }
        }

        if let Some(term) = core.term().copied() {
            // The term moves when its lease or promise is not what the settings ask for.
            if let Some(current) = core.current_lease().copied()
                && (current.id != term.lease || term.promise != settings.promise)
                && !self.move_in_flight
                && core.pending().is_none()
            {
                step.notices.push(Notice::Moving {
                    from_lease: term.lease,
                    to_lease: current.id,
                    promise: settings.promise,
                });
                self.move_in_flight = true;
                let how = TermOpening::Move {
                    leader_revision: term.revision,
                };
                self.start_open(core, &mut step, how, None, settings, now);
            }
            // Heartbeats, pipelined, while the loop reports.
            if loop_alive && self.heartbeats_in_flight < Self::heartbeat_pipeline(settings.heartbeat_interval)
            {
                if now >= self.next_heartbeat {
                    self.heartbeats_in_flight += 1;
                    let value = self.heartbeat_value(term.promise, settings);
                    let op = Op::Heartbeat {
                        term: term.revision,
                        lease: term.lease,
                        value,
                    };
                    self.start(&mut step, now, op, InFlight::Heartbeat { term: term.revision });
                    self.next_heartbeat = now + settings.heartbeat_interval;
                }
                // With the pipeline full, the next answer wakes us: no timer into the past.
                wake = wake.min(self.next_heartbeat);
            }
            // Failsafe: etcd has not accepted a proof for a while.
            if settings.failsafe_mode && loop_alive && !self.failsafe_in_flight {
                let stale = self
                    .last_proof
                    .is_none_or(|p| now.saturating_duration_since(p) >= FAILSAFE_AFTER);
                let due = self
                    .last_failsafe
                    .is_none_or(|f| now.saturating_duration_since(f) >= FAILSAFE_EVERY);
                if stale && due {
                    self.failsafe_in_flight = true;
                    self.last_failsafe = Some(now);
                    self.start(&mut step, now, Op::Failsafe, InFlight::Failsafe);
                }
                wake = wake.min(now + FAILSAFE_EVERY);
            }
        }
        if let ReadState::RetryAt(at) = self.read {
            if now >= at {
                self.read = ReadState::InFlight;
                self.start(&mut step, now, Op::ReadLeader, InFlight::Read);
            } else {
                wake = wake.min(at);
            }
        }
        match core.term_deadline() {
            // Tell the HA loop when the lock lapses.
            Some(deadline) if deadline > now => wake = wake.min(deadline),
            Some(deadline) if self.lapse_noticed != Some(deadline) => {
                self.lapse_noticed = Some(deadline);
                step.notices.push(Notice::WakeLoop);
            }
            _ => {}
        }
        self.wake_at = wake;
        step
    }

    fn start(&mut self, step: &mut Step, now: BootInstant, op: Op, what: InFlight) {
        self.next_id += 1;
        let id = OpId(self.next_id);
        self.in_flight.insert(id, (now, what));
        step.ops.push((id, op));
    }

    /// The heartbeat key's value for a term promising `promise` (none without a promise).
    fn heartbeat_value(&self, promise: Option<Duration>, settings: &LockSettings) -> Option<String> {
        promise.map(|p| HeartbeatValue::new(&self.me, p, settings.heartbeat_interval).to_json())
    }

    fn start_open(
        &mut self,
        core: &LockCore,
        step: &mut Step,
        how: TermOpening,
        request: Option<RequestId>,
        settings: &LockSettings,
        now: BootInstant,
    ) {
        let Some(lease) = core.current_lease().map(|l| l.id) else {
            match request {
                Some(id) => self.waiting.push((how, id)),
                None => self.move_in_flight = false,
            }
            return;
        };
        let promise = settings.promise;
        let heartbeat = self.heartbeat_value(promise, settings);
        let what = InFlight::Open {
            how,
            lease,
            promise,
            request,
        };
        self.start(
            step,
            now,
            Op::Open {
                how,
                lease,
                heartbeat,
            },
            what,
        );
    }

    fn start_read(&mut self, step: &mut Step, now: BootInstant) {
        if self.read == ReadState::Idle {
            self.read = ReadState::InFlight;
            self.start(step, now, Op::ReadLeader, InFlight::Read);
        }
    }

    fn proof(&mut self, core: &mut LockCore, step: &mut Step, sent: BootInstant) {
        self.last_proof = Some(self.last_proof.map_or(sent, |p| p.max(sent)));
        core.failsafe_over();
        step.notices.push(Notice::Proved);
    }
}

// How each answer updates the lock: `Scheduler::on_result`.
#[path = "schedule_answers.rs"]
mod answers;

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
