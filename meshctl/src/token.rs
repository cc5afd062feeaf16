//! `meshctl token SPIFFE_ID`: the bootstrap token that proves an identity to
//! the local-mode controller, for scripts that start a sidecar themselves
//! (`TRELLIS_TOKEN` or `TRELLIS_TOKEN_FILE`).

use std::path::PathBuf;

use crate::context::{self, Context};
use anyhow::{bail, Context as _};
use trellis_control_plane::identity::BootstrapTokens;
use trellis_proto::SpiffeId;

/// The trust domain a controller has unless told otherwise.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The workload's identity, spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>.
    spiffe_id: String,
    /// The controller's state directory (default: the running demo's).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The controller's trust domain, with --state-dir [default: cluster.local].
    #[arg(long, requires = "state_dir")]
    trust_domain: Option<String>,
}

pub fn run(args: TokenArgs) -> anyhow::Result<bool> {
    let (state_dir, trust_domain) = match args.state_dir {
        Some(dir) => (
            dir,
            args.trust_domain
                .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into()),
        ),
        None => {
            let demo = Context::running(&context::path()).map_err(|e| {
                anyhow::anyhow!("{e}; or pass --state-dir DIR (the controller's) for another mesh")
            })?;
            (demo.state_dir, demo.trust_domain)
        }
    };
    let identity = identity_in(&args.spiffe_id, &trust_domain)?;
    println!("{}", open(&state_dir)?.token_for(&identity));
    Ok(true)
}

/// `spiffe_id` parsed, if it is in `trust_domain`.
fn identity_in(spiffe_id: &str, trust_domain: &str) -> anyhow::Result<SpiffeId> {
    let identity: SpiffeId = spiffe_id.parse()?;
    if identity.trust_domain != trust_domain {
        bail!(
            "{identity} is in trust domain {:?}, but the mesh's is {trust_domain:?}; \
             use spiffe://{trust_domain}/ns/{}/sa/{}",
            identity.trust_domain,
            identity.namespace,
            identity.service_account
        );
    }
    Ok(identity)
}

/// The bootstrap tokens of the controller whose state directory is `dir`.
pub fn open(dir: &std::path::Path) -> anyhow::Result<BootstrapTokens> {
    BootstrapTokens::load(dir).context("opening the controller's bootstrap token key")
}
