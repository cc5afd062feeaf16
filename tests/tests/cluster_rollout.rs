//! Rollouts in cluster mode: controllers against the fake API server (the
//! status through the Rollout's `/status`, the route by server-side apply),
//! their gates read from a real Prometheus (Debian `prometheus`, started
//! here) scraping the mesh's proxies, and a rollout handed from one replica
//! to another with the Lease. The real `kubectl` reads and commands the
//! rollouts and watches the route.
//!
//! The pods here have no IPs in the API, so the controllers could not scrape
//! the proxies themselves: a gate value can only have come from Prometheus.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use trellis_control_plane::controller::ControllerConfig;
use trellis_control_plane::lease::LEASE_NAME;
use trellis_proto::CONTROLLER_NAMESPACE;
use trellis_tests::fake_api::{FakeApi, Kubectl};
use trellis_tests::prometheus::{self, Prometheus};
use trellis_tests::{eventually, metric, versions, ControllerProcess, HelloMesh, RequestLoop};

/// Short, so a takeover after a crash is quick to wait for.
const LEASE: Duration = Duration::from_secs(3);
/// The survivor reads the Lease every tenth of its duration; requests take time.
const TAKEOVER: Duration = Duration::from_millis(3800);
const ROLLOUT: (&str, &str) = ("trellis.dev/v1alpha1", "Rollout");
const ROUTE: (&str, &str) = ("gateway.networking.k8s.io/v1", "HTTPRoute");

/// A cluster-mode `hello` mesh whose controller's gates ask a Prometheus
/// that scrapes every proxy each second, with requests flowing through the
/// frontend's sidecar.
struct Cluster {
    api: Arc<FakeApi>,
    mesh: HelloMesh,
    prometheus: Prometheus,
    prometheus_url: String,
    traffic: Option<RequestLoop>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Option<Self> {
        let binary = prometheus::binary()?;
        let api = Arc::new(FakeApi::start().await);
        // The controller is told where Prometheus will be before the
        // proxies it is to scrape exist.
        let addr = prometheus::free_addr();
        let prometheus_url = prometheus::url(addr);
        let mesh = HelloMesh::start_in_cluster_with(api.clone(), |config| {
            config.prometheus = Some(prometheus_url.clone());
            config.lease_duration = LEASE;
        })
        .await;
        let mut proxies = vec![mesh.client.admin_addr];
        proxies.extend(mesh.hello.iter().map(|(_, p)| p.admin_addr));
        let dir = tempfile::tempdir().expect("tempdir");
        let prometheus =
            Prometheus::start_at(&binary, dir.path(), addr, &[("trellis-proxies", proxies)]).await;
        let traffic = Some(RequestLoop::start(mesh.http1(), &mesh.authority()));
        // Gates need rates, so a few scrapes of the frontend's requests.
        prometheus
            .until_result(
                "count_over_time(trellis_requests_total{direction=\"outbound\",dst_service=\"hello\"}[1m]) >= 3",
                Duration::from_secs(30),
            )
            .await;
        Some(Self {
            api,
            mesh,
            prometheus,
            prometheus_url,
            traffic,
            _dir: dir,
        })
    }

    /// A second replica sharing the first's CA and Prometheus.
    fn second_controller(&self) -> ControllerProcess {
        let ip = self.mesh.controller_addr().ip();
        let mut config = ControllerConfig::local(self.mesh.dir.path(), ip);
        trellis_tests::cluster_ca::in_cluster(&mut config, &self.api);
        config.lease_duration = LEASE;
        config.prometheus = Some(self.prometheus_url.clone());
        ControllerProcess::start(config)
    }

    /// The rollout `hello` as the API server has it.
    fn rollout(&self) -> Value {
        self.api
            .objects(ROLLOUT.0, ROLLOUT.1)
            .into_iter()
            .find(|r| r["metadata"]["name"] == "hello")
            .expect("the Rollout hello")
    }

    /// Waits until the rollout's status satisfies `done` (a description of
    /// what is awaited on failure), and returns the status.
    async fn status_until(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        eventually(within, what, || {
            let status = self.rollout()["status"].clone();
            let ok = done(&status);
            async move {
                if ok {
                    Ok(status)
                } else {
                    Err(format!("status: {status:#}"))
                }
            }
        })
        .await
    }

    /// The HTTPRoute `hello` as the API server has it (`Null` if none).
    fn route(&self) -> Value {
        self.api
            .objects(ROUTE.0, ROUTE.1)
            .into_iter()
            .find(|r| r["metadata"]["name"] == "hello")
            .unwrap_or_default()
    }

    async fn stop_traffic(&mut self) -> Vec<Result<trellis_tests::Answer, String>> {
        match self.traffic.take() {
            Some(traffic) => traffic.stop().await,
            None => Vec::new(),
        }
    }
}

/// A Rollout `hello` of the Service `hello`, from `hello-v1` to `hello-v2`.
fn rollout(steps: Value, interval: &str) -> Value {
    json!({
        "apiVersion": ROLLOUT.0, "kind": ROLLOUT.1,
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {
            "service": "hello",
            "backends": {"stable": "hello-v1", "canary": "hello-v2"},
            "steps": steps,
            "analysis": {
                "interval": interval,
                "successRate": 99,
                // A window whose series only just began can count too few.
                "inconclusiveLimit": 5,
            },
        },
    })
}

/// The canary's share in an HTTPRoute's backendRefs, percent.
fn canary_weight<'a>(backends: impl IntoIterator<Item = (&'a str, u64)>) -> u64 {
    let (mut canary, mut total) = (0, 0);
    for (name, weight) in backends {
        total += weight;
        if name == "hello-v2" {
            canary += weight;
        }
    }
    (100 * canary).checked_div(total).unwrap_or(0)
}

fn route_weight(route: &Value) -> u64 {
    let refs = route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["backendRefs"].as_array().into_iter().flatten());
    canary_weight(refs.map(|r| {
        (
            r["name"].as_str().unwrap_or_default(),
            r["weight"].as_u64().unwrap_or(1),
        )
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_gated_by_prometheus_promotes_and_its_status_shows_the_measured_gate() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let Some(kubectl) = Kubectl::new(&cluster.api) else {
        return;
    };
    cluster
        .api
        .apply(rollout(json!([{"weight": 20}, {"weight": 50}]), "3s"));

    // The whole status is written from the first step on, defaults too.
    cluster
        .status_until(Duration::from_secs(10), "the rollout starts", |s| {
            s["phase"] == "Progressing" && s["step"] == 0 && s["canaryWeight"] == 20
        })
        .await;

    let status = cluster
        .status_until(Duration::from_secs(60), "the rollout is promoted", |s| {
            s["phase"] == "Promoted"
        })
        .await;
    assert_eq!(status["canaryWeight"], 100, "{status:#}");
    let gate = status["gates"]
        .as_array()
        .and_then(|gates| gates.iter().find(|g| g["name"] == "success-rate"))
        .unwrap_or_else(|| panic!("no success-rate gate: {status:#}"));
    assert_eq!(gate["verdict"], "Pass", "{gate}");
    assert_eq!(
        gate["value"], 100.0,
        "hello-v2 never fails, as Prometheus counted it: {gate}"
    );
    assert!(
        status["canary"]["requests"].as_f64().unwrap_or(0.0) >= 20.0,
        "the last window's canary requests: {status:#}"
    );
    let reasons: Vec<&str> = status["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["reason"].as_str())
        .collect();
    assert!(!reasons.is_empty(), "no decisions recorded: {status:#}");

    // kubectl reads the same status.
    let listed: Value = serde_json::from_str(
        &kubectl
            .run(&["get", "rollouts.trellis.dev", "-n", "default", "-o", "json"])
            .await,
    )
    .expect("kubectl prints JSON");
    let items = listed["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{listed:#}");
    let printed = &items[0]["status"];
    assert_eq!(printed["phase"], "Promoted", "{printed:#}");
    assert_eq!(
        printed["gates"][0]["value"].as_f64(),
        Some(100.0),
        "{printed:#}"
    );

    // The route the rollout manages sends everything to the canary, and
    // the frontend's requests follow it.
    let route = cluster.route();
    assert_eq!(route_weight(&route), 100, "{route:#}");
    assert_eq!(
        route["metadata"]["annotations"]["trellis.dev/rollout"], "hello",
        "{route:#}"
    );
    cluster.stop_traffic().await;
    let client = cluster.mesh.http1();
    let authority = cluster.mesh.authority();
    eventually(
        Duration::from_secs(5),
        "requests reach hello-v2 only",
        || {
            let (client, authority) = (client.clone(), authority.clone());
            async move {
                let answers = trellis_tests::burst(&client, &authority, 40, 2).await;
                let seen = versions(&answers);
                match seen.get("v2") {
                    Some(40) => Ok(()),
                    _ => Err(format!("{seen:?}")),
                }
            }
        },
    )
    .await;
    drop(cluster.prometheus);
}

/// Every version of the HTTPRoute `hello` as `kubectl get --watch` prints
/// it: when, its resourceVersion and its canary weight.
struct RouteWatch {
    seen: Arc<Mutex<Vec<(Instant, String, u64)>>>,
    _kubectl: tokio::process::Child,
}

impl RouteWatch {
    fn start(kubectl: &Kubectl) -> Self {
        // JSON, one object after another: kubectl's jsonpath printer prints
        // a template with `range` for the first object of a watch only.
        let mut child = kubectl
            .command(&[
                "get",
                "httproutes.gateway.networking.k8s.io",
                "-n",
                "default",
                "--watch",
                "-o",
                "json",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl starts");
        let mut stdout = child.stdout.take().expect("kubectl's stdout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = stdout.read(&mut chunk).await {
                buffer.extend_from_slice(&chunk[..n]);
                let mut objects =
                    serde_json::Deserializer::from_slice(&buffer).into_iter::<Value>();
                let mut consumed = 0;
                while let Some(Ok(route)) = objects.next() {
                    consumed = objects.byte_offset();
                    if route["metadata"]["name"] == "hello" {
                        let version = route["metadata"]["resourceVersion"].to_string();
                        let weight = route_weight(&route);
                        record
                            .lock()
                            .unwrap()
                            .push((Instant::now(), version, weight));
                    }
                }
                buffer.drain(..consumed);
            }
        });
        Self {
            seen,
            _kubectl: child,
        }
    }

    /// The canary weights in the order the route had them, each once.
    fn weights(&self) -> Vec<u64> {
        let mut weights: Vec<u64> = Vec::new();
        for (_, _, weight) in self.seen.lock().unwrap().iter() {
            if weights.last() != Some(weight) {
                weights.push(*weight);
            }
        }
        weights
    }

    /// Waits until kubectl has seen the route at `weight`.
    async fn until(&self, weight: u64, cluster: &Cluster) {
        let what = format!("kubectl sees the route at {weight}%");
        eventually(Duration::from_secs(5), &what, || {
            let weights = self.weights();
            let stored = route_weight(&cluster.route());
            async move {
                match weights.last() {
                    Some(last) if *last == weight => Ok(()),
                    _ => Err(format!(
                        "watched {weights:?}; the API's route is at {stored}%"
                    )),
                }
            }
        })
        .await
    }

    /// When the route first had `weight`.
    fn first(&self, weight: u64) -> Option<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .find(|(_, _, w)| *w == weight)
            .map(|(t, _, _)| *t)
    }
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    api.objects("coordination.k8s.io/v1", "Lease")
        .into_iter()
        .find(|l| {
            l["metadata"]["name"] == LEASE_NAME
                && l["metadata"]["namespace"] == CONTROLLER_NAMESPACE
        })?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

const LEADER: &str = "trellis_controller_leader";

async fn leading(admins: &[SocketAddr]) -> Vec<f64> {
    let mut values = Vec::new();
    for admin in admins {
        values.push(metric(*admin, LEADER, &[]).await);
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_resumes_a_rollout_at_its_step_with_no_weight_change() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let Some(kubectl) = Kubectl::new(&cluster.api) else {
        return;
    };
    let second = cluster.second_controller();
    let first_admin = cluster
        .mesh
        .controller
        .as_ref()
        .expect("controller")
        .admin_addr;
    let admins = [first_admin, second.admin_addr];
    let first_leads = eventually(LEASE * 2, "exactly one controller leads", || async {
        match leading(&admins).await.as_slice() {
            [a, b] if a + b == 1.0 => Ok(*a == 1.0),
            values => Err(format!("leader metrics {values:?}")),
        }
    })
    .await;
    let held_by = lease_holder(&cluster.api).expect("a Lease holder");

    // 20% for at least two windows, then 50% until promoted.
    let routes = RouteWatch::start(&kubectl);
    cluster.api.apply(rollout(
        json!([{"weight": 20, "pause": {"duration": "4s"}}, {"weight": 50, "pause": {}}]),
        "2s",
    ));
    let before = cluster
        .status_until(Duration::from_secs(60), "the rollout reaches 50%", |s| {
            s["step"] == 1 && s["canaryWeight"] == 50
        })
        .await;
    routes.until(50, &cluster).await;

    // The leader crashes; the other replica takes the Lease.
    let (survivor, _survivor_process) = if first_leads {
        cluster.mesh.controller.take().expect("the leader").kill();
        (second.admin_addr, Some(second))
    } else {
        second.kill();
        (first_admin, None)
    };
    eventually(TAKEOVER + LEASE, "the survivor takes the Lease", || async {
        match (
            metric(survivor, LEADER, &[]).await,
            lease_holder(&cluster.api),
        ) {
            (1.0, Some(now)) if now != held_by => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Two gate windows under the new leader: the rollout holds where it was.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = cluster.rollout()["status"].clone();
    for field in ["step", "canaryWeight", "run", "stepStartedAt"] {
        assert_eq!(
            after[field], before[field],
            "{field} changed across the hand-over:\nbefore {before:#}\nafter {after:#}"
        );
    }
    assert!(
        after["phase"] == "Progressing" || after["phase"] == "Paused",
        "{after:#}"
    );

    // Promoted (as `meshctl rollout promote` does) under the new leader.
    let promoted = Instant::now();
    kubectl
        .run(&[
            "patch",
            "rollouts.trellis.dev",
            "hello",
            "-n",
            "default",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"promote":1}}"#,
        ])
        .await;
    let status = cluster
        .status_until(Duration::from_secs(10), "the new leader promotes", |s| {
            s["phase"] == "Promoted"
        })
        .await;
    assert_eq!(status["canaryWeight"], 100, "{status:#}");
    routes.until(100, &cluster).await;
    assert_eq!(
        routes.weights(),
        [20, 50, 100],
        "the route's canary weights, each version: {:?}",
        routes.seen.lock().unwrap()
    );
    assert!(
        routes.first(100).is_some_and(|t| t >= promoted),
        "100% before the promote"
    );
    let answers = cluster.stop_traffic().await;
    assert!(answers.len() > 100, "only {} requests", answers.len());
}
