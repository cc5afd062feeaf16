//! `meshctl route` as a user runs it against a manifest directory.

mod support;

use std::path::Path;

use meshctl::demo::manifests;
use support::{demo_dir, meshctl_in as meshctl, text};

fn files(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn set_writes_a_standard_httproute_that_the_controller_accepts() {
    let dir = demo_dir();
    let out = meshctl(
        dir.path(),
        &[
            "route",
            "set",
            "hello",
            "--backend",
            "hello-v1=90",
            "--backend",
            "hello-v2=10",
            "--timeout",
            "2s",
            "--retries",
            "2",
            "--fault",
            "abort=503:5%",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let table = text(&out);
    assert!(table.contains("hello-v1 90%, hello-v2 10%"), "{table}");
    assert!(
        table.contains("2000ms") && table.contains("abort 503 5%"),
        "{table}"
    );

    let yaml = std::fs::read_to_string(dir.path().join("route-default-hello.yaml")).unwrap();
    assert!(
        yaml.contains("apiVersion: gateway.networking.k8s.io/v1")
            && yaml.contains("kind: HTTPRoute"),
        "{yaml}"
    );
    assert!(yaml.contains("kind: HTTPFault"), "{yaml}");

    // The controller's own loader accepts the directory with no error.
    let store = trellis_control_plane::store::Store::new("cluster.local");
    let mut source =
        trellis_control_plane::source::local::LocalSource::new(dir.path(), store.clone());
    source.reload().unwrap();
    assert!(
        source.errors().borrow().is_empty(),
        "{:?}",
        source.errors().borrow()
    );
    let routes = store.routes(manifests::HELLO_AUTHORITY, "default");
    assert_eq!(routes.rules.len(), 1);
    assert_eq!(
        routes.rules[0]
            .backends
            .iter()
            .map(|b| b.weight)
            .collect::<Vec<_>>(),
        [90, 10]
    );

    // Idempotent: the same command changes nothing.
    let before = files(dir.path());
    let again = meshctl(
        dir.path(),
        &[
            "route",
            "set",
            "hello",
            "--backend",
            "hello-v1=90",
            "--backend",
            "hello-v2=10",
            "--timeout",
            "2s",
            "--retries",
            "2",
            "--fault",
            "abort=503:5%",
        ],
    );
    assert!(text(&again).contains("unchanged"), "{}", text(&again));
    assert_eq!(files(dir.path()), before);
}

#[test]
fn ab_match_and_get_and_delete() {
    let dir = demo_dir();
    let out = meshctl(
        dir.path(),
        &[
            "route",
            "set",
            "hello",
            "--backend",
            "hello-v1=100",
            "--match",
            "header:x-canary=true",
            "--to",
            "hello-v2",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let get = meshctl(dir.path(), &["route", "get", "hello"]);
    let table = text(&get);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[1].contains("header x-canary=true") && lines[1].contains("hello-v2 100%"),
        "the A/B rule comes first:\n{table}"
    );
    assert!(lines[2].contains("hello-v1 100%"), "{table}");

    let json = meshctl(dir.path(), &["route", "get", "hello", "-o", "json"]);
    let routes: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(routes[0]["kind"], "HTTPRoute");

    let out = meshctl(dir.path(), &["route", "delete", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dir.path().join("route-default-hello.yaml").exists());
    let get = meshctl(dir.path(), &["route", "get", "hello"]);
    assert!(text(&get).contains("has no route"), "{}", text(&get));
}

#[test]
fn nonsense_is_refused_with_a_message_and_changes_nothing() {
    let dir = demo_dir();
    let before = files(dir.path());
    for (args, expect) in [
        (
            vec!["--backend", "hello-v3=10"],
            "backendRef \"hello-v3\" names no Service in namespace default",
        ),
        (
            vec!["--backend", "hello-v1=0", "--backend", "hello-v2=0"],
            "every weight is 0",
        ),
        (vec!["--backend", "hello-v1"], "expected NAME=WEIGHT"),
        (vec!["--backend", "hello-v1=ten"], "is not a whole number"),
        (
            vec!["--fault", "abort=503"],
            "expected abort=STATUS:PERCENT%",
        ),
        (vec!["--fault", "delay=200ms:150%"], "between 0 and 100"),
        (vec!["--timeout", "soon"], "expected a duration"),
        (
            vec!["--match", "cookie:a=b", "--to", "hello-v2"],
            "expected header:NAME=VALUE",
        ),
        (vec![], "nothing to set"),
    ] {
        let mut full = vec!["route", "set", "hello"];
        full.extend(&args);
        let out = meshctl(dir.path(), &full);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(text(&out).contains(expect), "{args:?}: {}", text(&out));
    }
    let out = meshctl(
        dir.path(),
        &["route", "set", "nope", "--backend", "hello-v1=1"],
    );
    assert!(
        text(&out).contains("no Service default/nope"),
        "{}",
        text(&out)
    );
    assert_eq!(
        files(dir.path()),
        before,
        "a refused command writes nothing"
    );
}

#[test]
fn set_refuses_a_service_whose_traffic_a_rollout_manages() {
    let dir = demo_dir();
    let managed = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: hello
  namespace: default
  annotations: {trellis.dev/rollout: hello}
spec:
  parentRefs: [{group: \"\", kind: Service, name: hello, port: 8080}]
  rules: [{backendRefs: [{name: hello-v1, port: 8080}]}]
";
    std::fs::write(dir.path().join("rollout-default-hello-route.yaml"), managed).unwrap();
    let before = files(dir.path());
    let out = meshctl(
        dir.path(),
        &["route", "set", "hello", "--backend", "hello-v2=100"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("managed by rollout default/hello"),
        "{}",
        text(&out)
    );
    assert_eq!(files(dir.path()), before, "nothing was written");
}

/// A route the controller refuses says why in `route get`, with Gateway
/// API's conditions, while the good one beside it is accepted.
#[test]
fn get_prints_each_routes_conditions_and_why_one_is_refused() {
    let dir = demo_dir();
    let route = |name: &str, rule: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: {name}}}\nspec:\n  \
             parentRefs: [{{group: \"\", kind: Service, name: hello}}]\n  rules: [{rule}]\n"
        )
    };
    let port = 8080;
    let write =
        |file: &str, contents: String| std::fs::write(dir.path().join(file), contents).unwrap();
    write(
        "good.yaml",
        route("good", &format!("{{matches: [{{path: {{value: /a}}}}], backendRefs: [{{name: hello-v2, port: {port}}}]}}")),
    );
    write(
        "unsupported.yaml",
        route("unsupported", "{sessionPersistence: {type: Cookie}}"),
    );
    write(
        "missing.yaml",
        route(
            "missing",
            &format!("{{backendRefs: [{{name: hello-v9, port: {port}}}]}}"),
        ),
    );
    let get = meshctl(dir.path(), &["route", "get", "hello"]);
    let table = text(&get);
    let lines: Vec<&str> = table.lines().collect();
    // A route's two conditions: its own line and the next.
    let conditions = |name: &str| {
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("default/{name} ({name}.yaml)")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"));
        let squeeze = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
        (squeeze(lines[at]), squeeze(lines[at + 1]))
    };
    let (accepted, resolved) = conditions("good");
    assert!(accepted.contains("Accepted True Accepted"), "{table}");
    assert!(
        resolved.contains("ResolvedRefs True ResolvedRefs"),
        "{table}"
    );
    let (accepted, _) = conditions("unsupported");
    assert!(
        accepted.contains(
            "Accepted False UnsupportedValue spec.rules[0].sessionPersistence: Trellis does not implement this field"
        ),
        "{table}"
    );
    let (accepted, resolved) = conditions("missing");
    assert!(
        accepted.contains("Accepted False UnresolvedRefs"),
        "{table}"
    );
    assert!(
        resolved.contains("ResolvedRefs False BackendNotFound spec.rules[0].backendRefs[0]"),
        "{table}"
    );
    // The rules shown are the ones served: the refused route's are not.
    assert!(!table.contains("hello-v9 100%"), "{table}");
}
