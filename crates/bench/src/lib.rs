//! Benchmarks of pgvigil on a real cluster on this machine. See `bench/README.md`; the
//! binaries are in `src/bin/`.

pub mod results;

/// The number in environment variable `name`, or `default` when unset or not a number.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The comma-separated list in environment variable `name`, or `default`'s.
pub fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` shows them: other work on the
/// machine shows in every number, so the tables print it.
pub fn load_averages() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Median and spread of a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p95: f64,
    pub n: usize,
}

/// Summarizes `values` (nearest-rank percentiles); `None` when empty.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let rank = ((0.95 * n as f64).ceil() as usize).clamp(1, n);
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        p95: v[rank - 1],
        n,
    })
}

/// `tps = 1234.5 (without initial connection time)` from pgbench's output.
pub fn parse_pgbench_tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|l| l.starts_with("tps = ") && l.contains("without initial connection time"))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `latency average = 0.213 ms` from pgbench's output, in milliseconds.
pub fn parse_pgbench_latency_ms(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("latency average = "))
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|n| n.trim().parse().ok())
}

/// `number of transactions actually processed: 123456` (pgbench 15 may add `/123456` with -t).
pub fn parse_pgbench_transactions(output: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
}

/// CPU time (user and system, nanoseconds) used so far by the threads of process `pid`, from
/// `/proc/PID/task/*/schedstat` (nanosecond resolution, unlike the tick counts of `stat`).
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that just exited has no schedstat any more: skip it.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// The 1-minute load average from `/proc/loadavg`.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.p95, s.n), (3.0, 1.0, 5.0, 5.0, 5));
        let s = summarize(&(1..=200).map(f64::from).collect::<Vec<_>>()).unwrap();
        assert_eq!((s.median, s.p95), (100.5, 190.0));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn pgbench_output() {
        let out = "latency average = 0.2 ms\ninitial connection time = 3.1 ms\ntps = 18123.456789 (without initial connection time)\n";
        assert_eq!(parse_pgbench_tps(out), Some(18123.456789));
        assert_eq!(parse_pgbench_tps("nothing"), None);
        assert_eq!(parse_pgbench_latency_ms(out), Some(0.2));
        let out = "number of transactions actually processed: 181234\nlatency average = 0.221 ms\n";
        assert_eq!(parse_pgbench_transactions(out), Some(181234));
        assert_eq!(parse_pgbench_latency_ms(out), Some(0.221));
        assert_eq!(
            parse_pgbench_transactions("number of transactions actually processed: 1000/1000\n"),
            Some(1000)
        );
    }

    #[test]
    fn own_cpu_time_and_load() {
        let busy: u64 = (0..2_000_000u64).map(|i| i ^ (i >> 3)).sum();
        assert!(busy > 0);
        assert!(process_cpu_ns(std::process::id()).is_some_and(|ns| ns > 0));
        assert!(load_average().is_some());
    }
}
