//! What must hold. Safety, at every instant of real time: at most one host runs a PostgreSQL
//! that accepts writes, and a PostgreSQL becomes a primary only with a permit of its node's
//! `LockCore`. Liveness, so that doing nothing cannot pass: once every fault has healed, a
//! leader (the one writable primary, holding the key in etcd and the lock in its `LockCore`)
//! exists by the plan's deadline.

use crate::ctx::Stats;
use crate::etcd::Etcd;
use crate::plan::Plan;
use crate::time::{MS, Nanos, secs_f};
use crate::world::Node;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub at: Nanos,
    pub what: String,
}

#[derive(Default)]
pub struct Checker {
    pub failure: Option<Failure>,
    /// When a leader was first seen after every fault healed.
    pub leader_since_healed: Option<Nanos>,
    /// When and where a fence stopped PostgreSQL.
    pub fenced: Vec<(Nanos, usize)>,
}

impl Checker {
    pub fn fail(&mut self, at: Nanos, what: String) {
        if self.failure.is_none() {
            self.failure = Some(Failure { at, what });
        }
    }

    /// Checks the state that holds from `now` until the next event.
    pub fn check(&mut self, now: Nanos, nodes: &[Node], etcd: &Etcd, plan: &Plan, stats: &mut Stats) {
        let writable: Vec<&Node> = nodes.iter().filter(|n| n.host.writable()).collect();
        if writable.len() > 1 {
            let who: Vec<String> = writable.iter().map(|n| describe(n, now)).collect();
            self.fail(
                now,
                format!(
                    "{} hosts accept writes at once: {}",
                    writable.len(),
                    who.join("; ")
                ),
            );
        }
        if now >= plan.healed_at && self.leader_since_healed.is_none() && leader(nodes, etcd, now).is_some() {
            self.leader_since_healed = Some(now);
            stats.recovery_ms = (now - plan.healed_at) / MS;
        }
    }

    /// At the end of the run: a leader must have appeared after the faults healed, and the
    /// cluster must have settled: no fence stopping PostgreSQL any more, every host running it.
    pub fn finish(&mut self, plan: &Plan, nodes: &[Node], now: Nanos) {
        match self.leader_since_healed {
            Some(t) if t <= plan.leader_by => {}
            _ => self.fail(
                plan.leader_by,
                format!(
                    "no leader within {:.0} s after every fault healed (at {:.1} s)",
                    secs_f(plan.leader_by - plan.healed_at),
                    secs_f(plan.healed_at)
                ),
            ),
        }
        // A leader whose proofs were delayed past a short promise may fence itself once in a
        // while on a slow network, by design; a node fenced again and again is stuck.
        for node in 0..nodes.len() {
            let late: Vec<Nanos> = self
                .fenced
                .iter()
                .filter(|(at, n)| *n == node && *at > plan.leader_by)
                .map(|(at, _)| *at)
                .collect();
            if late.len() >= 3 {
                self.fail(
                    late[2],
                    format!(
                        "node{} was fenced {} times after the cluster should have settled (from {:.1} s)",
                        node + 1,
                        late.len(),
                        secs_f(late[0])
                    ),
                );
            }
        }
        if let Some(down) = nodes.iter().find(|n| !n.host.pg.alive()) {
            self.fail(
                now,
                format!(
                    "{} runs no PostgreSQL at the end, long after every fault healed",
                    down.host.name
                ),
            );
        }
    }
}

/// The leader: the one writable primary, named by the leader key, holding its lock.
pub fn leader(nodes: &[Node], etcd: &Etcd, now: Nanos) -> Option<usize> {
    let mut writable = nodes.iter().enumerate().filter(|(_, n)| n.host.writable());
    let (i, node) = writable.next()?;
    if writable.next().is_some() {
        return None;
    }
    let named = etcd.leader_name() == Some(node.host.name.as_str());
    let holds = node.agent.as_ref().is_some_and(|a| a.holds_lock(&node.host, now));
    (named && holds).then_some(i)
}

fn describe(n: &Node, now: Nanos) -> String {
    let host = &n.host;
    let fences: Vec<String> = host
        .fences
        .iter()
        .map(|f| {
            format!(
                "{}#{}(agent {}{}) {:?} pg {:?}",
                if f.process { "fencer" } else { "thread" },
                f.id,
                f.owner,
                if f.orphan { ", orphan" } else { "" },
                f.deadline.map(|d| d.as_nanos()),
                f.postmaster
            )
        })
        .collect();
    let agent = match &n.agent {
        Some(a) => format!(
            "agent {} {:?} term {:?} deadline {:?}{}",
            a.inc,
            a.core.lock_state(host.local(now), false),
            a.core.term().map(|t| t.revision),
            a.core.fence_deadline().map(|d| d.as_nanos()),
            if now < host.agent_stalled_until {
                " (stalled)"
            } else {
                ""
            }
        ),
        None => "no agent".into(),
    };
    // The window outside the guarantee: a host frozen past its deadline just resumed and
    // its fence's stop has not landed yet.
    let resumed = match host.resumed_at {
        Some(at) if now.saturating_sub(at) <= 100 * MS => {
            format!(" (host just resumed at {:.3} s)", secs_f(at))
        }
        _ => String::new(),
    };
    format!(
        "{}{resumed} postgres {} tl {} ({agent}; clock {}; fences [{}])",
        host.name,
        host.pg.pid,
        host.pg.data.timeline,
        host.local(now).as_nanos(),
        fences.join(", ")
    )
}
