//! The fake Kubernetes API server, driven by the real `kubectl` and by raw
//! HTTP as kube-rs speaks it: discovery, apply/get/watch/delete, paged
//! lists, `410 Expired`, `409 Conflict`, TokenReview, dropped watches and
//! restarts.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use trellis_tests::fake_api::{FakeApi, Kubectl};

/// Generous: kubectl and the server are local, but CI machines are busy.
const WAIT: Duration = Duration::from_secs(10);

fn service(namespace: &str, name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"selector": {"app": name}, "ports": [{"port": port}]}
    })
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// One request over raw HTTP; the status and the JSON answer.
async fn call(
    api: &FakeApi,
    method: &str,
    path: &str,
    body: Option<(&str, Value)>,
) -> (u16, Value) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", api.addr().to_string())
        .header("authorization", "Bearer anything");
    let body = match body {
        Some((content_type, body)) => {
            request = request.header("content-type", content_type);
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let request = request.body(Full::new(body)).expect("a valid request");
    let answer = trellis_tests::send_once(api.addr(), false, request)
        .await
        .expect("the fake API server answers");
    let value = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", answer.text()));
    (answer.status.as_u16(), value)
}

/// A watch over raw HTTP: its events, one per line; the channel closes
/// when the server ends the stream.
async fn watch(api: &FakeApi, path: &str) -> mpsc::Receiver<Value> {
    let tcp = tokio::net::TcpStream::connect(api.addr())
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", api.addr().to_string())
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let response = sender.send_request(request).await.expect("a response");
    assert_eq!(response.status(), 200, "GET {path}");
    let (events, receiver) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            pending.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d.as_ref()));
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let event = serde_json::from_slice(&line).expect("a JSON watch event per line");
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    receiver
}

/// The next event that isn't a bookmark; `None` if the stream ended.
async fn next_change(events: &mut mpsc::Receiver<Value>) -> Option<Value> {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(event) if event["type"] == "BOOKMARK" => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("a watch event or the end of the stream in time")
}

#[tokio::test]
async fn kubectl_get_lists_what_the_test_applied() {
    let api = FakeApi::start().await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    api.apply(namespace("shop"));
    api.apply(service("default", "web", 80));
    api.apply(service("shop", "cart", 8080));

    let table = kubectl.run(&["get", "services", "-A"]).await;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().take(2).collect())
        .collect();
    assert_eq!(rows, [["default", "web"], ["shop", "cart"]], "{table}");

    let names = kubectl
        .run(&["get", "svc", "-n", "shop", "-o", "name"])
        .await;
    assert_eq!(names.trim(), "service/cart");
    let object: Value =
        serde_json::from_str(&kubectl.run(&["get", "svc", "web", "-o", "json"]).await)
            .expect("kubectl prints JSON");
    assert_eq!(object["spec"]["ports"][0]["port"], 80);
    assert_eq!(
        object["metadata"]["uid"],
        api.objects("v1", "Service")[0]["metadata"]["uid"]
    );

    let namespaces = kubectl.run(&["get", "ns", "-o", "name"]).await;
    assert!(
        namespaces.lines().any(|l| l == "namespace/shop"),
        "{namespaces}"
    );
}

const SHOP: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
spec:
  selector: {app: cart}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: admin, port: 9000}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cart-1
  namespace: shop
  labels: {kubernetes.io/service-name: cart}
addressType: IPv4
ports:
- {name: http, port: 8080}
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: cart
  namespace: shop
spec:
  parentRefs: [{kind: Service, group: \"\", name: cart}]
  rules:
  - backendRefs: [{name: cart, port: 80, weight: 100}]
";

/// SHOP with the admin port gone, the http port retargeted, a second
/// endpoint and a different route weight.
fn shop_changed() -> String {
    SHOP.replace("  - {name: admin, port: 9000}\n", "")
        .replace("targetPort: 8080", "targetPort: 8081")
        .replace(
            "- addresses: [10.0.0.1]\n  conditions: {ready: true}\n",
            "- addresses: [10.0.0.1]\n  conditions: {ready: true}\n- addresses: [10.0.0.2]\n  conditions: {ready: false}\n",
        )
        .replace("weight: 100", "weight: 50")
}

#[tokio::test]
async fn kubectl_apply_creates_then_updates_then_delete_removes() {
    let api = FakeApi::start().await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    let file = kubectl.write("shop.yaml", SHOP);
    let out = kubectl.run(&["apply", "-f", &file]).await;
    for line in [
        "namespace/shop created",
        "service/cart created",
        "endpointslice.discovery.k8s.io/cart-1 created",
        "httproute.gateway.networking.k8s.io/cart created",
    ] {
        assert!(out.contains(line), "{line:?} not in {out}");
    }
    let cart = &api.objects("v1", "Service")[0];
    assert_eq!(cart["metadata"]["namespace"], "shop");
    assert_eq!(cart["spec"]["ports"].as_array().map(Vec::len), Some(2));
    let slice = &api.objects("discovery.k8s.io/v1", "EndpointSlice")[0];
    assert_eq!(slice["endpoints"][0]["addresses"], json!(["10.0.0.1"]));
    let route = &api.objects("gateway.networking.k8s.io/v1", "HTTPRoute")[0];
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["weight"], 100);
    assert_eq!(route["metadata"]["generation"], 1);

    let out = kubectl
        .run(&["apply", "-f", &kubectl.write("shop.yaml", &shop_changed())])
        .await;
    assert!(out.contains("namespace/shop unchanged"), "{out}");
    assert!(out.contains("service/cart configured"), "{out}");
    let cart = &api.objects("v1", "Service")[0];
    assert_eq!(
        cart["spec"]["ports"],
        json!([{"name": "http", "port": 80, "targetPort": 8081}]),
        "the strategic merge patch removes the admin port and retargets http"
    );
    let slice = &api.objects("discovery.k8s.io/v1", "EndpointSlice")[0];
    assert_eq!(slice["endpoints"][1]["addresses"], json!(["10.0.0.2"]));
    assert_eq!(slice["endpoints"][1]["conditions"]["ready"], false);
    let route = &api.objects("gateway.networking.k8s.io/v1", "HTTPRoute")[0];
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["weight"], 50);
    assert_eq!(route["metadata"]["generation"], 2);

    let out = kubectl.run(&["delete", "svc", "cart", "-n", "shop"]).await;
    assert!(out.contains("service \"cart\" deleted"), "{out}");
    assert!(api.objects("v1", "Service").is_empty());
    let missing = kubectl
        .output(&["delete", "svc", "cart", "-n", "shop"])
        .await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("services \"cart\" not found"), "{stderr}");

    kubectl
        .run(&["delete", "-f", &file, "--ignore-not-found"])
        .await;
    assert!(api
        .objects("discovery.k8s.io/v1", "EndpointSlice")
        .is_empty());
    assert!(api
        .objects("gateway.networking.k8s.io/v1", "HTTPRoute")
        .is_empty());
    let namespaces = api.objects("v1", "Namespace");
    assert!(namespaces.iter().all(|ns| ns["metadata"]["name"] != "shop"));
}

#[tokio::test]
async fn kubectl_server_side_apply_creates_and_merges() {
    let api = FakeApi::start().await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    let file = kubectl.write("shop.yaml", SHOP);
    let out = kubectl.run(&["apply", "--server-side", "-f", &file]).await;
    assert!(out.contains("service/cart serverside-applied"), "{out}");
    kubectl
        .run(&[
            "apply",
            "--server-side",
            "-f",
            &kubectl.write("shop.yaml", &shop_changed()),
        ])
        .await;
    let route = &api.objects("gateway.networking.k8s.io/v1", "HTTPRoute")[0];
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["weight"], 50);
}

#[tokio::test]
async fn kubectl_watch_shows_an_object_applied_while_it_watches() {
    let api = FakeApi::start().await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    api.apply(service("default", "before", 80));
    let mut child = kubectl
        .command(&["get", "services", "--watch", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next_line = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("kubectl prints in time")
            .expect("kubectl's stdout reads")
    };
    assert_eq!(next_line().await.as_deref(), Some("service/before"));
    api.apply(service("default", "after", 80));
    assert_eq!(next_line().await.as_deref(), Some("service/after"));
    assert!(api.requests("watch", "services") >= 1);
    child.kill().await.expect("kubectl stops");
}

#[tokio::test]
async fn a_watch_from_a_forgotten_resource_version_gets_410_expired() {
    let api = FakeApi::start().await;
    let first = api.apply(service("default", "web", 80));
    let stale: u64 = first["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .expect("an integer resourceVersion");
    api.apply(service("default", "web", 81));

    // Within the history: the watch resumes with what happened after.
    let mut events = watch(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={stale}"),
    )
    .await;
    let modified = next_change(&mut events).await.expect("an event");
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(modified["object"]["spec"]["ports"][0]["port"], 81);

    // After a compaction even the latest resourceVersion is too old.
    let latest = api.resource_version();
    api.expire_history();
    let mut events = watch(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={latest}&allowWatchBookmarks=true"),
    )
    .await;
    let error = next_change(&mut events).await.expect("an event");
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert!(next_change(&mut events).await.is_none(), "the stream ends");

    // From now on is fine again.
    let now = api.resource_version();
    let mut events = watch(
        &api,
        &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={now}"),
    )
    .await;
    api.delete("v1", "Service", Some("default"), "web");
    let deleted = next_change(&mut events).await.expect("an event");
    assert_eq!(deleted["type"], "DELETED");
    assert_eq!(
        deleted["object"]["metadata"]["resourceVersion"],
        (now + 1).to_string()
    );
}

#[tokio::test]
async fn watches_get_bookmarks_selector_transitions_and_end_when_dropped() {
    let api = FakeApi::start().await;
    api.apply(service("default", "web", 80));
    let mut labelled = watch(
        &api,
        "/api/v1/services?watch=true&labelSelector=app%3Dweb&allowWatchBookmarks=true&timeoutSeconds=60",
    )
    .await;
    let added = next_change(&mut labelled).await.expect("the initial ADDED");
    assert_eq!(added["type"], "ADDED");
    assert_eq!(added["object"]["metadata"]["name"], "web");

    let mut relabelled = service("default", "web", 80);
    relabelled["metadata"]["labels"]["app"] = json!("other");
    api.apply(relabelled);
    let left = next_change(&mut labelled).await.expect("an event");
    assert_eq!(
        left["type"], "DELETED",
        "leaving the selection is a deletion"
    );

    let bookmark = tokio::time::timeout(WAIT, labelled.recv())
        .await
        .expect("a bookmark in time");
    let bookmark = bookmark.expect("an event");
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );

    api.drop_watches();
    assert!(
        next_change(&mut labelled).await.is_none(),
        "dropped watches end"
    );
    assert_eq!(api.requests("watch", "services"), 1);
}

#[tokio::test]
async fn updates_with_a_stale_resource_version_conflict() {
    let api = FakeApi::start().await;
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "trellis-leader", "namespace": "default"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    });
    let leases = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    let (status, created) = call(
        &api,
        "POST",
        leases,
        Some(("application/json", lease.clone())),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, exists) = call(&api, "POST", leases, Some(("application/json", lease))).await;
    assert_eq!(
        (status, exists["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );

    let path = format!("{leases}/trellis-leader");
    let mut take = created.clone();
    take["spec"]["holderIdentity"] = json!("b");
    let (status, taken) = call(&api, "PUT", &path, Some(("application/json", take.clone()))).await;
    assert_eq!(status, 200, "{taken}");
    assert_ne!(
        taken["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );

    // `take` still carries the resourceVersion `created` had.
    take["spec"]["holderIdentity"] = json!("c");
    let (status, conflict) = call(&api, "PUT", &path, Some(("application/json", take))).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["kind"], "Status");
    assert_eq!(conflict["reason"], "Conflict");
    let (_, now) = call(&api, "GET", &path, None).await;
    assert_eq!(now["spec"]["holderIdentity"], "b");

    let (status, missing) = call(&api, "GET", &format!("{leases}/nobody"), None).await;
    assert_eq!(
        (status, missing["reason"].as_str()),
        (404, Some("NotFound"))
    );
    let patch = json!({"spec": {"holderIdentity": "d"}});
    let (status, patched) = call(
        &api,
        "PATCH",
        &path,
        Some(("application/merge-patch+json", patch)),
    )
    .await;
    assert_eq!(
        (status, patched["spec"]["holderIdentity"].as_str()),
        (200, Some("d"))
    );
    assert_eq!(patched["spec"]["leaseDurationSeconds"], 15);
}

#[tokio::test]
async fn lists_page_from_one_snapshot_and_select_by_label() {
    let api = FakeApi::start().await;
    for i in 0..5 {
        api.apply(service("default", &format!("svc-{i}"), 80));
    }
    let (_, first) = call(&api, "GET", "/api/v1/services?limit=2", None).await;
    let version = first["metadata"]["resourceVersion"].clone();
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    api.delete("v1", "Service", Some("default"), "svc-4");
    let mut names = Vec::new();
    let mut page = first;
    loop {
        assert_eq!(
            page["metadata"]["resourceVersion"], version,
            "every page is of one snapshot"
        );
        names.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|i| i["metadata"]["name"].clone()),
        );
        let Some(token) = page["metadata"]["continue"].as_str() else {
            break;
        };
        page = call(
            &api,
            "GET",
            &format!("/api/v1/services?limit=2&continue={token}"),
            None,
        )
        .await
        .1;
    }
    assert_eq!(names, ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4"]);

    let (_, first) = call(
        &api,
        "GET",
        "/api/v1/namespaces/default/services?limit=1",
        None,
    )
    .await;
    api.expire_history();
    let token = first["metadata"]["continue"].as_str().expect("more pages");
    let (status, expired) = call(
        &api,
        "GET",
        &format!("/api/v1/services?limit=1&continue={token}"),
        None,
    )
    .await;
    assert_eq!((status, expired["reason"].as_str()), (410, Some("Expired")));

    let (_, selected) = call(
        &api,
        "GET",
        "/api/v1/services?labelSelector=app%3Dsvc-2",
        None,
    )
    .await;
    assert_eq!(selected["kind"], "ServiceList");
    assert_eq!(selected["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(api.requests("list", "services"), 6);
}

#[tokio::test]
async fn token_reviews_answer_as_the_api_server_does() {
    let api = FakeApi::start().await;
    let user = "system:serviceaccount:shop:cart";
    api.add_token("good", user, &["trellis.dev"], true);
    api.add_token("expired", user, &["trellis.dev"], false);
    let review = |token: &str, audiences: &[&str]| {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences}});
        let api = &api;
        async move {
            let (status, answer) = call(
                api,
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(("application/json", body)),
            )
            .await;
            assert_eq!(status, 201, "{answer}");
            answer["status"].clone()
        }
    };
    let good = review("good", &["trellis.dev", "other"]).await;
    assert_eq!(good["authenticated"], true);
    assert_eq!(good["user"]["username"], user);
    assert_eq!(
        good["user"]["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:shop",
            "system:authenticated"
        ])
    );
    assert_eq!(good["audiences"], json!(["trellis.dev"]));
    assert!(good["user"]["uid"]
        .as_str()
        .is_some_and(|uid| !uid.is_empty()));

    for (token, audiences, why) in [
        (
            "good",
            &["https://kubernetes.default.svc.cluster.local"][..],
            "audience",
        ),
        ("good", &[][..], "audience"),
        ("expired", &["trellis.dev"][..], "expired"),
        ("unknown", &["trellis.dev"][..], "invalid bearer token"),
    ] {
        let refused = review(token, audiences).await;
        assert_eq!(refused["authenticated"], false, "{token} {audiences:?}");
        assert!(
            refused["error"].as_str().is_some_and(|e| e.contains(why)),
            "{refused}"
        );
        assert!(refused["user"].is_null());
    }
    assert_eq!(api.requests("create", "tokenreviews"), 5);
}

#[tokio::test]
async fn a_restart_closes_everything_and_serves_the_same_objects() {
    let api = FakeApi::start().await;
    api.apply(service("default", "web", 80));
    let version = api.resource_version();
    let mut events = watch(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={version}"),
    )
    .await;
    api.restart().await;
    assert!(
        next_change(&mut events).await.is_none(),
        "the restart ends the watch"
    );

    let (status, web) = call(&api, "GET", "/api/v1/namespaces/default/services/web", None).await;
    assert_eq!(status, 200);
    assert_eq!(web["metadata"]["resourceVersion"], version.to_string());
    // Resuming from before the restart works: the history survives, like etcd.
    let mut events = watch(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={version}"),
    )
    .await;
    api.apply(service("default", "web", 81));
    let modified = next_change(&mut events).await.expect("an event");
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(
        modified["object"]["metadata"]["resourceVersion"],
        (version + 1).to_string()
    );
}

#[tokio::test]
async fn discovery_describes_every_kind() {
    let api = FakeApi::start().await;
    let (_, groups) = call(&api, "GET", "/apis", None).await;
    let names: Vec<&str> = groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    for group in [
        "discovery.k8s.io",
        "gateway.networking.k8s.io",
        "trellis.dev",
        "coordination.k8s.io",
        "authentication.k8s.io",
    ] {
        assert!(names.contains(&group), "{group} in {names:?}");
    }
    let (_, core) = call(&api, "GET", "/api/v1", None).await;
    let services = core["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["name"] == "services")
        .expect("services");
    assert_eq!(services["shortNames"], json!(["svc"]));
    assert_eq!(services["namespaced"], true);
    let (_, trellis) = call(&api, "GET", "/apis/trellis.dev/v1alpha1", None).await;
    let kinds: Vec<&str> = trellis["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"HTTPFault") && kinds.contains(&"ResiliencePolicy"),
        "{kinds:?}"
    );
    let (status, missing) = call(&api, "GET", "/apis/trellis.dev/v1alpha1/widgets", None).await;
    assert_eq!((status, missing["kind"].as_str()), (404, Some("Status")));
}

/// kubectl acting as another user (`--as`).
struct Impersonating<'a>(&'a Kubectl, &'a str);

impl Impersonating<'_> {
    fn args<'b>(&'b self, args: &[&'b str]) -> Vec<String> {
        let mut all = vec![format!("--as={}", self.1)];
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    async fn run(&self, args: &[&str]) -> String {
        let all = self.args(args);
        self.0
            .run(&all.iter().map(String::as_str).collect::<Vec<_>>())
            .await
    }

    async fn output(&self, args: &[&str]) -> std::process::Output {
        let all = self.args(args);
        self.0
            .output(&all.iter().map(String::as_str).collect::<Vec<_>>())
            .await
    }
}

/// What kubectl printed on stderr, for a command that must fail.
async fn refusal(kubectl: &Impersonating<'_>, args: &[&str]) -> String {
    let out = kubectl.output(args).await;
    assert!(!out.status.success(), "kubectl {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn rbac_holds_an_impersonated_service_account_to_its_roles_and_answers_access_reviews() {
    let api = FakeApi::start().await;
    api.apply(namespace("shop"));
    let Some(admin) = Kubectl::new(&api) else {
        return;
    };
    // kubectl sends no bearer token over plain HTTP: it acts as the
    // service account by impersonation, as an admin may.
    let reader = Impersonating(&admin, "system:serviceaccount:shop:reader");
    let user = "User \"system:serviceaccount:shop:reader\"";
    let stderr = refusal(&reader, &["-n", "shop", "get", "pods"]).await;
    assert!(
        stderr.contains(&format!(
            "Error from server (Forbidden): pods is forbidden: {user} cannot list resource \"pods\" in API group \"\" in the namespace \"shop\""
        )),
        "{stderr}"
    );

    // A Role for pods and for one ConfigMap by name, bound to the reader
    // (kubectl's `create role` speaks protobuf, which this server does not).
    let rbac = admin.write(
        "rbac.yaml",
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\n\
         metadata: {name: reader, namespace: shop}\n\
         rules:\n- {apiGroups: [''], resources: [pods], verbs: [get, list]}\n\
         - {apiGroups: [''], resources: [configmaps], verbs: [get, list], resourceNames: [settings]}\n\
         ---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
         metadata: {name: reader, namespace: shop}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}\n\
         subjects: [{kind: ServiceAccount, name: reader, namespace: shop}]\n\
         ---\n\
         {apiVersion: v1, kind: ConfigMap, metadata: {name: settings, namespace: shop}}\n\
         ---\n\
         {apiVersion: v1, kind: ConfigMap, metadata: {name: other, namespace: shop}}\n",
    );
    admin.run(&["apply", "-f", &rbac]).await;

    reader.run(&["-n", "shop", "get", "pods"]).await;
    reader
        .run(&["-n", "shop", "get", "configmap", "settings"])
        .await;
    reader
        .run(&[
            "-n",
            "shop",
            "get",
            "configmaps",
            "--field-selector",
            "metadata.name=settings",
        ])
        .await;
    let stderr = refusal(&reader, &["-n", "shop", "get", "configmap", "other"]).await;
    assert!(
        stderr.contains(&format!(
            "configmaps \"other\" is forbidden: {user} cannot get resource \"configmaps\""
        )),
        "{stderr}"
    );
    refusal(&reader, &["-n", "shop", "get", "configmaps"]).await;
    refusal(&reader, &["-n", "default", "get", "pods"]).await;
    refusal(&reader, &["-n", "shop", "delete", "configmap", "settings"]).await;

    // A SubjectAccessReview answers from the same rules.
    let review = |verb: &str, resource: &str, name: &str| {
        json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "system:serviceaccount:shop:reader",
                     "resourceAttributes": {"namespace": "shop", "verb": verb, "resource": resource, "name": name}}
        })
    };
    for (verb, resource, name, allowed) in [
        ("list", "pods", "", true),
        ("delete", "pods", "", false),
        ("get", "configmaps", "settings", true),
        ("get", "configmaps", "other", false),
    ] {
        let (status, answer) = call(
            &api,
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            Some(("application/json", review(verb, resource, name))),
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(
            answer["status"]["allowed"], allowed,
            "{verb} {resource} {name}: {answer}"
        );
    }
}

#[tokio::test]
async fn writes_record_their_manager_and_time_in_managed_fields() {
    let api = FakeApi::start().await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    let file = kubectl.write(
        "shop.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    );
    kubectl.run(&["apply", "-f", &file]).await;
    kubectl
        .run(&["label", "namespace", "shop", "trellis.dev/inject=enabled"])
        .await;
    let namespace = &api
        .objects("v1", "Namespace")
        .into_iter()
        .find(|ns| ns["metadata"]["name"] == "shop")
        .expect("the namespace");
    let entries = namespace["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields");
    let label = entries
        .iter()
        .find(|e| {
            e["fieldsV1"]["f:metadata"]["f:labels"]
                .get("f:trellis.dev/inject")
                .is_some()
        })
        .unwrap_or_else(|| panic!("no manager set the label: {entries:#?}"));
    assert_eq!(label["manager"], "kubectl-label", "{label}");
    assert_eq!(label["operation"], "Update");
    assert!(
        label["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{label}"
    );
    // A write that changes nothing is no new version.
    let version = api.resource_version();
    kubectl
        .run(&[
            "label",
            "--overwrite",
            "namespace",
            "shop",
            "trellis.dev/inject=enabled",
        ])
        .await;
    assert_eq!(api.resource_version(), version);
}
