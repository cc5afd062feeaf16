//! The injection webhook as the API server meets it: AdmissionReview v1
//! JSON over real TLS, verified with the mesh's CA bundle (the webhook's
//! caBundle) and the Service's DNS name. The returned JSONPatch is applied
//! with Python's `jsonpatch` (an independent RFC 6902 implementation) and
//! the patched pod validated with `kubernetes-validate --strict`.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use trellis_control_plane::controller::WebhookConfig;
use trellis_control_plane::identity::BUNDLE;
use trellis_tests::webhook::{client_config, hello_pod, pod_review, WebhookClient, SERVICE_NAME};
use trellis_tests::{eventually, metric, Mesh};

const FAMILY: &str = "trellis_controller_injections_total";

struct Setup {
    mesh: Mesh,
    webhook: SocketAddr,
    bundle: String,
}

impl Setup {
    /// A controller serving the webhook, with namespace `shop` labelled
    /// for injection and `plain` not.
    async fn start() -> Self {
        let mesh = Mesh::start_with(|c| {
            c.webhook = Some(WebhookConfig {
                listen: SocketAddr::new(c.listen.ip(), 0),
                service: "trellis-webhook".into(),
                inject: Default::default(),
            })
        })
        .await;
        mesh.write_manifest(
            "namespaces.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/inject: enabled}}\n\
             ---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n",
        );
        let controller = mesh.controller.as_ref().expect("controller");
        let store = controller.store.clone();
        eventually(Duration::from_secs(10), "the namespaces load", || async {
            store
                .namespace_labels("plain")
                .map(|_| ())
                .ok_or_else(|| "not yet".to_string())
        })
        .await;
        let webhook = controller.webhook_addr.expect("a webhook");
        let bundle = std::fs::read_to_string(mesh.dir.path().join(BUNDLE)).expect("bundle");
        Self {
            mesh,
            webhook,
            bundle,
        }
    }

    async fn client(&self) -> WebhookClient {
        WebhookClient::connect(self.webhook, client_config(&self.bundle), SERVICE_NAME)
            .await
            .expect("the webhook's certificate is valid for its Service name")
    }

    /// A TLS connection verified as the API server verifies it.
    async fn tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.webhook).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(SERVICE_NAME).unwrap();
        tokio_rustls::TlsConnector::from(client_config(&self.bundle))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// Sends a request head declaring a body of `length` bytes, and no
    /// body; returns the status line of the answer.
    async fn declaring_length(&self, length: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = self.tls().await;
        let head = format!(
            "POST /inject HTTP/1.1\r\nhost: {SERVICE_NAME}\r\ncontent-length: {length}\r\n\r\n"
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        answer.lines().next().unwrap_or_default().to_string()
    }

    async fn skipped(&self, reason: &str) -> f64 {
        let admin = self
            .mesh
            .controller
            .as_ref()
            .expect("controller")
            .admin_addr;
        metric(admin, FAMILY, &[("result", "skipped"), ("reason", reason)]).await
    }
}

/// The response of an answer, checked to be for `uid`.
fn response_for<'a>(answer: &'a Value, uid: &str) -> &'a Value {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], uid, "{answer}");
    &answer["response"]
}

/// The decoded JSONPatch of an allowed response, if any.
fn patch_of(response: &Value) -> Option<Value> {
    assert_eq!(response["allowed"], true, "{response}");
    let patch = response.get("patch")?.as_str().expect("base64 text");
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .expect("base64");
    Some(serde_json::from_slice(&bytes).expect("a JSON patch"))
}

/// Applies `patch` to `pod` with Python's jsonpatch; `None` without it (skip).
fn apply_with_python(pod: &Value, patch: &Value) -> Option<Value> {
    let dir = tempfile::tempdir().unwrap();
    let (pod_file, patch_file) = (dir.path().join("pod.json"), dir.path().join("patch.json"));
    std::fs::write(&pod_file, pod.to_string()).unwrap();
    std::fs::write(&patch_file, patch.to_string()).unwrap();
    let script = "import json, sys, jsonpatch\n\
        pod = json.load(open(sys.argv[1])); patch = json.load(open(sys.argv[2]))\n\
        print(json.dumps(jsonpatch.JsonPatch(patch).apply(pod)))";
    let out = trellis_tests::python_with(
        "jsonpatch",
        "pip install jsonpatch",
        script,
        &[pod_file.to_str().unwrap(), patch_file.to_str().unwrap()],
    )?;
    Some(serde_json::from_slice(&out).expect("the patched pod"))
}

fn assert_valid_pod(pod: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.json");
    std::fs::write(&file, serde_json::to_string_pretty(pod).unwrap()).unwrap();
    if let Some(result) = trellis_tests::kube_validate::strict(&file) {
        result.unwrap_or_else(|e| panic!("the injected pod is not valid: {e}\n{pod:#}"));
    }
}

fn init_names(pod: &Value) -> Vec<&str> {
    pod["spec"]["initContainers"]
        .as_array()
        .map(|list| list.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_pod_in_a_labelled_namespace_is_injected_and_the_patch_is_valid() {
    let setup = Setup::start().await;
    let mut client = setup.client().await;
    for (pod, expected_init) in [
        (hello_pod("hello-1"), vec!["trellis-init", "trellis-proxy"]),
        // With init containers, annotations and volumes of its own.
        (
            {
                let mut pod = hello_pod("hello-2");
                pod["metadata"]["annotations"] = json!({"team": "shop"});
                pod["spec"]["initContainers"] =
                    json!([{"name": "migrate", "image": "busybox", "command": ["true"]}]);
                pod["spec"]["volumes"] = json!([{"name": "cache", "emptyDir": {}}]);
                pod
            },
            vec!["trellis-init", "trellis-proxy", "migrate"],
        ),
    ] {
        let answer = client
            .review(&pod_review("uid-1", "shop", pod.clone(), false))
            .await
            .unwrap();
        let patch = patch_of(response_for(&answer, "uid-1")).expect("a patch");
        // A dry run is answered the same.
        let dry = client
            .review(&pod_review("uid-2", "shop", pod.clone(), true))
            .await
            .unwrap();
        assert_eq!(patch_of(response_for(&dry, "uid-2")), Some(patch.clone()));

        let Some(patched) = apply_with_python(&pod, &patch) else {
            return;
        };
        assert_eq!(init_names(&patched), expected_init);
        assert_eq!(
            patched["spec"]["initContainers"][1]["restartPolicy"],
            "Always"
        );
        let env = &patched["spec"]["initContainers"][1]["env"];
        let trust = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "TRELLIS_CONTROLLER_TRUST_PEM")
            .expect("the bundle inline");
        assert_eq!(trust["value"], setup.bundle.as_str());
        assert!(
            patched["metadata"]["annotations"]["trellis.dev/injected-by"]
                .as_str()
                .unwrap()
                .starts_with("trellis-")
        );
        assert_valid_pod(&patched);

        // Reviewing the injected pod again changes nothing.
        let again = client
            .review(&pod_review("uid-3", "shop", patched, false))
            .await
            .unwrap();
        assert_eq!(patch_of(response_for(&again, "uid-3")), None);
    }
    assert!(setup.skipped("already-injected").await >= 2.0);
}

#[tokio::test]
async fn the_pod_annotation_opts_in_or_out_and_system_pods_are_never_injected() {
    let setup = Setup::start().await;
    let mut client = setup.client().await;
    let with_annotation = |value: &str| {
        let mut pod = hello_pod("hello");
        pod["metadata"]["annotations"] = json!({ "trellis.dev/inject": value });
        pod
    };
    let answer = client
        .review(&pod_review(
            "in",
            "plain",
            with_annotation("enabled"),
            false,
        ))
        .await
        .unwrap();
    assert!(patch_of(response_for(&answer, "in")).is_some(), "opted in");

    let host = {
        let mut pod = hello_pod("host");
        pod["spec"]["hostNetwork"] = json!(true);
        pod
    };
    let proxy_in = |list: &str| {
        let mut pod = hello_pod("meshed");
        pod["spec"][list] = json!([{"name": "trellis-proxy", "image": "proxy"}]);
        pod
    };
    for (namespace, pod, reason) in [
        ("plain", hello_pod("hello"), "namespace-not-labelled"),
        ("shop", with_annotation("disabled"), "opted-out"),
        (
            "kube-system",
            with_annotation("enabled"),
            "system-namespace",
        ),
        ("trellis", with_annotation("enabled"), "mesh-namespace"),
        ("shop", host, "host-network"),
        ("shop", proxy_in("containers"), "already-injected"),
        ("shop", proxy_in("initContainers"), "already-injected"),
    ] {
        let before = setup.skipped(reason).await;
        let answer = client
            .review(&pod_review(reason, namespace, pod, false))
            .await
            .unwrap();
        let response = response_for(&answer, reason);
        assert_eq!(patch_of(response), None, "{reason}: {response}");
        assert!(response.get("warnings").is_none(), "{response}");
        assert_eq!(setup.skipped(reason).await, before + 1.0, "{reason}");
    }
}

#[tokio::test]
async fn an_invalid_annotation_is_refused_with_what_to_fix() {
    let setup = Setup::start().await;
    let mut client = setup.client().await;
    let mut pod = hello_pod("hello");
    pod["metadata"]["annotations"] = json!({"trellis.dev/proxy-memory-limit": "256MB"});
    let answer = client
        .review(&pod_review("bad", "shop", pod, false))
        .await
        .unwrap();
    let response = response_for(&answer, "bad");
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("trellis.dev/proxy-memory-limit")
            && message.contains("\"256MB\"")
            && message.contains("quantity"),
        "{message}"
    );
    assert!(response.get("patch").is_none());
}

#[tokio::test]
async fn unexpected_input_gets_the_documented_answers() {
    let setup = Setup::start().await;
    let mut client = setup.client().await;

    // Not JSON, or JSON but no AdmissionReview: 400, nothing to answer.
    for body in [&b"{not json"[..], br#"{"kind": "Pod"}"#, b""] {
        let (status, text) = client.post("/inject", body.to_vec()).await.unwrap();
        let text = String::from_utf8_lossy(&text);
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("AdmissionReview"), "{text}");
    }

    // A Deployment: allowed, untouched, with a warning.
    let mut review = pod_review("deploy", "shop", json!({"kind": "Deployment"}), false);
    review["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let answer = client.review(&review).await.unwrap();
    let response = response_for(&answer, "deploy");
    assert_eq!(patch_of(response), None);
    assert!(response["warnings"][0]
        .as_str()
        .unwrap()
        .contains("only v1 Pods"));

    // admission.k8s.io/v1beta1: answered in its version, allowed, with a warning.
    let mut review = pod_review("old", "shop", hello_pod("hello"), false);
    review["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let answer = client.review(&review).await.unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(answer["response"]["uid"], "old");
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    assert!(answer["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("admission.k8s.io/v1"));

    // A pod that cannot be read: allowed with a warning.
    let mut pod = hello_pod("odd");
    pod["spec"]["initContainers"] = json!("none");
    let answer = client
        .review(&pod_review("odd", "shop", pod, false))
        .await
        .unwrap();
    let response = response_for(&answer, "odd");
    assert_eq!(patch_of(response), None);
    assert!(response["warnings"][0]
        .as_str()
        .unwrap()
        .contains("spec.initContainers is a string"));

    // Too large: 413 at once, from the declared length.
    assert_eq!(
        setup.declaring_length(5 << 20).await,
        "HTTP/1.1 413 Payload Too Large"
    );
    let (status, _) = client.post("/other", b"{}".to_vec()).await.unwrap();
    assert_eq!(status, 404);
    let admin = setup.mesh.controller.as_ref().unwrap().admin_addr;
    for (reason, n) in [("bad-request", 3.0), ("kind", 1.0), ("version", 1.0)] {
        let counted = metric(admin, FAMILY, &[("result", "invalid"), ("reason", reason)]).await;
        assert_eq!(counted, n, "{reason}");
    }
}

#[tokio::test]
async fn the_webhook_certificate_is_verified_for_its_service_name_only() {
    let setup = Setup::start().await;
    let config = client_config(&setup.bundle);
    for name in [SERVICE_NAME, "trellis-webhook.trellis.svc.cluster.local"] {
        WebhookClient::connect(setup.webhook, config.clone(), name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let error = WebhookClient::connect(setup.webhook, config, "trellis-controller.trellis.svc")
        .await
        .err()
        .expect("another name is refused");
    assert!(error.contains("not valid for name"), "{error}");
    // A client trusting another CA refuses it.
    let other = Mesh::start().await;
    let other_bundle = std::fs::read_to_string(other.dir.path().join(BUNDLE)).unwrap();
    let error = WebhookClient::connect(setup.webhook, client_config(&other_bundle), SERVICE_NAME)
        .await
        .err()
        .expect("another CA is refused");
    assert!(error.contains("invalid peer certificate"), "{error}");
}

#[tokio::test]
async fn the_webhook_certificate_is_re_issued_when_the_issuer_rotates() {
    let setup = Setup::start().await;
    let served = || async {
        let tls = setup.tls().await;
        let chain: Vec<Vec<u8>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap()
            .iter()
            .map(|c| c.to_vec())
            .collect();
        chain
    };
    let before = served().await;
    let dir = setup.mesh.dir.path();
    trellis_control_plane::identity::rotate_issuer(dir, Duration::from_secs(3600)).unwrap();
    let issuer = std::fs::read_to_string(dir.join("issuer.crt")).unwrap();
    let (_, issuer) = x509_parser::pem::parse_x509_pem(issuer.as_bytes()).unwrap();
    let after = eventually(
        Duration::from_secs(5),
        "a certificate from the new issuer",
        || async {
            let chain = served().await;
            (chain[1] == issuer.contents)
                .then_some(chain)
                .ok_or_else(|| "still the old issuer".to_string())
        },
    )
    .await;
    assert_ne!(
        before[0], after[0],
        "a new leaf, verified for the Service name"
    );
}

#[tokio::test]
async fn the_webhook_speaks_h2_too() {
    // The API server may negotiate h2 with a webhook.
    let setup = Setup::start().await;
    let mut config = (*client_config(&setup.bundle)).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(setup.webhook).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVICE_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let review = pod_review("h2", "shop", hello_pod("hello"), false);
    let request = http::Request::post(format!("https://{SERVICE_NAME}/inject"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            review.to_string(),
        )))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert!(patch_of(response_for(&answer, "h2")).is_some());
}
