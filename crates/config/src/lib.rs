//! pgvigil's configuration, in Patroni's format (`docs/patroni-compat.md` §3).
//!
//! * [`load`] reads the agent's local configuration: a YAML file or a directory of YAML files
//!   (or `PATRONI_CONFIGURATION`), with `PATRONI_*` environment overrides merged over it. Every
//!   problem is reported with its source and dotted key path; unknown keys are warnings, never
//!   errors, because Patroni tolerates them.
//! * [`load_client`] reads the same file for `pgvigilctl`, which needs only a few sections.
//! * [`DynamicConfig`] is the cluster-wide configuration stored in the DCS `config` key (or
//!   `bootstrap.dcs`), with Patroni's defaults and the `ttl`/`loop_wait`/`retry_timeout` rule.
//! * [`effective_parameters`] computes the GUCs written to `postgresql.conf`.
//!
//! YAML is read with YAML 1.1 booleans (`on`/`off`/`yes`/`no`), as PyYAML (hence Patroni) does.

#![warn(missing_docs)]

mod dynamic;
mod env;
mod error;
mod gucs;
mod liveness;
mod load;
mod model;
mod options;
mod parse;
mod parse_pg;
mod postgresql;
mod router;
mod slots;
mod tags;
mod vip;
mod walk;
mod yaml;

pub use dynamic::{DynamicConfig, StandbyClusterConfig, SyncMode};
pub use env::CONFIGURATION_VAR;
pub use error::ConfigError;
pub use gucs::{controlled_gucs, effective_parameters, guc_to_string};
pub use liveness::Liveness;
pub use load::{Loaded, load, load_client};
pub use model::{
    BootstrapConfig, ClientConfig, Config, Credentials, CtlConfig, Etcd3Config, LogConfig, MethodConfig,
    RestApiConfig, STRICT_SYNC_PLACEHOLDER, VerifyClient, WatchdogConfig, WatchdogMode,
};
pub use postgresql::{PgAuthentication, PgCredentials, PostgresqlConfig, RoleOverrides, split_host_port};
pub use router::{RouterConfig, parse_size};
pub use tags::Tags;
pub use vip::VipConfig;

/// A documented sample configuration (YAML) that loads without warnings.
pub fn sample_config() -> &'static str {
    include_str!("sample.yml")
}
