//! A network lab: a few "hosts", each a Linux network namespace with its own address, joined by
//! a bridge, with faults to inject between them. Root only (namespaces, veth, iptables).
//!
//! ```text
//!   root namespace (tests, client, router)        switch namespace `pgvl<S>sw`
//!   pgvl<S>r 10.77.S.1/24 ──── veth ──── rootlink ─┐
//!                                                  br0 ── h1 ──── veth ──── eth0 10.77.S.11  `pgvl<S>h1`
//!                                                      ── h2 ──── veth ──── eth0 10.77.S.12  `pgvl<S>h2`
//!                                                      ── h3 ──── veth ──── eth0 10.77.S.13  `pgvl<S>h3`
//! ```
//!
//! * **Slots.** Each lab takes a free slot `S` (1..=250) by holding an exclusive `flock` on
//!   `/run/pgvigil-netlab/slot-S.lock` for its lifetime, so labs of tests running in parallel
//!   (other threads, other nextest processes) never share names or addresses. Whatever a killed
//!   run left behind in a slot (namespaces, the root veth, processes inside those namespaces) is
//!   removed when the slot is taken again: holding the lock proves nobody else uses them.
//! * **No forwarding in the root namespace.** The root namespace talks to the hosts over its own
//!   veth as a directly connected /24, so Docker's `FORWARD DROP` policy never applies; the
//!   bridge lives in the switch namespace, whose filter tables are empty.
//! * **Processes** start inside a host with [`NetLab::command`] / [`NetLab::command_as`]: the
//!   child enters the namespace with `setns` between fork and exec (then drops to the given
//!   user), so the PID the caller gets is the program's own and [`crate::spawn_owned`]'s
//!   parent-death signal still applies. Sockets can also be opened from inside a host with
//!   [`NetLab::in_host`] (a thread that entered the namespace).
//! * **Faults.** [`NetLab::isolate`] drops traffic between a host and the other hosts (the root
//!   namespace, i.e. the test's observer and the client, still reaches every host: the harshest
//!   partition, where the client could talk to both sides); [`NetLab::block`] cuts one pair;
//!   [`NetLab::heal`] removes both. [`NetLab::link_down`] unplugs a host entirely (a dead host:
//!   packets vanish, nobody gets a reset). [`NetLab::impair`] adds delay, jitter and loss to
//!   everything a host sends on its link, like `tc netem` on the egress of its interface (this
//!   kernel has no `sch_netem`): an `iptables -j NFQUEUE` rule hands each outgoing packet to a
//!   thread of the test process ([`nfqueue`]), which drops it with the given probability or
//!   gives it back to the kernel once its delay has passed, in order.
//! * **Drop** stops the delayers, kills every process still inside the lab's namespaces (by
//!   PID, from `ip netns pids`: whatever runs there was started by this lab), deletes the
//!   namespaces and the root veth, and releases the slot.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid};

use crate::wait_until;

const LOCK_DIR: &str = "/run/pgvigil-netlab";
const MAX_SLOT: u16 = 250;
/// The first two octets of every lab's addresses: slot `S` uses `10.77.S.0/24`.
pub const NET_PREFIX: [u8; 2] = [10, 77];
/// The iptables chain (filter table, inside each host) that holds partition rules.
const CUT_CHAIN: &str = "PGVL_CUT";
/// The NFQUEUE number used inside each host (queues are per namespace).
const QUEUE_NUM: u16 = 0;

/// Delay, jitter and loss added to everything a host sends on its link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Added to every packet.
    pub delay: Duration,
    /// Each packet's delay is `delay ± jitter` (uniform), never reordering packets.
    pub jitter: Duration,
    /// Probability (0.0..=1.0) that a packet is dropped.
    pub loss: f64,
}

/// One host of the lab.
#[derive(Clone, Debug)]
pub struct LabHost {
    /// The network namespace's name (`ip netns exec <ns> ...`).
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A set of hosts in network namespaces on one bridge; see the module documentation.
pub struct NetLab {
    slot: u16,
    hosts: Vec<LabHost>,
    switch_ns: String,
    root_link: String,
    /// Open `/run/netns/<ns>` files, one per host, for `setns`.
    ns_files: Vec<Arc<File>>,
    delayers: Mutex<Vec<Option<Delayer>>>,
    /// Held (flock) for the lab's lifetime.
    _slot_lock: File,
}

impl NetLab {
    /// Creates the switch, `hosts` hosts (at most 200) and the link from the root namespace.
    pub fn create(hosts: usize) -> anyhow::Result<NetLab> {
        assert!((1..=200).contains(&hosts), "a lab has 1 to 200 hosts");
        if !nix::unistd::geteuid().is_root() {
            bail!("the network lab needs root (network namespaces, veth, iptables)");
        }
        let (slot, lock) = take_slot()?;
        let prefix = format!("pgvl{slot}");
        let mut lab = NetLab {
            slot,
            hosts: (0..hosts)
                .map(|i| LabHost {
                    ns: format!("{prefix}h{}", i + 1),
                    ip: Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], slot as u8, 11 + i as u8),
                })
                .collect(),
            switch_ns: format!("{prefix}sw"),
            root_link: format!("{prefix}r"),
            ns_files: Vec::new(),
            delayers: Mutex::new((0..hosts).map(|_| None).collect()),
            _slot_lock: lock,
        };
        lab.remove_leftovers();
        lab.build().context("building the network lab")?;
        Ok(lab)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let sw = self.switch_ns.clone();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        // The root namespace's link: an address in the lab's /24, no forwarding involved.
        ip(&[
            "link",
            "add",
            &self.root_link,
            "type",
            "veth",
            "peer",
            "name",
            "rootlink",
            "netns",
            &sw,
        ])?;
        ip(&["-n", &sw, "link", "set", "rootlink", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.root_ip()),
            "dev",
            &self.root_link,
        ])?;
        ip(&["link", "set", &self.root_link, "up"])?;
        for (i, host) in self.hosts.clone().iter().enumerate() {
            let port = format!("h{}", i + 1);
            ip(&["netns", "add", &host.ns])?;
            ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &host.ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &host.ns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
            self.iptables(i, &["-N", CUT_CHAIN])?;
            self.iptables(i, &["-A", "INPUT", "-j", CUT_CHAIN])?;
            self.iptables(i, &["-A", "OUTPUT", "-j", CUT_CHAIN])?;
            let file = File::open(Path::new("/run/netns").join(&host.ns))
                .with_context(|| format!("opening /run/netns/{}", host.ns))?;
            self.ns_files.push(Arc::new(file));
        }
        Ok(())
    }

    /// Removes what a previous holder of this slot may have left (it was killed before its
    /// Drop ran). Errors are ignored: most of it normally does not exist.
    fn remove_leftovers(&self) {
        let mut names: Vec<String> = self.hosts.iter().map(|h| h.ns.clone()).collect();
        names.push(self.switch_ns.clone());
        for ns in &names {
            if Path::new("/run/netns").join(ns).exists() {
                kill_namespace_processes(ns);
                let _ = ip(&["netns", "del", ns]);
            }
        }
        let _ = ip_quiet(&["link", "del", &self.root_link]);
    }

    pub fn slot(&self) -> u16 {
        self.slot
    }

    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        self.hosts[i].ip
    }

    /// The root namespace's address on the lab network (where tests, client and router are).
    pub fn root_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.slot as u8, 1)
    }

    /// The lab's network, as `10.77.S.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}.{}.{}.0/24", NET_PREFIX[0], NET_PREFIX[1], self.slot)
    }

    /// A command that runs `program` inside host `i`'s namespace, as root.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter_netns(&mut cmd, self.ns_files[i].clone(), None);
        cmd
    }

    /// A command that runs `program` inside host `i`'s namespace as `uid`/`gid` (supplementary
    /// groups: `gid` only). Do not also call `Command::uid`: the namespace must be entered
    /// while still root.
    pub fn command_as(&self, i: usize, program: impl AsRef<std::ffi::OsStr>, uid: Uid, gid: Gid) -> Command {
        let mut cmd = Command::new(program);
        enter_netns(&mut cmd, self.ns_files[i].clone(), Some((uid, gid)));
        cmd
    }

    /// Runs `f` on a new thread that entered host `i`'s namespace, and returns its result.
    /// Sockets created there belong to that host, whichever thread uses them later.
    pub fn in_host<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = self.ns_files[i].clone();
        std::thread::spawn(move || -> anyhow::Result<T> {
            setns_net(&file)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside the namespace panicked"))?
    }

    /// Runs `iptables ARGS` inside host `i`.
    pub fn iptables(&self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", &self.hosts[i].ns, "iptables", "-w", "5"];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Cuts host `i` off from every other host, both ways; the root namespace still reaches it.
    pub fn isolate(&self, i: usize) -> anyhow::Result<()> {
        for j in (0..self.hosts.len()).filter(|&j| j != i) {
            self.block(i, j)?;
        }
        Ok(())
    }

    /// Drops all traffic between hosts `i` and `j` (rules inside host `i`, both directions).
    pub fn block(&self, i: usize, j: usize) -> anyhow::Result<()> {
        let peer = self.hosts[j].ip.to_string();
        self.iptables(i, &["-A", CUT_CHAIN, "-s", &peer, "-j", "DROP"])?;
        self.iptables(i, &["-A", CUT_CHAIN, "-d", &peer, "-j", "DROP"])
    }

    /// Removes every partition rule of host `i` (both [`NetLab::isolate`] and
    /// [`NetLab::block`] rules placed inside host `i`).
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        self.iptables(i, &["-F", CUT_CHAIN])
    }

    /// Removes every partition rule in every host.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        for i in 0..self.hosts.len() {
            self.heal(i)?;
        }
        Ok(())
    }

    /// Unplugs host `i`: its interface goes down, packets to and from it vanish.
    pub fn link_down(&self, i: usize) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &format!("h{}", i + 1),
            "down",
        ])
    }

    /// Plugs host `i` back in.
    pub fn link_up(&self, i: usize) -> anyhow::Result<()> {
        ip(&["-n", &self.switch_ns, "link", "set", &format!("h{}", i + 1), "up"])
    }

    /// Applies `imp` to everything host `i` sends on its link (replacing any previous one).
    pub fn impair(&self, i: usize, imp: Impairment) -> anyhow::Result<()> {
        self.clear_impairment(i)?;
        let delayer = Delayer::start(self.ns_files[i].clone(), imp)?;
        self.delayers.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(delayer);
        // With --queue-bypass a packet is accepted, not dropped, if the delayer is gone.
        let queue = QUEUE_NUM.to_string();
        self.iptables(
            i,
            &[
                "-t",
                "mangle",
                "-A",
                "POSTROUTING",
                "-o",
                "eth0",
                "-j",
                "NFQUEUE",
                "--queue-num",
                &queue,
                "--queue-bypass",
            ],
        )
    }

    /// Removes host `i`'s impairment; packets still held are released at once.
    pub fn clear_impairment(&self, i: usize) -> anyhow::Result<()> {
        let delayer = self.delayers.lock().unwrap_or_else(|e| e.into_inner())[i].take();
        if let Some(delayer) = delayer {
            self.iptables(i, &["-t", "mangle", "-F", "POSTROUTING"])?;
            delayer.stop()?;
        }
        Ok(())
    }

    /// PIDs of every process inside host `i`'s namespace.
    pub fn pids(&self, i: usize) -> Vec<i32> {
        namespace_pids(&self.hosts[i].ns)
    }

    /// SIGKILLs every process inside host `i` (by PID) and waits (bounded) until none is left.
    /// Zombies of this process's own children disappear only when the caller waits for them.
    pub fn kill_all(&self, i: usize) -> anyhow::Result<()> {
        kill_namespace_processes(&self.hosts[i].ns);
        let ns = self.hosts[i].ns.clone();
        wait_until(
            &format!("every process in {ns} to exit"),
            Duration::from_secs(30),
            || namespace_pids(&ns).iter().all(|&p| is_zombie(p)).then_some(()),
        )
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let delayers: Vec<Delayer> = self
            .delayers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for d in delayers {
            let _ = d.stop();
        }
        for h in &self.hosts {
            kill_namespace_processes(&h.ns);
        }
        self.ns_files.clear();
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch_ns]);
        // Deleting the switch namespace removed the peer, hence the root end; make sure.
        let _ = ip_quiet(&["link", "del", &self.root_link]);
    }
}

/// Takes the first free slot: an exclusive non-blocking `flock` on its lock file.
fn take_slot() -> anyhow::Result<(u16, File)> {
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

fn run_ip(args: &[&str], quiet: bool) -> anyhow::Result<()> {
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

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_ip(args, false)
}

fn ip_quiet(args: &[&str]) -> anyhow::Result<()> {
    run_ip(args, true)
}

fn namespace_pids(ns: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn is_zombie(pid: i32) -> bool {
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

fn setns_net(file: &File) -> io::Result<()> {
    // SAFETY: setns on an open namespace file; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s child enter the namespace of `file`, then (optionally) become `user`.
fn enter_netns(cmd: &mut Command, file: Arc<File>, user: Option<(Uid, Gid)>) {
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

/// The userspace half of [`NetLab::impair`]: a thread inside the host's namespace bound to its
/// NFQUEUE.
struct Delayer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl Delayer {
    fn start(ns: Arc<File>, imp: Impairment) -> anyhow::Result<Delayer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("netlab-delayer".into()).spawn(
                move || -> anyhow::Result<()> {
                    let queue = setns_net(&ns)
                        .context("entering the host namespace")
                        .and_then(|()| nfqueue::Queue::bind(QUEUE_NUM));
                    let queue = match queue {
                        Ok(q) => {
                            let _ = ready_tx.send(Ok(()));
                            q
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    nfqueue::delay_loop(&queue, imp, &stop)
                },
            )?
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Delayer { stop, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e.context("binding the NFQUEUE"))
            }
            Err(_) => bail!("the delayer thread did not start"),
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the delayer thread panicked"))?
    }
}

/// A minimal NFQUEUE client over a raw netlink socket (the protocol of
/// `linux/netfilter/nfnetlink_queue.h`): bind a queue, receive packet ids (metadata only),
/// send verdicts.
pub mod nfqueue {
    use std::collections::VecDeque;
    use std::time::Instant;

    use super::*;

    const NETLINK_NETFILTER: i32 = 12;
    const NFNL_SUBSYS_QUEUE: u16 = 3;
    const NFQNL_MSG_PACKET: u16 = 0;
    const NFQNL_MSG_VERDICT: u16 = 1;
    const NFQNL_MSG_CONFIG: u16 = 2;
    const NFQA_CFG_CMD: u16 = 1;
    const NFQA_CFG_PARAMS: u16 = 2;
    const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
    const NFQNL_CFG_CMD_BIND: u8 = 1;
    const NFQNL_COPY_META: u8 = 1;
    const NFQA_PACKET_HDR: u16 = 1;
    const NFQA_VERDICT_HDR: u16 = 2;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NF_DROP: u32 = 0;
    const NF_ACCEPT: u32 = 1;
    const SOL_NETLINK: i32 = 270;
    const NETLINK_NO_ENOBUFS: i32 = 5;

    pub struct Queue {
        fd: OwnedFd,
        num: u16,
        seq: std::cell::Cell<u32>,
    }

    fn message(ty: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b.push(libc::AF_UNSPEC as u8);
        b.push(0); // NFNETLINK_V0
        b.extend_from_slice(&queue.to_be_bytes());
        for (kind, data) in attrs {
            let len = 4 + data.len();
            b.extend_from_slice(&(len as u16).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(data);
            while !b.len().is_multiple_of(4) {
                b.push(0);
            }
        }
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | ty).to_ne_bytes());
        b[6..8].copy_from_slice(&flags.to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b
    }

    impl Queue {
        /// Binds queue `num` in the calling thread's network namespace.
        pub fn bind(num: u16) -> anyhow::Result<Queue> {
            // SAFETY: plain socket/setsockopt/bind calls on a descriptor we own.
            let fd = unsafe {
                let raw = libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    NETLINK_NETFILTER,
                );
                if raw < 0 {
                    return Err(io::Error::last_os_error()).context("netlink socket");
                }
                OwnedFd::from_raw_fd(raw)
            };
            let set = |level: i32, opt: i32, value: i32| {
                // SAFETY: setsockopt with a pointer to a live i32.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        level,
                        opt,
                        (&value as *const i32).cast(),
                        std::mem::size_of::<i32>() as u32,
                    )
                }
            };
            set(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20);
            set(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1);
            // SAFETY: sockaddr_nl is plain data; zeroed is a valid "kernel assigns the port".
            let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            addr.nl_family = libc::AF_NETLINK as u16;
            // SAFETY: bind with a correctly sized sockaddr_nl.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error()).context("binding the netlink socket");
            }
            let q = Queue {
                fd,
                num,
                seq: std::cell::Cell::new(1),
            };
            let cmd = [NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8];
            q.request(&[(NFQA_CFG_CMD, &cmd)]).context("NFQNL_CFG_CMD_BIND")?;
            let mut params = Vec::from(0xffffu32.to_be_bytes());
            params.push(NFQNL_COPY_META);
            q.request(&[
                (NFQA_CFG_PARAMS, &params),
                (NFQA_CFG_QUEUE_MAXLEN, &65536u32.to_be_bytes()),
            ])
            .context("NFQA_CFG_PARAMS")?;
            Ok(q)
        }

        /// Sends a config message and waits for its acknowledgement.
        fn request(&self, attrs: &[(u16, &[u8])]) -> anyhow::Result<()> {
            let seq = self.seq.get();
            self.seq.set(seq + 1);
            let msg = message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, self.num, attrs);
            self.send(&msg)?;
            let mut buf = vec![0u8; 65536];
            for _ in 0..100 {
                if !self.wait_readable(Duration::from_secs(5))? {
                    bail!("no answer from the kernel");
                }
                let n = self.recv(&mut buf)?.unwrap_or(0);
                for (ty, body) in messages(&buf[..n]) {
                    if ty == NLMSG_ERROR && body.len() >= 4 {
                        let errno = i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes"));
                        if errno == 0 {
                            return Ok(());
                        }
                        return Err(io::Error::from_raw_os_error(-errno).into());
                    }
                }
            }
            bail!("no acknowledgement from the kernel")
        }

        fn send(&self, msg: &[u8]) -> anyhow::Result<()> {
            // SAFETY: sockaddr_nl zeroed = the kernel (pid 0).
            let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            to.nl_family = libc::AF_NETLINK as u16;
            // SAFETY: sendto with a valid buffer and address.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&to as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error()).context("netlink sendto");
            }
            Ok(())
        }

        /// One datagram, or `None` when nothing is waiting.
        fn recv(&self, buf: &mut [u8]) -> anyhow::Result<Option<usize>> {
            // SAFETY: recv into a buffer we own.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(None),
                    _ => Err(e).context("netlink recv"),
                };
            }
            Ok(Some(n as usize))
        }

        fn wait_readable(&self, timeout: Duration) -> anyhow::Result<bool> {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll on one pollfd we own.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    return Ok(false);
                }
                return Err(e).context("poll");
            }
            Ok(rc > 0)
        }

        fn verdict(&self, id: u32, verdict: u32) -> anyhow::Result<()> {
            let mut hdr = Vec::from(verdict.to_be_bytes());
            hdr.extend_from_slice(&id.to_be_bytes());
            let msg = message(
                NFQNL_MSG_VERDICT,
                NLM_F_REQUEST,
                0,
                self.num,
                &[(NFQA_VERDICT_HDR, &hdr)],
            );
            self.send(&msg)
        }

        /// Packet ids of every queued-packet message in `buf`.
        fn packet_ids(buf: &[u8]) -> Vec<u32> {
            let mut ids = Vec::new();
            for (ty, body) in messages(buf) {
                if ty != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET || body.len() < 4 {
                    continue;
                }
                let mut attrs = &body[4..]; // nfgenmsg
                while attrs.len() >= 4 {
                    let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                    let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                    if len < 4 || len > attrs.len() {
                        break;
                    }
                    if kind == NFQA_PACKET_HDR && len >= 8 {
                        ids.push(u32::from_be_bytes(attrs[4..8].try_into().expect("4 bytes")));
                    }
                    let step = (len + 3) & !3;
                    attrs = &attrs[step.min(attrs.len())..];
                }
            }
            ids
        }
    }

    /// `(type, body)` of each netlink message in a datagram.
    fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 16 {
            let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes([buf[4], buf[5]]);
            if len < 16 || len > buf.len() {
                break;
            }
            out.push((ty, &buf[16..len]));
            let step = (len + 3) & !3;
            buf = &buf[step.min(buf.len())..];
        }
        out
    }

    /// A small xorshift generator: loss decisions need no cryptographic quality.
    struct Rng(u64);

    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Holds each packet for its delay (in arrival order) or drops it, until `stop`; then
    /// releases everything still held.
    pub fn delay_loop(queue: &Queue, imp: super::Impairment, stop: &AtomicBool) -> anyhow::Result<()> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        let mut rng = Rng(seed);
        let mut held: VecDeque<(u32, Instant)> = VecDeque::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            if stop.load(Ordering::SeqCst) {
                for (id, _) in held.drain(..) {
                    queue.verdict(id, NF_ACCEPT)?;
                }
                return Ok(());
            }
            let now = Instant::now();
            let wait = held
                .front()
                .map_or(Duration::from_millis(50), |(_, due)| {
                    due.saturating_duration_since(now)
                })
                .min(Duration::from_millis(50));
            if queue.wait_readable(wait)? {
                while let Some(n) = queue.recv(&mut buf)? {
                    let arrived = Instant::now();
                    for id in Queue::packet_ids(&buf[..n]) {
                        if imp.loss > 0.0 && rng.next_f64() < imp.loss {
                            queue.verdict(id, NF_DROP)?;
                            continue;
                        }
                        let mut delay = imp.delay;
                        if !imp.jitter.is_zero() {
                            let j = imp.jitter.as_secs_f64() * (2.0 * rng.next_f64() - 1.0);
                            delay = Duration::from_secs_f64((delay.as_secs_f64() + j).max(0.0));
                        }
                        // Never reorder: a packet leaves no earlier than the one before it.
                        let due = held
                            .back()
                            .map_or(arrived + delay, |(_, last)| (*last).max(arrived + delay));
                        held.push_back((id, due));
                    }
                }
            }
            let now = Instant::now();
            while held.front().is_some_and(|(_, due)| *due <= now) {
                let (id, _) = held.pop_front().expect("checked");
                queue.verdict(id, NF_ACCEPT)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Instant;

    use super::*;

    fn serve_echo(lab: &NetLab, i: usize, port: u16) -> std::thread::JoinHandle<()> {
        let addr = SocketAddr::from((lab.host_ip(i), port));
        let listener = lab.in_host(i, move || TcpListener::bind(addr)).unwrap().unwrap();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        })
    }

    /// Round trip of one byte from host `from` (None: the root namespace) to `to`.
    fn round_trip(lab: &NetLab, from: Option<usize>, to: SocketAddr) -> Option<Duration> {
        let attempt = move || -> Option<Duration> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(700)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            let start = Instant::now();
            s.write_all(b"x").ok()?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).ok()?;
            Some(start.elapsed())
        };
        match from {
            None => attempt(),
            Some(i) => lab.in_host(i, attempt).unwrap(),
        }
    }

    #[test]
    fn hosts_talk_partitions_cut_and_heal_and_impairment_delays() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let lab = NetLab::create(3).unwrap();
        let ns: Vec<String> = lab.hosts().iter().map(|h| h.ns.clone()).collect();
        let port = 7700;
        let _servers: Vec<_> = (0..3).map(|i| serve_echo(&lab, i, port)).collect();
        let addr = |i: usize| SocketAddr::from((lab.host_ip(i), port));
        // Everyone reaches everyone.
        assert!(round_trip(&lab, None, addr(0)).is_some());
        assert!(round_trip(&lab, Some(1), addr(0)).is_some());
        assert!(round_trip(&lab, Some(0), addr(2)).is_some());
        // Isolated host 0: the other hosts cannot reach it nor it them; the root still can.
        lab.isolate(0).unwrap();
        assert!(round_trip(&lab, Some(1), addr(0)).is_none());
        assert!(round_trip(&lab, Some(0), addr(2)).is_none());
        assert!(round_trip(&lab, Some(1), addr(2)).is_some());
        assert!(round_trip(&lab, None, addr(0)).is_some());
        lab.heal(0).unwrap();
        assert!(round_trip(&lab, Some(1), addr(0)).is_some());
        // 150 ms on host 1's egress: every round trip with host 1 takes at least that.
        lab.impair(
            1,
            Impairment {
                delay: Duration::from_millis(150),
                ..Default::default()
            },
        )
        .unwrap();
        let rtt = round_trip(&lab, Some(0), addr(1)).expect("delayed, not lost");
        assert!(rtt >= Duration::from_millis(150), "{rtt:?}");
        lab.clear_impairment(1).unwrap();
        // Total loss: nothing gets through.
        lab.impair(
            1,
            Impairment {
                loss: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(round_trip(&lab, Some(0), addr(1)).is_none());
        lab.clear_impairment(1).unwrap();
        assert!(round_trip(&lab, Some(0), addr(1)).is_some());
        // An unplugged host is unreachable from everywhere.
        lab.link_down(2).unwrap();
        assert!(round_trip(&lab, None, addr(2)).is_none());
        lab.link_up(2).unwrap();
        // A process started inside a host sees that host's address.
        let out = lab
            .command(0, "ip")
            .args(["-4", "-br", "addr", "show", "eth0"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&lab.host_ip(0).to_string()),
            "{out:?}"
        );
        let root_link = lab.root_link.clone();
        drop(lab);
        for n in ns {
            assert!(!Path::new("/run/netns").join(n).exists());
        }
        assert!(ip_quiet(&["link", "show", &root_link]).is_err());
    }

    #[test]
    fn processes_run_inside_a_host_as_another_user() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let Some(user) = nix::unistd::User::from_name("postgres").ok().flatten() else {
            eprintln!("skipped: no postgres user");
            return;
        };
        let lab = NetLab::create(1).unwrap();
        let out = lab
            .command_as(0, "/bin/sh", user.uid, user.gid)
            .args(["-c", "id -u; ip -4 -br addr show eth0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with(&format!("{}\n", user.uid)), "{text}");
        assert!(text.contains(&lab.host_ip(0).to_string()), "{text}");
        // kill_all reaches processes started inside the host.
        let mut child = crate::spawn_owned({
            let mut c = lab.command(0, "/bin/sleep");
            c.arg("300");
            c
        })
        .unwrap();
        assert_eq!(lab.pids(0), vec![child.id() as i32]);
        lab.kill_all(0).unwrap_or(());
        assert!(child.wait().is_ok());
        assert!(lab.pids(0).is_empty());
    }
}
