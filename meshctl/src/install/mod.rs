//! `meshctl install`: the Helm chart's manifests (charts/trellis), rendered
//! in Rust from the same values, for `kubectl apply -f -`. The mesh CA comes
//! from the values, a local-mode state directory (`--ca-dir`), or is made
//! fresh; the chart itself never generates keys.

mod manifests;
pub mod values;

use std::path::{Path, PathBuf};

use trellis_control_plane::identity::{self, Ca, IssuerMaterial, PemText};

pub use manifests::objects;
pub use values::{Values, ValuesError};

#[derive(clap::Args)]
pub struct InstallArgs {
    /// A values file, as for `helm install -f` (repeatable; later ones win).
    #[arg(short = 'f', long = "values")]
    values: Vec<PathBuf>,
    /// A value, as for `helm install --set` (e.g. controller.replicas=3).
    #[arg(long = "set")]
    set: Vec<String>,
    /// A local-mode state directory whose CA (bundle.crt, issuer.crt,
    /// issuer.key) the mesh signs with; without it a new root and issuer
    /// are made (printed into the issuer Secret: keep the output private).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// The mesh's namespace (Helm's release namespace).
    #[arg(long, short = 'n', default_value = trellis_proto::CONTROLLER_NAMESPACE)]
    namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Values(#[from] ValuesError),
    // Not a `source`: the CA's errors already print theirs.
    #[error("the mesh CA: {0} (--ca-dir takes a local-mode state directory with bundle.crt, issuer.crt and issuer.key; without it and the identity values a new CA is made)")]
    Ca(identity::CaError),
    #[error("cannot make a scratch directory for the new CA")]
    Scratch(#[source] std::io::Error),
    #[error("--ca-dir and identity.trustRoots both name the CA; pass one")]
    TwoCas,
    #[error("missing value {0}")]
    Missing(&'static str),
    #[error("cannot write the manifests as YAML")]
    Yaml(#[source] serde_saphyr::SerializeError),
}

pub fn run(args: InstallArgs) -> anyhow::Result<bool> {
    let manifests = render(&args)?;
    // An error, not a panic, when the reader has gone (`| head`).
    std::io::Write::write_all(&mut std::io::stdout().lock(), manifests.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write the manifests: {e}"))?;
    Ok(true)
}

/// The multi-document YAML `meshctl install` prints.
pub fn render(args: &InstallArgs) -> Result<String, InstallError> {
    let mut values = values::load(&args.values, &args.set)?;
    fill_ca(&mut values, args.ca_dir.as_deref())?;
    to_yaml(&objects(&values, &args.namespace))
}

impl InstallArgs {
    pub fn new(
        values: Vec<PathBuf>,
        set: Vec<String>,
        ca_dir: Option<PathBuf>,
        namespace: &str,
    ) -> Self {
        Self {
            values,
            set,
            ca_dir,
            namespace: namespace.to_string(),
        }
    }
}

/// Sets the identity values from `ca_dir`, or from a new CA when the values
/// name no trust roots; then requires what the chart requires.
fn fill_ca(values: &mut Values, ca_dir: Option<&Path>) -> Result<(), InstallError> {
    let given = !values.identity.trust_roots.is_empty();
    let scratch;
    let dir = match (ca_dir, given) {
        (Some(_), true) => return Err(InstallError::TwoCas),
        (Some(dir), false) => Some(dir),
        (None, false) if values.identity.issuer.external => {
            return Err(InstallError::Missing("identity.trustRoots (the roots the external issuer chains to): set it in a -f values file, or pass --ca-dir"));
        }
        (None, false) => {
            scratch = tempfile::tempdir().map_err(InstallError::Scratch)?;
            Ca::load_or_create(scratch.path(), &values.trust_domain).map_err(InstallError::Ca)?;
            Some(scratch.path())
        }
        (None, true) => None,
    };
    let identity = &mut values.identity;
    if let Some(dir) = dir {
        let material = IssuerMaterial::from_dir(dir).map_err(InstallError::Ca)?;
        identity.trust_roots = material.bundle.text;
        if !identity.issuer.external {
            identity.issuer.certificate = material.cert.text;
            identity.issuer.key = material.key.text;
        }
    }
    if !identity.issuer.external && identity.issuer.certificate.is_empty() {
        return Err(InstallError::Missing("identity.issuer.certificate (with identity.trustRoots given, the issuer's PEM too), or identity.issuer.external=true"));
    }
    if !identity.issuer.external && identity.issuer.key.is_empty() {
        return Err(InstallError::Missing(
            "identity.issuer.key (the issuer's private key PEM)",
        ));
    }
    if !identity.issuer.external {
        // Checked as the controller will check it, before it is installed.
        let pem = |origin: &str, text: &String| PemText {
            origin: origin.to_string(),
            text: text.clone(),
        };
        let material = IssuerMaterial {
            cert: pem("identity.issuer.certificate", &identity.issuer.certificate),
            key: pem("identity.issuer.key", &identity.issuer.key),
            bundle: pem("identity.trustRoots", &identity.trust_roots),
        };
        Ca::new(&values.trust_domain, material).map_err(InstallError::Ca)?;
    }
    Ok(())
}

fn to_yaml(objects: &[serde_json::Value]) -> Result<String, InstallError> {
    serde_saphyr::to_string_multiple(objects).map_err(InstallError::Yaml)
}
