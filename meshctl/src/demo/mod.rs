//! `meshctl demo`: a whole mesh on one laptop, as separate processes — the
//! controller, a sidecar per pod, and the apps — each pod on its own loopback
//! address, with traffic from frontend to hello and a live summary.

pub mod apps;
pub mod manifests;
pub mod rollout;
pub mod scenario;
mod supervise;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::context::{self, Context};
use anyhow::{bail, Context as _};
use apps::Greeting;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use manifests::{DemoPod, ADMIN_PORT, APP_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::sync::{mpsc, Semaphore};
use trellis_control_plane::identity::{BootstrapTokens, BUNDLE};
use trellis_proto::SpiffeId;

use crate::report::{Report, Sample};
use scenario::{Probe, Scenario, Schedule, Target};
use supervise::{Process, Supervisor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Run this many seconds, print the summary and stop (exit status 0 only
    /// if at least 99% of requests succeeded; under `chaos`, if the run
    /// completed; under `rollout`, if the rollout was promoted, and under
    /// `rollout-bad`, if it was rolled back). Without it: until Ctrl-C.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
    /// `chaos`: while traffic runs, stop (SIGTERM) and crash (SIGKILL) the
    /// `hello-v2` pod's sidecar and app every 5–8 s; the demo restarts them
    /// and the summary lists each disruption, restarts and failed requests.
    /// `rollout`: all traffic starts on hello-v1, then `meshctl rollout
    /// start` moves it to hello-v2 (20%, 50%, 100%) behind a 99% success
    /// gate; `rollout-bad`: the same with a hello-v2 failing 20% of its
    /// requests, which the rollout rolls back. Their summary lists the
    /// rollout's decisions and when they happened.
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// `json` makes the last line on stdout one JSON object.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
    /// Requests per second from the load generator to the frontend.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rps: u32,
    /// Keep manifests, keys and logs here (default: a temporary directory,
    /// removed at the end). Edit `manifests/` while the demo runs.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Write a Prometheus scrape config for the demo's proxies and
    /// controller to this file (point `prometheus --config.file` at it).
    #[arg(long, value_name = "FILE")]
    prometheus_config: Option<PathBuf>,
    /// Lifetime of the workload certificates.
    #[arg(long, default_value = "24h", value_parser = trellis_control_plane::identity::parse_leaf_lifetime)]
    leaf_lifetime: Duration,
}

const TRUST_DOMAIN: &str = "cluster.local";
const CONTROLLER_PORT: u16 = 8090;
const CONTROLLER_ADMIN_PORT: u16 = 9990;
/// The pod `--scenario chaos` disrupts; hello-v1 keeps serving meanwhile.
const CHAOS_POD: &str = "hello-v2";

pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let temp;
    let state_dir = match &args.state_dir {
        // Absolute, so commands run from another directory find it through the context.
        Some(dir) => {
            std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("trellis-demo-")
                .tempdir()
                .context("creating a state directory")?;
            temp.path().to_path_buf()
        }
    };
    let manifests_dir = state_dir.join("manifests");
    let logs = state_dir.join("logs");
    for dir in [&manifests_dir, &logs, &state_dir.join("tokens")] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let base = free_loopback_block().await?;
    let pods = manifests::pods(base);
    std::fs::write(manifests_dir.join("demo.yaml"), manifests::render(&pods))
        .context("writing the demo manifests")?;
    if rollout::expected(args.scenario).is_some() {
        // A rollout splits the Service by backend: before it, everything
        // goes to the stable one (and the rollout adopts this route).
        std::fs::write(
            manifests_dir.join(manifests::route_file("hello")),
            manifests::route_all_to("hello", "hello-v1"),
        )
        .context("writing the route of hello")?;
    }

    let say = |line: String| match args.output {
        Output::Table => println!("{line}"),
        Output::Json => eprintln!("{line}"),
    };
    let mut children = Supervisor::new(logs.clone())?;
    let result = async {
        let controller = SocketAddr::from((Ipv4Addr::new(base[0], base[1], base[2], 1), CONTROLLER_PORT));
        let admin = SocketAddr::new(controller.ip(), CONTROLLER_ADMIN_PORT);
        let lifetime = format!("{}ms", args.leaf_lifetime.as_millis());
        let controller_process = children.start("controller", &[], &[
            "controller", "--manifests", path(&manifests_dir)?, "--state-dir", path(&state_dir)?,
            "--listen", &controller.to_string(), "--admin", &admin.to_string(),
            "--trust-domain", TRUST_DOMAIN, "--leaf-lifetime", &lifetime,
        ])?;
        wait_for_port(controller, &controller_process).await?;

        let tokens = BootstrapTokens::load_or_create(&state_dir).context("opening the bootstrap tokens")?;
        let mut processes = Vec::new();
        for pod in &pods {
            let fail = rollout::canary_fail_percent(args.scenario).filter(|_| pod.name == "hello-v2");
            let app_env: Vec<(&str, String)> =
                fail.map(|p| (apps::FAIL_PERCENT_ENV, p.to_string())).into_iter().collect();
            processes.push(start_pod(&mut children, pod, &app_env, controller, &tokens, &state_dir)?);
        }
        for (pod, (_, proxy)) in pods.iter().zip(&processes) {
            let hint = || format!("{} restarts; see {}", proxy.status().restarts, proxy.log().display());
            wait_ready(pod.ip, &format!("the proxy of {}", pod.name), hint).await?;
        }
        say(format!("Trellis demo mesh is up (state and logs in {}):", state_dir.display()));
        say(format!("  controller  {controller}  admin http://{admin}/ready"));
        for pod in &pods {
            say(format!(
                "  {:<10}  app {}:{APP_PORT}  proxy outbound :{OUTBOUND_PORT} inbound :{INBOUND_PORT} admin http://{}:{ADMIN_PORT}/ready",
                pod.name, pod.ip, pod.ip
            ));
        }
        say(format!("  manifests   {} (edit them while the demo runs)", manifests_dir.display()));
        let context = Context {
            manifests: manifests_dir.clone(),
            controller: controller.to_string(),
            proxies: pods.iter().map(|p| (p.name.to_string(), format!("http://{}:{ADMIN_PORT}", p.ip))).collect(),
            pid: std::process::id(),
            state_dir: state_dir.clone(),
            trust_domain: TRUST_DOMAIN.into(),
        };
        context.save(&context::path()).context("writing the meshctl context")?;
        if let Some(file) = &args.prometheus_config {
            let proxies: Vec<String> = pods.iter().map(|p| format!("{}:{ADMIN_PORT}", p.ip)).collect();
            std::fs::write(file, prometheus_config(&proxies, &admin.to_string()))
                .with_context(|| format!("writing {}", file.display()))?;
            say(format!("  prometheus  scrape config written to {}", file.display()));
        }
        match rollout::expected(args.scenario) {
            Some(_) => say(format!(
                "In {:.0} s the demo runs `{}`; follow it in another terminal: meshctl rollout status hello --watch",
                rollout::START_AFTER.as_secs_f64(),
                rollout::command_line()
            )),
            None => say("Try, in another terminal: meshctl route set hello --backend hello-v1=50 --backend hello-v2=50".into()),
        }
        let frontend = SocketAddr::from((pods[0].ip, APP_PORT));
        let hello_identity = SpiffeId::new(TRUST_DOMAIN, manifests::NAMESPACE, "hello").to_string();
        let chaos = match args.scenario {
            Scenario::Steady | Scenario::Rollout | Scenario::RolloutBad => None,
            Scenario::Chaos => {
                let (pod, (app, proxy)) = pods.iter().zip(&processes)
                    .find(|(pod, _)| pod.name == CHAOS_POD)
                    .context("the demo has no pod to disrupt")?;
                Some(chaos_targets(pod, app, proxy)?)
            }
        };
        drive(&args, frontend, &hello_identity, chaos, &manifests_dir, &children).await
    }
    .await;
    children.stop().await;
    Context::remove_own(&context::path());
    if let Err(e) = &result {
        eprintln!("demo logs are in {}", logs.display());
        if args.state_dir.is_none() {
            // Keep the logs of a failed run for the user to read.
            let kept =
                std::env::temp_dir().join(format!("trellis-demo-logs-{}", std::process::id()));
            let _ = std::fs::rename(&logs, &kept);
            eprintln!("(kept as {}) after: {e:#}", kept.display());
        }
    }
    result
}

/// A Prometheus config scraping the demo's proxies and controller every 5 s.
fn prometheus_config(proxies: &[String], controller: &str) -> String {
    let quoted = |targets: &[String]| {
        targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "global:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: trellis-proxies\n    static_configs:\n      - targets: [{}]\n  - job_name: trellis-controller\n    static_configs:\n      - targets: [{}]\n",
        quoted(proxies),
        quoted(&[controller.to_string()]),
    )
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not valid UTF-8", p.display()))
}

/// A `127.x.y.0/24` block whose demo ports are free, so several demos (and
/// tests) can run side by side.
async fn free_loopback_block() -> anyhow::Result<[u8; 3]> {
    for _ in 0..64 {
        let block = [127, fastrand::u8(1..=254), fastrand::u8(1..=254)];
        let probe = SocketAddr::from((
            Ipv4Addr::new(block[0], block[1], block[2], 1),
            CONTROLLER_PORT,
        ));
        if std::net::TcpListener::bind(probe).is_ok() {
            return Ok(block);
        }
    }
    bail!("found no free loopback block 127.x.y.0/24 for the demo; is 127.0.0.0/8 routed to lo?")
}

/// Starts the pod's app (with `app_env`) and sidecar; returns them in that order.
fn start_pod(
    children: &mut Supervisor,
    pod: &DemoPod,
    app_env: &[(&'static str, String)],
    controller: SocketAddr,
    tokens: &BootstrapTokens,
    state_dir: &Path,
) -> anyhow::Result<(Process, Process)> {
    let app = SocketAddr::from((pod.ip, APP_PORT));
    let outbound = SocketAddr::from((pod.ip, OUTBOUND_PORT));
    let app_process = match pod.app {
        "frontend" => children.start(
            pod.name,
            &[],
            &[
                "frontend",
                "--listen",
                &app.to_string(),
                "--backend",
                manifests::HELLO_AUTHORITY,
                "--proxy",
                &outbound.to_string(),
            ],
        )?,
        _ => children.start(
            pod.name,
            app_env,
            &[
                "hello",
                "--listen",
                &app.to_string(),
                "--version",
                pod.version,
                "--pod",
                pod.name,
            ],
        )?,
    };
    let sidecar = Sidecar {
        name: pod.name,
        pod_ip: pod.ip,
        app_ip: pod.ip.into(),
        identity: SpiffeId::new(TRUST_DOMAIN, manifests::NAMESPACE, pod.service_account),
        workload: pod.app,
        version: Some(pod.version),
    };
    let env = sidecar_env(&sidecar, controller, tokens, state_dir)?;
    let proxy = children.start(&format!("{}-proxy", pod.name), &env, &["proxy"])?;
    Ok((app_process, proxy))
}

/// A sidecar of the demo's mesh: one of the demo's pods, or an app of the
/// user's (`meshctl proxy`).
pub struct Sidecar<'a> {
    /// The pod's name; names its token file.
    pub name: &'a str,
    /// The pod's own loopback address: the sidecar listens there on
    /// [`OUTBOUND_PORT`], [`INBOUND_PORT`] and [`ADMIN_PORT`].
    pub pod_ip: Ipv4Addr,
    /// Where the inbound side reaches the app.
    pub app_ip: IpAddr,
    pub identity: SpiffeId,
    pub workload: &'a str,
    pub version: Option<&'a str>,
}

/// The environment a sidecar joins the demo's mesh with — the controller at
/// `controller`, whose state directory is `state_dir` — after writing its
/// bootstrap token to `<state_dir>/tokens/<name>.token` (0600). Every
/// sidecar of the demo's mesh is configured here, so all join it alike.
pub fn sidecar_env(
    sidecar: &Sidecar,
    controller: SocketAddr,
    tokens: &BootstrapTokens,
    state_dir: &Path,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let identity = &sidecar.identity;
    let outbound = SocketAddr::from((sidecar.pod_ip, OUTBOUND_PORT));
    let token_file = token_file(state_dir, sidecar.name);
    write_private(&token_file, tokens.token_for(identity).as_bytes())?;
    let mut env = vec![
        ("TRELLIS_CONTROLLER", format!("https://{controller}")),
        (
            "TRELLIS_CONTROLLER_TRUST",
            path(&state_dir.join(BUNDLE))?.to_string(),
        ),
        ("TRELLIS_IDENTITY", identity.to_string()),
        ("TRELLIS_TOKEN_FILE", path(&token_file)?.to_string()),
        ("TRELLIS_OUTBOUND_LISTEN", outbound.to_string()),
        (
            "TRELLIS_INBOUND_LISTEN",
            SocketAddr::from((sidecar.pod_ip, INBOUND_PORT)).to_string(),
        ),
        (
            "TRELLIS_ADMIN_LISTEN",
            SocketAddr::from((sidecar.pod_ip, ADMIN_PORT)).to_string(),
        ),
        ("TRELLIS_APP_IP", sidecar.app_ip.to_string()),
        ("TRELLIS_WORKLOAD", sidecar.workload.to_string()),
    ];
    if let Some(version) = sidecar.version {
        env.push(("TRELLIS_VERSION", version.to_string()));
    }
    Ok(env)
}

/// Where the sidecar of pod `name` reads its bootstrap token.
pub fn token_file(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("tokens").join(format!("{name}.token"))
}

/// The pod's sidecar and app as chaos targets, each with its readiness probe.
fn chaos_targets(
    pod: &DemoPod,
    app: &Process,
    proxy: &Process,
) -> anyhow::Result<(Target, Target)> {
    let sidecar = Target {
        process: proxy.clone(),
        probe: Probe::Ready(format!("http://{}:{ADMIN_PORT}/ready", pod.ip).parse()?),
    };
    let app = Target {
        process: app.clone(),
        probe: Probe::Listening(SocketAddr::from((pod.ip, APP_PORT))),
    };
    Ok((sidecar, app))
}

fn write_private(file: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    f.write_all(contents)
        .with_context(|| format!("writing {}", file.display()))
}

/// Waits until `process` listens on `addr`; a process that keeps crashing
/// is restarted meanwhile, and the error then says how often.
async fn wait_for_port(addr: SocketAddr, process: &Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!(
                "{} does not listen on {addr} after 20 s ({} restarts); see {}",
                process.name(),
                process.status().restarts,
                process.log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits until the sidecar of the pod at `pod_ip` is ready (it has a
/// certificate); after 30 s fails naming it (`who`) and what to look at.
pub async fn wait_ready(
    pod_ip: Ipv4Addr,
    who: &str,
    hint: impl Fn() -> String,
) -> anyhow::Result<()> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url: http::Uri = format!("http://{pod_ip}:{ADMIN_PORT}/ready").parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(url.clone()).await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{who} is not ready after 30 s ({url}); {}", hint());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends requests to the frontend at a fixed rate until the duration ends
/// or Ctrl-C, disrupting the `chaos` targets (sidecar, app) if given, or
/// rolling hello out (a rollout scenario, in `manifests`), then prints the
/// summary. Whether the run passed: see `DemoArgs::duration`.
async fn drive(
    args: &DemoArgs,
    frontend: SocketAddr,
    server_identity: &str,
    chaos: Option<(Target, Target)>,
    manifests: &Path,
    children: &Supervisor,
) -> anyhow::Result<bool> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url: http::Uri = format!("http://{frontend}/").parse()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(Semaphore::new(256));
    let started = Instant::now();
    let traffic_started = k8s_openapi::jiff::Timestamp::now();
    let duration = args.duration.map(Duration::from_secs);
    let end = duration.map(|d| started + d);
    let (chaos_tx, mut chaos_rx) = mpsc::unbounded_channel();
    let chaos = chaos.map(|(sidecar, app)| {
        let schedule = Schedule::for_duration(duration);
        tokio::spawn(scenario::chaos(sidecar, app, schedule, started, chaos_tx))
    });
    let rolling = rollout::expected(args.scenario).map(|_| {
        tokio::spawn(rollout::follow(
            manifests.to_path_buf(),
            started,
            traffic_started,
        ))
    });
    let mut timeline = rollout::Timeline::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rps)));
    // Open loop: ticks missed while the machine was busy are sent at once,
    // so the rate over any window stays what was asked.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    let mut report = Report::default();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    if args.duration.is_none() {
        eprintln!(
            "sending {} requests/s to the frontend; Ctrl-C to stop",
            args.rps
        );
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if end.is_some_and(|end| Instant::now() >= end) {
                    break;
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
                let (client, url, tx) = (client.clone(), url.clone(), tx.clone());
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer = request(&client, url).await;
                    let _ = tx.send(Sample { sent: sent - started, latency: sent.elapsed(), answer });
                    drop(permit);
                });
            }
            Some(sample) = rx.recv() => {
                timeline.observe(&sample);
                report.add(sample);
            }
            Some(event) = chaos_rx.recv(), if chaos.is_some() => report.chaos(event),
            _ = progress.tick() => {
                eprint!("\r{}   ", report.progress(started.elapsed()));
            }
            _ = &mut ctrl_c => break,
        }
    }
    if let Some(chaos) = chaos {
        chaos.abort();
    }
    if let Some(rolling) = &rolling {
        rolling.abort();
    }
    // Let the last requests finish.
    drop(tx);
    let drain = async {
        while let Some(sample) = rx.recv().await {
            timeline.observe(&sample);
            report.add(sample);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    eprintln!("\r{}   ", report.progress(started.elapsed()));
    while let Ok(event) = chaos_rx.try_recv() {
        report.chaos(event);
    }
    let summary = report.summary(
        args.scenario,
        server_identity,
        started.elapsed(),
        children.restarts(),
    );
    let rolled = match rollout::expected(args.scenario) {
        Some(_) => Some(rollout::summary(
            args.scenario,
            manifests,
            traffic_started,
            &timeline,
        )?),
        None => None,
    };
    match args.output {
        Output::Table => {
            print!("\n{}", summary.table());
            if let Some(rolled) = &rolled {
                print!("{}", rolled.table());
            }
        }
        Output::Json => {
            let mut json = serde_json::to_value(&summary)?;
            if let (Some(rolled), Some(object)) = (&rolled, json.as_object_mut()) {
                object.insert("rollout".into(), serde_json::to_value(rolled)?);
            }
            println!("{}", serde_json::to_string(&json)?);
        }
    }
    Ok(match args.scenario {
        Scenario::Steady => args.duration.is_none() || summary.success_rate >= 0.99,
        // Chaos is meant to fail requests until the mesh rides it out: the
        // run itself is the result, and `failed` says how well the mesh did.
        Scenario::Chaos => true,
        // A rollout's result is how it ended (rollout-bad fails requests
        // on purpose until it is rolled back).
        Scenario::Rollout | Scenario::RolloutBad => {
            args.duration.is_none() || rolled.is_some_and(|r| r.outcome_reached)
        }
    })
}

/// One request: the version and client identity `hello` reported, or why
/// it failed, short enough to count failures by.
async fn request(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: http::Uri,
) -> Result<(String, String), String> {
    let exchange = async {
        let response = client
            .get(url)
            .await
            .map_err(|e| format!("frontend unreachable: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{status}, reading the body: {e}"))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let first_line = text.lines().next().unwrap_or("");
            return Err(format!("{status}: {first_line:.160}"));
        }
        let greeting: Greeting = serde_json::from_slice(&body)
            .map_err(|e| format!("{status}, but the answer is not a greeting: {e}"))?;
        Ok((greeting.version, greeting.client_identity))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}
