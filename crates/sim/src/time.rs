//! Simulated real time, the event queue, and each host's clock.
//!
//! Real time (`Nanos`) is what the checker measures "at the same instant" with; no process sees
//! it. A process sees only its host's `CLOCK_BOOTTIME` ([`HostClock`]), which runs at a rate
//! off by a few hundred ppm and restarts from a small value when the host boots again.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use pgvigil_lock::BootInstant;

/// Simulated real time, in nanoseconds since the schedule began.
pub type Nanos = u64;

pub const MS: Nanos = 1_000_000;
pub const SEC: Nanos = 1_000_000_000;

pub fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub fn secs_f(t: Nanos) -> f64 {
    t as f64 / SEC as f64
}

/// One host's `CLOCK_BOOTTIME`.
#[derive(Clone, Copy, Debug)]
pub struct HostClock {
    /// Real time of the boot.
    booted_at: Nanos,
    /// What the clock read at the boot.
    offset: Nanos,
    /// Rate error in parts per million: the clock advances `1 + ppm / 1e6` seconds per real
    /// second.
    ppm: i64,
}

impl HostClock {
    pub fn new(booted_at: Nanos, offset: Nanos, ppm: i64) -> HostClock {
        HostClock {
            booted_at,
            offset,
            ppm,
        }
    }

    pub fn ppm(&self) -> i64 {
        self.ppm
    }

    /// The clock's reading at real time `t`.
    pub fn read(&self, t: Nanos) -> BootInstant {
        let elapsed = i128::from(t.saturating_sub(self.booted_at));
        let local = elapsed + elapsed * i128::from(self.ppm) / 1_000_000;
        BootInstant::from_nanos(self.offset + u64::try_from(local.max(0)).unwrap_or(u64::MAX))
    }

    /// The first real time at which the clock reads `at` or later.
    pub fn real_time_of(&self, at: BootInstant) -> Nanos {
        let local = i128::from(at.as_nanos().saturating_sub(self.offset));
        let rate = 1_000_000 + i128::from(self.ppm);
        let elapsed = (local * 1_000_000 + rate - 1) / rate;
        let mut t = self.booted_at + u64::try_from(elapsed.max(0)).unwrap_or(u64::MAX / 2);
        // The clock reads in whole nanoseconds: settle on the first one exactly.
        while self.read(t) < at {
            t += 1;
        }
        while t > self.booted_at && self.read(t - 1) >= at {
            t -= 1;
        }
        t
    }

    /// Real time that passes while this clock advances by `d`.
    pub fn real_duration(&self, d: Duration) -> Nanos {
        let rate = 1_000_000 + i128::from(self.ppm);
        u64::try_from((i128::from(nanos(d)) * 1_000_000 + rate - 1) / rate).unwrap_or(u64::MAX / 2)
    }
}

/// The queue of future events, in time order; ties in the order they were scheduled.
pub struct Queue<E> {
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
}

/// Events are boxed: the heap moves entries around, and some events are large.
struct Entry<E> {
    at: Nanos,
    seq: u64,
    event: Box<E>,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    /// Reversed: the heap pops the earliest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        Reverse((self.at, self.seq)).cmp(&Reverse((other.at, other.seq)))
    }
}

impl<E> Queue<E> {
    pub fn new() -> Queue<E> {
        Queue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn push(&mut self, at: Nanos, event: E) {
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            event: Box::new(event),
        });
    }

    pub fn pop(&mut self) -> Option<(Nanos, E)> {
        self.heap.pop().map(|e| (e.at, *e.event))
    }

    pub fn peek_time(&self) -> Option<Nanos> {
        self.heap.peek().map(|e| e.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_clock_reaches_an_instant_earlier_in_real_time() {
        let fast = HostClock::new(10 * SEC, 500 * SEC, 200);
        let slow = HostClock::new(10 * SEC, 500 * SEC, -200);
        assert_eq!(fast.read(10 * SEC), BootInstant::from_nanos(500 * SEC));
        assert_eq!(fast.read(20 * SEC), BootInstant::from_nanos(510 * SEC + 2 * MS));
        assert_eq!(slow.read(20 * SEC), BootInstant::from_nanos(510 * SEC - 2 * MS));
        let at = BootInstant::from_nanos(510 * SEC);
        for clock in [fast, slow] {
            let t = clock.real_time_of(at);
            assert!(clock.read(t) >= at);
            assert!(clock.read(t - 1) < at);
        }
        assert!(fast.real_time_of(at) < slow.real_time_of(at));
    }

    #[test]
    fn queue_pops_in_time_then_insertion_order() {
        let mut q = Queue::new();
        q.push(5, "b");
        q.push(1, "a");
        q.push(5, "c");
        assert_eq!(q.peek_time(), Some(1));
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).map(|(_, e)| e).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }
}
