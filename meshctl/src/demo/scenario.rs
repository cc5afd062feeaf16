//! `--scenario`: what happens to the mesh while the demo's traffic runs.
//! `chaos` disrupts the `hello-v2` pod again and again, the ways a pod goes
//! away in Kubernetes, and lets the supervisor restart what it stopped.
//! `rollout` and `rollout-bad` roll `hello` out to `hello-v2` (see
//! `demo::rollout`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustix::process::Signal;
use serde::Serialize;
use tokio::sync::mpsc;

use super::supervise::Process;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Traffic only.
    #[default]
    Steady,
    /// Traffic while a `hello` pod is stopped and crashed repeatedly.
    Chaos,
    /// A rollout of `hello` from hello-v1 to a healthy hello-v2, promoted
    /// step by step (20%, 50%, 100%) as its gates pass.
    Rollout,
    /// The same rollout of a hello-v2 that fails 20% of its requests: the
    /// success-rate gate fails and the rollout rolls back on its own.
    RolloutBad,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Chaos => "chaos",
            Scenario::Rollout => "rollout",
            Scenario::RolloutBad => "rollout-bad",
        }
    }
}

/// How a process is disrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// SIGTERM, as the kubelet sends to stop a container: the process may
    /// drain its connections, then exits.
    Graceful,
    /// SIGKILL: the process dies at once, as on an OOM kill.
    Crash,
}

impl Kind {
    pub fn signal(self) -> Signal {
        match self {
            Kind::Graceful => Signal::TERM,
            Kind::Crash => Signal::KILL,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Graceful => "graceful",
            Kind::Crash => "crash",
        }
    }

    pub fn signal_name(self) -> &'static str {
        match self {
            Kind::Graceful => "SIGTERM",
            Kind::Crash => "SIGKILL",
        }
    }
}

/// How to tell that a restarted process serves again.
pub enum Probe {
    /// A sidecar: its admin `/ready` answers 200 (it has a certificate).
    Ready(http::Uri),
    /// An app: its port accepts connections.
    Listening(SocketAddr),
}

/// A process chaos disrupts.
pub struct Target {
    pub process: Process,
    pub probe: Probe,
}

/// What chaos did, as it happens.
#[derive(Debug)]
pub enum Event {
    /// `process` was sent the signal of `kind`, `at` after traffic started.
    Disrupted {
        at: Duration,
        process: String,
        kind: Kind,
    },
    /// The process last disrupted was restarted and serves again, `after`
    /// its disruption.
    Ready { after: Duration },
}

/// The first disruption comes this long after traffic starts (or a quarter
/// into a shorter run), so the summary also shows the mesh undisturbed.
const FIRST: Duration = Duration::from_secs(3);
/// No disruption starts this close to the end: the process gets time to be
/// restarted and counted before the summary.
const QUIET_END: Duration = Duration::from_secs(3);
/// A restarted process serves this long before it is disrupted again, so
/// its peers see it healthy in between.
const SETTLE: Duration = Duration::from_secs(1);
/// How long a disrupted process may take to serve again before chaos moves on.
const READY_PATIENCE: Duration = Duration::from_secs(30);

/// When disruptions happen, as offsets from the start of traffic.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    first: Duration,
    interval: Duration,
    last_start: Option<Duration>,
}

impl Schedule {
    /// Every 5–8 s (a fifth of the run), 6 s in a run without an end.
    pub fn for_duration(duration: Option<Duration>) -> Self {
        match duration {
            None => Schedule {
                first: FIRST,
                interval: Duration::from_secs(6),
                last_start: None,
            },
            Some(duration) => Schedule {
                first: FIRST.min(duration / 4),
                interval: (duration / 5).clamp(Duration::from_secs(5), Duration::from_secs(8)),
                last_start: Some(duration.saturating_sub(QUIET_END)),
            },
        }
    }

    pub fn first(&self) -> Option<Duration> {
        self.fits(self.first)
    }

    /// When the disruption after the one at `previous`, whose process served
    /// again at `ready`, may start; `None` once the run is too close to its end.
    pub fn next(&self, previous: Duration, ready: Duration) -> Option<Duration> {
        self.fits((previous + self.interval).max(ready + SETTLE))
    }

    fn fits(&self, at: Duration) -> Option<Duration> {
        match self.last_start {
            Some(last) if at > last => None,
            _ => Some(at),
        }
    }
}

/// Which part of the pod each disruption hits, in order, then again: the
/// sidecar is stopped (as on a rollout), crashes, is stopped, and then the
/// app crashes.
const STEPS: [(Part, Kind); 4] = [
    (Part::Sidecar, Kind::Graceful),
    (Part::Sidecar, Kind::Crash),
    (Part::Sidecar, Kind::Graceful),
    (Part::App, Kind::Crash),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Sidecar,
    App,
}

/// Disrupts the pod's `sidecar` and `app` on `schedule` (offsets from
/// `started`), waiting each time until the restarted process serves again,
/// and reports each step on `events`. Runs until the schedule ends; the
/// demo aborts it when traffic stops.
pub async fn chaos(
    mut sidecar: Target,
    mut app: Target,
    schedule: Schedule,
    started: Instant,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut next = schedule.first();
    for (part, kind) in STEPS.into_iter().cycle() {
        let Some(planned) = next else { return };
        tokio::time::sleep_until((started + planned).into()).await;
        let target = match part {
            Part::Sidecar => &mut sidecar,
            Part::App => &mut app,
        };
        let at = started.elapsed();
        let name = target.process.name().to_string();
        let restarts = target.process.status().restarts;
        eprintln!(
            "\r[{:>5.1}s] chaos: {} to {name} ({})",
            at.as_secs_f64(),
            kind.signal_name(),
            kind.name()
        );
        if let Err(e) = target.process.signal(kind.signal()).await {
            eprintln!("\rchaos: {e:#}");
            next = schedule.next(planned, at);
            continue;
        }
        let _ = events.send(Event::Disrupted {
            at,
            process: name.clone(),
            kind,
        });
        let back = tokio::time::timeout(READY_PATIENCE, serving_again(target, restarts)).await;
        let ready = started.elapsed();
        match back {
            Ok(()) => {
                eprintln!(
                    "\r[{:>5.1}s] chaos: {name} serves again, {:.1} s after the {}",
                    ready.as_secs_f64(),
                    (ready - at).as_secs_f64(),
                    kind.signal_name()
                );
                let _ = events.send(Event::Ready { after: ready - at });
            }
            Err(_) => eprintln!(
                "\rchaos: {name} does not serve {} s after the {}; moving on",
                READY_PATIENCE.as_secs(),
                kind.signal_name()
            ),
        }
        // From the planned time, so that being late never drops the last
        // disruption of a run.
        next = schedule.next(planned, ready);
    }
}

/// Waits until the target has been restarted (more than `restarts` times in
/// all) and its probe passes.
async fn serving_again(target: &mut Target, restarts: u32) {
    if target.process.restarted(restarts).await.is_err() {
        // Supervision ended: the demo is stopping.
        return std::future::pending().await;
    }
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let passed = match &target.probe {
            Probe::Ready(url) => {
                let answer = tokio::time::timeout(Duration::from_secs(1), client.get(url.clone()));
                matches!(answer.await, Ok(Ok(response)) if response.status().is_success())
            }
            Probe::Listening(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
        };
        if passed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disruptions of a run whose processes serve again at once.
    fn planned(schedule: Schedule) -> Vec<(Duration, Kind)> {
        let mut out = Vec::new();
        let mut next = schedule.first();
        for (_, kind) in STEPS.into_iter().cycle() {
            let Some(at) = next else { break };
            out.push((at, kind));
            next = schedule.next(at, at);
        }
        out
    }

    #[test]
    fn a_30_second_run_stops_and_crashes_the_pod_and_leaves_time_to_recover() {
        let plan = planned(Schedule::for_duration(Some(Duration::from_secs(30))));
        let seconds: Vec<u64> = plan.iter().map(|(at, _)| at.as_secs()).collect();
        assert_eq!(seconds, [3, 9, 15, 21, 27], "{plan:?}");
        assert!(plan.iter().any(|(_, kind)| *kind == Kind::Graceful));
        assert!(plan.iter().any(|(_, kind)| *kind == Kind::Crash));
    }

    #[test]
    fn a_short_run_still_gets_a_disruption_before_its_quiet_end() {
        let plan = planned(Schedule::for_duration(Some(Duration::from_secs(8))));
        assert_eq!(plan, [(Duration::from_secs(2), Kind::Graceful)]);
    }

    #[test]
    fn a_slow_restart_pushes_the_next_disruption_back() {
        let schedule = Schedule::for_duration(None);
        let next = schedule.next(Duration::from_secs(3), Duration::from_secs(12));
        assert_eq!(
            next,
            Some(Duration::from_secs(13)),
            "ready at 12 s + 1 s settle"
        );
    }
}
