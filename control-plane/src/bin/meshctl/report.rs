//! What the demo's traffic did: counts, versions, latency, identities.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// The outcome of one request through the demo mesh.
pub struct Sample {
    pub latency: Duration,
    /// Version and client identity that `hello` reported; `None` on failure.
    pub answer: Option<(String, String)>,
}

#[derive(Default)]
pub struct Report {
    latencies: Vec<Duration>,
    pub requests: u64,
    pub succeeded: u64,
    pub by_version: BTreeMap<String, u64>,
    /// Client identities `hello`'s sidecar verified, with counts.
    pub identities: BTreeMap<String, u64>,
}

#[derive(Serialize)]
pub struct Summary {
    pub requests: u64,
    pub succeeded: u64,
    pub success_rate: f64,
    pub by_version: BTreeMap<String, u64>,
    pub latency_ms: Latency,
    /// Every successful request crossed the sidecars over mTLS with a verified client identity.
    pub mtls: bool,
    pub client_identities: Vec<String>,
    pub server_identity: String,
    pub duration_s: f64,
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
        if let Some((version, identity)) = sample.answer {
            self.succeeded += 1;
            *self.by_version.entry(version).or_default() += 1;
            *self.identities.entry(identity).or_default() += 1;
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

    pub fn summary(&mut self, server_identity: &str, elapsed: Duration) -> Summary {
        let mtls = self.succeeded > 0 && !self.identities.contains_key("");
        Summary {
            requests: self.requests,
            succeeded: self.succeeded,
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
        out.push_str(&format!("{:<22}{}\n", "requests", self.requests));
        out.push_str(&format!("{:<22}{}\n", "succeeded", self.succeeded));
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
        out
    }
}
