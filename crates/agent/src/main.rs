//! `pgvigil CONFIG.yml`: the HA agent, a drop-in replacement for `patroni CONFIG.yml`.

mod runtime;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("PATRONI_"))
        .collect();
    let loaded = match pgvigil_config::load(cli.config.as_deref(), &env) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("pgvigil: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.validate_config {
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    wiring::init_logging(&loaded.config.log);
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
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
    match runtime.block_on(wiring::run(loaded.config, cli.config)) {
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
