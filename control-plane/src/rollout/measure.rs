//! The golden metrics of a rollout's backends over a gate window, as the
//! callers' proxies counted them (outbound: what clients got from the
//! canary, proxy errors and timeouts included):
//! - local mode scrapes every meshed pod's `/metrics` (its admin port, see
//!   [`crate::model::ADMIN_PORT_ANNOTATION`]) at the window's start and end;
//! - cluster mode asks Prometheus for the window's `increase`.
//!
//! A source that cannot answer makes the window inconclusive, never passed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use trellis_common::exposition::{self, deltas, histogram_quantile, sum, HttpGet, Sample};

use super::engine::Evidence;
use crate::model::{Golden, ObjectKey, Rollout};
use crate::store::Store;

/// How an unavailable source's reason starts (the engine pauses with
/// reason `MetricsUnavailable` on it).
pub const UNAVAILABLE: &str = "metrics unavailable";

/// How long one proxy's `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

const REQUESTS: &str = "trellis_requests_total";
const LATENCY: &str = "trellis_response_latency_seconds_bucket";

/// Where gate metrics come from.
pub enum Metrics {
    /// The proxies' own `/metrics` (local mode).
    Proxies {
        http: HttpGet,
        /// Each rollout's scrape at its window's start.
        baselines: Mutex<HashMap<ObjectKey, Vec<Sample>>>,
    },
    /// A Prometheus server's HTTP API (its base URL).
    Prometheus { http: HttpGet, url: String },
}

impl Metrics {
    pub fn proxies() -> Self {
        Metrics::Proxies {
            http: HttpGet::default(),
            baselines: Mutex::default(),
        }
    }

    pub fn prometheus(url: &str) -> Self {
        Metrics::Prometheus {
            http: HttpGet::default(),
            url: url.to_string(),
        }
    }

    /// A window starts: remember where the counters are.
    pub async fn start_window(&self, rollout: &Rollout, store: &Store) {
        if let Metrics::Proxies { http, baselines } = self {
            let samples = scrape(http, rollout, store).await.unwrap_or_default();
            lock(baselines).insert(rollout.metadata.key(), samples);
        }
    }

    /// Forgets a rollout that is gone.
    pub fn forget(&self, key: &ObjectKey) {
        if let Metrics::Proxies { baselines, .. } = self {
            lock(baselines).remove(key);
        }
    }

    /// The window that ends now, `window` long.
    pub async fn measure(&self, rollout: &Rollout, store: &Store, window: Duration) -> Evidence {
        let grown = match self {
            Metrics::Proxies { http, baselines } => {
                let key = rollout.metadata.key();
                let Some(before) = lock(baselines).get(&key).cloned() else {
                    return Evidence::Restart;
                };
                match scrape(http, rollout, store).await {
                    Ok(after) => deltas(&before, &after),
                    Err(why) => return Evidence::Unavailable(why),
                }
            }
            Metrics::Prometheus { http, url } => match query(http, url, rollout, window).await {
                Ok(samples) => samples,
                Err(e) => return Evidence::Unavailable(format!("{UNAVAILABLE}: {e}")),
            },
        };
        let backends = &rollout.spec.backends;
        Evidence::Measured {
            canary: golden(&grown, &backends.canary),
            stable: golden(&grown, &backends.stable),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a sample counts requests from clients to the rollout's Service.
fn of_rollout(sample: &Sample, rollout: &Rollout) -> bool {
    let spec = &rollout.spec;
    sample.label("direction") == "outbound"
        && sample.label("dst_namespace") == rollout.metadata.key().namespace
        && sample.label("dst_service") == spec.service
        && [&spec.backends.stable, &spec.backends.canary]
            .iter()
            .any(|b| sample.label("dst_backend") == b.as_str())
}

/// Every meshed pod's samples for the rollout, each series kept apart by
/// its pod (replicas have the same labels).
async fn scrape(http: &HttpGet, rollout: &Rollout, store: &Store) -> Result<Vec<Sample>, String> {
    let pods = store.meshed_pods();
    if pods.is_empty() {
        return Err(format!("{UNAVAILABLE}: no meshed pod with an IP to scrape"));
    }
    // All at once, each bounded: one slow proxy must not hold the decision.
    let scrapes = pods.iter().map(|pod| async move {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .unwrap_or("");
        let host = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => ip.to_string(),
        };
        let url = format!("http://{host}:{}/metrics", pod.admin_port());
        match tokio::time::timeout(SCRAPE_TIMEOUT, http.scrape(&url)).await {
            Ok(Ok(samples)) => Ok((pod.metadata.key().to_string(), samples)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("{url}: no answer within {SCRAPE_TIMEOUT:?}")),
        }
    });
    let mut all = Vec::new();
    let mut failures = Vec::new();
    for scraped in futures_util::future::join_all(scrapes).await {
        match scraped {
            Ok((pod, samples)) => all.extend(
                samples
                    .into_iter()
                    .filter(|s| of_rollout(s, rollout))
                    .map(|mut s| {
                        s.labels.insert("pod".into(), pod.clone());
                        s
                    }),
            ),
            Err(e) => failures.push(e),
        }
    }
    if failures.len() == pods.len() {
        return Err(format!(
            "{UNAVAILABLE}: no proxy's /metrics could be read ({})",
            failures.join("; ")
        ));
    }
    if !failures.is_empty() {
        tracing::debug!(?failures, "some proxies' metrics could not be read");
    }
    Ok(all)
}

async fn query(
    http: &HttpGet,
    url: &str,
    rollout: &Rollout,
    window: Duration,
) -> Result<Vec<Sample>, exposition::FetchError> {
    let spec = &rollout.spec;
    let selector = format!(
        "direction=\"outbound\",dst_namespace=\"{}\",dst_service=\"{}\",dst_backend=~\"{}|{}\"",
        rollout.metadata.key().namespace,
        spec.service,
        spec.backends.stable,
        spec.backends.canary
    );
    let range = format!("{}ms", window.as_millis().max(1000));
    let mut samples = http
        .query(
            url,
            &format!("sum by (dst_backend, classification) (increase({REQUESTS}{{{selector}}}[{range}]))"),
            REQUESTS,
        )
        .await?;
    samples.extend(
        http.query(
            url,
            &format!("sum by (dst_backend, le) (increase({LATENCY}{{{selector}}}[{range}]))"),
            LATENCY,
        )
        .await?,
    );
    Ok(samples)
}

fn golden(samples: &[Sample], backend: &str) -> Golden {
    let mine: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.label("dst_backend") == backend)
        .collect();
    let requests = sum(mine.iter().copied(), REQUESTS, |_| true);
    let ok = sum(mine.iter().copied(), REQUESTS, |s| {
        s.label("classification") == "success"
    });
    Golden {
        requests,
        success_rate: (requests > 0.0).then(|| 100.0 * ok / requests),
        p99_ms: histogram_quantile(0.99, LATENCY, mine.iter().copied()).map(|s| s * 1000.0),
    }
}
