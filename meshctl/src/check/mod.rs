//! `meshctl check`: is the cluster ready for the mesh (pre-flight), and is
//! the mesh healthy — as a checklist where every failed item says how to
//! fix it, or JSON for scripts. Exits non-zero when any item fails.

mod health;
mod pods;
mod preflight;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::Client;
use serde::Serialize;
use serde_json::json;
use trellis_control_plane::inject;

/// What the chart names the webhook configuration.
const WEBHOOK_CONFIGURATION: &str = "trellis-proxy-injector";

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
    items.push(preflight::kubernetes_version(
        &version.major,
        &version.minor,
    ));
    items.push(preflight::custom_resources(client).await);
    items.push(preflight::controller_rbac(client, namespace).await);
    items.push(health::controller_ready(client, namespace).await);
    items.push(health::webhook(client, namespace).await);
    items.push(health::issuer(client, namespace).await);
    items.push(pods::pods_injected(client, namespace).await);
    items
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
