//! `meshctl`: the Trellis command line.

mod ca;
mod demo;
mod identity;
mod internal;
mod report;
mod route;
mod stat;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Run, inspect and steer a Trellis mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local demo mesh (no Kubernetes, no root): a frontend calling
    /// `hello` v1 and v2 through sidecars, with live traffic and a summary.
    Demo(demo::DemoArgs),
    /// Golden metrics per Service version: RPS, success rate, latency, mTLS share.
    Stat(stat::StatArgs),
    /// The service graph: who calls whom, with RPS and success rate.
    Graph(stat::GraphArgs),
    /// Rotate the CA (local mode): issuer, or root in three steps.
    Ca(ca::CaArgs),
    /// Show the certificate (SPIFFE ID, issuer, expiry) each proxy presents.
    Identity(identity::IdentityArgs),
    /// Route a Service's traffic: weighted splits, A/B matches, timeouts,
    /// retries and fault injection (Gateway API HTTPRoute).
    #[command(subcommand)]
    Route(route::RouteCommand),
    /// Processes the demo starts (controller, proxies, apps); not for direct use.
    #[command(hide = true, subcommand)]
    Internal(internal::Internal),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Route(command) => route::run(command),
            Command::Identity(args) => identity::run(args).await,
            Command::Ca(args) => ca::run(args),
            Command::Stat(args) => stat::stat(args).await,
            Command::Graph(args) => stat::graph(args).await,
            Command::Internal(command) => internal::run(command).await,
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
