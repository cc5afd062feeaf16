//! Where the CA's issuer and trust bundle are kept, and how their changes
//! are noticed: the state directory's files in local mode (read every
//! second), or in cluster mode the Secret [`ISSUER_SECRET`] (type
//! `kubernetes.io/tls`: `tls.crt`, `tls.key`) and the ConfigMap
//! [`TRUST_ROOTS_CONFIG_MAP`] (key [`BUNDLE_KEY`]) in the controller's
//! namespace, watched. Both only produce [`IssuerMaterial`]; checking it
//! and swapping it in is [`Ca::replace`]'s job, the same for both.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};

use super::ca::{Ca, CaError, IssuerMaterial, PemText};

/// The Secret holding the issuer's certificate and key.
pub const ISSUER_SECRET: &str = "trellis-identity-issuer";
/// The ConfigMap holding the trust bundle: the roots proxies trust, the
/// issuer's among them.
pub const TRUST_ROOTS_CONFIG_MAP: &str = "trellis-identity-trust-roots";
/// The ConfigMap's key with the PEM roots.
pub const BUNDLE_KEY: &str = "ca-bundle.crt";
const SECRET_TYPE: &str = "kubernetes.io/tls";
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";

/// How often the local-mode files are read for a rotated issuer or bundle.
const FILES_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// The files or objects do not hold a usable issuer.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The Secret or the ConfigMap does not exist.
    #[error("{object} does not exist; create it: {create}")]
    Missing { object: String, create: String },
    /// The API server could not be asked.
    #[error("cannot read {object}: {source}")]
    Api { object: String, source: kube::Error },
    /// A watch of the Secret or the ConfigMap failed (it is retried).
    #[error("watching {object}: {source}")]
    Watch {
        object: String,
        source: watcher::Error,
    },
}

/// Where the issuer comes from.
pub enum IssuerSource {
    /// Local mode: the files of the state directory.
    Files {
        dir: PathBuf,
        tick: tokio::time::Interval,
    },
    /// Cluster mode: the Secret and the ConfigMap.
    Cluster(ClusterIssuer),
}

impl IssuerSource {
    pub fn files(dir: PathBuf) -> Self {
        Self::Files {
            dir,
            tick: tokio::time::interval(FILES_INTERVAL),
        }
    }

    pub fn cluster(client: Client, namespace: &str) -> Self {
        Self::Cluster(ClusterIssuer::new(client, namespace))
    }

    /// The CA as it is now. Local mode creates a root and an issuer on
    /// first start; cluster mode needs both objects to exist.
    pub async fn open(&self, trust_domain: &str) -> Result<Ca, IssuerError> {
        match self {
            Self::Files { dir, .. } => Ok(Ca::load_or_create(dir, trust_domain)?),
            Self::Cluster(cluster) => Ok(Ca::new(trust_domain, cluster.read().await?)?),
        }
    }

    /// The issuer and bundle at their next possible change (for files:
    /// the next second; for objects: the next event of either).
    pub async fn next(&mut self) -> Result<IssuerMaterial, IssuerError> {
        match self {
            Self::Files { dir, tick } => {
                tick.tick().await;
                Ok(IssuerMaterial::from_dir(dir)?)
            }
            Self::Cluster(cluster) => cluster.next().await,
        }
    }
}

/// The latest Secret or ConfigMap a watch reported.
enum Seen {
    Secret(Box<Secret>),
    Roots(Box<ConfigMap>),
}

/// The cluster-mode issuer: the Secret and the ConfigMap, with a watch of
/// each (by name) that re-lists after any failure with kube-runtime's
/// backoff. Deleting either changes nothing: the last good issuer signs
/// until they are back.
pub struct ClusterIssuer {
    namespace: String,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    /// Both watches, merged; they start when first polled.
    changes: BoxStream<'static, Result<Seen, IssuerError>>,
    secret: Option<Box<Secret>>,
    roots: Option<Box<ConfigMap>>,
}

impl ClusterIssuer {
    pub fn new(client: Client, namespace: &str) -> Self {
        let secrets = Api::namespaced(client.clone(), namespace);
        let config_maps = Api::namespaced(client, namespace);
        let changes = stream::select(
            follow(&secrets, ISSUER_SECRET, secret_name(namespace), |s| {
                Seen::Secret(Box::new(s))
            }),
            follow(
                &config_maps,
                TRUST_ROOTS_CONFIG_MAP,
                roots_name(namespace),
                |c| Seen::Roots(Box::new(c)),
            ),
        )
        .boxed();
        Self {
            namespace: namespace.to_string(),
            secrets,
            config_maps,
            changes,
            secret: None,
            roots: None,
        }
    }

    fn secret_name(&self) -> String {
        secret_name(&self.namespace)
    }

    fn roots_name(&self) -> String {
        roots_name(&self.namespace)
    }

    /// Reads both objects now.
    pub async fn read(&self) -> Result<IssuerMaterial, IssuerError> {
        let ns = &self.namespace;
        let secret = self.secrets.get_opt(ISSUER_SECRET).await;
        let secret = secret
            .map_err(|source| IssuerError::Api {
                object: self.secret_name(),
                source,
            })?
            .ok_or_else(|| IssuerError::Missing {
                object: self.secret_name(),
                create: format!(
                    "kubectl -n {ns} create secret tls {ISSUER_SECRET} --cert=issuer.crt --key=issuer.key"
                ),
            })?;
        let roots = self.config_maps.get_opt(TRUST_ROOTS_CONFIG_MAP).await;
        let roots = roots
            .map_err(|source| IssuerError::Api {
                object: self.roots_name(),
                source,
            })?
            .ok_or_else(|| IssuerError::Missing {
                object: self.roots_name(),
                create: format!(
                    "kubectl -n {ns} create configmap {TRUST_ROOTS_CONFIG_MAP} --from-file={BUNDLE_KEY}=roots.crt"
                ),
            })?;
        Ok(self.material(&secret, &roots)?)
    }

    async fn next(&mut self) -> Result<IssuerMaterial, IssuerError> {
        loop {
            match self.changes.next().await {
                Some(Ok(Seen::Secret(secret))) => self.secret = Some(secret),
                Some(Ok(Seen::Roots(roots))) => self.roots = Some(roots),
                Some(Err(e)) => return Err(e),
                // Unreachable: watchers retry forever.
                None => std::future::pending().await,
            }
            if let (Some(secret), Some(roots)) = (&self.secret, &self.roots) {
                return Ok(self.material(secret, roots)?);
            }
        }
    }

    /// The issuer and bundle the objects hold, unchecked beyond their shape.
    fn material(&self, secret: &Secret, roots: &ConfigMap) -> Result<IssuerMaterial, CaError> {
        let secret_name = self.secret_name();
        let invalid = |origin: String, reason: String| CaError::Invalid { origin, reason };
        let type_ = secret.type_.as_deref().unwrap_or("Opaque");
        if type_ != SECRET_TYPE {
            return Err(invalid(
                secret_name,
                format!("its type is {type_}, not {SECRET_TYPE}; create it with `kubectl create secret tls`"),
            ));
        }
        let data = secret.data.as_ref();
        let entry = |key: &str| -> Result<PemText, CaError> {
            let origin = format!("{secret_name} key {key}");
            let bytes = data
                .and_then(|d| d.get(key))
                .ok_or_else(|| invalid(origin.clone(), "is missing".into()))?;
            let text = String::from_utf8(bytes.0.clone())
                .map_err(|_| invalid(origin.clone(), "is not PEM text".into()))?;
            Ok(PemText { origin, text })
        };
        let roots_origin = format!("{} key {BUNDLE_KEY}", self.roots_name());
        let bundle = roots
            .data
            .as_ref()
            .and_then(|d| d.get(BUNDLE_KEY))
            .ok_or_else(|| invalid(roots_origin.clone(), "is missing".into()))?;
        Ok(IssuerMaterial {
            cert: entry(CERT_KEY)?,
            key: entry(KEY_KEY)?,
            bundle: PemText {
                origin: roots_origin,
                text: bundle.clone(),
            },
        })
    }
}

fn secret_name(namespace: &str) -> String {
    format!("Secret {namespace}/{ISSUER_SECRET}")
}

fn roots_name(namespace: &str) -> String {
    format!("ConfigMap {namespace}/{TRUST_ROOTS_CONFIG_MAP}")
}

/// A watch of the object `name` (`object` in errors): every version of it
/// applied, from the first list on.
fn follow<K>(
    api: &Api<K>,
    name: &str,
    object: String,
    seen: fn(K) -> Seen,
) -> BoxStream<'static, Result<Seen, IssuerError>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api.clone(), config)
        .default_backoff()
        .applied_objects()
        .map(move |event| {
            event.map(seen).map_err(|source| IssuerError::Watch {
                object: object.clone(),
                source,
            })
        })
        .boxed()
}
