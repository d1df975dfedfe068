//! The clock every lock deadline is measured on: `CLOCK_BOOTTIME`.
//!
//! `std::time::Instant` (and so tokio's timers) reads `CLOCK_MONOTONIC`, which stops while the
//! host is suspended: a leader suspended for a minute would wake up believing its lease had
//! run for no time at all, while etcd (on another host) expired it long ago. `CLOCK_BOOTTIME`
//! is `CLOCK_MONOTONIC` plus the time spent suspended, so a deadline measured on it passes
//! during a suspend and is acted on the moment the host runs again. Neither clock is stepped by
//! NTP or an operator (only slewed), so no deadline jumps with the wall clock.
//!
//! What no guest clock can see is a hypervisor pause (kvmclock stops with the VM): see
//! `docs/leadership.md` for what that means for the fast takeover.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on `CLOCK_BOOTTIME`, as time since boot. Comparable across the processes of one
/// host (the agent and its fencer exchange these as nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Reads `CLOCK_BOOTTIME`.
    pub fn now() -> BootInstant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a pointer to a live local.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        // CLOCK_BOOTTIME exists since Linux 2.6.39; failing here means a broken kernel ABI,
        // and a clock that cannot be read must not be mistaken for one that stands still.
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        BootInstant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// The instant `nanos` nanoseconds after boot (tests, the simulation, the fencer protocol).
    pub const fn from_nanos(nanos: u64) -> BootInstant {
        BootInstant(Duration::from_nanos(nanos))
    }

    pub fn as_nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Time since boot.
    pub fn since_boot(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

impl Sub<Duration> for BootInstant {
    type Output = BootInstant;
    fn sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_advances_and_is_at_least_monotonic() {
        let mono0 = std::time::Instant::now();
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = BootInstant::now();
        let mono = mono0.elapsed();
        assert!(b > a);
        // BOOTTIME = MONOTONIC + time suspended: it never advances less than MONOTONIC.
        assert!(b.saturating_duration_since(a) + Duration::from_millis(1) >= mono - Duration::from_millis(5));
    }

    #[test]
    fn arithmetic_saturates() {
        let t = BootInstant::from_nanos(1_000);
        assert_eq!(t - Duration::from_secs(5), BootInstant::from_nanos(0));
        assert_eq!(
            t.saturating_duration_since(t + Duration::from_secs(1)),
            Duration::ZERO
        );
        assert_eq!((t + Duration::from_nanos(500)).as_nanos(), 1_500);
    }
}
