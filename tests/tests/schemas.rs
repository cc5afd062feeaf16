//! Every manifest in `examples/` and every one `meshctl demo` writes passes
//! `kubernetes-validate --strict` (PyPI; the API server's OpenAPI schemas,
//! refusing unknown fields) for each Kubernetes version from 1.25 that the
//! tool knows, and the local source agrees with it on a broken object.
//!
//! The tool has schemas for built-in kinds only: for HTTPRoute (a Gateway
//! API CRD) and Trellis' HTTPFault, ResiliencePolicy and Rollout it can
//! only say that it has none, so for those the test asserts exactly that
//! warning and nothing else. Without the tool the test skips, except under
//! `CI=true`, where it fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use trellis_control_plane::source::manifest;

/// The oldest Kubernetes version checked; the newest is the tool's newest.
const OLDEST: (u32, u32) = (1, 25);

/// Kinds the tool has no schema for, with their apiVersions.
const CUSTOM_KINDS: [(&str, &str); 5] = [
    ("HTTPRoute", "gateway.networking.k8s.io/v1"),
    ("HTTPFault", "trellis.dev/v1alpha1"),
    ("ResiliencePolicy", "trellis.dev/v1alpha1"),
    ("Rollout", "trellis.dev/v1alpha1"),
    ("AuthorizationPolicy", "trellis.dev/v1alpha1"),
];

/// Writes every manifest the demo writes into `dir` (the one place that
/// names the demo's manifest writer).
fn write_demo_manifests(dir: &Path) -> Vec<PathBuf> {
    use meshctl::demo::manifests;
    let file = dir.join("demo.yaml");
    std::fs::write(&file, manifests::render(&manifests::pods([127, 0, 9]))).unwrap();
    vec![file]
}

fn example_manifests() -> Vec<PathBuf> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    let mut dirs = vec![examples];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `kubernetes-validate`, if installed.
struct Validator {
    /// `1.25.0`, `1.26.0`, …: every version the tool knows from `OLDEST`.
    versions: Vec<String>,
}

impl Validator {
    fn find() -> Option<Self> {
        let out = trellis_tests::python_with(
            "kubernetes-validate",
            "pip install kubernetes-validate",
            "import kubernetes_validate.utils as u; print(' '.join(u.all_versions()))",
            &[],
        )?;
        let known: BTreeSet<(u32, u32, String)> = String::from_utf8_lossy(&out)
            .split_whitespace()
            .filter_map(|v| {
                let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
                let (major, minor) = (parts.next()??, parts.next()??);
                Some((major, minor, v.to_string()))
            })
            .collect();
        let versions: Vec<String> = known
            .into_iter()
            .filter(|(major, minor, _)| (*major, *minor) >= OLDEST)
            .map(|(_, _, v)| v)
            .collect();
        assert!(
            versions.iter().any(|v| v == "1.30.0"),
            "kubernetes-validate knows no 1.30.0: {versions:?}"
        );
        Some(Self { versions })
    }

    /// Runs `--strict` for every version on `files`: the exit status and
    /// the output lines.
    fn run(&self, files: &[PathBuf]) -> (bool, Vec<String>) {
        let mut command = Command::new("python3");
        command.args(["-m", "kubernetes_validate", "--strict"]);
        for version in &self.versions {
            command.args(["-k", version]);
        }
        let out = command
            .args(files)
            .output()
            .expect("kubernetes-validate runs");
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
            .map(str::to_string)
            .collect();
        (out.status.success(), lines)
    }

    /// The versions as the tool prints them (`1.30`).
    fn minor_versions(&self) -> impl Iterator<Item = &str> {
        self.versions.iter().map(|v| v.rsplit_once('.').unwrap().0)
    }
}

/// Asserts that the tool accepts every object of `files`: each built-in
/// object passes for every version, each custom one only lacks a schema.
fn assert_valid(validator: &Validator, files: &[PathBuf]) {
    let (success, lines) = validator.run(files);
    let mut expected = BTreeSet::new();
    for file in files {
        let contents = std::fs::read_to_string(file).unwrap();
        // The local source reads what it serves and skips other kinds
        // (Deployments, ServiceAccounts of examples/cluster/).
        manifest::parse(file, &contents)
            .unwrap_or_else(|e| panic!("the local source refuses it: {e}"));
        let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&contents).unwrap();
        for document in documents.iter().filter(|d| !d.is_null()) {
            for version in validator.minor_versions() {
                expected.insert(expected_line(file, document, version));
            }
        }
    }
    let seen: BTreeSet<String> = lines.iter().cloned().collect();
    let missing: Vec<&String> = expected.difference(&seen).collect();
    let unexpected: Vec<&String> = seen.difference(&expected).collect();
    assert!(
        success && missing.is_empty() && unexpected.is_empty(),
        "kubernetes-validate --strict on {files:?}:\n missing: {missing:#?}\n unexpected: {unexpected:#?}"
    );
}

/// What the tool prints for an object it accepts.
fn expected_line(file: &Path, document: &serde_json::Value, version: &str) -> String {
    let file = file.display();
    let kind = document["kind"].as_str().unwrap_or_default();
    let name = document["metadata"]["name"].as_str().unwrap_or_default();
    let custom = CUSTOM_KINDS.iter().find(|(custom, _)| *custom == kind);
    match custom {
        Some((kind, api_version)) => format!(
            "WARN {file} Couldn't find schema for kind {kind} with api version {api_version} \
             for kubernetes version {version}"
        ),
        None => format!(
            "INFO {file} passed for resource {}/{name} against version {version}",
            kind.to_lowercase(),
        ),
    }
}

#[test]
fn examples_and_demo_manifests_pass_strict_validation() {
    let Some(validator) = Validator::find() else {
        return;
    };
    let examples = example_manifests();
    assert!(!examples.is_empty(), "no manifests in examples/");
    assert_valid(&validator, &examples);

    let dir = tempfile::tempdir().unwrap();
    let demo = write_demo_manifests(dir.path());
    assert_valid(&validator, &demo);
}

#[test]
fn an_endpoint_slice_without_address_type_is_refused_by_the_tool_and_the_local_source() {
    let Some(validator) = Validator::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: hello-1, labels: {kubernetes.io/service-name: hello}}\n\
         endpoints: [{addresses: [10.1.2.3]}]\n",
    )
    .unwrap();
    let (success, lines) = validator.run(std::slice::from_ref(&file));
    assert!(!success, "kubernetes-validate accepted it: {lines:#?}");
    for version in validator.minor_versions() {
        let refusal = format!(
            "ERROR {} did not validate for resource endpointslice/hello-1 against version \
             {version}: : 'addressType' is a required property",
            file.display()
        );
        assert!(lines.contains(&refusal), "{refusal:?} not in {lines:#?}");
    }
    let contents = std::fs::read_to_string(&file).unwrap();
    let err = manifest::parse(&file, &contents).expect_err("the local source accepted it");
    assert!(
        err.to_string()
            .contains("EndpointSlice default/hello-1: addressType: is required"),
        "{err}"
    );
}
