//! `promote`, `abort`, `pause`, `resume`: each sets a spec field of the
//! rollout and rewrites its file; the controller acts on its next tick.

use anyhow::bail;
use trellis_control_plane::model::{ObjectKey, Phase, Rollout, RolloutStatus};
use trellis_control_plane::rollout::plan::Plan;

use super::{current_status, find, rollout_yaml, write_atomically, Found, Target};

/// The rollout `target` names, its current status, and a writer for its file.
struct Editing {
    found: Found,
    status: Option<RolloutStatus>,
    key: ObjectKey,
}

impl Editing {
    fn open(target: &Target) -> anyhow::Result<Self> {
        let dir = target.place.dir()?;
        let key = ObjectKey::new(&target.place.namespace, &target.name);
        let found = find(&dir, &key)?;
        if found.shared {
            bail!(
                "rollout {key} is in {} with other objects; meshctl rewrites only a file \
                 of its own: set the spec field there (paused, promote or abort)",
                found.file.display()
            );
        }
        let status = current_status(&dir, &found.rollout);
        Ok(Self { found, status, key })
    }

    /// The status, or why there is none to act on yet.
    fn status(&self) -> anyhow::Result<&RolloutStatus> {
        self.status.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "the controller has not picked up rollout {} yet (no status for this run); \
                 is it running on {}? try again in a moment",
                self.key,
                self.found
                    .file
                    .parent()
                    .map_or_else(String::new, |d| d.display().to_string())
            )
        })
    }

    /// Refuses to change a rollout that has ended.
    fn not_ended(&self, verb: &str) -> anyhow::Result<()> {
        match self.status.as_ref().map(|s| s.phase) {
            Some(phase) if phase.is_final() => bail!(
                "rollout {} has ended ({phase}); nothing to {verb}: \
                 `meshctl rollout start` begins a new run",
                self.key
            ),
            _ => Ok(()),
        }
    }

    fn write(&self, rollout: &Rollout) -> anyhow::Result<()> {
        write_atomically(&self.found.file, &rollout_yaml(rollout)?)
    }
}

pub fn promote(target: &Target) -> anyhow::Result<bool> {
    let editing = Editing::open(target)?;
    editing.not_ended("promote")?;
    let status = editing.status()?;
    if status.phase == Phase::Invalid {
        bail!(
            "rollout {} is invalid; fix its spec first: {}",
            editing.key,
            refusal(status)
        );
    }
    let mut rollout = editing.found.rollout.clone();
    rollout.spec.promote = Some(status.step);
    editing.write(&rollout)?;
    let next = match Plan::new(&rollout, 0)
        .ok()
        .and_then(|plan| plan.stages.get(status.step as usize + 1).map(|s| s.weight))
    {
        Some(weight) => format!(
            "step {}/{}: canary {weight}%",
            status.step + 2,
            status.steps
        ),
        None => "promoted: the canary gets 100%".into(),
    };
    println!(
        "rollout {}: step {}/{} (canary {}%) promoted; next, {next}",
        editing.key,
        status.step + 1,
        status.steps,
        status.canary_weight
    );
    if rollout.spec.paused {
        println!("note: it is paused; the promote takes effect on `meshctl rollout resume`");
    }
    Ok(true)
}

pub fn abort(target: &Target) -> anyhow::Result<bool> {
    let editing = Editing::open(target)?;
    let mut rollout = editing.found.rollout.clone();
    let stable = rollout.spec.backends.stable.clone();
    if rollout.spec.abort {
        println!(
            "rollout {} is already aborted: all traffic goes to {stable}",
            editing.key
        );
        return Ok(true);
    }
    rollout.spec.abort = true;
    editing.write(&rollout)?;
    println!(
        "rollout {} aborted: all traffic goes to {stable} (the canary {} gets none)",
        editing.key, rollout.spec.backends.canary
    );
    Ok(true)
}

/// `pause` (`paused` true) or `resume` (false).
pub fn pause(target: &Target, paused: bool) -> anyhow::Result<bool> {
    let editing = Editing::open(target)?;
    let verb = if paused { "pause" } else { "resume" };
    editing.not_ended(verb)?;
    let mut rollout = editing.found.rollout.clone();
    if rollout.spec.paused == paused {
        let state = if paused {
            "already paused"
        } else {
            "not paused by the user"
        };
        println!("rollout {} is {state}; nothing changed", editing.key);
        if let Some(status) = editing
            .status
            .as_ref()
            .filter(|s| !paused && s.phase == Phase::Paused)
        {
            println!(
                "the controller paused it: {}; it continues by itself when a window \
                 passes, or `meshctl rollout promote` ends the step",
                progressing(status)
            );
        }
        return Ok(true);
    }
    rollout.spec.paused = paused;
    editing.write(&rollout)?;
    match paused {
        true => println!(
            "rollout {} paused: it holds its step until `meshctl rollout resume`",
            editing.key
        ),
        false => println!("rollout {} resumed: a new gate window starts", editing.key),
    }
    Ok(true)
}

/// Why the controller refused the spec.
fn refusal(status: &RolloutStatus) -> String {
    condition(status, "Accepted")
}

fn progressing(status: &RolloutStatus) -> String {
    condition(status, "Progressing")
}

fn condition(status: &RolloutStatus, kind: &str) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.kind == kind)
        .map_or_else(
            || "no reason given".into(),
            |c| format!("{}: {}", c.reason, c.message),
        )
}
