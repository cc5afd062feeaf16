//! `meshctl proxy` and `meshctl token` as a user runs them: the real
//! binary, the real demo, and an unmodified nginx meshed beside it.
//!
//! Needs nginx (Debian `nginx-light`); without it the nginx test skips,
//! except under `CI=true`, where it fails.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::eventually;

const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn meshctl(context: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    command.env("TRELLIS_CONTEXT", context).stdin(Stdio::null());
    command
}

/// A child process stopped (`signal`, then killed after 15 s) when dropped,
/// so a failing test leaves nothing behind.
struct Running {
    child: Child,
    signal: &'static str,
}

impl Running {
    /// Sends the stop signal and waits for the exit.
    fn stop(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args([self.signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "pid {} did not stop within 15 s of {}",
                    self.child.id(),
                    self.signal
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The demo's context: its proxies' admin URLs by name.
fn context_proxies(context: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(context).map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    serde_json::from_value(json["proxies"].clone()).map_err(|e| e.to_string())
}

fn admin_of(context: &Path, pod: &str) -> Result<SocketAddr, String> {
    let proxies = context_proxies(context)?;
    let (_, url) = proxies
        .iter()
        .find(|(name, _)| name == pod)
        .ok_or_else(|| format!("no {pod} in {proxies:?}"))?;
    url.trim_start_matches("http://")
        .parse()
        .map_err(|e| format!("{url}: {e}"))
}

/// One HTTP/1.1 request to `addr` naming `host`: the status and body.
fn get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let exchange = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    let response = exchange().map_err(|e| format!("{addr}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response head: {response:?}"))?;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the test reads bodies with a length: {head}"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {head}"))?;
    Ok((status, body.to_string()))
}

/// nginx, unmodified, on 127.0.0.1 at a free port, answering with the
/// client identity the sidecar hands it (`trellis-client-id`).
fn start_nginx(dir: &Path) -> Option<(Running, u16)> {
    if Command::new("nginx").arg("-v").output().is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install nginx (Debian nginx-light)"
        );
        eprintln!("skipping: nginx is not installed (apt-get install nginx-light)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(dir).unwrap();
    let d = dir.display();
    let config = format!(
        "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 \"hello from nginx, client $http_trellis_client_id\\n\"; }}
  }}
}}
"
    );
    let file = dir.join("nginx.conf");
    std::fs::write(&file, config).unwrap();
    let child = Command::new("nginx")
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let nginx = Running {
        child,
        signal: "-TERM",
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    eventually("nginx listens", || {
        get(addr, "localhost", "/").map(|_| ()).map_err(|e| {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            format!("{e}; nginx error log: {log}")
        })
    });
    Some((nginx, port))
}

/// The value of the `trellis_requests_total` series with these labels, as
/// `/metrics` at `admin` shows it now.
fn requests_total(admin: SocketAddr, labels: &[(&str, &str)]) -> Result<f64, String> {
    let (_, text) = get(admin, &admin.to_string(), "/metrics")?;
    let found: f64 = text
        .lines()
        .filter(|line| line.starts_with("trellis_requests_total{"))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    Ok(found)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The goal: `meshctl proxy` puts an unmodified nginx behind a
/// sidecar in the running demo, and a request from the frontend's sidecar
/// reaches it over mTLS; stopping it takes the app out of the mesh again.
#[test]
fn meshctl_proxy_meshes_an_unmodified_nginx() {
    let scratch = tempfile::tempdir().unwrap();
    let Some((_nginx, nginx_port)) = start_nginx(&scratch.path().join("nginx")) else {
        return;
    };
    let context = scratch.path().join("context.json");
    let state = scratch.path().join("mesh");
    let mut demo = Running {
        child: meshctl(&context)
            .args(["demo", "--rps", "5", "--state-dir"])
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        signal: "-INT",
    };
    let frontend_admin = eventually("the demo comes up", || admin_of(&context, "frontend"));
    let frontend_outbound = SocketAddr::new(frontend_admin.ip(), 4140);

    // Another demo Service's name is refused before anything is written.
    let taken = meshctl(&context)
        .args(["proxy", "--name", "frontend", "--app"])
        .arg(format!("127.0.0.1:{nginx_port}"))
        .output()
        .unwrap();
    assert!(!taken.status.success());
    assert!(
        stderr(&taken).contains("Service default/frontend is already defined in"),
        "{}",
        stderr(&taken)
    );

    let log = std::fs::File::create(scratch.path().join("proxy.log")).unwrap();
    let mut proxy = Running {
        child: meshctl(&context)
            .args([
                "proxy",
                "--name",
                "web",
                "--service-account",
                "web",
                "--port",
                "8080",
            ])
            .arg("--app")
            .arg(format!("127.0.0.1:{nginx_port}"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap(),
        signal: "-TERM",
    };
    let proxy_log =
        || std::fs::read_to_string(scratch.path().join("proxy.log")).unwrap_or_default();
    let web_admin = eventually("meshctl proxy publishes web", || {
        admin_of(&context, "web").map_err(|e| format!("{e}; proxy log:\n{}", proxy_log()))
    });
    let manifest = state.join("manifests/meshctl-proxy-web.yaml");
    assert!(manifest.exists(), "{}", manifest.display());

    // The frontend's sidecar, as the frontend app would use it (explicit
    // proxy), calls web by its Service name and port.
    let authority = "web.default.svc.cluster.local:8080";
    let body = eventually(
        "a request through the frontend's sidecar reaches nginx",
        || match get(frontend_outbound, authority, "/")? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("{status}: {body}")),
        },
    );
    // nginx saw the identity web's sidecar verified on the client's certificate.
    assert_eq!(body, format!("hello from nginx, client {FRONTEND}\n"));
    // …and both sidecars counted the hop as mutual TLS with the other's SPIFFE ID.
    let inbound = requests_total(
        web_admin,
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", FRONTEND),
            ("dst_service", "web"),
            ("status_code", "200"),
        ],
    )
    .unwrap();
    assert!(
        inbound >= 1.0,
        "web's sidecar counted {inbound} mTLS requests from the frontend"
    );
    let outbound = requests_total(
        frontend_admin,
        &[
            ("direction", "outbound"),
            ("tls", "true"),
            ("peer_identity", WEB),
            ("dst_service", "web"),
            ("status_code", "200"),
        ],
    )
    .unwrap();
    assert!(
        outbound >= 1.0,
        "the frontend's sidecar counted {outbound} mTLS requests to web"
    );

    // `meshctl token` prints the token web's sidecar got its certificate with.
    let token = meshctl(&context).args(["token", WEB]).output().unwrap();
    assert!(token.status.success(), "{}", stderr(&token));
    let used = std::fs::read_to_string(state.join("tokens/web.token")).unwrap();
    assert_eq!(String::from_utf8_lossy(&token.stdout), format!("{used}\n"));
    assert_eq!(used.len(), 64, "an HMAC-SHA256 in hex: {used}");
    let explicit = meshctl(&context)
        .args(["token", WEB, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(explicit.stdout, token.stdout, "{}", stderr(&explicit));

    // SIGTERM drains the sidecar and takes web out of the mesh.
    let status = proxy.stop();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        proxy_log()
    );
    let mut banner = String::new();
    proxy
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut banner)
        .unwrap();
    assert!(
        banner.contains(&format!("web is in the mesh as {WEB}")),
        "{banner}"
    );
    assert!(banner.contains(&format!("http://{authority}/")), "{banner}");
    assert!(!manifest.exists(), "the manifests outlived meshctl proxy");
    assert!(!state.join("tokens/web.token").exists());
    assert!(
        admin_of(&context, "web").is_err(),
        "web is still in the context"
    );
    eventually("web is gone from the frontend's view", || {
        match get(frontend_outbound, authority, "/")? {
            (503, _) => Ok(()),
            (status, body) => Err(format!("{status}: {body}")),
        }
    });
    assert!(demo.stop().success());
}

#[test]
fn without_a_demo_proxy_and_token_say_what_to_do() {
    let scratch = tempfile::tempdir().unwrap();
    let context = scratch.path().join("context.json");
    let proxy = meshctl(&context)
        .args(["proxy", "--name", "web", "--app", "127.0.0.1:8080"])
        .output()
        .unwrap();
    assert!(!proxy.status.success());
    assert!(
        stderr(&proxy).contains("no demo is running")
            && stderr(&proxy).contains("start `meshctl demo`"),
        "{}",
        stderr(&proxy)
    );
    let token = meshctl(&context).args(["token", WEB]).output().unwrap();
    assert!(!token.status.success());
    assert!(stderr(&token).contains("--state-dir"), "{}", stderr(&token));

    // A state directory without the controller's key is refused, not given one.
    let wrong = meshctl(&context)
        .args(["token", WEB, "--state-dir"])
        .arg(scratch.path())
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("bootstrap.key: does not exist"),
        "{}",
        stderr(&wrong)
    );
    assert!(!scratch.path().join("bootstrap.key").exists());

    // A context whose demo has exited is stale (no pid is this high).
    std::fs::write(
        &context,
        serde_json::json!({
            "manifests": scratch.path().join("manifests"),
            "controller": "127.0.0.1:8090",
            "pid": u32::MAX >> 1,
            "state_dir": scratch.path(),
            "trust_domain": "cluster.local",
        })
        .to_string(),
    )
    .unwrap();
    let stale = meshctl(&context).args(["token", WEB]).output().unwrap();
    assert!(!stale.status.success());
    assert!(
        stderr(&stale).contains("is no longer running"),
        "{}",
        stderr(&stale)
    );
}

/// SPIFFE IDs are checked: the shape, and the trust domain of the mesh.
#[test]
fn token_refuses_malformed_and_foreign_identities() {
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path();
    // The controller's key, as a controller that ran would have left it.
    trellis_control_plane::identity::BootstrapTokens::load_or_create(state).unwrap();
    let token = |id: &str| {
        meshctl(&state.join("no-context.json"))
            .args(["token", id, "--state-dir"])
            .arg(state)
            .output()
            .unwrap()
    };
    let good = token(WEB);
    assert!(good.status.success(), "{}", stderr(&good));
    let expected = trellis_control_plane::identity::BootstrapTokens::load(state)
        .unwrap()
        .token_for(&WEB.parse().unwrap());
    assert_eq!(
        String::from_utf8_lossy(&good.stdout),
        format!("{expected}\n")
    );

    let foreign = token("spiffe://example.org/ns/default/sa/web");
    assert!(!foreign.status.success());
    assert!(
        stderr(&foreign).contains(
            "the mesh's is \"cluster.local\"; use spiffe://cluster.local/ns/default/sa/web"
        ),
        "{}",
        stderr(&foreign)
    );
    let malformed = token("web");
    assert!(!malformed.status.success());
    assert!(
        stderr(&malformed).contains("spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>"),
        "{}",
        stderr(&malformed)
    );
}
