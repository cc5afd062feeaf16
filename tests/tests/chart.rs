//! The Helm chart (charts/trellis) and `meshctl install`, checked with real
//! tools: Helm's own library (PyPI helm-sdkpy: its `Lint`, and its `Install`
//! against the in-repo fake API server), `kubernetes-validate --strict`
//! (the API server's OpenAPI schemas) and Python's `jsonschema`. Without a
//! tool a test skips, except under `CI=true`, where it fails.
//!
//! `meshctl install` renders the chart's objects in Rust; the equality
//! tests install the chart with Helm and require the objects Helm created
//! to be the ones `meshctl install` prints, for the same values and CA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meshctl::install::values::merge;
use serde_json::{json, Value};
use trellis_control_plane::identity::Ca;
use trellis_tests::fake_api::resources::RESOURCES;
use trellis_tests::fake_api::{FakeApi, Kubectl};
use trellis_tests::TRUST_DOMAIN;

const NAMESPACE: &str = "trellis";
const HELM_SDKPY: (&str, &str) = (
    "helm-sdkpy",
    "pip install --ignore-requires-python helm-sdkpy",
);

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/trellis")
}

/// A local-mode CA directory: what `meshctl install --ca-dir` reads, and
/// what the Helm values get with `--set-file`.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), TRUST_DOMAIN).expect("a CA");
        TestCa { dir }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(file)).unwrap()
    }

    /// The identity values (`--set-file identity.trustRoots=bundle.crt ...`).
    fn values(&self) -> Value {
        json!({"identity": {
            "trustRoots": self.read("bundle.crt"),
            "issuer": {"certificate": self.read("issuer.crt"), "key": self.read("issuer.key")},
        }})
    }
}

/// Every optional feature on.
fn everything_on() -> Value {
    json!({
        "controller": {"prometheusUrl": "http://prometheus-operated.monitoring:9090"},
        "monitoring": {
            "podMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "prometheus"}},
            "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
        },
    })
}

fn merged(parts: &[&Value]) -> Value {
    let mut values = json!({});
    for part in parts {
        merge(&mut values, (*part).clone());
    }
    values
}

/// The chart's values.yaml with `overrides` merged in.
fn chart_values(overrides: &Value) -> Value {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let mut values: Value = serde_saphyr::from_str(&text).unwrap();
    merge(&mut values, overrides.clone());
    values
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of the chart in `dir` whose values.yaml is the chart's with
/// `overrides` (Helm's linter takes no values but the chart's own).
fn chart_copy(dir: &Path, overrides: &Value) -> PathBuf {
    copy_dir(&chart(), dir);
    // JSON is YAML.
    std::fs::write(dir.join("values.yaml"), chart_values(overrides).to_string()).unwrap();
    dir.to_path_buf()
}

/// Helm's linter on `chart`: `(severity, path)` of every message
/// and the error count. Severities are Helm's: 1 info, 2 warning, 3 error.
fn lint(chart: &Path) -> Option<(Vec<(u64, String)>, usize)> {
    const SCRIPT: &str = r#"
import asyncio, json, sys
import helm_sdkpy
result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(sys.argv[1]))
print(json.dumps({
    "messages": [[m["Severity"], m["Path"]] for m in result.get("Messages") or []],
    "errors": len(result.get("Errors") or []),
}))
"#;
    let (package, install) = HELM_SDKPY;
    let out = trellis_tests::python_with(
        package,
        install,
        SCRIPT,
        &[chart.to_str().expect("a UTF-8 path")],
    )?;
    let report: Value = serde_json::from_slice(&out).expect("lint report");
    let messages = report["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m[0].as_u64().unwrap_or(0),
                m[1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    Some((messages, report["errors"].as_u64().unwrap_or(0) as usize))
}

fn assert_lints_cleanly(overrides: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let Some((messages, errors)) = lint(&chart_copy(dir.path(), overrides)) else {
        return;
    };
    let serious: Vec<_> = messages
        .iter()
        .filter(|(severity, _)| *severity >= 2)
        .collect();
    assert!(
        errors == 0 && serious.is_empty(),
        "helm lint: {errors} errors; warnings or errors: {serious:#?}"
    );
}

#[test]
fn the_chart_lints_cleanly_with_default_values() {
    assert_lints_cleanly(&TestCa::new().values());
}

#[test]
fn the_chart_lints_cleanly_with_every_optional_feature_on() {
    let ca = TestCa::new();
    assert_lints_cleanly(&merged(&[&ca.values(), &everything_on()]));
    // An external issuer (cert-manager) needs only the roots.
    let external =
        json!({"identity": {"trustRoots": ca.read("bundle.crt"), "issuer": {"external": true}}});
    assert_lints_cleanly(&merged(&[&external, &everything_on()]));
}

#[test]
fn without_a_ca_the_chart_says_how_to_provide_one() {
    // The chart's values as shipped: no certificates. (Helm's linter lets
    // `required` pass, so this installs.)
    let Some(installed) = helm_install(&json!({})) else {
        return;
    };
    let error = installed.expect_err("Helm installed the chart without a CA");
    assert!(
        error.contains("identity.trustRoots")
            && error.contains("meshctl install")
            && error.contains("--set-file"),
        "no word on how to pass the CA: {error}"
    );
}

#[test]
fn a_broken_template_or_dashboard_fails_the_lint() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    for (file, breakage) in [
        // A template error.
        (
            "templates/dashboards.yaml",
            "\n{{ .Values.nope.missing }}\n",
        ),
        // Rendered output that is not YAML.
        (
            "templates/broken.yaml",
            "kind: ConfigMap\n  data: [unclosed\n",
        ),
    ] {
        let copy = chart_copy(&dir.path().join(file.replace('/', "-")), &ca.values());
        let path = copy.join(file);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(breakage);
        std::fs::write(&path, text).unwrap();
        let Some((messages, errors)) = lint(&copy) else {
            return;
        };
        assert!(
            errors > 0 && messages.iter().any(|(severity, _)| *severity == 3),
            "breaking {file} went unnoticed: {messages:?}"
        );
    }
}

/// Installs the chart with Helm's library against a fake API server
/// (release `trellis` in namespace `trellis`, Helm's release record in
/// memory: the fake speaks JSON, and Helm's Secret driver protobuf) and
/// returns every object Helm created, or Helm's error.
fn helm_install(values: &Value) -> Option<Result<Vec<Value>, String>> {
    const SCRIPT: &str = r#"
import asyncio, json, sys
import helm_sdkpy
config = helm_sdkpy.Configuration(namespace=sys.argv[2], kubeconfig=sys.argv[1])
try:
    asyncio.run(helm_sdkpy.Install(config).run(
        "trellis", sys.argv[3], values=json.loads(sys.argv[4]), wait=False, timeout=60))
    print(json.dumps({"ok": True}))
except helm_sdkpy.HelmError as e:
    print(json.dumps({"error": str(e)}))
"#;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let api = runtime.block_on(FakeApi::start());
    let _in_runtime = runtime.enter();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let out = helm_sdkpy(
        SCRIPT,
        &[
            kubeconfig.to_str().unwrap(),
            NAMESPACE,
            chart().to_str().unwrap(),
            &values.to_string(),
        ],
    )?;
    let answer: Value = serde_json::from_slice(&out).expect("the install script's answer");
    if let Some(error) = answer["error"].as_str() {
        return Some(Err(error.to_string()));
    }
    let objects = RESOURCES
        .iter()
        .filter(|r| !r.create_only)
        .flat_map(|r| api.objects(&r.api_version(), r.kind))
        // The fake's own (default, kube-system, ...) and the release's.
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    Some(Ok(objects))
}

/// A helm-sdkpy script, with Helm's release record kept in memory.
fn helm_sdkpy(script: &str, args: &[&str]) -> Option<Vec<u8>> {
    let (package, install) = HELM_SDKPY;
    // Read by Helm's Go runtime at start, so set for the process.
    trellis_tests::python_with_env(package, install, script, args, &[("HELM_DRIVER", "memory")])
}

/// `meshctl install` for `values` (a values file) and the CA in `ca`.
fn meshctl_install(values: &Value, ca: &TestCa) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values.to_string()).unwrap();
    let args = meshctl::install::InstallArgs::new(
        vec![file],
        vec![],
        Some(ca.dir.path().to_path_buf()),
        NAMESPACE,
    );
    let yaml = meshctl::install::render(&args).expect("meshctl install renders");
    serde_saphyr::from_multiple(&yaml).expect("meshctl install prints YAML")
}

/// An object as the chart means it: without what the API server adds and
/// Helm's own labels and annotations, keyed by kind, namespace and name.
fn normalized(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|mut object| {
            let metadata = object["metadata"].as_object_mut().expect("metadata");
            for key in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                metadata.remove(key);
            }
            for (field, prefix) in [
                ("annotations", "meta.helm.sh/"),
                ("labels", "app.kubernetes.io/managed-by"),
            ] {
                if let Some(map) = metadata.get_mut(field).and_then(Value::as_object_mut) {
                    map.retain(|key, _| !key.starts_with(prefix));
                    if map.is_empty() {
                        metadata.remove(field);
                    }
                }
            }
            let key = format!(
                "{} {}/{}",
                object["kind"].as_str().unwrap_or(""),
                object["metadata"]["namespace"].as_str().unwrap_or(""),
                object["metadata"]["name"].as_str().unwrap_or("")
            );
            (key, object)
        })
        .collect()
}

fn assert_meshctl_install_equals_helm(overrides: &Value) {
    let ca = TestCa::new();
    let values = merged(&[overrides, &ca.values()]);
    let Some(helm) = helm_install(&values) else {
        return;
    };
    let helm = normalized(helm.expect("helm install"));
    // meshctl also prints the namespace, which Helm's release namespace is.
    let mut meshctl = normalized(meshctl_install(overrides, &ca));
    let namespace = meshctl.remove(&format!("Namespace /{NAMESPACE}"));
    assert!(
        namespace.is_some(),
        "meshctl install prints no Namespace {NAMESPACE}"
    );
    let helm_keys: Vec<&String> = helm.keys().collect();
    let meshctl_keys: Vec<&String> = meshctl.keys().collect();
    assert_eq!(
        helm_keys, meshctl_keys,
        "Helm and meshctl install make different objects"
    );
    for (key, object) in &helm {
        let mut differences = Vec::new();
        differ(object, &meshctl[key], String::new(), &mut differences);
        assert!(
            differences.is_empty(),
            "{key}: Helm made, meshctl install prints:\n{}",
            differences.join("\n")
        );
    }
}

/// Where `a` and `b` differ: `path: a != b` for each leaf.
fn differ(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let (a, b) = (
                    x.get(key).unwrap_or(&Value::Null),
                    y.get(key).unwrap_or(&Value::Null),
                );
                differ(a, b, format!("{path}.{key}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (a, b)) in x.iter().zip(y).enumerate() {
                differ(a, b, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} != {b}")),
        _ => {}
    }
}

#[test]
fn meshctl_install_prints_what_helm_installs_with_default_values() {
    assert_meshctl_install_equals_helm(&json!({}));
}

#[test]
fn meshctl_install_prints_what_helm_installs_with_every_optional_feature_on() {
    let overrides = merged(&[
        &everything_on(),
        &json!({
            "trustDomain": "mesh.example.org",
            "controller": {"replicas": 3, "image": {"tag": "v9"}, "resources": {"requests": {"cpu": 1}}},
            "proxy": {"uid": 4321, "inboundMode": "strict", "image": {"repository": "example.org/proxy", "pullPolicy": "Always"}},
            "webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 10},
        }),
    ]);
    assert_meshctl_install_equals_helm(&overrides);
}

#[test]
fn the_values_schema_rejects_wrong_types() {
    let ca = TestCa::new();
    for wrong in [
        json!({"controller": {"replicas": "two"}}),
        json!({"webhook": {"timeoutSeconds": true}}),
        json!({"proxy": {"inboundMode": "sometimes"}}),
        json!({"controller": {"replicaCount": 2}}),
    ] {
        let Some(installed) = helm_install(&merged(&[&ca.values(), &wrong])) else {
            return;
        };
        let error = installed
            .err()
            .unwrap_or_else(|| panic!("Helm installed {wrong}"));
        assert!(
            error.contains("schema"),
            "{wrong}: not a schema error: {error}"
        );
        // meshctl install refuses the same values.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, wrong.to_string()).unwrap();
        let args = meshctl::install::InstallArgs::new(vec![file], vec![], None, NAMESPACE);
        let refused = meshctl::install::render(&args).err();
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| e.to_string().contains("the values are wrong")),
            "meshctl install took {wrong}: {refused:?}"
        );
    }
}

fn is_monitoring(object: &Value) -> bool {
    object["apiVersion"] == "monitoring.coreos.com/v1"
}

#[test]
fn every_rendered_object_passes_strict_validation() {
    let Some(versions) = trellis_tests::kube_validate::versions() else {
        return;
    };
    let ca = TestCa::new();
    let objects = meshctl_install(&everything_on(), &ca);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = objects
        .iter()
        .filter(|o| !is_monitoring(o))
        .enumerate()
        .map(|(i, object)| {
            let file = dir.path().join(format!("{i:02}.yaml"));
            std::fs::write(&file, object.to_string()).unwrap();
            file
        })
        .collect();
    assert!(files.len() >= 20, "only {} objects", files.len());
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(versions.iter().flat_map(|v| ["-k", v.as_str()]))
        .args(&files)
        .output()
        .expect("kubernetes-validate runs");
    let report = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(
        out.status.success() && passed == files.len() * versions.len(),
        "kubernetes-validate --strict for {versions:?}: {passed} of {} passed:\n{report}",
        files.len() * versions.len()
    );
}

/// The validator has no schemas for the Prometheus Operator's kinds, so the
/// PodMonitor and ServiceMonitor are checked against the fields of
/// monitoring.coreos.com/v1 they use (the operator's API reference), with
/// no other field allowed: a misspelt field fails here.
#[test]
fn the_monitors_use_only_prometheus_operator_fields() {
    let ca = TestCa::new();
    let monitors: Vec<Value> = meshctl_install(&everything_on(), &ca)
        .into_iter()
        .filter(is_monitoring)
        .collect();
    assert_eq!(monitors.len(), 2, "PodMonitor and ServiceMonitor");
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let closed = |properties: Value, required: &[&str]| json!({"type": "object", "additionalProperties": false, "properties": properties, "required": required});
    let metadata = json!({"type": "object", "required": ["name", "namespace"]});
    let relabeling = closed(
        json!({"sourceLabels": strings, "regex": {"type": "string"},
               "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]}}),
        &["action"],
    );
    let endpoint = |extra: Value| {
        let mut properties = json!({
            "path": {"type": "string"},
            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
            "relabelings": {"type": "array", "items": relabeling},
        });
        merge(&mut properties, extra);
        closed(properties, &[])
    };
    let selector = json!({"type": "object"});
    let schemas = json!({
        "PodMonitor": closed(json!({
            "apiVersion": {}, "kind": {}, "metadata": metadata,
            "spec": closed(json!({
                "namespaceSelector": closed(json!({"any": {"type": "boolean"}, "matchNames": strings}), &[]),
                "selector": selector,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": endpoint(json!({"port": {"type": "string"}}))},
            }), &["selector", "podMetricsEndpoints"]),
        }), &["spec"]),
        "ServiceMonitor": closed(json!({
            "apiVersion": {}, "kind": {}, "metadata": metadata,
            "spec": closed(json!({
                "selector": selector,
                "endpoints": {"type": "array", "minItems": 1, "items": endpoint(json!({"port": {"type": "string"}, "honorLabels": {"type": "boolean"}}))},
            }), &["selector", "endpoints"]),
        }), &["spec"]),
    });
    let cases: Vec<Value> = monitors
        .iter()
        .map(|m| json!([schemas[m["kind"].as_str().unwrap()], m]))
        .collect();
    let Some(errors) = json_schema_errors(&cases) else {
        return;
    };
    assert!(errors.iter().all(Vec::is_empty), "{errors:#?}");
}

/// Validates each `[schema, document]` with Python's jsonschema (Draft 4,
/// the JSON Schema that OpenAPI v3 schemas are a subset of): the errors of
/// each. The cases go in a file: a CRD's schema, once per case, outgrows
/// what one command-line argument may hold.
fn json_schema_errors(cases: &[Value]) -> Option<Vec<Vec<String>>> {
    const SCRIPT: &str = r#"
import json, sys
import jsonschema
with open(sys.argv[1]) as f:
    cases = json.load(f)
print(json.dumps([
    [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]
    for schema, doc in cases
]))
"#;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), Value::from(cases.to_vec()).to_string()).unwrap();
    let out = trellis_tests::python_with(
        "jsonschema",
        "pip install jsonschema",
        SCRIPT,
        &[file.path().to_str().expect("a UTF-8 path")],
    )?;
    Some(serde_json::from_slice(&out).expect("the validator's answer"))
}

/// The CRDs of the chart, by kind.
fn crds() -> BTreeMap<String, Value> {
    let ca = TestCa::new();
    meshctl_install(&json!({}), &ca)
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .map(|crd| {
            (
                crd["spec"]["names"]["kind"].as_str().unwrap().to_string(),
                crd,
            )
        })
        .collect()
}

/// Why `schema` (at `path`) is not structural, in the sense of
/// apiextensions.k8s.io/v1: every node has a type (objects their
/// properties, arrays their items), and none uses the keywords a
/// structural schema forbids.
fn structural_errors(schema: &Value, path: &str, out: &mut Vec<String>) {
    const FORBIDDEN: &[&str] = &[
        "$ref",
        "definitions",
        "dependencies",
        "additionalItems",
        "patternProperties",
        "id",
        "$schema",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
    ];
    let Some(node) = schema.as_object() else {
        out.push(format!("{path}: not a schema object"));
        return;
    };
    for keyword in FORBIDDEN {
        if node.contains_key(*keyword) {
            out.push(format!("{path}: `{keyword}` is not allowed"));
        }
    }
    if node.get("uniqueItems") == Some(&json!(true)) {
        out.push(format!("{path}: uniqueItems: true is not allowed"));
    }
    if node.get("additionalProperties") == Some(&json!(false)) {
        out.push(format!(
            "{path}: additionalProperties: false is not allowed"
        ));
    }
    if node.contains_key("properties") && node.contains_key("additionalProperties") {
        out.push(format!(
            "{path}: properties and additionalProperties together"
        ));
    }
    let open = node.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true))
        || node.get("x-kubernetes-int-or-string") == Some(&json!(true));
    match node.get("type").and_then(Value::as_str) {
        Some("object") => {
            for (name, property) in node
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                structural_errors(property, &format!("{path}.{name}"), out);
            }
            if let Some(additional) = node.get("additionalProperties").filter(|a| a.is_object()) {
                structural_errors(additional, &format!("{path}[*]"), out);
            }
        }
        Some("array") => match node.get("items") {
            Some(items) => structural_errors(items, &format!("{path}[]"), out),
            None => out.push(format!("{path}: an array without items")),
        },
        Some("string" | "integer" | "number" | "boolean") => {}
        Some(other) => out.push(format!("{path}: unknown type {other}")),
        None if open => {}
        None => out.push(format!("{path}: no type")),
    }
}

#[test]
fn the_crd_schemas_are_structural() {
    let crds = crds();
    assert_eq!(
        crds.keys().collect::<Vec<_>>(),
        [
            "AuthorizationPolicy",
            "HTTPFault",
            "ResiliencePolicy",
            "Rollout"
        ]
    );
    for (kind, crd) in &crds {
        for version in crd["spec"]["versions"].as_array().unwrap() {
            let schema = &version["schema"]["openAPIV3Schema"];
            let mut errors = Vec::new();
            structural_errors(schema, kind, &mut errors);
            // At the root, metadata may only restrict name and generateName.
            let metadata = schema["properties"]["metadata"].as_object().unwrap();
            if metadata.keys().any(|k| k != "type") {
                errors.push(format!("{kind}.metadata: more than a type"));
            }
            assert!(errors.is_empty(), "{kind} {}: {errors:#?}", version["name"]);
        }
    }
    // The checker catches what it should.
    let mut errors = Vec::new();
    let broken = json!({"type": "object", "properties": {
        "a": {"description": "no type"},
        "b": {"type": "array"},
        "c": {"type": "object", "additionalProperties": false},
        "d": {"type": "string", "anyOf": [{"pattern": "x"}]},
    }});
    structural_errors(&broken, "broken", &mut errors);
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn the_crd_schemas_accept_the_examples_and_refuse_wrong_types() {
    let crds = crds();
    let schema =
        |kind: &str| crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local");
    let mut good = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        good.extend(
            documents
                .into_iter()
                .filter(|d| crds.contains_key(d["kind"].as_str().unwrap_or(""))),
        );
    }
    let kinds: std::collections::BTreeSet<&str> =
        good.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["HTTPFault", "ResiliencePolicy"]
    );
    let fault = |spec: Value| json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "HTTPFault", "metadata": {"name": "f"}, "spec": spec});
    let policy = |spec: Value| json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "ResiliencePolicy", "metadata": {"name": "p"}, "spec": spec});
    let bad = [
        fault(json!({"abort": {"httpStatus": 503, "percent": "lots"}})),
        fault(json!({"abort": {"httpStatus": 700, "percent": 5}})),
        fault(json!({"delay": {"fixedDelay": "soon", "percent": 5}})),
        fault(json!({"delay": {"percent": 5}})),
        policy(json!({"circuitBreaker": {"maxRequests": -1}})),
        policy(json!({"outlierDetection": {"consecutiveFailures": "five"}})),
        policy(json!({"targetRefs": [{"kind": "Service"}]})),
    ];
    let cases: Vec<Value> = good
        .iter()
        .chain(&bad)
        .map(|d| json!([schema(d["kind"].as_str().unwrap()), d]))
        .collect();
    let Some(errors) = json_schema_errors(&cases) else {
        return;
    };
    let (good_errors, bad_errors) = errors.split_at(good.len());
    assert!(
        good_errors.iter().all(Vec::is_empty),
        "examples refused: {good_errors:#?}"
    );
    for (document, errors) in bad.iter().zip(bad_errors) {
        assert!(!errors.is_empty(), "accepted {document}");
    }
}

/// What `meshctl install | kubectl apply -f -` does, against the fake API
/// server: every object lands, and the new CA it made is one the
/// controller accepts, with the webhook trusting its roots.
#[tokio::test(flavor = "multi_thread")]
async fn meshctl_install_output_applies_with_kubectl() {
    use base64::Engine as _;
    let api = FakeApi::start().await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, everything_on().to_string()).unwrap();
    let args = meshctl::install::InstallArgs::new(vec![values], vec![], None, NAMESPACE);
    let manifests = meshctl::install::render(&args).expect("meshctl install renders");
    let file = kubectl.write("trellis.yaml", &manifests);
    kubectl.run(&["apply", "-f", &file]).await;

    let printed: Vec<Value> = serde_saphyr::from_multiple(&manifests).unwrap();
    for object in &printed {
        let (api_version, kind) = (
            object["apiVersion"].as_str().unwrap(),
            object["kind"].as_str().unwrap(),
        );
        let name = &object["metadata"]["name"];
        assert!(
            api.objects(api_version, kind)
                .iter()
                .any(|o| &o["metadata"]["name"] == name),
            "kubectl apply did not create {kind} {name}"
        );
    }
    let one = |api_version: &str, kind: &str, name: &str| {
        api.objects(api_version, kind)
            .into_iter()
            .find(|o| o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let roots = one("v1", "ConfigMap", "trellis-identity-trust-roots")["data"]["ca-bundle.crt"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = one("v1", "Secret", "trellis-identity-issuer");
    let decode = |key: &str| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(secret["data"][key].as_str().unwrap())
            .unwrap();
        String::from_utf8(bytes).unwrap()
    };
    let pem = |origin: &str, text: String| trellis_control_plane::identity::PemText {
        origin: origin.into(),
        text,
    };
    let material = trellis_control_plane::identity::IssuerMaterial {
        cert: pem("tls.crt", decode("tls.crt")),
        key: pem("tls.key", decode("tls.key")),
        bundle: pem("ca-bundle.crt", roots.clone()),
    };
    Ca::new(TRUST_DOMAIN, material).expect("the issuer chains to the roots");
    let webhook = one(
        "admissionregistration.k8s.io/v1",
        "MutatingWebhookConfiguration",
        "trellis-proxy-injector",
    );
    let ca_bundle = webhook["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(ca_bundle)
            .unwrap(),
        roots.as_bytes(),
        "the webhook's caBundle is not the trust roots"
    );
}

/// Where `document` has a field that `schema` does not declare: what the
/// API server prunes, or refuses with strict field validation (kubectl's
/// default). Only nodes that list their properties are closed.
fn unknown_fields(schema: &Value, document: &Value, path: &str, out: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == json!(true) {
        return;
    }
    match document {
        Value::Object(fields) => {
            let Some(properties) = schema["properties"].as_object() else {
                return;
            };
            for (name, value) in fields {
                match properties.get(name) {
                    Some(property) => {
                        unknown_fields(property, value, &format!("{path}.{name}"), out)
                    }
                    None => out.push(format!("{path}.{name}: unknown field")),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                unknown_fields(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The properties `schema` declares that `document` leaves out (arrays by
/// their first item): with a document that sets everything the model has,
/// what the schema has and the model does not.
fn absent_fields(schema: &Value, document: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            let here = format!("{path}.{name}");
            match document.get(name) {
                Some(value) => absent_fields(property, value, &here, out),
                None => out.push(here),
            }
        }
    }
    if let (Some(items), Some(first)) = (schema.get("items"), document.get(0)) {
        absent_fields(items, first, &format!("{path}[]"), out);
    }
}

/// A Rollout with every field of `control-plane/src/model/rollout.rs` set,
/// spec and status, in the model's own serialization.
fn full_rollout() -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {
            "service": "hello",
            "port": 8080,
            "backends": {"stable": "hello-v1", "canary": "hello-v2"},
            "route": "hello",
            "abTest": {
                "match": {
                    "headers": [{"name": "x-cohort", "value": "beta"}],
                    "cookies": [{"name": "cohort", "value": "beta"}],
                    "queryParams": [{"name": "cohort", "value": "beta"}],
                },
                "windows": 2,
            },
            "steps": [{"weight": 10, "pause": {"duration": "5m"}}, {"weight": 50}, {"weight": 90, "pause": {}}],
            "analysis": {
                "interval": "30s",
                "minRequests": 50,
                "successRate": 99.5,
                "maxP99": "200ms",
                "rollback": {"consecutiveFailures": 3, "totalFailures": 5},
                "inconclusiveLimit": 4,
            },
            "paused": true,
            "promote": 1,
            "abort": true,
        },
        "status": {
            "phase": "Progressing",
            "run": "uid/2026-01-01T00:00:00Z/hello:hello-v1>hello-v2",
            "step": 1,
            "steps": 4,
            "canaryWeight": 10,
            "cohort": true,
            "stepStartedAt": "2026-01-01T00:00:00.000Z",
            "windowStartedAt": "2026-01-01T00:00:30.000Z",
            "nextDecisionAt": "2026-01-01T00:01:00.000Z",
            "passedWindows": 1,
            "consecutiveFailures": 1,
            "totalFailures": 2,
            "inconclusiveWindows": 1,
            "gates": [{"name": "success-rate", "threshold": ">= 99.5%", "value": 99.9, "unit": "%", "verdict": "Pass"}],
            "canary": {"requests": 120.0, "successRate": 99.9, "p99Ms": 12.5},
            "stable": {"requests": 1080.0, "successRate": 100.0, "p99Ms": 10.5},
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "the spec can be carried out", "lastTransitionTime": "2026-01-01T00:00:00.000Z"}],
            "history": [{"time": "2026-01-01T00:00:30.000Z", "step": 1, "canaryWeight": 10, "reason": "GatesPassed", "message": "every gate passed"}],
        },
    })
}

#[test]
fn the_rollout_schema_declares_exactly_the_models_fields() {
    let crd = &crds()["Rollout"];
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    let full = full_rollout();
    // The model reads and writes back every field of the document: nothing
    // in it is unknown to the model (its spec refuses unknown fields, and a
    // status field it lacked would be dropped).
    let model: trellis_control_plane::model::Rollout =
        serde_json::from_value(full.clone()).expect("the model reads the full Rollout");
    let written = serde_json::to_value(&model).unwrap();
    for part in ["spec", "status"] {
        assert_eq!(written[part], full[part], "the model changed the {part}");
    }
    // The schema declares every one of them, and nothing else (header
    // matches' `type` is Exact, which the model leaves out when writing).
    let mut unknown = Vec::new();
    unknown_fields(schema, &full, "Rollout", &mut unknown);
    assert!(unknown.is_empty(), "fields the schema lacks: {unknown:#?}");
    let mut absent = Vec::new();
    absent_fields(schema, &full, "Rollout", &mut absent);
    absent.retain(|path| !path.ends_with("[].type"));
    assert!(absent.is_empty(), "fields the model lacks: {absent:#?}");

    assert_eq!(version["subresources"], json!({"status": {}}));
    let columns: Vec<(&str, &str)> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["jsonPath"].as_str().unwrap()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Service", ".spec.service"),
            ("Canary", ".spec.backends.canary"),
            ("Phase", ".status.phase"),
            ("Step", ".status.step"),
            ("Weight", ".status.canaryWeight"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
}

#[test]
fn the_rollout_schema_accepts_rollouts_and_refuses_out_of_range_and_unknown_fields() {
    let crds = crds();
    let schema = &crds["Rollout"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let rollout = |spec: Value| json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Rollout", "metadata": {"name": "hello"}, "spec": spec});
    let canary = || {
        json!({
            "service": "hello",
            "backends": {"stable": "hello-v1", "canary": "hello-v2"},
            "steps": [{"weight": 10, "pause": {"duration": "30s"}}, {"weight": 50, "pause": {}}, {"weight": 100}],
            "analysis": {"interval": "30s", "successRate": 99, "maxP99": "200ms"},
        })
    };
    let with = |path: &[&str], value: Value| {
        let mut spec = canary();
        let mut node = &mut spec;
        for key in &path[..path.len() - 1] {
            node = match key.parse::<usize>() {
                Ok(i) => &mut node[i],
                Err(_) => &mut node[*key],
            };
        }
        node[path[path.len() - 1]] = value;
        rollout(spec)
    };
    let ab = json!({
        "service": "hello",
        "backends": {"stable": "hello-v1", "canary": "hello-v2"},
        "abTest": {"match": {"headers": [{"type": "Exact", "name": "x-cohort", "value": "beta"}]}, "windows": 3},
        "analysis": {"interval": "1m", "maxP99": "150ms", "rollback": {"consecutiveFailures": 3}},
    });
    let good = [rollout(canary()), rollout(ab), full_rollout()];
    let bad = [
        // Out of range.
        with(&["steps", "0", "weight"], json!(150)),
        with(&["steps", "0", "weight"], json!(0)),
        with(&["analysis", "successRate"], json!(0)),
        with(&["analysis", "successRate"], json!(101)),
        with(&["analysis", "minRequests"], json!(0)),
        with(&["analysis", "rollback"], json!({"consecutiveFailures": 0})),
        with(&["port"], json!(70000)),
        // Wrong types and shapes.
        with(&["analysis", "interval"], json!("soon")),
        with(&["analysis", "maxP99"], json!(200)),
        with(&["steps", "1", "pause", "duration"], json!("5 minutes")),
        with(&["backends"], json!({"stable": "hello-v1"})),
        with(
            &["abTest"],
            json!({"match": {"headers": [{"type": "RegularExpression", "name": "x", "value": ".*"}]}, "windows": 1}),
        ),
        with(&["abTest"], json!({"match": {}, "windows": 0})),
        rollout(json!({"service": "hello", "backends": {"stable": "a", "canary": "b"}})),
        // Unknown (misspelt) fields.
        with(&["analysis", "sucessRate"], json!(99)),
        with(&["strategy"], json!("canary")),
        with(&["steps", "0", "setWeight"], json!(10)),
    ];
    let mut unknown: Vec<Vec<String>> = Vec::new();
    for document in good.iter().chain(&bad) {
        let mut errors = Vec::new();
        unknown_fields(schema, document, "Rollout", &mut errors);
        unknown.push(errors);
    }
    let cases: Vec<Value> = good
        .iter()
        .chain(&bad)
        .map(|d| json!([schema, d]))
        .collect();
    let Some(errors) = json_schema_errors(&cases) else {
        return;
    };
    for (document, (errors, unknown)) in good.iter().zip(errors.iter().zip(&unknown)) {
        assert!(
            errors.is_empty() && unknown.is_empty(),
            "refused {document}: {errors:?} {unknown:?}"
        );
    }
    let bad_results = errors.iter().zip(&unknown).skip(good.len());
    for (document, (errors, unknown)) in bad.iter().zip(bad_results) {
        assert!(
            !errors.is_empty() || !unknown.is_empty(),
            "accepted {document}"
        );
    }
    // A misspelt field is unknown to the model too, not quietly ignored.
    for document in &bad[bad.len() - 3..] {
        let read =
            serde_json::from_value::<trellis_control_plane::model::Rollout>(document.clone());
        assert!(read.is_err(), "the model read {document}");
    }
}
