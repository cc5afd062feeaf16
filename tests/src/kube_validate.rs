//! `kubernetes-validate --strict` (PyPI: the API server's OpenAPI schemas,
//! unknown fields refused) for Kubernetes 1.29, the first with native
//! sidecars, and the newest version the tool knows. Skips without the tool,
//! except under `CI=true`.

use std::path::Path;

/// The oldest version injected pods must be valid for.
pub const OLDEST: &str = "1.29.0";

/// `[OLDEST, newest]`, or `None` (skip) without the tool.
pub fn versions() -> Option<[String; 2]> {
    let out = crate::python_with(
        "kubernetes-validate",
        "pip install kubernetes-validate",
        "import kubernetes_validate.utils as u; print(u.latest_version())",
        &[],
    )?;
    let newest = String::from_utf8_lossy(&out).trim().to_string();
    Some([OLDEST.to_string(), newest])
}

/// Validates every object of `file` strictly for both versions; `Err` has
/// the tool's complaints. `None` when the tool is missing (a skip).
pub fn strict(file: &Path) -> Option<Result<(), String>> {
    let [oldest, newest] = versions()?;
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            &oldest,
            "-k",
            &newest,
        ])
        .arg(file)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = text.lines().filter(|l| l.starts_with("INFO")).count();
    Some(
        if out.status.success() && passed > 0 && !text.contains("ERROR") {
            Ok(())
        } else {
            Err(text)
        },
    )
}
