//! Reading metrics back: the Prometheus text exposition of a `/metrics`
//! page, what grew between two scrapes, histogram quantiles as Prometheus
//! computes them, and instant queries to a Prometheus server's HTTP API.
//! `meshctl stat` and the controller's rollout gates both read metrics this
//! way.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One series of the text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Parses the text exposition format (comments skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some(Sample {
            name: series.to_string(),
            labels: BTreeMap::new(),
            value,
        });
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest.strip_suffix('}')?;
    while let Some((key, after)) = rest.split_once("=\"") {
        // Values escape `"` and `\` with a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = &after[end..];
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// What grew between two scrapes, per series (a counter that went down
/// was reset, as Prometheus' `increase` takes it: all of it is new).
pub fn deltas(before: &[Sample], after: &[Sample]) -> Vec<Sample> {
    let key = |s: &Sample| (s.name.clone(), s.labels.clone());
    let old: BTreeMap<_, f64> = before.iter().map(|s| (key(s), s.value)).collect();
    after
        .iter()
        .map(|s| {
            let old = old.get(&key(s)).copied().unwrap_or(0.0);
            Sample {
                value: if s.value >= old {
                    s.value - old
                } else {
                    s.value
                },
                ..s.clone()
            }
        })
        .filter(|s| s.value > 0.0)
        .collect()
}

/// The sum of the series named `name` that `keep` accepts.
pub fn sum<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
    name: &str,
    keep: impl Fn(&Sample) -> bool,
) -> f64 {
    samples
        .into_iter()
        .filter(|s| s.name == name && keep(s))
        .map(|s| s.value)
        .sum()
}

/// The `q` quantile from the cumulative `<bucket>` counts (`le` labels) of
/// `samples`, interpolating within the bucket as Prometheus'
/// `histogram_quantile` does; `None` without observations.
pub fn histogram_quantile<'a>(
    q: f64,
    bucket: &str,
    samples: impl IntoIterator<Item = &'a Sample>,
) -> Option<f64> {
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in samples.into_iter().filter(|s| s.name == bucket) {
        let Some(le) = s.labels.get("le") else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        buckets.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += s.value;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let &(_, total) = sorted.last()?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in sorted {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let within = count - below;
            return Some(if within == 0.0 {
                bound
            } else {
                lower + (bound - lower) * (rank - below) / within
            });
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

/// Why a page or a query could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url} is not a URL")]
    BadUrl { url: String },
    #[error("fetching {url}: {source}")]
    Unreachable {
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("reading {url}: {source}")]
    Body { url: String, source: hyper::Error },
    #[error("{url}: {status}: {body}")]
    Status {
        url: String,
        status: http::StatusCode,
        body: String,
    },
    #[error("{url} did not answer a Prometheus query result: {reason}")]
    NotAQueryResult { url: String, reason: String },
}

/// A plain-HTTP client for admin ports and Prometheus.
#[derive(Clone)]
pub struct HttpGet(Client<HttpConnector, Empty<Bytes>>);

impl Default for HttpGet {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(2)));
        Self(Client::builder(TokioExecutor::new()).build(connector))
    }
}

impl HttpGet {
    /// The body of a successful GET of `url`.
    pub async fn text(&self, url: &str) -> Result<String, FetchError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| FetchError::BadUrl { url: url.into() })?;
        let response = self
            .0
            .get(uri)
            .await
            .map_err(|source| FetchError::Unreachable {
                url: url.into(),
                source,
            })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|source| FetchError::Body {
                url: url.into(),
                source,
            })?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.into(),
                status,
                body: text.trim().chars().take(300).collect(),
            });
        }
        Ok(text)
    }

    /// The samples of a `/metrics` page.
    pub async fn scrape(&self, url: &str) -> Result<Vec<Sample>, FetchError> {
        Ok(parse(&self.text(url).await?))
    }

    /// An instant query to the Prometheus at `prometheus` (its base URL):
    /// each series of the resulting vector as a sample named `name`.
    pub async fn query(
        &self,
        prometheus: &str,
        query: &str,
        name: &str,
    ) -> Result<Vec<Sample>, FetchError> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let url = format!(
            "{}/api/v1/query?query={encoded}",
            prometheus.trim_end_matches('/')
        );
        let body = self.text(&url).await?;
        let invalid = |reason: &str| FetchError::NotAQueryResult {
            url: url.clone(),
            reason: reason.into(),
        };
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|_| invalid("not JSON"))?;
        if json["status"] != "success" {
            return Err(invalid(
                json["error"].as_str().unwrap_or("status is not success"),
            ));
        }
        let results = json["data"]["result"]
            .as_array()
            .ok_or_else(|| invalid("data.result is not a vector"))?;
        Ok(results
            .iter()
            .map(|result| Sample {
                name: name.to_string(),
                labels: result["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect(),
                value: result["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes() {
        let s = parse_line(r#"m{a="x\"y",b="z"} 1.5"#).unwrap();
        assert_eq!(s.labels["a"], "x\"y");
        assert_eq!(s.labels["b"], "z");
        assert_eq!(s.value, 1.5);
    }

    #[test]
    fn deltas_take_a_reset_counter_as_all_new() {
        let before = parse("c{a=\"1\"} 10\nc{a=\"2\"} 50\n");
        let after = parse("c{a=\"1\"} 15\nc{a=\"2\"} 3\nc{a=\"3\"} 1\n");
        let grown: Vec<f64> = deltas(&before, &after).iter().map(|s| s.value).collect();
        assert_eq!(grown, [5.0, 3.0, 1.0]);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let samples = parse(
            "h_bucket{le=\"0.001\"} 50\nh_bucket{le=\"0.002\"} 100\nh_bucket{le=\"+Inf\"} 100\n",
        );
        let p = |q| histogram_quantile(q, "h_bucket", &samples).unwrap();
        assert!((p(0.5) - 0.001).abs() < 1e-12);
        assert!((p(0.99) - 0.00198).abs() < 1e-12);
        assert_eq!(histogram_quantile(0.99, "other", &samples), None);
    }
}
