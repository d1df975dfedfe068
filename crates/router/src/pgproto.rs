//! Just enough of the PostgreSQL wire protocol to refuse a connection properly: answer the
//! client's SSLRequest/GSSENCRequest with `N` (no encryption), read its StartupMessage, and send
//! a FATAL ErrorResponse that libpq shows as the connection error, e.g.
//! `FATAL:  pgvigil router: no primary is available for cluster demo`.
//!
//! Connections that are routed are not parsed at all: the router copies bytes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;
/// Longer startup packets are not PostgreSQL clients (libpq's limit is 10000).
const MAX_STARTUP_LEN: u32 = 10_000;

/// SQLSTATE 57P03 `cannot_connect_now`: nothing to route to right now; clients and poolers
/// treat it as retryable.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE 08006 `connection_failure`: the chosen server did not accept the connection.
pub const CONNECTION_FAILURE: &str = "08006";

/// A refusal sent to the client instead of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// Encodes a FATAL ErrorResponse (`E` message) with the given fields.
pub fn error_response(refusal: &Refusal) -> Vec<u8> {
    let mut body = Vec::with_capacity(128 + refusal.message.len());
    let mut field = |tag: u8, value: &str| {
        body.push(tag);
        // A NUL inside a field would end it early.
        body.extend(value.bytes().filter(|b| *b != 0));
        body.push(0);
    };
    field(b'S', "FATAL");
    field(b'V', "FATAL");
    field(b'C', refusal.sqlstate);
    field(b'M', &refusal.message);
    if let Some(d) = &refusal.detail {
        field(b'D', d);
    }
    if let Some(h) = &refusal.hint {
        field(b'H', h);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend(u32::try_from(body.len() + 4).unwrap_or(u32::MAX).to_be_bytes());
    out.extend(body);
    out
}

/// What the client opened the conversation with.
#[derive(Debug, PartialEq, Eq)]
pub enum Opening {
    /// A StartupMessage (or something we do not understand): answer with the error.
    Startup,
    /// A CancelRequest: it expects no answer.
    Cancel,
    /// The client sent nothing usable in time, or closed.
    Nothing,
}

/// Reads the client's first packets: declines SSL and GSS encryption with `N` until the
/// StartupMessage (or a CancelRequest) arrives. Bounded by `timeout` overall.
pub async fn read_opening<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, timeout: Duration) -> Opening {
    let work = async {
        for _ in 0..3 {
            let Ok(len) = stream.read_u32().await else {
                return Opening::Nothing;
            };
            if !(8..=MAX_STARTUP_LEN).contains(&len) {
                return Opening::Startup;
            }
            let Ok(code) = stream.read_u32().await else {
                return Opening::Nothing;
            };
            let mut rest = vec![0u8; (len - 8) as usize];
            if stream.read_exact(&mut rest).await.is_err() {
                return Opening::Nothing;
            }
            match code {
                SSL_REQUEST | GSSENC_REQUEST => {
                    if stream.write_all(b"N").await.is_err() {
                        return Opening::Nothing;
                    }
                }
                CANCEL_REQUEST => return Opening::Cancel,
                _ => return Opening::Startup,
            }
        }
        Opening::Startup
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Opening::Nothing)
}

/// Refuses the connection the way a PostgreSQL server does: after the client's opening, a FATAL
/// ErrorResponse, then close. Errors (a client that went away) are ignored.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, refusal: &Refusal, timeout: Duration) {
    match read_opening(stream, timeout).await {
        Opening::Cancel => {}
        Opening::Startup | Opening::Nothing => {
            let bytes = error_response(refusal);
            let _ = tokio::time::timeout(timeout, async {
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                stream.shutdown().await
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal() -> Refusal {
        Refusal {
            sqlstate: CANNOT_CONNECT_NOW,
            message: "pgvigil router: no primary".into(),
            detail: Some("d".into()),
            hint: None,
        }
    }

    #[test]
    fn error_response_layout() {
        let bytes = error_response(&refusal());
        assert_eq!(bytes[0], b'E');
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 1);
        let body = &bytes[5..];
        let fields: Vec<&[u8]> = body[..body.len() - 1]
            .split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(
            fields,
            [
                &b"SFATAL"[..],
                b"VFATAL",
                b"C57P03",
                b"Mpgvigil router: no primary",
                b"Dd"
            ]
        );
        assert_eq!(*body.last().unwrap(), 0);
    }

    fn startup() -> Vec<u8> {
        let params = b"user\0postgres\0\0";
        let mut out = ((8 + params.len()) as u32).to_be_bytes().to_vec();
        out.extend(196608u32.to_be_bytes());
        out.extend(params);
        out
    }

    #[tokio::test]
    async fn ssl_is_declined_then_the_error_follows_the_startup() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move {
            refuse(&mut server, &refusal(), Duration::from_secs(5)).await;
        });
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend(SSL_REQUEST.to_be_bytes());
        client.write_all(&ssl).await.unwrap();
        assert_eq!(client.read_u8().await.unwrap(), b'N');
        client.write_all(&startup()).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, error_response(&refusal()));
        task.await.unwrap();
    }

    #[tokio::test]
    async fn cancel_requests_get_no_answer() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend(CANCEL_REQUEST.to_be_bytes());
        cancel.extend([0u8; 8]);
        client.write_all(&cancel).await.unwrap();
        assert_eq!(
            read_opening(&mut server, Duration::from_secs(5)).await,
            Opening::Cancel
        );
    }

    #[tokio::test]
    async fn a_silent_client_gets_the_error_after_the_timeout() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move {
            refuse(&mut server, &refusal(), Duration::from_millis(50)).await;
        });
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, error_response(&refusal()));
        task.await.unwrap();
    }
}
