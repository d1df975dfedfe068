//! Reading the `GET /cluster` document, the same way for both test clusters
//! ([`crate::cluster::TestCluster`] on loopback, [`crate::netcluster::NetCluster`] in the lab).

use serde_json::Value;

/// The name of the member the document calls leader, when it is `running`.
pub(crate) fn running_leader(doc: &Value) -> Option<&str> {
    let members = doc.get("members")?.as_array()?;
    members
        .iter()
        .find(|m| m["role"] == "leader" && m["state"] == "running")?["name"]
        .as_str()
}

/// The running leader's name once at least `want` members are listed and every one but the
/// leader streams.
pub(crate) fn healthy_leader(doc: &Value, want: usize) -> Option<&str> {
    let members = doc.get("members")?.as_array()?;
    let streaming = members
        .iter()
        .filter(|m| m["role"] != "leader" && m["state"] == "streaming")
        .count();
    (members.len() >= want && streaming + 1 >= want).then(|| running_leader(doc))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(states: &[(&str, &str, &str)]) -> Value {
        let members: Vec<Value> = states
            .iter()
            .map(|(name, role, state)| json!({"name": name, "role": role, "state": state}))
            .collect();
        json!({ "members": members })
    }

    #[test]
    fn a_leader_counts_only_when_running() {
        let d = doc(&[("a", "leader", "starting"), ("b", "replica", "streaming")]);
        assert_eq!(running_leader(&d), None);
        let d = doc(&[("a", "leader", "running"), ("b", "replica", "streaming")]);
        assert_eq!(running_leader(&d), Some("a"));
    }

    #[test]
    fn healthy_needs_every_other_member_streaming() {
        let up = doc(&[
            ("a", "leader", "running"),
            ("b", "replica", "streaming"),
            ("c", "replica", "stopped"),
        ]);
        assert_eq!(healthy_leader(&up, 3), None);
        assert_eq!(healthy_leader(&up, 2), Some("a"));
        let missing = doc(&[("a", "leader", "running"), ("b", "replica", "streaming")]);
        assert_eq!(healthy_leader(&missing, 3), None, "a member is not listed");
    }
}
