//! The few Linux primitives the fence needs, without an async runtime: a pidfd (a handle on
//! the postmaster that cannot come to mean another process), a `CLOCK_BOOTTIME` timer, an
//! eventfd to wake a waiting thread, and `poll` over them. Each is a thin wrapper over one or
//! two system calls; none touches the filesystem.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use pgvigil_lock::BootInstant;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A process handle (Linux >= 5.3).
pub struct Pidfd {
    fd: OwnedFd,
    pid: i32,
}

impl Pidfd {
    pub fn open(pid: i32) -> io::Result<Pidfd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
        // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Pidfd { fd, pid })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal`; `Ok(false)` if the process has already exited.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<bool> {
        // SAFETY: pidfd_send_signal with a valid descriptor, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match check(rc) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the process to exit; true once it has.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        poll_readable(&[self.fd.as_raw_fd()], Some(timeout)).is_ok_and(|ready| ready[0])
    }

    pub fn has_exited(&self) -> bool {
        self.wait_exited(Duration::ZERO)
    }

    /// The descriptor, for [`poll_readable`] (readable once the process exited).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A timer on `CLOCK_BOOTTIME` set to an absolute instant; readable once it has passed.
pub struct BootTimer {
    fd: OwnedFd,
}

impl BootTimer {
    pub fn new() -> io::Result<BootTimer> {
        // SAFETY: timerfd_create with a clock id and flags returns a new descriptor or -1.
        let fd =
            unsafe { libc::timerfd_create(libc::CLOCK_BOOTTIME, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
        check(fd as libc::c_long)?;
        // SAFETY: a descriptor the kernel just returned.
        Ok(BootTimer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires at `at` (at once if it has passed); `None` disarms.
    pub fn set(&self, at: Option<BootInstant>) -> io::Result<()> {
        // Drain a pending expiry so the descriptor is not left readable from an earlier setting.
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer; EAGAIN when nothing is pending.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let value = match at {
            // it_value zero would disarm: an instant at or before boot means "now".
            Some(at) => {
                let d = at.since_boot().max(Duration::from_nanos(1));
                libc::timespec {
                    tv_sec: d.as_secs() as libc::time_t,
                    tv_nsec: d.subsec_nanos() as libc::c_long,
                }
            }
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: valid descriptor, pointer to a live itimerspec, no old value wanted.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        check(rc as libc::c_long).map(drop)
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Wakes a thread blocked in [`poll_readable`].
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd with an initial value and flags returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        check(fd as libc::c_long)?;
        // SAFETY: a descriptor the kernel just returned.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local; a full counter (EAGAIN) still leaves it readable.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer; EAGAIN when not signalled.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Polls `fds` for readability (EOF and errors count as readable); `None` waits forever.
/// Returns which are ready. EINTR is answered with "none ready".
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: a pointer to `polls.len()` live pollfd structures.
    let rc = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(polls.iter().map(|p| p.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_sees_a_child_exit_and_refuses_signals_after() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = Pidfd::open(child.id() as i32).unwrap();
        assert!(!pidfd.has_exited());
        assert!(pidfd.signal(libc::SIGKILL).unwrap());
        assert!(pidfd.wait_exited(Duration::from_secs(10)));
        child.wait().unwrap();
        assert!(
            !pidfd.signal(libc::SIGTERM).unwrap(),
            "the exited child is not signalled"
        );
    }

    #[test]
    fn boot_timer_fires_at_its_instant_and_eventfd_wakes() {
        let timer = BootTimer::new().unwrap();
        let wake = EventFd::new().unwrap();
        timer
            .set(Some(BootInstant::now() + Duration::from_millis(50)))
            .unwrap();
        let start = std::time::Instant::now();
        let ready = poll_readable(&[timer.raw(), wake.raw()], Some(Duration::from_secs(10))).unwrap();
        assert_eq!(ready, vec![true, false]);
        assert!(start.elapsed() >= Duration::from_millis(40));
        timer.set(None).unwrap();
        wake.wake();
        let ready = poll_readable(&[timer.raw(), wake.raw()], Some(Duration::from_secs(10))).unwrap();
        assert_eq!(ready, vec![false, true]);
        wake.drain();
        // A past instant fires at once.
        timer.set(Some(BootInstant::from_nanos(1))).unwrap();
        assert_eq!(
            poll_readable(&[timer.raw()], Some(Duration::from_secs(10))).unwrap(),
            vec![true]
        );
    }
}
