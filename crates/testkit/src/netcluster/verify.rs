//! The assertions every fault scenario ends with: the cluster converges (one leader, every
//! replica streaming from it on its timeline history), acknowledged writes survive, and no
//! sampler tick saw two nodes acknowledge a write.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, bail};

use super::NetCluster;
use crate::checker::{self, Report};
use crate::wait_until;

impl NetCluster {
    /// The current WAL timeline of host `i` (primary: from its current WAL file; replica: the
    /// timeline it receives on).
    fn timeline_of(&self, i: usize, primary: bool) -> anyhow::Result<u32> {
        if primary {
            let f = self.psql(i, "SELECT pg_walfile_name(pg_current_wal_lsn())")?;
            Ok(u32::from_str_radix(
                f.get(..8).context("short WAL file name")?,
                16,
            )?)
        } else {
            Ok(self
                .psql(i, "SELECT received_tli FROM pg_stat_wal_receiver")?
                .parse()?)
        }
    }

    fn history_file(&self, i: usize, tli: u32) -> anyhow::Result<String> {
        if tli <= 1 {
            return Ok(String::new());
        }
        self.psql(i, &format!("SELECT pg_read_file('pg_wal/{tli:08X}.history')"))
    }

    /// One check of the end state: a running leader that is a primary, every other host a
    /// replica streaming from the leader on the leader's timeline, with the same history file.
    pub fn converged(&self) -> anyhow::Result<usize> {
        let leader = self.leader().context("no running leader in /cluster")?;
        if self.psql(leader, "SELECT pg_is_in_recovery()")? != "f" {
            bail!("the leader is in recovery");
        }
        let tli = self.timeline_of(leader, true)?;
        let history = self.history_file(leader, tli)?;
        for i in (0..self.nodes.len()).filter(|&i| i != leader) {
            let row = self.psql(
                i,
                "SELECT status || ',' || coalesce(sender_host, '') FROM pg_stat_wal_receiver",
            )?;
            let want = format!("streaming,{}", self.nodes[leader].ip);
            if row != want {
                bail!("{}: wal receiver {row:?}, want {want:?}", self.nodes[i].name);
            }
            let their = self.timeline_of(i, false)?;
            if their != tli {
                bail!(
                    "{} receives timeline {their}, the leader is on {tli}",
                    self.nodes[i].name
                );
            }
            if self.history_file(i, tli)? != history {
                bail!(
                    "{} has a different history file for timeline {tli}",
                    self.nodes[i].name
                );
            }
        }
        Ok(leader)
    }

    /// Waits (bounded) until [`NetCluster::converged`] holds; returns the leader.
    pub fn wait_converged(&self, timeout: Duration) -> anyhow::Result<usize> {
        let mut last = String::new();
        let r = wait_until(
            "every node streaming from the leader on its timeline",
            timeout,
            || match self.converged() {
                Ok(l) => Some(l),
                Err(e) => {
                    last = e.to_string();
                    None
                }
            },
        );
        r.map_err(|e| anyhow::anyhow!("{e}: {last}\n{}", self.diagnostics()))
    }

    /// The ids in the checker's table on host `i`.
    pub fn ids_on(&self, i: usize) -> anyhow::Result<HashSet<i64>> {
        let text = self.psql(
            i,
            &format!(
                "SELECT coalesce(string_agg(id::text, ','), '') FROM {}",
                checker::WRITES_TABLE
            ),
        )?;
        Ok(text.split(',').filter_map(|s| s.parse().ok()).collect())
    }

    /// Waits until every replica has replayed what the leader has written so far.
    pub fn wait_replicas_caught_up(&self, leader: usize, timeout: Duration) -> anyhow::Result<()> {
        let lsn = self.psql(leader, "SELECT pg_current_wal_lsn()")?;
        for i in (0..self.nodes.len()).filter(|&i| i != leader) {
            let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
            wait_until(
                &format!("{} to replay {lsn}", self.nodes[i].name),
                timeout,
                || (self.psql(i, &sql).ok()? == "t").then_some(()),
            )?;
        }
        Ok(())
    }

    /// The assertions every fault scenario ends with, after healing: the cluster converges
    /// (one leader, every node streaming from it on the same timeline history); with
    /// `zero_loss`, every acknowledged write is on every node; no sampler tick saw two nodes
    /// acknowledge a write; unless `allow_two_primaries`, none saw two primaries. Prints the
    /// report. Returns the final leader.
    pub fn verify(&self, report: &Report, expect: Expect) -> anyhow::Result<usize> {
        eprintln!("{}", report.summary());
        eprintln!("role changes seen by the sampler:\n{}", report.role_changes());
        let leader = self.wait_converged(Duration::from_secs(180))?;
        self.wait_replicas_caught_up(leader, Duration::from_secs(60))?;
        let mut problems = Vec::new();
        for i in 0..self.nodes.len() {
            let lost = report.lost(&self.ids_on(i)?);
            if !lost.is_empty() {
                let msg = format!(
                    "{} acknowledged writes missing on {}: {:?}",
                    lost.len(),
                    self.nodes[i].name,
                    &lost[..lost.len().min(20)]
                );
                if expect.zero_loss {
                    problems.push(msg);
                } else {
                    eprintln!("(asynchronous mode) {msg}");
                }
            }
        }
        let two_w = report.ticks_with_two_writable().len();
        if two_w > 0 && !expect.two_writable_checked_by_caller {
            problems.push(format!("{two_w} sampler ticks saw two nodes acknowledge writes"));
        }
        let two_p = report.ticks_with_two_primaries().len();
        if two_p > 0 && !expect.allow_two_primaries {
            problems.push(format!("{two_p} sampler ticks saw two primaries"));
        }
        if !problems.is_empty() {
            bail!("{}\n{}", problems.join("\n"), self.diagnostics());
        }
        Ok(leader)
    }
}

/// What [`NetCluster::verify`] insists on.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// Every acknowledged write must survive (synchronous modes).
    pub zero_loss: bool,
    /// Two PostgreSQL primaries at one sampler tick are tolerated (a frozen agent whose
    /// PostgreSQL keeps running, without a watchdog); two nodes acknowledging writes never are.
    pub allow_two_primaries: bool,
    /// The scenario checks ticks with two writable nodes itself, in the periods where it can
    /// promise there are none (a scenario that disables the fences on purpose).
    pub two_writable_checked_by_caller: bool,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            zero_loss: true,
            allow_two_primaries: false,
            two_writable_checked_by_caller: false,
        }
    }
}
