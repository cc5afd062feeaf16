//! The processes `meshctl demo` starts, as hidden subcommands of meshctl
//! itself, so the demo needs no other binary on the PATH. Each one exits
//! when its standard input closes: the demo holds the other end, so nothing
//! outlives it, even when it is killed. SIGTERM stops them too, with exit
//! status 0, as it stops a container.

use std::net::SocketAddr;
use std::os::fd::AsFd as _;

use crate::demo::apps;
use anyhow::Context;
use clap::Subcommand;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use trellis_control_plane::cli::{init_tracing, ControllerArgs};
use trellis_control_plane::controller::Controller;

#[derive(Subcommand)]
pub enum Internal {
    /// A sidecar proxy, configured by TRELLIS_* environment variables.
    Proxy,
    #[command(flatten)]
    Process(Process),
}

/// The demo's other processes, which stop at once on SIGTERM.
#[derive(Subcommand)]
pub enum Process {
    /// The controller.
    Controller(Box<ControllerArgs>),
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

/// Runs one of the demo's processes. A sidecar runs on the runtime
/// `trellis-proxy run` runs on (as configured, one thread by default) and
/// drains on SIGTERM with the same code; the others on a multi-thread one.
pub fn run(command: Internal) -> anyhow::Result<bool> {
    init_tracing("info");
    let process = match command {
        Internal::Process(process) => process,
        Internal::Proxy => return run_proxy(),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(run_process(process))
}

fn run_proxy() -> anyhow::Result<bool> {
    let config = trellis_proxy::Config::from_strings(&trellis_proxy::config::Env)?;
    let runtime = trellis_proxy::runtime(config.worker_threads).context("starting the runtime")?;
    let result = runtime.block_on(async {
        tokio::select! {
            result = trellis_proxy::run(config) => result,
            () = stdin_closed() => Ok(()),
        }
    });
    // As `trellis-proxy run`: tasks still running are not waited for.
    runtime.shutdown_background();
    result?;
    Ok(true)
}

async fn run_process(process: Process) -> anyhow::Result<bool> {
    // Replaces SIGTERM's default (die at once) before anything can send it.
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let work = async {
        match process {
            Process::Controller(args) => {
                let mut controller = Controller::start((*args).into_config().await?).await?;
                controller.wait().await;
                anyhow::bail!("a controller task stopped unexpectedly")
            }
            Process::Hello {
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
            Process::Frontend {
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
        _ = terminate.recv() => Ok(true),
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
