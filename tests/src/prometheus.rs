//! A real Prometheus (Debian package `prometheus`; `PROMETHEUS=/path`
//! overrides) on a loopback port, scraping static targets every second,
//! and its HTTP query API. Without the binary a test skips, except under
//! `CI=true`, where that is a failure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{eventually, Answer, AppClient};

/// The `prometheus` binary; `None` (the caller skips) when there is none,
/// a panic under `CI=true`.
pub fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("PROMETHEUS")
        .map(PathBuf::from)
        .or_else(|| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain([PathBuf::from("/usr/bin")])
                .map(|dir| dir.join("prometheus"))
                .find(|p| p.is_file())
        });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and no `prometheus` binary (install the Debian package `prometheus`)"
        );
        eprintln!("SKIPPED: no `prometheus` binary on PATH (Debian package `prometheus`)");
    }
    found
}

pub struct Prometheus {
    // Killed when dropped.
    child: tokio::process::Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `binary` with its data in `dir`, scraping each job's targets'
    /// `/metrics` every second, and waits until it is ready.
    pub async fn start(binary: &Path, dir: &Path, jobs: &[(&str, Vec<SocketAddr>)]) -> Self {
        Self::start_at(binary, dir, free_addr(), jobs).await
    }

    /// Like `start`, listening on `addr` (from [`free_addr`]), for a client
    /// that must be told the URL before the targets exist.
    pub async fn start_at(
        binary: &Path,
        dir: &Path,
        addr: SocketAddr,
        jobs: &[(&str, Vec<SocketAddr>)],
    ) -> Self {
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            config += &format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            );
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let started = std::sync::Mutex::new(Self { child, addr, log });
        let this = &started;
        eventually(Duration::from_secs(30), "prometheus is ready", || {
            let exited = this.lock().unwrap().child.try_wait();
            async move {
                if let Ok(Some(status)) = exited {
                    let tail = this.lock().unwrap().log_tail();
                    panic!("prometheus exited ({status}):\n{tail}");
                }
                match http_get(addr, "/-/ready").await {
                    Ok(answer) if answer.status == 200 => Ok(()),
                    other => Err(format!(
                        "{:?}\n{}",
                        other.map(|a| a.status),
                        this.lock().unwrap().log_tail()
                    )),
                }
            }
        })
        .await;
        started.into_inner().unwrap()
    }

    /// The last lines of its log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `/api/v1/query`: Ok(result array) when the status is success.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let answer = http_get(self.addr, &path).await?;
        let body: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("HTTP {}: {e}: {}", answer.status, answer.text()))?;
        if body["status"] != "success" {
            return Err(format!(
                "HTTP {}: {} {}",
                answer.status, body["errorType"], body["error"]
            ));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until `expr` has a result (a series), and returns it.
    pub async fn until_result(&self, expr: &str, within: Duration) -> Vec<Value> {
        eventually(
            within,
            &format!("Prometheus has data for {expr}"),
            || async {
                match self.query(expr).await {
                    Ok(result) if !result.is_empty() => Ok(result),
                    other => Err(format!(
                        "{other:?}\nup: {:?}\nlog:\n{}",
                        self.query("up").await,
                        self.log_tail()
                    )),
                }
            },
        )
        .await
    }
}

/// A loopback address with a port free now, for Prometheus to listen on.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// The URL of a Prometheus at `addr`.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Whether a query result has a sample with a number (not NaN) in it.
pub fn has_number(result: &[Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| !v.is_nan())
    })
}

/// A GET with a `Host` header (Prometheus, written in Go, requires one).
async fn http_get(addr: SocketAddr, path: &str) -> Result<Answer, String> {
    let host = addr.to_string();
    AppClient::http1(addr)
        .get_with(&host, path, &[("host", &host)])
        .await
}

/// Percent-encodes a query parameter value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
