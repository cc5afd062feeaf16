//! What the demo's traffic did: counts, versions, latency, identities, why
//! requests failed, restarts, and under `--scenario chaos` the disruptions.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::demo::scenario::{self, Kind, Scenario};

/// The outcome of one request through the demo mesh.
pub struct Sample {
    /// When it was sent, from the start of traffic.
    pub sent: Duration,
    pub latency: Duration,
    /// Version and client identity that `hello` reported, or why it failed.
    pub answer: Result<(String, String), String>,
}

#[derive(Default)]
pub struct Report {
    latencies: Vec<Duration>,
    pub requests: u64,
    pub succeeded: u64,
    pub by_version: BTreeMap<String, u64>,
    /// Client identities `hello`'s sidecar verified, with counts.
    pub identities: BTreeMap<String, u64>,
    failures: BTreeMap<String, u64>,
    /// When each failed request was sent, to count failures per disruption.
    failed_sent: Vec<Duration>,
    disruptions: Vec<Disruption>,
}

#[derive(Serialize)]
pub struct Summary {
    pub scenario: Scenario,
    pub requests: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub success_rate: f64,
    pub by_version: BTreeMap<String, u64>,
    pub latency_ms: Latency,
    /// Every successful request crossed the sidecars over mTLS with a verified client identity.
    pub mtls: bool,
    pub client_identities: Vec<String>,
    pub server_identity: String,
    pub duration_s: f64,
    /// Why requests failed (the status and first line of the frontend's
    /// answer, or that it did not answer), with counts.
    pub failures: BTreeMap<String, u64>,
    pub restarts: Restarts,
    /// What `--scenario chaos` did, in order (empty for `steady`).
    pub disruptions: Vec<Disruption>,
}

/// How often the supervisor restarted the demo's processes.
#[derive(Serialize)]
pub struct Restarts {
    pub total: u32,
    /// Every process of the demo, with its restarts.
    pub by_process: BTreeMap<String, u32>,
}

/// One disruption of `--scenario chaos`.
#[derive(Clone, Serialize)]
pub struct Disruption {
    /// Seconds from the start of traffic.
    pub at_s: f64,
    pub process: String,
    pub kind: Kind,
    pub signal: &'static str,
    /// Seconds until the restarted process served again; `null` if it did
    /// not before the end.
    pub ready_after_s: Option<f64>,
    /// Failed requests sent from this disruption until the next one.
    pub failed: u64,
}

#[derive(Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

impl Report {
    pub fn add(&mut self, sample: Sample) {
        self.requests += 1;
        self.latencies.push(sample.latency);
        match sample.answer {
            Ok((version, identity)) => {
                self.succeeded += 1;
                *self.by_version.entry(version).or_default() += 1;
                *self.identities.entry(identity).or_default() += 1;
            }
            Err(reason) => {
                *self.failures.entry(reason).or_default() += 1;
                self.failed_sent.push(sample.sent);
            }
        }
    }

    /// Records a step of `--scenario chaos`.
    pub fn chaos(&mut self, event: scenario::Event) {
        match event {
            scenario::Event::Disrupted { at, process, kind } => self.disruptions.push(Disruption {
                at_s: at.as_secs_f64(),
                process,
                kind,
                signal: kind.signal_name(),
                ready_after_s: None,
                failed: 0,
            }),
            scenario::Event::Ready { after } => {
                if let Some(last) = self.disruptions.last_mut() {
                    last.ready_after_s = Some(after.as_secs_f64());
                }
            }
        }
    }

    pub fn success_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.succeeded as f64 / self.requests as f64
    }

    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        self.latencies.sort_unstable();
        let index = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[index].as_secs_f64() * 1000.0
    }

    pub fn summary(
        &mut self,
        scenario: Scenario,
        server_identity: &str,
        elapsed: Duration,
        restarts: BTreeMap<String, u32>,
    ) -> Summary {
        let mtls = self.succeeded > 0 && !self.identities.contains_key("");
        let mut disruptions = self.disruptions.clone();
        for sent in &self.failed_sent {
            let sent = sent.as_secs_f64();
            if let Some(during) = disruptions.iter_mut().rev().find(|d| d.at_s <= sent) {
                during.failed += 1;
            }
        }
        Summary {
            scenario,
            requests: self.requests,
            succeeded: self.succeeded,
            failed: self.requests - self.succeeded,
            success_rate: self.success_rate(),
            by_version: self.by_version.clone(),
            latency_ms: Latency {
                p50: self.quantile_ms(0.5),
                p99: self.quantile_ms(0.99),
            },
            mtls,
            client_identities: self.identities.keys().cloned().collect(),
            server_identity: server_identity.to_string(),
            duration_s: elapsed.as_secs_f64(),
            failures: self.failures.clone(),
            restarts: Restarts {
                total: restarts.values().sum(),
                by_process: restarts,
            },
            disruptions,
        }
    }

    /// One line of live progress.
    pub fn progress(&mut self, elapsed: Duration) -> String {
        let p99 = self.quantile_ms(0.99);
        let versions: Vec<String> = self
            .by_version
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect();
        format!(
            "[{:>4.0}s] {} requests, {:.1}% ok, {}, p99 {:.2} ms",
            elapsed.as_secs_f64(),
            self.requests,
            self.success_rate() * 100.0,
            if versions.is_empty() {
                "no answers yet".into()
            } else {
                versions.join(" / ")
            },
            p99,
        )
    }
}

impl Summary {
    /// The summary as a table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("{:<22}{}\n", "scenario", self.scenario.name()));
        out.push_str(&format!("{:<22}{}\n", "requests", self.requests));
        out.push_str(&format!("{:<22}{}\n", "succeeded", self.succeeded));
        out.push_str(&format!("{:<22}{}\n", "failed", self.failed));
        out.push_str(&format!(
            "{:<22}{:.2}%\n",
            "success rate",
            self.success_rate * 100.0
        ));
        for (version, n) in &self.by_version {
            let share = *n as f64 * 100.0 / self.succeeded.max(1) as f64;
            out.push_str(&format!(
                "{:<22}{n} ({share:.1}%)\n",
                format!("hello {version}")
            ));
        }
        out.push_str(&format!(
            "{:<22}{:.2} ms\n",
            "latency p50", self.latency_ms.p50
        ));
        out.push_str(&format!(
            "{:<22}{:.2} ms\n",
            "latency p99", self.latency_ms.p99
        ));
        out.push_str(&format!(
            "{:<22}{}\n",
            "mTLS on every hop",
            if self.mtls { "yes" } else { "NO" }
        ));
        for client in &self.client_identities {
            let client = if client.is_empty() {
                "(plaintext)"
            } else {
                client
            };
            out.push_str(&format!(
                "{:<22}{client} -> {}\n",
                "identities", self.server_identity
            ));
        }
        for (reason, n) in &self.failures {
            out.push_str(&format!("{:<22}{n:>6}  {reason}\n", "failure"));
        }
        let restarted: Vec<String> = self
            .restarts
            .by_process
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(process, n)| format!("{process} {n}"))
            .collect();
        out.push_str(&format!("{:<22}{}", "restarts", self.restarts.total));
        if !restarted.is_empty() {
            out.push_str(&format!(" ({})", restarted.join(", ")));
        }
        out.push('\n');
        for d in &self.disruptions {
            let ready = match d.ready_after_s {
                Some(after) => format!("served again after {after:.1} s"),
                None => "not serving again by the end".into(),
            };
            out.push_str(&format!(
                "{:<22}{} to {} ({}), {ready}, {} failed until the next\n",
                format!("disruption {:>5.1}s", d.at_s),
                d.signal,
                d.process,
                d.kind.name(),
                d.failed,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sent_s: u64, answer: Result<(&str, &str), &str>) -> Sample {
        Sample {
            sent: Duration::from_secs(sent_s),
            latency: Duration::from_millis(1),
            answer: answer
                .map(|(v, id)| (v.to_string(), id.to_string()))
                .map_err(str::to_string),
        }
    }

    #[test]
    fn failures_count_against_the_disruption_before_them() {
        let mut report = Report::default();
        for (at, process, kind) in [
            (3, "hello-v2-proxy", Kind::Graceful),
            (9, "hello-v2", Kind::Crash),
        ] {
            report.chaos(scenario::Event::Disrupted {
                at: Duration::from_secs(at),
                process: process.into(),
                kind,
            });
        }
        report.add(sample(1, Err("no answer within 10 s")));
        report.add(sample(4, Err("502 Bad Gateway: cannot connect")));
        report.add(sample(
            5,
            Ok(("v1", "spiffe://cluster.local/ns/default/sa/frontend")),
        ));
        report.add(sample(10, Err("502 Bad Gateway: cannot connect")));
        report.add(sample(11, Err("502 Bad Gateway: cannot connect")));
        let restarts = BTreeMap::from([("hello-v2".into(), 1), ("hello-v2-proxy".into(), 2)]);
        let summary = report.summary(Scenario::Chaos, "hello", Duration::from_secs(12), restarts);

        assert_eq!((summary.requests, summary.failed), (5, 4));
        let per_disruption: Vec<u64> = summary.disruptions.iter().map(|d| d.failed).collect();
        assert_eq!(
            per_disruption,
            [1, 2],
            "the failure at 1 s came before any disruption"
        );
        assert_eq!(summary.failures["502 Bad Gateway: cannot connect"], 3);
        assert_eq!(summary.restarts.total, 3);
    }
}
