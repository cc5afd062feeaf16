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

/// Parses one (possibly multi-document) YAML file into the objects the mesh
/// reads, each checked as the API server would check it (`api_validation`).
/// Kinds the mesh does not use (Deployments, ConfigMaps…) are skipped.
pub fn parse(file: &Path, contents: &str) -> Result<Vec<Object>, ManifestError> {
    let error = |object: Option<String>, reason: String| ManifestError {
        file: file.to_path_buf(),
        object,
        reason,
    };
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(contents)
        .map_err(|e| error(None, format!("not valid YAML: {e}")))?;
    let mut objects = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        if document.is_null() {
            continue;
        }
        let api_version = document
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let kind = document.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        let name = document
            .pointer("/metadata/name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let label = format!(
            "{} {}",
            if kind.is_empty() { "document" } else { kind },
            name
        );
        if api_version.is_empty() || kind.is_empty() {
            return Err(error(
                Some(format!("document {}", index + 1)),
                "has no apiVersion or kind; every document must be a Kubernetes object".into(),
            ));
        }
        if name.is_empty() {
            return Err(error(Some(label), "metadata.name is missing".into()));
        }
        let object = match (api_version, kind) {
            ("v1", "Service") => convert(document, &label, file, Object::Service)?,
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                convert(document, &label, file, Object::EndpointSlice)?
            }
            ("v1", "Pod") => convert(document, &label, file, Object::Pod)?,
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
                convert(document, &label, file, Object::HttpRoute)?
            }
            ("trellis.dev/v1alpha1", "HTTPFault") => {
                convert(document, &label, file, Object::HttpFault)?
            }
            ("trellis.dev/v1alpha1", "ResiliencePolicy") => {
                convert(document, &label, file, Object::ResiliencePolicy)?
            }
            (
                _,
                "Service" | "EndpointSlice" | "Pod" | "HTTPRoute" | "HTTPFault"
                | "ResiliencePolicy",
            ) => {
                return Err(error(
                    Some(label),
                    format!(
                        "apiVersion {api_version:?} is not supported for {kind}; use v1 (Service, Pod), \
                         discovery.k8s.io/v1 (EndpointSlice), gateway.networking.k8s.io/v1 (HTTPRoute) \
                         or trellis.dev/v1alpha1 (HTTPFault, ResiliencePolicy)"
                    ),
                ));
            }
            _ => continue,
        };
        objects.push(object);
    }
    Ok(objects)
}

/// Converts one document to its type and checks it as the API server
/// would; the error names the first field that does not fit.
fn convert<T: DeserializeOwned>(
    document: serde_json::Value,
    label: &str,
    file: &Path,
    wrap: impl FnOnce(T) -> Object,
) -> Result<Object, ManifestError> {
    let error = |object: String, reason: String| ManifestError {
        file: file.to_path_buf(),
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
        error(label.to_string(), reason)
    })?;
    let object = wrap(typed);
    super::api_validation::validate(&object)
        .map_err(|errors| error(object.to_string(), errors.to_string()))?;
    Ok(object)
}

/// Checks one file's objects against everything that would be loaded with
/// them (`all`), so cross-object mistakes are caught before they serve, and
/// against the mesh's own rules. (What the API server checks on one object,
/// `parse` has checked already.)
pub fn validate(file: &Path, objects: &[Object], all: &[&Object]) -> Result<(), ManifestError> {
    let keys = |kind: &str| -> BTreeSet<ObjectKey> {
        all.iter()
            .filter(|o| o.kind() == kind)
            .map(|o| o.key())
            .collect()
    };
    let services = keys("Service");
    let faults = keys("HTTPFault");
    let policies: BTreeMap<ObjectKey, &ResiliencePolicy> = all
        .iter()
        .filter_map(|o| match o {
            Object::ResiliencePolicy(p) => Some((p.metadata.key(), p)),
            _ => None,
        })
        .collect();
    for object in objects {
        let problem = match object {
            Object::Service(_) => Ok(()),
            Object::EndpointSlice(s) => validate_slice(s, &services),
            Object::Pod(p) => validate_pod(p),
            Object::HttpRoute(r) => {
                super::route_validation::validate_route(r, &services, &faults, &policies)
            }
            Object::HttpFault(f) => super::route_validation::validate_fault(f),
            Object::ResiliencePolicy(p) => {
                super::resilience_validation::validate_policy(p).map_err(|e| e.to_string())
            }
        };
        if let Err(reason) = problem {
            return Err(ManifestError {
                file: file.to_path_buf(),
                object: Some(object.to_string()),
                reason,
            });
        }
    }
    Ok(())
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

fn validate_slice(slice: &EndpointSlice, services: &BTreeSet<ObjectKey>) -> Result<(), String> {
    let key = slice.metadata.key();
    let Some(service) = slice.service_name() else {
        return Err(format!(
            "has no label {}; set it to the name of its Service",
            crate::model::SERVICE_NAME_LABEL
        ));
    };
    if !services.contains(&ObjectKey::new(&key.namespace, service)) {
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
