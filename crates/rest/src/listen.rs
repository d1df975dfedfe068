//! Binding `restapi.listen` as Patroni does (`docs/patroni-compat.md` §2.1): `*` or an empty host
//! means all addresses, which Patroni binds through `getaddrinfo(None, port, AI_PASSIVE)`,
//! preferring the IPv6 wildcard (dual stack: it takes IPv4 clients too) and falling back to
//! `0.0.0.0` on a host without IPv6. Any other host is bound as written (an address, or a name
//! resolved by the system).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpListener;

/// Where to bind, in the order to try: the first that binds is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindTarget {
    Addr(SocketAddr),
    /// A host name and port, resolved when binding.
    Name(String, u16),
}

/// The addresses to try for `listen` (`host:port`; IPv6 with or without brackets), or why it
/// is not `host:port`.
pub fn bind_targets(listen: &str) -> Result<Vec<BindTarget>, String> {
    let (host, port) = pgvigil_config::split_host_port(listen, None)
        .ok_or_else(|| format!("restapi.listen: expected <HOST>:<PORT>, found {listen:?}"))?;
    // Patroni's `split_host_port` keeps the list of hosts; the server binds the first.
    let host = host.split(',').next().unwrap_or("").trim();
    if host.is_empty() || host == "*" {
        return Ok(vec![
            BindTarget::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)),
            BindTarget::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
        ]);
    }
    Ok(vec![match host.parse::<IpAddr>() {
        Ok(ip) => BindTarget::Addr(SocketAddr::new(ip, port)),
        Err(_) => BindTarget::Name(host.to_string(), port),
    }])
}

/// Binds `restapi.listen`; an error names the key, the value and what each address answered.
pub async fn bind(listen: &str) -> Result<TcpListener, String> {
    let mut failures = Vec::new();
    for target in bind_targets(listen)? {
        let bound = match &target {
            BindTarget::Addr(addr) => TcpListener::bind(addr).await,
            BindTarget::Name(host, port) => TcpListener::bind((host.as_str(), *port)).await,
        };
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => failures.push(match target {
                BindTarget::Addr(addr) => format!("{addr}: {e}"),
                BindTarget::Name(host, port) => format!("{host}:{port}: {e}"),
            }),
        }
    }
    Err(format!(
        "restapi.listen {listen:?}: cannot listen ({})",
        failures.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> BindTarget {
        BindTarget::Addr(s.parse().unwrap())
    }

    #[test]
    fn wildcards_bind_all_addresses_ipv6_first() {
        let all = vec![addr("[::]:8008"), addr("0.0.0.0:8008")];
        assert_eq!(bind_targets("*:8008").unwrap(), all);
        assert_eq!(bind_targets(":8008").unwrap(), all);
        assert_eq!(bind_targets(" *:8008").unwrap(), all);
        assert_eq!(bind_targets("0.0.0.0:8008").unwrap(), vec![addr("0.0.0.0:8008")]);
        assert_eq!(bind_targets(":::8008").unwrap(), vec![addr("[::]:8008")]);
        assert_eq!(bind_targets("[::]:8008").unwrap(), vec![addr("[::]:8008")]);
    }

    #[test]
    fn other_hosts_are_bound_as_written() {
        assert_eq!(
            bind_targets("127.0.0.1:8008").unwrap(),
            vec![addr("127.0.0.1:8008")]
        );
        assert_eq!(bind_targets("[::1]:8009").unwrap(), vec![addr("[::1]:8009")]);
        assert_eq!(
            bind_targets("db1.example:8008").unwrap(),
            vec![BindTarget::Name("db1.example".into(), 8008)]
        );
        assert_eq!(
            bind_targets("10.0.0.5,10.0.0.6:8008").unwrap(),
            vec![addr("10.0.0.5:8008")]
        );
    }

    #[test]
    fn a_listen_without_a_port_is_refused_naming_the_key() {
        for bad in ["localhost", "*", "127.0.0.1:http", ""] {
            let e = bind_targets(bad).unwrap_err();
            assert!(e.contains("restapi.listen"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn binding_loopback_and_reporting_a_taken_port() {
        let first = bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let e = bind(&format!("127.0.0.1:{port}")).await.unwrap_err();
        assert!(
            e.contains("restapi.listen") && e.contains(&format!("127.0.0.1:{port}")),
            "{e}"
        );
    }
}
