//! A minimal blocking HTTP/1.0 client for tests: enough to call the agents' REST APIs without
//! pulling an HTTP stack into every test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

thread_local! {
    /// When set, every request of this thread goes over HTTPS with this configuration (a test
    /// cluster whose REST APIs serve TLS sets it on the test's thread; per thread, so that
    /// tests sharing a process under `cargo test` do not see each other's).
    static CLIENT_TLS: std::cell::RefCell<Option<Arc<rustls::ClientConfig>>> = const { std::cell::RefCell::new(None) };
}

/// Makes every following request of this thread use HTTPS with `config` (`None`: plain HTTP).
pub fn use_tls(config: Option<rustls::ClientConfig>) {
    CLIENT_TLS.with(|c| *c.borrow_mut() = config.map(Arc::new));
}

/// Status code and body of one request.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.body)?)
    }
}

/// Sends `method path` to `127.0.0.1:port` with an optional JSON body and basic auth.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: Option<(&str, &str)>,
) -> anyhow::Result<Response> {
    request_to(SocketAddr::from(([127, 0, 0, 1], port)), method, path, body, auth)
}

/// [`request`] to any address (e.g. a host of a [`crate::netns::NetLab`]).
pub fn request_to(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: Option<(&str, &str)>,
) -> anyhow::Result<Response> {
    request_within(addr, method, path, body, auth, Duration::from_secs(5))
}

/// [`request_to`] with a longer wait for the answer, for calls that answer when an operation is
/// over (`POST /switchover` polls the cluster for up to `2 * max(10, loop_wait)` seconds).
pub fn request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let tcp = TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let tls = CLIENT_TLS.with(|c| c.borrow().clone());
    let mut stream: Box<dyn ReadWrite> = match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::from(addr.ip());
            let conn = rustls::ClientConnection::new(config, name)?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
        None => Box::new(tcp),
    };
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some((user, password)) = auth {
        head.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64(&format!("{user}:{password}"))
        ));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body.as_bytes())?;
    }
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // Servers that close without TLS close_notify: the answer is complete all the same.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status line in {head:?}"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

pub fn get(port: u16, path: &str) -> anyhow::Result<Response> {
    request(port, "GET", path, None, None)
}

/// `GET path` from `addr`.
pub fn get_from(addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    request_to(addr, "GET", path, None, None)
}

fn base64(input: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = input.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64("user:pass"), "dXNlcjpwYXNz");
        assert_eq!(super::base64("a"), "YQ==");
        assert_eq!(super::base64("ab"), "YWI=");
    }
}
