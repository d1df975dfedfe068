//! The `vip:` section: settings of `pgvigil vip CONFIG.yml`, which keeps one floating IP address
//! on the host whose member holds the leader key and runs as primary. The agent and the router
//! ignore this section; Patroni ignores it too.
//!
//! ```yaml
//! vip:
//!   ip: 10.0.0.200        # the floating address (IPv4)
//!   netmask: 24           # its prefix length on `interface`
//!   interface: eth0       # where to add it
//! ```
//!
//! The same facts as vip-manager's `ip`, `netmask` and `interface`; the trigger is implied: the
//! leader key of this file's `scope` holding this file's `name`.

use std::net::Ipv4Addr;

use crate::error::ConfigError;
use crate::walk::{Ctx, Obj};

/// `vip` section; absent means no floating address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    /// `ip` (required): the IPv4 address that follows the leader.
    pub ip: Ipv4Addr,
    /// `netmask` (default 32): prefix length the address is added with (`ip addr add
    /// IP/NETMASK`). Use the subnet's length so that other hosts on the subnet reach it without
    /// a route; 32 adds a host address only.
    pub netmask: u8,
    /// `interface` (required): the network interface to add the address to (not `lo`: other
    /// hosts must be told about it with ARP).
    pub interface: String,
}

pub(crate) fn parse_vip(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<Option<VipConfig>, ConfigError> {
    if !o.present() {
        return Ok(None);
    }
    let ip_text = o.string(ctx, "ip")?.ok_or_else(|| o.missing(ctx, "ip"))?;
    let ip: Ipv4Addr = ip_text.trim().parse().map_err(|_| {
        ctx.error(
            &o.key_path("ip"),
            format!("expected an IPv4 address without a prefix (e.g. 10.0.0.200), found {ip_text:?}"),
        )
    })?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_broadcast() || ip.is_multicast() {
        return Err(ctx.error(&o.key_path("ip"), format!("{ip} cannot be a floating address")));
    }
    let netmask = match o.i64(ctx, "netmask")? {
        None => 32,
        Some(n) => u8::try_from(n)
            .ok()
            .filter(|n| (1..=32).contains(n))
            .ok_or_else(|| {
                ctx.error(
                    &o.key_path("netmask"),
                    format!("expected a prefix length from 1 to 32, found {n}"),
                )
            })?,
    };
    let interface = o
        .string(ctx, "interface")?
        .ok_or_else(|| o.missing(ctx, "interface"))?;
    let interface = interface.trim().to_string();
    let valid_name = !interface.is_empty()
        && interface.len() < 16
        && !interface.contains(['/', ' ', ':'])
        && interface != "."
        && interface != "..";
    if !valid_name {
        let msg = format!("expected a network interface name (e.g. eth0), found {interface:?}");
        return Err(ctx.error(&o.key_path("interface"), msg));
    }
    if interface == "lo" {
        let msg = "the loopback interface cannot carry a floating address: name the interface on the hosts' network";
        return Err(ctx.error(&o.key_path("interface"), msg));
    }
    o.finish(ctx);
    Ok(Some(VipConfig {
        ip,
        netmask,
        interface,
    }))
}
