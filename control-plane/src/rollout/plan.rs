//! A Rollout's spec, checked and made concrete: its stages in order, its
//! window and gates as numbers. Every refusal names the field and what to
//! write instead; the controller puts it in the `Accepted` condition and
//! leaves traffic as it is.

use std::time::Duration;

use crate::model::{Cohort, ObjectKey, Rollout, Service, ROLLOUT_ANNOTATION};
use crate::store::{parse_gateway_duration, Store};

/// The longest gate window or pause: a typo like `30h` for `30s` is refused.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The shortest gate window: proxies need a moment to apply a weight.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// What a rollout does, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub stages: Vec<Stage>,
    pub interval: Duration,
    pub gates: Gates,
    pub consecutive_failures: u32,
    pub total_failures: Option<u32>,
    pub inconclusive_limit: u32,
    /// The backends' port.
    pub port: u16,
    /// The cohort, sent to the canary in every stage from the A/B test on.
    pub cohort: Option<Cohort>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// The canary's share, percent (0 in the A/B stage: only the cohort).
    pub weight: u32,
    pub cohort: bool,
    pub hold: Hold,
}

/// When a stage may end (always after a passing window).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hold {
    /// After this many passing windows.
    Windows(u32),
    /// After at least this long.
    AtLeast(Duration),
    /// When the user promotes it.
    UntilPromoted,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gates {
    pub min_requests: u32,
    /// Percent.
    pub success_rate: Option<f64>,
    pub max_p99: Option<Duration>,
}

/// Why a Rollout cannot be carried out.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("spec.{field} is empty; name a Service in namespace {namespace}")]
    EmptyName {
        field: &'static str,
        namespace: String,
    },
    #[error("spec.{field}: no Service {key}; create it, or name an existing one")]
    NoService { field: &'static str, key: ObjectKey },
    #[error("spec.backends: stable and canary are both {0}; the canary must be another Service")]
    SameBackends(String),
    #[error("spec.{field}: Service {key} has no port {port}; {hint}")]
    NoPort {
        field: &'static str,
        key: ObjectKey,
        port: u16,
        hint: String,
    },
    #[error("spec.port: Service {key} has ports {ports}; set spec.port to the one to roll out")]
    AmbiguousPort { key: ObjectKey, ports: String },
    #[error("spec has no steps and no abTest; add steps (e.g. weights 10, 50, 100) or an abTest")]
    NoStages,
    #[error("spec.steps[{index}].weight {weight} is not 1-100")]
    WeightRange { index: usize, weight: u32 },
    #[error(
        "spec.steps[{index}].weight {weight} is not above the step before ({previous}); weights must increase"
    )]
    NotIncreasing {
        index: usize,
        weight: u32,
        previous: u32,
    },
    #[error("{field}: {value:?} is not a duration like 30s or 5m")]
    BadDuration { field: String, value: String },
    #[error("{field}: {value} is out of range; use {range}")]
    DurationRange {
        field: String,
        value: String,
        range: String,
    },
    #[error(
        "spec.analysis has no gate; set successRate (percent) or maxP99 (a duration), or both"
    )]
    NoGates,
    #[error("spec.analysis.successRate {0} is not a percentage above 0 and at most 100")]
    SuccessRate(f64),
    #[error("spec.analysis.{field} is 0; use 1 or more")]
    Zero { field: &'static str },
    #[error("spec.abTest.windows is 0; hold the cohort for at least one gate window")]
    NoWindows,
    #[error("spec.abTest.match is empty; give a header, cookie or query parameter")]
    EmptyCohort,
    #[error("spec.abTest.match.{field}[{index}]: {reason}")]
    BadMatch {
        field: &'static str,
        index: usize,
        reason: String,
    },
    #[error(
        "HTTPRoute {route} is managed by rollout {owner}; one rollout per route: \
         end that rollout, or name another route in spec.route"
    )]
    RouteOwned { route: ObjectKey, owner: String },
    #[error(
        "HTTPRoute {route} already exists and this rollout did not create it; \
         name it in spec.route to let the rollout adopt it, or delete it"
    )]
    RouteExists { route: ObjectKey },
    #[error(
        "HTTPRoute {route} also routes Service {service}; two routes would both apply: \
         delete it, or name it in spec.route to let the rollout adopt it"
    )]
    OtherRoute {
        route: ObjectKey,
        service: ObjectKey,
    },
}

impl Invalid {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::NoService { .. } => "BackendNotFound",
            Invalid::RouteOwned { .. }
            | Invalid::RouteExists { .. }
            | Invalid::OtherRoute { .. } => "RouteConflict",
            _ => "InvalidSpec",
        }
    }
}

fn duration(field: String, value: &str, min: Duration) -> Result<Duration, Invalid> {
    let parsed = parse_gateway_duration(value).ok_or_else(|| Invalid::BadDuration {
        field: field.clone(),
        value: value.to_string(),
    })?;
    if parsed < min || parsed > MAX_DURATION {
        return Err(Invalid::DurationRange {
            field,
            value: value.to_string(),
            range: format!("{}ms to 24h", min.as_millis()),
        });
    }
    Ok(parsed)
}

impl Plan {
    /// Checks the spec on its own (no other objects).
    pub fn new(rollout: &Rollout, port: u16) -> Result<Self, Invalid> {
        let spec = &rollout.spec;
        let analysis = &spec.analysis;
        let interval = duration(
            "spec.analysis.interval".into(),
            &analysis.interval,
            MIN_INTERVAL,
        )?;
        let mut stages = Vec::new();
        let mut cohort = None;
        if let Some(ab) = &spec.ab_test {
            check_cohort(&ab.cohort)?;
            if ab.windows == 0 {
                return Err(Invalid::NoWindows);
            }
            cohort = Some(ab.cohort.clone());
            stages.push(Stage {
                weight: 0,
                cohort: true,
                hold: Hold::Windows(ab.windows),
            });
        }
        let mut previous = 0;
        for (index, step) in spec.steps.iter().enumerate() {
            if !(1..=100).contains(&step.weight) {
                return Err(Invalid::WeightRange {
                    index,
                    weight: step.weight,
                });
            }
            if step.weight <= previous {
                return Err(Invalid::NotIncreasing {
                    index,
                    weight: step.weight,
                    previous,
                });
            }
            previous = step.weight;
            let hold = match &step.pause {
                None => Hold::Windows(1),
                Some(pause) => match &pause.duration {
                    None => Hold::UntilPromoted,
                    Some(d) => Hold::AtLeast(duration(
                        format!("spec.steps[{index}].pause.duration"),
                        d,
                        Duration::ZERO,
                    )?),
                },
            };
            stages.push(Stage {
                weight: step.weight,
                cohort: cohort.is_some(),
                hold,
            });
        }
        if stages.is_empty() {
            return Err(Invalid::NoStages);
        }
        let gates = Gates {
            min_requests: analysis.min_requests,
            success_rate: analysis.success_rate,
            max_p99: analysis
                .max_p99
                .as_deref()
                .map(|v| duration("spec.analysis.maxP99".into(), v, Duration::from_millis(1)))
                .transpose()?,
        };
        if gates.success_rate.is_none() && gates.max_p99.is_none() {
            return Err(Invalid::NoGates);
        }
        if let Some(rate) = gates.success_rate {
            if !(rate > 0.0 && rate <= 100.0) {
                return Err(Invalid::SuccessRate(rate));
            }
        }
        for (field, value) in [
            ("minRequests", analysis.min_requests),
            (
                "rollback.consecutiveFailures",
                analysis.rollback.consecutive_failures,
            ),
            (
                "rollback.totalFailures",
                analysis.rollback.total_failures.unwrap_or(1),
            ),
            ("inconclusiveLimit", analysis.inconclusive_limit),
        ] {
            if value == 0 {
                return Err(Invalid::Zero { field });
            }
        }

        Ok(Self {
            stages,
            interval,
            gates,
            consecutive_failures: analysis.rollback.consecutive_failures,
            total_failures: analysis.rollback.total_failures,
            inconclusive_limit: analysis.inconclusive_limit,
            port,
            cohort,
        })
    }

    /// Checks the spec against the mesh: the Services exist with the port,
    /// and the route is the rollout's to manage.
    pub fn check(rollout: &Rollout, store: &Store) -> Result<Self, Invalid> {
        let spec = &rollout.spec;
        let namespace = rollout.metadata.key().namespace;
        let lookup = |field: &'static str, name: &str| -> Result<Service, Invalid> {
            if name.is_empty() {
                return Err(Invalid::EmptyName {
                    field,
                    namespace: namespace.clone(),
                });
            }
            let key = ObjectKey::new(&namespace, name);
            store.service(&key).ok_or(Invalid::NoService { field, key })
        };
        let service = lookup("service", &spec.service)?;
        let stable = lookup("backends.stable", &spec.backends.stable)?;
        let canary = lookup("backends.canary", &spec.backends.canary)?;
        if spec.backends.stable == spec.backends.canary {
            return Err(Invalid::SameBackends(spec.backends.stable.clone()));
        }
        let port = route_port(&service, spec.port)?;
        for (field, backend) in [("backends.stable", &stable), ("backends.canary", &canary)] {
            if !backend.spec.ports.iter().any(|p| p.port == port) {
                return Err(Invalid::NoPort {
                    field,
                    key: backend.metadata.key(),
                    port,
                    hint: format!("give it port {port}, like Service {}", spec.service),
                });
            }
        }
        let plan = Self::new(rollout, port)?;
        check_route(rollout, store)?;
        Ok(plan)
    }
}

fn route_port(service: &Service, wanted: Option<u16>) -> Result<u16, Invalid> {
    let ports = &service.spec.ports;
    match (wanted, ports.as_slice()) {
        (Some(port), _) if ports.iter().any(|p| p.port == port) => Ok(port),
        (Some(port), _) => Err(Invalid::NoPort {
            field: "port",
            key: service.metadata.key(),
            port,
            hint: "name one of its ports".into(),
        }),
        (None, [only]) => Ok(only.port),
        (None, _) => Err(Invalid::AmbiguousPort {
            key: service.metadata.key(),
            ports: ports
                .iter()
                .map(|p| p.port.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn check_cohort(cohort: &Cohort) -> Result<(), Invalid> {
    if cohort.headers.is_empty() && cohort.cookies.is_empty() && cohort.query_params.is_empty() {
        return Err(Invalid::EmptyCohort);
    }
    let named = |field: &'static str, names: Vec<&str>| {
        names.into_iter().enumerate().try_for_each(|(index, name)| {
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ';' || c == '=')
            {
                return Err(Invalid::BadMatch {
                    field,
                    index,
                    reason: format!("name {name:?} is empty or has a space, ';' or '='"),
                });
            }
            Ok(())
        })
    };
    named(
        "headers",
        cohort.headers.iter().map(|h| h.name.as_str()).collect(),
    )?;
    named(
        "cookies",
        cohort.cookies.iter().map(|c| c.name.as_str()).collect(),
    )?;
    named(
        "queryParams",
        cohort
            .query_params
            .iter()
            .map(|q| q.name.as_str())
            .collect(),
    )?;
    for (field, matches) in [
        ("headers", &cohort.headers),
        ("queryParams", &cohort.query_params),
    ] {
        if let Some(index) = matches.iter().position(|m| m.kind != "Exact") {
            return Err(Invalid::BadMatch {
                field,
                index,
                reason: format!(
                    "type {:?}: a cohort matches exact values only",
                    matches[index].kind
                ),
            });
        }
    }
    Ok(())
}

/// The route is free for this rollout: no other rollout manages it, it was
/// created by this one or is adopted by name, and no other route has the
/// same parent Service (both would apply).
fn check_route(rollout: &Rollout, store: &Store) -> Result<(), Invalid> {
    let namespace = rollout.metadata.key().namespace;
    let key = ObjectKey::new(&namespace, rollout.route_name());
    let service = ObjectKey::new(&namespace, &rollout.spec.service);
    for route in store.routes_of(&service) {
        let route_key = route.metadata.key();
        let owner = route.metadata.annotations.get(ROLLOUT_ANNOTATION);
        if route_key != key {
            return Err(Invalid::OtherRoute {
                route: route_key,
                service,
            });
        }
        match owner {
            Some(owner) if *owner == rollout.metadata.name => {}
            Some(owner) => {
                return Err(Invalid::RouteOwned {
                    route: key,
                    owner: owner.clone(),
                })
            }
            None if rollout.spec.route.is_none() => {
                return Err(Invalid::RouteExists { route: key })
            }
            None => {}
        }
    }
    // A route of that name for another Service is someone else's too.
    if let Some(route) = store.route(&key) {
        let owner = route.metadata.annotations.get(ROLLOUT_ANNOTATION);
        match owner {
            Some(owner) if *owner != rollout.metadata.name => {
                return Err(Invalid::RouteOwned {
                    route: key,
                    owner: owner.clone(),
                })
            }
            None if rollout.spec.route.is_none() => {
                return Err(Invalid::RouteExists { route: key })
            }
            _ => {}
        }
    }
    Ok(())
}
