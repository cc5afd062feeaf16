//! The chart's values as `meshctl install` takes them: the chart's own
//! `values.yaml` (embedded, so the defaults have one source), then each
//! `-f` file, then each `--set`, merged as Helm merges them, and read into
//! typed values that refuse unknown keys and wrong types (what the chart's
//! values.schema.json refuses too).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

/// The chart's defaults.
pub const DEFAULTS: &str = include_str!("../../../charts/trellis/values.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ValuesError {
    #[error("cannot read the values file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin} is not YAML")]
    Yaml {
        origin: String,
        source: Box<serde_saphyr::Error>,
    },
    #[error("--set {0:?} is not key=value (e.g. --set controller.replicas=3)")]
    Set(String),
    #[error("--set {0:?}: {1} is not a map of values")]
    SetPath(String, String),
    #[error("the values are wrong (charts/trellis/values.yaml has every key, values.schema.json their types)")]
    Invalid(#[source] serde_json::Error),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Values {
    pub trust_domain: String,
    pub controller: Controller,
    pub proxy: Proxy,
    pub webhook: Webhook,
    pub identity: Identity,
    pub monitoring: Monitoring,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Controller {
    pub replicas: u32,
    pub image: Image,
    pub log_level: String,
    /// Where rollout gates read metrics; empty: the proxies directly.
    pub prometheus_url: String,
    pub resources: Resources,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Proxy {
    pub image: Image,
    pub uid: u32,
    pub inbound_mode: InboundMode,
    pub log_level: String,
    pub resources: Resources,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum InboundMode {
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Image {
    pub repository: String,
    pub tag: String,
    pub pull_policy: PullPolicy,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Kubernetes ResourceRequirements: quantities by resource name.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

/// `100m`, `128Mi` or a plain number.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Quantity {
    Number(serde_json::Number),
    Text(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    pub failure_policy: FailurePolicy,
    pub timeout_seconds: u8,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
pub enum FailurePolicy {
    Fail,
    Ignore,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    pub trust_roots: String,
    pub issuer: Issuer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Issuer {
    pub external: bool,
    pub certificate: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Monitoring {
    pub pod_monitor: Monitor,
    pub service_monitor: Monitor,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Monitor {
    pub enabled: bool,
    pub interval: String,
    pub labels: BTreeMap<String, String>,
}

/// The defaults, then `files`, then `sets` (`key.path=value`).
pub fn load(files: &[PathBuf], sets: &[String]) -> Result<Values, ValuesError> {
    let mut values = parse(DEFAULTS, "the chart's values.yaml")?;
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|source| ValuesError::Read {
            path: path.clone(),
            source,
        })?;
        merge(&mut values, parse(&text, &path.display().to_string())?);
    }
    for set in sets {
        apply_set(&mut values, set)?;
    }
    serde_json::from_value(values).map_err(ValuesError::Invalid)
}

fn parse(text: &str, origin: &str) -> Result<Value, ValuesError> {
    let value: Value = serde_saphyr::from_str(text).map_err(|source| ValuesError::Yaml {
        origin: origin.to_string(),
        source: Box::new(source),
    })?;
    Ok(if value.is_null() {
        Value::Object(Default::default())
    } else {
        value
    })
}

/// Helm's merge: maps merge key by key, anything else replaces.
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// `a.b.c=value`, the value typed as Helm's --set types it (true/false,
/// integers, `null`, otherwise a string).
fn apply_set(values: &mut Value, set: &str) -> Result<(), ValuesError> {
    let (path, raw) = set
        .split_once('=')
        .filter(|(path, _)| !path.is_empty())
        .ok_or_else(|| ValuesError::Set(set.to_string()))?;
    let value = match raw {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        _ => raw
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(raw.to_string())),
    };
    let mut node = values;
    let mut walked = Vec::new();
    for key in path.split('.') {
        let Value::Object(map) = node else {
            return Err(ValuesError::SetPath(set.to_string(), walked.join(".")));
        };
        walked.push(key);
        node = map
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    *node = value;
    Ok(())
}
