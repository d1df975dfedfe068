//! Access control of protected endpoints (`docs/patroni-compat.md` §2.1): source address allowlist
//! first (403), then HTTP Basic authentication (401).

use std::net::IpAddr;

use pgvigil_api::ClusterView;

/// `restapi.allowlist`, `restapi.allowlist_include_members` and `restapi.authentication`.
#[derive(Clone, Debug, Default)]
pub struct AccessControl {
    /// `(username, password)` required on protected endpoints, if set.
    pub authentication: Option<(String, String)>,
    /// IPs, CIDR networks or host names (resolved on use) allowed to call protected endpoints.
    /// Empty = any address.
    pub allowlist: Vec<String>,
    /// Also allow the addresses of the members' `api_url` hosts (from the cached DCS view).
    pub allowlist_include_members: bool,
}

/// Why a protected request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// 403 `Access is denied`.
    Forbidden,
    /// 401 with `WWW-Authenticate: Basic realm="Patroni"` and this body.
    Unauthorized(&'static str),
}

impl Denied {
    pub fn status(self) -> u16 {
        match self {
            Denied::Forbidden => 403,
            Denied::Unauthorized(_) => 401,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Denied::Forbidden => "Access is denied",
            Denied::Unauthorized(reason) => reason,
        }
    }
}

impl AccessControl {
    /// Checks a request to a protected endpoint from `peer` carrying the `Authorization` header
    /// `authorization`. With `allowlist_include_members`, `cluster` provides the member addresses
    /// (none when the view is stale); `check_members = false` skips that part, as `POST
    /// /failsafe` does.
    pub async fn check(
        &self,
        peer: IpAddr,
        authorization: Option<&str>,
        cluster: Option<&ClusterView>,
        check_members: bool,
    ) -> Result<(), Denied> {
        let members = check_members && self.allowlist_include_members;
        let cluster = if members { cluster } else { None };
        if (!self.allowlist.is_empty() || members) && !self.allowed(peer, cluster).await {
            return Err(Denied::Forbidden);
        }
        self.check_auth(authorization)
    }

    /// The Basic authentication part alone.
    pub fn check_auth(&self, authorization: Option<&str>) -> Result<(), Denied> {
        let Some((user, password)) = &self.authentication else {
            return Ok(());
        };
        let Some(header) = authorization else {
            return Err(Denied::Unauthorized("no auth header received"));
        };
        let expected = base64(format!("{user}:{password}").as_bytes());
        match header.strip_prefix("Basic ") {
            Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(Denied::Unauthorized("not authenticated")),
        }
    }

    async fn allowed(&self, peer: IpAddr, cluster: Option<&ClusterView>) -> bool {
        let peer = peer.to_canonical();
        for entry in &self.allowlist {
            for net in resolve_entry(entry).await {
                if net.contains(peer) {
                    return true;
                }
            }
        }
        if let Some(cluster) = cluster {
            for member in &cluster.members {
                let Some((host, port)) = url_host_port(&member.data.api_url) else {
                    continue;
                };
                for ip in resolve(&host, port).await {
                    if ip == peer {
                        return true;
                    }
                }
            }
        }
        false
    }
}

/// An IP network: address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (host bits may be set, like Python's
    /// `ip_network(v, strict=False)`).
    pub fn parse(text: &str) -> Option<IpNet> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One allowlist entry as networks: a CIDR, an address, or a host name resolved now.
async fn resolve_entry(entry: &str) -> Vec<IpNet> {
    if entry.contains('/') {
        let net = IpNet::parse(entry);
        if net.is_none() {
            tracing::error!("Invalid value {entry:?} in the allowlist");
        }
        return net.into_iter().collect();
    }
    if let Some(net) = IpNet::parse(entry) {
        return vec![net];
    }
    resolve(entry, 8080)
        .await
        .into_iter()
        .filter_map(|ip| IpNet::parse(&ip.to_string()))
        .collect()
}

async fn resolve(host: &str, port: u16) -> Vec<IpAddr> {
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => addrs.map(|a| a.ip().to_canonical()).collect(),
        Err(e) => {
            tracing::error!("Failed to resolve {host}: {e}");
            Vec::new()
        }
    }
}

/// Host and port of an `http(s)://host[:port]/...` URL (IPv6 hosts bracketed).
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let default_port = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6.split_once(']')?;
        let port = match port.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None if !authority.is_empty() => Some((authority.to_string(), default_port)),
        None => None,
    }
}

/// Compares without an early exit on the first difference (the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Standard base64 with padding (what `Authorization: Basic` carries).
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn base64_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn networks() {
        let net = IpNet::parse("10.1.2.3/8").unwrap();
        assert!(net.contains(ip("10.200.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::1")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(IpNet::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(IpNet::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert_eq!(IpNet::parse("10.0.0.0/33"), None);
        assert_eq!(IpNet::parse("nonsense/8"), None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            url_host_port("http://10.0.0.1:8008/patroni"),
            Some(("10.0.0.1".into(), 8008))
        );
        assert_eq!(url_host_port("https://h/patroni"), Some(("h".into(), 443)));
        assert_eq!(url_host_port("http://[::1]:8008/x"), Some(("::1".into(), 8008)));
        assert_eq!(url_host_port("nonsense"), None);
    }

    #[tokio::test]
    async fn order_allowlist_then_auth() {
        let access = AccessControl {
            authentication: Some(("u".into(), "p".into())),
            allowlist: vec!["127.0.0.0/8".into(), "bad/x".into()],
            allowlist_include_members: false,
        };
        let good = format!("Basic {}", base64(b"u:p"));
        assert_eq!(
            access.check(ip("10.0.0.1"), Some(&good), None, true).await,
            Err(Denied::Forbidden)
        );
        assert_eq!(
            access.check(ip("127.0.0.1"), None, None, true).await,
            Err(Denied::Unauthorized("no auth header received"))
        );
        assert_eq!(
            access
                .check(ip("127.0.0.1"), Some("Basic eDp5"), None, true)
                .await,
            Err(Denied::Unauthorized("not authenticated"))
        );
        assert_eq!(
            access.check(ip("127.0.0.1"), Some("Bearer x"), None, true).await,
            Err(Denied::Unauthorized("not authenticated"))
        );
        assert_eq!(
            access
                .check(ip("::ffff:127.0.0.1"), Some(&good), None, true)
                .await,
            Ok(())
        );
        assert_eq!(
            AccessControl::default()
                .check(ip("1.2.3.4"), None, None, true)
                .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn members_are_allowed_when_asked() {
        let cluster: ClusterView = ClusterView {
            members: vec![pgvigil_api::Member {
                name: "pg2".into(),
                data: pgvigil_api::MemberData {
                    api_url: "http://10.9.9.9:8008/patroni".into(),
                    ..Default::default()
                },
                lease: 0,
            }],
            ..Default::default()
        };
        let access = AccessControl {
            allowlist_include_members: true,
            ..Default::default()
        };
        assert_eq!(
            access.check(ip("10.9.9.9"), None, Some(&cluster), true).await,
            Ok(())
        );
        assert_eq!(
            access.check(ip("10.9.9.8"), None, Some(&cluster), true).await,
            Err(Denied::Forbidden)
        );
        // Without a view nobody is a member (Patroni denies too).
        assert_eq!(
            access.check(ip("10.9.9.9"), None, None, true).await,
            Err(Denied::Forbidden)
        );
        // POST /failsafe skips the member check.
        assert_eq!(access.check(ip("10.9.9.8"), None, None, false).await, Ok(()));
    }
}
