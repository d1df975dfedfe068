//! Reading the `postgresql` section (`docs/patroni-compat.md` §3.6) and custom method sections.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::error::ConfigError;
use crate::gucs::{ControlledGuc, controlled_guc};
use crate::model::MethodConfig;
use crate::options::{BASEBACKUP_FORBIDDEN, REWIND_FORBIDDEN, method_options, render_options, split_words};
use crate::postgresql::{PgAuthentication, PgCredentials, PostgresqlConfig, RoleOverrides, split_host_port};
use crate::walk::{Ctx, Obj, describe};

/// `postgresql` keys only the local configuration may set (ignored in the dynamic one).
pub(crate) const LOCAL_ONLY_PG_KEYS: &[&str] = &[
    "connect_address",
    "proxy_address",
    "listen",
    "config_dir",
    "data_dir",
    "pgpass",
    "authentication",
];

/// Every `postgresql` key pgvigil knows (besides custom method sections).
pub(crate) const KNOWN_PG_KEYS: &[&str] = &[
    "listen",
    "connect_address",
    "proxy_address",
    "data_dir",
    "config_dir",
    "bin_dir",
    "bin_name",
    "pgpass",
    "database",
    "authentication",
    "use_unix_socket",
    "use_unix_socket_repl",
    "parameters",
    "parameters_primary",
    "parameters_replica",
    "parameters_standby_leader",
    "pg_hba",
    "pg_hba_primary",
    "pg_hba_replica",
    "pg_hba_standby_leader",
    "pg_ident",
    "pg_ident_primary",
    "pg_ident_replica",
    "pg_ident_standby_leader",
    "use_pg_rewind",
    "use_slots",
    "rewind",
    "basebackup",
    "create_replica_methods",
    "recovery_conf",
    "custom_conf",
    "callbacks",
    "pre_promote",
    "before_stop",
    "pg_ctl_timeout",
    "remove_data_directory_on_rewind_failure",
    "remove_data_directory_on_diverged_timelines",
    "krbsrvname",
];

const ROLES: &[&str] = &["primary", "replica", "standby_leader"];
const BINARIES: &[&str] = &[
    "pg_ctl",
    "initdb",
    "pg_controldata",
    "pg_basebackup",
    "postgres",
    "pg_isready",
    "pg_rewind",
];
const CALLBACKS: &[&str] = &["on_start", "on_stop", "on_restart", "on_reload", "on_role_change"];
const WILDCARDS: &[&str] = &["", "0.0.0.0", "*", "::", "[::]"];

pub(crate) fn parse_postgresql(
    mut o: Obj<'_>,
    ctx: &mut Ctx,
    home: &Path,
) -> Result<PostgresqlConfig, ConfigError> {
    let mut pg = PostgresqlConfig {
        pgpass: home.join("pgpass"),
        ..PostgresqlConfig::default()
    };
    pg.listen = o.req_string(ctx, "listen")?;
    if !pg.listen.is_empty() && split_host_port(&pg.listen, Some(5432)).is_none() {
        let msg = format!("expected host[,host...][:port], found {:?}", pg.listen);
        return Err(ctx.error(&o.key_path("listen"), msg));
    }
    pg.connect_address = o.req_string(ctx, "connect_address")?;
    if !pg.connect_address.is_empty() {
        match split_host_port(&pg.connect_address, Some(5432)) {
            None => {
                let msg = format!("expected host:port, found {:?}", pg.connect_address);
                return Err(ctx.error(&o.key_path("connect_address"), msg));
            }
            Some((host, _)) if WILDCARDS.contains(&host.as_str()) && ctx.enforce_required => {
                let msg =
                    "is a wildcard address; other members cannot connect to it (use this host's address)";
                ctx.warn(&o.key_path("connect_address"), msg);
            }
            Some(_) => {}
        }
    }
    pg.proxy_address = o.string(ctx, "proxy_address")?;
    pg.data_dir = o.req_string(ctx, "data_dir")?.into();
    pg.config_dir = o.path_buf(ctx, "config_dir")?;
    pg.bin_dir = o.path_buf(ctx, "bin_dir")?;
    pg.bin_name = o.string_map(ctx, "bin_name")?;
    for name in pg.bin_name.keys() {
        if !BINARIES.contains(&name.as_str()) {
            ctx.warn(
                &format!("{}.{name}", o.key_path("bin_name")),
                "unknown binary, ignored",
            );
        }
    }
    if let Some(p) = o.path_buf(ctx, "pgpass")? {
        pg.pgpass = p;
    }
    if let Some(db) = o.string(ctx, "database")?.filter(|d| !d.is_empty()) {
        pg.database = db;
    }
    pg.authentication = parse_authentication(o.section(ctx, "authentication")?, ctx)?;
    pg.use_unix_socket = o.bool(ctx, "use_unix_socket")?.unwrap_or(false);
    pg.use_unix_socket_repl = o.bool(ctx, "use_unix_socket_repl")?.unwrap_or(false);
    pg.parameters = parse_parameters(&mut o, ctx, "parameters")?;
    for (name, value) in &pg.parameters {
        let path = format!("{}.{name}", o.key_path("parameters"));
        match controlled_guc(name) {
            Some(ControlledGuc::Derived) => {
                ctx.warn(&path, "set by pgvigil from postgresql.listen and scope; the value here is ignored")
            }
            Some(_) => ctx.warn(
                &path,
                format!(
                    "{name}={} is ignored: only the dynamic configuration (bootstrap.dcs.postgresql.parameters, \
                     or pgvigilctl edit-config) may set this Patroni-controlled parameter",
                    crate::gucs::guc_to_string(value)
                ),
            ),
            None => {}
        }
    }
    pg.role_overrides = parse_role_overrides(&mut o, ctx)?;
    pg.pg_hba = o.string_list(ctx, "pg_hba")?;
    pg.pg_ident = o.string_list(ctx, "pg_ident")?;
    pg.use_pg_rewind = o.bool(ctx, "use_pg_rewind")?;
    pg.use_slots = o.bool(ctx, "use_slots")?;
    if pg.use_slots.is_some() {
        let msg =
            "only the dynamic value counts (bootstrap.dcs.postgresql.use_slots); the local value is ignored";
        ctx.warn(&o.key_path("use_slots"), msg);
    }
    pg.rewind = render_options(ctx, &o.key_path("rewind"), o.raw("rewind"), REWIND_FORBIDDEN)?;
    pg.basebackup = render_options(
        ctx,
        &o.key_path("basebackup"),
        o.raw("basebackup"),
        BASEBACKUP_FORBIDDEN,
    )?;
    for arg in &pg.basebackup {
        if (arg == "--compress" || arg.starts_with("--compress=")) && !arg.starts_with("--compress=server") {
            let msg = format!(
                "`{arg}`: only server-side compression is allowed (e.g. compress: server-gzip, PostgreSQL 15 or later)"
            );
            return Err(ctx.error(&o.key_path("basebackup"), msg));
        }
    }
    if let Some(methods) = o
        .string_list(ctx, "create_replica_methods")?
        .filter(|m| !m.is_empty())
    {
        pg.create_replica_methods = methods;
    }
    for method in pg.create_replica_methods.clone() {
        if method == "basebackup" {
            continue;
        }
        if o.raw(&method).is_some_and(Value::is_object) {
            let section = o.section(ctx, &method)?;
            pg.replica_methods
                .insert(method.clone(), parse_method(section, ctx)?);
        } else {
            // Patroni would run a program named like the method; a typo would then fail only
            // when a replica is needed, so this is refused up front.
            let msg = format!(
                "missing: create_replica_methods lists `{method}`, which needs a section with a `command`"
            );
            return Err(ctx.error(&o.key_path(&method), msg));
        }
    }
    pg.recovery_conf = o.value_map(ctx, "recovery_conf")?;
    pg.custom_conf = o.path_buf(ctx, "custom_conf")?;
    if let Some(map) = o.object(ctx, "callbacks")? {
        for (name, value) in map.iter().filter(|(_, v)| !v.is_null()) {
            let path = format!("{}.{name}", o.key_path("callbacks"));
            if !CALLBACKS.contains(&name.as_str()) {
                ctx.warn(&path, "unknown callback, ignored");
                continue;
            }
            if let Some(words) = command(ctx, &path, value, false)? {
                pg.callbacks.insert(name.clone(), words);
            }
        }
    }
    for (key, slot) in [
        ("pre_promote", &mut pg.pre_promote),
        ("before_stop", &mut pg.before_stop),
    ] {
        if let Some(value) = o.raw(key) {
            *slot = command(ctx, &o.key_path(key), value, true)?;
        }
    }
    if let Some(t) = o.u64(ctx, "pg_ctl_timeout")? {
        pg.pg_ctl_timeout = t;
    }
    pg.remove_data_directory_on_rewind_failure = o
        .bool(ctx, "remove_data_directory_on_rewind_failure")?
        .unwrap_or(false);
    pg.remove_data_directory_on_diverged_timelines = o
        .bool(ctx, "remove_data_directory_on_diverged_timelines")?
        .unwrap_or(false);
    pg.krbsrvname = o.string(ctx, "krbsrvname")?;
    // Method sections not listed in create_replica_methods are accepted as they are.
    for key in o.unknown_keys() {
        if o.has_method_section(key) {
            let section = o.section(ctx, key)?;
            pg.replica_methods
                .insert(key.to_string(), parse_method(section, ctx)?);
        }
    }
    o.finish(ctx);
    Ok(pg)
}

/// GUC values must be scalars (lists are accepted and joined with commas).
fn parse_parameters(
    o: &mut Obj<'_>,
    ctx: &mut Ctx,
    key: &str,
) -> Result<BTreeMap<String, Value>, ConfigError> {
    let params = o.value_map(ctx, key)?;
    let path = o.key_path(key);
    let mut out = BTreeMap::new();
    for (name, value) in params {
        if value.is_object() {
            let msg = format!("expected a parameter value, found {}", describe(&value));
            ctx.bad::<()>(&format!("{path}.{name}"), msg)?;
            continue;
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// `parameters_<role>`, `pg_hba_<role>`, `pg_ident_<role>`.
pub(crate) fn parse_role_overrides(
    o: &mut Obj<'_>,
    ctx: &mut Ctx,
) -> Result<BTreeMap<String, RoleOverrides>, ConfigError> {
    let mut out = BTreeMap::new();
    for role in ROLES {
        let params_key = format!("parameters_{role}");
        let parameters = if o.has(&params_key) {
            let params = parse_parameters(o, ctx, &params_key)?;
            for name in params.keys() {
                if controlled_guc(name).is_some() {
                    let msg = "a Patroni-controlled parameter cannot be overridden per role; ignored";
                    ctx.warn(&format!("{}.{name}", o.key_path(&params_key)), msg);
                }
            }
            Some(params)
        } else {
            o.allow(&[params_key.as_str()]);
            None
        };
        let r = RoleOverrides {
            parameters,
            pg_hba: o.string_list(ctx, &format!("pg_hba_{role}"))?,
            pg_ident: o.string_list(ctx, &format!("pg_ident_{role}"))?,
        };
        if r != RoleOverrides::default() {
            out.insert((*role).to_string(), r);
        }
    }
    Ok(out)
}

fn parse_authentication(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<PgAuthentication, ConfigError> {
    let superuser = parse_pg_credentials(o.section(ctx, "superuser")?, ctx)?;
    let replication = parse_pg_credentials(o.section(ctx, "replication")?, ctx)?;
    let rewind = o.section(ctx, "rewind")?;
    let rewind = if rewind.present() {
        Some(parse_pg_credentials(rewind, ctx)?)
    } else {
        None
    };
    o.finish(ctx);
    Ok(PgAuthentication {
        superuser,
        replication,
        rewind,
    })
}

fn parse_pg_credentials(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<PgCredentials, ConfigError> {
    let present = o.present();
    let username = if present {
        match o.string(ctx, "username")? {
            Some(u) if !u.trim().is_empty() => u,
            Some(_) => return Err(ctx.error(&o.key_path("username"), "must not be empty")),
            None => return Err(o.missing(ctx, "username")),
        }
    } else {
        o.req_string(ctx, "username")?
    };
    let c = PgCredentials {
        username,
        password: o.string(ctx, "password")?.filter(|p| !p.is_empty()),
        sslmode: o.string(ctx, "sslmode")?,
        sslcert: o.string(ctx, "sslcert")?,
        sslkey: o.string(ctx, "sslkey")?,
        sslpassword: o.string(ctx, "sslpassword")?,
        sslrootcert: o.string(ctx, "sslrootcert")?,
        sslcrl: o.string(ctx, "sslcrl")?,
        sslcrldir: o.string(ctx, "sslcrldir")?,
        sslnegotiation: o.string(ctx, "sslnegotiation")?,
        gssencmode: o.string(ctx, "gssencmode")?,
        channel_binding: o.string(ctx, "channel_binding")?,
    };
    o.finish(ctx);
    Ok(c)
}

/// A custom method section (`bootstrap.<method>` / `postgresql.<method>`).
pub(crate) fn parse_method(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<MethodConfig, ConfigError> {
    let command = match o.string(ctx, "command")? {
        Some(c) if !c.trim().is_empty() => c,
        _ => return Err(o.missing(ctx, "command")),
    };
    let Some(command) = split_words(&command).filter(|w| !w.is_empty()) else {
        let msg = format!("`{command}`: unbalanced quotes or a trailing backslash");
        return Err(ctx.error(&o.key_path("command"), msg));
    };
    let no_leader = o.bool(ctx, "no_leader")?;
    let no_master = o.bool(ctx, "no_master")?;
    let m = MethodConfig {
        command,
        no_params: o.bool(ctx, "no_params")?.unwrap_or(false),
        keep_data: o.bool(ctx, "keep_data")?.unwrap_or(false),
        no_leader: no_leader.or(no_master).unwrap_or(false),
        keep_existing_recovery_conf: o.bool(ctx, "keep_existing_recovery_conf")?.unwrap_or(false),
        recovery_conf: o.value_map(ctx, "recovery_conf")?,
        options: o.object_ref().map(method_options).unwrap_or_default(),
    };
    Ok(m)
}

/// A script setting (`callbacks.*`, `pre_promote`, `before_stop`), split into words the way
/// Patroni splits it (`shlex.split`, no shell). Patroni treats an empty `pre_promote` or
/// `before_stop` as unset (`empty_is_unset`); an empty callback would run the event name as a
/// command there, so it is refused here.
pub(crate) fn command(
    ctx: &mut Ctx,
    path: &str,
    value: &Value,
    empty_is_unset: bool,
) -> Result<Option<Vec<String>>, ConfigError> {
    let Value::String(text) = value else {
        return ctx.bad(
            path,
            format!("expected a command (a string), found {}", describe(value)),
        );
    };
    match shlex::split(text) {
        Some(words) if !words.is_empty() => Ok(Some(words)),
        Some(_) if empty_is_unset => Ok(None),
        Some(_) => ctx.bad(path, "empty command; remove the key to run nothing"),
        None => ctx.bad(
            path,
            format!(
                "cannot split {} into words: an unclosed quote or a trailing backslash",
                describe(value)
            ),
        ),
    }
}
