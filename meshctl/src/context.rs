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
