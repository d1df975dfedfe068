//! `etcd3.srv`: finding the etcd endpoints through DNS SRV records, as Patroni's etcd client
//! does (`docs/patroni-compat.md` §1.7). The records are tried in Patroni's order,
//! `_etcd-client-ssl`, `_etcd-client`, `_etcd-ssl`, `_etcd`, then the peer records
//! `_etcd-server-ssl` and `_etcd-server`, each `._tcp.<srv>` (with `srv_suffix`, `-<suffix>`
//! after the kind); the first kind with an answer wins. Client records are the endpoints; for a
//! peer record the first member that answers `GET /members` gives the cluster's client URLs.

use std::time::Duration;

use async_trait::async_trait;

/// The record kinds in the order Patroni tries them.
const KINDS: [&str; 6] = ["-client-ssl", "-client", "-ssl", "", "-server-ssl", "-server"];

/// How long one SRV lookup may take (dnspython's default lifetime).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the records gave: `host:port` endpoints and the protocol they speak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub protocol: String,
    pub endpoints: Vec<String>,
}

/// The two kinds of question discovery asks; the agent asks DNS and etcd, tests answer
/// themselves.
#[async_trait]
pub trait Lookups: Send + Sync {
    /// The (target, port) pairs of `name`'s SRV records; none when there are none or DNS
    /// did not answer.
    async fn srv(&self, name: &str) -> Vec<(String, u16)>;
    /// The `clientURLs` of every member in an etcd peer's `GET /members` answer.
    async fn members(&self, url: &str) -> Result<Vec<String>, String>;
}

/// The record names asked, in order, with the protocol each implies and whether it names
/// peers (`-server`) rather than clients.
pub fn record_names(domain: &str, suffix: Option<&str>) -> Vec<(String, &'static str, bool)> {
    let domain = domain.trim().trim_end_matches('.');
    let suffix = suffix.map(str::trim).filter(|s| !s.is_empty());
    KINDS
        .iter()
        .map(|kind| {
            let name = match suffix {
                Some(s) => format!("_etcd{kind}-{s}._tcp.{domain}"),
                None => format!("_etcd{kind}._tcp.{domain}"),
            };
            let protocol = if kind.contains("-ssl") { "https" } else { "http" };
            (name, protocol, kind.contains("-server"))
        })
        .collect()
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `scheme://host:port[/...]` → (scheme, `host:port`).
fn split_url(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let authority = rest.split('/').next()?;
    (!authority.is_empty()).then(|| (scheme.to_ascii_lowercase(), authority.to_string()))
}

/// Asks the records in Patroni's order; `None` when no kind gave an endpoint.
pub async fn discover(lookups: &dyn Lookups, domain: &str, suffix: Option<&str>) -> Option<Found> {
    for (name, protocol, peers) in record_names(domain, suffix) {
        let mut found = Found {
            protocol: protocol.to_string(),
            endpoints: Vec::new(),
        };
        for (target, port) in lookups.srv(&name).await {
            // A target of "." says the service is not offered there.
            let host = target.trim_end_matches('.');
            if host.is_empty() {
                continue;
            }
            if !peers {
                found.endpoints.push(host_port(host, port));
                continue;
            }
            let url = format!("{protocol}://{}/members", host_port(host, port));
            match lookups.members(&url).await {
                Ok(urls) => {
                    // The members' own URLs say whether they speak TLS.
                    let clients: Vec<_> = urls.iter().filter_map(|u| split_url(u)).collect();
                    if let Some((scheme, _)) = clients.first() {
                        found.protocol = scheme.clone();
                    }
                    found.endpoints.extend(clients.into_iter().map(|(_, e)| e));
                    break;
                }
                Err(e) => tracing::warn!("etcd3.srv: GET {url}: {e}"),
            }
        }
        let mut seen = std::collections::HashSet::new();
        found.endpoints.retain(|e| seen.insert(e.clone()));
        if !found.endpoints.is_empty() {
            tracing::info!(record = %name, endpoints = ?found.endpoints, "etcd3.srv: found etcd");
            return Some(found);
        }
    }
    None
}

/// The system's resolver (`/etc/resolv.conf`) and an HTTP client that, like Patroni's, does
/// not verify a peer's certificate for `GET /members`.
pub struct SystemLookups {
    resolver: Option<hickory_resolver::TokioResolver>,
    http: reqwest::Client,
}

impl SystemLookups {
    pub fn new(timeout: Duration) -> anyhow::Result<SystemLookups> {
        let resolver = match hickory_resolver::Resolver::builder_tokio() {
            Ok(builder) => Some(builder.build()),
            Err(e) => {
                tracing::warn!("etcd3.srv: cannot read the system's resolver configuration: {e}");
                None
            }
        };
        let tls = pgvigil_tls::client_config(&pgvigil_tls::ClientSettings {
            check: Some(pgvigil_tls::ServerCheck::Nothing),
            ..Default::default()
        })?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .use_preconfigured_tls(tls)
            .build()?;
        Ok(SystemLookups { resolver, http })
    }
}

#[async_trait]
impl Lookups for SystemLookups {
    async fn srv(&self, name: &str) -> Vec<(String, u16)> {
        let Some(resolver) = &self.resolver else {
            return Vec::new();
        };
        // Absolute, as dnspython asks it: no search domains appended.
        let fqdn = format!("{name}.");
        match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.srv_lookup(fqdn.as_str())).await {
            Ok(Ok(lookup)) => lookup.iter().map(|r| (r.target().to_utf8(), r.port())).collect(),
            Ok(Err(e)) => {
                tracing::debug!("etcd3.srv: {name}: {e}");
                Vec::new()
            }
            Err(_) => {
                tracing::debug!("etcd3.srv: {name}: no answer within {LOOKUP_TIMEOUT:?}");
                Vec::new()
            }
        }
    }

    async fn members(&self, url: &str) -> Result<Vec<String>, String> {
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let members: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        // etcd answers a list of members (older versions: {"members": [...]}).
        let list = members
            .as_array()
            .or_else(|| members.get("members").and_then(|m| m.as_array()))
            .ok_or("not a member list")?;
        Ok(list
            .iter()
            .filter_map(|m| m.get("clientURLs").and_then(|u| u.as_array()))
            .flatten()
            .filter_map(|u| u.as_str().map(str::to_string))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// Answers from tables, and remembers what was asked.
    #[derive(Default)]
    struct Fake {
        records: HashMap<String, Vec<(String, u16)>>,
        members: HashMap<String, Result<Vec<String>, String>>,
        asked: Mutex<Vec<String>>,
    }

    impl Fake {
        fn record(mut self, name: &str, targets: &[(&str, u16)]) -> Self {
            let targets = targets.iter().map(|(h, p)| (h.to_string(), *p)).collect();
            self.records.insert(name.into(), targets);
            self
        }

        fn peer(mut self, url: &str, answer: Result<&[&str], &str>) -> Self {
            let answer = answer
                .map(|urls| urls.iter().map(|u| u.to_string()).collect())
                .map_err(str::to_string);
            self.members.insert(url.into(), answer);
            self
        }
    }

    #[async_trait]
    impl Lookups for Fake {
        async fn srv(&self, name: &str) -> Vec<(String, u16)> {
            self.asked.lock().unwrap().push(name.to_string());
            self.records.get(name).cloned().unwrap_or_default()
        }

        async fn members(&self, url: &str) -> Result<Vec<String>, String> {
            self.asked.lock().unwrap().push(url.to_string());
            self.members
                .get(url)
                .cloned()
                .unwrap_or(Err("connection refused".into()))
        }
    }

    fn found(protocol: &str, endpoints: &[&str]) -> Option<Found> {
        Some(Found {
            protocol: protocol.into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        })
    }

    #[tokio::test]
    async fn records_are_asked_in_patronis_order_until_one_answers() {
        let fake = Fake::default();
        assert_eq!(discover(&fake, "example.com", None).await, None);
        assert_eq!(
            *fake.asked.lock().unwrap(),
            [
                "_etcd-client-ssl._tcp.example.com",
                "_etcd-client._tcp.example.com",
                "_etcd-ssl._tcp.example.com",
                "_etcd._tcp.example.com",
                "_etcd-server-ssl._tcp.example.com",
                "_etcd-server._tcp.example.com",
            ]
        );
        let fake = Fake::default()
            .record(
                "_etcd-client._tcp.example.com",
                &[("e1.example.com.", 2379), ("e2.example.com.", 2379)],
            )
            .record("_etcd._tcp.example.com", &[("other.example.com.", 4001)]);
        assert_eq!(
            discover(&fake, "example.com.", None).await,
            found("http", &["e1.example.com:2379", "e2.example.com:2379"])
        );
        assert_eq!(fake.asked.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn ssl_records_mean_https_and_the_suffix_follows_the_kind() {
        let fake = Fake::default().record(
            "_etcd-client-ssl-pg._tcp.example.com",
            &[("e1.example.com.", 2379)],
        );
        assert_eq!(
            discover(&fake, "example.com", Some("pg")).await,
            found("https", &["e1.example.com:2379"])
        );
        let names: Vec<String> = record_names("example.com", Some("pg"))
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(names[3], "_etcd-pg._tcp.example.com");
        assert_eq!(names[5], "_etcd-server-pg._tcp.example.com");
    }

    #[tokio::test]
    async fn peer_records_give_the_client_urls_of_the_first_member_that_answers() {
        let fake = Fake::default()
            .record(
                "_etcd-server._tcp.example.com",
                &[
                    ("down.example.com.", 2380),
                    ("up.example.com.", 2380),
                    ("later.example.com.", 2380),
                ],
            )
            .peer(
                "http://up.example.com:2380/members",
                Ok(&[
                    "http://10.0.0.1:2379",
                    "http://10.0.0.2:2379",
                    "http://10.0.0.1:2379",
                ]),
            );
        assert_eq!(
            discover(&fake, "example.com", None).await,
            found("http", &["10.0.0.1:2379", "10.0.0.2:2379"])
        );
        let asked = fake.asked.lock().unwrap();
        assert!(asked.contains(&"http://down.example.com:2380/members".to_string()));
        assert!(!asked.iter().any(|a| a.contains("later")), "{asked:?}");
    }

    /// SRV answers from a table, `GET /members` from a real etcd cluster.
    struct RealPeers {
        records: Fake,
        system: SystemLookups,
    }

    #[async_trait]
    impl Lookups for RealPeers {
        async fn srv(&self, name: &str) -> Vec<(String, u16)> {
            self.records.srv(name).await
        }

        async fn members(&self, url: &str) -> Result<Vec<String>, String> {
            self.system.members(url).await
        }
    }

    #[tokio::test]
    async fn a_real_etcd_peer_gives_every_members_client_endpoint() {
        let etcd = pgvigil_testkit::EtcdCluster::start(3).unwrap();
        let peer = etcd.peer_url(1);
        let port: u16 = peer.rsplit(':').next().unwrap().parse().unwrap();
        let lookups = RealPeers {
            records: Fake::default().record("_etcd-server._tcp.example.com", &[("127.0.0.1.", port)]),
            system: SystemLookups::new(Duration::from_secs(10)).unwrap(),
        };
        let found = discover(&lookups, "example.com", None).await.unwrap();
        assert_eq!(found.protocol, "http");
        let mut endpoints = found.endpoints;
        endpoints.sort();
        let mut expected = etcd.endpoints();
        expected.sort();
        assert_eq!(endpoints, expected);
    }

    #[tokio::test]
    async fn members_speaking_tls_and_ipv6_targets_are_kept_as_such() {
        let fake = Fake::default()
            .record("_etcd-server-ssl._tcp.example.com", &[("fd00::1", 2380)])
            .peer("https://[fd00::1]:2380/members", Ok(&["https://[fd00::1]:2379"]));
        assert_eq!(
            discover(&fake, "example.com", None).await,
            found("https", &["[fd00::1]:2379"])
        );
        // A target of "." offers no service; no kind answering otherwise finds nothing.
        let fake = Fake::default().record("_etcd-client._tcp.example.com", &[(".", 2379)]);
        assert_eq!(discover(&fake, "example.com", None).await, None);
    }
}
