//! Watchdog hardware for tests: reads Patroni's `testing` watchdog protocol from a FIFO
//! (`Ctimeout=N\n` sets the timeout, `1` is a keep-alive, `V` a magic close) and, like a real
//! device, "resets the machine" when the keep-alives stop for longer than the timeout without a
//! magic close: it calls the given action (a [`crate::netcluster::NetCluster`] kills every
//! process of the host's network namespace).
//!
//! The FIFO stays open for reading for the hardware's whole life, so the agent can open it for
//! writing (non-blocking) at any time; when the agent closes it without `V` (it crashed), the
//! device stays armed and fires, as a real one would.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, open};
use nix::libc;
use nix::sys::stat::Mode;

#[derive(Clone, Debug)]
pub struct WatchdogState {
    /// Armed by a timeout setting or a keep-alive, disarmed by a magic close or by firing.
    pub armed: bool,
    pub timeout: Duration,
    pub last_ping: Instant,
    pub pings: u64,
    /// When the device fired ("reset the machine"), every time.
    pub fired: Vec<Instant>,
}

/// A running emulated watchdog device; stops (without firing) on drop.
pub struct WatchdogHardware {
    state: Arc<Mutex<WatchdogState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WatchdogHardware {
    /// Plays the hardware behind the FIFO at `fifo` (which must exist); `reset` runs (on the
    /// hardware's thread) each time the device fires.
    pub fn start(fifo: &Path, reset: impl Fn() + Send + 'static) -> io::Result<WatchdogHardware> {
        let fd: OwnedFd = open(
            fifo,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let state = Arc::new(Mutex::new(WatchdogState {
            armed: false,
            timeout: Duration::from_secs(60),
            last_ping: Instant::now(),
            pings: 0,
            fired: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("watchdog-hardware".into())
                .spawn(move || run(fd, &state, &stop, reset))?
        };
        Ok(WatchdogHardware {
            state,
            stop,
            thread: Some(thread),
        })
    }

    pub fn state(&self) -> WatchdogState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for WatchdogHardware {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(fd: OwnedFd, state: &Mutex<WatchdogState>, stop: &AtomicBool, reset: impl Fn()) {
    let mut buf = [0u8; 256];
    let mut command: Option<Vec<u8>> = None;
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, and read into a buffer we own.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        let n = if ready > 0 {
            unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
        } else {
            -1
        };
        if n == 0 {
            // No writer at the moment (POLLHUP): nothing to read until the agent opens it.
            std::thread::sleep(Duration::from_millis(50));
        }
        let now = Instant::now();
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        for &b in buf.iter().take(n.max(0) as usize) {
            if let Some(cmd) = command.as_mut() {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(cmd).into_owned();
                    if let Some(t) = text.strip_prefix("timeout=").and_then(|t| t.trim().parse().ok()) {
                        s.timeout = Duration::from_secs(t);
                        s.armed = true;
                        s.last_ping = now;
                    }
                    command = None;
                } else {
                    cmd.push(b);
                }
                continue;
            }
            match b {
                b'C' => command = Some(Vec::new()),
                b'1' => {
                    s.armed = true;
                    s.last_ping = now;
                    s.pings += 1;
                }
                b'V' => s.armed = false,
                _ => {}
            }
        }
        if s.armed && now.duration_since(s.last_ping) > s.timeout {
            s.armed = false;
            s.fired.push(now);
            drop(s);
            reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    #[test]
    fn fires_when_pings_stop_and_not_after_a_magic_close() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("wd");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let resets = Arc::new(Mutex::new(0));
        let hw = {
            let resets = resets.clone();
            WatchdogHardware::start(&fifo, move || *resets.lock().unwrap() += 1).unwrap()
        };
        let open_dev = || {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .unwrap()
        };
        // Armed, pinged, then closed properly: never fires.
        let mut dev = open_dev();
        dev.write_all(b"Ctimeout=1\n1").unwrap();
        crate::wait_until("armed", Duration::from_secs(5), || hw.state().armed.then_some(())).unwrap();
        dev.write_all(b"V").unwrap();
        drop(dev);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(hw.state().fired.is_empty());
        // Armed and then silent (even closed without V): fires once.
        let mut dev = open_dev();
        dev.write_all(b"Ctimeout=1\n1").unwrap();
        drop(dev);
        crate::wait_until("the watchdog to fire", Duration::from_secs(10), || {
            (*resets.lock().unwrap() == 1).then_some(())
        })
        .unwrap();
        let s = hw.state();
        assert_eq!(
            (s.fired.len(), s.armed, s.timeout),
            (1, false, Duration::from_secs(1))
        );
    }
}
