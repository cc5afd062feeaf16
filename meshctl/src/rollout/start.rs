//! `meshctl rollout start`: a Rollout from flags, checked against the
//! manifest directory as the controller will check it, then written.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use k8s_openapi::jiff::Timestamp;
use trellis_control_plane::model::*;
use trellis_control_plane::rollout::engine::stamp;
use trellis_control_plane::rollout::plan::{Invalid, Plan};
use trellis_control_plane::rollout::{local, STARTED_AT_ANNOTATION};
use trellis_control_plane::source::local::parse_dir;
use trellis_control_plane::store::Store;

use super::{current_status, rollout_yaml, rollouts_in, write_atomically, Place};

#[derive(clap::Args, Clone)]
pub struct StartArgs {
    /// The Service whose traffic is rolled out (clients call it).
    pub service: String,
    /// The rollout's name (default: the Service's).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub place: Place,
    /// The backend Service serving now.
    #[arg(long)]
    pub stable: String,
    /// The backend Service rolled out.
    #[arg(long)]
    pub canary: String,
    /// The canary's weights in percent, increasing (after the last one
    /// passes, the canary gets 100%).
    #[arg(long, value_delimiter = ',', value_name = "W1,W2,...")]
    pub steps: Vec<u32>,
    /// One gate window: gates are judged on each window's requests.
    #[arg(long, default_value = "30s")]
    pub interval: String,
    /// Each step lasts at least this long (default: one passing window).
    #[arg(long, conflicts_with = "manual")]
    pub pause: Option<String>,
    /// Every step waits for `meshctl rollout promote`.
    #[arg(long)]
    pub manual: bool,
    /// Lowest passing success rate of the canary, e.g. 99% or 99.5.
    #[arg(long, value_name = "PERCENT")]
    pub min_success: Option<String>,
    /// Highest passing p99 latency of the canary, e.g. 200ms.
    #[arg(long, value_name = "DURATION")]
    pub max_p99: Option<String>,
    /// Fewer canary requests in a window make it inconclusive (default 20).
    #[arg(long, value_name = "N")]
    pub min_requests: Option<u32>,
    /// Roll back after this many failed windows in a row (default 1).
    #[arg(long, value_name = "K")]
    pub consecutive_failures: Option<u32>,
    /// Roll back after this many failed windows in all.
    #[arg(long, value_name = "M")]
    pub total_failures: Option<u32>,
    /// Pause after this many inconclusive windows in a row (default 3).
    #[arg(long, value_name = "N")]
    pub inconclusive_limit: Option<u32>,
    /// The HTTPRoute to manage: adopt this existing one (default: create
    /// one named after the rollout).
    #[arg(long, value_name = "NAME")]
    pub route: Option<String>,
    /// The Service port to roll out, when it has several.
    #[arg(long)]
    pub port: Option<u16>,
    /// A/B: requests with this header go to the canary first.
    #[arg(long = "ab-header", value_name = "NAME=VALUE")]
    pub ab_headers: Vec<String>,
    /// A/B: requests with this cookie go to the canary first.
    #[arg(long = "ab-cookie", value_name = "NAME=VALUE")]
    pub ab_cookies: Vec<String>,
    /// A/B: requests with this query parameter go to the canary first.
    #[arg(long = "ab-query", value_name = "NAME=VALUE")]
    pub ab_queries: Vec<String>,
    /// A/B: how many passing windows the cohort is held for (default 1).
    #[arg(long, value_name = "N")]
    pub ab_windows: Option<u32>,
    /// Start a new run even though this rollout is still under way.
    #[arg(long)]
    pub force: bool,
}

/// What `start` did.
pub struct Started {
    pub rollout: Rollout,
    pub file: PathBuf,
    /// For people: what was written and what happens next.
    pub message: String,
}

/// Builds, checks and writes the rollout `args` describe; nothing is
/// written when it is refused.
pub fn start(args: &StartArgs) -> anyhow::Result<Started> {
    let dir = args.place.dir()?;
    let rollout = build(args, Timestamp::now())?;
    let key = rollout.metadata.key();
    let file = local::rollout_file(&dir, &key);

    if let Some(existing) = rollouts_in(&dir)?
        .into_iter()
        .find(|f| f.rollout.metadata.key() == key)
    {
        if existing.file != file {
            bail!(
                "rollout {key} is defined in {}, not written by meshctl; edit it there, \
                 or remove it to start one here",
                existing.file.display()
            );
        }
        let under_way = current_status(&dir, &existing.rollout)
            .filter(|s| matches!(s.phase, Phase::Progressing | Phase::Paused));
        if let (Some(status), false) = (under_way, args.force) {
            bail!(
                "rollout {key} is still {} (step {}/{}, canary {}%); wait for it to end, \
                 `meshctl rollout abort {}` it, or pass --force to start a new run over it",
                status.phase,
                status.step + 1,
                status.steps,
                status.canary_weight,
                key.name
            );
        }
    }

    // Check against the mesh as the controller will: every other file.
    let store = Store::new("cluster.local");
    let others = parse_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .into_iter()
        .filter(|(other, _)| *other != file)
        .flat_map(|(_, parsed)| parsed.unwrap_or_default());
    store.replace_all(others);
    let plan = Plan::check(&rollout, &store).map_err(|invalid| {
        anyhow::anyhow!(
            "refusing to start rollout {key}: {invalid}\nhint: {}",
            hint(&invalid)
        )
    })?;

    write_atomically(&file, &rollout_yaml(&rollout)?)?;
    let steps: Vec<String> = plan
        .stages
        .iter()
        .map(|s| match s.cohort && s.weight == 0 {
            true => "A/B cohort".to_string(),
            false => format!("{}%", s.weight),
        })
        .collect();
    let then = match plan.stages.last().map(|s| s.weight) {
        Some(100) => "",
        _ => " then 100%",
    };
    let message = format!(
        "rollout {key} started: {} from {} to {}, steps {}{then}, gate window {}\n\
         written: {}\n\
         follow it: meshctl rollout status {} -n {} --watch",
        rollout.spec.service,
        rollout.spec.backends.stable,
        rollout.spec.backends.canary,
        steps.join(" -> "),
        rollout.spec.analysis.interval,
        file.display(),
        key.name,
        key.namespace,
    );
    Ok(Started {
        rollout,
        file,
        message,
    })
}

/// The Rollout the flags describe, started at `now` (a new run).
pub fn build(args: &StartArgs, now: Timestamp) -> anyhow::Result<Rollout> {
    let name = args.name.clone().unwrap_or_else(|| args.service.clone());
    let pause = match (&args.pause, args.manual) {
        (_, true) => Some(Pause { duration: None }),
        (Some(d), false) => Some(Pause {
            duration: Some(d.clone()),
        }),
        (None, false) => None,
    };
    let steps = args
        .steps
        .iter()
        .map(|&weight| RolloutStep {
            weight,
            pause: pause.clone(),
        })
        .collect();
    let success_rate = args
        .min_success
        .as_deref()
        .map(|s| {
            s.trim_end_matches('%').trim().parse::<f64>().map_err(|_| {
                anyhow::anyhow!("--min-success {s:?}: expected a percentage like 99% or 99.5")
            })
        })
        .transpose()?;
    let mut analysis = Analysis {
        interval: args.interval.clone(),
        success_rate,
        max_p99: args.max_p99.clone(),
        ..Analysis::default()
    };
    if let Some(n) = args.min_requests {
        analysis.min_requests = n;
    }
    if let Some(k) = args.consecutive_failures {
        analysis.rollback.consecutive_failures = k;
    }
    analysis.rollback.total_failures = args.total_failures;
    if let Some(n) = args.inconclusive_limit {
        analysis.inconclusive_limit = n;
    }
    Ok(Rollout {
        api_version: TRELLIS_API_VERSION.into(),
        kind: "Rollout".into(),
        metadata: ObjectMeta {
            name,
            namespace: Some(args.place.namespace.clone()),
            labels: [(
                "app.kubernetes.io/managed-by".to_string(),
                "meshctl".to_string(),
            )]
            .into(),
            annotations: [(STARTED_AT_ANNOTATION.to_string(), stamp(now))].into(),
            ..ObjectMeta::default()
        },
        spec: RolloutSpec {
            service: args.service.clone(),
            port: args.port,
            backends: RolloutBackends {
                stable: args.stable.clone(),
                canary: args.canary.clone(),
            },
            route: args.route.clone(),
            ab_test: ab_test(args)?,
            steps,
            analysis,
            paused: false,
            promote: None,
            abort: false,
        },
        status: None,
    })
}

fn ab_test(args: &StartArgs) -> anyhow::Result<Option<AbTest>> {
    let pair = |flag: &str, spec: &str| -> anyhow::Result<(String, String)> {
        let (name, value) = spec.split_once('=').with_context(|| {
            format!("{flag} {spec:?}: expected NAME=VALUE, e.g. {flag} x-beta=yes")
        })?;
        Ok((name.to_string(), value.to_string()))
    };
    let exact = |(name, value)| HttpHeaderMatch {
        kind: "Exact".into(),
        name,
        value,
    };
    let cohort = Cohort {
        headers: args
            .ab_headers
            .iter()
            .map(|h| pair("--ab-header", h).map(exact))
            .collect::<anyhow::Result<_>>()?,
        cookies: args
            .ab_cookies
            .iter()
            .map(|c| pair("--ab-cookie", c).map(|(name, value)| NameValue { name, value }))
            .collect::<anyhow::Result<_>>()?,
        query_params: args
            .ab_queries
            .iter()
            .map(|q| pair("--ab-query", q).map(exact))
            .collect::<anyhow::Result<_>>()?,
    };
    let empty =
        cohort.headers.is_empty() && cohort.cookies.is_empty() && cohort.query_params.is_empty();
    match (empty, args.ab_windows) {
        (true, None) => Ok(None),
        (true, Some(_)) => bail!(
            "--ab-windows needs a cohort: give --ab-header, --ab-cookie or --ab-query NAME=VALUE"
        ),
        (false, windows) => Ok(Some(AbTest {
            cohort,
            windows: windows.unwrap_or(1),
        })),
    }
}

/// Which flag fixes a refusal.
fn hint(invalid: &Invalid) -> String {
    let flag_of = |field: &str| -> &'static str {
        match field {
            f if f.contains("interval") => "--interval",
            f if f.contains("maxP99") => "--max-p99",
            f if f.contains("pause") => "--pause",
            f if f.contains("minRequests") => "--min-requests",
            f if f.contains("consecutiveFailures") => "--consecutive-failures",
            f if f.contains("totalFailures") => "--total-failures",
            f if f.contains("inconclusiveLimit") => "--inconclusive-limit",
            f if f.contains("stable") => "--stable",
            f if f.contains("canary") => "--canary",
            _ => "SERVICE",
        }
    };
    match invalid {
        Invalid::WeightRange { .. } | Invalid::NotIncreasing { .. } | Invalid::NoStages => {
            "--steps takes increasing weights from 1 to 100, e.g. --steps 10,50,100 \
             (or give an A/B cohort with --ab-header/--ab-cookie/--ab-query)"
                .into()
        }
        Invalid::BadDuration { field, .. } | Invalid::DurationRange { field, .. } => {
            format!("{} takes a duration like 500ms, 30s or 5m", flag_of(field))
        }
        Invalid::NoGates => "give --min-success 99% or --max-p99 200ms, or both".into(),
        Invalid::SuccessRate(_) => "--min-success takes a percentage, e.g. 99%".into(),
        Invalid::Zero { field } => format!("{} takes 1 or more", flag_of(field)),
        Invalid::EmptyName { field, .. } | Invalid::NoService { field, .. } => format!(
            "{} names a Service in the manifest directory",
            flag_of(field)
        ),
        Invalid::SameBackends(_) => "--stable and --canary must be different Services".into(),
        Invalid::NoPort { .. } | Invalid::AmbiguousPort { .. } => {
            "--port names the Service port to roll out".into()
        }
        Invalid::NoWindows => "--ab-windows takes 1 or more".into(),
        Invalid::EmptyCohort | Invalid::BadMatch { .. } => {
            "--ab-header, --ab-cookie and --ab-query take NAME=VALUE".into()
        }
        Invalid::RouteOwned { .. } | Invalid::RouteExists { .. } | Invalid::OtherRoute { .. } => {
            "--route NAME adopts an existing HTTPRoute (one no other rollout manages)".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Line {
        #[command(flatten)]
        args: StartArgs,
    }

    fn built(flags: &[&str]) -> anyhow::Result<Rollout> {
        let line = Line::try_parse_from(
            ["start", "hello", "--stable", "v1", "--canary", "v2"]
                .iter()
                .chain(flags),
        )?;
        build(&line.args, "2026-01-02T03:04:05Z".parse().unwrap())
    }

    #[test]
    fn flags_left_out_get_the_defaults_a_manifest_gets() {
        let rollout = built(&["--steps", "10,50", "--min-success", "99.5%"]).unwrap();
        let analysis = &rollout.spec.analysis;
        assert_eq!(analysis.success_rate, Some(99.5));
        assert_eq!(analysis.min_requests, 20);
        assert_eq!(analysis.inconclusive_limit, 3);
        assert_eq!(analysis.rollback.consecutive_failures, 1);
        assert_eq!(analysis.interval, "30s");
        assert!(rollout.spec.steps.iter().all(|s| s.pause.is_none()));
        assert_eq!(rollout.metadata.name, "hello");
        assert_eq!(
            rollout.metadata.annotations[STARTED_AT_ANNOTATION],
            "2026-01-02T03:04:05Z"
        );
    }

    #[test]
    fn pauses_and_cohorts_come_from_their_flags() {
        let manual = built(&["--steps", "10,50", "--manual"]).unwrap();
        assert!(manual
            .spec
            .steps
            .iter()
            .all(|s| s.pause == Some(Pause { duration: None })));
        let timed = built(&["--steps", "10", "--pause", "5m"]).unwrap();
        assert_eq!(
            timed.spec.steps[0].pause,
            Some(Pause {
                duration: Some("5m".into())
            })
        );
        assert!(
            built(&["--pause", "5m", "--manual"]).is_err(),
            "one or the other"
        );
        let ab = built(&[
            "--ab-cookie",
            "beta=1",
            "--ab-query",
            "c=t",
            "--ab-windows",
            "2",
        ])
        .unwrap()
        .spec
        .ab_test
        .unwrap();
        assert_eq!(ab.windows, 2);
        assert_eq!(ab.cohort.cookies[0].name, "beta");
        assert_eq!(ab.cohort.query_params[0].value, "t");
        assert!(built(&["--ab-header", "x-beta"]).is_err());
    }
}
