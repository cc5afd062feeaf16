//! The Grafana dashboards in `charts/trellis/dashboards/`: well formed, and
//! every query of every panel returns data from a real Prometheus scraping a
//! running mesh (proxies and controller) with a rollout in progress.
//!
//! The Prometheus test needs the `prometheus` binary (Debian package
//! `prometheus`; `PROMETHEUS=/path` overrides). Without it the test skips,
//! except under `CI=true`, where that is a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::prometheus::{self, has_number, Prometheus};
use trellis_tests::*;

const UIDS: [&str; 4] = [
    "trellis-mesh-overview",
    "trellis-service-detail",
    "trellis-canary",
    "trellis-control-plane",
];

/// What the test substitutes for template variables (and Grafana's globals).
const VARIABLES: [(&str, &str); 11] = [
    ("namespace", "default"),
    ("service", "hello"),
    ("backend_a", "hello-v1"),
    ("backend_b", "hello-v2"),
    ("__rate_interval", "1m"),
    ("__interval_ms", "15000"),
    ("__interval", "15s"),
    ("__range_s", "300"),
    ("__range_ms", "300000"),
    ("__range", "5m"),
    ("datasource", "prometheus"),
];

struct Dashboard {
    file: String,
    json: Value,
}

impl Dashboard {
    fn uid(&self) -> &str {
        self.json["uid"].as_str().unwrap_or_default()
    }

    fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .map(|l| l.iter().collect())
            .unwrap_or_default()
    }

    fn variable(&self, name: &str) -> Option<&Value> {
        self.variables().into_iter().find(|v| v["name"] == name)
    }

    /// Every panel, rows' nested panels included (rows themselves too).
    fn panels(&self) -> Vec<&Value> {
        fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
            for panel in panels.as_array().into_iter().flatten() {
                out.push(panel);
                walk(&panel["panels"], out);
            }
        }
        let mut out = Vec::new();
        walk(&self.json["panels"], &mut out);
        out
    }

    /// (panel title, expression) for every target of every panel.
    fn queries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for panel in self.panels() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.to_string(), expr.to_string()));
                }
            }
        }
        out
    }
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/trellis/dashboards")
}

fn load() -> Vec<Dashboard> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("charts/trellis/dashboards exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("read dashboard");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{file}: not valid JSON: {e}"));
            Dashboard { file, json }
        })
        .collect()
}

/// `$name`, `${name}` and `[[name]]` references in an expression.
fn references(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let (start, braced) = if bytes.get(i + 1) == Some(&b'{') {
                (i + 2, true)
            } else {
                (i + 1, false)
            };
            let mut end = start;
            while end < bytes.len() && ident(bytes[end]) {
                end += 1;
            }
            if end > start {
                out.push(expr[start..end].to_string());
            }
            i = if braced { end + 1 } else { end };
        } else {
            i += 1;
        }
    }
    out
}

fn substitute(expr: &str) -> String {
    let mut expr = expr.to_string();
    // Braced forms first; longer names before their prefixes.
    for (name, value) in VARIABLES {
        expr = expr.replace(&format!("${{{name}}}"), value);
    }
    for (name, value) in VARIABLES {
        expr = expr.replace(&format!("${name}"), value);
    }
    expr
}

/// Every `datasource` value anywhere in `json`, with its JSON path.
fn datasource_refs<'a>(json: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    match json {
        Value::Object(map) => {
            for (key, value) in map {
                let here = format!("{path}/{key}");
                if key == "datasource" {
                    out.push((here.clone(), value));
                }
                datasource_refs(value, here, out);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                datasource_refs(item, format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn dashboards_are_well_formed() {
    let dashboards = load();
    let uids: Vec<&str> = dashboards.iter().map(Dashboard::uid).collect();
    let unique: BTreeSet<&str> = uids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        uids.len(),
        "duplicate dashboard uid: {uids:?}"
    );
    assert_eq!(
        unique,
        UIDS.into_iter().collect::<BTreeSet<_>>(),
        "the dashboards' stable uids"
    );
    for d in &dashboards {
        let file = &d.file;
        assert!(
            d.json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: no title"
        );
        let schema = d.json["schemaVersion"].as_u64().unwrap_or(0);
        assert!(
            (36..=40).contains(&schema),
            "{file}: schemaVersion {schema}"
        );
        assert!(d.json["id"].is_null(), "{file}: a fixed numeric id");

        // The data source is chosen by a variable, never hard-coded.
        let ds = d
            .variable("datasource")
            .unwrap_or_else(|| panic!("{file}: no `datasource` variable"));
        assert_eq!(ds["type"], "datasource", "{file}: datasource variable type");
        assert_eq!(
            ds["query"], "prometheus",
            "{file}: datasource variable query"
        );
        let mut refs = Vec::new();
        datasource_refs(&d.json, String::new(), &mut refs);
        for (path, value) in refs {
            let ok = value["type"] == "prometheus" && value["uid"] == "${datasource}";
            assert!(
                ok,
                "{file}{path}: datasource {value} (must be {{\"type\":\"prometheus\",\"uid\":\"${{datasource}}\"}})"
            );
        }

        // Panels: unique ids, a position, queries through the variable.
        let mut ids = BTreeSet::new();
        for panel in d.panels() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            let id = panel["id"].as_u64();
            assert!(
                id.is_some_and(|id| ids.insert(id)),
                "{file}: panel {title:?} has a missing or duplicate id"
            );
            assert!(
                panel["gridPos"].is_object(),
                "{file}: {title:?} has no gridPos"
            );
            if panel["type"] == "row" {
                continue;
            }
            assert!(!title.is_empty(), "{file}: a panel without a title");
            assert!(
                panel["datasource"].is_object(),
                "{file}: {title:?} has no datasource"
            );
            let targets = panel["targets"].as_array();
            assert!(
                targets.is_some_and(|t| !t.is_empty()),
                "{file}: {title:?} has no targets"
            );
            for target in targets.into_iter().flatten() {
                assert!(
                    target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                    "{file}: {title:?} has a target without expr"
                );
                assert!(
                    target["datasource"].is_object(),
                    "{file}: {title:?} has a target without datasource"
                );
            }
        }

        // Every variable an expression uses is defined (or a Grafana global),
        // and the test knows a value for it.
        let defined: BTreeSet<String> = d
            .variables()
            .iter()
            .filter_map(|v| v["name"].as_str().map(String::from))
            .collect();
        for (title, expr) in d.queries() {
            for name in references(&expr) {
                assert!(
                    defined.contains(&name) || name.starts_with("__"),
                    "{file}: {title:?} uses undefined variable ${name}: {expr}"
                );
                assert!(
                    VARIABLES.iter().any(|(n, _)| *n == name),
                    "{file}: {title:?}: the test has no value for ${name}"
                );
            }
            let substituted = substitute(&expr);
            assert!(
                !substituted.contains('$'),
                "{file}: {title:?}: unsubstituted variable in {substituted}"
            );
        }
    }

    // The per-service dashboards pick namespace and service from the data.
    for uid in ["trellis-service-detail", "trellis-canary"] {
        let d = dashboards.iter().find(|d| d.uid() == uid).unwrap();
        for (name, query) in [
            (
                "namespace",
                "label_values(trellis_requests_total, dst_namespace)",
            ),
            (
                "service",
                "label_values(trellis_requests_total{dst_namespace=\"$namespace\"}, dst_service)",
            ),
        ] {
            let var = d
                .variable(name)
                .unwrap_or_else(|| panic!("{}: no `{name}` variable", d.file));
            assert_eq!(var["type"], "query", "{}: {name}", d.file);
            let q = var["query"]["query"].as_str().or(var["query"].as_str());
            assert_eq!(q, Some(query), "{}: {name} query", d.file);
        }
    }
}

// ---------------------------------------------------------------------------
// Against a real Prometheus.

fn fault(name: &str, spec: &str) -> String {
    format!("---\napiVersion: trellis.dev/v1alpha1\nkind: HTTPFault\nmetadata: {{name: {name}}}\nspec: {spec}\n")
}

/// A rollout of `hello` to `hello-v2` that stays at its first step: gates
/// the weaker canary passes (one failure in eight), then a manual pause.
const ROLLOUT: &str = "apiVersion: trellis.dev/v1alpha1
kind: Rollout
metadata: {name: hello}
spec:
  service: hello
  backends: {stable: hello-v1, canary: hello-v2}
  steps: [{weight: 50, pause: {}}, {weight: 100}]
  analysis:
    interval: 2s
    minRequests: 1
    successRate: 50
    maxP99: 1s
    rollback: {consecutiveFailures: 100}
";

const FAULT_FILTER: &str = "      filters: [{type: ExtensionRef, extensionRef: {group: trellis.dev, kind: HTTPFault, name: f}}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_live_mesh() {
    let Some(binary) = prometheus::binary() else {
        return;
    };
    let dashboards = load();

    // hello-v2 is the weaker canary: it fails one request in eight and is a
    // little slower. A route splits 50/50, retries once and aborts 5% of
    // requests, so every family the dashboards plot has series.
    let mesh = HelloMesh::start_with_apps(|listener, version| {
        if version == "v2" {
            scripted_app(listener, version, Duration::from_millis(2), |hit| {
                hit % 8 == 0
            });
        } else {
            scripted_app(listener, version, Duration::ZERO, |_| false);
        }
    })
    .await;
    let extra = format!("      retry: {{attempts: 1}}\n{FAULT_FILTER}");
    mesh.write_manifest(
        "route.yaml",
        &(split_route(mesh.port, 50, 50, &extra)
            + &fault("f", "{abort: {httpStatus: 503, percent: 5}}")),
    );
    let admin = mesh.client.admin_addr;
    eventually(Duration::from_secs(15), "the route applies", || async {
        burst(&mesh.http1(), &mesh.authority(), 40, 4).await;
        let metrics = AppClient::http1(admin)
            .get(&admin.to_string(), "/metrics")
            .await
            .map(|a| a.text())
            .unwrap_or_default();
        let applied = metrics.contains("dst_backend=\"hello-v2\"")
            && metrics.contains("trellis_fault_injections_total{")
            && metrics.contains("trellis_retries_total{");
        if applied {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;

    // Steady traffic for as long as Prometheus is queried, and, until a
    // rollout takes the route over, a route that changes its weights every
    // second, so the controller keeps pushing.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_changes = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (client, authority, stop) = (mesh.http1(), mesh.authority(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                burst(&client, &authority, 20, 2).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let changes = {
        let fault = fault("f", "{abort: {httpStatus: 503, percent: 5}}");
        let routes = [
            split_route(mesh.port, 40, 60, &extra) + &fault,
            split_route(mesh.port, 50, 50, &extra) + &fault,
        ];
        let (path, stop) = (mesh.manifests().join("route.yaml"), stop_changes.clone());
        tokio::spawn(async move {
            for routes in routes.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                write_atomically(&path, routes);
            }
        })
    };

    let controller = mesh.controller.as_ref().expect("controller running");
    let mut proxies = vec![mesh.client.admin_addr];
    proxies.extend(mesh.hello.iter().map(|(_, p)| p.admin_addr));
    let dir = tempfile::tempdir().expect("tempdir");
    let prometheus = Prometheus::start(
        &binary,
        dir.path(),
        &[
            ("trellis-proxies", proxies.clone()),
            ("trellis-controller", vec![controller.admin_addr]),
        ],
    )
    .await;

    // Every target up, with at least three scrapes of request data (rates
    // need two) and of the controller's.
    let ready = [
        "min(count_over_time(up[1m])) >= 3 and min(up) == 1",
        "count_over_time(trellis_requests_total{direction=\"outbound\",dst_backend=\"hello-v2\"}[1m]) >= 3",
        "count_over_time(trellis_controller_watches[1m]) >= 3",
    ];
    for expr in ready {
        prometheus.until_result(expr, Duration::from_secs(60)).await;
    }

    // A rollout of hello-v2 takes the route over (the hand-written one goes)
    // and holds its first step, 50%, until promoted: the rollout row and
    // the gates' threshold lines have series while the mesh serves.
    stop_changes.store(true, Ordering::Relaxed);
    changes.await.expect("route changes");
    std::fs::remove_file(mesh.manifests().join("route.yaml")).expect("remove route.yaml");
    mesh.write_manifest("rollout-default-hello.yaml", ROLLOUT);
    for expr in [
        "trellis_controller_rollout_canary_weight_percent{service=\"hello\"} == 50",
        "trellis_controller_rollout_gate_threshold{service=\"hello\",gate=\"p99\"}",
        "count_over_time(trellis_requests_total{direction=\"outbound\",dst_backend=\"hello-v2\"}[1m]) >= 3",
    ] {
        prometheus.until_result(expr, Duration::from_secs(30)).await;
    }

    // Every query of every panel: success and a number. A series that only
    // just appeared can need another scrape, so failures get a few rounds.
    let all: Vec<(String, String, String)> = dashboards
        .iter()
        .flat_map(|d| {
            d.queries()
                .into_iter()
                .map(|(title, expr)| (d.file.clone(), title, expr))
        })
        .collect();
    assert!(all.len() >= 20, "only {} queries", all.len());
    let mut failures: BTreeMap<(String, String, String), String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending = all.clone();
    loop {
        failures.clear();
        for (file, title, expr) in &pending {
            let query = substitute(expr);
            let problem = match prometheus.query(&query).await {
                Err(e) => Some(format!("error: {e}")),
                Ok(r) if r.is_empty() => Some("empty result".to_string()),
                Ok(r) if !has_number(&r) => Some(format!("only NaN: {r:?}")),
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                failures.insert((file.clone(), title.clone(), query), problem);
            }
        }
        if failures.is_empty() || Instant::now() > deadline {
            break;
        }
        pending.retain(|(file, title, expr)| {
            failures.contains_key(&(file.clone(), title.clone(), substitute(expr)))
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("traffic");
    let report: Vec<String> = failures
        .iter()
        .map(|((file, title, query), problem)| {
            format!("{file} / panel {title:?}\n    {query}\n    → {problem}")
        })
        .collect();
    assert!(
        report.is_empty(),
        "{} of {} dashboard queries show no data:\n{}",
        report.len(),
        all.len(),
        report.join("\n")
    );
    eprintln!("all {} dashboard queries returned data", all.len());
    drop(prometheus);
}
