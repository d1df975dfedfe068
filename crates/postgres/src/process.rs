//! The postmaster as a process (`docs/patroni-compat.md` §5.1): detection through `postmaster.pid`,
//! start (detached, so it survives the agent), stop with escalation, signals, promotion.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::{child_env, display_command, run_tool};
use crate::{PgError, Postgres};

/// How long we wait after escalating a stop (SIGQUIT, then SIGKILL).
const ESCALATION_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// Shutdown modes and their signals: smart = SIGTERM, fast = SIGINT, immediate = SIGQUIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopMode {
    Smart,
    Fast,
    Immediate,
}

impl StopMode {
    pub fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// The interesting lines of `postmaster.pid`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PidFile {
    pub pid: i32,
    /// Line 8: `starting`, `stopping`, `ready` or `standby` (trimmed).
    pub status: Option<String>,
}

pub(crate) fn parse_pid_file(text: &str) -> Option<PidFile> {
    let mut lines = text.lines();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let status = text.lines().nth(7).map(|s| s.trim().to_string());
    Some(PidFile { pid, status })
}

fn read_pid_file(data_dir: &Path) -> Option<PidFile> {
    parse_pid_file(&std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?)
}

/// `/proc/<pid>/stat` fields after the command name: state, ppid.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The process exists and is not a zombie (our postmasters are not our children, and the init
/// of a container may not reap them).
pub(crate) fn pid_alive(pid: i32) -> bool {
    match proc_stat(pid) {
        Some((state, _)) => !matches!(state, 'Z' | 'X' | 'x'),
        None => false,
    }
}

fn is_postgres_name(path: &str) -> bool {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name == "postgres" || name == "postmaster"
}

/// `pid` runs the postgres binary (by `/proc/<pid>/exe`, or its argv[0] when that link is not
/// readable) and, when `/proc/<pid>/cwd` is readable, works in `data_dir` (the postmaster
/// changes into its data directory).
fn is_postgres_for(pid: i32, data_dir: &Path) -> bool {
    let exe_ok = match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(exe) => is_postgres_name(&exe.to_string_lossy()),
        Err(_) => std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .and_then(|c| {
                c.split(|b| *b == 0)
                    .next()
                    .map(|a| is_postgres_name(&String::from_utf8_lossy(a)))
            })
            .unwrap_or(false),
    };
    if !exe_ok {
        return false;
    }
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => {
            let want = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
            cwd == want
        }
        Err(_) => true,
    }
}

/// Live postgres processes working in `data_dir` whose postmaster is gone: backends and
/// auxiliary processes of a postmaster that was SIGKILLed. They still hold the shared memory
/// segment, and a new postmaster refuses to start until they have exited.
fn orphans_of(data_dir: &Path) -> Vec<i32> {
    let want = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid_alive(pid))
        .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == want))
        .filter(|&pid| is_postgres_for(pid, data_dir))
        .collect()
}

/// Waits (bounded) for the orphans of a killed postmaster to exit; they notice the postmaster's
/// death within milliseconds. Stragglers are SIGKILLed: their postmaster is gone, so they can
/// serve nothing, and they block the restart.
async fn reap_orphans(data_dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let orphans = orphans_of(data_dir);
        if orphans.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                ?orphans,
                "processes of a dead postmaster did not exit; killing them"
            );
            for pid in orphans {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// All descendants of `pid` (from `/proc`), children before grandchildren.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
                && let Some((_, ppid)) = proc_stat(p)
            {
                parents.push((p, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (child, _) in parents.iter().filter(|(_, pp)| *pp == parent) {
            if !out.contains(child) {
                out.push(*child);
                frontier.push(*child);
            }
        }
    }
    out
}

fn send(pid: i32, signal: Signal) -> Result<bool, PgError> {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(source) => Err(PgError::Signal {
            signal: signal.as_str(),
            pid,
            source,
        }),
    }
}

async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pid_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Starts `program` so that it is not our child: an intermediate process calls `setsid`, forks
/// the real process and exits at once; the grandchild's pid comes back through a pipe.
/// stdin is /dev/null, stdout and stderr are ours.
#[cfg(test)]
fn spawn_detached(program: &Path, args: &[OsString], env: Vec<(OsString, OsString)>) -> std::io::Result<i32> {
    let (pid, gate) = spawn_gated(program, args, env)?;
    gate.release()?;
    Ok(pid)
}

/// Holds a process started by [`spawn_gated`] before it runs its program: [`Gate::release`]
/// lets it go on; dropping the gate unreleased (the agent died) makes it exit instead.
struct Gate(std::fs::File);

impl Gate {
    fn release(self) -> std::io::Result<()> {
        use std::io::Write;
        let mut go = self.0;
        go.write_all(b"go\n")
    }
}

/// The shell script between the fork and `program`: wait for the gate, then become `program`
/// (same pid) without the gate's descriptor. `pg_ctl` starts postgres through `/bin/sh` too.
const GATE_SCRIPT: &str = "read -r go <&3 && exec \"$0\" \"$@\" 3<&-";

/// Starts `program` detached, as `spawn_detached` describes, but the new process (already with
/// its final pid) waits on a pipe, as `/bin/sh`, until the gate is released, and only then
/// execs `program`.
fn spawn_gated(
    program: &Path,
    args: &[OsString],
    env: Vec<(OsString, OsString)>,
) -> std::io::Result<(i32, Gate)> {
    use std::os::unix::process::CommandExt;
    // std's spawn reports exec errors of the process it forks, which here is the shell:
    // check the program itself first.
    if !std::fs::metadata(program)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a file", program.display()),
        ));
    }
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (go_read, go_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let raw_write = write_end.as_raw_fd();
    let raw_go = go_read.as_raw_fd();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(GATE_SCRIPT)
        .arg(program)
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (setsid, fork, write, dup2, fcntl, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                // The grandchild goes on to exec the shell with the gate's read end as fd 3,
                // kept across exec; everything else of ours closes on exec (O_CLOEXEC).
                0 => {
                    let kept = if raw_go == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0) == 0
                    } else {
                        libc::dup2(raw_go, 3) == 3
                    };
                    if !kept {
                        libc::_exit(1);
                    }
                    Ok(())
                }
                pid => {
                    let bytes = pid.to_ne_bytes();
                    libc::write(raw_write, bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(0)
                }
            }
        });
    }
    let mut intermediate = cmd.spawn()?;
    drop(write_end);
    drop(go_read);
    let status = intermediate.wait()?;
    let mut bytes = [0u8; 4];
    std::fs::File::from(read_end).read_exact(&mut bytes)?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "intermediate process exited with {status}"
        )));
    }
    Ok((i32::from_ne_bytes(bytes), Gate(std::fs::File::from(go_write))))
}

impl Postgres {
    /// The postmaster's pid from `postmaster.pid`, if that process is alive and is a postgres
    /// working in our data directory. Synchronous and cheap: two or three `/proc` reads.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let pf = read_pid_file(&self.settings.data_dir)?;
        (pid_alive(pf.pid) && is_postgres_for(pf.pid, &self.settings.data_dir)).then_some(pf.pid)
    }

    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// The self-fencing path: immediate shutdown (SIGQUIT) of the postmaster, which makes every
    /// backend exit at once and refuses new connections. No await, no SQL, callable from any
    /// thread. Returns whether a postmaster was signalled.
    pub fn kill_immediately(&self) -> Result<bool, PgError> {
        match self.postmaster_pid() {
            Some(pid) => {
                let sent = send(pid, Signal::SIGQUIT)?;
                if sent {
                    tracing::warn!(pid, "sent SIGQUIT to the postmaster (immediate shutdown)");
                }
                Ok(sent)
            }
            None => Ok(false),
        }
    }

    /// Reloads the configuration (SIGHUP to the postmaster, what `pg_ctl reload` does).
    pub async fn reload(&self) -> Result<(), PgError> {
        let pid = self
            .postmaster_pid()
            .ok_or_else(|| PgError::NotRunning(self.settings.data_dir.clone()))?;
        if send(pid, Signal::SIGHUP)? {
            Ok(())
        } else {
            Err(PgError::NotRunning(self.settings.data_dir.clone()))
        }
    }

    /// The argv of the postmaster: `-D <data> --config-file=<conf> --<guc>=<value>...`.
    pub fn postmaster_args(&self) -> Vec<OsString> {
        let s = &self.settings;
        let mut args: Vec<OsString> = vec!["-D".into(), s.data_dir.clone().into_os_string()];
        let mut conf = OsString::from("--config-file=");
        conf.push(s.config_dir.join("postgresql.conf"));
        args.push(conf);
        for (name, value) in self.command_line_gucs() {
            args.push(format!("--{name}={value}").into());
        }
        args
    }

    /// Starts the postmaster detached from the agent (it survives an agent restart and is
    /// re-adopted through `postmaster.pid`), then waits until `postmaster.pid` says it accepts
    /// connections. Ok at once if already running. A postmaster that exits meanwhile gives
    /// [`PgError::StartFailed`]; one still starting at the deadline gives
    /// [`PgError::StartTimeout`] and is left running. Call [`Postgres::write_config`] first.
    pub async fn start(&self, timeout: Duration) -> Result<(), PgError> {
        self.start_announced(timeout, |_| true).await
    }

    /// [`Postgres::start`], telling `announce` the postmaster's pid before postgres runs: the
    /// new process waits until `announce` has returned, runs postgres only if it returned
    /// true (else the start fails with [`PgError::StartFailed`]), and exits without running
    /// it if the agent dies first. A primary's fences must know its postmaster before it can
    /// accept a write, or an agent frozen or killed during the start leaves a primary nothing
    /// stops (found by the simulation, `docs/simulation.md`).
    pub async fn start_announced(
        &self,
        timeout: Duration,
        announce: impl FnOnce(i32) -> bool,
    ) -> Result<(), PgError> {
        if let Some(pid) = self.postmaster_pid() {
            tracing::info!(pid, "postgres is already running");
            return Ok(());
        }
        let s = &self.settings;
        reap_orphans(&s.data_dir).await;
        let mut env = child_env();
        // A stale postmaster.pid naming a process that still exists would make postgres refuse
        // to start (its check is kill(pid, 0)): a live non-postgres process that reused the
        // pid, or the killed postmaster itself as a zombie nobody reaped yet (PID 1 of a
        // container often does not). PG_GRANDPARENT_PID tells postgres to ignore that pid.
        if let Some(stale) = read_pid_file(&s.data_dir)
            && proc_stat(stale.pid).is_some()
        {
            env.push(("PG_GRANDPARENT_PID".into(), stale.pid.to_string().into()));
        }
        let program: PathBuf = self.bin("postgres");
        let args = self.postmaster_args();
        let shown = display_command(&program, &args);
        tracing::info!(command = %shown, "starting postgres");
        let (pid, gate) = {
            let program = program.clone();
            tokio::task::spawn_blocking(move || spawn_gated(&program, &args, env))
                .await
                .map_err(|e| PgError::StartFailed(format!("launcher task failed: {e}")))?
                .map_err(|source| PgError::Spawn {
                    cmd: shown.clone(),
                    source,
                })?
        };
        if !announce(pid) {
            drop(gate);
            return Err(PgError::StartFailed(format!(
                "the start of postgres (pid {pid}) was withdrawn before it ran"
            )));
        }
        gate.release().map_err(|source| PgError::Spawn {
            cmd: shown.clone(),
            source,
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            if !pid_alive(pid) {
                return Err(PgError::StartFailed(format!(
                    "postgres (pid {pid}) exited during startup; see its log (command: {shown})"
                )));
            }
            if let Some(pf) = read_pid_file(&s.data_dir)
                && pf.pid == pid
                && matches!(pf.status.as_deref(), Some("ready") | Some("standby"))
            {
                tracing::info!(pid, "postgres accepts connections");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PgError::StartTimeout { pid, timeout });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the postmaster with `mode` and waits (bounded by `timeout`) until it is gone. On
    /// timeout escalates to immediate shutdown, then SIGKILL of the postmaster and all its
    /// descendants (frozen first so none can respawn), each waited for up to 10 s. Ok if not
    /// running.
    pub async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), PgError> {
        // Our own session would hold a smart shutdown forever. Never wait for the lock: a
        // long statement holding it fails anyway when the server goes down.
        if let Ok(mut conn) = self.conn.try_lock() {
            *conn = None;
        }
        let Some(pid) = self.postmaster_pid() else {
            return Ok(());
        };
        tracing::info!(pid, mode = mode.as_str(), "stopping postgres");
        if !send(pid, mode.signal())? || wait_gone(pid, timeout).await {
            return Ok(());
        }
        if mode != StopMode::Immediate {
            tracing::warn!(pid, ?timeout, "postgres did not stop in time, immediate shutdown");
            if !send(pid, Signal::SIGQUIT)? || wait_gone(pid, ESCALATION_WAIT).await {
                return Ok(());
            }
        }
        tracing::warn!(pid, "postgres ignores immediate shutdown, killing it");
        let _ = send(pid, Signal::SIGSTOP);
        let tree = descendants(pid);
        for child in &tree {
            let _ = send(*child, Signal::SIGSTOP);
        }
        let _ = send(pid, Signal::SIGKILL);
        for child in &tree {
            let _ = send(*child, Signal::SIGKILL);
        }
        if wait_gone(pid, ESCALATION_WAIT).await {
            Ok(())
        } else {
            Err(PgError::StopFailed {
                pid,
                detail: "still alive after SIGKILL".into(),
            })
        }
    }

    /// Promotes a standby: `pg_ctl promote -W`, then waits (bounded) until
    /// `pg_is_in_recovery()` is false.
    pub async fn promote(&self, timeout: Duration) -> Result<(), PgError> {
        let deadline = Instant::now() + timeout;
        let args: Vec<OsString> = vec![
            "promote".into(),
            "-W".into(),
            "-D".into(),
            self.settings.data_dir.clone().into_os_string(),
        ];
        run_tool(&self.bin("pg_ctl"), &args, &[], timeout).await?;
        let mut woken_at = Instant::now();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PgError::Timeout {
                    op: "waiting for the end of recovery after promote".into(),
                    timeout,
                });
            }
            match self.promotion_progress(left.min(Duration::from_secs(5))).await {
                Ok((false, _)) => return Ok(()),
                Ok((true, wait)) => {
                    if wait.as_deref() == Some(RETRY_SLEEP) && woken_at.elapsed() >= WAKE_EVERY {
                        // See RETRY_SLEEP: end the sleep, the promotion follows at once.
                        tracing::info!(
                            "the promotion waits for wal_retrieve_retry_interval; waking the startup process"
                        );
                        if let Err(e) = self.reload().await {
                            tracing::debug!(error = %e, "could not wake the startup process");
                        }
                        woken_at = Instant::now();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "waiting for promotion"),
            }
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
    }
}

/// The startup process's wait between two attempts to fetch WAL. A promote request that arrives
/// while the startup process waits for a walreceiver which then fails (just after a reload woke
/// it, as the one that sets `synchronous_standby_names` before a promotion does, or while it
/// reconnects to an upstream that is gone) is acted on only after this sleep:
/// `wal_retrieve_retry_interval`, 5 s by default, of a switchover's write pause. Any latch
/// wake-up ends the sleep, and the startup process checks the promote request right after it;
/// a reload is one, harmless here (the files on disk are the ones meant to run).
const RETRY_SLEEP: &str = "RecoveryRetrieveRetryInterval";
/// How often such a wake-up may be sent while the promotion has not finished.
const WAKE_EVERY: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_parsing() {
        let text = "4242\n/data\n1700000000\n5432\n/tmp\n*\n  5432001  1\nready   \n";
        assert_eq!(
            parse_pid_file(text),
            Some(PidFile {
                pid: 4242,
                status: Some("ready".into())
            })
        );
        assert_eq!(parse_pid_file("12\n/data\n").unwrap().status, None);
        assert_eq!(parse_pid_file("junk\n"), None);
        assert_eq!(parse_pid_file("-1\n"), None);
    }

    #[test]
    fn process_checks() {
        let me = std::process::id() as i32;
        assert!(pid_alive(me));
        assert!(!pid_alive(i32::MAX));
        // The test binary is not postgres.
        assert!(!is_postgres_for(me, Path::new("/")));
        assert!(is_postgres_name("/usr/lib/postgresql/15/bin/postgres (deleted)"));
        assert!(!is_postgres_name("/usr/bin/postgres-exporter"));
    }

    #[test]
    fn detached_spawn_is_not_our_child() {
        let pid = spawn_detached(Path::new("/bin/sleep"), &["5".into()], child_env()).unwrap();
        assert!(pid_alive(pid));
        let (_, ppid) = proc_stat(pid).unwrap();
        assert_ne!(ppid, std::process::id() as i32);
        assert!(descendants(std::process::id() as i32).iter().all(|p| *p != pid));
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        assert!(!pid_alive(pid));
        assert!(spawn_detached(Path::new("/nonexistent/binary"), &[], child_env()).is_err());
    }

    /// The pid is known before the program runs (the fences of a primary are told first), and
    /// a gate dropped unreleased (the agent died) means the program never runs.
    #[test]
    fn a_gated_spawn_runs_its_program_only_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |name: &str| {
            let file = dir.path().join(name);
            let (pid, gate) =
                spawn_gated(Path::new("/usr/bin/touch"), &[file.clone().into()], child_env()).unwrap();
            (pid, gate, file)
        };
        let wait = |what: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !what() && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            what()
        };
        let (pid, gate, file) = touch("released");
        assert!(pid_alive(pid), "waiting at the gate");
        assert!(!file.exists(), "nothing ran before the release");
        gate.release().unwrap();
        assert!(wait(&|| file.exists()), "the program ran");
        assert!(wait(&|| !pid_alive(pid)));

        let (pid, gate, file) = touch("dropped");
        drop(gate);
        assert!(wait(&|| !pid_alive(pid)), "exits when the gate closes");
        assert!(!file.exists(), "the program never ran");
    }
}
