//! Instructions per proxied request, counted by valgrind's callgrind: a
//! figure that, unlike time, does not move with the machine's noise, so a
//! change of a few percent shows. A second sidecar pair runs under
//! callgrind; after a warm-up both counters are zeroed, a fixed mix passes
//! (half HTTP/1.1 `GET`s, half HTTP/2 `POST`s of 1 KiB, one at a time), and
//! the counts are dumped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::process::Command;
use trellis_tests::{eventually, pod_yaml, service_yaml, Mesh};

use crate::load::{self, Protocol};
use crate::sidecar::{Launch, ProxyProcess};

const SERVICE: &str = "hello-callgrind";

/// Counted instructions per request of each sidecar of the pair.
pub struct Instructions {
    pub requests: usize,
    pub client_side: u64,
    pub server_side: u64,
}

impl Instructions {
    pub fn json(&self) -> Value {
        json!({"requests": self.requests, "client_side_per_request": self.client_side,
               "server_side_per_request": self.server_side})
    }

    pub fn markdown(&self) -> String {
        format!(
            "\nInstructions per request (callgrind, {} requests, half h1 half h2): \
             client-side sidecar {}, server-side sidecar {}\n",
            self.requests, self.client_side, self.server_side
        )
    }
}

/// valgrind on `PATH`, or `None` (said on stderr) where it is missing —
/// except under `CI=true`, where the figure must not silently disappear.
pub fn find_valgrind() -> anyhow::Result<Option<PathBuf>> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join("valgrind"))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        anyhow::ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "valgrind not found and CI=true requires the instruction count: \
             install the Debian package `valgrind`"
        );
        eprintln!(
            "valgrind not found: skipping instructions per request; \
             install the Debian package `valgrind` to count them"
        );
    }
    Ok(found)
}

/// Counts `requests` requests through a fresh pair of sidecars under
/// callgrind, to a server of its own. The dumps (`client.1`, `server.1`)
/// go to `keep_in`, or to a temporary directory.
pub async fn measure(
    mesh: &mut Mesh,
    valgrind: &Path,
    requests: usize,
    keep_in: Option<&Path>,
) -> anyhow::Result<Instructions> {
    let (client_ip, server_ip) = (mesh.pod_ip(), mesh.pod_ip());
    let listener = tokio::net::TcpListener::bind((server_ip, 0)).await?;
    let app = listener.local_addr()?;
    tokio::spawn(load::serve_app(listener));
    let temporary = tempfile::tempdir()?;
    let dir = keep_in.unwrap_or(temporary.path());
    std::fs::create_dir_all(dir)?;
    let launch = |side: &str| Launch {
        wrapper: vec![
            valgrind.into(),
            "--tool=callgrind".into(),
            "--quiet".into(),
            OsString::from(format!("--callgrind-out-file={}", dir.join(side).display())),
        ],
        ready_within: Duration::from_secs(120),
    };
    let client = ProxyProcess::launch(mesh, client_ip, "bench-callgrind", launch("client")).await?;
    let server = ProxyProcess::launch(mesh, server_ip, SERVICE, launch("server")).await?;
    mesh.write_manifest(
        "bench-callgrind.yaml",
        &(pod_yaml("hello-callgrind-v1", SERVICE, "v1", server.inbound.port())
            + "---\n"
            + &service_yaml(SERVICE, app.port(), &[("hello-callgrind-v1", server_ip)])),
    );
    let authority = format!("{SERVICE}.default.svc.cluster.local:{}", app.port());
    let clients = Protocol::ALL.map(|protocol| (protocol, protocol.client(client.outbound)));
    eventually(
        Duration::from_secs(60),
        "the callgrind pair routes",
        || async {
            let (protocol, client) = &clients[0];
            let ok = protocol.call(client, &authority).await;
            ok.then_some(()).ok_or_else(|| "no answer yet".to_string())
        },
    )
    .await;
    let mix = |n: usize| {
        let (clients, authority) = (&clients, &authority);
        async move {
            for i in 0..n {
                let (protocol, client) = &clients[i % 2];
                let ok = protocol.call(client, authority).await;
                anyhow::ensure!(ok, "request {i} through the callgrind pair failed");
            }
            Ok(())
        }
    };
    // Connections, TLS, the balancer's state: warm before counting.
    mix(100).await?;
    let pids = [client.pid(), server.pid()];
    for pid in pids {
        callgrind_control("--zero", pid).await?;
    }
    mix(requests).await?;
    let mut counts = Vec::new();
    for (pid, side) in pids.into_iter().zip(["client", "server"]) {
        callgrind_control("--dump", pid).await?;
        counts.push(dumped_instructions(&dir.join(format!("{side}.1")))? / requests as u64);
    }
    Ok(Instructions {
        requests,
        client_side: counts[0],
        server_side: counts[1],
    })
}

async fn callgrind_control(command: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .arg(command)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("running callgrind_control (Debian package `valgrind`)")?;
    anyhow::ensure!(
        status.success(),
        "callgrind_control {command} {pid}: {status}"
    );
    Ok(())
}

/// The `summary:` line of a callgrind dump: instructions since the zeroing.
fn dumped_instructions(file: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading callgrind's dump {}", file.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("summary:"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no `summary:` line in {}", file.display()))
}
