//! Does a sidecar's memory grow with the mesh? It should not: a proxy holds
//! only what its application asked for. Measured by adding Services to the
//! controller while a sidecar with live watches runs, and reading its memory
//! before and after.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use trellis_tests::{service_yaml, AppClient, Mesh};

/// Services per manifest file: two YAML documents each, under the
/// manifest parser's limit of 1,024 documents per file.
const PER_FILE: usize = 500;

/// A process's memory, KiB, from `/proc/PID/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// Resident, including the shared pages of the binary and libraries.
    pub rss: u64,
    /// Only this process's own pages (heap, stacks, written data).
    pub private: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Self {
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss: field("Rss:"),
            private: field("Private_Clean:") + field("Private_Dirty:"),
        }
    }

    /// Each figure the larger of the two.
    pub fn max(self, other: Self) -> Self {
        Self {
            rss: self.rss.max(other.rss),
            private: self.private.max(other.private),
        }
    }
}

pub struct MeshSize {
    pub added_services: usize,
    pub before: Memory,
    pub after: Memory,
}

impl MeshSize {
    pub fn json(&self) -> Value {
        json!({
            "added_services": self.added_services,
            "rss_before_kib": self.before.rss, "rss_after_kib": self.after.rss,
            "private_before_kib": self.before.private, "private_after_kib": self.after.private,
        })
    }

    pub fn markdown(&self) -> String {
        format!(
            "Sidecar memory with {} more Services in the mesh: RSS {} → {} KiB ({:+} KiB), \
             private {} → {} KiB ({:+} KiB)\n",
            self.added_services,
            self.before.rss,
            self.after.rss,
            self.after.rss as i64 - self.before.rss as i64,
            self.before.private,
            self.after.private,
            self.after.private as i64 - self.before.private as i64,
        )
    }
}

/// Adds `services` Services (one endpoint each) to the mesh and reads the
/// sidecar `pid`'s memory before and after the controller holds them.
pub async fn measure(mesh: &Mesh, pid: u32, services: usize) -> anyhow::Result<MeshSize> {
    let held_before = services_held(mesh).await?;
    let before = Memory::of(pid);
    for (file, first) in (0..services).step_by(PER_FILE).enumerate() {
        let docs: Vec<String> = (first..(first + PER_FILE).min(services))
            .map(|i| {
                let ip = std::net::Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8);
                service_yaml(&format!("filler-{i}"), 8080, &[("filler", ip.into())])
            })
            .collect();
        mesh.write_manifest(&format!("mesh-size-{file}.yaml"), &docs.join("---\n"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while services_held(mesh).await? < held_before + services {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the controller did not load {services} Services within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give any (unexpected) update time to reach the sidecar.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(MeshSize {
        added_services: services,
        before,
        after: Memory::of(pid),
    })
}

/// The Services the controller holds, from its `/metrics`.
async fn services_held(mesh: &Mesh) -> anyhow::Result<usize> {
    let admin = mesh
        .controller
        .as_ref()
        .context("controller running")?
        .admin_addr;
    let metrics = AppClient::http1(admin)
        .get(&admin.to_string(), "/metrics")
        .await
        .map_err(|e| anyhow::anyhow!("scraping the controller: {e}"))?
        .text();
    Ok(metrics
        .lines()
        .find(|l| l.starts_with("trellis_controller_objects{kind=\"Service\"}"))
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .unwrap_or(0.0) as usize)
}
