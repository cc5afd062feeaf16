//! The Helm chart, checked by Helm's own linter (the `Lint` action of Helm's
//! Go library, through the PyPI package helm-sdkpy), which renders every
//! template and parses what it renders. Without helm-sdkpy the test skips,
//! except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};

/// Lints `chart`: `(severity, path)` of every message and the error count.
/// Severities are Helm's: 1 info, 2 warning, 3 error.
fn lint(chart: &Path) -> Option<(Vec<(u64, String)>, usize)> {
    const SCRIPT: &str = r#"
import asyncio, json, sys
import helm_sdkpy
result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(sys.argv[1]))
print(json.dumps({
    "messages": [[m["Severity"], m["Path"]] for m in result.get("Messages") or []],
    "errors": len(result.get("Errors") or []),
}))
"#;
    let out = trellis_tests::python_with(
        "helm-sdkpy",
        "pip install --ignore-requires-python helm-sdkpy",
        SCRIPT,
        &[chart.to_str().expect("a UTF-8 path")],
    )?;
    let report: serde_json::Value = serde_json::from_slice(&out).expect("lint report");
    let messages = report["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m[0].as_u64().unwrap_or(0),
                m[1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    Some((messages, report["errors"].as_u64().unwrap_or(0) as usize))
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/trellis")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_chart_lints_and_renders_cleanly() {
    let Some((messages, errors)) = lint(&chart()) else {
        return;
    };
    let serious: Vec<_> = messages
        .iter()
        .filter(|(severity, _)| *severity >= 2)
        .collect();
    assert!(
        errors == 0 && serious.is_empty(),
        "helm lint: {errors} errors, warnings or errors at {serious:?}"
    );
}

#[test]
fn a_broken_template_or_dashboard_fails_the_lint() {
    let dir = tempfile::tempdir().unwrap();
    for (file, breakage) in [
        // A template error.
        (
            "templates/dashboards.yaml",
            "\n{{ .Values.nope.missing }}\n",
        ),
        // Rendered output that is not YAML.
        (
            "templates/broken.yaml",
            "kind: ConfigMap\n  data: [unclosed\n",
        ),
    ] {
        let copy = dir.path().join(file.replace('/', "-"));
        copy_dir(&chart(), &copy);
        let path = copy.join(file);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(breakage);
        std::fs::write(&path, text).unwrap();
        let Some((messages, errors)) = lint(&copy) else {
            return;
        };
        assert!(
            errors > 0 && messages.iter().any(|(severity, _)| *severity == 3),
            "breaking {file} went unnoticed: {messages:?}"
        );
    }
}
