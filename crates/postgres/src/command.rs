//! Running the PostgreSQL tools (`initdb`, `pg_ctl`, `pg_basebackup`, `pg_rewind`,
//! `pg_controldata`) with a timeout, a clean environment and their output captured.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use crate::error::{PgError, tail};

/// How much of a tool's stderr goes into an error message.
const STDERR_TAIL: usize = 2000;
/// How much output we keep in memory per stream.
const MAX_CAPTURE: usize = 1 << 20;
/// How long we wait for the pipes to drain after the tool exited (a grandchild may hold them).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What a tool printed.
#[derive(Debug, Default)]
pub(crate) struct ToolOutput {
    pub stdout: String,
    pub stderr: String,
}

/// The environment handed to every process we start: ours without Patroni/pgvigil settings (they
/// may carry passwords), Kubernetes service variables and `NOTIFY_SOCKET` (postgres would talk to
/// systemd on our behalf); `PG_MALLOC_ARENA_MAX` becomes `MALLOC_ARENA_MAX`
/// (`docs/patroni-compat.md` §5.1).
pub(crate) fn child_env() -> Vec<(OsString, OsString)> {
    filter_env(std::env::vars_os())
}

pub(crate) fn filter_env(vars: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    let mut out = Vec::new();
    let mut arena = None;
    for (key, value) in vars {
        let Some(name) = key.to_str() else {
            out.push((key, value));
            continue;
        };
        if name.starts_with("PATRONI_")
            || name.starts_with("PGVIGIL_")
            || name.starts_with("KUBERNETES_")
            || name == "NOTIFY_SOCKET"
            || name == "MALLOC_ARENA_MAX"
        {
            continue;
        }
        if name == "PG_MALLOC_ARENA_MAX" {
            arena = Some(value);
            continue;
        }
        out.push((key, value));
    }
    // Our own MALLOC_ARENA_MAX is for the agent; postgres gets PG_MALLOC_ARENA_MAX if set.
    if let Some(value) = arena {
        out.push(("MALLOC_ARENA_MAX".into(), value));
    }
    out
}

/// `pg_ctl promote -D /data` style text for messages and logs.
pub(crate) fn display_command(program: &Path, args: &[OsString]) -> String {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.display().to_string());
    let mut text = name;
    for arg in args {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `program args` with the sanitized environment plus `extra_env`, stdin closed, stdout and
/// stderr captured, in its own process group. On timeout the whole group gets SIGKILL. A non-zero
/// exit is an error carrying the stderr tail.
pub(crate) async fn run_tool(
    program: &Path,
    args: &[OsString],
    extra_env: &[(&str, &OsStr)],
    timeout: Duration,
) -> Result<ToolOutput, PgError> {
    let shown = display_command(program, args);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(child_env())
        .envs(extra_env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    tracing::debug!(command = %shown, "running");
    let mut child = cmd.spawn().map_err(|source| PgError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    let pid = child.id().map(|p| p as i32);
    // If our future is dropped mid-way (the caller gave up), the whole group goes, not only the
    // direct child (`kill_on_drop`).
    let mut group = GroupGuard(pid);
    let stdout = capture(child.stdout.take());
    let stderr = capture(child.stderr.take());

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let status = match waited {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => {
            return Err(PgError::Spawn { cmd: shown, source });
        }
        Err(_) => {
            if let Some(pid) = pid {
                // The group id is the child's pid (process_group(0)); this also reaches helpers
                // such as pg_basebackup's WAL streamer or pg_rewind's single-user postgres.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            group.0 = None;
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let output = finish(stdout, stderr).await;
            tracing::warn!(command = %shown, ?timeout, "command timed out, killed");
            return Err(PgError::CommandTimeout {
                cmd: shown,
                timeout,
                stderr: tail(&output.stderr, STDERR_TAIL),
            });
        }
    };
    group.0 = None;
    let output = finish(stdout, stderr).await;
    if status.success() {
        tracing::debug!(command = %shown, stderr = %tail(&output.stderr, 500), "finished");
        Ok(output)
    } else {
        let detail = if output.stderr.trim().is_empty() {
            tail(&output.stdout, STDERR_TAIL)
        } else {
            tail(&output.stderr, STDERR_TAIL)
        };
        Err(PgError::CommandFailed {
            cmd: shown,
            status: status.to_string(),
            stderr: detail,
        })
    }
}

/// Kills a process group on drop unless disarmed.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

type Captured = (Arc<Mutex<Vec<u8>>>, Option<JoinHandle<()>>);

/// Reads a pipe into a shared buffer, so a partial output is available even if the reader has to
/// be abandoned (a grandchild keeping the pipe open).
fn capture<R: AsyncRead + Unpin + Send + 'static>(pipe: Option<R>) -> Captured {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let Some(mut pipe) = pipe else {
        return (buffer, None);
    };
    let sink = buffer.clone();
    let task = tokio::spawn(async move {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut buf = sink.lock().unwrap_or_else(|e| e.into_inner());
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_CAPTURE {
                        let excess = buf.len() - MAX_CAPTURE;
                        buf.drain(..excess);
                    }
                }
            }
        }
    });
    (buffer, Some(task))
}

async fn finish(stdout: Captured, stderr: Captured) -> ToolOutput {
    ToolOutput {
        stdout: drain(stdout).await,
        stderr: drain(stderr).await,
    }
}

async fn drain((buffer, task): Captured) -> String {
    if let Some(mut task) = task
        && tokio::time::timeout(DRAIN_GRACE, &mut task).await.is_err()
    {
        task.abort();
    }
    let bytes = buffer.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn environment_is_sanitized() {
        let env = filter_env(
            os(&[
                ("PATH", "/bin"),
                ("PATRONI_SCOPE", "x"),
                ("PATRONI_SUPERUSER_PASSWORD", "secret"),
                ("PGVIGIL_CONFIG", "y"),
                ("KUBERNETES_SERVICE_HOST", "k"),
                ("NOTIFY_SOCKET", "/run/systemd/notify"),
                ("PG_MALLOC_ARENA_MAX", "2"),
                ("MALLOC_ARENA_MAX", "8"),
                ("LANG", "C.UTF-8"),
            ])
            .into_iter(),
        );
        assert_eq!(
            env,
            os(&[("PATH", "/bin"), ("LANG", "C.UTF-8"), ("MALLOC_ARENA_MAX", "2")])
        );
    }

    #[tokio::test]
    async fn failing_command_reports_stderr_and_timeout_kills() {
        let sh = Path::new("/bin/sh");
        let out = run_tool(
            sh,
            &["-c".into(), "echo out; echo oops >&2; exit 3".into()],
            &[],
            Duration::from_secs(10),
        )
        .await;
        let err = out.unwrap_err().to_string();
        assert!(err.contains("sh -c") && err.contains("oops"), "{err}");

        let ok = run_tool(
            sh,
            &["-c".into(), "echo \"$FOO\"".into()],
            &[("FOO", OsStr::new("bar"))],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(ok.stdout.trim(), "bar");

        let start = std::time::Instant::now();
        let err = run_tool(
            sh,
            &["-c".into(), "echo started >&2; sleep 30 & wait".into()],
            &[],
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        assert!(matches!(err, PgError::CommandTimeout { .. }), "{err}");
        assert!(err.to_string().contains("started"), "{err}");
    }
}
