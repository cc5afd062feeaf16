//! Cluster mode: the controller's cluster source (the real kube-rs client)
//! against the fake API server (no real one runs here; see
//! `trellis_tests::fake_api`), real sidecars in front, and the real
//! `kubectl` as a second client.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_control_plane::model::Object;
use trellis_control_plane::source::manifest;
use trellis_proto::discovery::endpoint_update::Kind;
use trellis_tests::fake_api::{FakeApi, Kubectl};
use trellis_tests::{eventually, versions, watch_endpoints, HelloMesh, RequestLoop};

/// How soon a change in the API must reach a proxy's discovery stream.
const PROPAGATION: Duration = Duration::from_secs(1);
/// How long a re-list may take (the watcher backs off 0.8 s first).
const RELIST: Duration = Duration::from_secs(10);

/// The EndpointSlice `hello-1` with `(pod, ip, ready)` endpoints.
fn hello_slice(mesh: &HelloMesh, endpoints: &[(&str, std::net::IpAddr, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ip, ready)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": ready, "serving": ready, "terminating": !ready},
                "targetRef": {"kind": "Pod", "name": pod}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "hello-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "hello"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": mesh.port}]
    })
}

/// What one discovery stream has told a client: the endpoints it holds now
/// and every address it was told to remove.
#[derive(Default)]
struct Seen {
    endpoints: BTreeSet<String>,
    removed: Vec<String>,
}

/// Follows the endpoints of `authority` as a proxy does.
async fn follow(controller: SocketAddr, authority: String) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut stream = watch_endpoints(&format!("http://{controller}"), &authority)
        .await
        .expect("watch");
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(update)) = stream.message().await {
            let mut seen = record.lock().unwrap();
            match update.kind {
                Some(Kind::Snapshot(s)) => {
                    seen.endpoints = s.endpoints.iter().map(|e| e.ip.clone()).collect()
                }
                Some(Kind::Add(a)) => seen.endpoints.extend(a.endpoints.into_iter().map(|e| e.ip)),
                Some(Kind::Remove(r)) => {
                    for address in r.addresses {
                        let ip = address.rsplit_once(':').map_or(&*address, |(ip, _)| ip);
                        seen.endpoints.remove(ip);
                        seen.removed.push(address.clone());
                    }
                }
                Some(Kind::NoEndpoints(_)) => seen.endpoints.clear(),
                None => {}
            }
        }
    });
    seen
}

/// Waits until the stream holds exactly `expected` (IPs), within `within`.
async fn until_seen(seen: &Arc<Mutex<Seen>>, expected: &[std::net::IpAddr], within: Duration) {
    let expected: BTreeSet<String> = expected.iter().map(|ip| ip.to_string()).collect();
    eventually(
        within,
        "the discovery stream to hold the API's endpoints",
        || {
            let held = seen.lock().unwrap().endpoints.clone();
            let expected = expected.clone();
            async move {
                if held == expected {
                    Ok(())
                } else {
                    Err(format!("held {held:?}, expected {expected:?}"))
                }
            }
        },
    )
    .await
}

/// The API's objects of the kinds the mesh reads, in the mesh's model.
fn api_objects(api: &FakeApi) -> Vec<Object> {
    let kinds = [
        ("v1", "Namespace"),
        ("v1", "Service"),
        ("discovery.k8s.io/v1", "EndpointSlice"),
        ("v1", "Pod"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("trellis.dev/v1alpha1", "HTTPFault"),
        ("trellis.dev/v1alpha1", "ResiliencePolicy"),
    ];
    let mut objects: Vec<Object> = kinds
        .iter()
        .flat_map(|(api_version, kind)| api.objects(api_version, kind))
        .filter_map(|value| manifest::from_value(value).expect("the API's objects are valid"))
        .collect();
    objects.sort_by_key(|o| (o.kind(), o.key()));
    objects
}

/// Waits until the controller's store equals the API's state, object by object.
async fn until_store_matches(mesh: &HelloMesh, api: &FakeApi, what: &str) {
    let store = mesh.controller.as_ref().expect("controller").store.clone();
    eventually(RELIST, what, || {
        let (held, truth) = (store.objects(), api_objects(api));
        async move {
            if held == truth {
                Ok(())
            } else {
                let names = |objects: &[Object]| -> Vec<String> {
                    objects.iter().map(|o| o.to_string()).collect()
                };
                Err(format!(
                    "store {:?} vs API {:?} (or equal names, different contents)",
                    names(&held),
                    names(&truth)
                ))
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_made_unready_and_removed_through_the_api_reach_a_proxy_within_a_second() {
    let api = Arc::new(FakeApi::start().await);
    let mesh = HelloMesh::start_in_cluster(api.clone()).await;
    let (v1, v2) = (mesh.hello[0].0, mesh.hello[1].0);
    let seen = follow(mesh.controller_addr(), mesh.authority()).await;
    until_seen(&seen, &[v1, v2], PROPAGATION).await;

    let timed = |what: &'static str| (what, Instant::now());
    let (what, at) = timed("v2 made not ready");
    api.apply(hello_slice(
        &mesh,
        &[("hello-v1", v1, true), ("hello-v2", v2, false)],
    ));
    until_seen(&seen, &[v1], PROPAGATION).await;
    eprintln!("{what}: {:?}", at.elapsed());

    let (what, at) = timed("v2 ready again");
    api.apply(hello_slice(
        &mesh,
        &[("hello-v1", v1, true), ("hello-v2", v2, true)],
    ));
    until_seen(&seen, &[v1, v2], PROPAGATION).await;
    eprintln!("{what}: {:?}", at.elapsed());

    let (what, at) = timed("v1 removed");
    api.apply(hello_slice(&mesh, &[("hello-v2", v2, true)]));
    until_seen(&seen, &[v2], PROPAGATION).await;
    eprintln!("{what}: {:?}", at.elapsed());
    let answer = mesh.http1().get(&mesh.authority(), "/").await.unwrap();
    assert_eq!(answer.greeting().map(|g| g.version), Some("v2".into()));

    let (what, at) = timed("slice deleted");
    assert!(api.delete(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        Some("default"),
        "hello-1"
    ));
    until_seen(&seen, &[], PROPAGATION).await;
    eprintln!("{what}: {:?}", at.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relists_after_gone_dropped_watches_and_a_restart_leave_the_store_equal_to_the_api_and_cost_no_request(
) {
    let api = Arc::new(FakeApi::start().await);
    let mesh = HelloMesh::start_in_cluster(api.clone()).await;
    let (v1, v2) = (mesh.hello[0].0, mesh.hello[1].0);
    let seen = follow(mesh.controller_addr(), mesh.authority()).await;
    until_seen(&seen, &[v1, v2], PROPAGATION).await;
    until_store_matches(&mesh, &api, "the first list").await;
    let requests = RequestLoop::start(mesh.http1(), &mesh.authority());
    let lists = || api.requests("list", "endpointslices");

    // 410 Gone: history compacted while the watches are away, and changes
    // made meanwhile that only a re-list can see (a deletion among them).
    let before = lists();
    api.expire_history();
    api.drop_watches();
    assert!(api.delete("v1", "Service", Some("default"), "hello-v2"));
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "extra", "namespace": "default"},
        "spec": {"ports": [{"port": 80}]}
    }));
    eventually(RELIST, "a re-list after 410 Gone", || {
        let n = lists();
        async move { (n > before).then_some(()).ok_or(format!("{n} lists")) }
    })
    .await;
    until_store_matches(&mesh, &api, "the store after 410 Gone").await;

    // Dropped watches resume (from their resourceVersion) and miss nothing.
    api.drop_watches();
    assert!(api.delete("v1", "Service", Some("default"), "extra"));
    until_store_matches(&mesh, &api, "the store after dropped watches").await;

    // The API server restarts; something changes right after.
    api.restart().await;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "after-restart", "namespace": "default"},
        "spec": {"ports": [{"port": 81}]}
    }));
    until_store_matches(&mesh, &api, "the store after an API server restart").await;

    let removed = seen.lock().unwrap().removed.clone();
    assert!(
        removed.is_empty(),
        "no endpoint of hello went away, yet the proxy was told to remove {removed:?}"
    );
    until_seen(&seen, &[v1, v2], PROPAGATION).await;
    let answers = requests.stop().await;
    let tally = versions(&answers);
    assert!(answers.len() > 50, "the request loop ran: {tally:?}");
    assert!(
        tally
            .keys()
            .all(|version| version == "v1" || version == "v2"),
        "every request answered by hello: {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_created_with_kubectl_reaches_a_proxy() {
    let api = Arc::new(FakeApi::start().await);
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    let mesh = HelloMesh::start_in_cluster(api.clone()).await;
    let (v1, port) = (mesh.hello[0].0, mesh.port);
    let file = kubectl.write(
        "web.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  ports: [{{name: http, port: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
  - addresses: [\"{v1}\"]
    targetRef: {{kind: Pod, name: hello-v1}}
ports: [{{name: http, port: {port}}}]
"
        ),
    );
    let out = kubectl.run(&["apply", "-f", &file]).await;
    assert!(out.contains("service/web created"), "{out}");
    let web = format!("web.default.svc.cluster.local:{port}");
    let client = mesh.http1();
    let answer = eventually(Duration::from_secs(5), "web to answer", || {
        let (client, web) = (client.clone(), web.clone());
        async move {
            match client.get(&web, "/").await {
                Ok(answer) if answer.status.is_success() => Ok(answer),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let greeting = answer.greeting().expect("hello's greeting");
    assert_eq!(greeting.version, "v1");
    assert_eq!(
        greeting.client_identity, "spiffe://cluster.local/ns/default/sa/frontend",
        "over mTLS: the server's sidecar verified the caller"
    );

    kubectl.run(&["delete", "-f", &file]).await;
    eventually(Duration::from_secs(5), "web to be gone", || {
        let (client, web) = (client.clone(), web.clone());
        async move {
            match client.get(&web, "/").await {
                Ok(answer)
                    if answer.status.is_client_error() || answer.status.is_server_error() =>
                {
                    Ok(())
                }
                other => Err(format!("still answering: {other:?}")),
            }
        }
    })
    .await;
}
