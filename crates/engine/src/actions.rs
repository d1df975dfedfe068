//! What the engine asks the runtime to do.

use crate::slots::{LogicalSlot, PublishedSlots, SlotPlan};

/// One cycle's outcome: actions in order (the runtime stops at the first one that fails) and a
/// one-line summary logged at INFO, worded like Patroni's so operators recognise it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub message: String,
    /// Decide again after this long at the latest (a step that waits for something the
    /// watch does not announce, such as a peer's WAL position).
    pub recheck_in: Option<std::time::Duration>,
    /// The PostgreSQL state to report from now on, when the decision knows better than the
    /// observation (a PostgreSQL found down in maintenance mode is `stopped`, not `crashed`).
    pub report: Option<pgvigil_api::PgState>,
}

impl Decision {
    pub fn new(message: impl Into<String>, actions: Vec<Action>) -> Self {
        Decision {
            actions,
            message: message.into(),
            recheck_in: None,
            report: None,
        }
    }

    pub fn report(mut self, state: pgvigil_api::PgState) -> Self {
        self.report = Some(state);
        self
    }

    pub fn recheck_in(mut self, after: std::time::Duration) -> Self {
        self.recheck_in = Some(after);
        self
    }

    pub fn idle(message: impl Into<String>) -> Self {
        Decision::new(message, Vec::new())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Race for `initialize`; the winner runs initdb, starts PostgreSQL, creates the roles,
    /// publishes the sysid and the dynamic config, and takes the lock.
    Bootstrap,
    /// Create the data directory with `methods` in order, the first that succeeds wins
    /// (`basebackup` is pg_basebackup, any other name a `postgresql.<method>` section's
    /// command), then start as a replica. `source` is the member to clone from; `None` only
    /// for methods that work without a leader (`no_leader`). If every method fails, the data
    /// directory is left empty and the next cycle decides again.
    CreateReplica {
        source: Option<String>,
        methods: Vec<String>,
    },
    /// Standby cluster (§4.11): race for `initialize`; the winner creates the data directory
    /// from the remote primary with `methods` in order, starts it following the remote,
    /// publishes the sysid and the dynamic configuration and takes the lock as the standby
    /// leader.
    BootstrapStandby { methods: Vec<String> },
    /// Start PostgreSQL.
    Start(StartAs),
    /// `pg_ctl promote`, then the post-promotion checkpoint and history update.
    Promote,
    /// Stop being a primary.
    Demote(DemoteMode),
    /// Point `primary_conninfo` at this member (None: no upstream) and reload.
    Follow { upstream: Option<String> },
    /// Standby cluster (§4.11): point the recovery settings at the remote primary (host, port,
    /// `primary_slot_name`, `restore_command` of the section) and reload.
    FollowRemote,
    /// Standby cluster (§4.11), Patroni's `demote-cluster` of the lock holder that runs (or
    /// last ran) as a primary: stop it (fast), `pg_rewind` it against the remote when
    /// `use_pg_rewind` is on (nothing to do when their histories have not diverged), start it
    /// following the remote. The lock is kept.
    DemoteCluster,
    /// Stop, pg_rewind from the member, start following it.
    Rewind { source: String },
    /// Stop PostgreSQL, wipe the data directory and create it again from `source` with
    /// `methods`, as [`Action::CreateReplica`] does.
    Reinitialize { source: String, methods: Vec<String> },
    /// Ask every other member for its status, then call `decide` again with the answers.
    QueryPeers,
    /// Create-if-absent transaction on the leader key, then run a new cycle at once.
    AcquireLock,
    /// Take the key from a leader that promised the fast takeover and stayed silent past its
    /// promise: a compare-and-swap on the revisions this node saw (leader key, heartbeat,
    /// config), then a new cycle at once.
    TakeOver {
        from: String,
        leader_revision: i64,
        heartbeat_revision: i64,
        config_revision: i64,
    },
    /// The key names us but no term of ours carries it (after an agent restart): move it to
    /// our lease by a compare-and-swap on `leader_revision`, then a new cycle at once.
    AdoptLock { leader_revision: i64 },
    /// Delete the leader key if it is still ours.
    ReleaseLock,
    /// Write PostgreSQL's configuration files and reload. Never decided for a primary that
    /// does not hold the lock: a changed `synchronous_standby_names` could release commits
    /// only that node has (the restart/sync-safety issue).
    ApplyConfig,
    /// Planned switchover away from this leader: checkpoint and stop cleanly, remembering the
    /// shutdown checkpoint ([`crate::SwitchoverStop`]); the lock is released by a later
    /// decision, once one of `candidates` has that checkpoint or after 10 s.
    StopForSwitchover { candidates: Vec<String> },
    /// Publish `status` with this position (the old primary's last one, before it lets go).
    PublishPosition { optime: u64 },
    /// Stop PostgreSQL (fast) and start it again in its role; a primary only with the lock.
    Restart { timeout: Option<u64> },
    /// Answer the pending operator request without acting on it (refused, or void).
    AnswerRequest { status: u16, message: String },
    /// Clear the `failover` key (compare-and-set on its revision).
    ClearFailover,
    /// Write our sysid into `initialize` (adopting an existing primary, or repairing the key).
    WriteInitialize,
    /// Leader housekeeping: `status` (optime, and `slots`/`retain_slots` from `published`),
    /// `history` when the timeline moved, the synchronous standbys, and the slot plan (`docs/patroni-compat.md` §5.8).
    /// The runtime remembers `published.seen` for the next cycle.
    LeaderHousekeeping {
        slots: SlotPlan,
        published: PublishedSlots,
    },
    /// A replica's slot upkeep (§5.8): carry out the plan and forget any leader-time retention
    /// clock ([`crate::Memory::retained_slots_seen`]).
    ManageSlots(SlotPlan),
    /// A replica copies these permanent logical slots from the primary (§5.8, Patroni's
    /// `copy_logical_slots`): their state files read there, written here, and PostgreSQL
    /// restarted to load them.
    CopyLogicalSlots(Vec<LogicalSlot>),
    /// The configuration or data cannot work; the agent exits with this message.
    Fatal(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartAs {
    /// Without recovery settings (a crashed primary restarting in place while holding the lock).
    Primary,
    /// In recovery, following the member (None: read-only without upstream).
    Replica { upstream: Option<String> },
    /// In recovery, following the standby cluster's remote primary (§4.11).
    Remote,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoteMode {
    /// The lock belongs to someone else: stop immediately (no checkpoint), keep nothing.
    ImmediateNoLock,
    /// The DCS is unreachable: stop fast, start read-only without upstream.
    Offline,
}
