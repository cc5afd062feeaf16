//! `status` and `list`: a rollout and its status, for people (tables, a
//! progress bar) and for programs (the Rollout object with its status).

use std::io::IsTerminal as _;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use trellis_control_plane::model::{
    GateStatus, Golden, ObjectKey, Phase, Rollout, RolloutStatus, Verdict,
};
use trellis_control_plane::rollout::plan::{Hold, Plan};

use super::{current_status, find, rollouts_in, started_at, Format, ListArgs, StatusArgs};
use crate::context::manifests_dir;
use crate::route::render_table;

/// How often `--watch` looks at the status (the controller ticks every 200 ms).
const WATCH_EVERY: Duration = Duration::from_millis(500);

pub async fn status(args: &StatusArgs) -> anyhow::Result<bool> {
    let dir = args.target.place.dir()?;
    let key = ObjectKey::new(&args.target.place.namespace, &args.target.name);
    let tty = std::io::stdout().is_terminal();
    let mut shown: Option<(Rollout, Option<RolloutStatus>)> = None;
    loop {
        let mut rollout = find(&dir, &key)?.rollout;
        let status = current_status(&dir, &rollout);
        let changed = shown.as_ref() != Some(&(rollout.clone(), status.clone()));
        if !args.watch || tty || changed {
            let text = match args.output {
                Format::Table => render(&rollout, status.as_ref(), Timestamp::now()),
                Format::Json | Format::Yaml => {
                    rollout.status = status.clone();
                    match args.output {
                        Format::Json => serde_json::to_string_pretty(&rollout)? + "\n",
                        _ => serde_saphyr::to_string(&rollout)?,
                    }
                }
            };
            if args.watch && tty {
                // Clear the screen and home the cursor: redraw in place.
                print!("\x1b[2J\x1b[H");
            } else if args.watch && shown.is_some() && args.output != Format::Json {
                // A YAML document separator; JSON objects follow each other.
                println!("---");
            }
            print!("{text}");
            rollout.status = None;
            shown = Some((rollout, status.clone()));
        }
        if !args.watch {
            return Ok(true);
        }
        match status.as_ref().map(|s| s.phase) {
            Some(Phase::Promoted) => return Ok(true),
            Some(Phase::RolledBack | Phase::Aborted) => return Ok(false),
            Some(Phase::Invalid) => {
                let why = status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.kind == "Accepted"))
                    .map_or_else(String::new, |c| c.message.clone());
                eprintln!("rollout {key} is invalid: {why}");
                return Ok(false);
            }
            _ => tokio::time::sleep(WATCH_EVERY).await,
        }
    }
}

pub fn list(args: &ListArgs) -> anyhow::Result<bool> {
    let dir = manifests_dir(args.manifests.as_deref())?;
    let mut rollouts: Vec<Rollout> = rollouts_in(&dir)?
        .into_iter()
        .map(|found| found.rollout)
        .filter(|r| {
            args.namespace
                .as_ref()
                .is_none_or(|ns| r.metadata.key().namespace == *ns)
        })
        .map(|mut rollout| {
            rollout.status = current_status(&dir, &rollout);
            rollout
        })
        .collect();
    rollouts.sort_by_key(|r| r.metadata.key());
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rollouts)?),
        Format::Yaml => print!("{}", serde_saphyr::to_string(&rollouts)?),
        Format::Table if rollouts.is_empty() => {
            println!("no rollouts in {}", dir.display())
        }
        Format::Table => {
            let now = Timestamp::now();
            let mut rows = vec![[
                "NAMESPACE",
                "NAME",
                "SERVICE",
                "CANARY",
                "PHASE",
                "STEP",
                "WEIGHT",
                "AGE",
            ]
            .map(String::from)
            .to_vec()];
            for r in &rollouts {
                let key = r.metadata.key();
                let status = r.status.as_ref();
                rows.push(vec![
                    key.namespace,
                    key.name,
                    r.spec.service.clone(),
                    r.spec.backends.canary.clone(),
                    status.map_or("Pending".into(), |s| s.phase.to_string()),
                    status.map_or("-".into(), |s| format!("{}/{}", shown_step(s), s.steps)),
                    status.map_or("-".into(), |s| format!("{}%", s.canary_weight)),
                    started_at(r).map_or("-".into(), |t| age(now.duration_since(t))),
                ]);
            }
            print!("{}", render_table(&rows));
        }
    }
    Ok(true)
}

/// The step people count (1-based; a promoted rollout is past its last).
fn shown_step(status: &RolloutStatus) -> u32 {
    (status.step + 1).min(status.steps.max(1))
}

/// The rollout for people: where it is, why, and what comes next.
pub fn render(rollout: &Rollout, status: Option<&RolloutStatus>, now: Timestamp) -> String {
    let key = rollout.metadata.key();
    let spec = &rollout.spec;
    let mut out = format!(
        "Rollout {key}: Service {} from {} (stable) to {} (canary), route {}\n",
        spec.service,
        spec.backends.stable,
        spec.backends.canary,
        rollout.route_name()
    );
    let Some(status) = status else {
        out.push_str(
            "Phase     Pending: the controller has not picked up this run yet \
             (is it running on this manifest directory?)\n",
        );
        out.push_str(&steps(rollout, None));
        return out;
    };
    let progressing = status.conditions.iter().find(|c| c.kind == "Progressing");
    out.push_str(&format!(
        "Phase     {}{}\n",
        status.phase,
        progressing.map_or_else(String::new, |c| format!(" ({}: {})", c.reason, c.message))
    ));
    out.push_str(&format!("Progress  {}\n", progress_bar(status)));
    out.push_str(&steps(rollout, Some(status)));

    let analysis = &spec.analysis;
    out.push_str(&format!(
        "\nGates (window {}, at least {} canary requests; roll back after {} failed in a row{}):\n",
        analysis.interval,
        analysis.min_requests,
        analysis.rollback.consecutive_failures,
        analysis
            .rollback
            .total_failures
            .map_or_else(String::new, |m| format!(" or {m} in all")),
    ));
    if status.gates.is_empty() {
        out.push_str("  no window judged yet\n");
    } else {
        let mut rows = vec![["GATE", "THRESHOLD", "LAST VALUE", "VERDICT"]
            .map(String::from)
            .to_vec()];
        rows.extend(status.gates.iter().map(gate_row));
        out.push_str(&indent(&render_table(&rows)));
    }
    out.push_str(&format!(
        "  failed windows: {} in a row, {} in all; inconclusive in a row: {} (pause at {})\n",
        status.consecutive_failures,
        status.total_failures,
        status.inconclusive_windows,
        analysis.inconclusive_limit
    ));

    if status.canary.is_some() || status.stable.is_some() {
        out.push_str("\nTraffic (last window):\n");
        let mut rows = vec![["BACKEND", "ROLE", "REQUESTS", "SUCCESS", "P99"]
            .map(String::from)
            .to_vec()];
        for (name, role, golden) in [
            (&spec.backends.canary, "canary", &status.canary),
            (&spec.backends.stable, "stable", &status.stable),
        ] {
            if let Some(golden) = golden {
                rows.push(golden_row(name, role, golden));
            }
        }
        out.push_str(&indent(&render_table(&rows)));
    }

    if let Some(next) = status.next_decision_at.as_deref() {
        let within = next
            .parse::<Timestamp>()
            .ok()
            .map(|t| seconds(t.duration_since(now)))
            .map_or_else(String::new, |s| format!(" (in {s:.1}s)"));
        out.push_str(&format!("\nNext decision  {next}{within}\n"));
    }

    out.push_str("\nConditions:\n");
    let mut rows = vec![["TYPE", "STATUS", "REASON", "MESSAGE", "SINCE"]
        .map(String::from)
        .to_vec()];
    rows.extend(status.conditions.iter().map(|c| {
        vec![
            c.kind.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.last_transition_time.clone(),
        ]
    }));
    out.push_str(&indent(&render_table(&rows)));

    if !status.history.is_empty() {
        out.push_str("\nDecisions (oldest first):\n");
        let mut rows = vec![["TIME", "STEP", "WEIGHT", "REASON", "MESSAGE"]
            .map(String::from)
            .to_vec()];
        rows.extend(status.history.iter().map(|d| {
            vec![
                d.time.clone(),
                format!("{}", d.step + 1),
                format!("{}%", d.canary_weight),
                d.reason.clone(),
                d.message.clone(),
            ]
        }));
        out.push_str(&indent(&render_table(&rows)));
    }
    out
}

/// `[#####-----] step 2/3 canary 50%`: ten cells, one per 10% of traffic.
pub fn progress_bar(status: &RolloutStatus) -> String {
    let filled = (status.canary_weight.min(100) as usize).div_ceil(10);
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(10 - filled));
    let step = format!("step {}/{}", shown_step(status), status.steps);
    let weight = format!("canary {}%", status.canary_weight);
    let cohort = if status.cohort { " + A/B cohort" } else { "" };
    match status.phase {
        Phase::Promoted => format!("{bar} promoted: {weight}"),
        Phase::RolledBack => format!("{bar} rolled back at {step}: {weight}"),
        Phase::Aborted => format!("{bar} aborted at {step}: {weight}"),
        _ => format!("{bar} {step} {weight}{cohort}"),
    }
}

/// Each stage with its weight and hold, and (given a status) which one is current.
fn steps(rollout: &Rollout, status: Option<&RolloutStatus>) -> String {
    let Ok(plan) = Plan::new(rollout, 0) else {
        return String::new();
    };
    let mut out = String::from("Steps\n");
    for (index, stage) in plan.stages.iter().enumerate() {
        let what = match (stage.cohort, stage.weight) {
            (true, 0) => "A/B cohort only".to_string(),
            (true, w) => format!("canary {w}% + A/B cohort"),
            (false, w) => format!("canary {w}%"),
        };
        let hold = match stage.hold {
            Hold::Windows(1) => "one passing window".to_string(),
            Hold::Windows(n) => format!("{n} passing windows"),
            Hold::AtLeast(d) => format!("at least {:.0}s", d.as_secs_f64()),
            Hold::UntilPromoted => "until `meshctl rollout promote`".into(),
        };
        let mark = status.map_or("", |status| {
            let current = index as u32 == status.step;
            match status.phase {
                Phase::Promoted => "done",
                _ if (index as u32) < status.step => "done",
                Phase::RolledBack | Phase::Aborted if current => "stopped here",
                _ if current => "<- now",
                _ => "",
            }
        });
        let line = format!("  {}. {what:<24} {hold:<32} {mark}", index + 1);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn gate_row(gate: &GateStatus) -> Vec<String> {
    let value = gate
        .value
        .map_or_else(|| "no data".into(), |v| format!("{v:.2}{}", gate.unit));
    let verdict = match gate.verdict {
        Verdict::Pass => "Pass",
        Verdict::Fail => "FAIL",
        Verdict::Inconclusive => "Inconclusive",
    };
    vec![
        gate.name.clone(),
        gate.threshold.clone(),
        value,
        verdict.into(),
    ]
}

fn golden_row(name: &str, role: &str, golden: &Golden) -> Vec<String> {
    vec![
        name.into(),
        role.into(),
        format!("{:.0}", golden.requests.round().max(0.0) + 0.0),
        golden
            .success_rate
            .map_or("-".into(), |r| format!("{r:.2}%")),
        golden.p99_ms.map_or("-".into(), |p| format!("{p:.1} ms")),
    ]
}

fn indent(table: &str) -> String {
    table.lines().map(|l| format!("  {l}\n")).collect()
}

fn seconds(d: k8s_openapi::jiff::SignedDuration) -> f64 {
    d.as_secs_f64().max(0.0)
}

/// `45s`, `3m12s`, `2h5m`, `3d4h`.
fn age(d: k8s_openapi::jiff::SignedDuration) -> String {
    let s = d.as_secs().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: Phase, step: u32, weight: u32) -> RolloutStatus {
        RolloutStatus {
            phase,
            step,
            steps: 3,
            canary_weight: weight,
            ..RolloutStatus::default()
        }
    }

    #[test]
    fn the_progress_bar_fills_with_the_canary_share() {
        assert_eq!(
            progress_bar(&status(Phase::Progressing, 1, 50)),
            "[#####-----] step 2/3 canary 50%"
        );
        assert_eq!(
            progress_bar(&status(Phase::Progressing, 0, 5)),
            "[#---------] step 1/3 canary 5%",
            "any traffic shows"
        );
        assert_eq!(
            progress_bar(&status(Phase::Promoted, 3, 100)),
            "[##########] promoted: canary 100%"
        );
        assert_eq!(
            progress_bar(&status(Phase::RolledBack, 0, 0)),
            "[----------] rolled back at step 1/3: canary 0%"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let age_of = |s| age(k8s_openapi::jiff::SignedDuration::from_secs(s));
        assert_eq!(age_of(42), "42s");
        assert_eq!(age_of(192), "3m12s");
        assert_eq!(age_of(7500), "2h5m");
    }
}
