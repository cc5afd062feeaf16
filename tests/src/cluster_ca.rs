//! The mesh's CA as a cluster holds it: an operator's CA directory (made
//! as local mode makes one) published to the API server as the issuer
//! Secret and the roots ConfigMap in the controller's namespace, which a
//! cluster-mode controller signs with.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use serde_json::{json, Value};
use trellis_control_plane::controller::{ControllerConfig, Source};
use trellis_control_plane::identity::{
    Ca, BUNDLE, BUNDLE_KEY, ISSUER_SECRET, TRUST_ROOTS_CONFIG_MAP,
};
use trellis_proto::{CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT};

use crate::fake_api::FakeApi;
use crate::TRUST_DOMAIN;

/// Points `config` at `api` (cluster mode), with the CA of its state
/// directory (created on first use) published as the issuer's Secret and
/// the roots' ConfigMap. Replicas configured from one directory share them.
pub fn in_cluster(config: &mut ControllerConfig, api: &FakeApi) {
    let url = api.url().parse().expect("the fake API's URL");
    config.source = Source::Cluster(Box::new(kube::Config::new(url)));
    publish_ca(api, &config.state_dir);
}

/// The controller's service account as the API server names the user the
/// token [`authenticate_as_controller`] sends.
pub fn controller_user() -> String {
    format!("system:serviceaccount:{CONTROLLER_NAMESPACE}:{CONTROLLER_SERVICE_ACCOUNT}")
}

const CONTROLLER_API_TOKEN: &str = "trellis-controller-api-token";

/// Makes the controller `config` points at `api` send its service
/// account's token, so the fake holds it to the RBAC stored there.
pub fn authenticate_as_controller(config: &mut ControllerConfig, api: &FakeApi) {
    api.add_token(
        CONTROLLER_API_TOKEN,
        &controller_user(),
        &[crate::fake_api::API_SERVER_AUDIENCE],
        true,
    );
    if let Source::Cluster(kube) = &mut config.source {
        kube.auth_info.token = Some(CONTROLLER_API_TOKEN.to_string().into());
    }
}

/// Publishes the CA in `dir` (created on first use) as the issuer's
/// Secret and the roots' ConfigMap, in the controller's namespace.
pub fn publish_ca(api: &FakeApi, dir: &Path) {
    Ca::load_or_create(dir, TRUST_DOMAIN).expect("the operator's CA");
    api.apply(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CONTROLLER_NAMESPACE},
    }));
    publish_issuer(api, dir);
    publish_roots(api, dir);
}

/// The Secret `trellis-identity-issuer` of type `type_` with `tls.crt`
/// and `tls.key`.
pub fn issuer_secret(type_: &str, cert: &str, key: &str) -> Value {
    let data = [("tls.crt", cert), ("tls.key", key)]
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())));
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(ISSUER_SECRET.into()),
            namespace: Some(CONTROLLER_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        type_: Some(type_.into()),
        data: Some(BTreeMap::from(data)),
        ..Secret::default()
    };
    serde_json::to_value(secret).expect("a Secret")
}

/// Applies the issuer of the CA in `dir` as the Secret.
pub fn publish_issuer(api: &FakeApi, dir: &Path) {
    let read = |file| std::fs::read_to_string(dir.join(file)).expect("the issuer's files");
    api.apply(issuer_secret(
        "kubernetes.io/tls",
        &read("issuer.crt"),
        &read("issuer.key"),
    ));
}

/// Applies the trust bundle of the CA in `dir` as the ConfigMap.
pub fn publish_roots(api: &FakeApi, dir: &Path) {
    let bundle = std::fs::read_to_string(dir.join(BUNDLE)).expect("the trust bundle");
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_ROOTS_CONFIG_MAP.into()),
            namespace: Some(CONTROLLER_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(BUNDLE_KEY.to_string(), bundle)])),
        ..ConfigMap::default()
    };
    api.apply(serde_json::to_value(config_map).expect("a ConfigMap"));
}
