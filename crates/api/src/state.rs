//! PostgreSQL states and member roles as Patroni spells them (`docs/patroni-compat.md` §4.15).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The state of the local PostgreSQL as reported in member keys, REST and `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PgState {
    InitializingNewCluster,
    InitdbFailed,
    RunningCustomBootstrapScript,
    CustomBootstrapFailed,
    CreatingReplica,
    Running,
    Starting,
    StartingAfterCustomBootstrap,
    StartFailed,
    Restarting,
    RestartFailed,
    Stopping,
    Stopped,
    StopFailed,
    Crashed,
    /// REST only: PostgreSQL claims to run but the status query failed.
    Unknown,
}

const PG_STATES: [(PgState, &str); 16] = [
    (PgState::InitializingNewCluster, "initializing new cluster"),
    (PgState::InitdbFailed, "initdb failed"),
    (
        PgState::RunningCustomBootstrapScript,
        "running custom bootstrap script",
    ),
    (PgState::CustomBootstrapFailed, "custom bootstrap failed"),
    (PgState::CreatingReplica, "creating replica"),
    (PgState::Running, "running"),
    (PgState::Starting, "starting"),
    (
        PgState::StartingAfterCustomBootstrap,
        "starting after custom bootstrap",
    ),
    (PgState::StartFailed, "start failed"),
    (PgState::Restarting, "restarting"),
    (PgState::RestartFailed, "restart failed"),
    (PgState::Stopping, "stopping"),
    (PgState::Stopped, "stopped"),
    (PgState::StopFailed, "stop failed"),
    (PgState::Crashed, "crashed"),
    (PgState::Unknown, "unknown"),
];

impl PgState {
    pub fn as_str(self) -> &'static str {
        PG_STATES
            .iter()
            .find(|(s, _)| *s == self)
            .map(|(_, n)| *n)
            .unwrap_or("unknown")
    }

    /// The numeric index `patroni_postgres_state` exports (`unknown` has none in Patroni; we use
    /// 15, one past the last).
    pub fn metric_index(self) -> usize {
        PG_STATES.iter().position(|(s, _)| *s == self).unwrap_or(15)
    }

    pub fn parse(text: &str) -> Option<PgState> {
        PG_STATES.iter().find(|(_, n)| *n == text).map(|(s, _)| *s)
    }
}

impl std::fmt::Display for PgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PgState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PgState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(PgState::parse(&text).unwrap_or(PgState::Unknown))
    }
}

/// The local role of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
    StandbyLeader,
    Demoted,
    Uninitialized,
    Promoted,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::StandbyLeader => "standby_leader",
            Role::Demoted => "demoted",
            Role::Uninitialized => "uninitialized",
            Role::Promoted => "promoted",
        }
    }

    /// Parses a role; the legacy `master` reads as `primary`.
    pub fn parse(text: &str) -> Option<Role> {
        Some(match text {
            "primary" | "master" => Role::Primary,
            "replica" => Role::Replica,
            "standby_leader" => Role::StandbyLeader,
            "demoted" => Role::Demoted,
            "uninitialized" => Role::Uninitialized,
            "promoted" => Role::Promoted,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Role::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("unknown role {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_index() {
        for (state, name) in PG_STATES {
            assert_eq!(PgState::parse(name), Some(state));
            assert_eq!(state.as_str(), name);
        }
        assert_eq!(PgState::Running.metric_index(), 5);
        assert_eq!(PgState::Crashed.metric_index(), 14);
    }

    #[test]
    fn master_is_primary() {
        assert_eq!(Role::parse("master"), Some(Role::Primary));
        assert_eq!(
            serde_json::to_string(&Role::StandbyLeader).unwrap(),
            "\"standby_leader\""
        );
    }
}
