//! The cluster source at scale: a controller process (this binary, run again
//! with [`CONTROLLER_FLAG`]) watching the fake API server, which holds the
//! same Services and EndpointSlices as the in-memory run; the watchers follow
//! one Service; each change is applied through the API. Reported: the time
//! to the first complete list, change → every watcher (p50 / p99), and the
//! controller process's RSS at rest and at its peak during a full re-list
//! (a `410 Gone` for every watch at once).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use trellis_control_plane::controller::{Controller, ControllerConfig, Source};
use trellis_tests::fake_api::FakeApi;
use trellis_tests::rss_kib_of;

use super::{measure_changes, open_watchers, percentile, service};

/// Runs this binary as the controller: `--cluster-controller API_URL STATE_DIR`.
pub const CONTROLLER_FLAG: &str = "--cluster-controller";

/// The controller process: serves once its first list is complete, prints
/// its gRPC address, and exits when its standard input closes.
pub async fn run_controller(api: &str, state: &str) {
    let mut config = ControllerConfig::local(Path::new(state), [127, 0, 0, 1].into());
    config.source = Source::Cluster(Box::new(kube::Config::new(
        api.parse().expect("the API's URL"),
    )));
    let controller = Controller::start(config)
        .await
        .expect("the controller starts");
    println!("{}", controller.addr);
    let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut tokio::io::sink()).await;
}

fn apply_service(api: &FakeApi, i: usize, endpoints: usize, salt: usize) {
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&service(i, endpoints, salt)).expect("the bench's YAML");
    for mut document in documents {
        document["metadata"]["namespace"] = "default".into();
        api.apply(document);
    }
}

pub async fn bench(quick: bool) {
    let (services, endpoints, watchers, changes) = if quick {
        (100, 10, 20, 10)
    } else {
        (1000, 10, 100, 50)
    };
    let api = FakeApi::start().await;
    for i in 0..services {
        apply_service(&api, i, endpoints, 0);
    }
    let state = tempfile::tempdir().expect("tempdir");
    trellis_tests::cluster_ca::publish_ca(&api, state.path());
    let mut controller = tokio::process::Command::new(std::env::current_exe().expect("exe"))
        .args([CONTROLLER_FLAG, &api.url(), &state.path().to_string_lossy()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the controller process");
    let pid = controller.id().expect("the controller's pid");
    let started = Instant::now();
    let mut lines = BufReader::new(controller.stdout.take().expect("stdout")).lines();
    let addr = lines
        .next_line()
        .await
        .expect("read the controller's address")
        .expect("the controller printed its address");
    let first_list = started.elapsed();

    let addr = addr.parse().expect("the controller's address");
    let mut streams = open_watchers(addr, watchers).await;
    let latencies = measure_changes(&mut streams, changes, |change| {
        apply_service(&api, 7, endpoints, change)
    })
    .await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady = rss_kib_of(pid);
    let lists = || api.requests("list", "endpointslices") + api.requests("list", "pods");
    let before = lists();
    api.expire_history();
    api.drop_watches();
    let relist = Instant::now();
    let mut peak = steady;
    // Until both big kinds were listed again, and a second more.
    let mut done_at = None;
    while done_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(1)) {
        peak = peak.max(rss_kib_of(pid));
        if done_at.is_none() && lists() >= before + 2 {
            done_at = Some(Instant::now());
        }
        assert!(
            relist.elapsed() < Duration::from_secs(30),
            "no re-list within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = rss_kib_of(pid);
    drop(controller.stdin.take());

    println!(
        "| cluster source: {services} Services × {endpoints} endpoints listed, controller serving | {:.0} ms |",
        first_list.as_secs_f64() * 1000.0
    );
    println!(
        "| cluster source: API change → all {watchers} watchers, p50 / p99 ({changes} changes) | {:.2} ms / {:.2} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!(
        "| cluster source: controller RSS at rest / peak during a full re-list / after | {} / {} / {} KiB ({:.2}×) |",
        steady,
        peak,
        after,
        peak as f64 / steady.max(1) as f64
    );
}
