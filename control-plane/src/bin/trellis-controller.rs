//! `trellis-controller`: the Trellis control plane, reading a cluster's
//! API or a directory of manifests.

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use trellis_control_plane::cli::{init_tracing, ControllerArgs};
use trellis_control_plane::controller::Controller;

#[derive(Parser)]
#[command(
    name = "trellis-controller",
    version,
    about = "The Trellis control plane"
)]
struct Cli {
    #[command(flatten)]
    controller: ControllerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("info");
    let cli = Cli::parse();
    let config = cli.controller.into_config().await?;
    // SIGTERM is how Kubernetes stops a pod: stop gracefully, not at once.
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut controller = Controller::start(config)
        .await
        .context("starting the controller")?;
    tokio::select! {
        () = controller.wait() => anyhow::bail!("a controller task stopped unexpectedly"),
        signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    // Hands the Lease over at once rather than when it expires.
    controller.shutdown().await;
    Ok(())
}
