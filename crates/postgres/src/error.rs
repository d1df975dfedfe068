//! The one error type of this crate. Every message names the command, file or SQL operation that
//! failed and, for external commands, the tail of what they printed on stderr.

use std::path::PathBuf;
use std::time::Duration;

/// SQLSTATE of `the database system is starting up` / `... is shutting down` /
/// `... is not accepting connections` (`cannot_connect_now`).
const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE of a statement cancelled by `statement_timeout` or a cancel request.
const QUERY_CANCELED: &str = "57014";

#[derive(thiserror::Error, Debug)]
pub enum PgError {
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An external program could not be started at all (missing binary, permissions).
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    /// An external program exited unsuccessfully.
    #[error("{cmd} failed ({status}): {stderr}")]
    CommandFailed {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// An external program ran out of time; its process group was killed.
    #[error("{cmd} did not finish within {timeout:?} and was killed; stderr: {stderr}")]
    CommandTimeout {
        cmd: String,
        timeout: Duration,
        stderr: String,
    },
    /// Output of a tool or a file could not be understood.
    #[error("cannot parse {what}: {detail}")]
    Parse { what: String, detail: String },
    /// A SQL operation failed (connection, authentication or server error).
    #[error("{op}: {source}")]
    Sql {
        op: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// An operation (SQL or a wait) did not finish in time. SQL is cancelled server-side.
    #[error("{op} timed out after {timeout:?}")]
    Timeout { op: String, timeout: Duration },
    /// The operation needs a running postmaster and there is none.
    #[error("PostgreSQL is not running (data directory {})", .0.display())]
    NotRunning(PathBuf),
    /// The operation needs PostgreSQL to be stopped (pg_rewind, basebackup).
    #[error("PostgreSQL is running (pid {pid}); {op} needs it stopped")]
    StillRunning { op: &'static str, pid: i32 },
    /// The postmaster exited (or never came up) while we waited for it to accept connections.
    #[error("postgres failed to start: {0}")]
    StartFailed(String),
    /// The postmaster is alive but did not accept connections within the timeout. It is left
    /// running (a replica may need long to reach consistency); the caller decides what to do.
    #[error("postgres (pid {pid}) is still starting after {timeout:?}")]
    StartTimeout { pid: i32, timeout: Duration },
    /// The postmaster survived the stop signals, including SIGKILL.
    #[error("postgres (pid {pid}) did not stop: {detail}")]
    StopFailed { pid: i32, detail: String },
    /// A signal could not be delivered.
    #[error("cannot send {signal} to pid {pid}: {source}")]
    Signal {
        signal: &'static str,
        pid: i32,
        #[source]
        source: nix::Error,
    },
    /// The caller passed something this crate refuses to write (bad GUC name, newline in a
    /// pg_hba line, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl PgError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PgError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn sql(op: impl Into<String>, source: tokio_postgres::Error) -> Self {
        PgError::Sql {
            op: op.into(),
            source,
        }
    }

    /// The SQLSTATE code of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Sql { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// The server answered but refuses connections (starting up, shutting down, in crash
    /// recovery): Patroni reports such a node as `starting` rather than as a communication error.
    pub fn is_cannot_connect_now(&self) -> bool {
        self.sqlstate() == Some(CANNOT_CONNECT_NOW)
    }

    /// A timeout: ours (`Timeout`, `CommandTimeout`) or the server's `statement_timeout`.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            PgError::Timeout { .. } | PgError::CommandTimeout { .. } | PgError::StartTimeout { .. }
        ) || self.sqlstate() == Some(QUERY_CANCELED)
    }
}

/// The last `max` characters of a tool's output, trimmed, on a char boundary.
pub(crate) fn tail(text: &str, max: usize) -> String {
    let text = text.trim();
    let count = text.chars().count();
    if count <= max {
        return text.to_string();
    }
    let skip = count - max;
    let rest: String = text.chars().skip(skip).collect();
    format!("...{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("  short\n", 10), "short");
        assert_eq!(tail("0123456789abc", 3), "...abc");
        assert_eq!(tail("ééééé", 2), "...éé");
    }
}
