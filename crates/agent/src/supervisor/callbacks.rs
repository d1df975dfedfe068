//! User scripts around PostgreSQL (`docs/patroni-compat.md` §5.9): the callbacks, which run in
//! the background on their own thread, and `pre_promote`/`before_stop`, which the supervisor's
//! task waits for, bounded. Nothing here runs on the HA loop: a slow or hanging script delays
//! neither the cycle nor the leader lock (its renewals run on `Leadership`'s own thread).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use pgvigil_api::Role;
use pgvigil_postgres::StopMode;

use super::PgSupervisor;

/// The events Patroni passes to a callback as its first argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Start,
    Stop,
    Restart,
    Reload,
    RoleChange,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Start => "on_start",
            Event::Stop => "on_stop",
            Event::Restart => "on_restart",
            Event::Reload => "on_reload",
            Event::RoleChange => "on_role_change",
        }
    }
}

/// The arguments Patroni appends to a callback command: `<event> <role> <scope>`, with the
/// role `primary` also right after a promotion (Patroni 4 no longer passes `master`).
pub fn arguments(command: &[String], event: Event, role: Role, scope: &str) -> Vec<String> {
    let role = if role == Role::Promoted {
        Role::Primary
    } else {
        role
    };
    let mut argv = command.to_vec();
    argv.extend([
        event.name().to_string(),
        role.as_str().to_string(),
        scope.to_string(),
    ]);
    argv
}

enum Job {
    Run {
        argv: Vec<String>,
        reload: bool,
    },
    /// Answer once every earlier job has been started.
    Flush(Sender<()>),
}

/// Runs callbacks on a dedicated thread, one at a time as Patroni does: a new callback kills
/// the one still running (its whole process group), except that `on_reload` has a slot of its
/// own and only replaces an earlier `on_reload`. Handing one over never blocks.
#[derive(Clone)]
pub struct CallbackExecutor {
    jobs: Sender<Job>,
}

impl CallbackExecutor {
    pub fn start() -> CallbackExecutor {
        let (jobs, rx) = channel();
        let spawned = std::thread::Builder::new()
            .name("callbacks".into())
            .spawn(move || run(rx));
        if let Err(e) = spawned {
            // Without the thread the sender fails and every callback is logged as not run.
            tracing::error!("could not start the callback thread: {e}");
        }
        CallbackExecutor { jobs }
    }

    /// Runs `argv` in the background, replacing the callback still running in its slot.
    pub fn call(&self, argv: Vec<String>, event: Event) {
        tracing::info!("calling callback: {}", argv.join(" "));
        let job = Job::Run {
            argv,
            reload: event == Event::Reload,
        };
        if self.jobs.send(job).is_err() {
            tracing::error!("the callback thread is gone; {} not run", event.name());
        }
    }

    /// Waits (at most `limit`) until every callback handed over so far has been started: the
    /// agent calls this before it exits, so the `on_stop` of its shutdown is not lost with the
    /// thread. The scripts themselves run on in their own process groups.
    pub fn flush(&self, limit: Duration) {
        let (done, wait) = channel();
        if self.jobs.send(Job::Flush(done)).is_ok() && wait.recv_timeout(limit).is_err() {
            tracing::warn!("callbacks not all started within {} s", limit.as_secs());
        }
    }
}

fn run(rx: Receiver<Job>) {
    let mut main: Option<Child> = None;
    let mut reload: Option<Child> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(Job::Run {
                argv,
                reload: is_reload,
            }) => {
                let slot = if is_reload { &mut reload } else { &mut main };
                if let Some(running) = slot.take() {
                    kill_group(running);
                }
                *slot = spawn(&argv);
            }
            Ok(Job::Flush(done)) => {
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Reap finished callbacks so none lingers as a zombie.
        for slot in [&mut main, &mut reload] {
            if let Some(child) = slot
                && let Ok(Some(status)) = child.try_wait()
            {
                if !status.success() {
                    tracing::warn!("callback exited with {status}");
                }
                *slot = None;
            }
        }
    }
}

/// Starts a script in a process group of its own (so it and its children can be killed
/// together), with the agent's environment and working directory.
fn command(argv: &[String]) -> Option<Command> {
    let (program, args) = argv.split_first()?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).process_group(0);
    Some(cmd)
}

fn spawn(argv: &[String]) -> Option<Child> {
    let mut cmd = command(argv)?;
    match cmd.spawn() {
        Ok(child) => Some(child),
        Err(e) => {
            tracing::error!("callback {} could not be started: {e}", argv.join(" "));
            None
        }
    }
}

/// Kills a still-running script with everything it started, then reaps it. If it cannot be
/// killed (another user's process under `sudo`), this waits for it, as Patroni does.
fn kill_group(mut child: Child) {
    if matches!(child.try_wait(), Ok(None)) {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group the child leads.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        tracing::info!("killed the callback still running");
    }
    let _ = child.wait();
}

/// Runs `pre_promote` or `before_stop` and waits for it at most `limit`; past that the script
/// and its process group are killed and the run counts as failed.
pub async fn run_script(what: &str, argv: &[String], limit: Duration) -> Result<ExitStatus, String> {
    let Some(cmd) = command(argv) else {
        return Err(format!("{what}: empty command"));
    };
    let shown = argv.join(" ");
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what} script `{shown}` could not be started: {e}"))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => {
            tracing::info!("{what} script `{shown}` exited with {status}");
            Ok(status)
        }
        Ok(Err(e)) => Err(format!("{what} script `{shown}`: {e}")),
        Err(_) => {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: as in `kill_group`.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = child.wait().await;
            Err(format!(
                "{what} script `{shown}` did not finish within {} s; killed",
                limit.as_secs()
            ))
        }
    }
}

/// How long `pre_promote` and `before_stop` may run. Patroni waits for them without a limit;
/// a hung fencing script would then hold the leader lock with nobody promoting, forever. `ttl`
/// is as long as the cluster waits for a dead leader anyway.
fn script_limit(ttl_secs: u64) -> Duration {
    Duration::from_secs(ttl_secs.max(1))
}

impl PgSupervisor {
    /// Hands the configured callback for `event` to the executor, as `<command> <event> <role>
    /// <scope>`. Never during a bootstrap (the caller does not call it then), as in Patroni.
    pub(super) fn callback(&mut self, event: Event, role: Role) {
        if event != Event::Reload {
            self.cb_called = true;
        }
        let Some(command) = self.cfg.postgresql.callbacks.get(event.name()) else {
            return;
        };
        let argv = arguments(command, event, role, &self.cfg.scope);
        self.callbacks.call(argv, event);
    }

    /// Runs `pre_promote`, bounded by `ttl`: `true` when it is not configured or exited 0.
    pub(super) async fn pre_promote_allows(&self) -> bool {
        let Some(argv) = self.cfg.postgresql.pre_promote.clone() else {
            return true;
        };
        match run_script("pre_promote", &argv, script_limit(self.dynamic.ttl)).await {
            Ok(status) => status.success(),
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }

    /// Stops PostgreSQL as every planned stop does: `before_stop` first (its exit code does not
    /// matter, its time is bounded by `ttl`), then the stop, then `on_stop` with `role` when
    /// given (a restart runs `on_restart` instead). Stops of a primary that must not run as
    /// one (demotions, a lapsed start) call `pg.stop` directly: no user script may delay them.
    pub(super) async fn stop_postgres(
        &mut self,
        mode: StopMode,
        timeout: Duration,
        on_stop: Option<Role>,
    ) -> Result<(), pgvigil_postgres::PgError> {
        if !self.pg.is_running() {
            return Ok(());
        }
        if let Some(argv) = self.cfg.postgresql.before_stop.clone()
            && let Err(e) = run_script("before_stop", &argv, script_limit(self.dynamic.ttl)).await
        {
            tracing::error!("{e}");
        }
        self.pg.stop(mode, timeout).await?;
        if let Some(role) = on_stop {
            self.callback(Event::Stop, role);
        }
        Ok(())
    }

    /// Patroni calls `on_start` once when it finds PostgreSQL already running at its start (no
    /// callback ran yet): the scripts learn the role of a node they did not see start.
    pub(super) fn callback_for_running(&mut self) {
        if self.cb_called {
            return;
        }
        if let Some(st) = &self.status {
            let role = if st.in_recovery {
                Role::Replica
            } else {
                Role::Primary
            };
            self.callback(Event::Start, role);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_event_role_scope_with_promoted_shown_as_primary() {
        let cmd = vec!["/bin/cb".to_string(), "x y".to_string()];
        assert_eq!(
            arguments(&cmd, Event::RoleChange, Role::Promoted, "demo"),
            ["/bin/cb", "x y", "on_role_change", "primary", "demo"]
        );
        assert_eq!(
            arguments(&cmd, Event::Stop, Role::Demoted, "demo")[2..],
            ["on_stop", "demoted", "demo"]
        );
    }

    #[test]
    fn a_new_callback_kills_the_running_one_but_on_reload_has_its_own_slot() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = |word: &str, sleep: u32| {
            vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                format!("sleep {sleep}; echo {word} >> {}", out.display()),
            ]
        };
        let exec = CallbackExecutor::start();
        exec.call(script("slow", 3), Event::Start);
        exec.call(script("reload", 1), Event::Reload);
        exec.call(script("fast", 1), Event::Stop);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let read = || std::fs::read_to_string(&out).unwrap_or_default();
        while read().lines().count() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Long enough for the killed one to have written, had it survived.
        std::thread::sleep(Duration::from_secs(3));
        let mut lines: Vec<String> = read().lines().map(str::to_string).collect();
        lines.sort();
        assert_eq!(lines, ["fast", "reload"]);
    }

    #[tokio::test]
    async fn a_synchronous_script_is_killed_at_its_limit() {
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), "sleep 30".to_string()];
        let started = std::time::Instant::now();
        let e = run_script("pre_promote", &argv, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.contains("did not finish within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let ok = ["/bin/sh", "-c", "exit 3"].map(String::from);
        let status = run_script("pre_promote", &ok, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(status.code(), Some(3));
    }
}
