//! `meshctl inject` as a user runs it: the real binary on files and stdin.
//! (The outputs' validity against Kubernetes' schemas is checked in
//! tests/tests/inject_manifests.rs, where kubernetes-validate is found.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const WORKLOAD_KINDS: [&str; 8] = [
    "pod/hello",
    "deployment/web",
    "statefulset/db",
    "daemonset/agent",
    "replicaset/cache",
    "job/report",
    "cronjob/nightly",
    "deployment/listed",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The bundle of a fresh mesh CA, written into `dir`.
fn bundle(dir: &Path) -> PathBuf {
    let ca = trellis_control_plane::identity::Ca::load_or_create(&dir.join("ca"), "cluster.local")
        .unwrap();
    let path = dir.join("ca-bundle.crt");
    std::fs::write(&path, ca.bundle_pem()).unwrap();
    path
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `meshctl inject` with `args`, `stdin` as its input.
fn meshctl_inject(args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The documents of a YAML stream, parsed.
fn parse(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(text).unwrap()
}

/// `kind/name` → pod template, for every workload of `docs` (List items too).
fn templates(docs: &[Value]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = docs.iter().rev().collect();
    while let Some(doc) = stack.pop() {
        let kind = doc["kind"].as_str().unwrap_or("");
        let name = format!(
            "{}/{}",
            kind.to_lowercase(),
            doc["metadata"]["name"].as_str().unwrap_or("")
        );
        let pointer = match kind {
            "List" => {
                stack.extend(doc["items"].as_array().unwrap().iter().rev());
                continue;
            }
            "Pod" => "",
            "CronJob" => "/spec/jobTemplate/spec/template",
            "ConfigMap" | "Service" => continue,
            _ => "/spec/template",
        };
        out.push((name, doc.pointer(pointer).unwrap().clone()));
    }
    out
}

fn init_names(template: &Value) -> Vec<String> {
    template["spec"]["initContainers"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_workload_kind_is_injected_and_other_documents_pass_through_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let input = std::fs::read_to_string(fixture("workloads.yaml")).unwrap();
    let run = meshctl_inject(
        &[
            "-f",
            fixture("workloads.yaml").to_str().unwrap(),
            "--trust-bundle",
            bundle.to_str().unwrap(),
        ],
        "",
    );
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.stderr, "", "nothing skipped");
    let injected = templates(&parse(&run.stdout));
    let names: Vec<&str> = injected.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, WORKLOAD_KINDS);
    for (name, template) in &injected {
        let init = init_names(template);
        assert_eq!(init[..2], ["trellis-init", "trellis-proxy"], "{name}");
        assert_eq!(
            template["spec"]["initContainers"][1]["restartPolicy"],
            "Always"
        );
    }
    let (_, deployment) = &injected[1];
    assert_eq!(
        init_names(deployment),
        ["trellis-init", "trellis-proxy", "migrate"]
    );
    let env = &injected[0].1["spec"]["initContainers"][1]["env"];
    let identity = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "TRELLIS_IDENTITY")
        .unwrap();
    assert_eq!(identity["value"], "spiffe://cluster.local/ns/shop/sa/hello");
    // The pass-through documents, exactly as written.
    let tail = &input[input.find("# Passed through").unwrap()..];
    assert!(run.stdout.ends_with(tail), "{}", run.stdout);
    // The heading comment of a changed document stays.
    assert!(run.stdout.starts_with("# Every kind"), "{}", run.stdout);
}

#[test]
fn injecting_twice_is_injecting_once_and_uninject_restores_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let bundle = bundle.to_str().unwrap();
    let input = std::fs::read_to_string(fixture("workloads.yaml")).unwrap();
    let once = meshctl_inject(&["-f", "-", "--trust-bundle", bundle], &input);
    assert!(once.ok, "{}", once.stderr);
    let twice = meshctl_inject(&["-f", "-", "--trust-bundle", bundle], &once.stdout);
    assert!(twice.ok, "{}", twice.stderr);
    assert_eq!(twice.stdout, once.stdout, "the second run changes nothing");
    assert_eq!(
        twice.stderr.lines().count(),
        WORKLOAD_KINDS.len(),
        "each workload noted as injected already: {}",
        twice.stderr
    );
    assert!(twice
        .stderr
        .contains("pod/hello: not injected: it has a trellis-proxy container already"));

    let back = meshctl_inject(&["-f", "-", "--uninject"], &once.stdout);
    assert!(back.ok, "{}", back.stderr);
    assert_eq!(parse(&back.stdout), parse(&input));
    // Nothing to take out of the original: it comes back byte for byte.
    let untouched = meshctl_inject(&["-f", "-", "--uninject"], &input);
    assert_eq!(untouched.stdout, input);
}

#[test]
fn opted_out_and_host_network_workloads_are_left_alone_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let input = std::fs::read_to_string(fixture("skipped.yaml")).unwrap();
    let run = meshctl_inject(
        &["-f", "-", "--trust-bundle", bundle.to_str().unwrap()],
        &input,
    );
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.stdout, input);
    assert_eq!(
        run.stderr,
        "deployment/opted-out: not injected: it is annotated trellis.dev/inject: disabled\n\
         daemonset/node-agent: not injected: it uses hostNetwork\n"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let input = std::fs::read_to_string(fixture("workloads.yaml")).unwrap();
    let run = meshctl_inject(&["-f", "-"], &input);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("--trust-bundle FILE is required"),
        "{}",
        run.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("bundle.crt");
    std::fs::write(&not_pem, "hello").unwrap();
    let run = meshctl_inject(
        &["-f", "-", "--trust-bundle", not_pem.to_str().unwrap()],
        &input,
    );
    assert!(!run.ok);
    assert!(
        run.stderr.contains("holds no PEM certificate"),
        "{}",
        run.stderr
    );

    let bundle = bundle(dir.path());
    let bundle = bundle.to_str().unwrap();
    let bad = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {trellis.dev/proxy-cpu-limit: fast}\nspec:\n  containers: [{name: a, image: b}]\n";
    let run = meshctl_inject(&["-f", "-", "--trust-bundle", bundle], bad);
    assert!(!run.ok);
    assert!(
        run.stderr.contains(
            "pod/p: annotation trellis.dev/proxy-cpu-limit: \"fast\" is not a Kubernetes quantity"
        ),
        "{}",
        run.stderr
    );
    let run = meshctl_inject(&["-f", "-", "--trust-bundle", bundle], "a: 1\n---\nb: [\n");
    assert!(!run.ok);
    assert!(
        run.stderr.contains("document 2 is not valid YAML"),
        "{}",
        run.stderr
    );
    let config = dir.path().join("inject.yaml");
    std::fs::write(&config, "proxyImage: x\nreplicas: 2\n").unwrap();
    let run = meshctl_inject(
        &[
            "-f",
            "-",
            "--trust-bundle",
            bundle,
            "--config",
            config.to_str().unwrap(),
        ],
        &input,
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("replicas"), "{}", run.stderr);
}
