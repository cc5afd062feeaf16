//! The peer path: the same two-hop mutual-TLS path built from HAProxy, to
//! compare against. Client-side HAProxy (plaintext in) → TLS 1.3 with a
//! client certificate, HTTP/2 → server-side HAProxy (`verify required`
//! against the bench's CA) → the same server. One process each, one thread
//! each (`nbthread 1`), keep-alive and connection reuse on both hops.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::load::Protocol;
use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::process::{Child, Command};

/// The name the server-side certificate carries and the client side checks.
const SERVER_NAME: &str = "hello.default.svc.cluster.local";

/// Listening ports: client side (plaintext) and server side (TLS), one
/// frontend per protocol so each variant reaches the server in its own
/// protocol, as the trellis path does.
fn ports(protocol: Protocol) -> (u16, u16) {
    match protocol {
        Protocol::Http1 => (4080, 4443),
        Protocol::Http2 => (4081, 4444),
    }
}

/// HAProxy on this machine: on `PATH` or where Debian's package puts it.
pub fn find_haproxy() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
}

/// The two HAProxy processes (killed when dropped) and their files.
pub struct Peer {
    /// `haproxy -v`'s first line.
    pub version: String,
    client_ip: IpAddr,
    client: Child,
    server: Child,
    /// Certificates, configurations and logs; removed after the processes
    /// end (fields drop in order).
    dir: tempfile::TempDir,
}

impl Peer {
    /// Starts both sides, the client side on `client_ip`, the server side on
    /// `server_ip` forwarding to `app`, and waits until both protocols pass.
    pub async fn start(
        haproxy: &Path,
        client_ip: IpAddr,
        server_ip: IpAddr,
        app: SocketAddr,
        hop: Hop,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        write_certificates(dir.path())?;
        let server = spawn(
            haproxy,
            dir.path(),
            "server",
            &server_config(server_ip, app, dir.path(), hop),
        )?;
        let client = spawn(
            haproxy,
            dir.path(),
            "client",
            &client_config(client_ip, server_ip, dir.path(), hop),
        )?;
        let mut peer = Self {
            version: version(haproxy).await?,
            client_ip,
            client,
            server,
            dir,
        };
        peer.wait_ready().await?;
        Ok(peer)
    }

    /// Where the load generator sends `protocol` requests.
    pub fn entry(&self, protocol: Protocol) -> SocketAddr {
        SocketAddr::new(self.client_ip, ports(protocol).0)
    }

    pub fn pids(&self) -> Vec<u32> {
        [&self.client, &self.server]
            .iter()
            .filter_map(|c| c.id())
            .collect()
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path().to_path_buf();
        let deadline = Instant::now() + Duration::from_secs(10);
        for protocol in Protocol::ALL {
            let client = protocol.client(self.entry(protocol));
            loop {
                let answer = client.get(SERVER_NAME, "/").await;
                if answer.as_ref().is_ok_and(|a| a.status.is_success()) {
                    break;
                }
                for (side, child) in [("client", &mut self.client), ("server", &mut self.server)] {
                    if let Some(status) = child.try_wait()? {
                        anyhow::bail!(
                            "{side}-side haproxy exited ({status}):\n{}",
                            log(&dir, side)
                        );
                    }
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "haproxy path ({}) not answering 200 within 10 s: {answer:?}\n\
                     client log:\n{}\nserver log:\n{}",
                    protocol.name(),
                    log(&dir, "client"),
                    log(&dir, "server"),
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

fn log(dir: &Path, side: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{side}.log"))).unwrap_or_default()
}

/// Runs `haproxy -db` (foreground, one process) on `config`, output to
/// `<side>.log` so a failed start can be explained.
fn spawn(haproxy: &Path, dir: &Path, side: &str, config: &str) -> anyhow::Result<Child> {
    let config_path = dir.join(format!("{side}.cfg"));
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.join(format!("{side}.log")))?;
    Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", haproxy.display()))
}

async fn version(haproxy: &Path) -> anyhow::Result<String> {
    let output = Command::new(haproxy).arg("-v").output().await?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or("haproxy").to_string())
}

/// Both sides: one thread; TLS 1.3 only; HTTP keep-alive on both sides of
/// each proxy and idle server connections shared by all clients
/// (`http-reuse always`), like the sidecars' pooled connections.
const COMMON: &str = "global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
";

/// `h2` on a plaintext bind or server line means h2c (prior knowledge).
fn h2c(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http1 => "",
        Protocol::Http2 => " proto h2",
    }
}

/// What the TLS hop between the two HAProxies speaks for HTTP/1.1 clients
/// (`--peer-hop`); HTTP/2 clients' requests always cross it as HTTP/2.
#[derive(Clone, Copy)]
pub enum Hop {
    /// As between sidecars, and the default.
    Http2,
    /// To measure what the other choice costs a proxy that has both.
    Http1,
}

impl Hop {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "http2" => Ok(Hop::Http2),
            "http1" => Ok(Hop::Http1),
            other => anyhow::bail!("--peer-hop {other:?}: expected http2 or http1"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hop::Http2 => "http2",
            Hop::Http1 => "http1",
        }
    }

    /// The ALPN protocol both ends of the hop offer for `protocol`'s clients.
    fn alpn(self, protocol: Protocol) -> &'static str {
        match (self, protocol) {
            (Hop::Http1, Protocol::Http1) => "http/1.1",
            _ => "h2",
        }
    }
}

/// Client side: plaintext in, TLS with the client certificate out, the
/// server's certificate checked against the CA and `SERVER_NAME`. The TLS
/// hop speaks HTTP/2 (ALPN h2) for both variants, as between sidecars,
/// unless `hop` says otherwise.
fn client_config(ip: IpAddr, server_ip: IpAddr, dir: &Path, hop: Hop) -> String {
    let mut config = COMMON.to_string();
    for protocol in Protocol::ALL {
        let (listen, upstream) = ports(protocol);
        let name = protocol.name();
        config += &format!(
            "frontend in_{name}
    bind {ip}:{listen}{h2c}
    default_backend mesh_{name}
backend mesh_{name}
    server peer {server_ip}:{upstream} ssl alpn {alpn} crt {dir}/client.pem ca-file {dir}/ca.pem verify required sni str({SERVER_NAME}) verifyhost {SERVER_NAME}
",
            h2c = h2c(protocol),
            dir = dir.display(),
            alpn = hop.alpn(protocol),
        );
    }
    config
}

/// Server side: TLS in, a client certificate from the CA required,
/// plaintext to the app in the variant's protocol.
fn server_config(ip: IpAddr, app: SocketAddr, dir: &Path, hop: Hop) -> String {
    let mut config = COMMON.to_string();
    for protocol in Protocol::ALL {
        let (_, listen) = ports(protocol);
        let name = protocol.name();
        config += &format!(
            "frontend mesh_{name}
    bind {ip}:{listen} ssl alpn {alpn} crt {dir}/server.pem ca-file {dir}/ca.pem verify required
    default_backend app_{name}
backend app_{name}
    server app {app}{h2c}
",
            h2c = h2c(protocol),
            alpn = hop.alpn(protocol),
            dir = dir.display(),
        );
    }
    config
}

/// `ca.pem`, and `server.pem` / `client.pem` each holding a certificate and
/// its key (the form HAProxy's `crt` reads). ECDSA P-256 throughout, like
/// the mesh's certificates.
fn write_certificates(dir: &Path) -> anyhow::Result<()> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "trellis bench peer CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    for (side, name, usage) in [
        ("server", SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth),
        (
            "client",
            "bench-client",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(vec![name.to_string()])?;
        leaf.distinguished_name.push(DnType::CommonName, name);
        leaf.extended_key_usages = vec![usage];
        let cert = leaf.signed_by(&key, &ca)?;
        std::fs::write(
            dir.join(format!("{side}.pem")),
            cert.pem() + &key.serialize_pem(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ALPN protocols a rendered configuration offers, line by line.
    fn alpns(config: &str) -> Vec<&str> {
        config
            .lines()
            .filter_map(|line| line.split(" alpn ").nth(1)?.split(' ').next())
            .collect()
    }

    #[test]
    fn the_hop_speaks_http1_only_for_http1_clients_when_asked() {
        let (ip, app) = ([127, 0, 0, 1].into(), ([127, 0, 0, 2], 80).into());
        let dir = Path::new("/certs");
        for (hop, expected) in [(Hop::Http2, ["h2", "h2"]), (Hop::Http1, ["http/1.1", "h2"])] {
            assert_eq!(alpns(&client_config(ip, ip, dir, hop)), expected);
            assert_eq!(alpns(&server_config(ip, app, dir, hop)), expected);
        }
    }

    /// HAProxy takes the HTTP/1.1 hop's configuration and serves both
    /// protocols through it (`start` waits for a 200 on each).
    #[tokio::test]
    async fn the_pair_serves_through_an_http1_hop() {
        let Some(haproxy) = find_haproxy() else {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "haproxy not found"
            );
            return eprintln!("haproxy not found: install the Debian package `haproxy`");
        };
        let mut mesh = trellis_tests::Mesh::start().await;
        let (client_ip, server_ip) = (mesh.pod_ip(), mesh.pod_ip());
        let listener = tokio::net::TcpListener::bind((server_ip, 0)).await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(crate::load::serve_app(listener));
        let peer = Peer::start(&haproxy, client_ip, server_ip, app, Hop::Http1).await;
        assert!(peer.is_ok(), "{:?}", peer.err());
    }
}
