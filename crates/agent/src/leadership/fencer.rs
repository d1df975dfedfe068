//! `pgvigil fencer --data-dir DIR`: the fence that outlives the agent.
//!
//! Started by the agent in its own session with a pipe on stdin, it reads one order per line:
//!
//! * `arm <deadline> <pid>`: stop the postmaster `pid` once `CLOCK_BOOTTIME` passes
//!   `<deadline>` (nanoseconds since boot) unless a newer order came first;
//! * `disarm`: enforce nothing;
//! * `exit`: end (the agent shuts down cleanly).
//!
//! When the pipe closes without `exit` (the agent was killed, or crashed), the last order
//! stands: an armed fencer waits for its deadline, stops PostgreSQL, and exits; a disarmed one
//! exits at once, and so does one whose postmaster has exited meanwhile. A frozen agent keeps the pipe open and sends nothing: the deadline passes and
//! the fencer acts. A restarted agent ends its predecessor's fencer (SIGTERM) once its own
//! fence covers PostgreSQL or PostgreSQL is no longer a primary.
//!
//! No async runtime, no files: a pipe, a `CLOCK_BOOTTIME` timer, a pidfd and signals. The data
//! directory on the command line is not opened; it only lets a new agent find this process.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use pgvigil_lock::BootInstant;

use super::kill::stop_postmaster;
use super::sys::{BootTimer, Pidfd, poll_readable};

/// One order from the agent.
#[derive(Debug, PartialEq, Eq)]
enum Order {
    Arm { deadline: BootInstant, pid: i32 },
    Disarm,
    Exit,
}

fn parse(line: &str) -> Option<Order> {
    let mut words = line.split_whitespace();
    match (words.next()?, words.next(), words.next(), words.next()) {
        ("arm", Some(ns), Some(pid), None) => Some(Order::Arm {
            deadline: BootInstant::from_nanos(ns.parse().ok()?),
            pid: pid.parse().ok().filter(|p| *p > 0)?,
        }),
        ("disarm", None, None, None) => Some(Order::Disarm),
        ("exit", None, None, None) => Some(Order::Exit),
        _ => None,
    }
}

pub fn main(args: &[String]) -> ExitCode {
    if !matches!(args, [flag, _] if flag == "--data-dir") {
        eprintln!("usage: pgvigil fencer --data-dir DIR (started by the agent, not by hand)");
        return ExitCode::from(2);
    }
    // A terminal's ^C or hang-up goes to the agent, not here; a dead pipe is an EOF.
    // SAFETY: setting signal dispositions to SIG_IGN before any thread exists.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let timer = match BootTimer::new() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pgvigil fencer: cannot create a CLOCK_BOOTTIME timer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdin = std::io::stdin().lock();
    let mut pending = String::new();
    let mut armed: Option<(BootInstant, Pidfd)> = None;
    let mut orphan = false;
    loop {
        if let Some((deadline, pidfd)) = &armed
            && BootInstant::now() >= *deadline
        {
            eprintln!(
                "pgvigil fencer: the leader lock's deadline passed without a newer one; stopping the postmaster (pid {})",
                pidfd.pid()
            );
            stop_postmaster(pidfd, Duration::from_secs(10));
            armed = None;
        }
        if orphan && armed.is_none() {
            return ExitCode::SUCCESS;
        }
        // Alone, with a postmaster that is gone: nothing is left to stop.
        if orphan && armed.as_ref().is_some_and(|(_, p)| p.has_exited()) {
            return ExitCode::SUCCESS;
        }
        let _ = timer.set(armed.as_ref().map(|(d, _)| *d));
        let mut fds: Vec<i32> = if orphan {
            vec![timer.raw()]
        } else {
            vec![0, timer.raw()]
        };
        if orphan && let Some((_, pidfd)) = &armed {
            fds.push(pidfd.raw());
        }
        let ready = match poll_readable(&fds, None) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("pgvigil fencer: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if orphan || !ready[0] {
            continue;
        }
        let mut buf = [0u8; 512];
        match stdin.read(&mut buf) {
            Ok(0) => {
                orphan = true;
                if armed.is_some() {
                    eprintln!("pgvigil fencer: the agent is gone; enforcing its last deadline");
                }
            }
            Ok(n) => pending.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => orphan = true,
        }
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            match parse(&line) {
                Some(Order::Arm { deadline, pid }) => {
                    let same = armed.as_ref().is_some_and(|(_, p)| p.pid() == pid);
                    if same {
                        if let Some((d, _)) = armed.as_mut() {
                            *d = deadline;
                        }
                    } else {
                        match Pidfd::open(pid) {
                            Ok(p) => armed = Some((deadline, p)),
                            // Gone already: nothing to stop.
                            Err(_) => armed = None,
                        }
                    }
                }
                Some(Order::Disarm) => armed = None,
                Some(Order::Exit) => return ExitCode::SUCCESS,
                None => eprintln!(
                    "pgvigil fencer: ignoring an unreadable order {:?}",
                    line.trim_end()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_parse_strictly() {
        assert_eq!(
            parse("arm 1500000000 42\n"),
            Some(Order::Arm {
                deadline: BootInstant::from_nanos(1_500_000_000),
                pid: 42
            })
        );
        assert_eq!(parse("disarm"), Some(Order::Disarm));
        assert_eq!(parse("exit\n"), Some(Order::Exit));
        for bad in [
            "arm",
            "arm 1",
            "arm x 1",
            "arm 1 0",
            "arm 1 -3",
            "arm 1 2 3",
            "disarm now",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
