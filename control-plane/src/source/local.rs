//! The local source: a directory of Kubernetes manifests, hot-reloaded.
//!
//! Each file is all-or-nothing: a file that does not parse or validate is
//! rejected with an error naming it, and its last good content keeps serving.
//!
//! A reload that would delete objects waits until the directory has not
//! changed for [`SETTLE`]: an editor that truncates a file and then writes
//! it (instead of renaming a new one over it) shows a reader an empty or
//! half-written file for a moment, and applying that at once would remove
//! its Services and fail their traffic. Additions and changes apply at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::manifest::{self, ManifestError};
use crate::model::Object;
use crate::store::Store;

/// How often the directory is re-read. Polling is cheap for a directory of
/// manifests and behaves the same on every filesystem (editors that replace
/// files, bind mounts, ConfigMap symlink swaps).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long the directory must stay unchanged before a reload that
/// deletes objects is applied.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Loads a manifest directory into a store and keeps it in sync.
pub struct LocalSource {
    dir: PathBuf,
    store: Arc<Store>,
    /// Contents as last read, to skip work when nothing changed.
    seen: BTreeMap<PathBuf, String>,
    /// The last accepted objects of each file.
    good: BTreeMap<PathBuf, Vec<Object>>,
    errors: watch::Sender<Vec<ManifestError>>,
    /// How long deletions wait for the directory to settle ([`SETTLE`]).
    settle: Duration,
    /// When the directory's contents last changed.
    changed_at: Instant,
    /// Deletions are held until the directory settles: reload even when
    /// nothing changed.
    deletions_held: bool,
}

impl LocalSource {
    pub fn new(dir: impl Into<PathBuf>, store: Arc<Store>) -> Self {
        Self {
            dir: dir.into(),
            store,
            seen: BTreeMap::new(),
            good: BTreeMap::new(),
            errors: watch::channel(Vec::new()).0,
            settle: SETTLE,
            changed_at: Instant::now(),
            deletions_held: false,
        }
    }

    /// The same source with another settle time (tests).
    pub fn settling_for(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The problems of the last reload (empty when every file was accepted).
    pub fn errors(&self) -> watch::Receiver<Vec<ManifestError>> {
        self.errors.subscribe()
    }

    /// Reads the directory once and applies what changed. Returns an error
    /// only when the directory itself cannot be read.
    pub fn reload(&mut self) -> std::io::Result<()> {
        let current = read_manifests(&self.dir)?;
        let changed = current != self.seen;
        if !changed && !self.deletions_held {
            return Ok(());
        }
        if changed {
            self.changed_at = Instant::now();
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
        // Each problem is logged once, when it appears (or changes): the
        // errors watch has the current ones.
        let previous = self.errors.borrow().clone();
        for e in errors.iter().filter(|e| !previous.contains(e)) {
            tracing::error!(file = %e.file.display(), error = %e, "manifest rejected; keeping the last good version");
        }
        self.deletions_held = false;
        let removed = removed(&self.good, &candidate);
        if !removed.is_empty() && self.changed_at.elapsed() < self.settle {
            if changed {
                tracing::warn!(
                    dir = %self.dir.display(),
                    objects = removed.len(),
                    settle = ?self.settle,
                    "a reload would delete objects; deleting them once the directory has not changed for the settle time (write manifests atomically, by renaming a complete file into place)"
                );
            }
            self.deletions_held = true;
            for (file, object) in removed {
                candidate.entry(file).or_default().push(object);
            }
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

/// The objects of `good` that `candidate` no longer has (by kind and key:
/// an object that moved to another file is not removed), with their file.
fn removed(
    good: &BTreeMap<PathBuf, Vec<Object>>,
    candidate: &BTreeMap<PathBuf, Vec<Object>>,
) -> Vec<(PathBuf, Object)> {
    let kept: std::collections::BTreeSet<_> = candidate
        .values()
        .flatten()
        .map(|o| (o.kind(), o.key()))
        .collect();
    good.iter()
        .flat_map(|(file, objects)| objects.iter().map(move |o| (file, o)))
        .filter(|(_, o)| !kept.contains(&(o.kind(), o.key())))
        .map(|(file, o)| (file.clone(), o.clone()))
        .collect()
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

/// Every YAML document of `dir`'s manifest files, as JSON, with its file:
/// for tools that report on objects the controller refused (a file that is
/// not YAML at all has none).
pub fn documents(dir: &Path) -> std::io::Result<Vec<(PathBuf, serde_json::Value)>> {
    Ok(read_manifests(dir)?
        .into_iter()
        .flat_map(|(file, contents)| {
            let documents: Vec<serde_json::Value> =
                serde_saphyr::from_multiple(&contents).unwrap_or_default();
            documents
                .into_iter()
                .filter(|d| !d.is_null())
                .map(move |d| (file.clone(), d))
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

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: default}\nspec: {ports: [{port: 8080}]}\n";
    const WORLD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: world, namespace: default}\nspec: {ports: [{port: 8080}]}\n";

    fn names(store: &Store) -> Vec<String> {
        store.objects().iter().map(ToString::to_string).collect()
    }

    /// What a subscriber writes, kept to be counted.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_rejected_manifest_is_logged_once_however_often_the_directory_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new("cluster.local");
        let mut source = LocalSource::new(dir.path(), store.clone());
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let rejections = || {
            String::from_utf8_lossy(&log.0.lock().unwrap())
                .matches("manifest rejected")
                .count()
        };
        tracing::subscriber::with_default(subscriber, || {
            std::fs::write(dir.path().join("bad.yaml"), "kind: Service\nspec: [\n").unwrap();
            source.reload().unwrap();
            assert_eq!(rejections(), 1);
            // Other files change, the directory reloads, the bad file stays.
            for i in 0..3 {
                std::fs::write(dir.path().join("hello.yaml"), format!("{HELLO}# {i}\n")).unwrap();
                source.reload().unwrap();
            }
            assert_eq!(names(&store), ["Service default/hello"]);
            assert_eq!(rejections(), 1, "an outstanding error is not logged again");
            // A new problem in the same file is.
            std::fs::write(dir.path().join("bad.yaml"), "kind: Nonsense\n").unwrap();
            source.reload().unwrap();
            assert_eq!(rejections(), 2);
        });
    }

    #[test]
    fn a_truncated_file_deletes_its_objects_only_once_the_directory_settles() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hello.yaml");
        let store = Store::new("cluster.local");
        let settle = Duration::from_millis(300);
        let mut source = LocalSource::new(dir.path(), store.clone()).settling_for(settle);
        std::fs::write(&file, HELLO).unwrap();
        source.reload().unwrap();
        assert_eq!(names(&store), ["Service default/hello"]);

        // A truncate-and-write save: first empty…
        std::fs::write(&file, "").unwrap();
        source.reload().unwrap();
        assert_eq!(
            names(&store),
            ["Service default/hello"],
            "held while the file changes"
        );
        std::thread::sleep(settle / 3);
        // …then complete again, with an addition, which applies at once.
        std::fs::write(&file, format!("{HELLO}---\n{WORLD}")).unwrap();
        source.reload().unwrap();
        assert_eq!(
            names(&store),
            ["Service default/hello", "Service default/world"]
        );

        // A real deletion waits out the settle time, then applies.
        std::fs::write(&file, WORLD).unwrap();
        source.reload().unwrap();
        assert_eq!(
            names(&store),
            ["Service default/hello", "Service default/world"]
        );
        std::thread::sleep(settle / 3);
        source.reload().unwrap();
        assert_eq!(names(&store).len(), 2, "not settled yet");
        std::thread::sleep(settle);
        source.reload().unwrap();
        assert_eq!(names(&store), ["Service default/world"]);
        std::fs::remove_file(&file).unwrap();
        source.reload().unwrap();
        assert_eq!(names(&store), ["Service default/world"]);
        std::thread::sleep(settle);
        source.reload().unwrap();
        assert!(names(&store).is_empty());
    }
}
