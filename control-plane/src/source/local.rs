//! The local source: a directory of Kubernetes manifests, hot-reloaded.
//!
//! Each file is all-or-nothing: a file that does not parse or validate is
//! rejected with an error naming it, and its last good content keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::manifest::{self, ManifestError};
use crate::model::Object;
use crate::store::Store;

/// How often the directory is re-read. Polling is cheap for a directory of
/// manifests and behaves the same on every filesystem (editors that replace
/// files, bind mounts, ConfigMap symlink swaps).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Loads a manifest directory into a store and keeps it in sync.
pub struct LocalSource {
    dir: PathBuf,
    store: Arc<Store>,
    /// Contents as last read, to skip work when nothing changed.
    seen: BTreeMap<PathBuf, String>,
    /// The last accepted objects of each file.
    good: BTreeMap<PathBuf, Vec<Object>>,
    errors: watch::Sender<Vec<ManifestError>>,
}

impl LocalSource {
    pub fn new(dir: impl Into<PathBuf>, store: Arc<Store>) -> Self {
        Self {
            dir: dir.into(),
            store,
            seen: BTreeMap::new(),
            good: BTreeMap::new(),
            errors: watch::channel(Vec::new()).0,
        }
    }

    /// The problems of the last reload (empty when every file was accepted).
    pub fn errors(&self) -> watch::Receiver<Vec<ManifestError>> {
        self.errors.subscribe()
    }

    /// Reads the directory once and applies what changed. Returns an error
    /// only when the directory itself cannot be read.
    pub fn reload(&mut self) -> std::io::Result<()> {
        let current = read_manifests(&self.dir)?;
        if current == self.seen {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut candidate: BTreeMap<PathBuf, Vec<Object>> = BTreeMap::new();
        for (file, contents) in &current {
            match manifest::parse(file, contents) {
                Ok(objects) => drop(candidate.insert(file.clone(), objects)),
                Err(e) => {
                    errors.push(e);
                    self.keep_last_good(file, &mut candidate);
                }
            }
        }
        // Rejecting a file can invalidate another (a Service removed with it),
        // so validate until nothing changes; each pass rejects at least one.
        loop {
            let mut rejected = manifest::duplicates(candidate.iter());
            let all: Vec<&Object> = candidate.values().flatten().collect();
            for (file, objects) in &candidate {
                if let Err(e) = manifest::validate(file, objects, &all) {
                    rejected.push(e);
                }
            }
            if rejected.is_empty() {
                break;
            }
            for e in rejected {
                let file = e.file.clone();
                if !errors.contains(&e) {
                    errors.push(e);
                }
                // A file rejected twice (its last good content no longer
                // validates either) is dropped.
                if candidate.get(&file) == self.good.get(&file) {
                    candidate.remove(&file);
                } else {
                    self.keep_last_good(&file, &mut candidate);
                }
            }
        }
        for e in &errors {
            tracing::error!(file = %e.file.display(), error = %e, "manifest rejected; keeping the last good version");
        }
        if candidate != self.good {
            let objects = candidate.values().flatten().cloned().collect::<Vec<_>>();
            tracing::info!(dir = %self.dir.display(), objects = objects.len(), "manifests loaded");
            self.store.replace_all(objects);
            self.good = candidate;
        }
        self.seen = current;
        self.errors.send_replace(errors);
        Ok(())
    }

    fn keep_last_good(&self, file: &Path, candidate: &mut BTreeMap<PathBuf, Vec<Object>>) {
        match self.good.get(file) {
            Some(objects) => drop(candidate.insert(file.to_path_buf(), objects.clone())),
            None => drop(candidate.remove(file)),
        }
    }

    /// Reloads forever, every `POLL_INTERVAL`.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.reload() {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the manifest directory");
            }
        }
    }
}

/// One file's objects, or why it was rejected.
pub type Parsed = Result<Vec<Object>, ManifestError>;

/// Parses every manifest file of `dir` (without validating across files),
/// for tools that read the directory the controller serves.
pub fn parse_dir(dir: &Path) -> std::io::Result<Vec<(PathBuf, Parsed)>> {
    Ok(read_manifests(dir)?
        .into_iter()
        .map(|(file, contents)| {
            let parsed = manifest::parse(&file, &contents);
            (file, parsed)
        })
        .collect())
}

/// Writes a file of a manifest directory so its readers (this source,
/// `meshctl`) see the old contents or the new, never half: through a hidden
/// temporary file, which the source does not read.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// `*.yaml`, `*.yml` and `*.json` files directly in `dir`, hidden files and
/// editors' temporary files excluded.
fn read_manifests(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, String>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if !manifest || name.starts_with('.') || !path.is_file() {
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(contents) => drop(files.insert(path, contents)),
            // Removed between listing and reading: it is simply gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}
