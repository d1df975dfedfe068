//! Child processes that cannot outlive the test process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` so that the kernel kills it (SIGKILL) when the test process exits, however it
/// exits (a panic that aborts, a runner timeout, SIGKILL). Normal cleanup still belongs to the
/// caller: kill the child by its pid and wait for it.
///
/// Linux delivers the parent-death signal when the *thread* that forked the child exits, not the
/// process. Test threads end with their test, while a cluster may be shared between tests, so all
/// children are forked by one helper thread that lives as long as the process.
pub fn spawn_owned(mut command: Command) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe syscalls
    // (prctl, getppid).
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGKILL))
                .map_err(io::Error::from)?;
            // The spawner thread may have died between fork and prctl (process exiting).
            if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
                return Err(io::Error::other("parent exited before the child started"));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// The `pgvigil fencer` process an agent (`agent_pid`) started, if it runs: its child whose
/// command line is `... fencer --data-dir ...`. Tests that emulate an agent without one (the
/// fencer died, or an older agent) stop it together with the agent.
pub fn fencer_of(agent_pid: u32) -> Option<i32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(agent_pid) && cmdline.split(|b| *b == 0).nth(1) == Some(b"fencer".as_slice())
        })
}

/// A process stopped with SIGSTOP that gets SIGCONT when this is dropped, also when the test
/// fails before it could resume it (a stopped process would outlive the test).
pub struct Stopped(i32);

impl Stopped {
    pub fn stop(pid: i32) -> io::Result<Stopped> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP)?;
        Ok(Stopped(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

fn spawner() -> &'static Mutex<mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Mutex::new(tx)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_child_runs_and_can_be_waited_for() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exit 7"]);
        let mut child = spawn_owned(cmd).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(7));
    }
}
