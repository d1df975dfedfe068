//! What one seed decides before the run: the cluster's settings, how long things take, how
//! the network behaves, every host's clock error, and the faults and when they strike.

use std::time::Duration;

use crate::rng::Rng;
use crate::time::{MS, Nanos, SEC};

pub const NODES: usize = 3;

/// The dynamic configuration the agents run with (Patroni's names).
#[derive(Clone, Debug)]
pub struct Settings {
    pub ttl: Duration,
    pub loop_wait: Duration,
    pub retry_timeout: Duration,
    /// `fast_takeover` on: leaders promise F, replicas take over after F + margin.
    pub fast_takeover: bool,
    pub heartbeat_interval: Duration,
    pub fence_after: Duration,
    pub takeover_margin: Duration,
}

impl Settings {
    /// pgvigil's defaults.
    pub fn defaults() -> Settings {
        Settings {
            ttl: Duration::from_secs(30),
            loop_wait: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(10),
            fast_takeover: true,
            heartbeat_interval: Duration::from_millis(500),
            fence_after: Duration::from_millis(3500),
            takeover_margin: Duration::from_millis(500),
        }
    }

    /// Any valid combination: `loop_wait + 2 * retry_timeout <= ttl`, and the fast-takeover
    /// bounds the configuration validates (F in 1 s..ttl/2, H in 50 ms..F/3, m in 100 ms..F).
    fn random(rng: &mut Rng) -> Settings {
        let ttl = *rng.pick(&[10u64, 15, 20, 30, 60]);
        let loop_wait = rng.range(1, (ttl / 3).min(10));
        let retry_timeout = rng.range(1, (ttl - loop_wait) / 2);
        let fence_after = rng.range(1000, ttl * 1000 / 2);
        let heartbeat = rng.range(50, fence_after / 3);
        let margin = rng.log_range(100, fence_after.min(2000));
        Settings {
            ttl: Duration::from_secs(ttl),
            loop_wait: Duration::from_secs(loop_wait),
            retry_timeout: Duration::from_secs(retry_timeout),
            fast_takeover: !rng.chance(0.15),
            heartbeat_interval: Duration::from_millis(heartbeat),
            fence_after: Duration::from_millis(fence_after),
            takeover_margin: Duration::from_millis(margin),
        }
    }
}

/// How long PostgreSQL and the fences take (each draw uniform in its range).
#[derive(Clone, Debug)]
pub struct Timings {
    pub start: (Nanos, Nanos),
    pub promote: (Nanos, Nanos),
    pub checkpoint: (Nanos, Nanos),
    pub stop: (Nanos, Nanos),
    pub rewind: (Nanos, Nanos),
    /// From a fence deciding to stop PostgreSQL to PostgreSQL refusing writes.
    pub kill: (Nanos, Nanos),
    /// From PostgreSQL being ready to `pg_ctl` returning to the agent.
    pub pg_ctl: (Nanos, Nanos),
    /// The agent's postmaster watcher polls this often.
    pub watcher: Nanos,
}

impl Timings {
    fn random(rng: &mut Rng) -> Timings {
        let scale = |lo: Nanos, hi: Nanos, rng: &mut Rng| {
            let hi = rng.range(lo, hi);
            (lo, hi)
        };
        Timings {
            start: scale(200 * MS, 3 * SEC, rng),
            promote: scale(100 * MS, 2 * SEC, rng),
            checkpoint: scale(10 * MS, 3 * SEC, rng),
            stop: scale(5 * MS, 500 * MS, rng),
            rewind: scale(500 * MS, 5 * SEC, rng),
            kill: scale(MS, 30 * MS, rng),
            pg_ctl: (0, 100 * MS),
            watcher: 500 * MS,
        }
    }
}

/// Message delays and loss between a host and etcd or another host.
#[derive(Clone, Debug)]
pub struct Network {
    /// Usual one-way delay.
    pub delay: (Nanos, Nanos),
    /// Chance of a much slower message, and how slow.
    pub spike_chance: f64,
    pub spike: (Nanos, Nanos),
    /// Chance that a message is lost.
    pub loss: f64,
    /// Extra delay of a watch event behind the write it reports.
    pub watch_delay: (Nanos, Nanos),
}

impl Network {
    fn random(rng: &mut Rng) -> Network {
        Network {
            delay: (100_000, rng.range(300_000, 5 * MS)),
            spike_chance: rng.unit() * 0.03,
            spike: (20 * MS, rng.range(100 * MS, 2500 * MS)),
            loss: rng.unit() * rng.unit() * 0.05,
            watch_delay: (0, rng.range(MS, 300 * MS)),
        }
    }
}

/// Which node a fault strikes: a fixed one, or whichever leads when it strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Node(usize),
    Leader,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// SIGSTOP of the agent (its in-process fence too); PostgreSQL and the fencer run on.
    AgentStall { target: Target, for_: Nanos },
    /// The agent dies (SIGKILL); a new one starts after `restart_after`.
    AgentCrash { target: Target, restart_after: Nanos },
    /// The host dies (everything on it); it boots again after `reboot_after`.
    HostDeath { target: Target, reboot_after: Nanos },
    /// Every process of the host stops while its clock runs (CPU starvation, a suspend that
    /// `CLOCK_BOOTTIME` counts).
    HostStall { target: Target, for_: Nanos },
    /// The host cannot reach etcd (`full`: nor the other hosts).
    Partition { target: Target, for_: Nanos, full: bool },
    /// The host's links get slower and lossier.
    SlowLink {
        target: Target,
        for_: Nanos,
        loss: f64,
        delay: Nanos,
    },
    /// PostgreSQL dies (OOM kill, a crash).
    PgCrash { target: Target },
    /// etcd answers nothing (every member stalled, or quorum lost); with `new_leader` a new
    /// etcd leader takes over at the end and extends every lease.
    EtcdOutage { for_: Nanos, new_leader: bool },
}

impl Fault {
    /// How long until the fault has healed (restarts and reboots included).
    pub fn lasts(&self) -> Nanos {
        match *self {
            Fault::AgentStall { for_, .. }
            | Fault::HostStall { for_, .. }
            | Fault::Partition { for_, .. }
            | Fault::SlowLink { for_, .. }
            | Fault::EtcdOutage { for_, .. } => for_,
            Fault::AgentCrash { restart_after, .. } => restart_after,
            Fault::HostDeath { reboot_after, .. } => reboot_after,
            Fault::PgCrash { .. } => 0,
        }
    }
}

/// Which kinds of fault a run draws from.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultMix {
    /// Whole-host stalls longer than the takeover margin too. Outside the guarantee: when a
    /// host whose clock ran on while it was frozen resumes past its fence deadline, its
    /// PostgreSQL runs until the fence's kill lands (see `docs/simulation.md`).
    pub long_host_stalls: bool,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub settings: Settings,
    pub timings: Timings,
    pub net: Network,
    /// Clock rate error of each host, ppm.
    pub clock_ppm: [i64; NODES],
    pub etcd_ppm: i64,
    /// When each agent first starts.
    pub first_start: [Nanos; NODES],
    pub faults: Vec<(Nanos, Fault)>,
    /// Every fault has healed by then.
    pub healed_at: Nanos,
    /// A leader must exist by then.
    pub leader_by: Nanos,
    pub end: Nanos,
}

impl Plan {
    pub fn generate(seed: u64, mix: FaultMix) -> Plan {
        let mut rng = Rng::new(seed);
        let settings = if rng.chance(0.4) {
            Settings::defaults()
        } else {
            Settings::random(&mut rng)
        };
        let timings = Timings::random(&mut rng);
        let net = Network::random(&mut rng);
        let mut ppm = || rng.range(0, 400) as i64 - 200;
        let clock_ppm = [ppm(), ppm(), ppm()];
        let etcd_ppm = ppm();
        let first_start = [0, rng.range(0, 2 * SEC), rng.range(0, 2 * SEC)];
        let ttl = crate::time::nanos(settings.ttl);
        let loop_wait = crate::time::nanos(settings.loop_wait);
        // Within the margin, a frozen host resumes before any other node can take over and
        // promote: the timing argument covers it.
        let host_stall_max = if mix.long_host_stalls {
            ttl + 15 * SEC
        } else {
            crate::time::nanos(settings.takeover_margin)
        };
        // A leader first, then the faults.
        let faults_from = 15 * SEC + 2 * loop_wait;
        let span = rng.range(30 * SEC, 120 * SEC);
        let count = rng.range(2, 12);
        let mut faults: Vec<(Nanos, Fault)> = (0..count)
            .map(|_| {
                let at = faults_from + rng.range(0, span);
                (at, random_fault(&mut rng, ttl, host_stall_max))
            })
            .collect();
        faults.sort_by_key(|(at, _)| *at);
        let healed_at = faults
            .iter()
            .map(|(at, f)| at + f.lasts())
            .max()
            .unwrap_or(faults_from);
        // After the last fault heals: the key of a dead leader may outlive it by a lease
        // extended by a new etcd leader (ttl + 1 s), then a race, a promotion, a rewind.
        let leader_by = healed_at + 2 * ttl + 2 * loop_wait + 30 * SEC;
        Plan {
            seed,
            settings,
            timings,
            net,
            clock_ppm,
            etcd_ppm,
            first_start,
            faults,
            healed_at,
            leader_by,
            // A settled cluster stops fencing: watch it for a while.
            end: leader_by + 20 * SEC,
        }
    }
}

fn random_target(rng: &mut Rng) -> Target {
    if rng.chance(0.6) {
        Target::Leader
    } else {
        Target::Node(rng.index(NODES))
    }
}

fn random_fault(rng: &mut Rng, ttl: Nanos, host_stall_max: Nanos) -> Fault {
    let target = random_target(rng);
    // Long enough to cross the promise, the lease, or both.
    let long = rng.log_range(50 * MS, ttl + 15 * SEC);
    match rng.range(0, 99) {
        0..=19 => Fault::AgentStall { target, for_: long },
        20..=29 => Fault::AgentCrash {
            target,
            restart_after: rng.log_range(100 * MS, 30 * SEC),
        },
        30..=39 => Fault::HostDeath {
            target,
            reboot_after: rng.log_range(SEC, 40 * SEC),
        },
        40..=47 => Fault::HostStall {
            target,
            for_: rng.log_range(MS, host_stall_max),
        },
        48..=64 => Fault::Partition {
            target,
            for_: long,
            full: rng.chance(0.5),
        },
        65..=74 => Fault::SlowLink {
            target,
            for_: long,
            loss: rng.unit() * 0.3,
            delay: rng.log_range(5 * MS, 2500 * MS),
        },
        75..=84 => Fault::PgCrash { target },
        _ => Fault::EtcdOutage {
            for_: rng.log_range(50 * MS, 20 * SEC),
            new_leader: rng.chance(0.6),
        },
    }
}

impl Plan {
    /// The plan in a few readable lines (times in seconds of real time).
    pub fn describe(&self) -> String {
        let s = &self.settings;
        let t = &self.timings;
        let n = &self.net;
        let secs = crate::time::secs_f;
        let range = |r: (Nanos, Nanos)| format!("{:.3}-{:.3}", secs(r.0), secs(r.1));
        let mut out = format!(
            "seed {}: ttl {:?}, loop_wait {:?}, retry_timeout {:?}, fast takeover {} (H {:?}, F {:?}, margin {:?})\n",
            self.seed,
            s.ttl,
            s.loop_wait,
            s.retry_timeout,
            s.fast_takeover,
            s.heartbeat_interval,
            s.fence_after,
            s.takeover_margin
        );
        out += &format!(
            "timings (s): start {}, promote {}, checkpoint {}, stop {}, rewind {}, kill {}\n",
            range(t.start),
            range(t.promote),
            range(t.checkpoint),
            range(t.stop),
            range(t.rewind),
            range(t.kill)
        );
        out += &format!(
            "network: delay {} s, spikes {:.1}% of {} s, loss {:.2}%, watch lag {} s; clocks {:?} ppm, etcd {} ppm\n",
            range(n.delay),
            n.spike_chance * 100.0,
            range(n.spike),
            n.loss * 100.0,
            range(n.watch_delay),
            self.clock_ppm,
            self.etcd_ppm
        );
        for (at, fault) in &self.faults {
            out += &format!(
                "  {:>8.3} {fault:?} (heals after {:.3} s)\n",
                secs(*at),
                secs(fault.lasts())
            );
        }
        out += &format!(
            "all healed at {:.3} s, a leader due by {:.3} s, end {:.3} s",
            secs(self.healed_at),
            secs(self.leader_by),
            secs(self.end)
        );
        out
    }
}
