//! Injection on the API server's path, against the fake API server: the
//! chart's objects (as `meshctl install` renders them for the mesh's CA,
//! held equal to Helm's in `chart.rs`) are applied, the controller serves
//! the webhook as its service account under the chart's RBAC, and pods are
//! created with the real `kubectl`. The fake calls the webhook as the API
//! server does: over TLS verified with the MutatingWebhookConfiguration's
//! caBundle for `trellis-webhook.trellis.svc`. Then `meshctl check` runs
//! against the same API.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use trellis_control_plane::controller::WebhookConfig;
use trellis_control_plane::inject;
use trellis_proto::CONTROLLER_NAMESPACE;
use trellis_tests::cluster_ca::authenticate_as_controller;
use trellis_tests::fake_api::{FakeApi, Kubectl};
use trellis_tests::{eventually, Mesh};

/// The chart's objects for the CA in `ca_dir`.
fn chart_objects(ca_dir: &Path) -> Vec<Value> {
    let args = meshctl::install::InstallArgs::new(
        vec![],
        vec![],
        Some(ca_dir.to_path_buf()),
        CONTROLLER_NAMESPACE,
    );
    let yaml = meshctl::install::render(&args).expect("meshctl install renders");
    serde_saphyr::from_multiple(&yaml).expect("YAML")
}

fn pod(namespace: &str, name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels: {{app: {name}}}\n  annotations: {{{annotations}}}\n\
         spec:\n  serviceAccountName: {name}\n  containers:\n  - name: app\n    image: nginx:1.27\n"
    )
}

fn namespace(name: &str, labelled: bool) -> String {
    let labels = if labelled {
        format!("\n  labels: {{{}: enabled}}", inject::NAMESPACE_LABEL)
    } else {
        String::new()
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

fn pod_object(api: &FakeApi, namespace: &str, name: &str) -> Value {
    api.objects("v1", "Pod")
        .into_iter()
        .find(|p| p["metadata"]["namespace"] == namespace && p["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no pod {namespace}/{name}"))
}

async fn apply(kubectl: &Kubectl, name: &str, manifest: String) {
    let file = kubectl.write(name, &manifest);
    kubectl.run(&["apply", "-f", &file]).await;
}

fn has_proxy(pod: &Value) -> bool {
    inject::has_container(pod, inject::PROXY_CONTAINER)
}

async fn check(api: &FakeApi, dir: &Path) -> Vec<meshctl::check::Item> {
    let kubeconfig = api.write_kubeconfig(dir);
    let client = meshctl::check::client(Some(&kubeconfig))
        .await
        .expect("a client");
    meshctl::check::check(&client, CONTROLLER_NAMESPACE).await
}

fn item<'a>(items: &'a [meshctl::check::Item], name: &str) -> &'a meshctl::check::Item {
    items
        .iter()
        .find(|i| i.name.starts_with(name))
        .unwrap_or_else(|| panic!("no check {name:?} in {items:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_their_sidecar_through_the_webhook_and_meshctl_check_lists_those_that_did_not() {
    let api = Arc::new(FakeApi::start().await);
    let mesh = Mesh::start_in_cluster_with(api.clone(), |config| {
        authenticate_as_controller(config, &api);
        for object in chart_objects(&config.state_dir) {
            api.apply(object);
        }
        config.webhook = Some(WebhookConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            service: "trellis-webhook".into(),
            inject: inject::Config::default(),
        });
        config.lease_duration = Duration::from_secs(3);
    })
    .await;
    let webhook = mesh.webhook_addr().expect("the webhook is served");
    api.route_service(CONTROLLER_NAMESPACE, "trellis-webhook", 443, webhook);
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };

    // A pod from before its namespace was labelled: none.
    apply(&kubectl, "legacy.yaml", namespace("legacy", false)).await;
    apply(&kubectl, "old.yaml", pod("legacy", "old", "")).await;
    assert!(!has_proxy(&pod_object(&api, "legacy", "old")));
    // Timestamps are whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    kubectl
        .run(&["label", "namespace", "legacy", "trellis.dev/inject=enabled"])
        .await;

    // In a labelled namespace: the sidecar, as a native sidecar.
    apply(&kubectl, "shop.yaml", namespace("shop", true)).await;
    apply(&kubectl, "web.yaml", pod("shop", "web", "")).await;
    let web = pod_object(&api, "shop", "web");
    assert!(has_proxy(&web), "{web:#}");
    let proxy = web["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == inject::PROXY_CONTAINER))
        .expect("the proxy is an init container");
    assert_eq!(proxy["restartPolicy"], "Always");
    let env = |name: &str| {
        proxy["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(
        env("TRELLIS_IDENTITY"),
        Some("spiffe://cluster.local/ns/shop/sa/web".into())
    );
    // Opted out: no sidecar, and that is what was asked.
    apply(
        &kubectl,
        "batch.yaml",
        pod("shop", "batch", "trellis.dev/inject: disabled"),
    )
    .await;
    assert!(!has_proxy(&pod_object(&api, "shop", "batch")));

    let dir = tempfile::tempdir().unwrap();
    let items = check(&api, dir.path()).await;
    let pods = item(&items, "Pods in labelled namespaces");
    assert!(!pods.ok, "{items:#?}");
    let old = pods
        .pods
        .iter()
        .find(|p| p.name == "old")
        .unwrap_or_else(|| panic!("legacy/old not listed: {pods:#?}"));
    assert!(
        old.why.contains("before the namespace was labelled") && !old.intended,
        "{old:#?}"
    );
    let batch = pods
        .pods
        .iter()
        .find(|p| p.name == "batch")
        .expect("batch listed");
    assert!(
        batch.intended && batch.why.contains("disabled"),
        "{batch:#?}"
    );
    for other in items.iter().filter(|i| !i.name.starts_with("Pods in")) {
        assert!(other.ok, "{other:#?}");
    }

    // Recreated, the old pod gets its sidecar, and the check passes.
    kubectl.run(&["-n", "legacy", "delete", "pod", "old"]).await;
    apply(&kubectl, "old.yaml", pod("legacy", "old", "")).await;
    assert!(has_proxy(&pod_object(&api, "legacy", "old")));
    let items = eventually(Duration::from_secs(10), "meshctl check passes", || {
        let (api, dir) = (api.clone(), dir.path().to_path_buf());
        async move {
            let items = check(&api, &dir).await;
            if items.iter().all(|i| i.ok) {
                Ok(items)
            } else {
                Err(format!("{items:#?}"))
            }
        }
    })
    .await;
    let table = meshctl::check::render(&items);
    assert!(
        table.contains("✔ Injection webhook") && table.ends_with("All checks passed.\n"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_whose_ca_bundle_is_not_the_mesh_roots_fails_pod_creation_and_meshctl_check_says_why(
) {
    let api = Arc::new(FakeApi::start().await);
    let other_ca = tempfile::tempdir().unwrap();
    trellis_control_plane::identity::Ca::load_or_create(
        other_ca.path(),
        trellis_tests::TRUST_DOMAIN,
    )
    .expect("another CA");
    let mesh = Mesh::start_in_cluster_with(api.clone(), |config| {
        authenticate_as_controller(config, &api);
        // The chart for another CA: its caBundle does not verify the
        // webhook's certificate (RBAC and the rest are the same).
        for object in chart_objects(other_ca.path())
            .into_iter()
            .filter(|o| o["kind"] != "Secret" && o["kind"] != "ConfigMap")
        {
            api.apply(object);
        }
        config.webhook = Some(WebhookConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            service: "trellis-webhook".into(),
            inject: inject::Config::default(),
        });
    })
    .await;
    api.route_service(
        CONTROLLER_NAMESPACE,
        "trellis-webhook",
        443,
        mesh.webhook_addr().expect("the webhook is served"),
    );
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    let file = kubectl.write(
        "shop.yaml",
        &format!("{}---\n{}", namespace("shop", true), pod("shop", "web", "")),
    );
    let out = kubectl.output(&["apply", "-f", &file]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("failed calling webhook")
            && stderr.contains("trellis-webhook.trellis.svc"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let items = check(&api, dir.path()).await;
    let webhook = item(&items, "Injection webhook");
    assert!(!webhook.ok, "{webhook:#?}");
    assert!(
        webhook
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("caBundle")),
        "{webhook:#?}"
    );
}
