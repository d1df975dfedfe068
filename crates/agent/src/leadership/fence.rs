//! The fence: stops PostgreSQL when the leader lock's deadline passes without a newer one.
//!
//! Two of them hold the same deadline:
//!
//! * a thread of the agent ([`Fence`]), that waits on a `CLOCK_BOOTTIME` timer and an eventfd,
//!   holds a pidfd of the postmaster, and does nothing else: no async runtime, no SQL, no
//!   filesystem (the postmaster's pid comes from the HA loop's watcher);
//! * a separate process, `pgvigil fencer` ([`super::fencer`]), started by the agent in its own
//!   session. It gets every new deadline and postmaster over a pipe and enforces the last one
//!   it got even after the agent froze (SIGSTOP, a stall) or died: then nothing else would stop
//!   a primary whose lock another node may take.
//!
//! Both are level-triggered: while the deadline has passed and a postmaster is known, it is
//! stopped, again if a new one appears. Maintenance mode (pause) disarms both, as Patroni
//! leaves a paused primary alone. A restarted agent retires the fencers of its predecessors
//! once its own fence covers PostgreSQL or PostgreSQL is no longer a primary.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgvigil_lock::BootInstant;

use super::kill::stop_postmaster;
use super::sys::{BootTimer, EventFd, Pidfd, poll_readable};

/// What the fence enforces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FenceOrder {
    /// Stop PostgreSQL once this passes; `None`: nothing to enforce.
    pub deadline: Option<BootInstant>,
    /// The postmaster to stop.
    pub postmaster: Option<i32>,
    /// Maintenance mode: enforce nothing.
    pub paused: bool,
}

impl FenceOrder {
    fn armed(&self) -> Option<(BootInstant, i32)> {
        if self.paused {
            return None;
        }
        Some((self.deadline?, self.postmaster?))
    }
}

struct Inner {
    order: Mutex<FenceOrder>,
    external: Mutex<Option<FencerProcess>>,
    wake: EventFd,
    stop: AtomicBool,
    on_fenced: Box<dyn Fn() + Send + Sync>,
}

/// The agent's fence thread and its fencer process.
pub struct Fence {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    data_dir: PathBuf,
    /// Fencers left by earlier runs of the agent for this data directory.
    predecessors: Mutex<Vec<Pidfd>>,
}

impl Fence {
    /// Starts the fence thread and, with `external`, the fencer process. `on_fenced` runs on
    /// the fence thread after each stop (it wakes the HA loop).
    pub fn start(
        data_dir: &Path,
        external: bool,
        on_fenced: impl Fn() + Send + Sync + 'static,
    ) -> io::Result<Fence> {
        let predecessors = find_fencers(data_dir)
            .into_iter()
            .filter_map(|pid| Pidfd::open(pid).ok())
            .collect::<Vec<_>>();
        if !predecessors.is_empty() {
            let pids: Vec<i32> = predecessors.iter().map(Pidfd::pid).collect();
            tracing::warn!(
                ?pids,
                "fencers of an earlier agent are still enforcing its deadline"
            );
        }
        let inner = Arc::new(Inner {
            order: Mutex::new(FenceOrder::default()),
            external: Mutex::new(None),
            wake: EventFd::new()?,
            stop: AtomicBool::new(false),
            on_fenced: Box::new(on_fenced),
        });
        if external {
            match FencerProcess::spawn(data_dir) {
                Ok(p) => *lock(&inner.external) = Some(p),
                Err(e) => tracing::error!("could not start the fencer process: {e}"),
            }
        }
        let thread_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("pgvigil-fence".into())
            .spawn(move || run(&thread_inner))?;
        Ok(Fence {
            inner,
            thread: Mutex::new(Some(thread)),
            data_dir: data_dir.to_path_buf(),
            predecessors: Mutex::new(predecessors),
        })
    }

    /// Sets what to enforce, in both fences. Cheap when nothing changed.
    pub fn order(&self, order: FenceOrder) {
        let changed = {
            let mut current = lock(&self.inner.order);
            let changed = *current != order;
            *current = order;
            changed
        };
        if changed {
            self.inner.wake.wake();
        }
        let mut external = lock(&self.inner.external);
        if let Some(p) = external.as_mut()
            && let Err(e) = p.send(&order)
        {
            tracing::error!("the fencer process is gone ({e}); starting a new one");
            *external = FencerProcess::spawn(&self.data_dir)
                .inspect_err(|e| tracing::error!("could not start the fencer process: {e}"))
                .ok();
            if let Some(p) = external.as_mut() {
                let _ = p.send(&order);
            }
        }
    }

    /// Whether the fencer process runs (the fast-takeover promise relies on it).
    pub fn has_fencer_process(&self) -> bool {
        lock(&self.inner.external)
            .as_mut()
            .is_some_and(|p| p.child.try_wait().is_ok_and(|status| status.is_none()))
    }

    /// Stops the fencers of earlier agents: call once this agent's fence covers PostgreSQL or
    /// PostgreSQL is known not to be a primary.
    pub fn retire_predecessors(&self) {
        for old in lock(&self.predecessors).drain(..) {
            tracing::info!(pid = old.pid(), "retiring the fencer of an earlier agent");
            let _ = old.signal(libc::SIGTERM);
        }
    }

    /// Disarms both fences and ends the fencer process (clean shutdown of the agent).
    pub fn shutdown(&self) {
        self.order(FenceOrder::default());
        if let Some(mut p) = lock(&self.inner.external).take() {
            p.exit();
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.wake();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fence thread.
fn run(inner: &Inner) {
    let timer = match BootTimer::new() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("fence: cannot create a CLOCK_BOOTTIME timer ({e}); the in-process fence is off");
            return;
        }
    };
    let mut pidfd: Option<Pidfd> = None;
    while !inner.stop.load(Ordering::SeqCst) {
        let order = *lock(&inner.order);
        let wanted = order.postmaster;
        if pidfd.as_ref().map(Pidfd::pid) != wanted {
            pidfd = wanted.and_then(|pid| {
                Pidfd::open(pid)
                    .inspect_err(|e| tracing::debug!(pid, "fence: no pidfd for the postmaster: {e}"))
                    .ok()
            });
        }
        let armed = order
            .armed()
            .filter(|_| pidfd.as_ref().is_some_and(|p| !p.has_exited()));
        if let (Some((deadline, _)), Some(target)) = (armed, pidfd.as_ref())
            && BootInstant::now() >= deadline
        {
            tracing::error!(
                pid = target.pid(),
                "fence: the leader lock's deadline passed; stopping PostgreSQL now"
            );
            let gone = stop_postmaster(target, Duration::from_secs(2));
            (inner.on_fenced)();
            if !gone {
                let _ = poll_readable(&[inner.wake.raw()], Some(Duration::from_millis(50)));
                inner.wake.drain();
            }
            continue;
        }
        if let Err(e) = timer.set(armed.map(|(d, _)| d)) {
            tracing::error!("fence: cannot set the timer: {e}");
        }
        if let Err(e) = poll_readable(&[timer.raw(), inner.wake.raw()], None) {
            tracing::error!("fence: poll failed: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
        inner.wake.drain();
    }
}

/// The separate fencer process, as seen from the agent.
struct FencerProcess {
    child: Child,
    stdin: ChildStdin,
    last: Option<String>,
}

impl FencerProcess {
    fn spawn(data_dir: &Path) -> io::Result<FencerProcess> {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("fencer")
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: setsid is async-signal-safe and allocates nothing. Its own session keeps
        // the fencer out of signals sent to the agent's process group (a terminal's ^C).
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin pipe"))?;
        // A fencer that stops reading must never block the agent.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fd = stdin.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        tracing::info!(pid = child.id(), "started the fencer process");
        Ok(FencerProcess {
            child,
            stdin,
            last: None,
        })
    }

    fn send(&mut self, order: &FenceOrder) -> io::Result<()> {
        let line = match order.armed() {
            Some((deadline, pid)) => format!("arm {} {pid}\n", deadline.as_nanos()),
            None => "disarm\n".to_string(),
        };
        if self.last.as_deref() == Some(line.as_str()) {
            return Ok(());
        }
        match self.stdin.write_all(line.as_bytes()) {
            Ok(()) => {
                self.last = Some(line);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::warn!("the fencer process is not reading its orders");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn exit(&mut self) {
        let _ = self.stdin.write_all(b"disarm\nexit\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().is_ok_and(|s| s.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fencer processes for `data_dir` (their command line names it), from `/proc`.
fn find_fencers(data_dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let want = data_dir.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.get(1) == Some(&b"fencer".as_slice())
                && args.windows(2).any(|w| w[0] == b"--data-dir" && w[1] == want)
        })
        .collect()
}
