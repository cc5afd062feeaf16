//! The rollout's decisions, as a function of its plan, its spec's commands,
//! its last status, the time and (when a gate window has ended) what was
//! measured. No I/O: the controller loop measures, calls `advance`, then
//! writes the route and the status it returns.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp, Unit};

use super::plan::{Hold, Plan};
use crate::model::{
    Condition, Decision, GateStatus, Golden, Phase, RolloutSpec, RolloutStatus, Verdict, HISTORY,
};

/// What a gate window measured.
#[derive(Clone, Debug, PartialEq)]
pub enum Evidence {
    Measured {
        canary: Golden,
        stable: Golden,
    },
    /// The metrics source could not answer: the window is inconclusive.
    Unavailable(String),
    /// The window cannot be measured (the controller restarted within it):
    /// it starts again, with no verdict.
    Restart,
}

pub fn stamp(t: Timestamp) -> String {
    t.round(Unit::Millisecond).unwrap_or(t).to_string()
}

pub fn parse_stamp(s: Option<&str>) -> Option<Timestamp> {
    s.and_then(|s| s.parse().ok())
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Whether the current gate window has ended at `now` (measure, then call
/// `advance` with the evidence).
pub fn window_due(plan: &Plan, spec: &RolloutSpec, status: &RolloutStatus, now: Timestamp) -> bool {
    !spec.paused
        && !spec.abort
        && spec.promote != Some(status.step)
        && !status.phase.is_final()
        && status.phase != Phase::Invalid
        && parse_stamp(status.window_started_at.as_deref())
            .is_some_and(|start| now >= plus(start, plan.interval))
}

/// The next status. `run` identifies this run of the rollout: a status of
/// another run starts over.
pub fn advance(
    plan: &Plan,
    spec: &RolloutSpec,
    run: &str,
    previous: &RolloutStatus,
    now: Timestamp,
    evidence: Option<Evidence>,
) -> RolloutStatus {
    let mut s = Status {
        status: previous.clone(),
        plan,
        now,
    };
    if s.status.run != run || previous.step_started_at.is_none() {
        s.start(run);
    } else if s.status.phase == Phase::Invalid {
        // Refused mid-run and fixed since: the same step, a fresh window.
        let step = (s.status.step as usize).min(plan.stages.len() - 1);
        s.status.step = step as u32;
        s.resume("Accepted", "the spec can be carried out again".into());
    } else if s.status.step as usize >= plan.stages.len() && !s.status.phase.is_final() {
        // The steps were edited: carry on at the last one.
        let last = plan.stages.len() - 1;
        s.enter(last);
    }
    s.accepted();
    if spec.abort {
        if s.status.phase != Phase::Aborted {
            s.end(
                Phase::Aborted,
                0,
                "Aborted",
                "aborted: all traffic to the stable backend".into(),
            );
        }
        return s.finish();
    }
    if s.status.phase.is_final() {
        return s.finish();
    }
    if spec.paused {
        if !s.paused_by("PausedByUser") {
            s.pause(
                "PausedByUser",
                "paused by the user; `meshctl rollout resume` continues".into(),
            );
        }
        return s.finish();
    }
    if s.paused_by("PausedByUser") {
        s.resume("Resumed", "resumed by the user".into());
    }
    if spec.promote == Some(s.status.step) {
        s.next_stage("Promoted", "promoted by the user".into());
        return s.finish();
    }
    match evidence {
        None => {}
        Some(Evidence::Restart) => s.status.window_started_at = Some(stamp(now)),
        Some(evidence) => s.judge(evidence),
    }
    s.finish()
}

struct Status<'a> {
    status: RolloutStatus,
    plan: &'a Plan,
    now: Timestamp,
}

impl Status<'_> {
    fn start(&mut self, run: &str) {
        let stage = &self.plan.stages[0];
        self.status = RolloutStatus {
            run: run.to_string(),
            steps: self.plan.stages.len() as u32,
            ..RolloutStatus::default()
        };
        self.enter(0);
        self.decide(
            "Started",
            format!(
                "started: canary at {}%{}",
                stage.weight,
                cohort_note(stage.cohort)
            ),
        );
    }

    /// Enters stage `index`: its weight, a fresh window and counters.
    fn enter(&mut self, index: usize) {
        let stage = &self.plan.stages[index];
        let now = stamp(self.now);
        self.status.phase = Phase::Progressing;
        self.status.step = index as u32;
        self.status.canary_weight = stage.weight;
        self.status.cohort = stage.cohort;
        self.status.step_started_at = Some(now.clone());
        self.status.window_started_at = Some(now);
        self.status.passed_windows = 0;
        self.status.consecutive_failures = 0;
        self.status.inconclusive_windows = 0;
        self.progressing(
            "Progressing",
            format!("at step {} of {}", index + 1, self.plan.stages.len()),
        );
    }

    fn next_stage(&mut self, reason: &str, why: String) {
        let next = self.status.step as usize + 1;
        if next >= self.plan.stages.len() {
            self.end(
                Phase::Promoted,
                100,
                "Promoted",
                format!("{why}; the canary gets 100%"),
            );
        } else {
            self.enter(next);
            let stage = &self.plan.stages[next];
            self.decide(
                reason,
                format!(
                    "{why}; step {} of {}: canary at {}%{}",
                    next + 1,
                    self.plan.stages.len(),
                    stage.weight,
                    cohort_note(stage.cohort)
                ),
            );
        }
    }

    fn end(&mut self, phase: Phase, weight: u32, reason: &str, message: String) {
        self.status.phase = phase;
        self.status.canary_weight = weight;
        self.status.cohort = false;
        self.status.window_started_at = None;
        self.status.next_decision_at = None;
        self.set_condition("Progressing", false, reason, &message);
        self.decide(reason, message);
    }

    fn pause(&mut self, reason: &str, message: String) {
        self.status.phase = Phase::Paused;
        self.set_condition("Progressing", false, reason, &message);
        self.decide(reason, message);
    }

    fn paused_by(&self, reason: &str) -> bool {
        self.status.phase == Phase::Paused
            && self
                .condition("Progressing")
                .is_some_and(|c| c.reason == reason)
    }

    fn resume(&mut self, reason: &str, message: String) {
        self.status.phase = Phase::Progressing;
        self.status.window_started_at = Some(stamp(self.now));
        self.status.inconclusive_windows = 0;
        self.progressing(reason, message.clone());
        self.decide(reason, message);
    }

    fn progressing(&mut self, reason: &str, message: String) {
        self.set_condition("Progressing", true, reason, &message);
    }

    fn accepted(&mut self) {
        self.set_condition(
            "Accepted",
            true,
            "Accepted",
            "the rollout's spec can be carried out",
        );
    }

    /// A gate window ended: its verdict, then what follows from it.
    fn judge(&mut self, evidence: Evidence) {
        let (gates, canary, stable, why) = self.gates(evidence);
        let verdict = if gates.iter().any(|g| g.verdict == Verdict::Fail) {
            Verdict::Fail
        } else if gates.iter().any(|g| g.verdict == Verdict::Inconclusive) {
            Verdict::Inconclusive
        } else {
            Verdict::Pass
        };
        let summary = gates.iter().map(describe).collect::<Vec<_>>().join(", ");
        self.status.gates = gates;
        self.status.canary = canary;
        self.status.stable = stable;
        self.status.window_started_at = Some(stamp(self.now));
        let s = &mut self.status;
        match verdict {
            Verdict::Fail => {
                s.consecutive_failures += 1;
                s.total_failures += 1;
                s.inconclusive_windows = 0;
                let (consecutive, total) = (s.consecutive_failures, s.total_failures);
                let by_streak = consecutive >= self.plan.consecutive_failures;
                let by_total = self.plan.total_failures.is_some_and(|m| total >= m);
                if by_streak || by_total {
                    let count = if by_streak {
                        format!("{consecutive} failed window(s) in a row")
                    } else {
                        format!("{total} failed windows in all")
                    };
                    self.end(
                        Phase::RolledBack,
                        0,
                        "GateFailed",
                        format!("rolled back after {count}: {summary}; all traffic to the stable backend"),
                    );
                } else {
                    self.decide(
                        "WindowFailed",
                        format!(
                            "window failed ({consecutive} in a row of {} allowed): {summary}",
                            self.plan.consecutive_failures
                        ),
                    );
                }
            }
            Verdict::Inconclusive => {
                s.inconclusive_windows += 1;
                let n = s.inconclusive_windows;
                let why = why.unwrap_or(summary);
                let reason = if why.starts_with(super::measure::UNAVAILABLE) {
                    "MetricsUnavailable"
                } else {
                    "Inconclusive"
                };
                let paused = s.phase == Phase::Paused;
                let message = format!(
                    "paused after {n} inconclusive windows: {why}; \
                     it continues by itself when a window passes"
                );
                if paused {
                    // Already paused for lack of data: say why now, once.
                    if !self.paused_by("PausedByUser") {
                        self.set_condition("Progressing", false, reason, &message);
                    }
                } else if n >= self.plan.inconclusive_limit {
                    self.pause(reason, message);
                } else {
                    self.decide(
                        "WindowInconclusive",
                        format!("window inconclusive ({n}): {why}"),
                    );
                }
            }
            Verdict::Pass => {
                s.consecutive_failures = 0;
                s.inconclusive_windows = 0;
                s.passed_windows += 1;
                if s.phase == Phase::Paused {
                    self.resume("Resumed", format!("a window passed again ({summary})"));
                }
                if self.may_end_stage() {
                    self.next_stage("StepPassed", format!("step passed: {summary}"));
                }
            }
        }
    }

    fn may_end_stage(&self) -> bool {
        let stage = &self.plan.stages[self.status.step as usize];
        match stage.hold {
            Hold::Windows(n) => self.status.passed_windows >= n,
            Hold::AtLeast(pause) => parse_stamp(self.status.step_started_at.as_deref())
                .is_some_and(|start| self.now >= plus(start, pause)),
            Hold::UntilPromoted => false,
        }
    }

    /// Each gate's verdict on the window, the golden metrics, and (when the
    /// window could not be measured) why.
    fn gates(
        &self,
        evidence: Evidence,
    ) -> (
        Vec<GateStatus>,
        Option<Golden>,
        Option<Golden>,
        Option<String>,
    ) {
        let gates = &self.plan.gates;
        let (canary, stable, why) = match evidence {
            Evidence::Measured { canary, stable } => {
                let why = (canary.requests < f64::from(gates.min_requests)).then(|| {
                    format!(
                        "{} canary request(s) in the window, fewer than minRequests {}",
                        canary.requests.round(),
                        gates.min_requests
                    )
                });
                (Some(canary), Some(stable), why)
            }
            Evidence::Unavailable(why) => (None, None, Some(why)),
            Evidence::Restart => (None, None, None),
        };
        let verdict = |pass: Option<bool>| match (&why, pass) {
            (None, Some(true)) => Verdict::Pass,
            (None, Some(false)) => Verdict::Fail,
            _ => Verdict::Inconclusive,
        };
        let mut out = Vec::new();
        if let Some(min) = gates.success_rate {
            let value = canary.as_ref().and_then(|c| c.success_rate);
            out.push(GateStatus {
                name: "success-rate".into(),
                threshold: format!(">= {min}%"),
                value,
                unit: "%".into(),
                verdict: verdict(value.map(|v| v >= min)),
            });
        }
        if let Some(max) = gates.max_p99 {
            let max_ms = max.as_secs_f64() * 1000.0;
            let value = canary.as_ref().and_then(|c| c.p99_ms);
            out.push(GateStatus {
                name: "p99".into(),
                threshold: format!("<= {}ms", max.as_millis()),
                value,
                unit: "ms".into(),
                verdict: verdict(value.map(|v| v <= max_ms)),
            });
        }
        (out, canary, stable, why)
    }

    fn condition(&self, kind: &str) -> Option<&Condition> {
        self.status.conditions.iter().find(|c| c.kind == kind)
    }

    fn set_condition(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        set_condition(&mut self.status, self.now, kind, status, reason, message);
    }

    fn decide(&mut self, reason: &str, message: String) {
        decide(&mut self.status, self.now, reason, message);
    }

    fn finish(mut self) -> RolloutStatus {
        self.status.next_decision_at = parse_stamp(self.status.window_started_at.as_deref())
            .filter(|_| !self.status.phase.is_final())
            .map(|start| stamp(plus(start, self.plan.interval)));
        self.status
    }
}

/// A status for a spec that cannot be carried out: the reason in the
/// `Accepted` condition, everything else (and traffic) as it was.
pub fn refuse(
    previous: &RolloutStatus,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> RolloutStatus {
    let mut status = previous.clone();
    let changed = !status
        .conditions
        .iter()
        .any(|c| c.kind == "Accepted" && c.status == "False" && c.message == message);
    // An ended rollout stays ended (its route as it was); one under way
    // holds where it is.
    if !status.phase.is_final() {
        status.phase = Phase::Invalid;
        status.next_decision_at = None;
    }
    set_condition(&mut status, now, "Accepted", false, reason, message);
    if changed {
        decide(&mut status, now, reason, message.to_string());
    }
    status
}

fn set_condition(
    status: &mut RolloutStatus,
    now: Timestamp,
    kind: &str,
    value: bool,
    reason: &str,
    message: &str,
) {
    let value = if value { "True" } else { "False" };
    let now = stamp(now);
    match status.conditions.iter_mut().find(|c| c.kind == kind) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now;
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => status.conditions.push(Condition {
            kind: kind.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
        }),
    }
}

/// Records a decision in the status's bounded history.
fn decide(status: &mut RolloutStatus, now: Timestamp, reason: &str, message: String) {
    tracing::info!(reason, %message, step = status.step + 1, weight = status.canary_weight, "rollout decision");
    status.history.push(Decision {
        time: stamp(now),
        step: status.step,
        canary_weight: status.canary_weight,
        reason: reason.into(),
        message,
    });
    let excess = status.history.len().saturating_sub(HISTORY);
    status.history.drain(..excess);
}

fn cohort_note(cohort: bool) -> &'static str {
    if cohort {
        ", and the A/B cohort"
    } else {
        ""
    }
}

fn describe(gate: &GateStatus) -> String {
    let value = gate
        .value
        .map_or_else(|| "no data".to_string(), |v| format!("{v:.2}{}", gate.unit));
    let verdict = match gate.verdict {
        Verdict::Pass => "pass",
        Verdict::Fail => "FAIL",
        Verdict::Inconclusive => "inconclusive",
    };
    format!("{} {value} (wants {}) {verdict}", gate.name, gate.threshold)
}

#[cfg(test)]
mod tests;
