//! Where `meshctl` finds the mesh it talks to: the demo records its manifest
//! directory and addresses in a context file, so a second terminal can run
//! `meshctl route set …` without flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The context file; `TRELLIS_CONTEXT` overrides `~/.trellis/context.json`.
pub fn path() -> PathBuf {
    if let Some(path) = std::env::var_os("TRELLIS_CONTEXT") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".trellis").join("context.json")
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// The manifest directory the controller serves (local mode).
    pub manifests: PathBuf,
    /// The controller's gRPC address.
    pub controller: String,
    /// Admin URLs of the proxies, by pod name.
    #[serde(default)]
    pub proxies: Vec<(String, String)>,
    /// The process that wrote it (the demo), so it removes only its own.
    #[serde(default)]
    pub pid: u32,
    /// The controller's state directory (CA, bootstrap token key), where
    /// `meshctl proxy` and `meshctl token` find what proves an identity.
    #[serde(default)]
    pub state_dir: PathBuf,
    /// The mesh's trust domain, for SPIFFE IDs.
    #[serde(default)]
    pub trust_domain: String,
}

/// Why there is no running demo to join.
#[derive(Debug, thiserror::Error)]
pub enum NoDemo {
    #[error("no demo is running (no {}); start `meshctl demo` in another terminal first", .0.display())]
    Missing(PathBuf),
    #[error("reading {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the demo that wrote {} (pid {pid}) is no longer running; start `meshctl demo` again", path.display())]
    Stopped { path: PathBuf, pid: u32 },
    #[error("{} was written by an older meshctl demo, without its state directory; restart `meshctl demo`", .0.display())]
    Old(PathBuf),
}

/// The manifest directory to work on: `given`, or the running demo's.
pub fn manifests_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    if let Some(dir) = given {
        return Ok(dir.to_path_buf());
    }
    let path = self::path();
    match Context::load(&path).with_context(|| format!("reading {}", path.display()))? {
        Some(context) => Ok(context.manifests),
        None => anyhow::bail!(
            "no mesh to talk to: pass --manifests DIR (the controller's manifest directory), \
             or start `meshctl demo` first"
        ),
    }
}

impl Context {
    pub fn load(path: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The context of the demo running now: it exists, its demo is alive,
    /// and it names the state directory.
    pub fn running(path: &Path) -> Result<Self, NoDemo> {
        let context = Self::load(path)
            .map_err(|source| NoDemo::Unreadable {
                path: path.to_path_buf(),
                source,
            })?
            .ok_or_else(|| NoDemo::Missing(path.to_path_buf()))?;
        if !process_alive(context.pid) {
            return Err(NoDemo::Stopped {
                path: path.to_path_buf(),
                pid: context.pid,
            });
        }
        if context.state_dir.as_os_str().is_empty() || context.trust_domain.is_empty() {
            return Err(NoDemo::Old(path.to_path_buf()));
        }
        Ok(context)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }

    /// Removes the file if this process wrote it.
    pub fn remove_own(path: &Path) {
        if let Ok(Some(context)) = Self::load(path) {
            if context.pid == std::process::id() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Whether process `pid` exists (signal 0 finds it; EPERM means it exists
/// but is someone else's).
pub fn process_alive(pid: u32) -> bool {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    pid.is_some_and(|pid| rustix::process::test_kill_process(pid) != Err(rustix::io::Errno::SRCH))
}
