//! The etcd key layout of one cluster (`docs/patroni-compat.md` §1.1).

/// Key names of one cluster, all below `/<namespace>/<scope>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Builds the layout; duplicate slashes collapse, so `/service/` and `service` are the same
    /// namespace as in Patroni.
    pub fn new(namespace: &str, scope: &str) -> Self {
        let joined = format!("/{namespace}/{scope}/");
        let mut prefix = String::with_capacity(joined.len());
        for c in joined.chars() {
            if c == '/' && prefix.ends_with('/') {
                continue;
            }
            prefix.push(c);
        }
        Keys { prefix }
    }

    /// The prefix every key starts with, ending in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The exclusive end of a range read over [`Keys::prefix`]: the prefix with its last byte
    /// incremented (`/` + 1 = `0`).
    pub fn range_end(&self) -> Vec<u8> {
        let mut end = self.prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    }

    pub fn leader(&self) -> String {
        self.key("leader")
    }
    pub fn member(&self, name: &str) -> String {
        self.key(&format!("members/{name}"))
    }
    pub fn members_prefix(&self) -> String {
        self.key("members/")
    }
    pub fn initialize(&self) -> String {
        self.key("initialize")
    }
    pub fn config(&self) -> String {
        self.key("config")
    }
    pub fn history(&self) -> String {
        self.key("history")
    }
    pub fn status(&self) -> String {
        self.key("status")
    }
    pub fn sync(&self) -> String {
        self.key("sync")
    }
    pub fn failover(&self) -> String {
        self.key("failover")
    }
    pub fn failsafe(&self) -> String {
        self.key("failsafe")
    }
    /// pgvigil's leader heartbeat (not a Patroni key; Patroni ignores it): see the
    /// `pgvigil-lock` crate.
    pub fn heartbeat(&self) -> String {
        self.key("heartbeat")
    }

    fn key(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }

    /// The part of `key` below the prefix, if `key` belongs to this cluster.
    pub fn relative<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slashes_collapse_like_patroni() {
        assert_eq!(Keys::new("/service/", "batman").prefix(), "/service/batman/");
        assert_eq!(Keys::new("service", "batman").prefix(), "/service/batman/");
        assert_eq!(Keys::new("/service", "batman").leader(), "/service/batman/leader");
        assert_eq!(
            Keys::new("/service", "batman").member("pg1"),
            "/service/batman/members/pg1"
        );
    }

    #[test]
    fn range_end_increments_last_byte() {
        assert_eq!(Keys::new("service", "b").range_end(), b"/service/b0".to_vec());
    }
}
