//! Reading the merged local configuration (a JSON object) into [`Config`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::dynamic::{is_dynamic_key, parse_dynamic};
use crate::error::ConfigError;
use crate::model::{
    BootstrapConfig, Config, Credentials, CtlConfig, Etcd3Config, LogConfig, RestApiConfig,
    STRICT_SYNC_PLACEHOLDER, VerifyClient, WatchdogConfig, WatchdogMode,
};
use crate::options::{INITDB_FORBIDDEN, parse_endpoint, render_options};
use crate::parse_pg::{parse_method, parse_postgresql};
use crate::postgresql::split_host_port;
use crate::router::parse_router;
use crate::tags::Tags;
use crate::vip::parse_vip;
use crate::walk::{Ctx, Obj, as_bool, as_i64, as_string, describe};

/// DCS sections of Patroni that pgvigil does not implement.
const OTHER_DCS: &[&str] = &["etcd", "consul", "zookeeper", "exhibitor", "kubernetes", "raft"];
const WILDCARDS: &[&str] = &["", "0.0.0.0", "*", "::", "[::]"];

pub(crate) fn parse_config(
    root: &Map<String, Value>,
    ctx: &mut Ctx,
    home: &Path,
) -> Result<Config, ConfigError> {
    let mut top = Obj::new("", Some(root));
    let name = top.req_string(ctx, "name")?;
    if name == STRICT_SYNC_PLACEHOLDER {
        let msg = format!(
            "`{STRICT_SYNC_PLACEHOLDER}` is reserved for synchronous replication; choose another name"
        );
        return Err(ctx.error("name", msg));
    }
    let scope = top.req_string(ctx, "scope")?;
    let namespace = top.string(ctx, "namespace")?.filter(|s| !s.trim().is_empty());
    let thread_pool_size = top.i64_min(ctx, "thread_pool_size", 5)?.unwrap_or(5) as u64;
    top.allow(&["thread_stack_size"]);
    check_dcs_sections(&mut top, ctx)?;
    let etcd3 = parse_etcd3(top.section(ctx, "etcd3")?, ctx)?;
    let restapi = parse_restapi(top.section(ctx, "restapi")?, ctx)?;
    let ctl = parse_ctl(top.section(ctx, "ctl")?, ctx, &restapi)?;
    let postgresql = parse_postgresql(top.section(ctx, "postgresql")?, ctx, home)?;
    let bootstrap = parse_bootstrap(top.section(ctx, "bootstrap")?, ctx)?;
    let tags = parse_tags(top.section(ctx, "tags")?, ctx)?;
    let log = parse_log(top.section(ctx, "log")?, ctx)?;
    let watchdog = parse_watchdog(top.section(ctx, "watchdog")?, ctx)?;
    let router = parse_router(top.section(ctx, "router")?, ctx)?;
    let vip = parse_vip(top.section(ctx, "vip")?, ctx)?;
    if top.raw("citus").is_some() {
        ctx.warn("citus", "Citus clusters are not supported by pgvigil; ignored");
    }
    for key in top.unknown_keys() {
        if is_dynamic_key(key) {
            top.allow(&[key]);
            let msg = "a dynamic setting: it only takes effect under bootstrap.dcs (or in the DCS, via \
                       pgvigilctl edit-config); ignored here";
            ctx.warn(key, msg);
        }
    }
    top.finish(ctx);
    Ok(Config {
        scope,
        namespace: namespace.unwrap_or_else(|| "/service".to_string()),
        name,
        restapi,
        ctl,
        etcd3,
        bootstrap,
        postgresql,
        tags,
        log,
        watchdog,
        thread_pool_size,
        router,
        vip,
        raw: Value::Object(root.clone()),
    })
}

fn check_dcs_sections(top: &mut Obj<'_>, ctx: &mut Ctx) -> Result<(), ConfigError> {
    let has_etcd3 = top.has("etcd3");
    for key in OTHER_DCS {
        if top.raw(key).is_none() {
            continue;
        }
        if has_etcd3 {
            ctx.warn(
                key,
                "pgvigil only supports etcd v3 (the `etcd3` section); this section is ignored",
            );
        } else if *key == "etcd" {
            let msg = "pgvigil only supports the etcd v3 API: rename `etcd:` to `etcd3:` (etcd 3.4 or later; the v2 \
                       keyspace is separate, so an existing Patroni cluster must use etcd3 as well)";
            return Err(ctx.error(key, msg));
        } else {
            let msg =
                format!("pgvigil only supports etcd v3 (an `etcd3:` section); `{key}` is not supported");
            return Err(ctx.error(key, msg));
        }
    }
    if !has_etcd3 && ctx.enforce_required {
        let msg = "missing (required): pgvigil needs an `etcd3:` section with `host`, `hosts` or `url`";
        return Err(ctx.error("etcd3", msg));
    }
    Ok(())
}

fn parse_etcd3(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<Etcd3Config, ConfigError> {
    let mut cfg = Etcd3Config::default();
    let default_port = match o.i64(ctx, "port")? {
        None => 2379,
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ctx.error(&o.key_path("port"), format!("expected a port number, found {p}")))?,
    };
    let explicit_protocol = o.string(ctx, "protocol")?.map(|p| p.trim().to_ascii_lowercase());
    if let Some(p) = &explicit_protocol {
        if p != "http" && p != "https" {
            return Err(ctx.error(
                &o.key_path("protocol"),
                format!("expected http or https, found {p:?}"),
            ));
        }
        cfg.protocol = p.clone();
    }
    cfg.username = o.string(ctx, "username")?;
    cfg.password = o.string(ctx, "password")?;
    cfg.cacert = o.path_buf(ctx, "cacert")?;
    cfg.cert = o.path_buf(ctx, "cert")?;
    cfg.key = o.path_buf(ctx, "key")?;
    cfg.use_proxies = o.bool(ctx, "use_proxies")?.unwrap_or(false);
    cfg.srv = o.string(ctx, "srv")?;
    cfg.srv_suffix = o.string(ctx, "srv_suffix")?;
    let proxy = o.string(ctx, "proxy")?;
    let url = o.string(ctx, "url")?;
    let hosts = o.raw("hosts");
    let host = o.string(ctx, "host")?;
    let given: Vec<&str> = [
        ("proxy", proxy.is_some()),
        ("url", url.is_some()),
        ("hosts", hosts.is_some()),
        ("host", host.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if given.len() > 1 {
        let msg = format!(
            "several of {} are set; only `{}` is used",
            given.join(", "),
            given[0]
        );
        ctx.warn(&o.path, msg);
    }
    let mut entries: Vec<(String, String)> = Vec::new(); // (key path, text)
    if let Some(p) = proxy {
        cfg.use_proxies = true;
        entries.push((o.key_path("proxy"), p));
    } else if let Some(u) = url {
        entries.push((o.key_path("url"), u));
    } else if let Some(h) = hosts {
        let path = o.key_path("hosts");
        match h {
            Value::String(s) => entries.extend(
                s.split(',')
                    .filter(|x| !x.trim().is_empty())
                    .map(|x| (path.clone(), x.to_string())),
            ),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    match as_string(item) {
                        Some(s) => entries.push((format!("{path}[{i}]"), s)),
                        None => {
                            let msg = format!("expected host:port, found {}", describe(item));
                            return Err(ctx.error(&format!("{path}[{i}]"), msg));
                        }
                    }
                }
            }
            other => {
                return Err(ctx.error(
                    &path,
                    format!("expected a list of host:port, found {}", describe(other)),
                ));
            }
        }
    } else if let Some(h) = host {
        entries.push((o.key_path("host"), h));
    }
    for (path, text) in entries {
        let ep = parse_endpoint(&text, default_port).map_err(|m| ctx.error(&path, m))?;
        if let Some(scheme) = ep.scheme {
            match &explicit_protocol {
                Some(p) if *p != scheme => {
                    let msg = format!("scheme `{scheme}` contradicts etcd3.protocol `{p}`");
                    return Err(ctx.error(&path, msg));
                }
                _ => cfg.protocol = scheme,
            }
        }
        if ep.username.is_some() {
            cfg.username = ep.username;
            cfg.password = ep.password;
        }
        cfg.hosts.push(ep.host_port);
    }
    if o.present() && cfg.hosts.is_empty() && cfg.srv.is_none() && ctx.enforce_required {
        return Err(ctx.error(
            &o.path,
            "no etcd endpoint: set `host`, `hosts`, `url`, `proxy` or `srv`",
        ));
    }
    o.finish(ctx);
    Ok(cfg)
}

fn parse_credentials(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<Option<Credentials>, ConfigError> {
    if !o.present() {
        return Ok(None);
    }
    let username = o
        .string(ctx, "username")?
        .ok_or_else(|| o.missing(ctx, "username"))?;
    let password = o
        .string(ctx, "password")?
        .ok_or_else(|| o.missing(ctx, "password"))?;
    o.finish(ctx);
    Ok(Some(Credentials { username, password }))
}

fn check_host_port(o: &Obj<'_>, ctx: &mut Ctx, key: &str, value: &str) -> Result<String, ConfigError> {
    match split_host_port(value, None) {
        Some((host, _)) => Ok(host),
        None => Err(ctx.error(&o.key_path(key), format!("expected host:port, found {value:?}"))),
    }
}

fn parse_restapi(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<RestApiConfig, ConfigError> {
    let mut r = RestApiConfig {
        listen: o.req_string(ctx, "listen")?,
        ..RestApiConfig::default()
    };
    if !r.listen.is_empty() {
        check_host_port(&o, ctx, "listen", &r.listen)?;
    }
    let connect = o.string(ctx, "connect_address")?.filter(|c| !c.trim().is_empty());
    r.connect_address = connect.clone().unwrap_or_else(|| r.listen.clone());
    if !r.connect_address.is_empty() {
        let key = if connect.is_some() {
            "connect_address"
        } else {
            "listen"
        };
        let host = check_host_port(&o, ctx, key, &r.connect_address)?;
        if WILDCARDS.contains(&host.as_str()) && ctx.enforce_required {
            let msg = "the REST API address other members use is a wildcard address; set restapi.connect_address \
                       to this host's reachable address";
            ctx.warn(&o.key_path(key), msg);
        }
    }
    r.authentication = parse_credentials(o.section(ctx, "authentication")?, ctx)?;
    r.certfile = o.path_buf(ctx, "certfile")?;
    r.keyfile = o.path_buf(ctx, "keyfile")?;
    r.keyfile_password = o.string(ctx, "keyfile_password")?;
    r.cafile = o.path_buf(ctx, "cafile")?;
    r.ciphers = o.string(ctx, "ciphers")?;
    if let Some(v) = o.string(ctx, "verify_client")? {
        r.verify_client = match v.trim().to_ascii_lowercase().as_str() {
            "none" => VerifyClient::None,
            "optional" => VerifyClient::Optional,
            "required" => VerifyClient::Required,
            _ => {
                let msg = format!("expected none, optional or required, found {v:?}");
                return Err(ctx.error(&o.key_path("verify_client"), msg));
            }
        };
    }
    r.allowlist = o.string_list(ctx, "allowlist")?.unwrap_or_default();
    r.allowlist_include_members = o.bool(ctx, "allowlist_include_members")?.unwrap_or(false);
    r.http_extra_headers = o.string_map(ctx, "http_extra_headers")?;
    r.https_extra_headers = o.string_map(ctx, "https_extra_headers")?;
    if let Some(q) = o.u64(ctx, "request_queue_size")? {
        if q > 4096 {
            return Err(ctx.error(
                &o.key_path("request_queue_size"),
                format!("must be at most 4096, found {q}"),
            ));
        }
        r.request_queue_size = q;
    }
    r.thread_pool_size = o.i64_min(ctx, "thread_pool_size", 5)?.map(|n| n as u64);
    if let Some(t) = o.string(ctx, "server_tokens")? {
        let t = t.trim().to_ascii_lowercase();
        if !["original", "minimal", "productonly"].contains(&t.as_str()) {
            let msg = format!("expected original, minimal or productonly, found {t:?}");
            return Err(ctx.error(&o.key_path("server_tokens"), msg));
        }
        r.server_tokens = t;
    }
    o.finish(ctx);
    Ok(r)
}

fn parse_ctl(mut o: Obj<'_>, ctx: &mut Ctx, restapi: &RestApiConfig) -> Result<CtlConfig, ConfigError> {
    let authentication = parse_credentials(o.section(ctx, "authentication")?, ctx)?;
    let c = CtlConfig {
        authentication: authentication.or_else(|| restapi.authentication.clone()),
        insecure: o.bool(ctx, "insecure")?.unwrap_or(false),
        cacert: o.path_buf(ctx, "cacert")?.or_else(|| restapi.cafile.clone()),
        certfile: o.path_buf(ctx, "certfile")?,
        keyfile: o.path_buf(ctx, "keyfile")?,
        keyfile_password: o.string(ctx, "keyfile_password")?,
    };
    o.finish(ctx);
    Ok(c)
}

fn parse_bootstrap(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<BootstrapConfig, ConfigError> {
    let mut b = BootstrapConfig::default();
    let dcs = o.section(ctx, "dcs")?;
    if let Some(map) = dcs.object_ref() {
        b.dcs = Value::Object(map.clone());
        parse_dynamic(dcs, ctx)?;
    }
    if let Some(m) = o.string(ctx, "method")?.filter(|m| !m.trim().is_empty()) {
        b.method = m;
    }
    b.initdb = render_options(ctx, &o.key_path("initdb"), o.raw("initdb"), INITDB_FORBIDDEN)?;
    b.pg_hba = o.string_list(ctx, "pg_hba")?.unwrap_or_default();
    // Patroni runs `shlex.split(post_bootstrap or post_init)`: no shell, and an empty one is
    // no script (so an empty `post_bootstrap` falls back to `post_init`).
    let mut script = |ctx: &mut Ctx, key: &str| match o.raw(key) {
        Some(v) => crate::parse_pg::command(ctx, &o.key_path(key), v, true),
        None => Ok(None),
    };
    let post_bootstrap = script(ctx, "post_bootstrap")?;
    let post_init = script(ctx, "post_init")?;
    b.post_bootstrap = post_bootstrap.or(post_init);
    if o.raw("users").is_some() {
        let msg = "no longer supported (removed in Patroni 4); create roles from a post_bootstrap script";
        ctx.warn(&o.key_path("users"), msg);
    }
    if b.method != "initdb" {
        if !o.has_method_section(&b.method) {
            let msg = format!(
                "missing: bootstrap.method is `{}`, which needs a section with a `command`",
                b.method
            );
            return Err(ctx.error(&o.key_path(&b.method), msg));
        }
        let method = b.method.clone();
        b.custom = Some(parse_method(o.section(ctx, &method)?, ctx)?);
    }
    for key in o.unknown_keys() {
        if o.has_method_section(key) {
            o.allow(&[key]);
        }
    }
    o.finish(ctx);
    Ok(b)
}

fn parse_tags(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<Tags, ConfigError> {
    // Published as written (`docs/patroni-compat.md` §3.7), read before the typed parsing
    // below validates them.
    let mut written = Map::new();
    for key in [
        "clonefrom",
        "nofailover",
        "failover_priority",
        "noloadbalance",
        "nosync",
        "sync_priority",
        "replicatefrom",
        "nostream",
    ] {
        if let Some(v) = o.raw(key).filter(|v| !v.is_null()) {
            written.insert(key.to_string(), v.clone());
        }
    }
    let nofailover = o.bool(ctx, "nofailover")?;
    let failover_priority = o.i64_min(ctx, "failover_priority", 0)?;
    let nosync = o.bool(ctx, "nosync")?;
    let sync_priority = o.i64_min(ctx, "sync_priority", 0)?;
    for (flag, flag_name, prio, prio_name) in [
        (nofailover, "nofailover", failover_priority, "failover_priority"),
        (nosync, "nosync", sync_priority, "sync_priority"),
    ] {
        if let (Some(f), Some(p)) = (flag, prio)
            && f == (p > 0)
        {
            let msg = format!("conflicting {flag_name}: {f} and {prio_name}: {p}; {flag_name} wins");
            ctx.warn(&o.path, msg);
        }
    }
    let mut tags = Tags {
        nofailover: nofailover.unwrap_or(failover_priority.is_some_and(|p| p <= 0)),
        failover_priority,
        nosync: nosync.unwrap_or(sync_priority.is_some_and(|p| p <= 0)),
        sync_priority,
        noloadbalance: o.bool(ctx, "noloadbalance")?.unwrap_or(false),
        clonefrom: o.bool(ctx, "clonefrom")?.unwrap_or(false),
        replicatefrom: o.string(ctx, "replicatefrom")?.filter(|r| !r.is_empty()),
        nostream: o.bool(ctx, "nostream")?.unwrap_or(false),
        written: Map::new(),
        other: Map::new(),
    };
    for key in crate::tags::BOOLEAN_TAGS {
        // A string here reads as a boolean to pgvigil but as true to any Patroni reader, so
        // the boolean is what is published.
        if let Some(v) = written.get_mut(key)
            && let Some(b) = as_bool(v)
        {
            *v = Value::Bool(b);
        }
    }
    tags.written = written;
    for key in o.unknown_keys() {
        if let Some(v) = o.raw(key) {
            tags.other.insert(key.to_string(), v.clone());
        }
    }
    Ok(tags)
}

fn parse_log(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<LogConfig, ConfigError> {
    let mut l = LogConfig::default();
    let levels = ["DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL", "CRITICAL"];
    if let Some(v) = one_of(&mut o, ctx, "level", &levels, true)? {
        l.level = v;
    }
    if let Some(v) = one_of(&mut o, ctx, "type", &["plain", "json"], false)? {
        l.type_ = v;
    }
    if let Some(v) = one_of(&mut o, ctx, "traceback_level", &["DEBUG", "ERROR"], true)? {
        l.traceback_level = v;
    }
    l.format = o.raw("format").cloned();
    l.dateformat = o.string(ctx, "dateformat")?;
    l.static_fields = o.value_map(ctx, "static_fields")?;
    if let Some(v) = o.u64(ctx, "max_queue_size")? {
        l.max_queue_size = v;
    }
    l.dir = o.path_buf(ctx, "dir")?;
    if let Some(v) = o.raw("mode") {
        let mode = match v {
            Value::String(s) if s.trim().len() > 1 && s.trim().starts_with('0') => {
                i64::from_str_radix(s.trim().trim_start_matches("0o"), 8).ok()
            }
            other => as_i64(other),
        };
        match mode {
            Some(m) if (0..=0o777).contains(&m) => l.mode = Some(m as u32),
            _ => {
                let msg = format!("expected file permissions such as 0640, found {}", describe(v));
                return Err(ctx.error(&o.key_path("mode"), msg));
            }
        }
    }
    if let Some(v) = o.u64(ctx, "file_num")? {
        l.file_num = v;
    }
    if let Some(v) = o.u64(ctx, "file_size")? {
        l.file_size = v;
    }
    l.loggers = o.string_map(ctx, "loggers")?;
    l.deduplicate_heartbeat_logs = o.bool(ctx, "deduplicate_heartbeat_logs")?.unwrap_or(false);
    o.finish(ctx);
    Ok(l)
}

/// An enumerated string, normalized to upper or lower case.
fn one_of(
    o: &mut Obj<'_>,
    ctx: &mut Ctx,
    key: &str,
    allowed: &[&str],
    upper: bool,
) -> Result<Option<String>, ConfigError> {
    let Some(v) = o.string(ctx, key)? else {
        return Ok(None);
    };
    let norm = if upper {
        v.trim().to_ascii_uppercase()
    } else {
        v.trim().to_ascii_lowercase()
    };
    if allowed.contains(&norm.as_str()) {
        Ok(Some(norm))
    } else {
        Err(ctx.error(
            &o.key_path(key),
            format!("expected one of {}, found {v:?}", allowed.join(", ")),
        ))
    }
}

fn parse_watchdog(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<WatchdogConfig, ConfigError> {
    let mut w = WatchdogConfig::default();
    if let Some(v) = o.raw("mode") {
        let text = match v {
            Value::Bool(false) => "off".to_string(),
            Value::Bool(true) => "true".to_string(),
            other => match as_string(other) {
                Some(s) => s.trim().to_ascii_lowercase(),
                None => {
                    let msg = format!("expected off, automatic or required, found {}", describe(other));
                    return Err(ctx.error(&o.key_path("mode"), msg));
                }
            },
        };
        w.mode = match text.as_str() {
            "off" | "disable" | "disabled" => WatchdogMode::Off,
            "auto" | "automatic" => WatchdogMode::Automatic,
            "require" | "required" => WatchdogMode::Required,
            _ => {
                let msg = format!(
                    "mode {text:?} not recognized (off, automatic, required); the watchdog is disabled"
                );
                ctx.warn(&o.key_path("mode"), msg);
                WatchdogMode::Off
            }
        };
    }
    if let Some(d) = o.path_buf(ctx, "device")? {
        w.device = d;
    }
    if let Some(m) = o.i64_min(ctx, "safety_margin", -1)? {
        w.safety_margin = m;
    }
    if let Some(d) = o.string(ctx, "driver")? {
        let d = d.trim().to_ascii_lowercase();
        if d != "default" && d != "testing" {
            return Err(ctx.error(
                &o.key_path("driver"),
                format!("expected default or testing, found {d:?}"),
            ));
        }
        w.driver = d;
    }
    o.finish(ctx);
    Ok(w)
}
