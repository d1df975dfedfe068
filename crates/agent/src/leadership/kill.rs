//! Stopping a postmaster and every process it started, as fast as the kernel allows: the one
//! thing a fence does. Shared by the agent's fence thread and the separate fencer process.
//!
//! First an immediate shutdown (SIGQUIT): the postmaster sends SIGQUIT to every backend, which
//! exits at once without finishing its transaction, and no new connection is accepted. That
//! takes milliseconds. If the postmaster is still there shortly after (it was stopped with
//! SIGSTOP, or is stuck), it is frozen (SIGSTOP, so it forks nothing more), its children are
//! SIGKILLed, then it is. Children are found through `/proc` (procfs is memory, not disk); the
//! postmaster itself only through its pidfd, so the kill can never reach a process that
//! reused its pid.

use std::time::{Duration, Instant};

use super::sys::Pidfd;

/// How long an immediate shutdown gets before the kill.
const QUIT_GRACE: Duration = Duration::from_millis(200);

/// Stops the postmaster of `pidfd` and its children; retries the kill until it is gone or
/// `budget` is spent. Returns whether it is gone.
pub fn stop_postmaster(pidfd: &Pidfd, budget: Duration) -> bool {
    let start = Instant::now();
    match pidfd.signal(libc::SIGQUIT) {
        Ok(false) => return true,
        Ok(true) => {}
        Err(e) => tracing::error!(pid = pidfd.pid(), "fence: SIGQUIT failed: {e}"),
    }
    if pidfd.wait_exited(QUIT_GRACE) {
        return true;
    }
    loop {
        tracing::warn!(
            pid = pidfd.pid(),
            "fence: the postmaster ignores SIGQUIT; killing it and its children"
        );
        let _ = pidfd.signal(libc::SIGSTOP);
        for child in children(pidfd.pid()) {
            // SAFETY: kill(2) with a pid read from /proc just now; a child of a stopped
            // postmaster cannot be reaped and reused meanwhile.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
        let _ = pidfd.signal(libc::SIGKILL);
        if pidfd.wait_exited(Duration::from_millis(100)) {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
    }
}

/// The direct children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_ignoring_sigquit_and_its_child_are_killed() {
        // A "postmaster" that ignores SIGQUIT and has a child.
        let mut parent = std::process::Command::new("sh")
            .arg("-c")
            .arg("trap '' QUIT; sleep 60 & wait")
            .spawn()
            .unwrap();
        let pid = parent.id() as i32;
        let child = wait_for_child(pid);
        let pidfd = Pidfd::open(pid).unwrap();
        assert!(stop_postmaster(&pidfd, Duration::from_secs(10)));
        parent.wait().unwrap();
        let gone = pgvigil_testkit::wait_until("the child to die", Duration::from_secs(10), || {
            match std::fs::read_to_string(format!("/proc/{child}/stat")) {
                Err(_) => Some(()),
                Ok(stat) => stat.contains(") Z").then_some(()),
            }
        });
        assert!(gone.is_ok(), "child {child} survived");
    }

    fn wait_for_child(pid: i32) -> i32 {
        pgvigil_testkit::wait_until("a child process", Duration::from_secs(10), || {
            children(pid).first().copied()
        })
        .expect("the shell starts its child")
    }
}
