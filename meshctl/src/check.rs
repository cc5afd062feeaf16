//! `meshctl check`: is the cluster ready for the mesh (pre-flight), and is
//! the mesh healthy — as a checklist where every failed item says how to
//! fix it, or JSON for scripts. Exits non-zero when any item fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use kube::Client;
use serde::Serialize;
use serde_json::json;
use trellis_control_plane::identity::ISSUER_SECRET;
use trellis_control_plane::inject;
use trellis_control_plane::lease::LEASE_NAME;
use trellis_control_plane::permissions::{Scope, PERMISSIONS};

/// Native sidecars (`restartPolicy: Always` init containers) are on by
/// default from Kubernetes 1.29.
const MINIMUM_MINOR: u32 = 29;
/// The issuer must outlive this, or renewals soon fail.
const ISSUER_MARGIN: Duration = Duration::from_secs(24 * 3600);
/// What the chart names the webhook configuration and the controller.
const WEBHOOK_CONFIGURATION: &str = "trellis-proxy-injector";
const CONTROLLER_SERVICE_ACCOUNT: &str = "trellis-controller";
/// The kinds the mesh reads that CRDs provide: (group/version, plural).
const CUSTOM_RESOURCES: &[(&str, &str)] = &[
    ("gateway.networking.k8s.io/v1", "httproutes"),
    ("trellis.dev/v1alpha1", "httpfaults"),
    ("trellis.dev/v1alpha1", "resiliencepolicies"),
];

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The mesh's namespace (where the chart installed the controller).
    #[arg(long, default_value = trellis_proto::CONTROLLER_NAMESPACE)]
    namespace: String,
    /// A kubeconfig file (default: KUBECONFIG, ~/.kube/config, or the
    /// in-cluster configuration).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: crate::route::Format,
}

/// One item of the checklist.
#[derive(Debug, Serialize)]
pub struct Item {
    pub section: Section,
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do, when the item failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Pods the item is about (unmeshed pods and why).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<UnmeshedPod>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    PreFlight,
    Health,
}

/// A pod in a labelled namespace without a sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct UnmeshedPod {
    pub namespace: String,
    pub name: String,
    /// Why it has no sidecar.
    pub why: String,
    /// Whether that is what someone asked for (opted out, host network).
    pub intended: bool,
}

impl Item {
    fn pass(section: Section, name: &'static str, detail: impl Into<String>) -> Self {
        Item {
            section,
            name,
            ok: true,
            detail: detail.into(),
            fix: None,
            pods: Vec::new(),
        }
    }

    fn fail(
        section: Section,
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Item {
            ok: false,
            fix: Some(fix.into()),
            ..Item::pass(section, name, detail)
        }
    }
}

pub async fn run(args: CheckArgs) -> anyhow::Result<bool> {
    let client = client(args.kubeconfig.as_deref()).await?;
    let items = check(&client, &args.namespace).await;
    let ok = items.iter().all(|item| item.ok);
    match args.output {
        crate::route::Format::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"ok": ok, "checks": items}))?
            )
        }
        crate::route::Format::Yaml => print!(
            "{}",
            serde_saphyr::to_string(&json!({"ok": ok, "checks": items}))?
        ),
        crate::route::Format::Table => print!("{}", render(&items)),
    }
    Ok(ok)
}

pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no cluster configured: set KUBECONFIG or pass --kubeconfig")?,
    };
    Ok(Client::try_from(config)?)
}

/// Every item, in order; later items are skipped once the API is unreachable.
pub async fn check(client: &Client, namespace: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let version = match client.apiserver_version().await {
        Ok(version) => version,
        Err(e) => {
            items.push(Item::fail(
                Section::PreFlight,
                "Kubernetes API reachable",
                why(&e),
                "check the kubeconfig's current context (kubectl config current-context) and that the API server answers",
            ));
            return items;
        }
    };
    items.push(Item::pass(
        Section::PreFlight,
        "Kubernetes API reachable",
        format!("{} ({})", version.git_version, version.platform),
    ));
    items.push(kubernetes_version(&version.major, &version.minor));
    items.push(custom_resources(client).await);
    items.push(controller_rbac(client, namespace).await);
    items.push(controller_ready(client, namespace).await);
    items.push(webhook(client, namespace).await);
    items.push(issuer(client, namespace).await);
    items.push(pods_injected(client, namespace).await);
    items
}

fn kubernetes_version(major: &str, minor: &str) -> Item {
    let name = "Kubernetes ≥ 1.29 (native sidecars)";
    // Minor versions may carry a suffix ("29+" on some providers).
    let minor_number: Option<u32> = minor.trim_end_matches('+').parse().ok();
    match (major, minor_number) {
        ("1", Some(m)) if m >= MINIMUM_MINOR => {
            Item::pass(Section::PreFlight, name, format!("{major}.{m}"))
        }
        _ => Item::fail(
            Section::PreFlight,
            name,
            format!("the API server is {major}.{minor}"),
            "upgrade the cluster to Kubernetes 1.29 or newer: the proxy runs as a native sidecar (an init container with restartPolicy: Always)",
        ),
    }
}

async fn custom_resources(client: &Client) -> Item {
    let name = "CRDs installed";
    let mut missing = Vec::new();
    for (group_version, plural) in CUSTOM_RESOURCES {
        let served = client
            .list_api_group_resources(group_version)
            .await
            .is_ok_and(|list| list.resources.iter().any(|r| r.name == *plural));
        if !served {
            missing.push(format!("{plural}.{group_version}"));
        }
    }
    if missing.is_empty() {
        return Item::pass(
            Section::PreFlight,
            name,
            "HTTPRoute (Gateway API), HTTPFault, ResiliencePolicy",
        );
    }
    let gateway = missing
        .iter()
        .any(|m| m.contains("gateway.networking.k8s.io"));
    let fix = if gateway {
        "install the Gateway API CRDs (standard channel, v1.2 or newer), then the chart's: meshctl install | kubectl apply -f -"
    } else {
        "install the chart's CRDs: meshctl install | kubectl apply -f - (or helm install)"
    };
    Item::fail(
        Section::PreFlight,
        name,
        format!("not served: {}", missing.join(", ")),
        fix,
    )
}

/// Asks the API server, in a SubjectAccessReview per permission, whether
/// the controller's service account may do what it needs.
async fn controller_rbac(client: &Client, namespace: &str) -> Item {
    let name = "RBAC for the controller";
    let user = format!("system:serviceaccount:{namespace}:{CONTROLLER_SERVICE_ACCOUNT}");
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for permission in PERMISSIONS {
        let scope = match permission.scope {
            Scope::Cluster => None,
            Scope::ControllerNamespace => Some(namespace.to_string()),
        };
        for (verb, object) in permission.grants() {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.clone()),
                    groups: Some(vec![
                        "system:serviceaccounts".into(),
                        format!("system:serviceaccounts:{namespace}"),
                        "system:authenticated".into(),
                    ]),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(permission.group.into()),
                        resource: Some(permission.resource.into()),
                        verb: Some(verb.to_string()),
                        namespace: scope.clone(),
                        name: object.map(str::to_string),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let allowed = match reviews.create(&PostParams::default(), &review).await {
                    Ok(answer) => answer.status.is_some_and(|s| s.allowed),
                    Err(e) => {
                        return Item::fail(
                            Section::PreFlight,
                            name,
                            format!("cannot ask the API server (SubjectAccessReview): {}", why(&e)),
                            "run meshctl check as a user who may create subjectaccessreviews (cluster-admin)",
                        )
                    }
                };
            if !allowed {
                let group = if permission.group.is_empty() {
                    "core"
                } else {
                    permission.group
                };
                let object = object.map(|n| format!(" {n}")).unwrap_or_default();
                let place = scope
                    .as_deref()
                    .map(|ns| format!(" in {ns}"))
                    .unwrap_or_default();
                missing.push(format!(
                    "{verb} {}{object} ({group}){place}",
                    permission.resource
                ));
            }
        }
    }
    if missing.is_empty() {
        Item::pass(
            Section::PreFlight,
            name,
            format!("{user} may do all it needs"),
        )
    } else {
        Item::fail(
            Section::PreFlight,
            name,
            format!("{user} may not: {}", missing.join("; ")),
            "apply the chart's ClusterRole, Role and bindings: meshctl install | kubectl apply -f - (or helm upgrade)",
        )
    }
}

/// A replica leads: it holds the Lease and renewed it within its duration.
async fn controller_ready(client: &Client, namespace: &str) -> Item {
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
async fn webhook(client: &Client, namespace: &str) -> Item {
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
fn certificates_valid(pem: &[u8]) -> Result<usize, String> {
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

async fn issuer(client: &Client, namespace: &str) -> Item {
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

/// Every pod in a namespace labelled for injection has the sidecar;
/// those that do not are listed with why.
async fn pods_injected(client: &Client, namespace: &str) -> Item {
    let name = "Pods in labelled namespaces have a sidecar";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let selector = format!("{}={}", inject::NAMESPACE_LABEL, "enabled");
    let labelled = match namespaces
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            return Item::fail(
                Section::Health,
                name,
                format!("listing namespaces: {}", why(&e)),
                "run meshctl check as a user who may list namespaces and pods",
            )
        }
    };
    let webhook_since = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK_CONFIGURATION)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.metadata.creation_timestamp)
        .map(|t| t.0);
    let (mut meshed, mut unmeshed) = (0, Vec::new());
    for ns in labelled
        .iter()
        .filter(|ns| ns.metadata.name.as_deref() != Some(namespace))
    {
        let ns_name = ns.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
        let list = match pods.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                return Item::fail(
                    Section::Health,
                    name,
                    format!("listing pods in {ns_name}: {}", why(&e)),
                    "run meshctl check as a user who may list pods",
                )
            }
        };
        let labelled_at = label_time(ns);
        for pod in list {
            let value = serde_json::to_value(&pod).unwrap_or_default();
            if has_proxy(&value) {
                meshed += 1;
                continue;
            }
            let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
            unmeshed.push(why_unmeshed(
                &ns_name,
                namespace,
                &pod,
                &value,
                created,
                labelled_at,
                webhook_since,
            ));
        }
    }
    let failing: Vec<&UnmeshedPod> = unmeshed.iter().filter(|p| !p.intended).collect();
    let detail = format!(
        "{meshed} meshed, {} without a sidecar ({} by choice) in {} labelled namespace(s)",
        unmeshed.len(),
        unmeshed.len() - failing.len(),
        labelled.len()
    );
    let mut item = if failing.is_empty() {
        Item::pass(Section::Health, name, detail)
    } else {
        Item::fail(Section::Health, name, detail, "restart the listed pods' workloads so the webhook injects them (kubectl -n NS rollout restart deployment/NAME), or delete the pods")
    };
    item.pods = unmeshed;
    item
}

fn why_unmeshed(
    namespace: &str,
    mesh_namespace: &str,
    pod: &Pod,
    value: &serde_json::Value,
    created: Option<Timestamp>,
    labelled_at: Option<Timestamp>,
    webhook_since: Option<Timestamp>,
) -> UnmeshedPod {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let labels = BTreeMap::from([(inject::NAMESPACE_LABEL.to_string(), "enabled".to_string())]);
    let placement = inject::Placement {
        namespace,
        labels: Some(&labels),
        mesh_namespace,
    };
    let (why, intended) = match inject::select(value, Some(placement)) {
        Err(invalid) => (format!("the webhook refuses its annotations: {invalid}"), false),
        Ok(inject::Selection::Inject) => match (created, labelled_at, webhook_since) {
            (Some(created), Some(labelled), _) if created <= labelled => (
                format!("created {created}, before the namespace was labelled ({labelled})"),
                false,
            ),
            (Some(created), _, Some(installed)) if created <= installed => (
                format!("created {created}, before the webhook was installed ({installed})"),
                false,
            ),
            _ => (
                "the webhook did not inject it when it was created (it was unreachable, or failurePolicy Ignore let the pod through)".to_string(),
                false,
            ),
        },
        Ok(skipped) => (format!("not injected: {}", skipped.explain()), true),
    };
    UnmeshedPod {
        namespace: namespace.to_string(),
        name,
        why,
        intended,
    }
}

/// `name` from `api`, or what to say: that there is no `what`, or why it
/// cannot be read.
async fn get<K>(api: &Api<K>, name: &str, what: &str) -> Result<K, String>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(Some(object)) => Ok(object),
        Ok(None) => Err(format!("no {what}")),
        Err(e) => Err(format!("reading {what}: {}", why(&e))),
    }
}

/// What the API server said (its Status message), else what failed.
fn why(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

fn has_proxy(pod: &serde_json::Value) -> bool {
    inject::has_container(pod, inject::PROXY_CONTAINER)
}

/// When the injection label was last set, from the managers' records
/// (`managedFields`); `None` when the API server keeps none.
fn label_time(namespace: &Namespace) -> Option<Timestamp> {
    let field = format!("f:{}", inject::NAMESPACE_LABEL);
    namespace
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:metadata"]["f:labels"].get(&field).is_some())
        })
        .filter_map(|entry| entry.time.as_ref().map(|t| t.0))
        .max()
}

fn age_of(time: Timestamp) -> Duration {
    let elapsed = Timestamp::now().duration_since(time);
    Duration::try_from(elapsed).unwrap_or_default()
}

/// The checklist, one line an item (✔/✖), the fix under a failed one,
/// and the unmeshed pods under theirs.
pub fn render(items: &[Item]) -> String {
    let mut out = String::new();
    for (section, title) in [
        (Section::PreFlight, "Pre-flight"),
        (Section::Health, "Health"),
    ] {
        let section_items: Vec<&Item> = items.iter().filter(|i| i.section == section).collect();
        if section_items.is_empty() {
            continue;
        }
        out.push_str(title);
        out.push('\n');
        for item in section_items {
            let mark = if item.ok { '✔' } else { '✖' };
            out.push_str(&format!("  {mark} {}: {}\n", item.name, item.detail));
            for pod in &item.pods {
                out.push_str(&format!(
                    "      {}/{}: {}\n",
                    pod.namespace, pod.name, pod.why
                ));
            }
            if let Some(fix) = &item.fix {
                out.push_str(&format!("      fix: {fix}\n"));
            }
        }
    }
    let failed = items.iter().filter(|i| !i.ok).count();
    if failed == 0 {
        out.push_str("All checks passed.\n");
    } else {
        out.push_str(&format!("{failed} check(s) failed.\n"));
    }
    out
}
