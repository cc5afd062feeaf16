//! `meshctl route set`'s flags turned into the HTTPRoute (and HTTPFault)
//! they describe.

use anyhow::{bail, Context as _};
use trellis_control_plane::model::*;

use super::SetArgs;

/// The HTTPRoute (and HTTPFault) the flags describe.
pub(super) fn build(args: &SetArgs) -> anyhow::Result<(HttpRoute, Option<HttpFault>)> {
    let t = &args.target;
    if args.backends.is_empty()
        && args.matches.is_empty()
        && args.timeout.is_none()
        && args.retries.is_none()
        && args.faults.is_empty()
    {
        bail!("nothing to set: give --backend NAME=WEIGHT, --match … --to NAME, --timeout, --retries or --fault");
    }
    let meta = |name: String| ObjectMeta {
        name,
        namespace: Some(t.namespace.clone()),
        labels: [(
            "app.kubernetes.io/managed-by".to_string(),
            "meshctl".to_string(),
        )]
        .into(),
        ..ObjectMeta::default()
    };
    let backends = args
        .backends
        .iter()
        .map(|b| {
            let (name, weight) = b.split_once('=').with_context(|| {
                format!("--backend {b:?}: expected NAME=WEIGHT, e.g. hello-v1=90")
            })?;
            let weight: u32 = weight.parse().with_context(|| {
                format!("--backend {b:?}: weight {weight:?} is not a whole number")
            })?;
            Ok(backend(name, weight))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut fault = HttpFaultSpec::default();
    for f in &args.faults {
        parse_fault(f, &mut fault)?;
    }
    let fault_object = (!args.faults.is_empty()).then(|| HttpFault {
        api_version: TRELLIS_API_VERSION.into(),
        kind: "HTTPFault".into(),
        metadata: meta(format!("{}-fault", t.service)),
        spec: fault,
    });
    if let Some(timeout) = &args.timeout {
        if trellis_control_plane::store::parse_gateway_duration(timeout).is_none() {
            bail!("--timeout {timeout:?}: expected a duration like 2s or 500ms");
        }
    }
    let shape = |rule: HttpRouteRule| HttpRouteRule {
        timeouts: args.timeout.clone().map(|t| HttpRouteTimeouts {
            request: Some(t),
            backend_request: None,
        }),
        retry: args.retries.map(|attempts| HttpRouteRetry {
            attempts: Some(attempts),
            codes: args.retry_on.clone(),
            backoff: None,
        }),
        filters: fault_object
            .iter()
            .map(|f| HttpRouteFilter {
                kind: "ExtensionRef".into(),
                extension_ref: Some(LocalObjectReference {
                    group: TRELLIS_GROUP.into(),
                    kind: "HTTPFault".into(),
                    name: f.metadata.name.clone(),
                }),
                ..HttpRouteFilter::default()
            })
            .collect(),
        ..rule
    };
    let mut rules = Vec::new();
    if let Some(to) = &args.to {
        let mut m = HttpRouteMatch::default();
        for spec in &args.matches {
            parse_match(spec, &mut m)?;
        }
        rules.push(shape(HttpRouteRule {
            matches: vec![m],
            backend_refs: vec![backend(to, 1)],
            ..HttpRouteRule::default()
        }));
    }
    rules.push(shape(HttpRouteRule {
        backend_refs: backends,
        ..HttpRouteRule::default()
    }));
    let route = HttpRoute {
        api_version: GATEWAY_API_VERSION.into(),
        kind: "HTTPRoute".into(),
        metadata: meta(t.service.clone()),
        spec: HttpRouteSpec {
            parent_refs: vec![ParentReference {
                group: Some(String::new()),
                kind: Some("Service".into()),
                name: t.service.clone(),
                namespace: None,
                port: None,
            }],
            rules,
            ..HttpRouteSpec::default()
        },
    };
    Ok((route, fault_object))
}

fn backend(name: &str, weight: u32) -> BackendRef {
    BackendRef {
        group: None,
        kind: None,
        name: name.to_string(),
        namespace: None,
        port: None,
        weight: Some(weight),
        filters: Vec::new(),
    }
}

fn parse_match(spec: &str, m: &mut HttpRouteMatch) -> anyhow::Result<()> {
    let bad = || {
        format!("--match {spec:?}: expected header:NAME=VALUE, query:NAME=VALUE, path:/PREFIX, exact-path:/PATH or method:METHOD")
    };
    let (kind, rest) = spec.split_once(':').with_context(bad)?;
    let pair = || -> anyhow::Result<HttpHeaderMatch> {
        let (name, value) = rest.split_once('=').with_context(bad)?;
        Ok(HttpHeaderMatch {
            kind: "Exact".into(),
            name: name.into(),
            value: value.into(),
        })
    };
    match kind {
        "header" => m.headers.push(pair()?),
        "query" => m.query_params.push(pair()?),
        "path" => {
            m.path = Some(HttpPathMatch {
                kind: "PathPrefix".into(),
                value: rest.into(),
            })
        }
        "exact-path" => {
            m.path = Some(HttpPathMatch {
                kind: "Exact".into(),
                value: rest.into(),
            })
        }
        "method" => m.method = Some(rest.to_ascii_uppercase()),
        _ => bail!(bad()),
    }
    Ok(())
}

fn parse_fault(spec: &str, fault: &mut HttpFaultSpec) -> anyhow::Result<()> {
    let bad = || {
        format!("--fault {spec:?}: expected abort=STATUS:PERCENT% (e.g. abort=503:5%) or delay=DURATION:PERCENT% (e.g. delay=200ms:10%)")
    };
    let (kind, rest) = spec.split_once('=').with_context(bad)?;
    let (value, percent) = rest.split_once(':').with_context(bad)?;
    let percent: f64 = percent
        .trim_end_matches('%')
        .parse()
        .map_err(|_| anyhow::anyhow!(bad()))?;
    if !(0.0..=100.0).contains(&percent) {
        bail!("--fault {spec:?}: the percentage must be between 0 and 100");
    }
    match kind {
        "abort" => {
            let status: u16 = value.parse().map_err(|_| anyhow::anyhow!(bad()))?;
            fault.abort = Some(FaultAbort {
                http_status: status,
                percent,
            });
        }
        "delay" => {
            fault.delay = Some(FaultDelay {
                fixed_delay: value.into(),
                percent,
            })
        }
        _ => bail!(bad()),
    }
    Ok(())
}
