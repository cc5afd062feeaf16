//! `meshctl inject -f FILE|-`: the webhook's injection, offline, on the
//! workloads of a multi-document YAML file (Pods, Deployments,
//! StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs,
//! CronJobs and `List`s of them), so `meshctl inject -f app.yaml | kubectl
//! apply -f -` meshes them; `--uninject` takes the proxy out again.
//!
//! Offline there are no namespace labels to consult: every workload is
//! injected unless it opts out, uses hostNetwork or has a proxy already
//! (each skip is noted on stderr, with why). A document that does not
//! change comes back byte for byte; a changed one is written anew.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::Value;
use trellis_control_plane::inject::{self, InjectError, Injector, Selection};

#[derive(clap::Args)]
pub struct InjectArgs {
    /// The manifests: a file, or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    file: PathBuf,
    /// Take injected proxies out instead.
    #[arg(long)]
    uninject: bool,
    /// The mesh's trust bundle (PEM; the ConfigMap
    /// trellis-identity-trust-roots, key ca-bundle.crt); required to inject.
    #[arg(long, value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// What proxies get (the controller's --inject-config file).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The namespace of objects that name none (their identity's namespace).
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The namespace the mesh's controller runs in.
    #[arg(long, default_value = trellis_proto::CONTROLLER_NAMESPACE)]
    mesh_namespace: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

/// What to do to each workload.
pub enum Mode {
    /// Inject, with proxies trusting this bundle (PEM).
    Inject {
        injector: Box<Injector>,
        trust_bundle: String,
        /// For objects without `metadata.namespace`.
        namespace: String,
    },
    Uninject,
}

/// The transformed text, and a note for each workload left alone.
#[derive(Debug, Default)]
pub struct Transformed {
    pub text: String,
    pub notes: Vec<String>,
}

/// Why the input cannot be transformed.
#[derive(Debug, thiserror::Error)]
pub enum InjectFileError {
    /// A document is not YAML.
    #[error("document {index} is not valid YAML: {reason}")]
    Yaml { index: usize, reason: String },
    /// A workload cannot be injected (an invalid annotation, a broken spec).
    #[error("{object}: {source}")]
    Inject { object: String, source: InjectError },
    /// A changed document cannot be written back.
    #[error("{object}: cannot write it as YAML: {reason}")]
    Write { object: String, reason: String },
}

pub fn run(args: InjectArgs) -> anyhow::Result<bool> {
    let input = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let mode = if args.uninject {
        Mode::Uninject
    } else {
        let Some(bundle) = &args.trust_bundle else {
            anyhow::bail!(
                "--trust-bundle FILE is required to inject: proxies must know the mesh's roots. \
                 Get it with `kubectl get configmap -n {} trellis-identity-trust-roots -o jsonpath='{{.data.ca-bundle\\.crt}}' > bundle.crt`",
                args.mesh_namespace
            );
        };
        let trust_bundle = std::fs::read_to_string(bundle)
            .with_context(|| format!("cannot read the trust bundle {}", bundle.display()))?;
        if !trust_bundle.contains("-----BEGIN CERTIFICATE-----") {
            anyhow::bail!(
                "the trust bundle {} holds no PEM certificate; pass the mesh's ca-bundle.crt",
                bundle.display()
            );
        }
        let config = match &args.config {
            Some(path) => inject::Config::from_file(path)?,
            None => inject::Config::default(),
        };
        Mode::Inject {
            injector: Box::new(Injector::new(
                config,
                &args.mesh_namespace,
                &args.trust_domain,
            )),
            trust_bundle,
            namespace: args.namespace,
        }
    };
    let transformed = transform(&input, &mode)?;
    for note in &transformed.notes {
        eprintln!("{note}");
    }
    print!("{}", transformed.text);
    Ok(true)
}

/// Transforms every document of `input`.
pub fn transform(input: &str, mode: &Mode) -> Result<Transformed, InjectFileError> {
    let mut out = Transformed::default();
    for (index, (separator, body)) in documents(input).into_iter().enumerate() {
        out.text.push_str(separator);
        let value: Value = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_saphyr::from_str(body).map_err(|e| InjectFileError::Yaml {
                index: index + 1,
                reason: e.to_string(),
            })?
        };
        let mut changed = value.clone();
        if transform_object(&mut changed, mode, &mut out.notes)? {
            // The comments that head the document stay; the rest is new.
            out.text.extend(
                body.split_inclusive('\n').take_while(|line| {
                    line.trim().is_empty() || line.trim_start().starts_with('#')
                }),
            );
            let yaml = serde_saphyr::to_string(&changed).map_err(|e| InjectFileError::Write {
                object: describe(&value),
                reason: e.to_string(),
            })?;
            out.text.push_str(&yaml);
            if !yaml.ends_with('\n') {
                out.text.push('\n');
            }
        } else {
            out.text.push_str(body);
        }
    }
    Ok(out)
}

/// The documents of a YAML stream, each with the `---` line before it
/// (empty for the first), as written.
fn documents(input: &str) -> Vec<(&str, &str)> {
    let mut documents = Vec::new();
    let (mut separator, mut start) = ("", 0);
    let mut offset = 0;
    for line in input.split_inclusive('\n') {
        let is_separator = line == "---\n"
            || line == "---"
            || line.starts_with("--- ")
            || line.starts_with("---\t")
            || line == "---\r\n";
        if is_separator {
            documents.push((separator, &input[start..offset]));
            separator = line;
            start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push((separator, &input[start..]));
    documents
}

/// `kind/name` of an object, for notes and errors.
fn describe(object: &Value) -> String {
    let text = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    format!(
        "{}/{}",
        text("/kind").unwrap_or("object").to_lowercase(),
        text("/metadata/name").unwrap_or("(unnamed)")
    )
}

/// Where a kind keeps its pods' template.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Transforms one object (a `List`'s items each); returns whether it changed.
fn transform_object(
    object: &mut Value,
    mode: &Mode,
    notes: &mut Vec<String>,
) -> Result<bool, InjectFileError> {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind == "List" || (kind.ends_with("List") && object.get("items").is_some()) {
        let mut changed = false;
        if let Some(Value::Array(items)) = object.get_mut("items") {
            for item in items {
                changed |= transform_object(item, mode, notes)?;
            }
        }
        return Ok(changed);
    }
    let Some(pointer) = template_pointer(kind) else {
        return Ok(false);
    };
    let name = describe(object);
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(pod) = object.pointer_mut(pointer) else {
        notes.push(format!("{name}: not changed: it has no pod template"));
        return Ok(false);
    };
    let error = |source| InjectFileError::Inject {
        object: name.clone(),
        source,
    };
    match mode {
        Mode::Uninject => Ok(inject::uninject(pod)),
        Mode::Inject {
            injector,
            trust_bundle,
            namespace: default_namespace,
        } => match inject::select(pod, None).map_err(|e| error(e.into()))? {
            Selection::Inject => {
                let namespace = namespace.as_deref().unwrap_or(default_namespace);
                injector.inject(pod, namespace, trust_bundle).map_err(error)
            }
            skip => {
                notes.push(format!("{name}: not injected: {}", skip.explain()));
                Ok(false)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_their_separators_and_text() {
        let input = "# head\na: 1\n---\nb: 2\n--- # note\n\n---\nc: 3";
        let docs = documents(input);
        assert_eq!(
            docs,
            [
                ("", "# head\na: 1\n"),
                ("---\n", "b: 2\n"),
                ("--- # note\n", "\n"),
                ("---\n", "c: 3"),
            ]
        );
        let rebuilt: String = docs.iter().flat_map(|(s, b)| [*s, *b]).collect();
        assert_eq!(rebuilt, input);
    }
}
