//! The processes `meshctl demo` starts, as hidden subcommands of meshctl
//! itself, so the demo needs no other binary on the PATH. Each one exits
//! when its standard input closes: the demo holds the other end, so nothing
//! outlives it, even when it is killed. SIGTERM stops them too, with exit
//! status 0, as it stops a container.

use std::net::SocketAddr;
use std::os::fd::AsFd as _;

use anyhow::Context;
use clap::Subcommand;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
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
    // Replaces SIGTERM's default (die at once) before anything can send it.
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let drains = matches!(command, Internal::Proxy);
    let work = async {
        match command {
            Internal::Controller(args) => {
                let controller = Controller::start(args.into()).await?;
                controller.wait().await;
                anyhow::bail!("a controller task stopped unexpectedly")
            }
            // The sidecar drains on SIGTERM like `trellis-proxy run`, with
            // the same code.
            Internal::Proxy => {
                let config = trellis_proxy::Config::from_strings(&trellis_proxy::config::Env)?;
                trellis_proxy::run(config).await?;
                Ok(())
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
        _ = terminate.recv(), if !drains => Ok(true),
    }
}

/// Returns when standard input closes: the demo, which holds the other end,
/// stopped or died.
async fn stdin_closed() {
    // A pipe is read without a thread: the runtime waits for its blocking
    // threads when it shuts down, so one blocked reading stdin would keep the
    // process alive after it stopped for another reason (SIGTERM, a failure).
    let pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(pipe::Receiver::from_owned_fd);
    match pipe {
        Ok(pipe) => until_end(pipe).await,
        // A terminal or a file: run by hand.
        Err(_) => until_end(tokio::io::stdin()).await,
    }
}

async fn until_end(mut input: impl AsyncRead + Unpin) {
    let mut buf = [0u8; 64];
    while let Ok(n) = input.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
