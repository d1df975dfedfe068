//! Gratuitous ARP: tells the hosts on a link that an IPv4 address now lives at this
//! interface's MAC address, so that clients of a floating address switch to its new host at
//! once instead of after their neighbour entry times out (seconds of unreachable address).
//!
//! One broadcast ARP request with sender = target = the address (RFC 5227's "ARP
//! announcement"), sent on a raw `AF_PACKET` socket; Linux neighbours update an existing entry
//! from it. Needs CAP_NET_RAW.

use std::net::Ipv4Addr;

use anyhow::{Context, bail};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;

/// The interface's MAC address, from sysfs.
fn mac_of(interface: &str) -> anyhow::Result<[u8; 6]> {
    let path = format!("/sys/class/net/{interface}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_mac(text.trim()).with_context(|| format!("{path} holds {:?}, not a MAC address", text.trim()))
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The Ethernet frame of an ARP announcement of `ip` at `mac`.
fn announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends one announcement of `ip` on `interface`.
pub fn announce(interface: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    let mac = mac_of(interface)?;
    if mac == [0; 6] {
        bail!("{interface} has no MAC address: gratuitous ARP needs an Ethernet interface");
    }
    let frame = announcement(mac, ip);
    let name = std::ffi::CString::new(interface).context("interface name contains a NUL byte")?;
    // SAFETY: plain libc calls on a socket we own and close; every pointer passed points to a
    // live local of the size given.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            bail!(
                "no interface named {interface}: {}",
                std::io::Error::last_os_error()
            );
        }
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_ARP.to_be()));
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            bail!("cannot open a raw packet socket (needs CAP_NET_RAW): {e}");
        }
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if sent < 0 {
            bail!("sending gratuitous ARP on {interface}: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:42:ac:11:00:02"), Some([2, 0x42, 0xac, 0x11, 0, 2]));
        assert_eq!(parse_mac("02:42:ac:11:00"), None);
        assert_eq!(parse_mac("02:42:ac:11:00:02:03"), None);
        assert_eq!(parse_mac("zz:42:ac:11:00:02"), None);
    }

    #[test]
    fn frame_layout() {
        let f = announcement([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 0, 0, 200));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 0, 0, 200], "sender address");
        assert_eq!(&f[32..38], &[0; 6], "target MAC unknown");
        assert_eq!(
            &f[38..42],
            &[10, 0, 0, 200],
            "target address = sender: an announcement"
        );
    }
}
