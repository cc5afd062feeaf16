//! `meshctl ca`: rotate the local-mode CA's files. The controller re-reads
//! them within a second; proxies pick up the new chain and bundle at their
//! next renewal.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use trellis_control_plane::identity;

#[derive(clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    step: Step,
    /// The controller's state directory (where root.crt and issuer.crt live).
    #[arg(long, global = true, env = "TRELLIS_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Step {
    /// Sign a new issuer with the current root (no trust change needed).
    RotateIssuer {
        #[arg(long, default_value = "8760h", value_parser = identity::parse_issuer_lifetime)]
        lifetime: Duration,
    },
    /// Root rotation, step 1: add a new root to the trust bundle.
    AddRoot,
    /// Step 2 (after one leaf lifetime): sign with the new root.
    ActivateRoot,
    /// Step 3 (after another leaf lifetime): trust only the new root.
    RetireOldRoots,
}

pub fn run(args: CaArgs) -> anyhow::Result<bool> {
    let dir = args
        .state_dir
        .context("pass --state-dir DIR (the controller's state directory)")?;
    let (result, done) = match args.step {
        Step::RotateIssuer { lifetime } => (
            identity::rotate_issuer(&dir, lifetime),
            "new issuer written",
        ),
        Step::AddRoot => (
            identity::add_root(&dir),
            "new root added to the trust bundle; activate it after one leaf lifetime",
        ),
        Step::ActivateRoot => (
            identity::activate_next_root(&dir),
            "new root active; retire the old one after one leaf lifetime",
        ),
        Step::RetireOldRoots => (
            identity::retire_old_roots(&dir),
            "trust bundle now holds only the current root",
        ),
    };
    result?;
    println!("{done} ({})", dir.display());
    Ok(true)
}
