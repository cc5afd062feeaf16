//! The `trellis-proxy run` binary drains on SIGTERM and on `POST /shutdown`:
//! the signal handling and the exit status are what the kubelet sees, so
//! these run the real binary (with a controller address nothing listens on:
//! draining needs no certificate).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A free loopback port (closed again; the proxy binds it right after).
fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

struct Sidecar {
    child: Child,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
}

impl Sidecar {
    /// Starts the binary and waits for `/live`. Discovery never answers, so
    /// a request to the outbound listener is in flight for the discovery
    /// timeout (2 s) and then answered 503.
    async fn start() -> Self {
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
            .arg("run")
            .env_clear()
            .env("TRELLIS_CONTROLLER", "http://127.0.0.1:1")
            .env(
                "TRELLIS_IDENTITY",
                "spiffe://cluster.local/ns/default/sa/drain",
            )
            .env("TRELLIS_TOKEN", "unused")
            .env("TRELLIS_INBOUND_MODE", "permissive")
            .env("TRELLIS_OUTBOUND_LISTEN", outbound.to_string())
            .env("TRELLIS_INBOUND_LISTEN", inbound.to_string())
            .env("TRELLIS_ADMIN_LISTEN", admin.to_string())
            .env("TRELLIS_DRAIN_TIMEOUT", "10s")
            .env("TRELLIS_DISCOVERY_TIMEOUT", "2s")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start trellis-proxy");
        let sidecar = Self {
            child,
            inbound,
            outbound,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(admin, "/live").await.map(|(s, _)| s) != Ok(200) {
            assert!(Instant::now() < deadline, "/live not answering within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sidecar
    }

    fn terminate(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    }

    /// Waits up to `patience` for the process to exit.
    async fn exited_within(&mut self, patience: Duration) -> ExitStatus {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "trellis-proxy still running {patience:?} after the drain started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a new connection: status and body.
async fn request(
    addr: SocketAddr,
    request: http::Request<Full<Bytes>>,
) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    request(addr, req).await
}

#[tokio::test]
async fn sigterm_exits_0_promptly_when_idle() {
    let mut sidecar = Sidecar::start().await;
    let started = Instant::now();
    sidecar.terminate();
    let status = sidecar.exited_within(Duration::from_secs(3)).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!("idle sidecar exited {:?} after SIGTERM", started.elapsed());
}

#[tokio::test]
async fn post_shutdown_from_loopback_drains_and_exits_0() {
    let mut sidecar = Sidecar::start().await;
    let (status, _) = get(sidecar.admin, "/shutdown")
        .await
        .expect("GET /shutdown");
    assert_eq!(status, 405, "GET does not shut down");
    let shutdown = http::Request::post("/shutdown")
        .header("host", sidecar.admin.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, body) = request(sidecar.admin, shutdown).await.expect("POST");
    assert_eq!((status, body.as_str()), (202, "draining\n"));
    let status = sidecar.exited_within(Duration::from_secs(3)).await;
    assert!(
        status.success(),
        "exit status after POST /shutdown: {status}"
    );
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish_and_refuses_new_connections() {
    let mut sidecar = Sidecar::start().await;
    let (inbound, outbound) = (sidecar.inbound, sidecar.outbound);
    // In flight for the discovery timeout, then the proxy's own answer.
    let slow = tokio::spawn(async move {
        let req = http::Request::get("/slow")
            .header("host", "app.default.svc.cluster.local:80")
            .body(Full::new(Bytes::new()))
            .expect("request");
        request(outbound, req).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!slow.is_finished(), "the request is in flight");

    let signalled = Instant::now();
    sidecar.terminate();
    // The listener closes at once: a new connect is refused, so a client's
    // proxy moves on to another endpoint.
    let refused_after = loop {
        match TcpStream::connect(inbound).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                break signalled.elapsed()
            }
            _ => {}
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "the inbound listener still accepts 1 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Meanwhile the kubelet's readiness probe fails.
    let (status, body) = get(sidecar.admin, "/ready").await.expect("/ready");
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert!(
        sidecar.child.try_wait().expect("wait").is_none(),
        "exited with the request in flight"
    );

    let (status, body) = slow.await.expect("slow task").expect("the slow request");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("discovery did not answer"), "{body}");
    let status = sidecar.exited_within(Duration::from_secs(3)).await;
    assert!(status.success(), "exit status after the drain: {status}");
    eprintln!(
        "listener refused {refused_after:?} after SIGTERM; exited {:?} after it",
        signalled.elapsed()
    );
}
