//! The `keygate` binary: parses the command line and hands off. Exit codes: 0 success, 1 a
//! failure (or, for `scan`, a confirmed token), 2 invalid usage or configuration.
#![forbid(unsafe_code)]

use std::process::ExitCode;

// glibc's malloc spent ~9% of the gateway workers' time (largely consolidating hyper's read
// buffers); mimalloc's thread-local free lists fit the thread-per-core design. See
// docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use keygate::cli::{Cli, Command, ConfigCommand, StoreArgs};
use keygate::config::{Config, LogFormat, Overrides};
use keygate::{UsageError, client, root_key_cmd, scan_cmd, serve};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() { ExitCode::from(2) } else { ExitCode::from(1) }
        }
    }
}

fn load_config(args: &StoreArgs) -> anyhow::Result<Config> {
    let flags = Overrides { data_dir: args.data_dir.clone(), database_url: args.database_url.clone() };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Config::load(args.config.as_deref(), &env, &flags).map_err(|e| UsageError(format!("{e:#}")).into())
}

fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .map_err(|e| UsageError(format!("log.level {:?} is not a valid filter: {e}", cfg.log.level)))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let cfg = load_config(&args)?;
            init_logging(&cfg)?;
            serve::run(cfg, args.config.as_deref(), std::env::var("KEYGATE_PEPPER").ok().filter(|v| !v.is_empty()))
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::RootKey(cmd) => {
            let cfg = load_config(cmd.store())?;
            let pepper = std::env::var("KEYGATE_PEPPER").ok().filter(|v| !v.is_empty());
            root_key_cmd::run(cmd, &cfg, pepper).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            client::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scan(args) => scan_cmd::run(args).await,
        Command::Config(ConfigCommand::Check { file }) => {
            Config::from_file(&file).map_err(|e| UsageError(format!("{e:#}")))?;
            println!("{}: valid", file.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
