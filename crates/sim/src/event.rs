//! Everything that happens in the simulation is one of these, at one instant of real time.

use pgvigil_api::rest::StatusDocument;

use crate::etcd::{Request, Response};
use crate::plan::Fault;

/// Identifies one network call of an agent.
pub type CallId = u64;

#[derive(Clone, Debug)]
pub enum Event {
    /// A request reaches etcd.
    ToEtcd {
        node: usize,
        agent: u64,
        call: CallId,
        attempt: u32,
        request: Request,
    },
    /// For one incarnation of a node's agent; waits while the agent or its host stalls.
    Agent {
        node: usize,
        agent: u64,
        what: AgentEvent,
    },
    /// For a host's processes other than the agent (PostgreSQL, the fencer); waits while the
    /// host stalls, is dropped once the host rebooted.
    Host {
        node: usize,
        boot: u64,
        what: HostEvent,
    },
    /// A `GET /patroni` reaches a node's REST API (served by its agent).
    PeerQuery {
        from: usize,
        from_agent: u64,
        to: usize,
        query: u64,
    },
    Fault(Fault),
    /// A fault of `node` heals.
    Heal {
        node: usize,
        what: Heal,
    },
    /// etcd's lessor looks for expired leases (every 500 ms, as etcd's does; a request
    /// also finds an expired lease gone).
    EtcdTick,
    /// A new etcd leader takes over after an outage.
    EtcdLeader,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heal {
    AgentResume { agent: u64 },
    AgentStart,
    HostBoot,
    HostResume,
    Link,
}

#[derive(Clone, Debug)]
pub enum AgentEvent {
    Response {
        call: CallId,
        attempt: u32,
        response: Response,
    },
    CallTimeout {
        call: CallId,
        attempt: u32,
    },
    /// Deliver the watch events that are due.
    WatchPump,
    DriverWake,
    LoopWake {
        seq: u64,
    },
    /// A step of the HA loop's current action is due (a checkpoint ends, a timeout).
    JobTimer {
        seq: u64,
    },
    /// `pg_ctl` returns: the postmaster `pg` finished starting, promoting or stopping, or died.
    PgCtl {
        pg: u64,
    },
    PeerAnswer {
        query: u64,
        status: Option<Box<StatusDocument>>,
    },
    PeerTimeout {
        query: u64,
    },
    /// The postmaster watcher saw the postmaster appear or disappear.
    PostmasterChanged,
    /// The leadership driver answers a request of the HA loop.
    LockReply {
        request: pgvigil_lock::RequestId,
        answer: Result<bool, String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// PostgreSQL finished starting, promoting or stopping (postmaster `pg`).
    PgDone { pg: u64 },
    /// A fence's timer fires.
    FenceTimer { fence: u64, seq: u64 },
    /// A fence's stop lands: postmaster `pg` refuses writes and exits.
    Kill { pg: u64, fence: u64 },
}
