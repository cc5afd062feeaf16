//! `meshctl rollout start|status|promote|abort|pause|resume|list`: canary
//! and A/B rollouts in local mode. A rollout is a manifest file in the
//! controller's manifest directory, checked exactly as the controller will
//! before it is written; the controller carries it out and keeps its status
//! beside the manifests (`.status/`), which these commands read. Commands
//! (`promote`, `abort`, `pause`, `resume`) are spec fields: each rewrites the
//! rollout's file, and the controller acts on its next tick.

mod command;
mod show;
pub mod start;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::jiff::Timestamp;
use trellis_control_plane::model::{Object, ObjectKey, Phase, Rollout, RolloutStatus};
use trellis_control_plane::rollout::{self as controller, local, STARTED_AT_ANNOTATION};
use trellis_control_plane::source::local::parse_dir;

use crate::context::manifests_dir;
pub use start::StartArgs;

#[derive(clap::Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout of SERVICE from its stable backend to a canary,
    /// step by step behind health gates (a new run if it exists).
    ///
    /// Examples:
    ///   meshctl rollout start hello --stable hello-v1 --canary hello-v2 \
    ///     --steps 10,50,100 --interval 30s --min-success 99% --max-p99 200ms
    ///   meshctl rollout start hello --stable hello-v1 --canary hello-v2 \
    ///     --ab-header x-beta=yes --ab-windows 3 --steps 50,100 --min-success 99%
    #[command(verbatim_doc_comment)]
    Start(Box<StartArgs>),
    /// Where a rollout is: steps, progress, gates against their thresholds,
    /// golden metrics, conditions and the last decisions.
    Status(StatusArgs),
    /// End the current step now, gates or not (the next step, or 100% canary).
    Promote(Target),
    /// Send all traffic to the stable backend at once, and stop.
    Abort(Target),
    /// Hold the current step until `resume`.
    Pause(Target),
    /// Carry on after `pause`.
    Resume(Target),
    /// Every rollout in the manifest directory.
    List(ListArgs),
}

/// A rollout to act on.
#[derive(clap::Args)]
pub struct Target {
    /// The rollout's name (by default, `start` names it after its Service).
    name: String,
    #[command(flatten)]
    place: Place,
}

/// Where rollouts live.
#[derive(clap::Args, Clone)]
pub struct Place {
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The manifest directory the controller serves (default: the running
    /// demo's, from the meshctl context).
    #[arg(long, env = "TRELLIS_MANIFESTS")]
    manifests: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Format,
    /// Redraw as the rollout moves until it ends; the exit status is 0 once
    /// it is promoted, 1 when it is rolled back, aborted or invalid.
    #[arg(long, short = 'w')]
    watch: bool,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Only this namespace (default: all).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    #[arg(long, env = "TRELLIS_MANIFESTS")]
    manifests: Option<PathBuf>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Format,
}

pub async fn run(command: RolloutCommand) -> anyhow::Result<bool> {
    match command {
        RolloutCommand::Start(args) => {
            let started = start::start(&args)?;
            println!("{}", started.message);
            Ok(true)
        }
        RolloutCommand::Status(args) => show::status(&args).await,
        RolloutCommand::Promote(target) => command::promote(&target),
        RolloutCommand::Abort(target) => command::abort(&target),
        RolloutCommand::Pause(target) => command::pause(&target, true),
        RolloutCommand::Resume(target) => command::pause(&target, false),
        RolloutCommand::List(args) => show::list(&args),
    }
}

impl Place {
    /// The manifest directory: `--manifests`, or the running demo's.
    fn dir(&self) -> anyhow::Result<PathBuf> {
        manifests_dir(self.manifests.as_deref())
    }
}

/// A rollout as the manifest directory holds it.
struct Found {
    rollout: Rollout,
    /// The file it is in.
    file: PathBuf,
    /// Whether that file holds other objects too (then it is not rewritten).
    shared: bool,
}

/// Every Rollout in `dir`, with its file.
fn rollouts_in(dir: &Path) -> anyhow::Result<Vec<Found>> {
    let parsed = parse_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut found = Vec::new();
    for (file, objects) in parsed {
        let Ok(objects) = objects else { continue };
        let shared = objects.len() > 1;
        for object in objects {
            if let Object::Rollout(rollout) = object {
                found.push(Found {
                    rollout: *rollout,
                    file: file.clone(),
                    shared,
                });
            }
        }
    }
    Ok(found)
}

/// The rollout `key` in `dir`, or an error saying how to find one.
fn find(dir: &Path, key: &ObjectKey) -> anyhow::Result<Found> {
    rollouts_in(dir)?
        .into_iter()
        .find(|f| f.rollout.metadata.key() == *key)
        .with_context(|| {
            format!(
                "no rollout {key} in {}; `meshctl rollout list` shows the rollouts, \
                 `meshctl rollout start` creates one",
                dir.display()
            )
        })
}

/// The rollout `key` in `dir` and the status of its current run, if the
/// controller has written one (`None` when there is no such rollout).
pub fn read(dir: &Path, key: &ObjectKey) -> Option<(Rollout, Option<RolloutStatus>)> {
    let found = find(dir, key).ok()?;
    let status = current_status(dir, &found.rollout);
    Some((found.rollout, status))
}

/// The status the controller wrote for this run of `rollout`, if it has
/// picked it up: a status of an earlier run (before a new `start`) is
/// none. A spec the controller refuses keeps the run it refused, so an
/// Invalid status counts when it was written after the rollout started.
fn current_status(dir: &Path, rollout: &Rollout) -> Option<RolloutStatus> {
    let status = local::read_status(dir, &rollout.metadata.key())?;
    if status.run == controller::run_of(rollout) {
        return Some(status);
    }
    let refused_since_start = || {
        let started = started_at(rollout)?;
        let refused = status
            .conditions
            .iter()
            .find(|c| c.kind == "Accepted" && c.status == "False")?;
        let refused: Timestamp = refused.last_transition_time.parse().ok()?;
        Some(refused >= started)
    };
    (status.phase == Phase::Invalid && refused_since_start().unwrap_or(true)).then_some(status)
}

fn started_at(rollout: &Rollout) -> Option<Timestamp> {
    rollout
        .metadata
        .annotations
        .get(STARTED_AT_ANNOTATION)?
        .parse()
        .ok()
}

/// Writes a rollout's file so the controller reads the old file or the new
/// one, never half of one.
fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    trellis_control_plane::source::local::write_atomically(path, contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The rollout as the YAML file meshctl writes.
fn rollout_yaml(rollout: &Rollout) -> anyhow::Result<String> {
    let mut rollout = rollout.clone();
    // Status lives in `.status/`, written by the controller only.
    rollout.status = None;
    let yaml = serde_saphyr::to_string(&rollout).context("writing the rollout as YAML")?;
    Ok(format!(
        "# Written by `meshctl rollout`; change it with meshctl rollout promote|abort|pause|resume.\n{yaml}"
    ))
}
