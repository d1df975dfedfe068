//! The small HTTP client for peer-to-peer calls (`docs/patroni-compat.md` §2.7): the leader race
//! and switchover feasibility (`GET <api_url>`), and the duplicate-name guard (`GET /liveness`).

use std::time::Duration;

use pgvigil_api::rest::StatusDocument;
use serde_json::Value;

/// Client for other members' REST APIs. Cheap to clone; keeps a connection pool.
#[derive(Clone, Debug)]
pub struct PeerClient {
    http: reqwest::Client,
    auth: Option<(String, String)>,
}

impl PeerClient {
    /// `auth` is sent as HTTP Basic credentials (`ctl.authentication`, else
    /// `restapi.authentication`). Proxy environment variables are ignored: cluster traffic must
    /// go straight to the peers.
    pub fn new(auth: Option<(String, String)>) -> Self {
        let tls = pgvigil_tls::client_config(&pgvigil_tls::ClientSettings::default())
            .expect("a configuration without files cannot fail");
        Self::with_tls(auth, tls)
    }

    /// With the client side of `ctl` ([`crate::tls::client_config`]) for `https://` peers.
    pub fn with_tls(auth: Option<(String, String)>, tls: rustls::ClientConfig) -> Self {
        let http = crate::tls::http_client(tls, Duration::from_secs(2));
        PeerClient { http, auth }
    }

    /// The client the agent uses: `ctl` (else `restapi`) credentials and `ctl` TLS settings.
    /// The TLS files were checked at start-up; should they have become unusable since, the
    /// problem is logged and peers are called without a client certificate.
    pub fn for_config(cfg: &pgvigil_config::Config) -> Self {
        let auth = cfg
            .ctl
            .authentication
            .clone()
            .or_else(|| cfg.restapi.authentication.clone())
            .map(|c| (c.username, c.password));
        match crate::tls::client_config(&cfg.ctl, cfg.ctl.insecure) {
            Ok(tls) => Self::with_tls(auth, tls),
            Err(e) => {
                tracing::error!("calling other members without the ctl TLS settings: {e}");
                Self::new(auth)
            }
        }
    }

    fn get(&self, url: &str, timeout: Duration) -> reqwest::RequestBuilder {
        let request = self.http.get(url).timeout(timeout);
        match &self.auth {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        }
    }

    /// `GET <api_url>` (the stored URL, normally `.../patroni`), no retry. Any HTTP status with a
    /// JSON object body counts as an answer; a timeout, a connection error or a non-JSON body is
    /// `None` (unreachable).
    pub async fn fetch_status(&self, api_url: &str, timeout: Duration) -> Option<StatusDocument> {
        let response = match self.get(api_url, timeout).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("request to {api_url} failed: {e}");
                return None;
            }
        };
        // The request timeout also bounds reading the body.
        let body = response.bytes().await.ok()?;
        parse_status(&body)
    }

    /// `POST <base of api_url>/failsafe` with `body`, no retry: `Some((status, lsn header))` for
    /// any HTTP answer, `None` when nothing answered within `timeout`.
    pub async fn post_failsafe(
        &self,
        api_url: &str,
        body: &Value,
        timeout: Duration,
    ) -> Option<(u16, Option<u64>)> {
        let url = format!("{}/failsafe", base_url(api_url));
        let mut request = self.http.post(&url).timeout(timeout).json(body);
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        match request.send().await {
            Ok(response) => {
                let lsn = response
                    .headers()
                    .get("lsn")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                Some((response.status().as_u16(), lsn))
            }
            Err(e) => {
                tracing::debug!("request to {url} failed: {e}");
                None
            }
        }
    }

    /// `GET <base of api_url>/liveness`: `Some(code)` for any HTTP answer (even 503), `None` when
    /// nothing answers.
    pub async fn liveness(&self, api_url: &str, timeout: Duration) -> Option<u16> {
        let url = format!("{}/liveness", base_url(api_url));
        match self.get(&url, timeout).send().await {
            Ok(response) => Some(response.status().as_u16()),
            Err(e) => {
                tracing::debug!("request to {url} failed: {e}");
                None
            }
        }
    }
}

/// `scheme://authority` of a URL (the path, query and fragment removed).
pub fn base_url(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find(['/', '?', '#']) {
        Some(end) => &url[..start + end],
        None => url,
    }
}

/// Parses a peer's status document, tolerating the absence of the fields our type requires
/// (older or foreign implementations).
pub fn parse_status(body: &[u8]) -> Option<StatusDocument> {
    let Value::Object(mut doc) = serde_json::from_slice::<Value>(body).ok()? else {
        return None;
    };
    for key in ["state", "role"] {
        if !doc.get(key).is_some_and(Value::is_string) {
            doc.insert(key.into(), Value::from(""));
        }
    }
    let patroni = doc
        .entry("patroni")
        .or_insert_with(|| Value::Object(Default::default()));
    if !patroni.is_object() {
        *patroni = Value::Object(Default::default());
    }
    if let Value::Object(p) = patroni {
        for key in ["version", "scope", "name"] {
            if !p.get(key).is_some_and(Value::is_string) {
                p.insert(key.into(), Value::from(""));
            }
        }
    }
    match serde_json::from_value(Value::Object(doc)) {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::debug!("unexpected status document: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases() {
        assert_eq!(base_url("http://10.0.0.1:8008/patroni"), "http://10.0.0.1:8008");
        assert_eq!(base_url("https://[::1]:8008"), "https://[::1]:8008");
        assert_eq!(base_url("http://h:1?x"), "http://h:1");
    }

    #[test]
    fn tolerant_parse() {
        let s =
            parse_status(br#"{"state":"running","role":"replica","xlog":{"received_location":5}}"#).unwrap();
        assert_eq!(s.role, "replica");
        assert_eq!(s.wal_position(), 5);
        assert_eq!(s.patroni.version, "");
        assert!(parse_status(b"<html>").is_none());
        assert!(parse_status(b"[1]").is_none());
    }
}
