//! What injection adds to a pod: the `trellis-init` init container, the
//! `trellis-proxy` native sidecar and their volumes. The parts that are the
//! same for every pod are built once, in [`Parts::new`].

use serde_json::{json, Map, Value};

use super::annotations::Overrides;
use super::config::Config;
use super::{INIT_CONTAINER, PROXY_CONTAINER, TOKEN_VOLUME, XTABLES_VOLUME};
use crate::identity::AUDIENCE;

/// The proxy's admin port: probes, metrics.
const ADMIN_PORT: u16 = crate::model::DEFAULT_ADMIN_PORT;
const INBOUND_PORT: u16 = 4143;
const OUTBOUND_PORT: u16 = 4140;
const TOKEN_DIR: &str = "/var/run/secrets/trellis.dev/serviceaccount";
/// How long the projected token lives; the kubelet rotates it at 80 %.
const TOKEN_SECONDS: u64 = 3600;

/// Who the pod is, as its proxy names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub identity: String,
    pub name: String,
    pub version: Option<String>,
}

/// The parts of every injection that depend only on the configuration.
#[derive(Debug)]
pub struct Parts {
    config: Config,
    /// `TRELLIS_*` variables every proxy gets, in order.
    static_env: Vec<Value>,
    volumes: [Value; 2],
}

impl Parts {
    pub fn new(config: Config, mesh_namespace: &str, trust_domain: &str) -> Self {
        let controller = trellis_proto::SpiffeId::new(
            trust_domain,
            mesh_namespace,
            trellis_proto::CONTROLLER_SERVICE_ACCOUNT,
        );
        let static_env = [
            (
                "TRELLIS_CONTROLLER",
                config.controller_address_in(mesh_namespace),
            ),
            ("TRELLIS_CONTROLLER_IDENTITY", controller.to_string()),
            ("TRELLIS_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
            // Both families, as `init` redirects both (a host without IPv6
            // makes the proxy skip the IPv6 addresses).
            (
                "TRELLIS_INBOUND_LISTEN",
                format!("0.0.0.0:{INBOUND_PORT},[::]:{INBOUND_PORT}"),
            ),
            (
                "TRELLIS_OUTBOUND_LISTEN",
                format!("127.0.0.1:{OUTBOUND_PORT},[::1]:{OUTBOUND_PORT}"),
            ),
            // Kubelet probes and Prometheus reach the admin port from outside.
            (
                "TRELLIS_ADMIN_LISTEN",
                format!("0.0.0.0:{ADMIN_PORT},[::]:{ADMIN_PORT}"),
            ),
            ("RUST_LOG", config.log_level.clone()),
        ]
        .into_iter()
        .map(|(name, value)| env(name, &value))
        .collect();
        let volumes = [
            json!({
                "name": TOKEN_VOLUME,
                "projected": {"sources": [{"serviceAccountToken": {
                    "audience": AUDIENCE,
                    "expirationSeconds": TOKEN_SECONDS,
                    "path": "token",
                }}]},
            }),
            // iptables takes its lock in /run; the root filesystem is read-only.
            json!({"name": XTABLES_VOLUME, "emptyDir": {}}),
        ];
        Self {
            config,
            static_env,
            volumes,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn volumes(&self) -> &[Value; 2] {
        &self.volumes
    }

    /// `[trellis-init, trellis-proxy]`, in the order they must run.
    pub fn init_containers(
        &self,
        workload: &Workload,
        trust_bundle: &str,
        overrides: &Overrides,
    ) -> [Value; 2] {
        let config = &self.config;
        let image = overrides
            .proxy_image
            .as_deref()
            .unwrap_or(&config.proxy_image);
        let resources = self.resources(overrides);
        let mut init_args = vec![
            json!("init"),
            json!("--proxy-uid"),
            json!(config.proxy_uid.to_string()),
        ];
        for (flag, value) in [
            ("--skip-inbound-ports", &overrides.skip_inbound_ports),
            ("--skip-outbound-ports", &overrides.skip_outbound_ports),
            ("--skip-outbound-cidrs", &overrides.skip_outbound_cidrs),
        ] {
            if let Some(value) = value {
                init_args.extend([json!(flag), json!(value.replace(' ', ""))]);
            }
        }
        let init = json!({
            "name": INIT_CONTAINER,
            "image": image,
            "imagePullPolicy": config.image_pull_policy.as_str(),
            "command": ["trellis-proxy"],
            "args": init_args,
            "resources": resources,
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
        });

        let mut env_list = self.static_env.clone();
        env_list.push(env("TRELLIS_CONTROLLER_TRUST_PEM", trust_bundle));
        env_list.push(env("TRELLIS_IDENTITY", &workload.identity));
        env_list.push(env("TRELLIS_WORKLOAD", &workload.name));
        // The controller finds the pod's authorization policy by its name.
        env_list.push(json!({
            "name": "TRELLIS_POD",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }));
        if let Some(version) = &workload.version {
            env_list.push(env("TRELLIS_VERSION", version));
        }
        let mode = overrides.inbound_mode.unwrap_or(config.inbound_mode);
        env_list.push(env("TRELLIS_INBOUND_MODE", mode.as_str()));
        if let Some(ports) = &overrides.opaque_ports {
            env_list.push(env("TRELLIS_OPAQUE_PORTS", &ports.replace(' ', "")));
        }
        let probe = |path: &str, period: u32, failures: u32| {
            json!({
                "httpGet": {"path": path, "port": ADMIN_PORT},
                "periodSeconds": period,
                "failureThreshold": failures,
            })
        };
        let proxy = json!({
            "name": PROXY_CONTAINER,
            "image": image,
            "imagePullPolicy": config.image_pull_policy.as_str(),
            "command": ["trellis-proxy"],
            "args": ["run"],
            // A native sidecar (Kubernetes ≥ 1.29): started before the
            // app containers, stopped after them, not waited for by Jobs.
            "restartPolicy": "Always",
            "env": env_list,
            "ports": [
                {"name": "trellis-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
                {"name": "trellis-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            ],
            "resources": resources,
            "securityContext": {
                "runAsUser": config.proxy_uid,
                "runAsGroup": config.proxy_uid,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            // App containers start once the proxy can route (a startup
            // probe holds the next container back).
            "startupProbe": probe("/ready", 1, 120),
            "livenessProbe": probe("/live", 10, 3),
            "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
        });
        [init, proxy]
    }

    fn resources(&self, overrides: &Overrides) -> Value {
        let merge = |base: &std::collections::BTreeMap<String, String>,
                     over: &std::collections::BTreeMap<&'static str, String>| {
            let mut map: Map<String, Value> =
                base.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            for (k, v) in over {
                map.insert(k.to_string(), json!(v));
            }
            map
        };
        let requests = merge(&self.config.resources.requests, &overrides.requests);
        let limits = merge(&self.config.resources.limits, &overrides.limits);
        let mut resources = Map::new();
        if !requests.is_empty() {
            resources.insert("requests".into(), Value::Object(requests));
        }
        if !limits.is_empty() {
            resources.insert("limits".into(), Value::Object(limits));
        }
        Value::Object(resources)
    }
}

fn env(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}
