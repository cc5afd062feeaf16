//! The real `kubectl` against a [`FakeApi`]: a second, independent client,
//! so the fake is held to what real tools expect.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use super::FakeApi;

const KUBECTL: &str = "kubectl";
/// Generous: kubectl and the server are local, but CI machines are busy.
const WAIT: Duration = Duration::from_secs(30);

/// kubectl against `api`, with its own kubeconfig and discovery cache.
pub struct Kubectl {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Kubectl {
    /// `None` (after saying why) when kubectl isn't installed, unless
    /// `CI=true`, where that fails the test.
    pub fn new(api: &FakeApi) -> Option<Self> {
        Self::with_token(api, "fake-api-token")
    }

    /// kubectl authenticating with `token`: one registered with
    /// [`FakeApi::add_token`] is held to that user's RBAC.
    pub fn with_token(api: &FakeApi, token: &str) -> Option<Self> {
        let installed = std::process::Command::new(KUBECTL)
            .args(["version", "--client"])
            .output()
            .is_ok_and(|out| out.status.success());
        if !installed {
            let why = "kubectl is not installed (https://kubernetes.io/docs/tasks/tools/)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and {why}"
            );
            eprintln!("skipping: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = api.write_kubeconfig_as(dir.path(), "kubeconfig", token);
        Some(Kubectl { dir, kubeconfig })
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(KUBECTL);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .kill_on_drop(true);
        command
    }

    /// Runs kubectl to completion; panics with its output if it fails.
    pub async fn run(&self, args: &[&str]) -> String {
        let out = self.output(args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn output(&self, args: &[&str]) -> Output {
        tokio::time::timeout(WAIT, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish"))
            .expect("kubectl runs")
    }

    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write a manifest");
        path.to_string_lossy().into_owned()
    }
}
