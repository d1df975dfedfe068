//! The checker's [`Report`]: the writes and samples it collected, and the questions the fault
//! scenarios ask of them (lost writes, two writable nodes in a tick, the write gap around a
//! mark).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::{Ack, Tick, shorten};

/// What the checker saw, and the assertions of the fault scenarios.
#[derive(Clone, Debug)]
pub struct Report {
    pub started: Instant,
    pub ended: Instant,
    pub acks: Vec<Ack>,
    /// Writes the server refused (read-only node, no primary behind the router, ...).
    pub failed: usize,
    /// Writes whose outcome is unknown (timeout, broken connection).
    pub indeterminate: Vec<i64>,
    pub last_error: Option<String>,
    pub ticks: Vec<Tick>,
    pub marks: Vec<(String, Instant)>,
    /// Node names, in the order of [`Tick::nodes`].
    pub names: Vec<String>,
}

impl Report {
    pub fn acked_ids(&self) -> Vec<i64> {
        self.acks.iter().map(|a| a.id).collect()
    }

    /// Acknowledged ids missing from `present`.
    pub fn lost(&self, present: &HashSet<i64>) -> Vec<i64> {
        self.acks
            .iter()
            .map(|a| a.id)
            .filter(|id| !present.contains(id))
            .collect()
    }

    /// The longest time between two consecutive acknowledgements.
    pub fn max_write_gap(&self) -> Duration {
        self.acks
            .windows(2)
            .map(|w| w[1].acked - w[0].acked)
            .max()
            .unwrap_or_default()
    }

    pub fn mark(&self, what: &str) -> Option<Instant> {
        self.marks.iter().find(|(m, _)| m == what).map(|(_, at)| *at)
    }

    /// The client's write gap around the instant `at`: from the last acknowledgement before it
    /// to the first after it. `None` if no write was acknowledged after `at`.
    pub fn gap_around(&self, at: Instant) -> Option<Duration> {
        let before = self
            .acks
            .iter()
            .rev()
            .find(|a| a.acked <= at)
            .map_or(self.started, |a| a.acked);
        let after = self.acks.iter().find(|a| a.acked > at)?;
        Some(after.acked - before)
    }

    /// The write gap a fault caused: the longest time between consecutive acknowledgements
    /// from the last one before the mark `what` up to the next mark, counting a gap still open
    /// at that next mark (without a next mark: up to the last acknowledgement). `None` if there
    /// is no such mark.
    pub fn gap_after_mark(&self, what: &str) -> Option<Duration> {
        let at = self.mark(what)?;
        let next = self.marks.iter().map(|(_, t)| *t).filter(|t| *t > at).min();
        let mut last = self
            .acks
            .iter()
            .rev()
            .find(|a| a.acked <= at)
            .map_or(self.started, |a| a.acked);
        let mut worst = Duration::ZERO;
        for a in self
            .acks
            .iter()
            .filter(|a| a.acked > at && next.is_none_or(|n| a.acked <= n))
        {
            worst = worst.max(a.acked - last);
            last = a.acked;
        }
        if let Some(next) = next {
            worst = worst.max(next.saturating_duration_since(last));
        }
        Some(worst)
    }

    /// Ticks in which two or more nodes said they were not in recovery.
    pub fn ticks_with_two_primaries(&self) -> Vec<&Tick> {
        self.ticks
            .iter()
            .filter(|t| t.count(|n| n.primary == Some(true)) >= 2)
            .collect()
    }

    /// Ticks in which two or more nodes acknowledged a probe write.
    pub fn ticks_with_two_writable(&self) -> Vec<&Tick> {
        self.ticks
            .iter()
            .filter(|t| t.count(|n| n.write_acked) >= 2)
            .collect()
    }

    fn describe_tick(&self, t: &Tick) -> String {
        let nodes: Vec<String> = t
            .nodes
            .iter()
            .zip(&self.names)
            .map(|(n, name)| {
                let role = match n.primary {
                    Some(true) if n.write_acked => "primary+write",
                    Some(true) => "primary",
                    Some(false) => "replica",
                    None => "-",
                };
                match &n.error {
                    Some(e) if !n.write_acked => format!("{name}={role}({})", shorten(e)),
                    _ => format!("{name}={role}"),
                }
            })
            .collect();
        format!(
            "t+{:.1}s {}",
            (t.at - self.started).as_secs_f64(),
            nodes.join(" ")
        )
    }

    /// A human-readable summary (printed by every scenario).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "checker: {:.1}s, {} writes acknowledged, {} refused, {} indeterminate, {} sampler ticks",
            (self.ended - self.started).as_secs_f64(),
            self.acks.len(),
            self.failed,
            self.indeterminate.len(),
            self.ticks.len()
        );
        let _ = writeln!(
            s,
            "  longest write gap: {:.2}s",
            self.max_write_gap().as_secs_f64()
        );
        for (what, at) in &self.marks {
            let gap = match self.acks.iter().any(|a| a.acked > *at) {
                true => format!(
                    "{:.2}s",
                    self.gap_after_mark(what).unwrap_or_default().as_secs_f64()
                ),
                false => "no write acknowledged after it".to_string(),
            };
            let _ = writeln!(
                s,
                "  t+{:.1}s {what}: write gap {gap}",
                (*at - self.started).as_secs_f64()
            );
        }
        let two_p = self.ticks_with_two_primaries();
        let two_w = self.ticks_with_two_writable();
        let _ = writeln!(
            s,
            "  ticks with two primaries: {}, with two nodes acknowledging writes: {}",
            two_p.len(),
            two_w.len()
        );
        for t in two_p.iter().chain(two_w.iter()).take(10) {
            let _ = writeln!(s, "    {}", self.describe_tick(t));
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(s, "  last writer error: {e}");
        }
        s
    }

    /// A compact timeline of the sampler ticks where what a node answered changed (at most
    /// 60 lines).
    pub fn role_changes(&self) -> String {
        let mut out = String::new();
        let mut last: Option<Vec<(Option<bool>, bool)>> = None;
        let mut lines = 0;
        for t in &self.ticks {
            let roles: Vec<(Option<bool>, bool)> =
                t.nodes.iter().map(|n| (n.primary, n.write_acked)).collect();
            if last.as_ref() != Some(&roles) {
                lines += 1;
                if lines > 60 {
                    let _ = writeln!(out, "  ...");
                    break;
                }
                let _ = writeln!(out, "  {}", self.describe_tick(t));
                last = Some(roles);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::NodeSample;

    fn ack(start: Instant, id: i64, ms: u64) -> Ack {
        let at = start + Duration::from_millis(ms);
        Ack {
            id,
            sent: at,
            acked: at,
        }
    }

    #[test]
    fn gaps_loss_and_double_primaries() {
        let t0 = Instant::now();
        let node = |primary: Option<bool>, write_acked: bool| NodeSample {
            primary,
            write_acked,
            error: None,
        };
        let report = Report {
            started: t0,
            ended: t0 + Duration::from_secs(10),
            acks: vec![
                ack(t0, 1, 100),
                ack(t0, 2, 200),
                ack(t0, 3, 3200),
                ack(t0, 4, 3300),
            ],
            failed: 5,
            indeterminate: vec![],
            last_error: None,
            ticks: vec![
                Tick {
                    at: t0,
                    nodes: vec![node(Some(true), true), node(Some(false), false)],
                },
                Tick {
                    at: t0,
                    nodes: vec![node(Some(true), false), node(Some(true), true)],
                },
                Tick {
                    at: t0,
                    nodes: vec![node(Some(true), true), node(Some(true), true)],
                },
                Tick {
                    at: t0,
                    nodes: vec![node(None, false), node(Some(true), true)],
                },
            ],
            marks: vec![
                ("kill".into(), t0 + Duration::from_millis(250)),
                ("heal".into(), t0 + Duration::from_millis(3250)),
                ("late".into(), t0 + Duration::from_millis(9000)),
            ],
            names: vec!["a".into(), "b".into()],
        };
        assert_eq!(report.max_write_gap(), Duration::from_millis(3000));
        assert_eq!(report.gap_after_mark("kill"), Some(Duration::from_millis(3000)));
        // From the last ack (3.3 s) to the next mark (9 s), still open.
        assert_eq!(report.gap_after_mark("heal"), Some(Duration::from_millis(5700)));
        assert_eq!(report.gap_after_mark("late"), Some(Duration::ZERO));
        assert_eq!(report.gap_after_mark("none"), None);
        assert_eq!(report.gap_around(t0 + Duration::from_secs(5)), None);
        let present: HashSet<i64> = [1, 2, 4].into();
        assert_eq!(report.lost(&present), vec![3]);
        assert_eq!(report.ticks_with_two_primaries().len(), 2);
        assert_eq!(report.ticks_with_two_writable().len(), 1);
        let summary = report.summary();
        assert!(summary.contains("4 writes acknowledged"), "{summary}");
        assert!(summary.contains("kill: write gap 3.00s"), "{summary}");
    }
}
