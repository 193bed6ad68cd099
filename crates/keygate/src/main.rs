//! The `keygate` binary: parses the command line and hands off. Exit codes are decided by
//! [`keygate::exit_code`]: 0 success, 1 the server refused or another failure (for `scan`, a
//! confirmed token), 2 invalid usage or configuration, 3 the admin API could not be reached.
#![forbid(unsafe_code)]

use std::process::ExitCode;

// glibc's malloc spent ~9% of the gateway workers' time (largely consolidating hyper's read
// buffers); mimalloc's thread-local free lists fit the thread-per-core design. See
// docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use keygate::cli::{AuditCommand, Cli, Command, ConfigCommand, StoreArgs};
use keygate::config::{Config, LogFormat, Overrides};
use keygate::{UsageError, api_cmd, root_key_cmd, scan_cmd, serve};

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
            ExitCode::from(keygate::exit_code(&e))
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
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = match cfg.log.format.resolve(terminal) {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        // Colours only where a person reads them.
        LogFormat::Text | LogFormat::Auto => builder.with_ansi(terminal).try_init(),
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
        Command::Token(args) => api_cmd::token::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::App(args) => api_cmd::app::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::OauthClient(args) => api_cmd::oauth::run_client(args).await.map(|()| ExitCode::SUCCESS),
        Command::SigningKey(args) => api_cmd::oauth::run_keys(args).await.map(|()| ExitCode::SUCCESS),
        Command::Plan(args) => api_cmd::plan::run_plan(args).await.map(|()| ExitCode::SUCCESS),
        Command::Scope(args) => api_cmd::plan::run_scope(args).await.map(|()| ExitCode::SUCCESS),
        Command::Audit(args) => match &args.command {
            // On the store directly: when it is named, or when there is no admin key to ask a
            // server with and the store of the environment (or ./keygate-data) exists.
            AuditCommand::Verify { data_dir, database_url, workspace, checkpoint }
                if data_dir.is_some()
                    || database_url.is_some()
                    || std::env::var("KEYGATE_ADMIN_KEY").map_or(true, |k| k.is_empty()) =>
            {
                let named = data_dir.is_some() || database_url.is_some();
                let store = StoreArgs { config: None, data_dir: data_dir.clone(), database_url: database_url.clone() };
                let cfg = load_config(&store)?;
                if !named && cfg.database_url.is_none() && !cfg.data_dir.exists() {
                    return Err(UsageError(format!(
                        "no KEYGATE_ADMIN_KEY to ask a running keygate with, and no store at {}: set KEYGATE_ADMIN_KEY, or give --data-dir or --database-url",
                        cfg.data_dir.display()
                    ))
                    .into());
                }
                let pepper = std::env::var("KEYGATE_PEPPER").ok().filter(|v| !v.is_empty());
                api_cmd::audit::verify_on_store(
                    &cfg,
                    pepper,
                    workspace.as_deref(),
                    checkpoint.as_deref(),
                    args.api.output,
                )
                .await
            }
            _ => api_cmd::audit::run(args).await,
        },
        Command::Apply(args) => api_cmd::apply::run_apply(args).await.map(|()| ExitCode::SUCCESS),
        Command::Export(args) => api_cmd::apply::run_export(args).await.map(|()| ExitCode::SUCCESS),
        Command::Route(args) => api_cmd::route::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Provider(args) => api_cmd::provider::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Api(args) => api_cmd::api::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Policy(args) => api_cmd::policy::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Subscription(args) => api_cmd::subscription::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Report(args) => api_cmd::report::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Workspace(args) => api_cmd::workspace::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "keygate", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Scan(args) => scan_cmd::run(args).await,
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::from_file(&file).map_err(|e| UsageError(format!("{e:#}")))?;
            // Valid, but dangerous: said as loudly here as at start.
            for r in config.routes.iter().filter(|r| r.tls_insecure_skip_verify) {
                eprintln!(
                    "warning: route {:?}: DANGER: tls_insecure_skip_verify = true: its https upstreams' certificates \
                     and names are not verified",
                    r.id
                );
            }
            println!("{}: valid", file.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
