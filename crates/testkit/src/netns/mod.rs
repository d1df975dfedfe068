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
//!   thread of the test process ([`nfqueue`], driven by `delayer.rs`), which drops it with the
//!   given probability or gives it back to the kernel once its delay has passed, in order.
//! * **Drop** stops the delayers, kills every process still inside the lab's namespaces (by
//!   PID, from `ip netns pids`: whatever runs there was started by this lab), deletes the
//!   namespaces and the root veth, and releases the slot.
//!
//! Files: this one builds and tears down the lab and injects the faults; `namespaces.rs` holds
//! the plumbing (slots, `ip`, entering a namespace, the processes inside one); `delayer.rs` and
//! [`nfqueue`] implement [`NetLab::impair`].

mod delayer;
mod namespaces;
pub mod nfqueue;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::unistd::{Gid, Uid};

use self::delayer::Delayer;
pub use self::namespaces::kill_namespace_processes;
use self::namespaces::{enter_netns, ip, ip_quiet, is_zombie, namespace_pids, setns_net, take_slot};
use crate::wait_until;

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
