//! `--scenario rollout` and `rollout-bad`: while traffic runs on hello-v1
//! only (an HTTPRoute sends it all there), `meshctl rollout start` rolls
//! `hello` out to hello-v2, adopting that route; the controller moves the
//! weights behind a success-rate gate it reads from the proxies' metrics.
//! A healthy hello-v2 is promoted step by step; one that fails 20% of its
//! requests is rolled back after its first window. The summary tells what
//! the controller decided and when, from the rollout's status, and where
//! the traffic went after each decision (as the demo's requests saw it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use trellis_control_plane::model::{GateStatus, ObjectKey, Phase, RolloutStatus};

use super::manifests::NAMESPACE;
use super::scenario::Scenario;
use crate::report::Sample;
use crate::rollout::StartArgs;

/// The rollout the scenarios start, as a user types it (`meshctl rollout
/// start …`; the demo's context supplies the manifest directory).
pub const START: [&str; 15] = [
    "hello",
    "--stable",
    "hello-v1",
    "--canary",
    "hello-v2",
    "--steps",
    "20,50,100",
    "--interval",
    "3s",
    "--min-success",
    "99%",
    "--min-requests",
    "10",
    "--route",
    "hello",
];

/// The rollout's name (`start` names it after its Service).
const NAME: &str = "hello";
/// Traffic runs on hello-v1 alone this long before the rollout starts, so
/// the summary shows the mesh before it too.
pub const START_AFTER: Duration = Duration::from_secs(3);
/// Proxies apply a route change within this: the traffic after a decision
/// is counted from then.
const SETTLE: Duration = Duration::from_millis(500);
/// How often the demo reads the rollout's status (the controller ticks
/// every 200 ms).
const POLL: Duration = Duration::from_millis(250);

/// The share of requests the hello-v2 app fails in `scenario`.
pub fn canary_fail_percent(scenario: Scenario) -> Option<u32> {
    (scenario == Scenario::RolloutBad).then_some(20)
}

/// How the rollout of `scenario` must end for the demo to pass.
pub fn expected(scenario: Scenario) -> Option<Phase> {
    match scenario {
        Scenario::Rollout => Some(Phase::Promoted),
        Scenario::RolloutBad => Some(Phase::RolledBack),
        Scenario::Steady | Scenario::Chaos => None,
    }
}

/// `meshctl rollout start …` as the user would type it.
pub fn command_line() -> String {
    format!("meshctl rollout start {}", START.join(" "))
}

#[derive(clap::Parser)]
#[command(name = "meshctl rollout start")]
struct StartLine {
    #[command(flatten)]
    args: StartArgs,
}

/// Starts the rollout `START_AFTER` into the traffic that began at
/// `started` (`wall_start` by the clock), and prints each decision as the
/// controller records it, until the rollout ends.
pub async fn follow(manifests: PathBuf, started: Instant, wall_start: Timestamp) {
    tokio::time::sleep_until((started + START_AFTER).into()).await;
    let line = StartLine::try_parse_from(
        std::iter::once("meshctl rollout start")
            .chain(START)
            .chain(["--manifests", &manifests.to_string_lossy()]),
    );
    let started_rollout = line
        .map_err(anyhow::Error::from)
        .and_then(|line| crate::rollout::start::start(&line.args));
    match started_rollout {
        Ok(_) => eprintln!(
            "\r[{:>5.1}s] rollout: {}",
            started.elapsed().as_secs_f64(),
            command_line()
        ),
        Err(e) => {
            eprintln!("\rrollout: cannot start it: {e:#}");
            return;
        }
    }
    let key = ObjectKey::new(NAMESPACE, NAME);
    // The history keeps the last decisions only: new ones are the later ones.
    let mut printed: Option<Timestamp> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let Some(status) = status(&manifests, &key) else {
            continue;
        };
        let new = status.history.iter().filter(|d| {
            let time = d.time.parse::<Timestamp>().ok();
            printed.is_none_or(|last| time.is_some_and(|t| t > last))
        });
        for decision in new {
            eprintln!(
                "\r[{:>5.1}s] rollout: step {} canary {}%: {}: {}",
                seconds_since(wall_start, &decision.time).unwrap_or_default(),
                decision.step + 1,
                decision.canary_weight,
                decision.reason,
                decision.message
            );
        }
        printed = status
            .history
            .last()
            .and_then(|d| d.time.parse().ok())
            .or(printed);
        if status.phase.is_final() {
            return;
        }
    }
}

/// The status of the demo's rollout run, once the controller wrote it.
fn status(manifests: &Path, key: &ObjectKey) -> Option<RolloutStatus> {
    crate::rollout::read(manifests, key).and_then(|(_, status)| status)
}

fn seconds_since(start: Timestamp, time: &str) -> Option<f64> {
    let time: Timestamp = time.parse().ok()?;
    Some(time.duration_since(start).as_secs_f64())
}

/// When each of the demo's requests was sent, and which version answered.
#[derive(Default)]
pub struct Timeline {
    /// (sent, from the start of traffic; the version, `None` if it failed).
    samples: Vec<(Duration, Option<String>)>,
}

impl Timeline {
    pub fn observe(&mut self, sample: &Sample) {
        let version = sample.answer.as_ref().ok().map(|(v, _)| v.clone());
        self.samples.push((sample.sent, version));
    }

    /// The requests sent from `from` until `until` (seconds from the start).
    fn between(&self, from: f64, until: f64) -> Traffic {
        let mut traffic = Traffic::default();
        for (sent, version) in &self.samples {
            let sent = sent.as_secs_f64();
            if sent < from || sent >= until {
                continue;
            }
            traffic.requests += 1;
            match version {
                Some(v) => *traffic.by_version.entry(v.clone()).or_default() += 1,
                None => traffic.failed += 1,
            }
        }
        traffic
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Traffic {
    pub requests: u64,
    pub failed: u64,
    /// Successful requests by the version that answered.
    pub by_version: BTreeMap<String, u64>,
}

impl Traffic {
    fn describe(&self) -> String {
        let versions: Vec<String> = self
            .by_version
            .iter()
            .map(|(v, n)| {
                let share = *n as f64 * 100.0 / self.requests.max(1) as f64;
                format!("{v} {share:.1}%")
            })
            .collect();
        format!(
            "{} requests: {}{}",
            self.requests,
            versions.join(", "),
            match self.failed {
                0 => String::new(),
                n => format!(", {n} failed"),
            }
        )
    }
}

/// The rollout, in the demo's summary.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub rollout: String,
    pub command: String,
    pub expected: Phase,
    /// Where the rollout was when the demo ended (`null`: never started).
    pub phase: Option<Phase>,
    /// Whether it ended as `expected`.
    pub outcome_reached: bool,
    /// The controller's decisions, oldest first, with seconds from the
    /// start of traffic.
    pub decisions: Vec<Decision>,
    /// The gates of the last window judged.
    pub gates: Vec<GateStatus>,
    /// The requests sent once the rollout ended (from half a second after
    /// its last decision; `null` if it did not end).
    pub after_end: Option<Traffic>,
}

#[derive(Debug, Serialize)]
pub struct Decision {
    pub at_s: f64,
    pub time: String,
    /// 1-based, as `meshctl rollout status` shows it.
    pub step: u32,
    pub canary_weight: u32,
    pub reason: String,
    pub message: String,
    /// The requests sent from half a second after this decision (the
    /// proxies have its route) until the next one, or the end of traffic.
    pub traffic: Traffic,
}

/// The summary of `scenario`'s rollout, read from its status in
/// `manifests`; traffic started at `traffic_started` (wall clock) and ran
/// as `timeline` saw it.
pub fn summary(
    scenario: Scenario,
    manifests: &Path,
    traffic_started: Timestamp,
    timeline: &Timeline,
) -> anyhow::Result<Summary> {
    let expected = expected(scenario).context("not a rollout scenario")?;
    let key = ObjectKey::new(NAMESPACE, NAME);
    let status = status(manifests, &key);
    let phase = status.as_ref().map(|s| s.phase);
    let history: Vec<_> = status.iter().flat_map(|s| &s.history).collect();
    let times: Vec<f64> = history
        .iter()
        .map(|d| seconds_since(traffic_started, &d.time).unwrap_or_default())
        .collect();
    let decisions: Vec<Decision> = history
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let until = times.get(i + 1).copied().unwrap_or(f64::INFINITY);
            Decision {
                at_s: times[i],
                time: d.time.clone(),
                step: d.step + 1,
                canary_weight: d.canary_weight,
                reason: d.reason.clone(),
                message: d.message.clone(),
                traffic: timeline.between(times[i] + SETTLE.as_secs_f64(), until),
            }
        })
        .collect();
    let after_end = decisions
        .last()
        .filter(|_| phase.is_some_and(Phase::is_final))
        .map(|d| d.traffic.clone());
    Ok(Summary {
        rollout: key.to_string(),
        command: command_line(),
        expected,
        phase,
        outcome_reached: phase == Some(expected),
        decisions,
        gates: status.map(|s| s.gates).unwrap_or_default(),
        after_end,
    })
}

impl Summary {
    /// The summary's rollout lines, aligned with the demo's table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<22}{}: {} (expected {})\n",
            "rollout",
            self.rollout,
            self.phase.map_or("never started".into(), |p| p.to_string()),
            self.expected
        );
        for d in &self.decisions {
            out.push_str(&format!(
                "{:<22}step {} canary {:>3}%  {}: {}\n",
                format!("  {:>5.1}s", d.at_s),
                d.step,
                d.canary_weight,
                d.reason,
                d.message
            ));
            out.push_str(&format!("{:<22}  then {}\n", "", d.traffic.describe()));
        }
        out
    }
}
