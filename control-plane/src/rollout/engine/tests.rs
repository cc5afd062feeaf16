use super::*;
use crate::model::{Analysis, Pause, RollbackPolicy, RolloutBackends, RolloutStep};
use crate::rollout::plan::{Gates, Stage};

fn plan(stages: Vec<Stage>, consecutive: u32) -> Plan {
    Plan {
        stages,
        interval: Duration::from_secs(10),
        gates: Gates {
            min_requests: 10,
            success_rate: Some(99.0),
            max_p99: Some(Duration::from_millis(200)),
        },
        consecutive_failures: consecutive,
        total_failures: None,
        inconclusive_limit: 2,
        port: 80,
        cohort: None,
    }
}

fn weights(ws: &[u32]) -> Vec<Stage> {
    ws.iter()
        .map(|&weight| Stage {
            weight,
            cohort: false,
            hold: Hold::Windows(1),
        })
        .collect()
}

fn spec() -> RolloutSpec {
    RolloutSpec {
        service: "hello".into(),
        backends: RolloutBackends {
            stable: "v1".into(),
            canary: "v2".into(),
        },
        steps: vec![RolloutStep {
            weight: 10,
            pause: Some(Pause::default()),
        }],
        analysis: Analysis {
            interval: "10s".into(),
            rollback: RollbackPolicy::default(),
            ..Analysis::default()
        },
        ..RolloutSpec::default()
    }
}

fn good() -> Evidence {
    Evidence::Measured {
        canary: Golden {
            requests: 100.0,
            success_rate: Some(100.0),
            p99_ms: Some(5.0),
        },
        stable: Golden::default(),
    }
}

fn bad() -> Evidence {
    Evidence::Measured {
        canary: Golden {
            requests: 100.0,
            success_rate: Some(80.0),
            p99_ms: Some(5.0),
        },
        stable: Golden::default(),
    }
}

fn few() -> Evidence {
    Evidence::Measured {
        canary: Golden {
            requests: 3.0,
            success_rate: Some(100.0),
            p99_ms: Some(5.0),
        },
        stable: Golden::default(),
    }
}

/// Runs the windows one after another, 10 s apart, from a fresh start.
fn run(plan: &Plan, spec: &RolloutSpec, windows: Vec<Evidence>) -> Vec<RolloutStatus> {
    let t0: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
    let mut status = advance(plan, spec, "run", &RolloutStatus::default(), t0, None);
    let mut all = vec![status.clone()];
    for (i, evidence) in windows.into_iter().enumerate() {
        let now = plus(t0, Duration::from_secs(10 * (i as u64 + 1)));
        assert!(window_due(plan, spec, &status, now));
        status = advance(plan, spec, "run", &status, now, Some(evidence));
        all.push(status.clone());
    }
    all
}

#[test]
fn healthy_windows_walk_every_step_then_promote() {
    let p = plan(weights(&[10, 50, 100]), 1);
    let statuses = run(&p, &spec(), vec![good(), good(), good()]);
    let seen: Vec<(Phase, u32)> = statuses
        .iter()
        .map(|s| (s.phase, s.canary_weight))
        .collect();
    assert_eq!(
        seen,
        [
            (Phase::Progressing, 10),
            (Phase::Progressing, 50),
            (Phase::Progressing, 100),
            (Phase::Promoted, 100)
        ]
    );
    assert_eq!(statuses[3].history.last().unwrap().reason, "Promoted");
}

#[test]
fn with_three_consecutive_failures_allowed_a_good_window_resets_the_streak() {
    let p = plan(weights(&[10, 100]), 3);
    let s = run(&p, &spec(), vec![bad(), bad(), good()]);
    assert_eq!(s.last().unwrap().phase, Phase::Progressing);
    assert_eq!(
        s.last().unwrap().canary_weight,
        100,
        "the good window passed step 1"
    );
    assert_eq!(s.last().unwrap().total_failures, 2);

    let s = run(&p, &spec(), vec![bad(), bad(), bad()]);
    let last = s.last().unwrap();
    assert_eq!(last.phase, Phase::RolledBack);
    assert_eq!(last.canary_weight, 0);
    let message = &last.history.last().unwrap().message;
    assert!(message.contains("3 failed window(s) in a row"), "{message}");
    assert!(message.contains("success-rate 80.00%"), "{message}");
    assert_eq!(s[2].phase, Phase::Progressing, "two failures are allowed");
}

#[test]
fn total_failures_roll_back_even_when_not_in_a_row() {
    let mut p = plan(weights(&[10, 20, 30, 40, 100]), 3);
    p.total_failures = Some(2);
    let s = run(&p, &spec(), vec![bad(), good(), bad()]);
    assert_eq!(s.last().unwrap().phase, Phase::RolledBack);
}

#[test]
fn missing_data_never_promotes_and_pauses_after_the_limit() {
    let p = plan(weights(&[100]), 1);
    let unreachable = || {
        Evidence::Unavailable(format!(
            "{}: connection refused",
            super::super::measure::UNAVAILABLE
        ))
    };
    let s = run(&p, &spec(), vec![few(), unreachable(), unreachable()]);
    assert_eq!(s[1].phase, Phase::Progressing);
    assert_eq!(s[2].phase, Phase::Paused);
    let c = s[2]
        .conditions
        .iter()
        .find(|c| c.kind == "Progressing")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "MetricsUnavailable")
    );
    assert!(c.message.contains("connection refused"), "{}", c.message);
    assert!(s.iter().all(|s| s.phase != Phase::Promoted));
    // Data is back and good: it carries on by itself.
    let p2 = run(&p, &spec(), vec![few(), few(), good()]);
    assert_eq!(
        p2[2]
            .conditions
            .iter()
            .find(|c| c.kind == "Progressing")
            .unwrap()
            .reason,
        "Inconclusive"
    );
    assert_eq!(p2[3].phase, Phase::Promoted);
}

#[test]
fn a_timed_pause_holds_a_step_at_least_that_long() {
    let mut stages = weights(&[10, 100]);
    stages[0].hold = Hold::AtLeast(Duration::from_secs(25));
    let p = plan(stages, 1);
    let s = run(&p, &spec(), vec![good(), good(), good()]);
    let w: Vec<u32> = s.iter().map(|s| s.canary_weight).collect();
    assert_eq!(
        w,
        [10, 10, 10, 100],
        "the step ends at the first window after 25 s"
    );
}

#[test]
fn promote_abort_and_pause_follow_the_spec() {
    let mut stages = weights(&[10, 100]);
    stages[0].hold = Hold::UntilPromoted;
    let p = plan(stages, 1);
    let t0: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
    let mut spec = spec();
    let s = advance(&p, &spec, "run", &RolloutStatus::default(), t0, None);
    let s = advance(
        &p,
        &spec,
        "run",
        &s,
        plus(t0, Duration::from_secs(10)),
        Some(good()),
    );
    assert_eq!(s.canary_weight, 10, "waits for a promote");

    spec.paused = true;
    assert!(!window_due(
        &p,
        &spec,
        &s,
        plus(t0, Duration::from_secs(60))
    ));
    let paused = advance(
        &p,
        &spec,
        "run",
        &s,
        plus(t0, Duration::from_secs(11)),
        None,
    );
    assert_eq!(paused.phase, Phase::Paused);
    spec.paused = false;
    let resumed = advance(
        &p,
        &spec,
        "run",
        &paused,
        plus(t0, Duration::from_secs(12)),
        None,
    );
    assert_eq!(resumed.phase, Phase::Progressing);
    assert_eq!(
        resumed.window_started_at.as_deref(),
        Some("2026-12-01T00:00:12Z")
    );

    spec.promote = Some(0);
    let promoted = advance(
        &p,
        &spec,
        "run",
        &resumed,
        plus(t0, Duration::from_secs(13)),
        None,
    );
    assert_eq!((promoted.step, promoted.canary_weight), (1, 100));

    spec.abort = true;
    let aborted = advance(
        &p,
        &spec,
        "run",
        &promoted,
        plus(t0, Duration::from_secs(14)),
        None,
    );
    assert_eq!(
        (aborted.phase, aborted.canary_weight, aborted.cohort),
        (Phase::Aborted, 0, false)
    );
}

#[test]
fn a_new_run_starts_over_and_a_refusal_keeps_the_step() {
    let p = plan(weights(&[10, 50, 100]), 1);
    let s = run(&p, &spec(), vec![good()]);
    let at_50 = s.last().unwrap().clone();
    assert_eq!(at_50.canary_weight, 50);
    let t: Timestamp = "2026-12-01T01:00:00Z".parse().unwrap();
    let refused = refuse(&at_50, "BackendNotFound", "no Service v2", t);
    assert_eq!((refused.phase, refused.canary_weight), (Phase::Invalid, 50));
    let back = advance(&p, &spec(), "run", &refused, t, None);
    assert_eq!(
        (back.phase, back.canary_weight, back.step),
        (Phase::Progressing, 50, 1)
    );
    let fresh = advance(&p, &spec(), "another run", &at_50, t, None);
    assert_eq!((fresh.step, fresh.canary_weight), (0, 10));
}
