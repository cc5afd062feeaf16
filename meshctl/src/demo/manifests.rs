//! The demo mesh as ordinary Kubernetes manifests: a `frontend` calling the
//! `hello` Service, served by pods `hello-v1` and `hello-v2` (with per-version
//! Services `hello-v1` and `hello-v2` for routing).

use std::net::Ipv4Addr;

/// One pod of the demo, with its own loopback address as pod IP.
#[derive(Clone, Debug)]
pub struct DemoPod {
    pub name: &'static str,
    pub app: &'static str,
    pub version: &'static str,
    pub service_account: &'static str,
    pub ip: Ipv4Addr,
}

pub const APP_PORT: u16 = 8080;
pub const OUTBOUND_PORT: u16 = 4140;
pub const INBOUND_PORT: u16 = 4143;
pub const ADMIN_PORT: u16 = 4191;
pub const NAMESPACE: &str = "default";
pub const HELLO_AUTHORITY: &str = "hello.default.svc.cluster.local:8080";

/// The pods of a demo whose addresses start at `base` (`base.2`, `.3`, …).
pub fn pods(base: [u8; 3]) -> Vec<DemoPod> {
    let ip = |last| Ipv4Addr::new(base[0], base[1], base[2], last);
    vec![
        DemoPod {
            name: "frontend",
            app: "frontend",
            version: "v1",
            service_account: "frontend",
            ip: ip(2),
        },
        DemoPod {
            name: "hello-v1",
            app: "hello",
            version: "v1",
            service_account: "hello",
            ip: ip(3),
        },
        DemoPod {
            name: "hello-v2",
            app: "hello",
            version: "v2",
            service_account: "hello",
            ip: ip(4),
        },
    ]
}

fn service(name: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  clusterIP: {cluster_ip}
  ports:
    - name: http
      port: {APP_PORT}
      targetPort: {APP_PORT}
      appProtocol: http
"
    )
}

fn endpoint_slice(service: &str, pods: &[&DemoPod]) -> String {
    let mut endpoints = String::new();
    for pod in pods {
        endpoints.push_str(&format!(
            "  - addresses: [\"{}\"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: {}, namespace: {NAMESPACE}}}
",
            pod.ip, pod.name
        ));
    }
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-demo
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
endpoints:
{endpoints}ports:
  - name: http
    port: {APP_PORT}
    appProtocol: http
"
    )
}

fn pod(pod: &DemoPod) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    app: {app}
    version: {version}
  annotations:
    trellis.dev/inbound-port: \"{INBOUND_PORT}\"
spec:
  serviceAccountName: {sa}
  containers:
    - name: {app}
      image: trellis-demo/{app}
    - name: trellis-proxy
      image: trellis-proxy
status:
  podIP: {ip}
",
        name = pod.name,
        app = pod.app,
        version = pod.version,
        sa = pod.service_account,
        ip = pod.ip,
    )
}

/// The whole demo mesh as one multi-document YAML file.
pub fn render(pods: &[DemoPod]) -> String {
    let by_app = |app: &str| pods.iter().filter(|p| p.app == app).collect::<Vec<_>>();
    let by_name = |name: &str| pods.iter().filter(|p| p.name == name).collect::<Vec<_>>();
    let mut docs = vec![
        service("frontend", "10.96.0.10"),
        service("hello", "10.96.0.20"),
        service("hello-v1", "10.96.0.21"),
        service("hello-v2", "10.96.0.22"),
        endpoint_slice("frontend", &by_app("frontend")),
        endpoint_slice("hello", &by_app("hello")),
        endpoint_slice("hello-v1", &by_name("hello-v1")),
        endpoint_slice("hello-v2", &by_name("hello-v2")),
    ];
    docs.extend(pods.iter().map(pod));
    docs.join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_control_plane::source::manifest;
    use trellis_control_plane::store::Store;

    #[test]
    fn demo_manifests_load_and_resolve() {
        let pods = pods([127, 0, 9]);
        let objects = manifest::parse(std::path::Path::new("demo.yaml"), &render(&pods)).unwrap();
        let all: Vec<_> = objects.iter().collect();
        manifest::validate(std::path::Path::new("demo.yaml"), &objects, &all).unwrap();
        let store = Store::new("cluster.local");
        store.replace_all(objects);
        let hello = store.resolve(HELLO_AUTHORITY).unwrap();
        assert_eq!(hello.endpoints.len(), 2);
        assert!(hello
            .endpoints
            .values()
            .all(|e| e.identity == "spiffe://cluster.local/ns/default/sa/hello"));
        assert_eq!(
            store
                .resolve("hello-v2.default:8080")
                .unwrap()
                .endpoints
                .len(),
            1
        );
    }
}
