//! PostgreSQL on one simulated host: stopped, starting, a replica, promoting, a primary,
//! stopping. Starting, promoting and stopping take simulated time; a kill (the fences, a crash)
//! stops it at once. WAL is a counter: a primary writes one unit per millisecond, a replica
//! copies its upstream's position and timeline when it can follow it.

use pgvigil_engine::{ControlInfo, ControlState};

use crate::time::{MS, Nanos};

pub const SYSID: &str = "7300000000000000001";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proc {
    Stopped,
    /// Starting as a primary (`primary`) or in recovery.
    Starting {
        primary: bool,
    },
    Running,
    /// In recovery, promotion under way.
    Promoting,
    Stopping,
}

/// What is in the data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    pub timeline: u64,
    /// WAL position (fixed while not a running primary).
    pub lsn: u64,
    /// `(parent timeline, switch position)` of each promotion this history went through.
    pub history: Vec<(u64, u64)>,
    /// Last run as a primary (not in recovery).
    pub primary: bool,
    /// Stopped cleanly (a shutdown checkpoint at `lsn`).
    pub clean: bool,
}

#[derive(Clone, Debug)]
pub struct Pg {
    pub proc: Proc,
    /// Identity of the current (or last) postmaster: a new one for each start.
    pub pid: u64,
    pub data: Data,
    /// While a running primary: when its WAL position was last fixed.
    writing_since: Option<Nanos>,
    /// The member it streams from (a replica).
    pub upstream: Option<usize>,
    /// The agent incarnation whose `LockCore` permitted this postmaster to become a primary.
    pub permit: Option<u64>,
    /// A replica receives WAL from its upstream.
    pub streaming: bool,
}

impl Pg {
    pub fn new() -> Pg {
        Pg {
            proc: Proc::Stopped,
            pid: 0,
            data: Data {
                timeline: 1,
                lsn: 0,
                history: Vec::new(),
                primary: false,
                clean: true,
            },
            writing_since: None,
            upstream: None,
            permit: None,
            streaming: false,
        }
    }

    /// A postmaster process exists (what `postmaster.pid` plus `/proc` say).
    pub fn alive(&self) -> bool {
        self.proc != Proc::Stopped
    }

    /// Accepts writes (the host must also be running).
    pub fn writable(&self) -> bool {
        self.proc == Proc::Running && self.data.primary
    }

    pub fn lsn(&self, now: Nanos) -> u64 {
        match self.writing_since {
            Some(since) => self.data.lsn + now.saturating_sub(since) / MS,
            None => self.data.lsn,
        }
    }

    fn fix_lsn(&mut self, now: Nanos) {
        self.data.lsn = self.lsn(now);
        self.writing_since = None;
    }

    /// Starts a new postmaster; returns its identity.
    pub fn start(&mut self, primary: bool, upstream: Option<usize>) -> u64 {
        self.pid += 1;
        self.proc = Proc::Starting { primary };
        self.streaming = false;
        self.upstream = if primary { None } else { upstream };
        self.permit = None;
        self.pid
    }

    /// The start completed: PostgreSQL accepts connections.
    pub fn started(&mut self, now: Nanos) {
        let Proc::Starting { primary } = self.proc else {
            return;
        };
        self.proc = Proc::Running;
        self.data.primary = primary;
        self.data.clean = false;
        if primary {
            self.writing_since = Some(now);
        }
    }

    pub fn promote(&mut self) {
        if self.proc == Proc::Running && !self.data.primary {
            self.proc = Proc::Promoting;
        }
    }

    /// The promotion completed: a new timeline, and writes.
    pub fn promoted(&mut self, now: Nanos) {
        if self.proc != Proc::Promoting {
            return;
        }
        let d = &mut self.data;
        d.history.push((d.timeline, d.lsn));
        d.timeline += 1;
        d.primary = true;
        self.proc = Proc::Running;
        self.upstream = None;
        self.writing_since = Some(now);
    }

    pub fn stop(&mut self) {
        if self.alive() {
            self.proc = Proc::Stopping;
        }
    }

    /// The postmaster is gone: cleanly (`clean`, a stop that completed) or killed.
    pub fn exited(&mut self, now: Nanos, clean: bool) {
        self.fix_lsn(now);
        // A promotion cut short leaves a replica behind.
        self.proc = Proc::Stopped;
        self.streaming = false;
        self.data.clean = clean;
        self.permit = None;
    }

    /// The host rebooted: whatever ran is gone, as after a kill.
    pub fn host_died(&mut self, now: Nanos) {
        if self.alive() {
            self.exited(now, false);
        }
        self.pid += 1;
    }

    /// `pg_controldata` of the stopped (or running) data directory.
    pub fn control(&self) -> ControlInfo {
        let d = &self.data;
        let state = match (d.primary, d.clean) {
            (true, true) => ControlState::ShutDown,
            (true, false) => ControlState::InProduction,
            (false, true) => ControlState::ShutDownInRecovery,
            (false, false) => ControlState::InArchiveRecovery,
        };
        ControlInfo {
            sysid: SYSID.into(),
            state,
            checkpoint_lsn: d.lsn,
            checkpoint_timeline: d.timeline,
            min_recovery_lsn: if d.primary { 0 } else { d.lsn },
            min_recovery_timeline: if d.primary { 0 } else { d.timeline },
        }
    }

    /// A replica follows `up` (its upstream's data and position) when their histories agree.
    /// Returns whether it streams.
    pub fn follow(&mut self, up: &Data, up_lsn: u64) -> bool {
        if self.proc != Proc::Running || self.data.primary {
            self.streaming = false;
            return false;
        }
        let d = &mut self.data;
        let compatible = if up.timeline == d.timeline {
            true
        } else if up.timeline > d.timeline {
            up.history
                .iter()
                .find(|(parent, _)| *parent == d.timeline)
                .is_some_and(|(_, switch)| d.lsn <= *switch)
        } else {
            false
        };
        if compatible {
            d.timeline = up.timeline;
            d.history = up.history.clone();
            d.lsn = d.lsn.max(up_lsn);
        }
        self.streaming = compatible;
        compatible
    }

    /// pg_rewind / a new base backup from `source`: this data directory becomes a stopped
    /// replica on the source's history.
    pub fn copy_from(&mut self, source: &Data, source_lsn: u64) {
        let switch = source
            .history
            .iter()
            .find(|(parent, _)| *parent == self.data.timeline)
            .map_or(source_lsn, |(_, s)| *s);
        self.data = Data {
            timeline: source.timeline,
            lsn: self.data.lsn.min(switch).min(source_lsn),
            history: source.history.clone(),
            primary: false,
            clean: true,
        };
    }
}
