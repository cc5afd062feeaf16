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

/// Where the controller is and how it is authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerAddress {
    /// The gRPC URL, e.g. `https://trellis-controller.trellis.svc:8090`.
    pub url: String,
    /// `None` for plaintext, which only a loopback URL may use.
    pub tls: Option<ControllerTls>,
}

/// How the proxy verifies the controller over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerTls {
    pub trust_bundle: TrustBundle,
    /// The SPIFFE ID the controller's certificate must name.
    pub identity: SpiffeId,
}

/// Where the mesh's trust bundle (PEM) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustBundle {
    /// A file (`TRELLIS_CONTROLLER_TRUST`), re-read at every connection so a
    /// rotated bundle (an updated ConfigMap) needs no restart.
    File(PathBuf),
    /// The PEM text itself (`TRELLIS_CONTROLLER_TRUST_PEM`), as the injector
    /// sets it: a pod cannot mount a ConfigMap of the mesh's namespace. A
    /// new root reaches such a proxy when its pod is restarted.
    Inline(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub controller: ControllerAddress,
    pub identity: SpiffeId,
    pub token: TokenSource,
    /// Where applications' traffic arrives (explicit proxy, and what
    /// iptables redirects): one address per family for dual stack.
    pub outbound_listen: Vec<SocketAddr>,
    /// Where peer proxies (and redirected inbound traffic) arrive: one
    /// address per family for dual stack.
    pub inbound_listen: Vec<SocketAddr>,
    /// `/metrics`, probes and `POST /shutdown`: one address per family for
    /// dual stack.
    pub admin_listen: Vec<SocketAddr>,
    /// Where the inbound side reaches the application (the pod IP, or loopback).
    pub app_ip: IpAddr,
    pub inbound_mode: InboundMode,
    /// Upper bound for a whole request through the outbound side.
    pub request_timeout: Duration,
    /// How long a first request waits for discovery to answer.
    pub discovery_timeout: Duration,
    /// The workload (app) name, for metrics; the service account when unset.
    pub workload: String,
    /// The pod's name (`TRELLIS_POD`, from the downward API), by which the
    /// controller finds the workload's authorization policy; empty: found
    /// by `app_ip`.
    pub pod: String,
    /// The workload's version label, for metrics.
    pub version: String,
    /// Whether request metrics are recorded (on by default; off only to
    /// measure what they cost).
    pub metrics: bool,
    /// Ports whose connections are opaque TCP without protocol detection:
    /// server-speaks-first protocols would otherwise wait out the detection
    /// timeout on every connection.
    pub opaque_ports: Vec<u16>,
    /// Whether the explicit proxy's `CONNECT` may open a tunnel to a
    /// destination outside the mesh (`TRELLIS_CONNECT_EGRESS=allow`);
    /// refused with 403 by default, so the sidecar is no open proxy.
    pub connect_egress: bool,
    /// Threads that serve traffic. One by default: a sidecar's work is
    /// many small, independent I/O steps, which one thread does without
    /// cross-thread wake-ups, locks or a second malloc arena; more help only
    /// a pod whose traffic needs more than one core.
    pub worker_threads: usize,
    /// How long a drain (SIGTERM, SIGINT, `POST /shutdown`) lets in-flight
    /// requests and tunnels finish before the rest is cut: under the pod's
    /// default 30 s grace period, so the proxy exits before the kubelet kills it.
    pub drain_timeout: Duration,
    /// How long a client may take to send a request's head, from the
    /// connection's start or from its first byte on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// How long an application's connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// How long protocol detection and the TLS handshake of a new connection may take.
    pub handshake_timeout: Duration,
    /// The largest request head accepted from an application: HTTP/1 request
    /// line and headers, or an HTTP/2 header list (RFC 9113 §6.5.2).
    pub max_header_bytes: u32,
    /// How long the outbound side keeps the state of an authority nobody asked for.
    pub idle_authority_timeout: Duration,
    /// How long a request or response body may go without a byte.
    pub body_idle_timeout: Duration,
    /// Connections each listener holds at most; beyond it a new connection
    /// is accepted and closed at once (and counted), the others still served.
    pub max_connections: usize,
    /// Streams a client may have open at once on one HTTP/2 connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS, RFC 9113 §6.5.2).
    pub max_concurrent_streams: u32,
    /// Inbound TLS handshakes in progress at once; more wait for a turn
    /// (within the handshake timeout), so a handshake flood costs bounded CPU.
    pub max_tls_handshakes: usize,
    /// Request body bytes one connection may have received but not yet
    /// forwarded: the HTTP/2 connection and stream windows, the HTTP/1
    /// read buffer. Bodies stream; this bounds what sits in the proxy.
    pub max_body_in_flight: u32,
}

/// The smallest `TRELLIS_MAX_HEADER_BYTES`: hyper's minimum read buffer.
pub const MIN_HEADER_BYTES: u32 = 8 * 1024;
/// The largest `TRELLIS_MAX_HEADER_BYTES` (Envoy's default is 60 KiB).
pub const MAX_HEADER_BYTES_CEILING: u32 = 1024 * 1024;
/// The default `TRELLIS_MAX_CONNECTIONS`, per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// The default `TRELLIS_MAX_CONCURRENT_STREAMS` (what RFC 9113 §6.5.2
/// recommends as the least a server allows).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// The default `TRELLIS_MAX_TLS_HANDSHAKES`.
pub const DEFAULT_MAX_TLS_HANDSHAKES: usize = 64;
/// The default `TRELLIS_MAX_BODY_IN_FLIGHT`: 1 MiB.
pub const DEFAULT_MAX_BODY_IN_FLIGHT: u32 = 1024 * 1024;
/// The smallest `TRELLIS_MAX_BODY_IN_FLIGHT`: HTTP/2's initial window.
pub const MIN_BODY_IN_FLIGHT: u32 = 65_535;
/// The largest `TRELLIS_MAX_BODY_IN_FLIGHT`: 64 MiB.
pub const MAX_BODY_IN_FLIGHT_CEILING: u32 = 64 * 1024 * 1024;
/// The longest timeout any `TRELLIS_*_TIMEOUT` may have.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

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
pub const CONTROLLER_TRUST: &str = "TRELLIS_CONTROLLER_TRUST";
pub const CONTROLLER_TRUST_PEM: &str = "TRELLIS_CONTROLLER_TRUST_PEM";
pub const CONTROLLER_IDENTITY: &str = "TRELLIS_CONTROLLER_IDENTITY";
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
pub const POD: &str = "TRELLIS_POD";
pub const VERSION: &str = "TRELLIS_VERSION";
pub const METRICS: &str = "TRELLIS_METRICS";
pub const OPAQUE_PORTS: &str = "TRELLIS_OPAQUE_PORTS";
pub const CONNECT_EGRESS: &str = "TRELLIS_CONNECT_EGRESS";
pub const WORKER_THREADS: &str = "TRELLIS_WORKER_THREADS";
pub const DRAIN_TIMEOUT: &str = "TRELLIS_DRAIN_TIMEOUT";
pub const HEADER_READ_TIMEOUT: &str = "TRELLIS_HEADER_READ_TIMEOUT";
pub const IDLE_TIMEOUT: &str = "TRELLIS_IDLE_TIMEOUT";
pub const HANDSHAKE_TIMEOUT: &str = "TRELLIS_HANDSHAKE_TIMEOUT";
pub const MAX_HEADER_BYTES: &str = "TRELLIS_MAX_HEADER_BYTES";
pub const IDLE_AUTHORITY_TIMEOUT: &str = "TRELLIS_IDLE_AUTHORITY_TIMEOUT";
pub const BODY_IDLE_TIMEOUT: &str = "TRELLIS_BODY_IDLE_TIMEOUT";
pub const MAX_CONNECTIONS: &str = "TRELLIS_MAX_CONNECTIONS";
pub const MAX_CONCURRENT_STREAMS: &str = "TRELLIS_MAX_CONCURRENT_STREAMS";
pub const MAX_TLS_HANDSHAKES: &str = "TRELLIS_MAX_TLS_HANDSHAKES";
pub const MAX_BODY_IN_FLIGHT: &str = "TRELLIS_MAX_BODY_IN_FLIGHT";

impl Config {
    pub fn from_strings(env: &dyn Strings) -> Result<Self, ConfigError> {
        let mut r = Reader {
            env,
            problems: Vec::new(),
        };
        let identity = r.required(
            IDENTITY,
            "spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>",
            |v| v.parse::<SpiffeId>().ok(),
        );
        let controller = r.controller(identity.as_ref());
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
        let addrs = |v: &str| -> Option<Vec<SocketAddr>> {
            let addrs: Option<Vec<SocketAddr>> = v.split(',').map(|a| addr(a.trim())).collect();
            addrs.filter(|a| !a.is_empty())
        };
        let listen = "ip:port, or one per family separated by a comma (0.0.0.0:4143,[::]:4143)";
        let outbound_listen = r.optional(OUTBOUND_LISTEN, "127.0.0.1:4140", listen, addrs);
        let inbound_listen = r.optional(INBOUND_LISTEN, "0.0.0.0:4143", listen, addrs);
        let admin_listen = r.optional(ADMIN_LISTEN, "127.0.0.1:4191", listen, addrs);
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
        let request_timeout = r.timeout(REQUEST_TIMEOUT, "10s");
        let metrics = r.optional(METRICS, "on", "on or off", |v| match v {
            "on" => Some(true),
            "off" => Some(false),
            _ => None,
        });
        let discovery_timeout = r.timeout(DISCOVERY_TIMEOUT, "5s");
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
        let connect_egress = r.optional(CONNECT_EGRESS, "deny", "allow or deny", |v| match v {
            "allow" => Some(true),
            "deny" => Some(false),
            _ => None,
        });
        let worker_threads = r.optional(WORKER_THREADS, "1", "a number of threads, 1 to 64", |v| {
            v.parse::<usize>().ok().filter(|n| (1..=64).contains(n))
        });
        let drain_timeout = r.timeout(DRAIN_TIMEOUT, "20s");
        let header_read_timeout = r.timeout(HEADER_READ_TIMEOUT, "10s");
        let idle_timeout = r.timeout(IDLE_TIMEOUT, "60s");
        let handshake_timeout = r.timeout(HANDSHAKE_TIMEOUT, "10s");
        let idle_authority_timeout = r.timeout(IDLE_AUTHORITY_TIMEOUT, "5m");
        let body_idle_timeout = r.timeout(BODY_IDLE_TIMEOUT, "60s");
        let max_header_bytes = r.optional(
            MAX_HEADER_BYTES,
            "65536",
            &format!("a number of bytes from {MIN_HEADER_BYTES} to {MAX_HEADER_BYTES_CEILING}"),
            |v| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| (MIN_HEADER_BYTES..=MAX_HEADER_BYTES_CEILING).contains(n))
            },
        );
        let max_connections = r.count(MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS, 1, 1_000_000);
        let max_concurrent_streams = r.count(
            MAX_CONCURRENT_STREAMS,
            DEFAULT_MAX_CONCURRENT_STREAMS,
            1,
            10_000,
        );
        let max_tls_handshakes = r.count(MAX_TLS_HANDSHAKES, DEFAULT_MAX_TLS_HANDSHAKES, 1, 10_000);
        let max_body_in_flight = r.count(
            MAX_BODY_IN_FLIGHT,
            DEFAULT_MAX_BODY_IN_FLIGHT,
            MIN_BODY_IN_FLIGHT,
            MAX_BODY_IN_FLIGHT_CEILING,
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
                pod: env.get(POD).unwrap_or_default(),
                version: env.get(VERSION).unwrap_or_default(),
                metrics: metrics?,
                opaque_ports: opaque_ports?,
                connect_egress: connect_egress?,
                worker_threads: worker_threads?,
                drain_timeout: drain_timeout?,
                header_read_timeout: header_read_timeout?,
                idle_timeout: idle_timeout?,
                handshake_timeout: handshake_timeout?,
                max_header_bytes: max_header_bytes?,
                idle_authority_timeout: idle_authority_timeout?,
                body_idle_timeout: body_idle_timeout?,
                max_connections: max_connections?,
                max_concurrent_streams: max_concurrent_streams?,
                max_tls_handshakes: max_tls_handshakes?,
                max_body_in_flight: max_body_in_flight?,
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

    /// `TRELLIS_CONTROLLER` and, for `https://`, the trust bundle and the
    /// identity to expect (by default the controller's in the proxy's own
    /// trust domain). Plaintext is only for a controller on loopback.
    fn controller(&mut self, own: Option<&SpiffeId>) -> Option<ControllerAddress> {
        let url = self.required(
            CONTROLLER,
            "an https:// URL, e.g. https://trellis-controller.trellis.svc:8090 (http:// only to a loopback address)",
            |v| {
                let uri = v.parse::<http::Uri>().ok()?;
                let secure = match uri.scheme_str()? {
                    "https" => true,
                    "http" => false,
                    _ => return None,
                };
                uri.authority()?;
                Some((v.to_string(), secure, uri))
            },
        );
        let trust = match (
            self.env.get(CONTROLLER_TRUST),
            self.env.get(CONTROLLER_TRUST_PEM),
        ) {
            (Some(_), Some(_)) => {
                self.problems.push(format!(
                    "both {CONTROLLER_TRUST} and {CONTROLLER_TRUST_PEM} are set; set exactly one (a PEM file, or the PEM text)"
                ));
                return None;
            }
            (Some(path), None) => Some(TrustBundle::File(PathBuf::from(path))),
            (None, Some(pem)) => Some(TrustBundle::Inline(pem)),
            (None, None) => None,
        };
        let (url, secure, uri) = url?;
        if !secure {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.to_canonical().is_loopback());
            if !loopback {
                self.problems.push(format!(
                    "{CONTROLLER}={url:?}: plaintext to the controller is only allowed to a loopback address; use https:// and set {CONTROLLER_TRUST} (or {CONTROLLER_TRUST_PEM}) to the mesh's trust bundle"
                ));
                return None;
            }
            if trust.is_some() {
                self.problems.push(format!(
                    "a trust bundle ({CONTROLLER_TRUST} or {CONTROLLER_TRUST_PEM}) is set but {CONTROLLER}={url:?} is plaintext; use https:// so the bundle is used"
                ));
                return None;
            }
            return Some(ControllerAddress { url, tls: None });
        }
        let Some(trust_bundle) = trust else {
            self.problems.push(format!(
                "{CONTROLLER}={url:?} is https:// but {CONTROLLER_TRUST} is not set; set it to the PEM file of the mesh's trust bundle (bundle.crt in the controller's state directory, or the mounted trust-bundle ConfigMap), or set {CONTROLLER_TRUST_PEM} to the PEM text"
            ));
            return None;
        };
        let identity = match self.env.get(CONTROLLER_IDENTITY) {
            Some(value) => self.parse(
                CONTROLLER_IDENTITY,
                &value,
                "the controller's SPIFFE ID, spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>",
                |v| v.parse::<SpiffeId>().ok(),
            )?,
            // Without a valid own identity there is no trust domain to
            // default from; that problem is reported already.
            None => SpiffeId::default_controller(&own?.trust_domain),
        };
        Some(ControllerAddress {
            url,
            tls: Some(ControllerTls {
                trust_bundle,
                identity,
            }),
        })
    }

    /// A timeout: a duration above zero and at most [`MAX_TIMEOUT`], so that
    /// deadlines computed from it cannot overflow.
    fn timeout(&mut self, name: &str, default: &str) -> Option<Duration> {
        self.optional(
            name,
            default,
            "a duration from 1ms to 24h, like 10s, 500ms or 5m",
            |v| parse_duration(v).filter(|d| *d >= Duration::from_millis(1) && *d <= MAX_TIMEOUT),
        )
    }

    /// A whole number from `min` to `max`, `default` when unset.
    fn count<T>(&mut self, name: &str, default: T, min: T, max: T) -> Option<T>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        self.optional(
            name,
            &default.to_string(),
            &format!("a whole number from {min} to {max}"),
            |v| v.parse::<T>().ok().filter(|n| *n >= min && *n <= max),
        )
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

/// The shared grammar (`500ms`, `30s`, `5m`, `24h`), as this module's
/// validators want it.
fn parse_duration(s: &str) -> Option<Duration> {
    trellis_common::duration::parse(s).ok()
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
        assert_eq!(c.inbound_listen, ["0.0.0.0:4143".parse().unwrap()]);
        assert_eq!(c.inbound_mode, InboundMode::Strict);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.token, TokenSource::Static("t".into()));
        assert!(c.opaque_ports.contains(&3306));
        assert_eq!(c.worker_threads, 1);
        assert_eq!(c.drain_timeout, Duration::from_secs(20));
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_header_bytes, 65536);
        assert_eq!(c.idle_authority_timeout, Duration::from_secs(300));
        assert_eq!(c.body_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 20_000);
        assert_eq!(c.max_concurrent_streams, 100);
        assert_eq!(c.max_tls_handshakes, 64);
        assert_eq!(c.max_body_in_flight, 1 << 20);
    }

    #[test]
    fn limits_are_whole_numbers_in_range_reported_with_the_others() {
        let mut e = env(&[
            (CONTROLLER, "http://127.0.0.1:8090"),
            (IDENTITY, "spiffe://cluster.local/ns/default/sa/hello"),
            (TOKEN, "t"),
        ]);
        e.insert(MAX_CONNECTIONS, "0".into());
        e.insert(MAX_CONCURRENT_STREAMS, "lots".into());
        e.insert(MAX_TLS_HANDSHAKES, "-1".into());
        e.insert(MAX_BODY_IN_FLIGHT, "1024".into());
        e.insert(IDLE_TIMEOUT, "never".into());
        let err = Config::from_strings(&e).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 5, "{text}");
        for name in [
            MAX_CONNECTIONS,
            MAX_CONCURRENT_STREAMS,
            MAX_TLS_HANDSHAKES,
            MAX_BODY_IN_FLIGHT,
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(
            text.contains("a whole number from 65535 to 67108864"),
            "{text}"
        );
        e.insert(MAX_CONNECTIONS, "10".into());
        e.insert(MAX_CONCURRENT_STREAMS, "8".into());
        e.insert(MAX_TLS_HANDSHAKES, "2".into());
        e.insert(MAX_BODY_IN_FLIGHT, "65535".into());
        e.remove(IDLE_TIMEOUT);
        let c = Config::from_strings(&e).unwrap();
        assert_eq!(
            (
                c.max_connections,
                c.max_concurrent_streams,
                c.max_tls_handshakes,
                c.max_body_in_flight
            ),
            (10, 8, 2, 65535)
        );
    }

    #[test]
    fn timeouts_and_the_header_limit_are_bounded() {
        let base = [
            (CONTROLLER, "http://127.0.0.1:8090"),
            (IDENTITY, "spiffe://cluster.local/ns/default/sa/hello"),
            (TOKEN, "t"),
        ];
        let mut e = env(&base);
        e.insert(DRAIN_TIMEOUT, "100000000000000000000000000000s".into());
        e.insert(HEADER_READ_TIMEOUT, "0s".into());
        e.insert(IDLE_TIMEOUT, "25h".into());
        e.insert(HANDSHAKE_TIMEOUT, "later".into());
        e.insert(MAX_HEADER_BYTES, "1024".into());
        e.insert(BODY_IDLE_TIMEOUT, "18446744073709551616".into());
        let err = Config::from_strings(&e).unwrap_err();
        assert_eq!(err.0.len(), 6, "{err}");
        let mut e = env(&base);
        e.insert(DRAIN_TIMEOUT, "2s".into());
        e.insert(MAX_HEADER_BYTES, "1048576".into());
        e.insert(IDLE_AUTHORITY_TIMEOUT, "24h".into());
        let c = Config::from_strings(&e).unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
        assert_eq!(c.max_header_bytes, 1 << 20);
        assert_eq!(c.idle_authority_timeout, MAX_TIMEOUT);
    }

    #[test]
    fn absurd_request_and_discovery_timeouts_are_reported_by_name() {
        let mut e = env(&[
            (CONTROLLER, "http://127.0.0.1:8090"),
            (IDENTITY, "spiffe://cluster.local/ns/default/sa/hello"),
            (TOKEN, "t"),
        ]);
        e.insert(REQUEST_TIMEOUT, "99999999999999999999".into());
        e.insert(DISCOVERY_TIMEOUT, "9999999999999h".into());
        let err = Config::from_strings(&e).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 2, "{text}");
        for name in [REQUEST_TIMEOUT, DISCOVERY_TIMEOUT] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains("1ms to 24h"), "{text}");
    }

    #[test]
    fn listen_addresses_are_one_per_family() {
        let base = [
            (CONTROLLER, "http://127.0.0.1:8090"),
            (IDENTITY, "spiffe://cluster.local/ns/default/sa/hello"),
            (TOKEN, "t"),
        ];
        let with = |name: &'static str, addrs: &str| {
            let mut e = env(&base);
            e.insert(name, addrs.to_string());
            Config::from_strings(&e)
        };
        let dual = with(INBOUND_LISTEN, "0.0.0.0:4143, [::]:4143").unwrap();
        let expected: Vec<SocketAddr> = vec![
            "0.0.0.0:4143".parse().unwrap(),
            "[::]:4143".parse().unwrap(),
        ];
        assert_eq!(dual.inbound_listen, expected);
        for bad in ["0.0.0.0:4143,", "::1:4140", ""] {
            let err = with(OUTBOUND_LISTEN, bad).unwrap_err().to_string();
            assert!(
                err.contains(OUTBOUND_LISTEN) && err.contains("one per family"),
                "{bad:?}: {err}"
            );
        }
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
    fn the_controller_is_tls_with_a_bundle_or_plaintext_on_loopback() {
        let with = |pairs: &[(&'static str, &str)]| {
            let mut e = env(&[
                (IDENTITY, "spiffe://mesh.example/ns/default/sa/hello"),
                (TOKEN, "t"),
            ]);
            e.extend(pairs.iter().map(|(k, v)| (*k, v.to_string())));
            Config::from_strings(&e).map(|c| c.controller)
        };
        let tls = with(&[
            (CONTROLLER, "https://trellis-controller.trellis.svc:8090"),
            (CONTROLLER_TRUST, "/var/run/trellis/bundle.crt"),
        ])
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(
            tls.trust_bundle,
            TrustBundle::File(PathBuf::from("/var/run/trellis/bundle.crt"))
        );
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let inline = with(&[
            (CONTROLLER, "https://trellis-controller.trellis.svc:8090"),
            (CONTROLLER_TRUST_PEM, pem),
        ])
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(inline.trust_bundle, TrustBundle::Inline(pem.into()));
        assert_eq!(
            tls.identity.to_string(),
            "spiffe://mesh.example/ns/trellis/sa/trellis-controller",
            "by default the controller's identity in the proxy's trust domain"
        );
        let tls = with(&[
            (CONTROLLER, "https://10.0.0.1:8090"),
            (CONTROLLER_TRUST, "/b.crt"),
            (CONTROLLER_IDENTITY, "spiffe://mesh.example/ns/mesh/sa/cp"),
        ])
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(
            tls.identity.to_string(),
            "spiffe://mesh.example/ns/mesh/sa/cp"
        );
        for loopback in [
            "http://127.0.0.1:8090",
            "http://127.9.8.7:1",
            "http://[::1]:8090",
            "http://localhost:8090",
        ] {
            assert_eq!(
                with(&[(CONTROLLER, loopback)]).unwrap().tls,
                None,
                "{loopback}"
            );
        }

        let problem = |pairs: &[(&'static str, &str)]| with(pairs).unwrap_err().to_string();
        let text = problem(&[(CONTROLLER, "http://10.0.0.1:8090")]);
        assert!(
            text.contains(CONTROLLER)
                && text.contains("only allowed to a loopback address")
                && text.contains(CONTROLLER_TRUST),
            "{text}"
        );
        let text = problem(&[(CONTROLLER, "https://10.0.0.1:8090")]);
        assert!(
            text.contains(CONTROLLER_TRUST) && text.contains("is not set"),
            "{text}"
        );
        let text = problem(&[
            (CONTROLLER, "https://10.0.0.1:8090"),
            (CONTROLLER_TRUST, "/b.crt"),
            (CONTROLLER_IDENTITY, "trellis-controller"),
        ]);
        assert!(text.contains(CONTROLLER_IDENTITY), "{text}");
        let text = problem(&[
            (CONTROLLER, "http://127.0.0.1:8090"),
            (CONTROLLER_TRUST, "/b.crt"),
        ]);
        assert!(text.contains("use https://"), "{text}");
        let text = problem(&[
            (CONTROLLER, "https://10.0.0.1:8090"),
            (CONTROLLER_TRUST, "/b.crt"),
            (CONTROLLER_TRUST_PEM, "pem"),
        ]);
        assert!(
            text.contains("both") && text.contains(CONTROLLER_TRUST_PEM),
            "{text}"
        );
        let text = problem(&[(CONTROLLER, "grpc://10.0.0.1:8090")]);
        assert!(text.contains("an https:// URL"), "{text}");
    }
}
