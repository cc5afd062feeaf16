//! Transparent interception end to end: pods are network namespaces with
//! the sidecar's iptables rules, and the applications are unmodified
//! programs (nginx, curl, h2load, Python gRPC, socat) that dial Services by
//! ClusterIP without knowing a proxy is there.
//!
//! Needs root, iproute2, iptables and the applications; without them the
//! tests skip, except under `CI=true`, where they fail.

use std::process::Output;
use std::time::{Duration, Instant};

use std::net::IpAddr;

use trellis_tests::netns::{Pod, PodNetwork, ADMIN_PORT};
use trellis_tests::service_manifest;

const APPS: &[(&str, &str)] = &[
    ("nginx", "nginx-light"),
    ("curl", "curl"),
    ("socat", "socat"),
    ("h2load", "nghttp2-client"),
];

/// The ClusterIPs of the tests' Services (the controller answers for them;
/// nothing else routes them).
const HELLO_IP: &str = "10.96.0.10";
const FRONTEND_IP: &str = "10.96.0.20";
const ECHO_IP: &str = "10.96.0.30";
const GRPC_IP: &str = "10.96.0.40";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A Pod with the sidecar container (the controller meshes it).
fn meshed_pod(pod: &Pod, sa: &str, version: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {}
  labels: {{version: {version}}}
spec:
  serviceAccountName: {sa}
  containers: [{{name: app, image: nginx}}, {{name: trellis-proxy, image: trellis-proxy}}]
---
",
        pod.name
    )
}

/// A Service with a ClusterIP and its EndpointSlice over `pods`; each port
/// is `(name, port, appProtocol)`.
fn service(name: &str, cluster_ip: &str, ports: &[(&str, u16, &str)], pods: &[&Pod]) -> String {
    let endpoints: Vec<(&str, IpAddr)> = pods
        .iter()
        .map(|pod| (pod.name.as_str(), IpAddr::V4(pod.ip)))
        .collect();
    service_manifest(name, Some(cluster_ip), ports, &endpoints) + "---\n"
}

/// nginx answering `body` on 8080 (HTTP/1.1) and 8081 (HTTP/2 prior
/// knowledge), IPv4 and IPv6, or proxying to `upstream` when given.
fn nginx(pod: &mut Pod, body: &str, upstream: Option<(&str, &str)>) {
    let dir = pod.dir.display().to_string();
    let location = match upstream {
        Some((addr, host)) => format!(
            "proxy_pass http://{addr}; proxy_http_version 1.1; proxy_set_header Host {host}; \
             proxy_set_header Connection \"\";"
        ),
        None => format!("return 200 \"{body}\\n\";"),
    };
    let config = format!(
        "worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{}}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{ listen 8080; listen [::]:8080; location / {{ {location} }} }}
  server {{ listen 8081 http2; listen [::]:8081 http2; location / {{ return 200 \"{body} over h2\\n\"; }} }}
}}
"
    );
    let path = pod.dir.join("nginx.conf");
    std::fs::write(&path, config).expect("nginx config");
    pod.spawn(&["nginx", "-c", &path.display().to_string()]);
}

/// A client pod and two meshed `hello` versions (nginx) behind one
/// ClusterIP, with a Service per version for route backends.
struct HelloMesh {
    net: PodNetwork,
    client: Pod,
    v1: Pod,
    v2: Pod,
}

impl HelloMesh {
    async fn start() -> Option<Self> {
        let mut net = PodNetwork::start(APPS)?;
        let mut client = net.pod("client");
        let mut v1 = net.pod("hello-v1");
        let mut v2 = net.pod("hello-v2");
        nginx(&mut v1, "hello from v1", None);
        nginx(&mut v2, "hello from v2", None);
        let ports = [("http", 8080, ""), ("h2", 8081, "kubernetes.io/h2c")];
        net.write_manifest(
            "hello.yaml",
            &(meshed_pod(&client, "client", "v1")
                + &meshed_pod(&v1, "hello", "v1")
                + &meshed_pod(&v2, "hello", "v2")
                + &service("hello", HELLO_IP, &ports, &[&v1, &v2])
                + &service("hello-v1", "10.96.0.11", &ports, &[&v1])
                + &service("hello-v2", "10.96.0.12", &ports, &[&v2])),
        )
        .await;
        net.sidecar(&mut client, "client", &[]).await;
        net.sidecar(&mut v1, "hello", &[]).await;
        net.sidecar(&mut v2, "hello", &[]).await;
        v1.wait_listening(8080).await;
        v2.wait_listening(8080).await;
        Some(Self {
            net,
            client,
            v1,
            v2,
        })
    }
}

/// `count` GETs over one keep-alive connection; the bodies, one per line.
async fn curl(pod: &Pod, url: &str, count: usize, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["curl", "-sS", "--max-time", "10", "-w", "\n"];
    args.extend(extra);
    args.extend(std::iter::repeat_n(url, count));
    let out = pod.run(&args).await;
    assert!(out.status.success(), "curl {url} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The Prometheus exposition of a pod's sidecar, fetched from the node.
async fn metrics(net: &PodNetwork, pod: &Pod) -> String {
    let url = format!("http://{}/metrics", pod.addr(ADMIN_PORT));
    let out = net
        .node_command("curl", &["-sS", "--max-time", "5", &url])
        .await;
    assert!(out.status.success(), "scraping {url}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sum of the samples of `family` whose labels contain every fragment.
fn sum(exposition: &str, family: &str, fragments: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(family) && fragments.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The requests a sidecar served over mTLS with a 200 to service account
/// `sa`'s verified identity.
fn mtls_from(exposition: &str, sa: &str) -> f64 {
    let peer = format!("peer_identity=\"spiffe://cluster.local/ns/default/sa/{sa}\"");
    let filter = [
        "direction=\"inbound\"",
        "tls=\"true\"",
        &peer,
        "status_code=\"200\"",
    ];
    sum(exposition, "trellis_requests_total", &filter)
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_a_cluster_ip_over_mtls_and_routes_apply() {
    let Some(mesh) = HelloMesh::start().await else {
        return;
    };
    let url = format!("http://{HELLO_IP}:8080/");
    let host = ["-H", "Host: hello.default.svc.cluster.local:8080"];
    let answers = curl(&mesh.client, &url, 40, &host).await;
    let (v1, v2) = (
        count(&answers, "hello from v1"),
        count(&answers, "hello from v2"),
    );
    assert_eq!((answers.len(), v1 + v2), (40, 40), "{answers:?}");

    // Each server's sidecar saw the client's verified identity.
    for (pod, answered) in [(&mesh.v1, v1), (&mesh.v2, v2)] {
        let served = metrics(&mesh.net, pod).await;
        let inbound = mtls_from(&served, "client");
        assert_eq!(
            inbound as usize, answered,
            "inbound mTLS requests at {}:\n{served}",
            pod.name
        );
    }
    // The client's sidecar names the Service, not its ClusterIP.
    let client = metrics(&mesh.net, &mesh.client).await;
    let outbound = sum(
        &client,
        "trellis_requests_total",
        &[
            "direction=\"outbound\"",
            "dst_service=\"hello\"",
            "tls=\"true\"",
        ],
    );
    assert_eq!(outbound as usize, 40, "outbound requests:\n{client}");

    // Routes apply to transparent traffic: all to v2, then all to v1.
    for (to_v1, to_v2, expected) in [(0, 100, "hello from v2"), (100, 0, "hello from v1")] {
        mesh.net
            .write_manifest("route.yaml", &split_route(to_v1, to_v2))
            .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answers = curl(&mesh.client, &url, 20, &host).await;
            if count(&answers, expected) == 20 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a {to_v1}/{to_v2} route did not apply within 10 s: {answers:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn split_route(to_v1: u32, to_v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: hello-split}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: hello, port: 8080}}]
  rules:
  - backendRefs:
    - {{name: hello-v1, port: 8080, weight: {to_v1}}}
    - {{name: hello-v2, port: 8080, weight: {to_v2}}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_frontend_and_http2_clients_work_unmodified() {
    let Some(mut mesh) = HelloMesh::start().await else {
        return;
    };
    let mut frontend = mesh.net.pod("frontend");
    nginx(
        &mut frontend,
        "",
        Some((
            &format!("{HELLO_IP}:8080"),
            "hello.default.svc.cluster.local:8080",
        )),
    );
    mesh.net
        .write_manifest(
            "frontend.yaml",
            &(meshed_pod(&frontend, "frontend", "v1")
                + &service("frontend", FRONTEND_IP, &[("http", 8080, "")], &[&frontend])),
        )
        .await;
    mesh.net.sidecar(&mut frontend, "frontend", &[]).await;
    frontend.wait_listening(8080).await;

    // client → frontend (nginx) → hello, each hop through two sidecars.
    let answers = curl(
        &mesh.client,
        &format!("http://{FRONTEND_IP}:8080/"),
        10,
        &[],
    )
    .await;
    assert_eq!(
        count(&answers, "hello from v"),
        10,
        "{answers:?}\nfrontend logs:\n{}",
        frontend.logs()
    );
    let at_v1 = metrics(&mesh.net, &mesh.v1).await;
    assert!(
        at_v1.contains("peer_identity=\"spiffe://cluster.local/ns/default/sa/frontend\""),
        "hello saw no mTLS from the frontend:\n{at_v1}"
    );

    // HTTP/2 with prior knowledge, from curl and from h2load. (One URL per
    // curl: curl 7.88 fails to reuse a prior-knowledge connection, even
    // straight to nginx.)
    let h2 = format!("http://{HELLO_IP}:8081/");
    for _ in 0..5 {
        let answers = curl(&mesh.client, &h2, 1, &["--http2-prior-knowledge"]).await;
        assert_eq!(count(&answers, "over h2"), 1, "{answers:?}");
    }
    let out = mesh
        .client
        .run(&["h2load", "-n", "200", "-c", "2", "-m", "4", &h2])
        .await;
    let report = text(&out);
    assert!(
        out.status.success() && report.contains("200 succeeded, 0 failed"),
        "h2load:\n{report}"
    );
    let at_client = metrics(&mesh.net, &mesh.client).await;
    assert!(
        sum(
            &at_client,
            "trellis_requests_total",
            &[
                "direction=\"outbound\"",
                "dst_service=\"hello\"",
                "status_code=\"200\""
            ],
        ) >= 205.0,
        "{at_client}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_works_and_is_measured_by_grpc_status() {
    let Some(mut net) = PodNetwork::start(&[("curl", "curl")]) else {
        return;
    };
    if !trellis_tests::grpcio_available() {
        return;
    }
    let mut client = net.pod("client");
    let mut server = net.pod("greeter");
    let script = env!("CARGO_MANIFEST_DIR").to_string() + "/apps/grpc_echo.py";
    let app = server.dir.join("grpc_echo.py");
    std::fs::copy(&script, &app).expect("copy the gRPC app");
    let app = app.display().to_string();
    server.spawn(&[
        trellis_tests::GRPC_PYTHON,
        &app,
        "serve",
        "50051",
        "greeter",
    ]);
    net.write_manifest(
        "grpc.yaml",
        &(meshed_pod(&client, "client", "v1")
            + &meshed_pod(&server, "greeter", "v1")
            + &service("greeter", GRPC_IP, &[("grpc", 50051, "grpc")], &[&server])),
    )
    .await;
    net.sidecar(&mut client, "client", &[]).await;
    net.sidecar(&mut server, "greeter", &[]).await;
    server.wait_listening(50051).await;

    let target = format!("{GRPC_IP}:50051");
    let call = |method: &'static str| {
        let (client, app, target) = (&client, app.clone(), target.clone());
        async move {
            let out = client
                .run(&[
                    trellis_tests::GRPC_PYTHON,
                    &app,
                    "call",
                    &target,
                    method,
                    "hi",
                ])
                .await;
            text(&out).trim().to_string()
        }
    };
    assert_eq!(
        call("Say").await,
        "greeter: hi",
        "server logs:\n{}",
        server.logs()
    );
    assert_eq!(call("Fail").await, "status=UNAVAILABLE");

    // gRPC answers HTTP 200 and carries its status in trailers: the
    // metrics record the gRPC status (14 = UNAVAILABLE) as a failure.
    let exposition = metrics(&net, &client).await;
    let outbound = |code: &str, class: &str| {
        sum(
            &exposition,
            "trellis_requests_total",
            &[
                "direction=\"outbound\"",
                "dst_service=\"greeter\"",
                &format!("status_code=\"{code}\""),
                &format!("classification=\"{class}\""),
            ],
        )
    };
    assert_eq!(outbound("0", "success"), 1.0, "{exposition}");
    assert_eq!(outbound("14", "failure"), 1.0, "{exposition}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_and_a_server_that_speaks_first_work_as_opaque_tcp() {
    let Some(mut net) = PodNetwork::start(APPS) else {
        return;
    };
    let mut client = net.pod("client");
    let mut server = net.pod("tcp");
    server.spawn(&["socat", "TCP-LISTEN:9000,fork,reuseaddr", "EXEC:cat"]);
    // An SMTP-like banner before the client says anything, on a port that
    // is not in the opaque list: detection must give up and tunnel.
    server.spawn(&[
        "socat",
        "TCP-LISTEN:2525,fork,reuseaddr",
        "SYSTEM:echo 220 banner first; read line; echo 250 got $line",
    ]);
    net.write_manifest(
        "tcp.yaml",
        &(meshed_pod(&client, "client", "v1")
            + &meshed_pod(&server, "tcp", "v1")
            + &service(
                "tcp",
                ECHO_IP,
                &[("echo", 9000, ""), ("smtp", 2525, "")],
                &[&server],
            )),
    )
    .await;
    net.sidecar(&mut client, "client", &[]).await;
    net.sidecar(&mut server, "tcp", &[]).await;
    server.wait_listening(9000).await;
    server.wait_listening(2525).await;

    // The echo client writes first; the SMTP-like client only after the
    // banner has had time to arrive.
    for (script, expected) in [
        (
            format!("printf 'ping over the mesh\\n' | socat -t 2 - TCP:{ECHO_IP}:9000"),
            "ping over the mesh",
        ),
        (
            format!("(sleep 1; printf 'HELO trellis\\n') | socat -t 2 - TCP:{ECHO_IP}:2525"),
            "220 banner first\n250 got HELO trellis",
        ),
    ] {
        let out = client.run(&["sh", "-c", &script]).await;
        assert_eq!(text(&out).trim(), expected, "server: {}", server.logs());
    }

    // Both went through the tunnel to the server's sidecar over mTLS.
    let exposition = metrics(&net, &server).await;
    assert!(
        sum(
            &exposition,
            "trellis_tcp_connections_opened_total",
            &["direction=\"inbound\""]
        ) >= 2.0,
        "{exposition}"
    );
    assert!(
        sum(
            &exposition,
            "trellis_tcp_read_bytes_total",
            &["direction=\"inbound\""]
        ) > 0.0,
        "{exposition}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_refused_by_strict_served_by_permissive_and_non_mesh_passed_through() {
    let Some(mesh) = HelloMesh::start().await else {
        return;
    };
    let HelloMesh {
        mut net,
        client,
        v1,
        ..
    } = mesh;
    // A pod without a sidecar, serving HTTP itself.
    let mut outsider = net.pod("outsider");
    nginx(&mut outsider, "hello from outside the mesh", None);
    outsider.wait_listening(8080).await;

    // Outsider → a STRICT meshed pod's application port: refused.
    let url = format!("http://{}/", v1.addr(8080));
    let out = outsider
        .run(&["curl", "-sS", "--max-time", "5", &url])
        .await;
    assert!(
        !out.status.success() && !text(&out).contains("hello from v1"),
        "plaintext from outside the mesh reached a STRICT pod: {}",
        text(&out)
    );

    // Meshed client → a destination that is no mesh Service: passed through.
    let answers = curl(&client, &format!("http://{}/", outsider.addr(8080)), 3, &[]).await;
    assert_eq!(
        count(&answers, "hello from outside the mesh"),
        3,
        "{answers:?}"
    );

    // A PERMISSIVE pod serves the outsider, and measures it as plaintext.
    let mut lenient = net.pod("lenient");
    nginx(&mut lenient, "hello from a permissive pod", None);
    net.write_manifest("lenient.yaml", &meshed_pod(&lenient, "lenient", "v1"))
        .await;
    net.sidecar(
        &mut lenient,
        "lenient",
        &[(trellis_proxy::config::INBOUND_MODE, "permissive")],
    )
    .await;
    lenient.wait_listening(8080).await;
    let answers = curl(
        &outsider,
        &format!("http://{}/", lenient.addr(8080)),
        3,
        &[],
    )
    .await;
    assert_eq!(
        count(&answers, "hello from a permissive pod"),
        3,
        "{answers:?}"
    );
    let exposition = metrics(&net, &lenient).await;
    let plaintext = sum(
        &exposition,
        "trellis_requests_total",
        &[
            "direction=\"inbound\"",
            "tls=\"false\"",
            "status_code=\"200\"",
        ],
    );
    assert_eq!(plaintext, 3.0, "{exposition}");

    // Authorization of plaintext: a policy that allows only meshed callers
    // on 8080 refuses the outsider with the sidecar's 403, while meshed
    // callers are served; `unauthenticated: true` lets it in again.
    let policy = |from: &str| {
        format!(
            "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: default}}
spec:
  selector: {{}}
  ports: [8080]
  allow:
    - from: [{from}]
"
        )
    };
    let url = format!("http://{}/", lenient.addr(8080));
    let outsider_gets = |needle: &'static str| {
        let (outsider, url) = (&outsider, url.clone());
        trellis_tests::eventually(Duration::from_secs(5), needle, move || {
            let url = url.clone();
            async move {
                let answers = curl(outsider, &url, 1, &["-i"]).await;
                (count(&answers, needle) > 0)
                    .then_some(())
                    .ok_or(format!("{answers:?}"))
            }
        })
    };
    net.write_manifest("policy.yaml", &policy("{meshed: true}"))
        .await;
    outsider_gets("trellis-proxy-error: unauthorized").await;
    let answers = curl(&client, &format!("http://{HELLO_IP}:8080/"), 3, &[]).await;
    assert_eq!(count(&answers, "hello from v"), 3, "{answers:?}");
    let exposition = metrics(&net, &lenient).await;
    let denied = sum(
        &exposition,
        "trellis_inbound_authz_total",
        &["decision=\"deny\"", "mode=\"enforce\""],
    );
    assert!(denied >= 1.0, "{exposition}");
    net.write_manifest("policy.yaml", &policy("{unauthenticated: true}"))
        .await;
    outsider_gets("hello from a permissive pod").await;
}

/// The StatefulSet shape: pods `web-0` and `web-1` behind the headless
/// Service `web` (no ClusterIP; its EndpointSlice names each pod's
/// hostname), which DNS would answer with pod IPs.
fn headless_web(pods: &[&Pod]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|pod| {
            format!(
                "  - addresses: [\"{ip}\"]\n    hostname: {name}\n    targetRef: {{kind: Pod, name: {name}}}\n",
                ip = pod.ip,
                name = pod.name
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: None
  ports: [{{name: http, port: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports: [{{name: http, port: 8080}}]
"
    )
}

/// Connections straight to pods, as StatefulSet peers and headless
/// Services make them, get mTLS: by pod IP, by per-pod name (resolved as
/// DNS would, and named to the explicit proxy), both ways between peers,
/// and STRICT servers (every pod here) accept them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_ips_and_per_pod_names_get_mtls_both_ways() {
    let Some(mesh) = HelloMesh::start().await else {
        return;
    };
    let HelloMesh {
        mut net,
        client,
        v1,
        ..
    } = mesh;
    let mut peers = [net.pod("web-0"), net.pod("web-1")];
    for pod in &mut peers {
        let body = format!("hello from {}", pod.name);
        nginx(pod, &body, None);
    }
    net.write_manifest(
        "web.yaml",
        &(meshed_pod(&peers[0], "web", "v1")
            + &meshed_pod(&peers[1], "web", "v1")
            + &headless_web(&[&peers[0], &peers[1]])),
    )
    .await;
    for pod in &mut peers {
        net.sidecar(pod, "web", &[]).await;
        pod.wait_listening(8080).await;
    }

    // A client → a Deployment's pod by IP.
    let answers = curl(&client, &format!("http://{}/", v1.addr(8080)), 3, &[]).await;
    assert_eq!(count(&answers, "hello from v1"), 3, "{answers:?}");
    let exposition = metrics(&net, &v1).await;
    assert_eq!(mtls_from(&exposition, "client"), 3.0, "{exposition}");

    // Peers: web-0 → web-1 by IP, web-1 → web-0 by its per-pod name as DNS
    // resolves it, and web-0 → web-1 by name through the explicit proxy.
    let name = |pod: &Pod| format!("{}.web.default.svc.cluster.local", pod.name);
    let by_ip = curl(
        &peers[0],
        &format!("http://{}/", peers[1].addr(8080)),
        2,
        &[],
    )
    .await;
    let resolve = format!("{}:8080:{}", name(&peers[0]), peers[0].ip);
    let by_name = curl(
        &peers[1],
        &format!("http://{}:8080/", name(&peers[0])),
        2,
        &["--resolve", &resolve],
    )
    .await;
    let proxy = format!("http://127.0.0.1:{}", trellis_tests::netns::OUTBOUND_PORT);
    let explicit = curl(
        &peers[0],
        &format!("http://{}:8080/", name(&peers[1])),
        2,
        &["-x", &proxy],
    )
    .await;
    assert_eq!(count(&by_ip, "hello from web-1"), 2, "{by_ip:?}");
    assert_eq!(count(&by_name, "hello from web-0"), 2, "{by_name:?}");
    assert_eq!(count(&explicit, "hello from web-1"), 2, "{explicit:?}");
    let web0 = metrics(&net, &peers[0]).await;
    let web1 = metrics(&net, &peers[1]).await;
    assert_eq!(mtls_from(&web0, "web"), 2.0, "web-0:\n{web0}");
    assert_eq!(mtls_from(&web1, "web"), 4.0, "web-1:\n{web1}");
}

/// The Service `name` in both families: a ClusterIP each, and an
/// EndpointSlice each over `pods`' addresses of that family.
fn dual_stack_service(name: &str, ips: (&str, &str), port: u16, pods: &[&Pod]) -> String {
    let slice = |family: &str, address: &dyn Fn(&Pod) -> String| {
        let endpoints: String = pods
            .iter()
            .map(|pod| {
                format!(
                    "  - addresses: [\"{}\"]\n    targetRef: {{kind: Pod, name: {}}}\n",
                    address(pod),
                    pod.name
                )
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{suffix}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: {family}
endpoints:
{endpoints}ports: [{{name: http, port: {port}}}]
---
",
            suffix = family.to_ascii_lowercase(),
        )
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  clusterIP: {v4}
  clusterIPs: [{v4}, \"{v6}\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{{name: http, port: {port}}}]
---
{slice4}{slice6}",
        v4 = ips.0,
        v6 = ips.1,
        slice4 = slice("IPv4", &|p| p.ip.to_string()),
        slice6 = slice("IPv6", &|p| p.ip6.to_string()),
    )
}

/// The IPv4 tests over IPv6: pods are dual stack, applications dial a
/// dual-stack Service's IPv6 ClusterIP and pods' IPv6 addresses, and get
/// the same mTLS, the same STRICT refusal of outsiders and the same
/// pass-through to destinations outside the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_connections_are_intercepted_and_meshed_as_ipv4_ones_are() {
    let Some(mut net) = PodNetwork::start(APPS) else {
        return;
    };
    let mut client = net.pod("client");
    let mut v1 = net.pod("hello-v1");
    let mut v2 = net.pod("hello-v2");
    let mut outsider = net.pod("outsider");
    nginx(&mut v1, "hello from v1", None);
    nginx(&mut v2, "hello from v2", None);
    nginx(&mut outsider, "hello from outside the mesh", None);
    const HELLO_IP6: &str = "fd00:96::10";
    net.write_manifest(
        "hello.yaml",
        &(meshed_pod(&client, "client", "v1")
            + &meshed_pod(&v1, "hello", "v1")
            + &meshed_pod(&v2, "hello", "v2")
            + &dual_stack_service("hello", (HELLO_IP, HELLO_IP6), 8080, &[&v1, &v2])),
    )
    .await;
    net.sidecar(&mut client, "client", &[]).await;
    net.sidecar(&mut v1, "hello", &[]).await;
    net.sidecar(&mut v2, "hello", &[]).await;
    v1.wait_listening(8080).await;
    v2.wait_listening(8080).await;
    outsider.wait_listening(8080).await;

    // The Service's IPv6 ClusterIP: balanced over both pods, over mTLS.
    let url = format!("http://[{HELLO_IP6}]:8080/");
    let answers = curl(&client, &url, 20, &[]).await;
    let (to_v1, to_v2) = (
        count(&answers, "hello from v1"),
        count(&answers, "hello from v2"),
    );
    assert_eq!((to_v1 + to_v2, answers.len()), (20, 20), "{answers:?}");
    assert!(to_v1 > 0 && to_v2 > 0, "{answers:?}");
    let served = mtls_from(&metrics(&net, &v1).await, "client")
        + mtls_from(&metrics(&net, &v2).await, "client");
    assert_eq!(served, 20.0);
    let outbound = metrics(&net, &client).await;
    let to_hello = sum(
        &outbound,
        "trellis_requests_total",
        &[
            "direction=\"outbound\"",
            "dst_service=\"hello\"",
            "tls=\"true\"",
        ],
    );
    assert_eq!(to_hello, 20.0, "{outbound}");

    // A pod's IPv6 address, and the same dual-stack pod by its IPv4 one.
    for addr in [v1.addr6(8080), v1.addr(8080)] {
        let answers = curl(&client, &format!("http://{addr}/"), 2, &[]).await;
        assert_eq!(count(&answers, "hello from v1"), 2, "{addr}: {answers:?}");
    }
    assert_eq!(
        mtls_from(&metrics(&net, &v1).await, "client"),
        f64::from(to_v1 as u32 + 4)
    );

    // An outsider's plaintext to a STRICT pod over IPv6: refused.
    let url = format!("http://{}/", v1.addr6(8080));
    let out = outsider
        .run(&["curl", "-sS", "--max-time", "5", &url])
        .await;
    assert!(
        !out.status.success() && !text(&out).contains("hello from v1"),
        "plaintext over IPv6 reached a STRICT pod: {}",
        text(&out)
    );
    // Probes and scrapers reach the admin port over IPv6 too.
    let ready = format!("http://{}/ready", v1.addr6(ADMIN_PORT));
    let out = net
        .node_command("curl", &["-sS", "--fail", "--max-time", "5", &ready])
        .await;
    assert!(out.status.success(), "{ready}: {}", text(&out));
    // A destination outside the mesh over IPv6: passed through.
    let answers = curl(
        &client,
        &format!("http://{}/", outsider.addr6(8080)),
        2,
        &[],
    )
    .await;
    assert_eq!(
        count(&answers, "hello from outside the mesh"),
        2,
        "{answers:?}"
    );
}
