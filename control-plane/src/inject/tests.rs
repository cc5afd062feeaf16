use serde_json::{json, Value};

use super::*;

const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn injector() -> Injector {
    Injector::new(Config::default(), "trellis", "cluster.local")
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "hello-",
            "labels": {"app": "hello", "version": "v2"},
            "annotations": {"note": "kept"},
        },
        "spec": {
            "serviceAccountName": "hello-sa",
            "initContainers": [{"name": "migrate", "image": "busybox"}],
            "containers": [{"name": "app", "image": "nginx", "futureField": {"x": 1}}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    })
}

fn env_of(container: &Value) -> std::collections::BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                // A downward-API variable reads as the field it comes from.
                e["value"]
                    .as_str()
                    .or(e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn injection_prepends_init_and_native_sidecar_and_keeps_unknown_fields() {
    let mut pod = pod();
    assert!(injector().inject(&mut pod, "shop", BUNDLE).unwrap());
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(
        proxy["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    let env = env_of(proxy);
    assert_eq!(
        env["TRELLIS_IDENTITY"],
        "spiffe://cluster.local/ns/shop/sa/hello-sa"
    );
    assert_eq!(env["TRELLIS_WORKLOAD"], "hello");
    assert_eq!(env["TRELLIS_POD"], "metadata.name");
    assert_eq!(env["TRELLIS_VERSION"], "v2");
    assert_eq!(env["TRELLIS_CONTROLLER_TRUST_PEM"], BUNDLE);
    assert_eq!(
        env["TRELLIS_CONTROLLER"],
        "https://trellis-controller.trellis.svc:8090"
    );
    assert_eq!(env["TRELLIS_INBOUND_MODE"], "permissive");
    assert_eq!(
        env["TRELLIS_TOKEN_FILE"],
        "/var/run/secrets/trellis.dev/serviceaccount/token"
    );
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["args"], json!(["init", "--proxy-uid", "2102"]));
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    let token = &pod["spec"]["volumes"][1];
    assert_eq!(token["name"], TOKEN_VOLUME);
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "trellis.dev"
    );
    assert_eq!(
        pod["metadata"]["annotations"][annotations::INJECTED_BY],
        VERSION
    );
    assert_eq!(pod["metadata"]["annotations"]["note"], "kept");
    assert_eq!(pod["spec"]["containers"][0]["futureField"], json!({"x": 1}));
}

#[test]
fn injecting_twice_is_injecting_once_and_uninjecting_restores_the_input() {
    let injector = injector();
    for original in [
        pod(),
        // No annotations, init containers or volumes: injection creates them.
        json!({"metadata": {"name": "bare"}, "spec": {"containers": [{"name": "app"}]}}),
        // A pod template without metadata.
        json!({"spec": {"containers": [{"name": "app"}]}}),
    ] {
        let mut once = original.clone();
        assert!(injector.inject(&mut once, "shop", BUNDLE).unwrap());
        let mut twice = once.clone();
        assert!(!injector.inject(&mut twice, "shop", BUNDLE).unwrap());
        assert_eq!(twice, once);
        assert!(injector.patch(&once, "shop", BUNDLE).unwrap().is_empty());
        let mut back = once;
        assert!(uninject(&mut back));
        assert_eq!(back, original);
        assert!(!uninject(&mut back), "nothing left to remove");
    }
}

#[test]
fn annotations_override_the_configuration() {
    let mut pod = pod();
    pod["metadata"]["annotations"] = json!({
        "trellis.dev/proxy-cpu-limit": "500m",
        "trellis.dev/proxy-memory-request": "64Mi",
        "trellis.dev/proxy-image": "reg.example/proxy:dev",
        "trellis.dev/inbound-mode": "strict",
        "trellis.dev/opaque-ports": "3306, 5432",
        "trellis.dev/skip-outbound-cidrs": "169.254.169.254/32",
    });
    injector().inject(&mut pod, "shop", BUNDLE).unwrap();
    let [init, proxy] = [0, 1].map(|i| pod["spec"]["initContainers"][i].clone());
    assert_eq!(proxy["image"], "reg.example/proxy:dev");
    assert_eq!(init["image"], "reg.example/proxy:dev");
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "250Mi"}})
    );
    let env = env_of(&proxy);
    assert_eq!(env["TRELLIS_INBOUND_MODE"], "strict");
    assert_eq!(env["TRELLIS_OPAQUE_PORTS"], "3306,5432");
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--proxy-uid",
            "2102",
            "--skip-outbound-cidrs",
            "169.254.169.254/32"
        ])
    );
}

#[test]
fn the_workload_falls_back_to_the_service_account() {
    let mut pod = json!({"metadata": {"labels": {"app.kubernetes.io/name": "web", "app": "other"}}, "spec": {"containers": []}});
    injector().inject(&mut pod, "shop", BUNDLE).unwrap();
    let env = env_of(&pod["spec"]["initContainers"][1]);
    assert_eq!(env["TRELLIS_WORKLOAD"], "web");
    assert_eq!(
        env["TRELLIS_IDENTITY"],
        "spiffe://cluster.local/ns/shop/sa/default"
    );
    assert!(!env.contains_key("TRELLIS_VERSION"));
    let mut pod = json!({"spec": {"serviceAccountName": "api", "containers": []}});
    injector().inject(&mut pod, "shop", BUNDLE).unwrap();
    assert_eq!(
        env_of(&pod["spec"]["initContainers"][1])["TRELLIS_WORKLOAD"],
        "api"
    );
}

#[test]
fn a_pod_of_another_shape_or_with_a_bad_annotation_is_an_error() {
    let injector = injector();
    let mut pod = json!({"metadata": {}, "spec": {"initContainers": "none"}});
    let error = injector.inject(&mut pod, "shop", BUNDLE).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the pod cannot be read: spec.initContainers is a string, expected an array"
    );
    let error = injector
        .inject(&mut json!({"metadata": {}}), "shop", BUNDLE)
        .unwrap_err();
    assert!(error.to_string().contains("spec is missing"), "{error}");
    let mut pod = pod_with_annotation("trellis.dev/proxy-memory-limit", "1GB");
    let error = injector.inject(&mut pod, "shop", BUNDLE).unwrap_err();
    assert!(matches!(error, InjectError::Annotation(_)), "{error}");
}

fn pod_with_annotation(key: &str, value: &str) -> Value {
    let mut pod = pod();
    pod["metadata"]["annotations"][key] = json!(value);
    pod
}
