//! `meshctl`: the Trellis command line.

use clap::{Parser, Subcommand};
use meshctl::{
    authz, ca, check, demo, identity, inject, install, internal, proxy, rollout, route, stat, token,
};

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
    /// Roll a Service out to a canary step by step behind health gates
    /// (success rate, p99 latency), rolling back on its own when they fail.
    ///
    /// Example:
    ///   meshctl rollout start hello --stable hello-v1 --canary hello-v2 --steps 10,50,100 \
    ///     --interval 30s --min-success 99% --max-p99 200ms
    ///   meshctl rollout status hello --watch
    #[command(subcommand, verbatim_doc_comment)]
    Rollout(rollout::RolloutCommand),
    /// Who may call which port and path of a pod, and why (local mode: the
    /// manifest directory, resolved as the controller resolves it).
    /// WORKLOAD is the pod's name.
    ///
    /// Example: meshctl authz hello-v1
    #[command(verbatim_doc_comment)]
    Authz(authz::AuthzArgs),
    /// Put an app of yours behind a sidecar in the running demo's mesh: its
    /// identity, token and manifests are taken care of (Ctrl-C removes them).
    ///
    /// Example, for nginx listening on 127.0.0.1:8080:
    ///   meshctl proxy --name web --app 127.0.0.1:8080
    #[command(verbatim_doc_comment)]
    Proxy(proxy::ProxyArgs),
    /// Add the Trellis proxy to the workloads of a manifest file (or take it
    /// out with --uninject), offline, as the injection webhook would.
    ///
    /// Example: meshctl inject -f app.yaml --trust-bundle ca-bundle.crt | kubectl apply -f -
    #[command(verbatim_doc_comment)]
    Inject(inject::InjectArgs),
    /// Print the bootstrap token that proves a SPIFFE ID to the local-mode
    /// controller (for TRELLIS_TOKEN or TRELLIS_TOKEN_FILE).
    Token(token::TokenArgs),
    /// Print the Helm chart's manifests (the mesh on a cluster), rendered
    /// from its values, for `meshctl install | kubectl apply -f -`.
    Install(install::InstallArgs),
    /// Is the cluster ready for the mesh, and is the mesh healthy: a
    /// checklist (API, Kubernetes version, CRDs, the controller's RBAC, the
    /// controller, the webhook, the issuer, pods without a sidecar) with a
    /// fix for each failed item; exits non-zero if any failed.
    Check(check::CheckArgs),
    /// Processes the demo starts (controller, proxies, apps); not for direct use.
    #[command(hide = true, subcommand)]
    Internal(internal::Internal),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        // These choose their runtime: a sidecar runs on the one
        // `trellis-proxy run` runs on.
        Command::Internal(command) => internal::run(command),
        Command::Proxy(args) => proxy::run(args),
        command => tokio::runtime::Runtime::new()
            .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
            .and_then(|runtime| runtime.block_on(run(command))),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Demo(args) => demo::run(args).await,
        Command::Route(command) => route::run(command),
        Command::Authz(args) => authz::run(args),
        Command::Rollout(command) => rollout::run(command).await,
        Command::Identity(args) => identity::run(args).await,
        Command::Ca(args) => ca::run(args),
        Command::Install(args) => install::run(args),
        Command::Check(args) => check::run(args).await,
        Command::Stat(args) => stat::stat(args).await,
        Command::Graph(args) => stat::graph(args).await,
        Command::Token(args) => token::run(args),
        Command::Inject(args) => inject::run(args),
        Command::Internal(_) | Command::Proxy(_) => {
            unreachable!("main runs these on their own runtime")
        }
    }
}
