//! Mutating admission, as the API server runs it on a Pod create: every
//! MutatingWebhookConfiguration's webhooks, in name order, whose rules,
//! namespaceSelector and objectSelector match, get an AdmissionReview
//! `admission.k8s.io/v1` over HTTPS — the server verified against the
//! webhook's `caBundle` under the Service's DNS name
//! (`<service>.<namespace>.svc`), as a real API server does — and their
//! JSONPatch is applied. A webhook that cannot be called, times out or
//! answers nonsense fails the create under `failurePolicy: Fail` (the
//! default) and is skipped under `Ignore`; a refusal fails it with the
//! webhook's message.
//!
//! A Service is reached at the address the test routes it to
//! ([`super::FakeApi::route_service`]): no cluster network here. Other
//! kinds and operations are not sent to webhooks; `reinvocationPolicy` and
//! validating webhooks are not implemented.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::rbac::User;
use super::resources::Resource;
use super::selector::Selector;
use super::status::ApiError;
use super::Shared;

/// `(namespace, name, port)` of a Service → where the test serves it.
pub type ServiceRoutes = HashMap<(String, String, u16), SocketAddr>;

/// The default `timeoutSeconds` of a webhook.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What admission made of a create: the object to store and the warnings
/// the webhooks gave (sent back as `Warning` headers).
pub struct Admitted {
    pub object: Value,
    pub warnings: Vec<String>,
}

/// Runs the mutating webhooks on a Pod about to be created in `namespace`.
pub async fn mutate_pod(
    shared: &Shared,
    namespace: &str,
    user: &User,
    mut pod: Value,
    dry_run: bool,
) -> Result<Admitted, ApiError> {
    let (configurations, namespace_object) = {
        let store = shared.store.lock().expect("store lock");
        let webhooks = Resource::by_kind(
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
        )
        .expect("the fake serves MutatingWebhookConfigurations");
        let namespaces = Resource::by_kind("v1", "Namespace").expect("namespaces are served");
        (
            store.select(webhooks, None, &Selector::default()),
            store.get(namespaces, None, namespace).ok(),
        )
    };
    let Some(namespace_object) = namespace_object else {
        // The create fails on the missing namespace, as it would anyway.
        return Ok(Admitted {
            object: pod,
            warnings: Vec::new(),
        });
    };
    let mut warnings = Vec::new();
    for configuration in &configurations {
        for webhook in configuration["webhooks"].as_array().into_iter().flatten() {
            if !selects(webhook, &namespace_object, &pod)? {
                continue;
            }
            let name = webhook["name"].as_str().unwrap_or_default();
            let review = review_request(namespace, user, &pod, dry_run);
            match call(shared, webhook, &review).await {
                Ok(response) => {
                    warnings.extend(
                        response["warnings"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|w| w.as_str().map(str::to_string)),
                    );
                    pod = apply(name, &review, &response, pod)?;
                }
                Err(why) if webhook["failurePolicy"] == "Ignore" => {
                    warnings.push(format!("failed calling webhook {name:?} (ignored): {why}"));
                }
                Err(why) => {
                    return Err(ApiError::internal(format!(
                        "failed calling webhook {name:?}: {why}"
                    )))
                }
            }
        }
    }
    Ok(Admitted {
        object: pod,
        warnings,
    })
}

/// Whether a webhook's rules and selectors take this Pod create.
fn selects(webhook: &Value, namespace: &Value, pod: &Value) -> Result<bool, ApiError> {
    let has = |list: &Value, wanted: &[&str]| {
        list.as_array()
            .into_iter()
            .flatten()
            .any(|v| v.as_str().is_some_and(|v| wanted.contains(&v)))
    };
    let rule_matches = webhook["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|rule| {
            has(&rule["operations"], &["CREATE", "*"])
                && has(&rule["apiGroups"], &["", "*"])
                && has(&rule["apiVersions"], &["v1", "*"])
                && has(&rule["resources"], &["pods", "*", "*/*"])
                && rule["scope"]
                    .as_str()
                    .is_none_or(|scope| scope == "*" || scope == "Namespaced")
        });
    Ok(rule_matches
        && Selector::from_label_selector(&webhook["namespaceSelector"])?.matches(namespace)
        && Selector::from_label_selector(&webhook["objectSelector"])?.matches(pod))
}

fn review_request(namespace: &str, user: &User, pod: &Value, dry_run: bool) -> Value {
    let pods = json!({"group": "", "version": "v1", "resource": "pods"});
    let kind = json!({"group": "", "version": "v1", "kind": "Pod"});
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": super::store::new_uid(),
            "kind": kind, "resource": pods,
            "requestKind": kind, "requestResource": pods,
            "name": pod["metadata"]["name"].as_str().unwrap_or_default(),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": user.name, "groups": user.groups},
            "object": pod,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

/// The webhook's `response`, or why it could not be had.
async fn call(shared: &Shared, webhook: &Value, review: &Value) -> Result<Value, String> {
    let config = &webhook["clientConfig"];
    let (addr, server_name, path) = if let Some(url) = config["url"].as_str() {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("webhook URL {url:?} is not https"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let addr: SocketAddr = authority.parse().map_err(|_| {
            format!("this fake API server calls webhook URLs by IP:port only, not {authority:?}")
        })?;
        (addr, addr.ip().to_string(), format!("/{path}"))
    } else {
        let service = &config["service"];
        let (namespace, name) = (
            service["namespace"].as_str().unwrap_or_default(),
            service["name"].as_str().unwrap_or_default(),
        );
        let port = service["port"].as_u64().unwrap_or(443) as u16;
        let route = (namespace.to_string(), name.to_string(), port);
        let addr = *shared
            .service_routes
            .lock()
            .expect("routes lock")
            .get(&route)
            .ok_or_else(|| {
                format!(
                    "dial tcp: lookup {name}.{namespace}.svc: no such host \
                     (route the Service with FakeApi::route_service)"
                )
            })?;
        let path = service["path"].as_str().unwrap_or("/").to_string();
        (addr, format!("{name}.{namespace}.svc"), path)
    };
    let timeout = webhook["timeoutSeconds"]
        .as_u64()
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let url = format!("https://{server_name}{path}?timeout={}s", timeout.as_secs());
    let ca_bundle = config["caBundle"].as_str().unwrap_or_default();
    let exchange = post(addr, &server_name, &path, ca_bundle, review, timeout);
    let answer = match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err("context deadline exceeded".to_string()),
    };
    answer.map_err(|why| format!("failed to call webhook: Post {url:?}: {why}"))
}

async fn post(
    addr: SocketAddr,
    server_name: &str,
    path: &str,
    ca_bundle: &str,
    review: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    let pem = base64::engine::general_purpose::STANDARD
        .decode(ca_bundle)
        .map_err(|e| format!("caBundle is not base64: {e}"))?;
    let config = crate::webhook::try_client_config(&pem)?;
    let mut client = crate::webhook::WebhookClient::connect(addr, config, server_name).await?;
    let body = serde_json::to_vec(review).expect("JSON values serialize");
    let path = format!("{path}?timeout={}s", timeout.as_secs());
    let (status, bytes) = client.post(&path, body).await?;
    if status != 200 {
        return Err(format!(
            "the server answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let answer: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the response is not an AdmissionReview: {e}"))?;
    Ok(answer["response"].clone())
}

/// The pod after the webhook's answer, or its refusal.
fn apply(name: &str, review: &Value, response: &Value, pod: Value) -> Result<Value, ApiError> {
    let uid = &review["request"]["uid"];
    if &response["uid"] != uid {
        return Err(ApiError::internal(format!(
            "received invalid webhook response from {name:?}: expected response.uid={uid}, got {}",
            response["uid"]
        )));
    }
    if response["allowed"] != true {
        let message = response["status"]["message"].as_str().unwrap_or_default();
        let code = response["status"]["code"].as_u64().unwrap_or(400) as u16;
        return Err(ApiError::denied(
            code,
            format!("admission webhook {name:?} denied the request: {message}"),
        ));
    }
    let Some(patch) = response["patch"].as_str() else {
        return Ok(pod);
    };
    if response["patchType"] != "JSONPatch" {
        return Err(ApiError::internal(format!(
            "received invalid webhook response from {name:?}: patchType {} is not JSONPatch",
            response["patchType"]
        )));
    }
    let invalid = |why: String| {
        ApiError::internal(format!(
            "received invalid webhook response from {name:?}: {why}"
        ))
    };
    let patch = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .map_err(|e| invalid(format!("the patch is not base64: {e}")))?;
    let patch: json_patch::Patch = serde_json::from_slice(&patch)
        .map_err(|e| invalid(format!("the patch is not a JSON patch: {e}")))?;
    let mut patched = pod;
    json_patch::patch(&mut patched, &patch)
        .map_err(|e| invalid(format!("the patch does not apply: {e}")))?;
    Ok(patched)
}
