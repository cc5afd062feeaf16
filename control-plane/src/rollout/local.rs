//! Local mode's API for rollouts: the manifest directory. A rollout's
//! route is a manifest file like any other (the controller's own source
//! reads it back); its status lives in `.status/` beside the manifests
//! (hidden, so the source does not read it as a manifest), written only by
//! the controller and atomically, so `meshctl` may read it at any time.

use std::path::{Path, PathBuf};

use crate::model::{HttpRoute, Object, ObjectKey, Rollout, RolloutStatus};
use crate::source::local::parse_dir;

use super::WriteError;

/// The directory of rollout statuses in a manifest directory.
pub const STATUS_DIR: &str = ".status";

/// Where the status of rollout `key` is kept.
pub fn status_file(manifests: &Path, key: &ObjectKey) -> PathBuf {
    manifests
        .join(STATUS_DIR)
        .join(format!("rollout-{}-{}.json", key.namespace, key.name))
}

/// The file `meshctl rollout start` writes a rollout to.
pub fn rollout_file(manifests: &Path, key: &ObjectKey) -> PathBuf {
    manifests.join(format!("rollout-{}-{}.yaml", key.namespace, key.name))
}

/// The last status the controller wrote for `key`, if any (an unreadable
/// one counts as none: the rollout starts over rather than guess).
pub fn read_status(manifests: &Path, key: &ObjectKey) -> Option<RolloutStatus> {
    let bytes = std::fs::read(status_file(manifests, key)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), WriteError> {
    crate::source::local::write_atomically(path, contents).map_err(|source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub struct LocalApi {
    pub manifests: PathBuf,
}

impl LocalApi {
    pub fn write_status(
        &self,
        rollout: &Rollout,
        status: &RolloutStatus,
    ) -> Result<(), WriteError> {
        let json = serde_json::to_vec_pretty(status).unwrap_or_default();
        write_atomically(
            &status_file(&self.manifests, &rollout.metadata.key()),
            &json,
        )
    }

    pub fn read_status(&self, rollout: &Rollout) -> Option<RolloutStatus> {
        read_status(&self.manifests, &rollout.metadata.key())
    }

    /// Writes the route into the file that holds it now (adopting it), or
    /// into a file of its own.
    pub fn apply_route(&self, rollout: &Rollout, route: &HttpRoute) -> Result<(), WriteError> {
        let key = route.metadata.key();
        let io = |source| WriteError::Io {
            path: self.manifests.clone(),
            source,
        };
        let holder = parse_dir(&self.manifests)
            .map_err(io)?
            .into_iter()
            .find(|(_, parsed)| {
                parsed.as_ref().is_ok_and(|objects| {
                    objects
                        .iter()
                        .any(|o| matches!(o, Object::HttpRoute(r) if r.metadata.key() == key))
                })
            });
        let file = match holder {
            Some((file, Ok(objects))) if objects.len() > 1 => {
                return Err(WriteError::SharedFile { file, route: key })
            }
            Some((file, _)) => file,
            None => self.manifests.join(format!(
                "rollout-{}-{}-route.yaml",
                key.namespace, rollout.metadata.name
            )),
        };
        let yaml = serde_saphyr::to_string(route).map_err(|e| WriteError::Io {
            path: file.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let header = format!(
            "# Managed by the Trellis controller for rollout {}; edit the rollout, not this file.\n",
            rollout.metadata.key()
        );
        write_atomically(&file, format!("{header}{yaml}").as_bytes())
    }
}
