//! Rollouts in local mode, end to end: a Rollout manifest, the controller
//! moving the weights of the route it manages, gates read from the real
//! proxies' `/metrics`, and traffic through real sidecars showing what the
//! clients got at every step.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::jiff::Timestamp;
use tokio::net::TcpListener;
use trellis_control_plane::model::{ObjectKey, Phase, RolloutStatus, Verdict};
use trellis_control_plane::rollout::local;
use trellis_tests::*;

/// The frontend's pod, so the controller scrapes its proxy (the client
/// side of every request to `hello`).
fn frontend_yaml(admin: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: frontend
  annotations: {{trellis.dev/admin-port: \"{}\"}}
spec:
  serviceAccountName: frontend
  containers: [{{name: app, image: frontend}}, {{name: trellis-proxy, image: trellis-proxy}}]
status:
  podIP: {}
",
        admin.port(),
        admin.ip()
    )
}

fn rollout_yaml(spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1
kind: Rollout
metadata:
  name: hello
spec:
  service: hello
  backends: {{stable: hello-v1, canary: hello-v2}}
{spec}"
    )
}

fn key() -> ObjectKey {
    ObjectKey::new("default", "hello")
}

fn status(mesh: &HelloMesh) -> Option<RolloutStatus> {
    local::read_status(&mesh.manifests(), &key())
}

async fn wait_for(
    mesh: &HelloMesh,
    within: Duration,
    what: &str,
    done: impl Fn(&RolloutStatus) -> bool,
) -> RolloutStatus {
    eventually(within, what, || {
        let status = match status(mesh) {
            Some(s) if done(&s) => Ok(s),
            other => Err(format!("{other:#?}")),
        };
        async move { status }
    })
    .await
}

/// Every how many requests v2 fails (0: never). Each test is a process of
/// its own (nextest), so each has its own.
static FAIL_EVERY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn canary_fails_every(n: u64) {
    FAIL_EVERY.store(n, std::sync::atomic::Ordering::SeqCst);
}

/// A HelloMesh whose v2 fails every `fail_every`-th request (0: never),
/// with the frontend's pod in the manifests.
async fn start(fail_every: u64) -> HelloMesh {
    canary_fails_every(fail_every);
    let mesh = HelloMesh::start_with_apps(|listener: TcpListener, version: &str| {
        let fail: fn(u64) -> bool = if version == "v2" {
            |hit| {
                let every = FAIL_EVERY.load(std::sync::atomic::Ordering::SeqCst);
                every > 0 && hit % every == 0
            }
        } else {
            |_| false
        };
        scripted_app(listener, version, Duration::ZERO, fail);
    })
    .await;
    mesh.write_manifest("frontend.yaml", &frontend_yaml(mesh.client.admin_addr));
    mesh
}

/// Requests from several clients at once until stopped, each answer with
/// when it came and which version sent it (or its status / error).
struct Traffic {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    answers: Arc<Mutex<Vec<(SystemTime, String)>>>,
}

impl Traffic {
    fn start(
        mesh: &HelloMesh,
        clients: usize,
        headers: &'static [(&'static str, &'static str)],
    ) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (client, authority) = (mesh.http1(), mesh.authority());
                let (answers, stopped) = (answers.clone(), stopped.clone());
                tokio::spawn(async move {
                    while !*stopped.borrow() {
                        let answer = client.get_with(&authority, "/", headers).await;
                        let what = match answer {
                            Ok(a) if a.status.is_success() => {
                                a.greeting().map_or("unreadable".into(), |g| g.version)
                            }
                            Ok(a) => a.status.as_u16().to_string(),
                            Err(e) => format!("error: {e}"),
                        };
                        answers.lock().unwrap().push((SystemTime::now(), what));
                    }
                })
            })
            .collect();
        Self {
            stop,
            tasks,
            answers,
        }
    }

    async fn stop(self) -> Vec<(SystemTime, String)> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let answers = self.answers.lock().unwrap().clone();
        answers
    }
}

fn at(stamp: &str) -> SystemTime {
    let t: Timestamp = stamp.parse().expect("an RFC 3339 time");
    SystemTime::from(t)
}

/// Counts answers by what they were, between two times.
fn between(
    answers: &[(SystemTime, String)],
    from: SystemTime,
    to: SystemTime,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, what) in answers.iter().filter(|(t, _)| *t >= from && *t < to) {
        *counts.entry(what.clone()).or_insert(0) += 1;
    }
    counts
}

/// What a route file says the canary gets, in percent.
fn route_file(mesh: &HelloMesh) -> Option<String> {
    std::fs::read_to_string(mesh.manifests().join("rollout-default-hello-route.yaml")).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_walks_every_step_at_its_weight_and_is_promoted() {
    let mesh = start(0).await;
    let traffic = Traffic::start(&mesh, 6, &[]);
    let pause = Duration::from_secs(4);
    mesh.write_manifest(
        "rollout.yaml",
        &rollout_yaml(
            "  steps:
    - {weight: 10, pause: {duration: 4s}}
    - {weight: 50, pause: {duration: 4s}}
    - {weight: 100, pause: {duration: 4s}}
  analysis: {interval: 1s, minRequests: 20, successRate: 99, maxP99: 2s}
",
        ),
    );
    let done = wait_for(
        &mesh,
        Duration::from_secs(40),
        "the rollout is promoted",
        |s| s.phase == Phase::Promoted,
    )
    .await;
    // Traffic after the promotion: all v2.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = traffic.stop().await;

    let starts: Vec<(SystemTime, u32)> = done
        .history
        .iter()
        .filter(|d| ["Started", "StepPassed"].contains(&d.reason.as_str()))
        .map(|d| (at(&d.time), d.canary_weight))
        .collect();
    assert_eq!(
        starts.iter().map(|(_, w)| *w).collect::<Vec<_>>(),
        [10, 50, 100],
        "{:#?}",
        done.history
    );
    let promoted = at(&done.history.last().unwrap().time);
    let mut ends: Vec<SystemTime> = starts.iter().skip(1).map(|(t, _)| *t).collect();
    ends.push(promoted);
    // Proxies apply a new route within a second (manifest poll and push).
    let settle = Duration::from_secs(1);
    for ((start, weight), end) in starts.iter().zip(&ends) {
        let lasted = end.duration_since(*start).unwrap();
        assert!(
            lasted >= pause,
            "step {weight}% lasted {lasted:?}, less than its pause"
        );
        let counts = between(&answers, *start + settle, *end);
        let v1 = counts.get("v1").copied().unwrap_or(0);
        let v2 = counts.get("v2").copied().unwrap_or(0);
        assert_eq!(
            v1 + v2,
            counts.values().sum::<usize>(),
            "only greetings: {counts:?}"
        );
        assert!(
            v1 + v2 >= 1000,
            "enough requests at {weight}% to measure: {counts:?}"
        );
        let share = 100.0 * v2 as f64 / (v1 + v2) as f64;
        assert!(
            (share - f64::from(*weight)).abs() <= 3.0,
            "at step {weight}% the canary got {share:.1}% ({counts:?})"
        );
    }
    let after = between(&answers, promoted + settle, SystemTime::now());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["v2"],
        "after promotion: {after:?}"
    );
    let gates = &done.gates;
    assert!(
        gates.iter().all(|g| g.verdict == Verdict::Pass),
        "{gates:#?}"
    );
    assert!(route_file(&mesh).is_some_and(|r| r.contains("hello-v2") && !r.contains("hello-v1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_a_fifth_of_its_requests_is_rolled_back_within_one_window() {
    let mesh = start(5).await;
    let traffic = Traffic::start(&mesh, 4, &[]);
    let interval = Duration::from_secs(2);
    mesh.write_manifest(
        "rollout.yaml",
        &rollout_yaml(
            "  steps: [{weight: 20}, {weight: 50}, {weight: 100}]
  analysis: {interval: 2s, minRequests: 20, successRate: 99}
",
        ),
    );
    let done = wait_for(
        &mesh,
        Duration::from_secs(20),
        "the rollout is rolled back",
        |s| s.phase.is_final(),
    )
    .await;
    assert_eq!(done.phase, Phase::RolledBack, "{done:#?}");
    let rolled_back = at(&done.history.last().unwrap().time);
    let answers_so_far = traffic.answers.lock().unwrap().clone();
    let first_canary = answers_so_far
        .iter()
        .find(|(_, what)| what != "v1")
        .map(|(t, _)| *t)
        .expect("the canary got traffic");
    let took = rolled_back.duration_since(first_canary).unwrap_or_default();
    assert!(
        took <= interval + Duration::from_millis(500),
        "rolled back {took:?} after the canary got traffic (a window is {interval:?}): {:#?}",
        done.history
    );
    let gate = &done.gates[0];
    assert_eq!(
        (gate.name.as_str(), gate.verdict),
        ("success-rate", Verdict::Fail)
    );
    let rate = gate.value.expect("a measured success rate");
    assert!(
        (65.0..=92.0).contains(&rate),
        "the canary's success rate was {rate}%"
    );
    let condition = done
        .conditions
        .iter()
        .find(|c| c.kind == "Progressing")
        .unwrap();
    assert_eq!(condition.reason, "GateFailed");
    assert!(
        condition.message.contains("success-rate"),
        "{}",
        condition.message
    );

    // Proxies apply a route change within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let from = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = traffic.stop().await;
    let after = between(&answers, from, SystemTime::now());
    let late: Vec<String> = answers
        .iter()
        .filter(|(t, w)| *t >= rolled_back && w != "v1")
        .map(|(t, w)| format!("{:?} {w}", t.duration_since(rolled_back).unwrap()))
        .collect();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["v1"],
        "after the rollback: {after:?} {late:?}"
    );
    assert!(after["v1"] > 100, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_failures_allowed_two_failed_windows_then_a_good_one_do_not_roll_back() {
    let mesh = start(0).await;
    let traffic = Traffic::start(&mesh, 4, &[]);
    mesh.write_manifest(
        "rollout.yaml",
        &rollout_yaml(
            "  steps: [{weight: 50, pause: {}}, {weight: 100}]
  analysis:
    interval: 1s
    minRequests: 20
    successRate: 90
    rollback: {consecutiveFailures: 3}
",
        ),
    );
    let within = Duration::from_secs(15);
    wait_for(&mesh, within, "a passing window", |s| s.passed_windows >= 1).await;
    // Half the canary's requests fail for two windows, then none.
    canary_fails_every(2);
    wait_for(&mesh, within, "two failed windows", |s| {
        s.consecutive_failures == 2
    })
    .await;
    canary_fails_every(0);
    let recovered = wait_for(&mesh, within, "a good window after them", |s| {
        s.consecutive_failures == 0 && s.total_failures == 2
    })
    .await;
    assert_eq!(
        (recovered.phase, recovered.canary_weight),
        (Phase::Progressing, 50)
    );

    canary_fails_every(2);
    let done = wait_for(&mesh, within, "three failed windows in a row", |s| {
        s.phase.is_final()
    })
    .await;
    traffic.stop().await;
    assert_eq!(done.phase, Phase::RolledBack, "{done:#?}");
    assert_eq!((done.consecutive_failures, done.total_failures), (3, 5));
    let last = done.history.last().unwrap();
    assert!(
        last.message.contains("3 failed window(s) in a row"),
        "{}",
        last.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_requests_or_unreachable_metrics_pause_the_rollout_and_never_promote() {
    // No traffic at all: every window is inconclusive.
    let mesh = start(0).await;
    mesh.write_manifest(
        "rollout.yaml",
        &rollout_yaml(
            "  steps: [{weight: 100}]
  analysis: {interval: 1s, minRequests: 20, successRate: 99, inconclusiveLimit: 3}
",
        ),
    );
    let paused = wait_for(&mesh, Duration::from_secs(15), "the rollout pauses", |s| {
        s.phase == Phase::Paused
    })
    .await;
    let condition = paused
        .conditions
        .iter()
        .find(|c| c.kind == "Progressing")
        .unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "Inconclusive")
    );
    assert!(
        condition.message.contains("fewer than minRequests 20"),
        "{}",
        condition.message
    );
    assert_eq!(paused.inconclusive_windows, 3);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = status(&mesh).unwrap();
    assert_eq!((later.phase, later.step), (Phase::Paused, 0), "{later:#?}");
    assert!(later.history.iter().all(|d| d.reason != "Promoted"));

    // The frontend's metrics cannot be read: the source is unavailable.
    let dead = SocketAddr::new(
        mesh.client.admin_addr.ip(),
        free_port(mesh.client.admin_addr.ip()),
    );
    mesh.write_manifest("frontend.yaml", &frontend_yaml(dead));
    let traffic = Traffic::start(&mesh, 2, &[]);
    let unavailable = wait_for(
        &mesh,
        Duration::from_secs(15),
        "the source is reported unavailable",
        |s| {
            s.conditions
                .iter()
                .any(|c| c.reason == "MetricsUnavailable")
        },
    )
    .await;
    assert_eq!(unavailable.phase, Phase::Paused);
    let condition = unavailable
        .conditions
        .iter()
        .find(|c| c.kind == "Progressing")
        .unwrap();
    assert!(
        condition.message.contains("/metrics could be read"),
        "{}",
        condition.message
    );
    // The metrics are back with traffic: the rollout carries on by itself.
    mesh.write_manifest("frontend.yaml", &frontend_yaml(mesh.client.admin_addr));
    let promoted = wait_for(
        &mesh,
        Duration::from_secs(15),
        "the rollout resumes and promotes",
        |s| s.phase == Phase::Promoted,
    )
    .await;
    assert!(
        promoted.history.iter().any(|d| d.reason == "Resumed"),
        "{:#?}",
        promoted.history
    );
    traffic.stop().await;
}

fn free_port(ip: std::net::IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ab_rollout_sends_the_cohort_and_only_it_to_the_canary() {
    let mesh = start(0).await;
    mesh.write_manifest(
        "rollout.yaml",
        &rollout_yaml(
            "  abTest:
    match:
      headers: [{name: x-canary, value: \"yes\"}]
      cookies: [{name: cohort, value: beta}]
    windows: 100
  analysis: {interval: 1s, successRate: 99}
",
        ),
    );
    wait_for(
        &mesh,
        Duration::from_secs(10),
        "the A/B stage starts",
        |s| s.cohort,
    )
    .await;
    let client = mesh.http1();
    let authority = mesh.authority();
    let count = |headers: &'static [(&'static str, &'static str)]| {
        let (client, authority) = (client.clone(), authority.clone());
        async move {
            let mut seen = BTreeMap::new();
            for _ in 0..100 {
                let answer = client.get_with(&authority, "/", headers).await;
                let version = answer
                    .ok()
                    .and_then(|a| a.greeting())
                    .map_or("error".into(), |g| g.version);
                *seen.entry(version).or_insert(0) += 1;
            }
            seen
        }
    };
    let cohort: &[(&str, &str)] = &[("x-canary", "yes"), ("cookie", "theme=dark; cohort=beta")];
    eventually(Duration::from_secs(5), "the cohort reaches v2", || {
        let c = count(cohort);
        async move {
            let seen = c.await;
            (seen.get("v2") == Some(&100))
                .then_some(())
                .ok_or(format!("{seen:?}"))
        }
    })
    .await;
    let outsiders: [&'static [(&str, &str)]; 3] = [
        &[],
        &[("x-canary", "yes")],
        &[("x-canary", "no"), ("cookie", "cohort=beta")],
    ];
    for headers in outsiders {
        let seen = count(headers).await;
        assert_eq!(seen.get("v1"), Some(&100), "{headers:?}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_resumes_at_the_same_step_without_touching_the_weights() {
    let mut mesh = start(0).await;
    mesh.write_manifest(
        "rollout.yaml",
        &rollout_yaml(
            "  steps: [{weight: 30, pause: {}}, {weight: 100}]
  analysis: {interval: 1s, successRate: 99}
",
        ),
    );
    let before = wait_for(&mesh, Duration::from_secs(10), "step 1 serves", |s| {
        s.canary_weight == 30
    })
    .await;
    let route = eventually(Duration::from_secs(5), "the route file", || {
        let r = route_file(&mesh);
        async move { r.ok_or("none yet".to_string()) }
    })
    .await;

    // A crash, then a new controller on the same ports.
    let old = mesh.controller.take().expect("the controller");
    let (listen, admin) = (old.addr, old.admin_addr);
    old.kill();
    let mut config =
        trellis_control_plane::controller::ControllerConfig::local(mesh.dir.path(), listen.ip());
    (config.listen, config.admin) = (listen, admin);
    mesh.controller = Some(ControllerProcess::start(config));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let after = status(&mesh).unwrap();
    assert_eq!((after.step, after.canary_weight), (0, 30));
    assert!(!after.phase.is_final(), "{after:#?}");
    assert_eq!(
        after.step_started_at, before.step_started_at,
        "the same step, not a new one"
    );
    assert_eq!(after.run, before.run);
    assert_eq!(
        route_file(&mesh).as_deref(),
        Some(route.as_str()),
        "the route was not rewritten"
    );

    // The new controller carries on: a promote ends the step.
    let manifest = std::fs::read_to_string(mesh.manifests().join("rollout.yaml")).unwrap();
    mesh.write_manifest(
        "rollout.yaml",
        &manifest.replace("  steps:", "  promote: 0\n  steps:"),
    );
    wait_for(
        &mesh,
        Duration::from_secs(10),
        "the promoted step moves on",
        |s| s.canary_weight == 100,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rollouts_are_refused_with_a_reason_and_traffic_is_unchanged() {
    let mesh = start(0).await;
    let cases = [
        (
            "  backends: {stable: hello-v1, canary: hello-v3}\n  steps: [{weight: 50}]\n  analysis: {interval: 1s, successRate: 99}\n",
            "BackendNotFound",
            "no Service default/hello-v3",
        ),
        (
            "  steps: [{weight: 50}, {weight: 20}]\n  analysis: {interval: 1s, successRate: 99}\n",
            "InvalidSpec",
            "spec.steps[1].weight 20 is not above the step before (50)",
        ),
        (
            "  steps: [{weight: 150}]\n  analysis: {interval: 1s, successRate: 99}\n",
            "InvalidSpec",
            "spec.steps[0].weight 150 is not 1-100",
        ),
        (
            "  steps: [{weight: 50}]\n  analysis: {interval: 1s, successRate: 120}\n",
            "InvalidSpec",
            "successRate 120",
        ),
        (
            "  steps: [{weight: 50}]\n  analysis: {interval: 1s}\n",
            "InvalidSpec",
            "has no gate",
        ),
    ];
    for (spec, reason, message) in cases {
        // The backends line replaces the default one when a case has its own.
        let yaml = rollout_yaml(spec);
        let yaml = match spec.contains("backends") {
            true => yaml.replacen("  backends: {stable: hello-v1, canary: hello-v2}\n", "", 1),
            false => yaml,
        };
        mesh.write_manifest("rollout.yaml", &yaml);
        let refused = wait_for(&mesh, Duration::from_secs(10), reason, |s| {
            s.conditions
                .iter()
                .any(|c| c.kind == "Accepted" && c.status == "False" && c.message.contains(message))
        })
        .await;
        assert_eq!(refused.phase, Phase::Invalid);
        let accepted = refused
            .conditions
            .iter()
            .find(|c| c.kind == "Accepted")
            .unwrap();
        assert_eq!(accepted.reason, reason, "{accepted:?}");
        assert!(
            route_file(&mesh).is_none(),
            "no route was written for {spec}"
        );
    }
    // A route someone else manages.
    mesh.write_manifest(
        "other.yaml",
        &split_route(mesh.port, 100, 0, "").replace(
            "metadata: {name: hello}",
            "metadata: {name: hello, annotations: {trellis.dev/rollout: someone-else}}",
        ),
    );
    mesh.write_manifest(
        "rollout.yaml",
        &rollout_yaml("  route: hello\n  steps: [{weight: 50}]\n  analysis: {interval: 1s, successRate: 99}\n"),
    );
    let refused = wait_for(&mesh, Duration::from_secs(10), "a conflict", |s| {
        s.conditions.iter().any(|c| c.reason == "RouteConflict")
    })
    .await;
    let message = &refused
        .conditions
        .iter()
        .find(|c| c.kind == "Accepted")
        .unwrap()
        .message;
    assert!(
        message.contains("managed by rollout someone-else"),
        "{message}"
    );
    // Traffic is the other route's: all v1.
    let answers = burst(&mesh.http1(), &mesh.authority(), 50, 4).await;
    assert_eq!(
        versions(&answers).get("v1"),
        Some(&50),
        "{:?}",
        versions(&answers)
    );
}
