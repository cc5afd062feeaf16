//! Parsing and validating Kubernetes YAML manifests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::model::{EndpointSlice, Object, ObjectKey, Pod, ResiliencePolicy};

/// A manifest that was rejected, and why. The message names the file, the
/// object (when the file parsed) and what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Kind namespace/name`, when the problem is one object.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// The most documents one manifest file may hold.
pub const MAX_DOCUMENTS: usize = 10_000;

/// Parses one (possibly multi-document) YAML file into the objects the mesh
/// reads, each checked as the API server would check it (`api_validation`).
/// Kinds the mesh does not use (Deployments, ConfigMaps…) are skipped.
pub fn parse(file: &Path, contents: &str) -> Result<Vec<Object>, ManifestError> {
    let in_file = |refusal: Refusal| refusal.in_file(file);
    // serde-saphyr's own budget stops at 1,024 documents, which a
    // generated file of many small objects passes; the rest of its budget
    // (nodes, depth, aliases) still guards against hostile YAML.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! { max_documents: MAX_DOCUMENTS },
    };
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(
        contents, options,
    )
    .map_err(|e| ManifestError {
        file: file.to_path_buf(),
        object: None,
        reason: match e.without_snippet() {
            serde_saphyr::Error::Budget {
                breach: serde_saphyr::budget::BudgetBreach::Documents { .. },
                ..
            } => format!(
                "has more than {MAX_DOCUMENTS} YAML documents, the most one file may hold; split it into several files"
            ),
            _ => format!("not valid YAML: {e}"),
        },
    })?;
    let mut objects = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        if document.is_null() {
            continue;
        }
        let has_type = ["apiVersion", "kind"].iter().all(|field| {
            document
                .get(field)
                .and_then(|v| v.as_str())
                .is_some_and(|v| !v.is_empty())
        });
        if !has_type {
            return Err(in_file(Refusal {
                object: Some(format!("document {}", index + 1)),
                reason: "has no apiVersion or kind; every document must be a Kubernetes object"
                    .into(),
            }));
        }
        if let Some(object) = from_value(document).map_err(in_file)? {
            objects.push(object);
        }
    }
    Ok(objects)
}

/// Why one object was refused, wherever it came from (a file, the API).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", object.as_ref().map(|o| format!("{o}: ")).unwrap_or_default())]
pub struct Refusal {
    /// `Kind name`, when the object is known.
    pub object: Option<String>,
    pub reason: String,
}

impl Refusal {
    fn in_file(self, file: &Path) -> ManifestError {
        ManifestError {
            file: file.to_path_buf(),
            object: self.object,
            reason: self.reason,
        }
    }
}

/// Reads one Kubernetes object (as JSON) into the mesh's model: `None` for
/// kinds the mesh does not use. The same reader serves manifest files and
/// the cluster's watchers, so both accept the same objects.
pub fn from_value(document: serde_json::Value) -> Result<Option<Object>, Refusal> {
    let text = |field: &str| document.get(field).and_then(|v| v.as_str()).unwrap_or("");
    let (api_version, kind) = (text("apiVersion").to_string(), text("kind").to_string());
    let name = document
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let label = format!("{kind} {name}");
    if name.is_empty() {
        return Err(Refusal {
            object: Some(label),
            reason: "metadata.name is missing".into(),
        });
    }
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => convert(document, &label, Object::Namespace)?,
        ("v1", "Service") => convert(document, &label, Object::Service)?,
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            convert(document, &label, Object::EndpointSlice)?
        }
        ("v1", "Pod") => convert(document, &label, Object::Pod)?,
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
            refuse_unread_spec_fields::<crate::model::HttpRoute>(&document, &label)?;
            convert(document, &label, Object::HttpRoute)?
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
            refuse_unread_spec_fields::<crate::model::GrpcRoute>(&document, &label)?;
            convert(document, &label, Object::GrpcRoute)?
        }
        ("trellis.dev/v1alpha1", "HTTPFault") => convert(document, &label, Object::HttpFault)?,
        ("trellis.dev/v1alpha1", "ResiliencePolicy") => {
            convert(document, &label, Object::ResiliencePolicy)?
        }
        ("trellis.dev/v1alpha1", "Rollout") => {
            convert(document, &label, |r| Object::Rollout(Box::new(r)))?
        }
        ("trellis.dev/v1alpha1", "AuthorizationPolicy") => {
            convert(document, &label, Object::AuthorizationPolicy)?
        }
        (
            _,
            "Namespace"
            | "Service"
            | "EndpointSlice"
            | "Pod"
            | "HTTPRoute"
            | "GRPCRoute"
            | "HTTPFault"
            | "ResiliencePolicy"
            | "Rollout"
            | "AuthorizationPolicy",
        ) => {
            return Err(Refusal {
                object: Some(label),
                reason: format!(
                    "apiVersion {api_version:?} is not supported for {kind}; use v1 (Namespace, Service, Pod), \
                     discovery.k8s.io/v1 (EndpointSlice), gateway.networking.k8s.io/v1 (HTTPRoute, GRPCRoute) \
                     or trellis.dev/v1alpha1 (HTTPFault, ResiliencePolicy, Rollout, AuthorizationPolicy)"
                ),
            });
        }
        _ => return Ok(None),
    };
    Ok(Some(object))
}

/// Refuses a route with a field under `spec` that the model does not read
/// (one from a newer Gateway API, or a typo the API server's schema would
/// have pruned): a route must never serve with part of it ignored.
fn refuse_unread_spec_fields<T: DeserializeOwned>(
    document: &serde_json::Value,
    label: &str,
) -> Result<(), Refusal> {
    let mut unread = Vec::new();
    let read: Result<T, _> =
        serde_ignored::deserialize(document, |path| unread.push(path.to_string()));
    // One that does not deserialize at all is refused by `convert`, which
    // names the field.
    if read.is_err() {
        return Ok(());
    }
    match unread.iter().find(|path| path.starts_with("spec.")) {
        None => Ok(()),
        Some(path) => Err(Refusal {
            object: Some(label.to_string()),
            reason: format!(
                "{}: Trellis does not implement this field; remove it (a route is never applied with part of it ignored)",
                indexed(path)
            ),
        }),
    }
}

/// `spec.rules.0.name` as the API server writes it: `spec.rules[0].name`.
fn indexed(path: &str) -> String {
    let mut out = String::new();
    for (i, segment) in path.split('.').enumerate() {
        if segment.bytes().all(|b| b.is_ascii_digit()) && i > 0 {
            out.push_str(&format!("[{segment}]"));
        } else {
            if i > 0 {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Converts one document to its type and checks it as the API server
/// would; the refusal names the first field that does not fit.
fn convert<T: DeserializeOwned>(
    document: serde_json::Value,
    label: &str,
    wrap: impl FnOnce(T) -> Object,
) -> Result<Object, Refusal> {
    let refusal = |object: String, reason: String| Refusal {
        object: Some(object),
        reason,
    };
    let typed = serde_path_to_error::deserialize(document).map_err(|e| {
        let field = e.path().to_string();
        let reason = match field.as_str() {
            "." => format!("does not match the Kubernetes schema: {}", e.inner()),
            _ => format!(
                "{field}: does not match the Kubernetes schema: {}",
                e.inner()
            ),
        };
        refusal(label.to_string(), reason)
    })?;
    let object = wrap(typed);
    super::api_validation::validate(&object)
        .map_err(|errors| refusal(object.to_string(), errors.to_string()))?;
    Ok(object)
}

/// Checks one file's objects against everything that would be loaded with
/// them (`all`), so cross-object mistakes are caught before they serve, and
/// against the mesh's own rules. (What the API server checks on one object,
/// `parse` has checked already.)
pub fn validate(file: &Path, objects: &[Object], all: &[&Object]) -> Result<(), ManifestError> {
    let references = References::loaded(all);
    for object in objects {
        check(object, &references).map_err(|reason| ManifestError {
            file: file.to_path_buf(),
            object: Some(object.to_string()),
            reason,
        })?;
    }
    Ok(())
}

/// Checks one object: its own fields, and its references to other objects
/// as far as `references` knows them.
pub fn check(object: &Object, references: &References) -> Result<(), String> {
    match object {
        Object::Namespace(n) => super::authz_validation::validate_namespace(n),
        Object::Service(_) => Ok(()),
        Object::EndpointSlice(s) => validate_slice(s, references),
        Object::Pod(p) => validate_pod(p),
        Object::HttpRoute(r) => {
            super::route_validation::validate_route(r, references).map_err(|e| e.to_string())
        }
        Object::GrpcRoute(r) => {
            super::route_validation::validate_grpc_route(r, references).map_err(|e| e.to_string())
        }
        Object::HttpFault(f) => super::route_validation::validate_fault(f),
        Object::ResiliencePolicy(p) => {
            super::resilience_validation::validate_policy(p).map_err(|e| e.to_string())
        }
        Object::AuthorizationPolicy(p) => {
            super::authz_validation::validate_policy(p).map_err(|e| e.to_string())
        }
        // Checked by the rollout controller, which reports a bad one in its
        // status: refusing it here would leave nowhere to say why.
        Object::Rollout(_) => Ok(()),
    }
}

/// What an object's references to other objects are checked against.
pub struct References<'a> {
    /// `None` for objects from the API server, which accepts a reference to
    /// an object that does not exist (yet); the store resolves references
    /// when it answers, so a dangling one routes nowhere instead.
    loaded: Option<Loaded<'a>>,
}

struct Loaded<'a> {
    keys: BTreeSet<(&'static str, ObjectKey)>,
    policies: BTreeMap<ObjectKey, &'a ResiliencePolicy>,
}

/// A referenced object, as far as [`References`] can tell.
pub enum Lookup<'a, T> {
    Found(&'a T),
    Missing,
    /// References are not checked (cluster mode).
    Unknown,
}

impl<'a> References<'a> {
    /// Local mode: everything loaded together must be consistent.
    pub fn loaded(all: &[&'a Object]) -> Self {
        let keys = all.iter().map(|o| (o.kind(), o.key())).collect();
        let policies = all
            .iter()
            .filter_map(|o| match o {
                Object::ResiliencePolicy(p) => Some((p.metadata.key(), p)),
                _ => None,
            })
            .collect();
        Self {
            loaded: Some(Loaded { keys, policies }),
        }
    }

    /// Cluster mode: the API server's rules, which leave references alone.
    pub fn unchecked() -> Self {
        Self { loaded: None }
    }

    /// Whether `kind key` may be referenced: it exists, or nobody can tell.
    pub fn exists(&self, kind: &'static str, key: &ObjectKey) -> bool {
        self.loaded
            .as_ref()
            .is_none_or(|l| l.keys.contains(&(kind, key.clone())))
    }

    pub fn policy(&self, key: &ObjectKey) -> Lookup<'a, ResiliencePolicy> {
        match &self.loaded {
            None => Lookup::Unknown,
            Some(l) => l
                .policies
                .get(key)
                .map_or(Lookup::Missing, |p| Lookup::Found(p)),
        }
    }
}

/// Finds objects defined in more than one file: which one wins would be an
/// accident of file order, so the later file is rejected.
pub fn duplicates<'a>(
    files: impl IntoIterator<Item = (&'a PathBuf, &'a Vec<Object>)>,
) -> Vec<ManifestError> {
    let mut seen: BTreeMap<(String, ObjectKey), &PathBuf> = BTreeMap::new();
    let mut errors = Vec::new();
    for (file, objects) in files {
        for object in objects {
            let id = (object.kind().to_string(), object.key());
            match seen.get(&id) {
                Some(first) if *first != file => errors.push(ManifestError {
                    file: file.clone(),
                    object: Some(object.to_string()),
                    reason: format!(
                        "is also defined in {}; keep one definition",
                        first.display()
                    ),
                }),
                Some(_) => {}
                None => drop(seen.insert(id, file)),
            }
        }
    }
    errors
}

fn validate_slice(slice: &EndpointSlice, references: &References) -> Result<(), String> {
    let key = slice.metadata.key();
    let Some(service) = slice.service_name() else {
        return Err(format!(
            "has no label {}; set it to the name of its Service",
            crate::model::SERVICE_NAME_LABEL
        ));
    };
    if !references.exists("Service", &ObjectKey::new(&key.namespace, service)) {
        return Err(format!(
            "label {}={service} names no Service in namespace {}; add the Service or fix the label",
            crate::model::SERVICE_NAME_LABEL,
            key.namespace
        ));
    }
    Ok(())
}

fn validate_pod(pod: &Pod) -> Result<(), String> {
    if let Some(port) = pod
        .metadata
        .annotations
        .get(crate::model::INBOUND_PORT_ANNOTATION)
    {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!(
                "annotation {} = {port:?} is not a port number",
                crate::model::INBOUND_PORT_ANNOTATION
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hello-abc
  labels: {kubernetes.io/service-name: hello}
addressType: IPv4
endpoints:
  - addresses: ["127.0.0.3"]
    targetRef: {kind: Pod, name: hello-v1}
ports: [{name: http, port: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"#;

    #[test]
    fn parses_multi_document_files_and_skips_other_kinds() {
        let objects = parse(Path::new("hello.yaml"), HELLO).unwrap();
        let names: Vec<String> = objects.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            names,
            ["Service default/hello", "EndpointSlice default/hello-abc"]
        );
        let all: Vec<&Object> = objects.iter().collect();
        validate(Path::new("hello.yaml"), &objects, &all).unwrap();
    }

    #[test]
    fn errors_name_file_object_and_reason() {
        let err = parse(Path::new("bad.yaml"), "kind: [unclosed").unwrap_err();
        assert!(
            err.to_string().starts_with("bad.yaml: not valid YAML"),
            "{err}"
        );

        let err = parse(
            Path::new("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: notanumber}]}\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "svc.yaml: Service x: spec.ports[0].port: does not match the Kubernetes schema"
            ),
            "{err}"
        );

        let slice_only: String = HELLO.split("---").nth(1).unwrap().to_string();
        let objects = parse(Path::new("slice.yaml"), &slice_only).unwrap();
        let all: Vec<&Object> = objects.iter().collect();
        let err = validate(Path::new("slice.yaml"), &objects, &all).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slice.yaml: EndpointSlice default/hello-abc: label kubernetes.io/service-name=hello \
             names no Service in namespace default; add the Service or fix the label"
        );
    }

    #[test]
    fn files_of_many_documents_load_up_to_the_documented_limit() {
        let service = |i: usize| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{ports: [{{port: 80}}]}}\n")
        };
        let many: Vec<String> = (0..2_000).map(service).collect();
        let objects = parse(Path::new("many.yaml"), &many.join("---\n")).unwrap();
        assert_eq!(
            objects.len(),
            2_000,
            "beyond serde-saphyr's default of 1,024"
        );
        let too_many = "---\n{}\n".repeat(MAX_DOCUMENTS + 1);
        let err = parse(Path::new("huge.yaml"), &too_many).unwrap_err();
        assert_eq!(
            err.to_string(),
            "huge.yaml: has more than 10000 YAML documents, the most one file may hold; split it into several files"
        );
    }

    #[test]
    fn duplicate_definitions_are_reported_against_the_later_file() {
        let a = PathBuf::from("a.yaml");
        let b = PathBuf::from("b.yaml");
        let objects = parse(&a, HELLO).unwrap();
        let errors = duplicates([(&a, &objects), (&b, &objects)]);
        assert_eq!(errors.len(), 2);
        assert!(errors[0]
            .to_string()
            .contains("b.yaml: Service default/hello: is also defined in a.yaml"));
    }
}
