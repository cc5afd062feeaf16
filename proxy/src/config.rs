//! The proxy's configuration, read from the environment the injector sets.
//!
//! Every variable is parsed up front and all problems are reported at once,
//! each naming the variable, the value and what is expected.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use trellis_proto::SpiffeId;

/// A source of configuration strings; the process environment in production,
/// a map in tests (so tests never mutate the process environment).
pub trait Strings {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Strings for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Strings for HashMap<&str, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// How the inbound side treats connections that are not mTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMode {
    /// Only mTLS from a mesh identity is accepted.
    Strict,
    /// mTLS is used when the client offers it; plaintext is accepted too.
    Permissive,
}

/// Where the proxy's identity proof comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// Given directly (tests).
    Static(String),
    /// Re-read from a file before each renewal (a projected token rotates).
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The controller's gRPC URL, e.g. `http://127.0.0.1:8090`.
    pub controller: String,
    pub identity: SpiffeId,
    pub token: TokenSource,
    pub outbound_listen: SocketAddr,
    pub inbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Where the inbound side reaches the application (the pod IP, or loopback).
    pub app_ip: IpAddr,
    pub inbound_mode: InboundMode,
    /// Upper bound for a whole request through the outbound side.
    pub request_timeout: Duration,
    /// How long a first request waits for discovery to answer.
    pub discovery_timeout: Duration,
    /// The workload (app) name, for metrics; the service account when unset.
    pub workload: String,
    /// The workload's version label, for metrics.
    pub version: String,
    /// Whether request metrics are recorded (on by default; off only to
    /// measure what they cost).
    pub metrics: bool,
    /// Ports whose connections are opaque TCP without protocol detection:
    /// server-speaks-first protocols would otherwise wait out the detection
    /// timeout on every connection.
    pub opaque_ports: Vec<u16>,
    /// Threads that serve traffic. One by default: a sidecar's work is
    /// many small, independent I/O steps, which one thread does without
    /// cross-thread wake-ups, locks or a second malloc arena; more help only
    /// a pod whose traffic needs more than one core.
    pub worker_threads: usize,
    /// An authority (its watches, balancer state and connections) unused
    /// for this long is forgotten.
    pub idle_authority_timeout: Duration,
    /// A request or response body that sends no data for this long fails.
    pub body_idle_timeout: Duration,
}

/// Server-speaks-first protocols: SMTP, MySQL, Postgres, Redis, memcached…
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

/// Every bad variable, one per line.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid proxy configuration:")?;
        for problem in &self.0 {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

pub const CONTROLLER: &str = "TRELLIS_CONTROLLER";
pub const IDENTITY: &str = "TRELLIS_IDENTITY";
pub const TOKEN: &str = "TRELLIS_TOKEN";
pub const TOKEN_FILE: &str = "TRELLIS_TOKEN_FILE";
pub const OUTBOUND_LISTEN: &str = "TRELLIS_OUTBOUND_LISTEN";
pub const INBOUND_LISTEN: &str = "TRELLIS_INBOUND_LISTEN";
pub const ADMIN_LISTEN: &str = "TRELLIS_ADMIN_LISTEN";
pub const APP_IP: &str = "TRELLIS_APP_IP";
pub const INBOUND_MODE: &str = "TRELLIS_INBOUND_MODE";
pub const REQUEST_TIMEOUT: &str = "TRELLIS_REQUEST_TIMEOUT";
pub const DISCOVERY_TIMEOUT: &str = "TRELLIS_DISCOVERY_TIMEOUT";
pub const WORKLOAD: &str = "TRELLIS_WORKLOAD";
pub const VERSION: &str = "TRELLIS_VERSION";
pub const METRICS: &str = "TRELLIS_METRICS";
pub const OPAQUE_PORTS: &str = "TRELLIS_OPAQUE_PORTS";
pub const WORKER_THREADS: &str = "TRELLIS_WORKER_THREADS";
pub const IDLE_AUTHORITY_TIMEOUT: &str = "TRELLIS_IDLE_AUTHORITY_TIMEOUT";
pub const BODY_IDLE_TIMEOUT: &str = "TRELLIS_BODY_IDLE_TIMEOUT";

impl Config {
    pub fn from_strings(env: &dyn Strings) -> Result<Self, ConfigError> {
        let mut r = Reader {
            env,
            problems: Vec::new(),
        };
        let controller = r.required(
            CONTROLLER,
            "an http:// URL, e.g. http://127.0.0.1:8090",
            |v| (v.starts_with("http://") || v.starts_with("https://")).then(|| v.to_string()),
        );
        let identity = r.required(
            IDENTITY,
            "spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>",
            |v| v.parse::<SpiffeId>().ok(),
        );
        let token = match (env.get(TOKEN), env.get(TOKEN_FILE)) {
            (Some(t), _) => Some(TokenSource::Static(t)),
            (None, Some(f)) => Some(TokenSource::File(PathBuf::from(f))),
            (None, None) => {
                r.problems.push(format!(
                    "neither {TOKEN} nor {TOKEN_FILE} is set; the proxy needs a token to prove its identity"
                ));
                None
            }
        };
        let addr = |v: &str| v.parse::<SocketAddr>().ok();
        let outbound_listen = r.optional(OUTBOUND_LISTEN, "127.0.0.1:4140", "ip:port", addr);
        let inbound_listen = r.optional(INBOUND_LISTEN, "0.0.0.0:4143", "ip:port", addr);
        let admin_listen = r.optional(ADMIN_LISTEN, "127.0.0.1:4191", "ip:port", addr);
        let app_ip = r.optional(APP_IP, "127.0.0.1", "an IP address", |v| v.parse().ok());
        let inbound_mode = r.optional(
            INBOUND_MODE,
            "strict",
            "strict or permissive",
            |v| match v {
                "strict" => Some(InboundMode::Strict),
                "permissive" => Some(InboundMode::Permissive),
                _ => None,
            },
        );
        let request_timeout = r.optional(
            REQUEST_TIMEOUT,
            "10s",
            "a duration like 10s or 500ms",
            parse_duration,
        );
        let metrics = r.optional(METRICS, "on", "on or off", |v| match v {
            "on" => Some(true),
            "off" => Some(false),
            _ => None,
        });
        let discovery_timeout = r.optional(
            DISCOVERY_TIMEOUT,
            "5s",
            "a duration like 5s",
            parse_duration,
        );
        let opaque_ports = r.optional(
            OPAQUE_PORTS,
            DEFAULT_OPAQUE_PORTS,
            "a comma-separated list of ports (1-65535), or none",
            |v| match v {
                "none" => Some(Vec::new()),
                v => v
                    .split(',')
                    .map(|p| p.trim().parse::<u16>().ok().filter(|p| *p != 0))
                    .collect(),
            },
        );
        let worker_threads = r.optional(WORKER_THREADS, "1", "a number of threads, 1 to 64", |v| {
            v.parse::<usize>().ok().filter(|n| (1..=64).contains(n))
        });
        let idle_authority_timeout = r.optional(
            IDLE_AUTHORITY_TIMEOUT,
            "5m",
            "a duration like 5m",
            parse_duration,
        );
        let body_idle_timeout = r.optional(
            BODY_IDLE_TIMEOUT,
            "60s",
            "a duration like 60s",
            parse_duration,
        );
        let config = (|| {
            Some(Config {
                controller: controller?,
                identity: identity?,
                token: token?,
                outbound_listen: outbound_listen?,
                inbound_listen: inbound_listen?,
                admin_listen: admin_listen?,
                app_ip: app_ip?,
                inbound_mode: inbound_mode?,
                request_timeout: request_timeout?,
                discovery_timeout: discovery_timeout?,
                workload: env.get(WORKLOAD).unwrap_or_default(),
                version: env.get(VERSION).unwrap_or_default(),
                metrics: metrics?,
                opaque_ports: opaque_ports?,
                worker_threads: worker_threads?,
                idle_authority_timeout: idle_authority_timeout?,
                body_idle_timeout: body_idle_timeout?,
            })
        })();
        match config {
            Some(config) if r.problems.is_empty() => Ok(config),
            _ => Err(ConfigError(r.problems)),
        }
    }
}

/// Reads variables and collects every problem instead of stopping at the first.
struct Reader<'a> {
    env: &'a dyn Strings,
    problems: Vec<String>,
}

impl Reader<'_> {
    fn required<T>(
        &mut self,
        name: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        match self.env.get(name) {
            Some(value) => self.parse(name, &value, expected, parse),
            None => {
                self.problems
                    .push(format!("{name} is not set; expected {expected}"));
                None
            }
        }
    }

    fn optional<T>(
        &mut self,
        name: &str,
        default: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let value = self.env.get(name).unwrap_or_else(|| default.to_string());
        self.parse(name, &value, expected, parse)
    }

    fn parse<T>(
        &mut self,
        name: &str,
        value: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let parsed = parse(value);
        if parsed.is_none() {
            self.problems.push(format!(
                "{name}={value:?} is not valid; expected {expected}"
            ));
        }
        parsed
    }
}

/// Parses `250ms`, `10s`, `2m`, `1h` (a plain number is seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn defaults_fill_in_what_is_optional() {
        let c = Config::from_strings(&env(&[
            (CONTROLLER, "http://127.0.0.1:8090"),
            (IDENTITY, "spiffe://cluster.local/ns/default/sa/hello"),
            (TOKEN, "t"),
        ]))
        .unwrap();
        assert_eq!(c.inbound_listen.port(), 4143);
        assert_eq!(c.inbound_mode, InboundMode::Strict);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.token, TokenSource::Static("t".into()));
        assert!(c.opaque_ports.contains(&3306));
        assert_eq!(c.worker_threads, 1);
    }

    #[test]
    fn opaque_ports_are_a_list_or_none() {
        let base = [
            (CONTROLLER, "http://127.0.0.1:8090"),
            (IDENTITY, "spiffe://cluster.local/ns/default/sa/hello"),
            (TOKEN, "t"),
        ];
        let with = |ports: &str| {
            let mut e = env(&base);
            e.insert(OPAQUE_PORTS, ports.to_string());
            Config::from_strings(&e)
        };
        assert_eq!(with("9000, 9001").unwrap().opaque_ports, vec![9000, 9001]);
        assert!(with("none").unwrap().opaque_ports.is_empty());
        let err = with("9000,ssh").unwrap_err().to_string();
        assert!(
            err.contains(OPAQUE_PORTS) && err.contains("\"9000,ssh\""),
            "{err}"
        );
    }

    #[test]
    fn reports_every_bad_variable_at_once() {
        let err = Config::from_strings(&env(&[
            (CONTROLLER, "127.0.0.1:8090"),
            (IDENTITY, "hello"),
            (INBOUND_MODE, "lenient"),
            (REQUEST_TIMEOUT, "soon"),
            (WORKER_THREADS, "0"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        for name in [
            CONTROLLER,
            IDENTITY,
            INBOUND_MODE,
            REQUEST_TIMEOUT,
            TOKEN,
            WORKER_THREADS,
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert_eq!(err.0.len(), 6, "{text}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5d"), None);
    }
}
