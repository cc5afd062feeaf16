//! `trellis-proxy run`: the sidecar. (`init`, the iptables set-up for
//! transparent mode, comes with transparent interception.)

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trellis-proxy", version, about = "The Trellis sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, configured by TRELLIS_* environment variables.
    Run,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run => {
            let config = trellis_proxy::Config::from_strings(&trellis_proxy::config::Env)?;
            let proxy = trellis_proxy::start(config)
                .await
                .context("starting the proxy")?;
            tokio::select! {
                () = proxy.wait() => anyhow::bail!("a proxy task stopped unexpectedly"),
                signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
            }
            Ok(())
        }
    }
}
