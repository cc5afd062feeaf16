//! The processes `meshctl demo` starts, as hidden subcommands of meshctl
//! itself, so the demo needs no other binary on the PATH. Each one exits
//! when its standard input closes: the demo holds the other end, so nothing
//! outlives it, even when it is killed.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Subcommand;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use trellis_control_plane::cli::{init_tracing, ControllerArgs};
use trellis_control_plane::controller::Controller;
use trellis_control_plane::demo::apps;

#[derive(Subcommand)]
pub enum Internal {
    /// The controller.
    Controller(ControllerArgs),
    /// A sidecar proxy, configured by TRELLIS_* environment variables.
    Proxy,
    /// The `hello` application.
    Hello {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        version: String,
        #[arg(long)]
        pod: String,
    },
    /// The `frontend` application.
    Frontend {
        #[arg(long)]
        listen: SocketAddr,
        /// The Service authority to call.
        #[arg(long)]
        backend: String,
        /// The sidecar's outbound listener.
        #[arg(long)]
        proxy: SocketAddr,
    },
}

pub async fn run(command: Internal) -> anyhow::Result<bool> {
    init_tracing("info");
    let work = async {
        match command {
            Internal::Controller(args) => {
                let controller = Controller::start(args.into()).await?;
                controller.wait().await;
                anyhow::bail!("a controller task stopped unexpectedly")
            }
            Internal::Proxy => {
                let config = trellis_proxy::Config::from_strings(&trellis_proxy::config::Env)?;
                trellis_proxy::start(config).await?.wait().await;
                anyhow::bail!("a proxy task stopped unexpectedly")
            }
            Internal::Hello {
                listen,
                version,
                pod,
            } => {
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                apps::hello(listener, version, pod).await;
                Ok(())
            }
            Internal::Frontend {
                listen,
                backend,
                proxy,
            } => {
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                apps::frontend(listener, backend, proxy).await;
                Ok(())
            }
        }
    };
    tokio::select! {
        result = work => result.map(|()| true),
        () = stdin_closed() => Ok(true),
    }
}

async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
