//! A minimal NFQUEUE client over a raw netlink socket (the protocol of
//! `linux/netfilter/nfnetlink_queue.h`): bind a queue, receive packet ids (metadata only),
//! send verdicts.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::libc;

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
