//! High availability in cluster mode: two controllers against one (fake)
//! API server both serve discovery and identity, exactly one holds the
//! `coordination.k8s.io/v1` Lease, and losing it — by a crash or a graceful
//! stop — hands the Lease to the other while the proxies connected to the
//! survivor go on serving. Controllers run on runtimes of their own and are
//! killed as a crashed pod is (every task and socket dropped at once).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_control_plane::controller::ControllerConfig;
use trellis_control_plane::lease::LEASE_NAME;
use trellis_proto::discovery::endpoint_update;
use trellis_proto::CONTROLLER_NAMESPACE;
use trellis_tests::fake_api::FakeApi;
use trellis_tests::{
    eventually, hello_app, metric, pod_yaml, service_yaml, AppClient, ControllerProcess, Mesh,
    RequestLoop,
};

/// Short, so a takeover after a crash is quick to wait for; long enough
/// that renewals (every second) survive a loaded test machine.
const LEASE: Duration = Duration::from_secs(3);
/// How late after the lease duration a takeover may come: the survivor
/// reads the Lease every tenth of the duration, and the request takes time.
const POLL_SLACK: Duration = Duration::from_millis(800);
const LEADER: &str = "trellis_controller_leader";

async fn api_server() -> Arc<FakeApi> {
    Arc::new(FakeApi::start().await)
}

/// Waits until the controller at `admin` says it leads and the Lease names
/// a holder other than `previous`.
async fn takes_over(api: &FakeApi, admin: SocketAddr, previous: &str, within: Duration) {
    eventually(within, "the controller takes the Lease", || async {
        match (metric(admin, LEADER, &[]).await, holder(api)) {
            (1.0, Some(now)) if now != previous => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Waits until the controller at `admin` reports `leader` as its metric.
async fn leads(admin: SocketAddr, leader: bool, within: Duration) {
    let wanted = f64::from(u8::from(leader));
    eventually(within, "the controller's leader metric", || async {
        match metric(admin, LEADER, &[]).await {
            value if value == wanted => Ok(()),
            other => Err(format!("{other}, not {wanted}")),
        }
    })
    .await;
}

/// Points a controller at the fake API server, with a short Lease.
fn in_cluster(config: &mut ControllerConfig, api: &FakeApi) {
    trellis_tests::cluster_ca::in_cluster(config, api);
    config.lease_duration = LEASE;
}

/// The controllers' Lease as the API server has it.
fn lease(api: &FakeApi) -> Option<Value> {
    api.objects("coordination.k8s.io/v1", "Lease")
        .into_iter()
        .find(|l| {
            l["metadata"]["name"] == LEASE_NAME
                && l["metadata"]["namespace"] == CONTROLLER_NAMESPACE
        })
}

fn holder(api: &FakeApi) -> Option<String> {
    let holder = lease(api)?["spec"]["holderIdentity"].as_str()?.to_string();
    Some(holder)
}

fn transitions(api: &FakeApi) -> i64 {
    lease(api).map_or(0, |l| l["spec"]["leaseTransitions"].as_i64().unwrap_or(0))
}

/// Which of the controllers say they lead, by their `/metrics`.
async fn leading(admins: &[SocketAddr]) -> Vec<f64> {
    let mut values = Vec::new();
    for admin in admins {
        values.push(metric(*admin, LEADER, &[]).await);
    }
    values
}

/// The endpoint IPs a discovery watch on the controller at `addr` is first
/// told for `authority`.
async fn discovered(addr: SocketAddr, authority: &str) -> Result<Vec<String>, String> {
    let mut stream = trellis_tests::watch_endpoints(&format!("http://{addr}"), authority).await?;
    let first = stream.message().await.map_err(|e| e.to_string())?;
    match first.and_then(|update| update.kind) {
        Some(endpoint_update::Kind::Snapshot(snapshot)) => {
            Ok(snapshot.endpoints.into_iter().map(|e| e.ip).collect())
        }
        other => Err(format!("not a snapshot: {other:?}")),
    }
}

/// Two controllers sharing a CA (the issuer's Secret and the roots' ConfigMap),
/// watching one API server: `leader`, and the mesh's controller (the one
/// its proxies connect to), which follows.
struct Pair {
    api: Arc<FakeApi>,
    mesh: Mesh,
    leader: ControllerProcess,
}

impl Pair {
    async fn start() -> Self {
        let api = api_server().await;
        let mut mesh = Mesh::start_in_cluster_with(api.clone(), |c| c.lease_duration = LEASE).await;
        let first = mesh.controller.take().expect("the first controller");
        let mut config = ControllerConfig::local(mesh.dir.path(), first.addr.ip());
        in_cluster(&mut config, &api);
        let second = ControllerProcess::start(config);

        let admins = [first.admin_addr, second.admin_addr];
        let first_leads = eventually(LEASE * 2, "exactly one controller leads", || async {
            match (leading(&admins).await.as_slice(), holder(&api)) {
                ([a, b], Some(_)) if a + b == 1.0 => Ok(*a == 1.0),
                (values, holder) => Err(format!("leader metrics {values:?}, holder {holder:?}")),
            }
        })
        .await;
        let (leader, follower) = if first_leads {
            (first, second)
        } else {
            (second, first)
        };
        mesh.controller = Some(follower);
        Self { api, mesh, leader }
    }

    fn follower(&self) -> &ControllerProcess {
        self.mesh.controller.as_ref().expect("the follower")
    }

    /// Loses the leader (`ControllerProcess::kill` or `::stop`); the API
    /// server and the mesh, with the follower, remain.
    fn lose_leader(self, how: impl FnOnce(ControllerProcess)) -> (Arc<FakeApi>, Mesh) {
        how(self.leader);
        (self.api, self.mesh)
    }

    fn admins(&self) -> [SocketAddr; 2] {
        [self.leader.admin_addr, self.follower().admin_addr]
    }

    /// The Service `hello` (one pod, meshed) in the API, and a client
    /// sidecar routing to it; both sidecars connected to the follower.
    async fn hello_through_follower(
        &mut self,
    ) -> (AppClient, String, IpAddr, Vec<trellis_proxy::Proxy>) {
        let ip = self.mesh.pod_ip();
        let app = hello_app(ip, "v1").await;
        let server = self.mesh.proxy(ip, "hello").await;
        let docs = [
            pod_yaml("hello-v1", "hello", "v1", server.inbound_addr.port()),
            service_yaml("hello", app.port(), &[("hello-v1", ip)]),
        ];
        self.api.apply_yaml(&docs.join("---\n"));
        let client_ip = self.mesh.pod_ip();
        let client = self.mesh.proxy(client_ip, "frontend").await;
        let authority = format!("hello.default.svc.cluster.local:{}", app.port());
        let http = AppClient::http1(client.outbound_addr);
        http.wait_routable(&authority).await;
        (http, authority, ip, vec![server, client])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_serve_discovery_one_leads_and_a_crashed_leader_is_replaced_within_a_lease() {
    let mut pair = Pair::start().await;
    let (http, authority, ip, _proxies) = pair.hello_through_follower().await;

    // Both replicas serve discovery from the API's objects.
    for addr in [pair.leader.addr, pair.follower().addr] {
        let endpoints = eventually(Duration::from_secs(5), "discovery serves hello", || {
            let authority = authority.clone();
            async move {
                let endpoints = discovered(addr, &authority).await?;
                (!endpoints.is_empty())
                    .then_some(endpoints)
                    .ok_or("none yet".to_string())
            }
        })
        .await;
        assert_eq!(endpoints, vec![ip.to_string()], "from {addr}");
    }

    // The leader holds the Lease and keeps it: renewed, not taken.
    let held_by = holder(&pair.api).expect("a holder");
    let renewed_at = lease(&pair.api).expect("the Lease")["spec"]["renewTime"].clone();
    let taken = transitions(&pair.api);
    tokio::time::sleep(LEASE).await;
    assert_eq!(
        holder(&pair.api).as_ref(),
        Some(&held_by),
        "still the leader's"
    );
    assert_eq!(
        transitions(&pair.api),
        taken,
        "no takeover while the leader renews"
    );
    assert_ne!(
        lease(&pair.api).expect("the Lease")["spec"]["renewTime"],
        renewed_at
    );
    assert_eq!(leading(&pair.admins()).await, vec![1.0, 0.0]);
    let spec = lease(&pair.api).expect("the Lease")["spec"].clone();
    assert_eq!(spec["leaseDurationSeconds"], LEASE.as_secs());
    assert!(spec["acquireTime"].is_string(), "{spec}");

    // The leader crashes while requests flow through the follower's proxies.
    let requests = RequestLoop::start(http, &authority);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let survivor = pair.follower().admin_addr;
    let crashed = Instant::now();
    let (api, _mesh) = pair.lose_leader(ControllerProcess::kill);
    takes_over(&api, survivor, &held_by, LEASE + POLL_SLACK).await;
    let handover = crashed.elapsed();
    assert_eq!(transitions(&api), taken + 1, "one takeover");
    // Not earlier than the Lease allows: the crashed leader's was valid.
    assert!(
        handover >= LEASE / 2,
        "taken after {handover:?}, before it could expire"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = requests.stop().await;
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok(answer) if answer.status.is_success()))
        .collect();
    assert!(answers.len() > 20, "only {} requests", answers.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
    eprintln!(
        "handover after {handover:?}; {} requests, 0 failed",
        answers.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_gracefully_hands_the_lease_over_at_once() {
    let pair = Pair::start().await;
    let held_by = holder(&pair.api).expect("a holder");
    let taken = transitions(&pair.api);
    let survivor = pair.follower().admin_addr;
    let stopped = Instant::now();
    let (api, _mesh) = pair.lose_leader(ControllerProcess::stop);
    // A released Lease is free at once: taken at the survivor's next read,
    // far sooner than an expiry could allow.
    takes_over(&api, survivor, &held_by, LEASE / 2).await;
    assert_eq!(transitions(&api), taken + 1);
    eprintln!("handover after {:?}", stopped.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewal_conflicts_rereads_and_yields_to_a_valid_holder() {
    let api = api_server().await;
    let mesh = Mesh::start_in_cluster_with(api.clone(), |c| c.lease_duration = LEASE).await;
    let admin = mesh.controller.as_ref().expect("controller").admin_addr;
    leads(admin, true, LEASE).await;

    // Someone else writes the Lease: the leader's next renewal carries a
    // stale resourceVersion.
    let mut intruded = lease(&api).expect("the Lease");
    intruded["spec"]["holderIdentity"] = json!("intruder");
    intruded["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
    let taken = transitions(&api);
    api.apply(intruded);
    leads(admin, false, LEASE).await;
    assert!(
        api.request_log()
            .iter()
            .any(|r| r.starts_with("PUT") && r.contains("/leases/") && r.ends_with("409")),
        "the renewal conflicted: {:?}",
        api.request_log()
    );
    // The intruder never renews (its renewTime is years old, which does
    // not matter: only how long the Lease goes unchanged does); once that
    // is a lease duration, the controller takes it back.
    let stepped_down = Instant::now();
    takes_over(&api, admin, "intruder", LEASE + POLL_SLACK).await;
    assert!(
        stepped_down.elapsed() >= LEASE / 2,
        "waited for the intruder's Lease to expire"
    );
    assert_eq!(transitions(&api), taken + 1);
}
