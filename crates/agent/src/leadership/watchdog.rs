//! The watchdog (`docs/patroni-compat.md` §4.12): a device that resets the machine unless it is fed
//! in time, so that a leader whose agent hangs or is frozen (SIGSTOP, a stuck kernel, a
//! starved VM) is stopped before its lease can expire, which the lease guardian alone cannot do
//! (it is frozen too).
//!
//! * `watchdog.mode`: `off`; `automatic` (use it when it can be opened); `required` (never act
//!   as primary without it: promotion is refused, and a leader whose watchdog cannot be
//!   activated demotes; the node reports `watchdog_failed` so that others do not pick it).
//! * Timeout `ttl - safety_margin` (`safety_margin: -1` means `ttl / 2`). Armed before
//!   promotion and on every cycle in which this node leads with a running primary; fed by the
//!   leadership driver after each accepted proof of the lock, but only when the reset it
//!   schedules comes before the lock's deadline; disarmed (magic close) when the node stops
//!   leading, in maintenance mode, and on a clean shutdown.
//! * A leader with an armed watchdog does not promise the fast takeover: the watchdog's timeout
//!   is far longer than the promise, so it could not keep it if the whole host hung.
//! * Drivers: `default` is a Linux watchdog device (`/dev/watchdog`: `WDIOC_SETTIMEOUT`,
//!   `WDIOC_KEEPALIVE`, `V` for magic close); `testing` is Patroni's test protocol on a FIFO or
//!   file: `Ctimeout=N\n` to set the timeout, `1` per keep-alive, `V` on magic close (a test
//!   harness reads the FIFO and plays the hardware).
//!
//! Relation to the lease: a keep-alive is fed at `f` only when `f + timeout` is not later than
//! the lock's deadline (`pgvigil_lock::LockCore::may_feed_watchdog`), so the machine resets
//! before the lease can expire and another node be promoted, however late the answer came.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use pgvigil_config::{WatchdogConfig, WatchdogMode};

/// One open watchdog device.
trait Device: Send {
    /// Sets the timeout; returns the timeout the device actually uses.
    fn set_timeout(&mut self, seconds: u32) -> io::Result<u32>;
    fn keepalive(&mut self) -> io::Result<()>;
    /// Disarms the device (magic close) and closes it.
    fn close(self: Box<Self>) -> io::Result<()>;
}

/// `_IOR('W', 5, int)`, `_IOWR('W', 6, int)`, `_IOR('W', 7, int)` from `linux/watchdog.h`.
const WDIOC_KEEPALIVE: u64 = 0x8004_5705;
const WDIOC_SETTIMEOUT: u64 = 0xC004_5706;
const WDIOC_GETTIMEOUT: u64 = 0x8004_5707;

/// A Linux watchdog device.
struct LinuxDevice {
    file: File,
}

impl LinuxDevice {
    fn open(path: &Path) -> io::Result<LinuxDevice> {
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(LinuxDevice { file })
    }

    fn ioctl_int(&self, request: u64, value: &mut i32) -> io::Result<()> {
        // SAFETY: the watchdog ioctls used here read and write one int through the pointer,
        // which points to a live i32 for the duration of the call.
        let rc = unsafe { nix::libc::ioctl(self.file.as_raw_fd(), request as _, value as *mut i32) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Device for LinuxDevice {
    fn set_timeout(&mut self, seconds: u32) -> io::Result<u32> {
        let mut value = seconds as i32;
        if let Err(e) = self.ioctl_int(WDIOC_SETTIMEOUT, &mut value) {
            tracing::warn!("the watchdog device cannot set its timeout: {e}");
            let mut current = 0;
            self.ioctl_int(WDIOC_GETTIMEOUT, &mut current)?;
            return Ok(current.max(0) as u32);
        }
        Ok(value.max(0) as u32)
    }

    fn keepalive(&mut self) -> io::Result<()> {
        let mut dummy = 0;
        self.ioctl_int(WDIOC_KEEPALIVE, &mut dummy)
    }

    fn close(mut self: Box<Self>) -> io::Result<()> {
        self.file.write_all(b"V")
    }
}

/// Patroni's `testing` driver: the protocol written to a FIFO or a file.
struct TestingDevice {
    file: File,
}

impl TestingDevice {
    fn open(path: &Path) -> io::Result<TestingDevice> {
        let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
        let mut options = OpenOptions::new();
        if fifo {
            // Without a reader (no "hardware"), opening fails at once instead of blocking.
            options.write(true).custom_flags(nix::libc::O_NONBLOCK);
        } else {
            options.append(true);
        }
        Ok(TestingDevice {
            file: options.open(path)?,
        })
    }
}

impl Device for TestingDevice {
    fn set_timeout(&mut self, seconds: u32) -> io::Result<u32> {
        self.file.write_all(format!("Ctimeout={seconds}\n").as_bytes())?;
        Ok(seconds)
    }

    fn keepalive(&mut self) -> io::Result<()> {
        self.file.write_all(b"1")
    }

    fn close(mut self: Box<Self>) -> io::Result<()> {
        self.file.write_all(b"V")
    }
}

/// The timeout for a given `ttl`: `ttl - safety_margin`, or `ttl / 2` with a margin of -1.
pub fn timeout_for(ttl: Duration, safety_margin: i64) -> u32 {
    let ttl = ttl.as_secs() as i64;
    let t = if safety_margin < 0 {
        ttl / 2
    } else {
        ttl - safety_margin
    };
    t.max(1) as u32
}

struct Active {
    device: Box<dyn Device>,
    timeout: u32,
}

/// The node's watchdog, shared by the HA loop and the leadership driver.
pub struct Watchdog {
    cfg: WatchdogConfig,
    active: Mutex<Option<Active>>,
    /// An activation failure was already logged (at warning level) since the last success.
    failure_logged: std::sync::atomic::AtomicBool,
}

impl Watchdog {
    pub fn new(cfg: WatchdogConfig) -> Watchdog {
        Watchdog {
            cfg,
            active: Mutex::new(None),
            failure_logged: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> io::Result<Box<dyn Device>> {
        if self.cfg.driver == "testing" {
            Ok(Box::new(TestingDevice::open(&self.cfg.device)?))
        } else {
            Ok(Box::new(LinuxDevice::open(&self.cfg.device)?))
        }
    }

    /// Arms the watchdog (or re-arms it with a new timeout) for `ttl`. Returns whether this
    /// node may act as primary: always in `off` mode, always in `automatic` mode (a failure is
    /// logged), and in `required` mode only with an armed device whose timeout is not longer
    /// than asked.
    pub fn activate(&self, ttl: Duration) -> bool {
        if self.cfg.mode == WatchdogMode::Off {
            return true;
        }
        let want = timeout_for(ttl, self.cfg.safety_margin);
        let mut active = self.lock();
        if active.as_ref().is_some_and(|a| a.timeout == want) {
            return true;
        }
        let result = match active.take() {
            Some(mut a) => a.device.set_timeout(want).map(|t| (a.device, t)),
            None => self.open().and_then(|mut d| {
                let t = d.set_timeout(want)?;
                Ok((d, t))
            }),
        };
        let required = self.cfg.mode == WatchdogMode::Required;
        match result {
            Ok((mut device, timeout)) => {
                if let Err(e) = device.keepalive() {
                    tracing::warn!("the watchdog did not accept a keep-alive: {e}");
                }
                if timeout > want {
                    tracing::warn!(
                        "the watchdog fires after {timeout} s, later than the {want} s the lease allows"
                    );
                    if required {
                        let _ = device.close();
                        return false;
                    }
                }
                if active.is_none() {
                    tracing::info!(
                        "watchdog {} armed with a {timeout} s timeout",
                        self.cfg.device.display()
                    );
                }
                self.failure_logged
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                *active = Some(Active { device, timeout });
                true
            }
            Err(e) => {
                let device = self.cfg.device.display();
                if required {
                    tracing::error!("the watchdog {device} is required but could not be activated: {e}");
                } else if !self
                    .failure_logged
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    // Automatic mode on a machine without a watchdog: say it once.
                    tracing::warn!("could not activate the watchdog {device}, running without one: {e}");
                } else {
                    tracing::debug!("could not activate the watchdog {device}: {e}");
                }
                !required
            }
        }
    }

    /// Feeds the armed watchdog (after a successful lease renewal). No-op when disarmed.
    pub fn keepalive(&self) {
        if let Some(a) = self.lock().as_mut()
            && let Err(e) = a.device.keepalive()
        {
            tracing::warn!("watchdog keep-alive failed: {e}");
        }
    }

    /// Disarms the watchdog (magic close). No-op when disarmed.
    pub fn disable(&self) {
        if let Some(a) = self.lock().take() {
            match a.device.close() {
                Ok(()) => tracing::info!("watchdog disarmed"),
                Err(e) => tracing::warn!("could not disarm the watchdog cleanly: {e}"),
            }
        }
    }

    pub fn is_active(&self) -> bool {
        self.lock().is_some()
    }

    /// The armed device's timeout.
    pub fn timeout(&self) -> Option<Duration> {
        self.lock()
            .as_ref()
            .map(|a| Duration::from_secs(u64::from(a.timeout)))
    }

    /// `watchdog_failed` in the status document: a required watchdog that is neither armed
    /// nor available (Patroni checks that the device is writable).
    pub fn failed(&self) -> bool {
        if self.cfg.mode != WatchdogMode::Required || self.is_active() {
            return false;
        }
        let path = std::ffi::CString::new(self.cfg.device.as_os_str().as_encoded_bytes()).ok();
        // SAFETY: access(2) with a valid NUL-terminated path.
        let writable = path.is_some_and(|p| unsafe { nix::libc::access(p.as_ptr(), nix::libc::W_OK) } == 0);
        !writable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: WatchdogMode, device: &Path) -> WatchdogConfig {
        WatchdogConfig {
            mode,
            device: device.to_path_buf(),
            safety_margin: 5,
            driver: "testing".into(),
        }
    }

    #[test]
    fn timeout_follows_ttl_and_margin() {
        assert_eq!(timeout_for(Duration::from_secs(30), 5), 25);
        assert_eq!(timeout_for(Duration::from_secs(30), -1), 15);
        assert_eq!(timeout_for(Duration::from_secs(20), 0), 20);
        assert_eq!(timeout_for(Duration::from_secs(3), 5), 1);
    }

    #[test]
    fn testing_driver_writes_patronis_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("watchdog");
        std::fs::write(&dev, "").unwrap();
        let w = Watchdog::new(config(WatchdogMode::Required, &dev));
        assert!(!w.failed(), "a writable device is healthy");
        assert!(w.activate(Duration::from_secs(30)));
        assert!(w.is_active());
        w.keepalive();
        // Same ttl: nothing new; another ttl: new timeout.
        assert!(w.activate(Duration::from_secs(30)));
        assert!(w.activate(Duration::from_secs(20)));
        w.disable();
        assert!(!w.is_active());
        w.keepalive(); // disarmed: nothing written
        let text = std::fs::read_to_string(&dev).unwrap();
        assert_eq!(text, "Ctimeout=25\n11Ctimeout=15\n1V");
    }

    #[test]
    fn required_refuses_without_a_device_automatic_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none");
        let required = Watchdog::new(config(WatchdogMode::Required, &missing));
        assert!(!required.activate(Duration::from_secs(30)));
        assert!(required.failed());
        let automatic = Watchdog::new(config(WatchdogMode::Automatic, &missing));
        assert!(automatic.activate(Duration::from_secs(30)));
        assert!(!automatic.is_active());
        assert!(!automatic.failed());
        let off = Watchdog::new(config(WatchdogMode::Off, &missing));
        assert!(off.activate(Duration::from_secs(30)));
        assert!(!off.failed());
    }

    #[test]
    fn a_fifo_without_a_reader_is_not_a_working_device() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let w = Watchdog::new(config(WatchdogMode::Required, &fifo));
        assert!(!w.activate(Duration::from_secs(30)), "nobody plays the hardware");
    }
}
