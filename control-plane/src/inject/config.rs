//! `--inject-config`: what every injected proxy gets unless a pod's
//! annotations say otherwise. YAML, camelCase, every field optional; an
//! unknown field is refused (a typo would otherwise be a silent default).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::annotations::check_quantity;

/// How the proxy treats plaintext inbound connections (`TRELLIS_INBOUND_MODE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    Strict,
    /// The default of injected pods: kubelet probes reach apps in plaintext.
    #[default]
    Permissive,
}

impl InboundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            InboundMode::Strict => "strict",
            InboundMode::Permissive => "permissive",
        }
    }
}

/// The Kubernetes image pull policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// A container's `resources`: quantities by resource name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// The proxy's image; it also runs `trellis-proxy init`.
    pub proxy_image: String,
    pub image_pull_policy: PullPolicy,
    /// `TRELLIS_CONTROLLER`; by default the controller's Service in the
    /// mesh's namespace (see [`Config::controller_address_in`]).
    pub controller_address: Option<String>,
    /// The proxy's user; `trellis-proxy init` exempts its traffic.
    pub proxy_uid: u32,
    pub inbound_mode: InboundMode,
    /// The proxy's `RUST_LOG`.
    pub log_level: String,
    pub resources: Resources,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_image: format!(
                "ghcr.io/trellis-mesh/trellis-proxy:{}",
                env!("CARGO_PKG_VERSION")
            ),
            image_pull_policy: PullPolicy::IfNotPresent,
            controller_address: None,
            proxy_uid: 2102,
            inbound_mode: InboundMode::Permissive,
            log_level: "info".into(),
            resources: Resources {
                requests: BTreeMap::from([
                    ("cpu".into(), "10m".into()),
                    ("memory".into(), "20Mi".into()),
                ]),
                limits: BTreeMap::from([("memory".into(), "250Mi".into())]),
            },
        }
    }
}

/// Why an injection configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the injection configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The text is not YAML of the expected shape (names the field).
    #[error("the injection configuration {origin} is invalid: {reason}; every field is optional: proxyImage, imagePullPolicy, controllerAddress, proxyUid, inboundMode, logLevel, resources")]
    Parse { origin: String, reason: String },
    /// A field parses but its value cannot work.
    #[error("the injection configuration {origin}: {field} is {value:?}; expected {expected}")]
    Value {
        origin: String,
        field: String,
        value: String,
        expected: &'static str,
    },
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and checks `text`; `origin` names it in errors. An empty
    /// document is the defaults.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                reason: e.to_string(),
            })?
        };
        config.check(origin)?;
        Ok(config)
    }

    fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, value: &str, expected| ConfigError::Value {
            origin: origin.to_string(),
            field: field.to_string(),
            value: value.to_string(),
            expected,
        };
        if self.proxy_image.is_empty() || self.proxy_image.contains(char::is_whitespace) {
            return Err(bad("proxyImage", &self.proxy_image, "an image reference"));
        }
        if let Some(address) = &self.controller_address {
            if !address.starts_with("https://") {
                return Err(bad(
                    "controllerAddress",
                    address,
                    "an https:// URL of the controller's gRPC port",
                ));
            }
        }
        if self.proxy_uid == 0 {
            return Err(bad("proxyUid", "0", "a non-root user id"));
        }
        for (kind, map) in [
            ("requests", &self.resources.requests),
            ("limits", &self.resources.limits),
        ] {
            for (name, value) in map {
                if check_quantity(value).is_err() {
                    return Err(bad(
                        &format!("resources.{kind}.{name}"),
                        value,
                        "a Kubernetes quantity such as 100m, 0.5 or 64Mi",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `TRELLIS_CONTROLLER` for proxies of a mesh whose controller runs in
    /// `mesh_namespace`.
    pub fn controller_address_in(&self, mesh_namespace: &str) -> String {
        self.controller_address
            .clone()
            .unwrap_or_else(|| format!("https://trellis-controller.{mesh_namespace}.svc:8090"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_optional_and_camel_case() {
        assert_eq!(Config::from_yaml("", "x").unwrap(), Config::default());
        let config = Config::from_yaml(
            "proxyImage: reg.example/proxy:1\nimagePullPolicy: Always\nproxyUid: 1234\ninboundMode: strict\nresources:\n  requests: {cpu: 50m}\n",
            "x",
        )
        .unwrap();
        assert_eq!(config.proxy_image, "reg.example/proxy:1");
        assert_eq!(config.image_pull_policy, PullPolicy::Always);
        assert_eq!(config.proxy_uid, 1234);
        assert_eq!(config.inbound_mode, InboundMode::Strict);
        assert_eq!(config.resources.requests["cpu"], "50m");
        assert!(config.resources.limits.is_empty());
        assert_eq!(config.log_level, "info");
        assert_eq!(
            config.controller_address_in("mesh"),
            "https://trellis-controller.mesh.svc:8090"
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_by_name() {
        let error = Config::from_yaml("proxyImg: x\n", "inject.yaml").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("proxyImg") && text.contains("inject.yaml"),
            "{text}"
        );
        let error = Config::from_yaml("resources: {limits: {memory: lots}}\n", "f").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("resources.limits.memory") && text.contains("\"lots\""),
            "{text}"
        );
        let error = Config::from_yaml("controllerAddress: http://c:8090\n", "f").unwrap_err();
        assert!(error.to_string().contains("https://"), "{error}");
        let error = Config::from_yaml("inboundMode: loose\n", "f").unwrap_err();
        assert!(error.to_string().contains("loose"), "{error}");
    }
}
