//! The plumbing of the lab: lab slots, `ip` (iproute2), entering a network namespace, and the
//! processes inside one.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, bail};
use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid};

const LOCK_DIR: &str = "/run/pgvigil-netlab";
const MAX_SLOT: u16 = 250;

/// Takes the first free slot: an exclusive non-blocking `flock` on its lock file.
pub(super) fn take_slot() -> anyhow::Result<(u16, File)> {
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    for slot in 1..=MAX_SLOT {
        let path = Path::new(LOCK_DIR).join(format!("slot-{slot}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok((slot, file));
        }
    }
    bail!("all {MAX_SLOT} network lab slots are taken")
}

pub(super) fn run_ip(args: &[&str], quiet: bool) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if !quiet {
            bail!("ip {}: {}", args.join(" "), err.trim());
        }
        bail!("failed");
    }
    Ok(())
}

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_ip(args, false)
}

pub(super) fn ip_quiet(args: &[&str]) -> anyhow::Result<()> {
    run_ip(args, true)
}

pub(super) fn namespace_pids(ns: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub(super) fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_none_or(|state| state == 'Z')
}

/// SIGKILLs every process in namespace `ns`, by PID (what a machine reset does to a host).
pub fn kill_namespace_processes(ns: &str) {
    for pid in namespace_pids(ns) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

pub(super) fn setns_net(file: &File) -> io::Result<()> {
    // SAFETY: setns on an open namespace file; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s child enter the namespace of `file`, then (optionally) become `user`.
pub(super) fn enter_netns(cmd: &mut Command, file: Arc<File>, user: Option<(Uid, Gid)>) {
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
    // (setns, setgroups, setgid, setuid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid)) = user {
                let groups = [gid.as_raw()];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(gid.as_raw()) != 0
                    || libc::setuid(uid.as_raw()) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
