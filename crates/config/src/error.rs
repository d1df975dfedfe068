//! The one error type of this crate. Every message names where the problem is (a file, a
//! directory or an environment variable), the dotted key path, and what is wrong, so that an
//! operator can fix the configuration without reading our source.

/// A configuration that cannot be used. `Display` gives one line, e.g.
/// `/etc/pgvigil.yml: postgresql.listen: missing (required)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file or directory could not be read at all.
    #[error("{origin}: cannot read: {message}")]
    Read {
        /// The path that failed.
        origin: String,
        /// The I/O error text.
        message: String,
    },
    /// The text is not valid YAML (or not UTF-8).
    #[error("{origin}: line {line} column {column}: YAML syntax error: {message}")]
    Syntax {
        /// The file or `environment PATRONI_...` the text came from.
        origin: String,
        /// 1-based line of the error (0 when unknown).
        line: u64,
        /// 1-based column of the error (0 when unknown).
        column: u64,
        /// What the parser complained about.
        message: String,
    },
    /// The document is not a mapping of keys (e.g. a list or a bare string at the top level).
    #[error("{origin}: the configuration must be a YAML mapping (key: value ...), found {found}")]
    NotAMapping {
        /// The file or `environment PATRONI_CONFIGURATION`.
        origin: String,
        /// What was found instead.
        found: String,
    },
    /// A key is missing, has the wrong type, or has a value that is not allowed.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// The file, directory or `environment PATRONI_...` that supplied (or should supply) the key.
        origin: String,
        /// Dotted key path, e.g. `postgresql.authentication.replication.username`.
        key: String,
        /// What is wrong, e.g. `missing (required)` or `expected an integer, found "abc"`.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key path the error is about, if it is about a key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Where the offending text came from (path or `environment PATRONI_...`).
    pub fn origin(&self) -> &str {
        match self {
            ConfigError::Read { origin, .. }
            | ConfigError::Syntax { origin, .. }
            | ConfigError::NotAMapping { origin, .. }
            | ConfigError::Invalid { origin, .. } => origin,
        }
    }
}
