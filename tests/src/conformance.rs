//! The Gateway API mesh conformance setup, as upstream's
//! `conformance/mesh/manifests.yaml` defines it, with real sidecars: pods
//! `echo-v1` and `echo-v2` in namespace `gateway-conformance-mesh` behind
//! the Services `echo` (both), `echo-v1` and `echo-v2` (port 80, and
//! 8080 as `http-alt`), each pod running an echo app that answers with
//! what it received; and a client pod in the consumer namespace.
//!
//! As upstream, requests come from `echo-v1`'s own sidecar (a producer
//! client) or from the consumer namespace's pod. Hosts name Services as
//! `name.namespace` because the clients use their sidecar as an explicit
//! proxy (there is no DNS search path to resolve a bare `echo`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{eventually, Answer, AppClient, Mesh};

pub const MESH_NS: &str = "gateway-conformance-mesh";
pub const CONSUMER_NS: &str = "gateway-conformance-mesh-consumer";

/// A Service of the conformance namespace as a client names it.
pub fn svc(name: &str) -> String {
    format!("{name}.{MESH_NS}")
}

/// What the echo app received, as upstream's echo server reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Echoed {
    pub method: String,
    pub path: String,
    pub host: String,
    /// Lower-case names, values in the order received.
    pub headers: BTreeMap<String, Vec<String>>,
    pub namespace: String,
    pub pod: String,
}

impl Echoed {
    /// A header's values joined by commas, as upstream compares them.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|values| values.join(","))
    }
}

/// Answers every request with an [`Echoed`] as JSON at once, and reads
/// its body meanwhile (as servers do: one that answers and closes with
/// the body unread resets the connection, and its client may lose the
/// answer).
pub fn echo_http_app(listener: TcpListener, pod: &str, namespace: &str) {
    let (pod, namespace) = (pod.to_string(), namespace.to_string());
    tokio::spawn(trellis_common::serve::serve(
        listener,
        move |request: http::Request<hyper::body::Incoming>| {
            let (request, body) = request.into_parts();
            let request = http::Request::from_parts(request, ());
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in request.headers() {
                headers
                    .entry(name.as_str().to_string())
                    .or_default()
                    .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
            let host = request
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| headers.get("host").and_then(|h| h.first().cloned()))
                .unwrap_or_default();
            let echoed = Echoed {
                method: request.method().to_string(),
                path: request
                    .uri()
                    .path_and_query()
                    .map_or("/".into(), |p| p.to_string()),
                host,
                headers,
                namespace: namespace.clone(),
                pod: pod.clone(),
            };
            async move {
                let _ = body.collect().await;
                let mut response = http::Response::new(Full::new(Bytes::from(
                    serde_json::to_vec(&echoed).unwrap_or_default(),
                )));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            }
        },
    ));
}

/// One echo pod and its sidecar.
pub struct EchoPod {
    pub name: &'static str,
    pub ip: IpAddr,
    pub proxy: trellis_proxy::Proxy,
}

pub struct ConformanceMesh {
    pub mesh: Mesh,
    pub echo: Vec<EchoPod>,
    /// The consumer namespace's client pod.
    pub consumer: trellis_proxy::Proxy,
    /// The port the echo apps listen on (the Services' targetPort).
    pub app_port: u16,
    /// The Services' `grpc` port (7070) goes to this port of the pods,
    /// where a gRPC test starts its servers (`grpc_conformance.py`).
    pub grpc_port: u16,
}

impl std::ops::Deref for ConformanceMesh {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl ConformanceMesh {
    pub async fn start() -> Self {
        Self::populate(Mesh::start().await).await
    }

    pub async fn populate(mut mesh: Mesh) -> Self {
        let mut echo = Vec::new();
        let mut app_port = 0;
        for name in ["echo-v1", "echo-v2"] {
            let ip = mesh.pod_ip();
            let listener = TcpListener::bind((ip, app_port)).await.expect("bind echo");
            app_port = listener.local_addr().expect("echo addr").port();
            echo_http_app(listener, name, MESH_NS);
            let proxy = mesh
                .proxy_in(ip, MESH_NS, "default", |env| {
                    env.insert(trellis_proxy::config::WORKLOAD, "echo".into());
                    env.insert(trellis_proxy::config::POD, name.into());
                })
                .await;
            echo.push(EchoPod { name, ip, proxy });
        }
        // Free on the first pod's address, so on the second's too (their
        // addresses are this test's alone).
        let grpc_port = std::net::TcpListener::bind((echo[0].ip, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let consumer_ip = mesh.pod_ip();
        let consumer = mesh
            .proxy_in(consumer_ip, CONSUMER_NS, "default", |env| {
                env.insert(trellis_proxy::config::POD, "consumer".into());
            })
            .await;
        let this = Self {
            mesh,
            echo,
            consumer,
            app_port,
            grpc_port,
        };
        this.mesh.write_manifest("mesh.yaml", &this.manifests());
        let ready = |client: AppClient| async move {
            for service in ["echo", "echo-v1", "echo-v2"] {
                let host = format!("{service}.{MESH_NS}");
                eventually(Duration::from_secs(5), "the mesh serves echo", || {
                    let client = client.clone();
                    let host = host.clone();
                    async move {
                        match client.get(&host, "/").await {
                            Ok(a) if a.status == 200 => Ok(()),
                            other => Err(format!("{host}: {other:?}")),
                        }
                    }
                })
                .await;
            }
        };
        ready(this.client()).await;
        ready(this.consumer_client()).await;
        this
    }

    /// The pods and Services of upstream's mesh manifests.
    fn manifests(&self) -> String {
        let (port, grpc) = (self.app_port, self.grpc_port);
        let mut docs = Vec::new();
        for namespace in [MESH_NS, CONSUMER_NS] {
            docs.push(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
            ));
        }
        for pod in &self.echo {
            let version = &pod.name[pod.name.len() - 2..];
            docs.push(format!(
                "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {MESH_NS}
  labels: {{app: echo, version: {version}}}
  annotations: {{trellis.dev/inbound-port: \"{inbound}\"}}
spec:
  containers: [{{name: echo, image: echo}}, {{name: trellis-proxy, image: trellis-proxy}}]
",
                name = pod.name,
                inbound = pod.proxy.inbound_addr.port(),
            ));
        }
        let services: [(&str, &[&EchoPod]); 3] = [
            ("echo", &[&self.echo[0], &self.echo[1]]),
            ("echo-v1", &[&self.echo[0]]),
            ("echo-v2", &[&self.echo[1]]),
        ];
        for (service, pods) in services {
            let endpoints: String = pods
                .iter()
                .map(|p| {
                    format!(
                        "  - addresses: [\"{}\"]\n    targetRef: {{kind: Pod, name: {}, namespace: {MESH_NS}}}\n",
                        p.ip, p.name
                    )
                })
                .collect();
            docs.push(format!(
                "apiVersion: v1
kind: Service
metadata: {{name: {service}, namespace: {MESH_NS}}}
spec:
  ports:
    - {{name: http, port: 80, appProtocol: http, targetPort: {port}}}
    - {{name: http-alt, port: 8080, appProtocol: http, targetPort: {port}}}
    - {{name: grpc, port: 7070, appProtocol: grpc, targetPort: {grpc}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-1
  namespace: {MESH_NS}
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
endpoints:
{endpoints}ports:
  - {{name: http, port: {port}, appProtocol: http}}
  - {{name: http-alt, port: {port}, appProtocol: http}}
  - {{name: grpc, port: {grpc}, appProtocol: grpc}}
"
            ));
        }
        docs.join("---\n")
    }

    /// A client in the Services' own namespace: `echo-v1`'s sidecar.
    pub fn client(&self) -> AppClient {
        AppClient::http1(self.echo[0].proxy.outbound_addr)
    }

    /// A client in the consumer namespace.
    pub fn consumer_client(&self) -> AppClient {
        AppClient::http1(self.consumer.outbound_addr)
    }

    /// Applies a test's manifests (upstream's per-test YAML).
    pub fn apply(&self, name: &str, yaml: &str) {
        self.mesh.write_manifest(name, yaml);
    }
}

/// What a recording pod received: method, path and body.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Bytes)>>>;

/// A meshed pod with its Service (port 80) in the conformance namespace
/// whose app waits its delay, then reads the request, records it and
/// answers 200: a mirror, or a slow backend.
pub struct Recorder {
    pub seen: Seen,
    _proxy: trellis_proxy::Proxy,
}

impl ConformanceMesh {
    /// Adds the pod `name` and its Service `name`, whose app waits `delay`
    /// before it reads a request.
    pub async fn recorder(&mut self, name: &str, delay: Duration) -> Recorder {
        use http_body_util::BodyExt;
        let ip = self.mesh.pod_ip();
        let listener = TcpListener::bind((ip, 0)).await.expect("bind recorder");
        let port = listener.local_addr().expect("recorder addr").port();
        let seen = Seen::default();
        let record = seen.clone();
        tokio::spawn(trellis_common::serve::serve(
            listener,
            move |request: http::Request<hyper::body::Incoming>| {
                let record = record.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    let (head, body) = request.into_parts();
                    if let Ok(body) = body.collect().await {
                        let seen = (head.method.to_string(), head.uri.path().to_string());
                        let mut log = record.lock().unwrap_or_else(|e| e.into_inner());
                        log.push((seen.0, seen.1, body.to_bytes()));
                    }
                    http::Response::new(Full::new(Bytes::from_static(b"recorded\n")))
                }
            },
        ));
        let proxy = self
            .mesh
            .proxy_in(ip, MESH_NS, "default", |env| {
                env.insert(trellis_proxy::config::WORKLOAD, name.into());
                env.insert(trellis_proxy::config::POD, name.into());
            })
            .await;
        self.apply(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {MESH_NS}
  labels: {{app: {name}}}
  annotations: {{trellis.dev/inbound-port: \"{inbound}\"}}
spec:
  containers: [{{name: app, image: app}}, {{name: trellis-proxy, image: trellis-proxy}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {MESH_NS}}}
spec:
  ports: [{{name: http, port: 80, appProtocol: http, targetPort: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {MESH_NS}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints:
  - addresses: [\"{ip}\"]
    targetRef: {{kind: Pod, name: {name}, namespace: {MESH_NS}}}
ports: [{{name: http, port: {port}, appProtocol: http}}]
",
                inbound = proxy.inbound_addr.port(),
            ),
        );
        Recorder {
            seen,
            _proxy: proxy,
        }
    }
}

/// One case of an upstream conformance table: a request, and what must
/// come back (from which backend, seen how).
#[derive(Debug, Clone, Default)]
pub struct Case {
    pub name: &'static str,
    pub host: String,
    pub method: &'static str,
    pub path: &'static str,
    pub headers: Vec<(&'static str, &'static str)>,
    pub status: u16,
    /// The pod that must answer, by name prefix (`echo-v1`…); empty: any,
    /// or none for a response the sidecar gives itself (a redirect).
    pub backend: &'static str,
    /// Response headers that must be present with these values, and ones
    /// that must be absent.
    pub response_headers: Vec<(&'static str, &'static str)>,
    pub absent_response_headers: Vec<&'static str>,
    /// What the backend must have seen.
    pub seen_path: Option<&'static str>,
    pub seen_host: Option<String>,
    pub seen_headers: Vec<(&'static str, &'static str)>,
    pub absent_seen_headers: Vec<&'static str>,
    /// A redirect's `Location`.
    pub location: Option<String>,
}

impl Case {
    /// A GET of `path` on `host` that must get a 200.
    pub fn get(name: &'static str, host: impl Into<String>, path: &'static str) -> Self {
        Case {
            name,
            host: host.into(),
            method: "GET",
            path,
            status: 200,
            ..Case::default()
        }
    }

    /// Sends the request once and checks the answer.
    pub async fn check(&self, client: &AppClient) -> Result<(), String> {
        let method = http::Method::from_bytes(self.method.as_bytes()).expect("method");
        let answer = client
            .request(method, &self.host, self.path, &self.headers, Bytes::new())
            .await?;
        self.verify(&answer).map_err(|e| {
            format!(
                "{}: {e}; got {} {}",
                self.name,
                answer.status,
                answer.text()
            )
        })
    }

    fn verify(&self, answer: &Answer) -> Result<(), String> {
        if answer.status.as_u16() != self.status {
            return Err(format!(
                "status {} instead of {}",
                answer.status, self.status
            ));
        }
        for (name, value) in &self.response_headers {
            let got = answer.headers.get(*name).and_then(|v| v.to_str().ok());
            if got != Some(value) {
                return Err(format!("response header {name} is {got:?}, not {value:?}"));
            }
        }
        if let Some(name) = self
            .absent_response_headers
            .iter()
            .find(|n| answer.headers.contains_key(**n))
        {
            return Err(format!("response header {name} must be absent"));
        }
        if let Some(location) = &self.location {
            let got = answer
                .headers
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok());
            if got != Some(location.as_str()) {
                return Err(format!("Location is {got:?}, not {location:?}"));
            }
        }
        let needs_echo = !self.backend.is_empty()
            || self.seen_path.is_some()
            || self.seen_host.is_some()
            || !self.seen_headers.is_empty()
            || !self.absent_seen_headers.is_empty();
        if !needs_echo {
            return Ok(());
        }
        let echoed: Echoed = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("not an echo answer ({e})"))?;
        if !echoed.pod.starts_with(self.backend) {
            return Err(format!("answered by {}, not {}", echoed.pod, self.backend));
        }
        if let Some(path) = self.seen_path {
            if echoed.path != path {
                return Err(format!(
                    "the backend saw path {:?}, not {path:?}",
                    echoed.path
                ));
            }
        }
        if let Some(host) = &self.seen_host {
            if &echoed.host != host {
                return Err(format!(
                    "the backend saw host {:?}, not {host:?}",
                    echoed.host
                ));
            }
        }
        for (name, value) in &self.seen_headers {
            let got = echoed.header(name);
            if got.as_deref() != Some(*value) {
                return Err(format!("the backend saw {name}: {got:?}, not {value:?}"));
            }
        }
        if let Some(name) = self
            .absent_seen_headers
            .iter()
            .find(|n| echoed.header(n).is_some())
        {
            return Err(format!("the backend saw {name}, which must be absent"));
        }
        Ok(())
    }
}

/// httproute-request-header-modifier's filters, by path prefix: the
/// `requestHeaderModifier` of each rule (on the rule, or on its backendRef
/// in the `-backend` variant).
pub const HEADER_MODIFIER_RULES: [(&str, &str); 5] = [
    ("/set", "{set: [{name: X-Header-Set, value: set-overwrites-values}]}"),
    ("/add", "{add: [{name: X-Header-Add, value: add-appends-values}]}"),
    ("/remove", "{remove: [X-Header-Remove]}"),
    (
        "/multiple",
        "{set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}], \
         add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}, \
         {name: X-Header-Add-3, value: header-add-3}], remove: [X-Header-Remove-1, X-Header-Remove-2]}",
    ),
    (
        "/case-insensitivity",
        "{set: [{name: X-Header-Set, value: header-set}], add: [{name: X-Header-Add, value: header-add}], \
         remove: [X-Header-Remove]}",
    ),
];

/// httproute-request-header-modifier's table, for the rules above routed to
/// `backend` of the Service at `host`.
pub fn header_modifier_cases(host: &str, backend: &'static str) -> Vec<Case> {
    let case = |path: &'static str,
                sent: Vec<(&'static str, &'static str)>,
                seen: Vec<(&'static str, &'static str)>,
                absent: Vec<&'static str>| Case {
        backend,
        headers: sent,
        seen_path: Some(path),
        seen_headers: seen,
        absent_seen_headers: absent,
        ..Case::get(path, host, path)
    };
    let other = ("Some-Other-Header", "val");
    vec![
        case(
            "/set",
            vec![other],
            vec![other, ("X-Header-Set", "set-overwrites-values")],
            vec![],
        ),
        case(
            "/set",
            vec![other, ("X-Header-Set", "some-other-value")],
            vec![other, ("X-Header-Set", "set-overwrites-values")],
            vec![],
        ),
        case(
            "/add",
            vec![other],
            vec![other, ("X-Header-Add", "add-appends-values")],
            vec![],
        ),
        case(
            "/add",
            vec![other, ("X-Header-Add", "some-other-value")],
            vec![
                other,
                ("X-Header-Add", "some-other-value,add-appends-values"),
            ],
            vec![],
        ),
        case(
            "/remove",
            vec![("X-Header-Remove", "val")],
            vec![],
            vec!["X-Header-Remove"],
        ),
        case(
            "/multiple",
            vec![
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
            vec![
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
            ],
            vec!["X-Header-Remove-1", "X-Header-Remove-2"],
        ),
        case(
            "/case-insensitivity",
            vec![
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
            vec![
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
            ],
            vec!["x-header-remove", "X-Header-Remove"],
        ),
    ]
}

/// Upstream's "eventually consistent" check: the case must pass, then
/// keep passing for three requests in a row (a route that is still
/// settling fails the streak and it starts again).
pub async fn expect(client: &AppClient, case: &Case) {
    eventually(Duration::from_secs(10), case.name, || async {
        for _ in 0..3 {
            case.check(client).await?;
        }
        Ok(())
    })
    .await;
}

/// Every case, in order.
pub async fn expect_all(client: &AppClient, cases: &[Case]) {
    for case in cases {
        expect(client, case).await;
    }
}
