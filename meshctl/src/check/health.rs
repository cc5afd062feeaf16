//! Health: the controller, the webhook, the issuer.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::json;
use trellis_control_plane::identity::ISSUER_SECRET;
use trellis_control_plane::inject;
use trellis_control_plane::lease::LEASE_NAME;

use super::{age_of, get, has_proxy, why, Item, Section, WEBHOOK_CONFIGURATION};

/// The issuer must outlive this, or renewals soon fail.
const ISSUER_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// A replica leads: it holds the Lease and renewed it within its duration.
pub(super) async fn controller_ready(client: &Client, namespace: &str) -> Item {
    let name = "Controller ready";
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let fix = format!(
        "look at the controller: kubectl -n {namespace} get pods -l app.kubernetes.io/name=trellis,app.kubernetes.io/component=controller; kubectl -n {namespace} logs deploy/trellis-controller"
    );
    let lease = match get(
        &leases,
        LEASE_NAME,
        &format!("Lease {namespace}/{LEASE_NAME} (no replica has started)"),
    )
    .await
    {
        Ok(object) => object,
        Err(why) => return Item::fail(Section::Health, name, why, fix),
    };
    let spec = lease.spec.unwrap_or_default();
    let holder = spec.holder_identity.filter(|h| !h.is_empty());
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(0) as u64);
    let age = spec
        .renew_time
        .map(|t| age_of(t.0))
        .unwrap_or(Duration::MAX);
    match holder {
        Some(holder) if age <= duration => Item::pass(
            Section::Health,
            name,
            format!("{holder} leads (renewed {}s ago)", age.as_secs()),
        ),
        Some(holder) => Item::fail(
            Section::Health,
            name,
            format!(
                "the Lease names {holder}, but it was not renewed for {}s (it lasts {}s)",
                age.as_secs(),
                duration.as_secs()
            ),
            fix,
        ),
        None => Item::fail(Section::Health, name, "no replica holds the Lease", fix),
    }
}

/// The webhook configuration exists, its caBundle holds certificates
/// valid now, and the API server gets a sidecar back from the webhook for
/// a dry-run pod (which proves the API server reaches the webhook and
/// trusts its certificate with that caBundle).
pub(super) async fn webhook(client: &Client, namespace: &str) -> Item {
    let name = "Injection webhook";
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let reinstall = "meshctl install | kubectl apply -f - (or helm upgrade) writes it with the mesh's trust roots as caBundle";
    let configuration = match get(
        &configurations,
        WEBHOOK_CONFIGURATION,
        &format!("MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION}"),
    )
    .await
    {
        Ok(object) => object,
        Err(why) => return Item::fail(Section::Health, name, why, reinstall),
    };
    let webhooks = configuration.webhooks.unwrap_or_default();
    let Some(bundle) = webhooks
        .first()
        .and_then(|w| w.client_config.ca_bundle.as_ref())
    else {
        return Item::fail(
            Section::Health,
            name,
            "the webhook has no caBundle",
            reinstall,
        );
    };
    if let Err(why) = certificates_valid(&bundle.0) {
        return Item::fail(Section::Health, name, format!("caBundle: {why}"), reinstall);
    }
    // Dry run: nothing is stored, but admission runs as for a real pod.
    let probe_namespace = "default";
    let pods: Api<Pod> = Api::namespaced(client.clone(), probe_namespace);
    let probe: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "trellis-check-", "annotations": {inject::annotations::INJECT: "enabled"}},
        "spec": {"containers": [{"name": "probe", "image": "registry.k8s.io/pause:3.10"}]},
    }))
    .expect("a valid Pod");
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match pods.create(&params, &probe).await {
        Ok(pod) if has_proxy(&serde_json::to_value(&pod).unwrap_or_default()) => Item::pass(
            Section::Health,
            name,
            format!("a dry-run pod in {probe_namespace} came back with the sidecar; caBundle valid"),
        ),
        Ok(_) => Item::fail(
            Section::Health,
            name,
            format!("a dry-run pod in {probe_namespace} came back without the sidecar"),
            format!("the webhook is not called for {probe_namespace}: check the namespaceSelector of {WEBHOOK_CONFIGURATION} ({reinstall})"),
        ),
        Err(e) => Item::fail(
            Section::Health,
            name,
            format!("a dry-run pod in {probe_namespace} was refused: {}", why(&e)),
            format!("is the controller serving the webhook (kubectl -n {namespace} get endpointslices -l kubernetes.io/service-name=trellis-webhook)? A certificate error means the caBundle is not the mesh's trust roots: {reinstall}"),
        ),
    }
}

/// Every certificate in the PEM bundle is valid now.
pub(super) fn certificates_valid(pem: &[u8]) -> Result<usize, String> {
    let mut count = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("not PEM: {e}"))?;
        let cert = block
            .parse_x509()
            .map_err(|e| format!("not a certificate: {e}"))?;
        if !cert.validity().is_valid() {
            return Err(format!(
                "{} is not valid now ({} to {})",
                cert.subject(),
                cert.validity().not_before,
                cert.validity().not_after
            ));
        }
        count += 1;
    }
    if count == 0 {
        return Err("no certificate".into());
    }
    Ok(count)
}

pub(super) async fn issuer(client: &Client, namespace: &str) -> Item {
    let name = "Issuer certificate valid for > 24 h";
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let fix = format!(
        "rotate the issuer: sign a new one with the root and replace the Secret {namespace}/{ISSUER_SECRET} (kubectl -n {namespace} create secret tls {ISSUER_SECRET} --cert=issuer.crt --key=issuer.key --dry-run=client -o yaml | kubectl apply -f -)"
    );
    let secret = match get(
        &secrets,
        ISSUER_SECRET,
        &format!("Secret {namespace}/{ISSUER_SECRET}"),
    )
    .await
    {
        Ok(object) => object,
        Err(why) => return Item::fail(Section::Health, name, why, fix),
    };
    let Some(cert) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
        return Item::fail(
            Section::Health,
            name,
            format!("{ISSUER_SECRET} has no tls.crt"),
            fix,
        );
    };
    let not_after = x509_parser::pem::Pem::iter_from_buffer(&cert.0)
        .next()
        .and_then(|pem| pem.ok())
        .and_then(|pem| {
            pem.parse_x509()
                .ok()
                .map(|c| c.validity().not_after.timestamp())
        });
    let Some(not_after) = not_after else {
        return Item::fail(
            Section::Health,
            name,
            format!("{ISSUER_SECRET}: tls.crt is not a PEM certificate"),
            fix,
        );
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = not_after - now;
    let until =
        Timestamp::from_second(not_after).map_or_else(|_| not_after.to_string(), |t| t.to_string());
    if left > ISSUER_MARGIN.as_secs() as i64 {
        Item::pass(
            Section::Health,
            name,
            format!("expires {until} (in {} h)", left / 3600),
        )
    } else {
        Item::fail(
            Section::Health,
            name,
            format!("expires {until} (in {} h)", left / 3600),
            fix,
        )
    }
}
