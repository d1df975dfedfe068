//! The local configuration (YAML file + `PATRONI_*` environment), `docs/patroni-compat.md` §3.2, §3.6,
//! §3.7. Field docs give the YAML key and the default. Parsing lives in `parse.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::postgresql::PostgresqlConfig;
use crate::router::RouterConfig;
use crate::tags::Tags;
use crate::vip::VipConfig;

/// The member name Patroni reserves for "no synchronous standby available" in strict mode.
pub const STRICT_SYNC_PLACEHOLDER: &str = "__patroni_strict_sync_replica_placeholder__";

/// The agent's local configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `scope` (required): the cluster name; also PostgreSQL's `cluster_name`.
    pub scope: String,
    /// `namespace` (default `/service`): DCS key prefix, keys live under `/<namespace>/<scope>/`.
    pub namespace: String,
    /// `name` (required): this member's unique name.
    pub name: String,
    /// `restapi` (required): the REST API server.
    pub restapi: RestApiConfig,
    /// `ctl`: client settings for pgvigilctl and for calls to other members' REST APIs.
    pub ctl: CtlConfig,
    /// `etcd3` (required): the DCS.
    pub etcd3: Etcd3Config,
    /// `bootstrap`: how a new cluster is created (used only by the node that initializes it).
    pub bootstrap: BootstrapConfig,
    /// `postgresql` (required): the managed PostgreSQL instance.
    pub postgresql: PostgresqlConfig,
    /// `tags`: member tags published in the DCS.
    pub tags: Tags,
    /// `log`: logging.
    pub log: LogConfig,
    /// `watchdog`: Linux watchdog device use.
    pub watchdog: WatchdogConfig,
    /// `thread_pool_size` (default 5, at least 5): parallelism for REST calls to other members.
    pub thread_pool_size: u64,
    /// `router`: settings of `pgvigil router` (ignored by the agent), see [`RouterConfig`].
    pub router: RouterConfig,
    /// `vip`: the floating address of `pgvigil vip` (ignored by the agent), see [`VipConfig`].
    pub vip: Option<VipConfig>,
    /// The merged local configuration (file + environment) as JSON, e.g. to detect changes on
    /// reload. Contains passwords: never log it.
    pub raw: Value,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            scope: String::new(),
            namespace: "/service".to_string(),
            name: String::new(),
            restapi: RestApiConfig::default(),
            ctl: CtlConfig::default(),
            etcd3: Etcd3Config::default(),
            bootstrap: BootstrapConfig::default(),
            postgresql: PostgresqlConfig::default(),
            tags: Tags::default(),
            log: LogConfig::default(),
            watchdog: WatchdogConfig::default(),
            thread_pool_size: 5,
            router: RouterConfig::default(),
            vip: None,
            raw: Value::Object(Map::new()),
        }
    }
}

/// A username/password pair (REST API basic auth).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `username` (required within `authentication`).
    pub username: String,
    /// `password` (required within `authentication`).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `restapi.verify_client`: whether HTTPS clients must present a certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VerifyClient {
    /// `none` (default): client certificates are not requested.
    #[default]
    None,
    /// `optional`: a certificate is verified if presented; required only for unsafe methods.
    Optional,
    /// `required`: every client must present a valid certificate.
    Required,
}

/// `restapi` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RestApiConfig {
    /// `listen` (required): `host:port` the REST API binds to (`0.0.0.0:8008`, `[::]:8008`).
    pub listen: String,
    /// `connect_address` (default: `listen`): `host:port` other members and clients use; it is
    /// published as `api_url`, so it must be reachable from the other members.
    pub connect_address: String,
    /// `authentication {username, password}`: basic auth for the mutating endpoints.
    pub authentication: Option<Credentials>,
    /// `certfile`: TLS certificate (PEM); enables HTTPS.
    pub certfile: Option<PathBuf>,
    /// `keyfile`: TLS private key (default: inside `certfile`).
    pub keyfile: Option<PathBuf>,
    /// `keyfile_password`: passphrase of `keyfile`.
    pub keyfile_password: Option<String>,
    /// `cafile`: CA bundle used to verify client certificates.
    pub cafile: Option<PathBuf>,
    /// `ciphers`: OpenSSL-style cipher list (informational for rustls).
    pub ciphers: Option<String>,
    /// `verify_client` (default `none`): `none`, `optional` or `required`.
    pub verify_client: VerifyClient,
    /// `allowlist`: hosts/networks (`10.0.0.0/8`, `host.example`) allowed to call the mutating
    /// endpoints; empty means everyone.
    pub allowlist: Vec<String>,
    /// `allowlist_include_members` (default false): also allow the hosts of all cluster members.
    pub allowlist_include_members: bool,
    /// `http_extra_headers`: headers added to every response.
    pub http_extra_headers: BTreeMap<String, String>,
    /// `https_extra_headers`: headers added to every response when serving HTTPS.
    pub https_extra_headers: BTreeMap<String, String>,
    /// `request_queue_size` (default 5, 0..=4096): listen backlog.
    pub request_queue_size: u64,
    /// `thread_pool_size`: accepted for compatibility, not used.
    pub thread_pool_size: Option<u64>,
    /// `server_tokens` (default `original`): `original`, `minimal` or `productonly` (lower-cased).
    pub server_tokens: String,
}

impl Default for RestApiConfig {
    fn default() -> Self {
        RestApiConfig {
            listen: String::new(),
            connect_address: String::new(),
            authentication: None,
            certfile: None,
            keyfile: None,
            keyfile_password: None,
            cafile: None,
            ciphers: None,
            verify_client: VerifyClient::None,
            allowlist: Vec::new(),
            allowlist_include_members: false,
            http_extra_headers: BTreeMap::new(),
            https_extra_headers: BTreeMap::new(),
            request_queue_size: 5,
            thread_pool_size: None,
            server_tokens: "original".to_string(),
        }
    }
}

impl RestApiConfig {
    /// `https` when `certfile` is set (the API is served over TLS), else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.certfile.is_some() { "https" } else { "http" }
    }

    /// The `api_url` published in our member key: `<scheme>://<connect_address>/patroni`.
    pub fn api_url(&self) -> String {
        format!("{}://{}/patroni", self.scheme(), self.connect_address)
    }
}

/// `ctl` section: how pgvigilctl and the agent itself talk to members' REST APIs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CtlConfig {
    /// `authentication {username, password}`; falls back to `restapi.authentication` (applied
    /// while loading).
    pub authentication: Option<Credentials>,
    /// `insecure` (default false): do not verify the server certificate.
    pub insecure: bool,
    /// `cacert`: CA bundle to verify members' certificates; falls back to `restapi.cafile`
    /// (applied while loading).
    pub cacert: Option<PathBuf>,
    /// `certfile`: client certificate.
    pub certfile: Option<PathBuf>,
    /// `keyfile`: client key.
    pub keyfile: Option<PathBuf>,
    /// `keyfile_password`: passphrase of `keyfile`.
    pub keyfile_password: Option<String>,
}

/// `etcd3` section.
#[derive(Clone, PartialEq)]
pub struct Etcd3Config {
    /// Endpoints as `host:port` (IPv6 as `[addr]:port`), from `url`/`proxy`, `hosts` (list or
    /// comma-separated string) or `host`, in that order of preference. Default port 2379 (or
    /// `port`). Empty when only `srv` is given (or, for pgvigilctl, when nothing is).
    pub hosts: Vec<String>,
    /// `protocol` (default `http`): `http` or `https`; a `url` scheme overrides it.
    pub protocol: String,
    /// `username`: etcd user (also from the `url`).
    pub username: Option<String>,
    /// `password`: etcd password (also from the `url`).
    pub password: Option<String>,
    /// `cacert`: CA bundle to verify etcd's certificate.
    pub cacert: Option<PathBuf>,
    /// `cert`: client certificate.
    pub cert: Option<PathBuf>,
    /// `key`: client key.
    pub key: Option<PathBuf>,
    /// `use_proxies` (default false; implied by `proxy`): do not discover cluster members, use
    /// `hosts` as given.
    pub use_proxies: bool,
    /// `srv`: DNS domain for SRV discovery.
    pub srv: Option<String>,
    /// `srv_suffix`: suffix appended to the SRV service names.
    pub srv_suffix: Option<String>,
}

impl Default for Etcd3Config {
    fn default() -> Self {
        Etcd3Config {
            hosts: Vec::new(),
            protocol: "http".to_string(),
            username: None,
            password: None,
            cacert: None,
            cert: None,
            key: None,
            use_proxies: false,
            srv: None,
            srv_suffix: None,
        }
    }
}

impl fmt::Debug for Etcd3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd3Config")
            .field("hosts", &self.hosts)
            .field("protocol", &self.protocol)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("cacert", &self.cacert)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("use_proxies", &self.use_proxies)
            .field("srv", &self.srv)
            .field("srv_suffix", &self.srv_suffix)
            .finish()
    }
}

impl Etcd3Config {
    /// Endpoint URLs, `<protocol>://host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| format!("{}://{h}", self.protocol))
            .collect()
    }
}

/// A custom method section: `bootstrap.<method>` or `postgresql.<replica method>`
/// (`docs/patroni-compat.md` §3.5, §5.4).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodConfig {
    /// `command` (required), split into words as a POSIX shell would (Patroni's `shlex.split`);
    /// it runs without a shell.
    pub command: Vec<String>,
    /// `no_params` (default false): do not pass pgvigil's standard `--scope`/`--datadir`/...
    /// arguments.
    pub no_params: bool,
    /// `keep_data` (replica methods, default false): do not wipe the data directory first.
    pub keep_data: bool,
    /// `no_leader` (alias `no_master`; replica methods, default false): the method can run
    /// without a leader (e.g. restore from a backup).
    pub no_leader: bool,
    /// `keep_existing_recovery_conf` (bootstrap methods, default false).
    pub keep_existing_recovery_conf: bool,
    /// `recovery_conf` (bootstrap methods): recovery settings written after the script.
    pub recovery_conf: BTreeMap<String, Value>,
    /// Every key but `command`, in the order written, with its value as Patroni renders it on a
    /// command line (`True`, `1`, `latest`); nulls are left out.
    pub options: Vec<(String, String)>,
}

impl MethodConfig {
    /// The arguments after the command for a custom bootstrap: `--scope` and `--datadir`
    /// (unless `no_params`), then every other option as `--key=value`.
    pub fn bootstrap_args(&self, scope: &str, data_dir: &str) -> Vec<String> {
        const RESERVED: &[&str] = &[
            "no_params",
            "keep_existing_recovery_conf",
            "recovery_conf",
            "scope",
            "datadir",
        ];
        let mut args = Vec::new();
        if !self.no_params {
            args.push(format!("--scope={scope}"));
            args.push(format!("--datadir={data_dir}"));
        }
        args.extend(
            self.options
                .iter()
                .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
                .map(|(k, v)| format!("--{k}={v}")),
        );
        args
    }

    /// The arguments after the command for a replica method: every option as `--key=value`
    /// in the order written, then `--scope`, `--role=replica`, `--datadir` and `--connstring`
    /// (a key the user set to one of these keeps its place and takes pgvigil's value). With
    /// `no_params`, only the user's options without `no_params`, `no_leader`, `keep_data`.
    pub fn replica_args(&self, scope: &str, data_dir: &str, connstring: &str) -> Vec<String> {
        let mut options = self.options.clone();
        if self.no_params {
            options.retain(|(k, _)| !["no_params", "no_leader", "keep_data"].contains(&k.as_str()));
        } else {
            for (key, value) in [
                ("scope", scope),
                ("role", "replica"),
                ("datadir", data_dir),
                ("connstring", connstring),
            ] {
                match options.iter_mut().find(|(k, _)| k == key) {
                    Some(slot) => slot.1 = value.to_string(),
                    None => options.push((key.to_string(), value.to_string())),
                }
            }
        }
        options.into_iter().map(|(k, v)| format!("--{k}={v}")).collect()
    }
}

/// `bootstrap` section (§3.5).
#[derive(Debug, Clone, PartialEq)]
pub struct BootstrapConfig {
    /// `dcs`: the initial dynamic configuration (a JSON object, `{}` if absent), written to the
    /// DCS `config` key after a successful bootstrap. Type-checked like [`crate::DynamicConfig`].
    pub dcs: Value,
    /// `method` (default `initdb`): `initdb` or the name of a custom section `bootstrap.<method>`.
    pub method: String,
    /// `initdb`: options rendered as command-line arguments (`--data-checksums`,
    /// `--encoding=UTF8`). Options pgvigil sets itself (`pgdata`, `nosync`, `pwfile`,
    /// `sync-only`, `version`) are rejected.
    pub initdb: Vec<String>,
    /// `pg_hba`: lines appended to the fresh `pg_hba.conf` (only when `postgresql.pg_hba` is not
    /// managed).
    pub pg_hba: Vec<String>,
    /// `post_bootstrap` (alias `post_init`): script run once after bootstrap with a connection
    /// string as its last argument, split into words as Patroni splits it (`shlex.split`).
    pub post_bootstrap: Option<Vec<String>>,
    /// The `bootstrap.<method>` section when `method` is not `initdb`.
    pub custom: Option<MethodConfig>,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            dcs: Value::Object(Map::new()),
            method: "initdb".to_string(),
            initdb: Vec::new(),
            pg_hba: Vec::new(),
            post_bootstrap: None,
            custom: None,
        }
    }
}

/// `log` section. pgvigil logs through `tracing`; these keys keep Patroni's names.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// `level` (default `INFO`): `DEBUG`, `INFO`, `WARNING` (`WARN`), `ERROR`, `CRITICAL`
    /// (`FATAL`); upper-cased while loading.
    pub level: String,
    /// `type` (default `plain`): `plain` or `json`.
    pub type_: String,
    /// `traceback_level` (default `ERROR`): `DEBUG` or `ERROR`.
    pub traceback_level: String,
    /// `format`: a Patroni/Python format string, or for JSON logs a list of field names.
    pub format: Option<Value>,
    /// `dateformat`: strftime-like timestamp format.
    pub dateformat: Option<String>,
    /// `static_fields`: extra fields added to every JSON log record.
    pub static_fields: BTreeMap<String, Value>,
    /// `max_queue_size` (default 1000): records buffered before logging blocks.
    pub max_queue_size: u64,
    /// `dir`: write log files here instead of stderr.
    pub dir: Option<PathBuf>,
    /// `mode`: permissions of the log files (e.g. `0640`, written as octal).
    pub mode: Option<u32>,
    /// `file_num` (default 4): rotated files kept.
    pub file_num: u64,
    /// `file_size` (default 25000000): bytes before rotation.
    pub file_size: u64,
    /// `loggers`: per-module levels, e.g. `{pgvigil_dcs: DEBUG}`.
    pub loggers: BTreeMap<String, String>,
    /// `deduplicate_heartbeat_logs` (default false): log identical HA-loop messages once.
    pub deduplicate_heartbeat_logs: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "INFO".to_string(),
            type_: "plain".to_string(),
            traceback_level: "ERROR".to_string(),
            format: None,
            dateformat: None,
            static_fields: BTreeMap::new(),
            max_queue_size: 1000,
            dir: None,
            mode: None,
            file_num: 4,
            file_size: 25_000_000,
            loggers: BTreeMap::new(),
            deduplicate_heartbeat_logs: false,
        }
    }
}

/// `watchdog.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WatchdogMode {
    /// `off` (also `false`, `disable`, `disabled`): never use a watchdog.
    Off,
    /// `automatic` (default, also `auto`): use the watchdog if it can be opened.
    #[default]
    Automatic,
    /// `required` (also `require`): refuse to become leader without a working watchdog.
    Required,
}

/// `watchdog` section (§4.12).
#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogConfig {
    /// `mode` (default `automatic`). Unrecognised values disable the watchdog with a warning,
    /// as in Patroni.
    pub mode: WatchdogMode,
    /// `device` (default `/dev/watchdog`).
    pub device: PathBuf,
    /// `safety_margin` (default 5, at least -1): seconds between the watchdog firing and the
    /// leader key expiring; watchdog timeout = `ttl - safety_margin`; -1 means `ttl / 2`.
    pub safety_margin: i64,
    /// `driver` (default `default`): `default` (Linux device) or `testing`.
    pub driver: String,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            mode: WatchdogMode::Automatic,
            device: PathBuf::from("/dev/watchdog"),
            safety_margin: 5,
            driver: "default".to_string(),
        }
    }
}

/// What `pgvigilctl` needs (§6): only `scope`, `namespace`, the DCS, `ctl` and REST auth.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// `scope`, if configured (pgvigilctl commands may name the cluster instead).
    pub scope: Option<String>,
    /// `namespace` (default `/service`).
    pub namespace: String,
    /// `etcd3`; `hosts` may be empty when the file has no DCS section (use `--dcs-url`).
    pub etcd3: Etcd3Config,
    /// `ctl` (with the `restapi` fallbacks applied).
    pub ctl: CtlConfig,
    /// `restapi.authentication`.
    pub restapi_auth: Option<Credentials>,
}

impl ClientConfig {
    /// Credentials for calls to members' REST APIs: `ctl.authentication`, else
    /// `restapi.authentication`.
    pub fn authentication(&self) -> Option<&Credentials> {
        self.ctl.authentication.as_ref().or(self.restapi_auth.as_ref())
    }
}
