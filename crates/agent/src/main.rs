//! `pgvigil CONFIG.yml`: the HA agent, a drop-in replacement for `patroni CONFIG.yml`.
//! `pgvigil router CONFIG.yml`: the client router (crate `pgvigil-router`), same file.
//! `pgvigil vip CONFIG.yml`: the floating address that follows the leader (`vip:` section).

mod etcd_srv;
mod leadership;
mod operator;
mod probe;
mod runtime;
mod secure;
mod supervisor;
mod wiring;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// A Patroni-compatible PostgreSQL high-availability agent.
#[derive(Parser, Debug)]
#[command(name = "pgvigil", version, about)]
struct Cli {
    /// Patroni-format YAML configuration file, or a directory of *.yml/*.yaml files. Without it,
    /// the configuration comes from PATRONI_CONFIGURATION or PATRONI_* variables.
    config: Option<PathBuf>,
    /// Check the configuration, print warnings, and exit.
    #[arg(long)]
    validate_config: bool,
}

/// `pgvigil router [CONFIG] [--validate-config]`: chosen when the first argument is literally
/// `router` (a configuration file of that name is still reachable as `./router`).
#[derive(Parser, Debug)]
#[command(
    name = "pgvigil router",
    version,
    about = "Client router: 5000 to the primary, 5001 to the replicas, following the leader through etcd"
)]
struct RouterCli {
    /// The cluster's Patroni-format configuration (the agent's file works: scope, namespace,
    /// etcd3 and the `router:` section are used).
    config: Option<PathBuf>,
    /// Check the configuration, print warnings, and exit.
    #[arg(long)]
    validate_config: bool,
}

/// `pgvigil vip [CONFIG] [--release] [--validate-config]`: chosen when the first argument is
/// literally `vip`.
#[derive(Parser, Debug)]
#[command(
    name = "pgvigil vip",
    version,
    about = "Floating address: held by the host whose member leads the cluster (the `vip:` section)"
)]
struct VipCli {
    /// The cluster's Patroni-format configuration (the agent's file works: scope, name,
    /// namespace, etcd3 and the `vip:` section are used).
    config: Option<PathBuf>,
    /// Remove the address from this host if it has it, and exit (for systemd's ExecStopPost).
    #[arg(long)]
    release: bool,
    /// Check the configuration, print warnings, and exit.
    #[arg(long)]
    validate_config: bool,
}

/// Loads the configuration the way every mode does: file or directory plus `PATRONI_*`
/// variables; `--validate-config` prints the warnings and ends here; otherwise logging starts
/// and the warnings are logged. `Err` carries the exit code.
fn load_config(
    program: &str,
    path: Option<&std::path::Path>,
    validate: bool,
) -> Result<pgvigil_config::Loaded, ExitCode> {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("PATRONI_"))
        .collect();
    let loaded = match pgvigil_config::load(path, &env) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{program}: invalid configuration: {e}");
            return Err(ExitCode::from(2));
        }
    };
    if validate {
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        if let Err(e) = secure::prepare(&loaded.config) {
            eprintln!("{program}: invalid configuration: {e}");
            return Err(ExitCode::from(2));
        }
        println!("configuration is valid");
        return Err(ExitCode::SUCCESS);
    }
    wiring::init_logging(&loaded.config.log);
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    Ok(loaded)
}

fn router_main() -> ExitCode {
    let cli = RouterCli::parse_from(std::env::args_os().skip(1));
    let loaded = match load_config("pgvigil router", cli.config.as_deref(), cli.validate_config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    // The control plane (listeners, etcd watch, stats page) needs one thread; client connections
    // run on the router's own threads (`router.threads`).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgvigil router: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = pgvigil_router::shutdown_on_signals()?;
        pgvigil_router::run(loaded.config, cli.config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pgvigil router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn vip_main() -> ExitCode {
    let cli = VipCli::parse_from(std::env::args_os().skip(1));
    let loaded = match load_config("pgvigil vip", cli.config.as_deref(), cli.validate_config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let result = if cli.release {
        pgvigil_router::vip::release_only(&loaded.config, cli.config.as_deref())
    } else {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(async {
                let shutdown = pgvigil_router::shutdown_on_signals()?;
                pgvigil_router::vip::run(loaded.config, cli.config, shutdown).await
            }),
            Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pgvigil vip: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // Started by the agent itself (see `leadership::fence`): no runtime, no configuration.
    if std::env::args_os().nth(1).is_some_and(|a| a == "fencer") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        return leadership::fencer::main(&args);
    }
    pgvigil_tls::install_default_provider();
    match std::env::args_os().nth(1) {
        Some(a) if a == "router" => return router_main(),
        Some(a) if a == "vip" => return vip_main(),
        _ => {}
    }
    let cli = Cli::parse();
    let loaded = match load_config("pgvigil", cli.config.as_deref(), cli.validate_config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if nix::unistd::geteuid().is_root() {
        tracing::error!("pgvigil must not run as root: PostgreSQL refuses to. Run it as the postgres user.");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgvigil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before anything touches PostgreSQL: a bad TLS file must not be found after initdb.
    let prepared = match secure::prepare(&loaded.config) {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            eprintln!("pgvigil: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(wiring::run(loaded.config, cli.config, prepared)) {
        Ok(runtime::Exit::Shutdown) => ExitCode::SUCCESS,
        Ok(runtime::Exit::Fatal(message)) => {
            eprintln!("pgvigil: {message}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pgvigil: {e:#}");
            ExitCode::FAILURE
        }
    }
}
