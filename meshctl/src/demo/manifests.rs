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

fn service(name: &str, cluster_ip: Option<&str>, port: u16, target_port: u16) -> String {
    let cluster_ip = cluster_ip.map_or_else(String::new, |ip| format!("  clusterIP: {ip}\n"));
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
{cluster_ip}  ports:
    - name: http
      port: {port}
      targetPort: {target_port}
      appProtocol: http
"
    )
}

/// The EndpointSlice `name` of `service`: the `(pod name, pod IP)`
/// endpoints, each serving the app on `port`.
fn endpoint_slice(name: &str, service: &str, pods: &[(&str, Ipv4Addr)], port: u16) -> String {
    let mut endpoints = String::new();
    for (pod, ip) in pods {
        endpoints.push_str(&format!(
            "  - addresses: [\"{ip}\"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: {pod}, namespace: {NAMESPACE}}}
"
        ));
    }
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
endpoints:
{endpoints}ports:
  - name: http
    port: {port}
    appProtocol: http
"
    )
}

/// A meshed Pod (it has the `trellis-proxy` container beside the app's
/// `image`) labelled `app` and, if given, `version`, whose sidecar takes
/// mTLS on `ip`:[`INBOUND_PORT`].
fn pod(
    name: &str,
    (app, image): (&str, &str),
    version: Option<&str>,
    service_account: &str,
    ip: Ipv4Addr,
) -> String {
    let version = version.map_or_else(String::new, |v| format!("    version: {v}\n"));
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    app: {app}
{version}  annotations:
    trellis.dev/inbound-port: \"{INBOUND_PORT}\"
spec:
  serviceAccountName: {service_account}
  containers:
    - name: {app}
      image: {image}
    - name: trellis-proxy
      image: trellis-proxy
status:
  podIP: {ip}
"
    )
}

/// The whole demo mesh as one multi-document YAML file.
pub fn render(pods: &[DemoPod]) -> String {
    let slice = |service: &str, pick: fn(&DemoPod) -> bool| {
        let endpoints: Vec<_> = pods
            .iter()
            .filter(|p| pick(p))
            .map(|p| (p.name, p.ip))
            .collect();
        endpoint_slice(&format!("{service}-demo"), service, &endpoints, APP_PORT)
    };
    let mut docs = vec![
        service("frontend", Some("10.96.0.10"), APP_PORT, APP_PORT),
        service("hello", Some("10.96.0.20"), APP_PORT, APP_PORT),
        service("hello-v1", Some("10.96.0.21"), APP_PORT, APP_PORT),
        service("hello-v2", Some("10.96.0.22"), APP_PORT, APP_PORT),
        slice("frontend", |p| p.app == "frontend"),
        slice("hello", |p| p.app == "hello"),
        slice("hello-v1", |p| p.name == "hello-v1"),
        slice("hello-v2", |p| p.name == "hello-v2"),
    ];
    docs.extend(pods.iter().map(|p| {
        let image = format!("trellis-demo/{}", p.app);
        pod(
            p.name,
            (p.app, &image),
            Some(p.version),
            p.service_account,
            p.ip,
        )
    }));
    docs.join("---\n")
}

/// An HTTPRoute sending all of `service`'s traffic to the `backend`
/// Service (on [`APP_PORT`]), as `meshctl route set SERVICE --backend
/// BACKEND=100` writes it.
pub fn route_all_to(service: &str, backend: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {service}
  namespace: {NAMESPACE}
spec:
  parentRefs:
    - group: \"\"
      kind: Service
      name: {service}
  rules:
    - backendRefs:
        - name: {backend}
          port: {APP_PORT}
          weight: 1
"
    )
}

/// The file `meshctl route set SERVICE` writes the route of `service` to.
pub fn route_file(service: &str) -> String {
    format!("route-{NAMESPACE}-{service}.yaml")
}

/// An application of the user's that `meshctl proxy` meshes: a Service
/// `name` on `port`, one endpoint (its sidecar, at `pod_ip`) and its Pod.
#[derive(Clone, Debug)]
pub struct OwnApp<'a> {
    pub name: &'a str,
    pub service_account: &'a str,
    pub version: Option<&'a str>,
    /// The sidecar's address, the pod IP of the Pod.
    pub pod_ip: Ipv4Addr,
    /// The Service port callers name.
    pub port: u16,
    /// The port the application listens on.
    pub app_port: u16,
}

/// The Service, EndpointSlice and Pod of an [`OwnApp`], one YAML file.
pub fn render_own_app(app: &OwnApp) -> String {
    let slice_name = format!("{}-meshctl-proxy", app.name);
    [
        service(app.name, None, app.port, app.app_port),
        endpoint_slice(
            &slice_name,
            app.name,
            &[(app.name, app.pod_ip)],
            app.app_port,
        ),
        // A process on this machine, not an image; the field names what runs.
        pod(
            app.name,
            (app.name, "local-process"),
            app.version,
            app.service_account,
            app.pod_ip,
        ),
    ]
    .join("---\n")
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

    #[test]
    fn the_route_to_one_backend_sends_it_everything() {
        let pods = pods([127, 0, 9]);
        let mut objects =
            manifest::parse(std::path::Path::new("demo.yaml"), &render(&pods)).unwrap();
        let file = std::path::PathBuf::from(route_file("hello"));
        let route = manifest::parse(&file, &route_all_to("hello", "hello-v1")).unwrap();
        let all: Vec<_> = objects.iter().chain(&route).collect();
        manifest::validate(&file, &route, &all).unwrap();
        objects.extend(route);
        let store = Store::new("cluster.local");
        store.replace_all(objects);
        let rules = store.routes(HELLO_AUTHORITY, "default").rules;
        let backends: Vec<_> = rules[0].backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(backends, ["hello-v1"]);
    }

    #[test]
    fn an_own_app_joins_the_demo_behind_its_sidecar() {
        let app = OwnApp {
            name: "web",
            service_account: "web-sa",
            version: Some("v3"),
            pod_ip: Ipv4Addr::new(127, 0, 9, 77),
            port: 80,
            app_port: 18080,
        };
        let demo = manifest::parse(
            std::path::Path::new("demo.yaml"),
            &render(&pods([127, 0, 9])),
        );
        let own = manifest::parse(std::path::Path::new("web.yaml"), &render_own_app(&app));
        let (demo, own) = (demo.unwrap(), own.unwrap());
        let all: Vec<_> = demo.iter().chain(&own).collect();
        manifest::validate(std::path::Path::new("web.yaml"), &own, &all).unwrap();
        let store = Store::new("cluster.local");
        store.replace_all(demo.into_iter().chain(own));
        // Callers name the Service port; the sidecar gets the app's port.
        let web = store.resolve("web.default.svc.cluster.local:80").unwrap();
        let endpoints: Vec<_> = web.endpoints.values().collect();
        assert_eq!(endpoints.len(), 1);
        let endpoint = endpoints[0];
        assert_eq!(endpoint.ip, "127.0.9.77");
        assert_eq!(endpoint.port, 18080);
        assert_eq!(endpoint.proxy_port, u32::from(INBOUND_PORT));
        assert_eq!(
            endpoint.identity,
            "spiffe://cluster.local/ns/default/sa/web-sa"
        );
        assert_eq!(
            endpoint.labels.get("version").map(String::as_str),
            Some("v3")
        );
        assert!(store
            .resolve("web.default.svc.cluster.local:18080")
            .is_none());
    }
}
