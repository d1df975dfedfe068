//! Error type and the classification of etcd client errors.

/// A failed DCS operation.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DcsError {
    /// The DCS could not be reached or has no quorum: timeouts, connection errors, no leader.
    /// For a write, the outcome is unknown.
    #[error("DCS unavailable: {0}")]
    Unavailable(String),
    /// Anything else (authentication, invalid request, unexpected answer).
    #[error("DCS error: {0}")]
    Other(String),
}

impl DcsError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DcsError::Unavailable(_))
    }

    pub(crate) fn context(self, what: &str) -> DcsError {
        match self {
            DcsError::Unavailable(m) => DcsError::Unavailable(format!("{what}: {m}")),
            DcsError::Other(m) => DcsError::Other(format!("{what}: {m}")),
        }
    }

    /// etcd answered that the lease we used does not exist (it expired or was revoked).
    pub(crate) fn is_lease_not_found(&self) -> bool {
        matches!(self, DcsError::Other(m) if m.contains("lease not found"))
    }
}

// gRPC status codes (stable numbers of the gRPC spec).
const CANCELLED: i32 = 1;
const UNKNOWN: i32 = 2;
const DEADLINE_EXCEEDED: i32 = 4;
const UNAVAILABLE: i32 = 14;

impl From<etcd_client::Error> for DcsError {
    fn from(e: etcd_client::Error) -> DcsError {
        use etcd_client::Error as E;
        let text = e.to_string();
        let unavailable = match &e {
            E::GRpcStatus(status) => {
                let code: i32 = status.code().into();
                match code {
                    CANCELLED | DEADLINE_EXCEEDED | UNAVAILABLE => true,
                    // Transport failures surfaced by tonic without a proper code.
                    UNKNOWN => is_transient_text(status.message()),
                    _ => false,
                }
            }
            E::TransportError(_) | E::IoError(_) => true,
            // The stream closed before answering.
            E::WatchError(_) => true,
            E::LeaseKeepAliveError(m) => !m.contains("lease not found"),
            _ => false,
        };
        if unavailable {
            DcsError::Unavailable(text)
        } else {
            DcsError::Other(text)
        }
    }
}

fn is_transient_text(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "transport",
        "connect",
        "connection",
        "timed out",
        "timeout",
        "no leader",
        "leader changed",
        "broken pipe",
        "reset",
        "h2 protocol",
        "stream",
    ]
    .iter()
    .any(|needle| m.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_not_found_is_not_retryable() {
        let e = DcsError::from(etcd_client::Error::LeaseKeepAliveError("lease not found".into()));
        assert!(e.is_lease_not_found() && !e.is_unavailable());
        let e = DcsError::from(etcd_client::Error::WatchError("closed".into()));
        assert!(e.is_unavailable());
    }
}
