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
    /// The files do not hold a usable issuer, or the objects' issuer
    /// fails the CA's checks.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The Secret or the ConfigMap is not shaped as the CA needs: its
    /// type, a missing key, not text.
    #[error(transparent)]
    Malformed(CaError),
    /// The Secret or the ConfigMap does not exist.
    #[error("{object} does not exist; create it: {create}")]
    Missing { object: String, create: String },
    /// The API server could not be asked.
    #[error("cannot read {object}: {source}")]
    Api {
        object: String,
        source: Box<kube::Error>,
    },
    /// A watch of the Secret or the ConfigMap failed (it is retried).
    #[error("watching {object}: {source}")]
    Watch {
        object: String,
        source: Box<watcher::Error>,
    },
}

/// Where the issuer comes from.
pub enum IssuerSource {
    /// Local mode: the files of the state directory.
    Files(PathBuf),
    /// Cluster mode: the Secret and the ConfigMap.
    Cluster(Box<ClusterIssuer>),
}

impl IssuerSource {
    pub fn cluster(client: Client, namespace: &str) -> Self {
        Self::Cluster(Box::new(ClusterIssuer {
            namespace: namespace.to_string(),
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
        }))
    }

    /// The CA as it is now. Local mode creates a root and an issuer on
    /// first start; cluster mode needs both objects to exist.
    pub async fn open(&self, trust_domain: &str) -> Result<Ca, IssuerError> {
        match self {
            Self::Files(dir) => Ok(Ca::load_or_create(dir, trust_domain)?),
            Self::Cluster(cluster) => Ok(Ca::new(trust_domain, cluster.read().await?)?),
        }
    }

    /// Follows the issuer from now on.
    pub fn changes(self) -> IssuerChanges {
        IssuerChanges(match self {
            Self::Files(dir) => Changes::Files {
                dir,
                tick: tokio::time::interval(FILES_INTERVAL),
            },
            Self::Cluster(cluster) => Changes::Cluster {
                events: cluster.watch(),
                cluster,
                secret: None,
                roots: None,
            },
        })
    }
}

/// The issuer's versions as they come.
pub struct IssuerChanges(Changes);

enum Changes {
    Files {
        dir: PathBuf,
        tick: tokio::time::Interval,
    },
    Cluster {
        cluster: Box<ClusterIssuer>,
        /// Both watches, merged.
        events: BoxStream<'static, Result<Seen, IssuerError>>,
        /// The latest of each object.
        secret: Option<Box<Secret>>,
        roots: Option<Box<ConfigMap>>,
    },
}

impl IssuerChanges {
    /// The issuer and bundle at their next possible change (files: the
    /// next second; objects: the next event of either, the first list
    /// included).
    pub async fn next(&mut self) -> Result<IssuerMaterial, IssuerError> {
        match &mut self.0 {
            Changes::Files { dir, tick } => {
                tick.tick().await;
                Ok(IssuerMaterial::from_dir(dir)?)
            }
            Changes::Cluster {
                cluster,
                events,
                secret,
                roots,
            } => loop {
                match events.next().await {
                    Some(Ok(Seen::Secret(latest))) => *secret = Some(latest),
                    Some(Ok(Seen::Roots(latest))) => *roots = Some(latest),
                    Some(Err(e)) => return Err(e),
                    // Unreachable: watchers retry forever.
                    None => std::future::pending().await,
                }
                if let (Some(secret), Some(roots)) = (secret.as_deref(), roots.as_deref()) {
                    return cluster
                        .material(secret, roots)
                        .map_err(IssuerError::Malformed);
                }
            },
        }
    }
}

/// The latest Secret or ConfigMap a watch reported.
enum Seen {
    Secret(Box<Secret>),
    Roots(Box<ConfigMap>),
}

/// The cluster-mode issuer: the Secret and the ConfigMap, each watched by
/// name; a watch re-lists after any failure with kube-runtime's backoff.
/// Deleting either changes nothing: the last good issuer signs until they
/// are back.
pub struct ClusterIssuer {
    namespace: String,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
}

impl ClusterIssuer {
    fn secret_name(&self) -> String {
        secret_name(&self.namespace)
    }

    fn roots_name(&self) -> String {
        roots_name(&self.namespace)
    }

    /// Both watches, merged; they start when first polled.
    fn watch(&self) -> BoxStream<'static, Result<Seen, IssuerError>> {
        let secrets = follow(&self.secrets, ISSUER_SECRET, self.secret_name(), |s| {
            Seen::Secret(Box::new(s))
        });
        let roots = follow(
            &self.config_maps,
            TRUST_ROOTS_CONFIG_MAP,
            self.roots_name(),
            |c| Seen::Roots(Box::new(c)),
        );
        stream::select(secrets, roots).boxed()
    }

    /// Reads both objects now.
    pub async fn read(&self) -> Result<IssuerMaterial, IssuerError> {
        let ns = &self.namespace;
        let secret = get(&self.secrets, ISSUER_SECRET, self.secret_name(), || {
            format!("kubectl -n {ns} create secret tls {ISSUER_SECRET} --cert=issuer.crt --key=issuer.key")
        });
        let roots = get(
            &self.config_maps,
            TRUST_ROOTS_CONFIG_MAP,
            self.roots_name(),
            || {
                format!("kubectl -n {ns} create configmap {TRUST_ROOTS_CONFIG_MAP} --from-file={BUNDLE_KEY}=roots.crt")
            },
        );
        self.material(&secret.await?, &roots.await?)
            .map_err(IssuerError::Malformed)
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

/// The object `name` (`object` in errors; `create` says how to make it).
async fn get<K>(
    api: &Api<K>,
    name: &str,
    object: String,
    create: impl FnOnce() -> String,
) -> Result<K, IssuerError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(IssuerError::Missing {
            object,
            create: create(),
        }),
        Err(source) => Err(IssuerError::Api {
            object,
            source: Box::new(source),
        }),
    }
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
                source: Box::new(source),
            })
        })
        .boxed()
}
