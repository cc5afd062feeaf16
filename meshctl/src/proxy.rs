//! `meshctl proxy`: puts an application of the user's, already listening on
//! this machine, behind a sidecar in the running demo's mesh. The sidecar
//! gets its own loopback address in the demo's block (as a pod gets an IP),
//! its identity and bootstrap token, and the environment the demo's own
//! sidecars get; once it has a certificate, the app's Service, EndpointSlice
//! and Pod go into the demo's manifest directory, so the mesh can call it.
//! It runs in the foreground; Ctrl-C or SIGTERM drains it and removes them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::context::{self, Context};
use crate::demo::manifests::{self, OwnApp, ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT};
use crate::demo::{self, Sidecar};
use anyhow::{bail, Context as _};
use trellis_control_plane::cli::init_tracing;
use trellis_control_plane::model::Object;
use trellis_control_plane::source::{local::parse_dir, manifest};
use trellis_proto::SpiffeId;
use trellis_proxy::config::{Env, Strings};

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// The app's Service name, as callers name it:
    /// <name>.default.svc.cluster.local:<port>.
    #[arg(long, value_parser = dns_label)]
    name: String,
    /// Where the app listens, e.g. 127.0.0.1:8080; the sidecar forwards
    /// meshed requests there.
    #[arg(long, value_name = "IP:PORT")]
    app: SocketAddr,
    /// The service account the app runs as: its SPIFFE ID is
    /// spiffe://<trust-domain>/ns/default/sa/<service-account> [default: --name].
    #[arg(long, value_parser = dns_label)]
    service_account: Option<String>,
    /// The Service port callers use [default: the app's port].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// A `version` label for the app's Pod and metrics.
    #[arg(long, value_parser = dns_label)]
    version: Option<String>,
}

/// A Kubernetes object name that is not a DNS label (RFC 1035).
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a valid name: use 1-63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit")]
struct InvalidName(String);

fn dns_label(name: &str) -> Result<String, InvalidName> {
    let bytes = name.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if valid {
        Ok(name.to_string())
    } else {
        Err(InvalidName(name.to_string()))
    }
}

/// Runs the sidecar until SIGTERM, SIGINT or the demo stops.
pub fn run(args: ProxyArgs) -> anyhow::Result<bool> {
    init_tracing("info");
    if args.app.port() == 0 {
        bail!("--app {}: give the port the app listens on", args.app);
    }
    let context_path = context::path();
    let demo = Context::running(&context_path)?;
    let controller: SocketAddr = demo
        .controller
        .parse()
        .with_context(|| format!("{}: bad controller address", context_path.display()))?;
    let service_account = args.service_account.as_deref().unwrap_or(&args.name);
    let identity = SpiffeId::new(&demo.trust_domain, manifests::NAMESPACE, service_account);
    let tokens = crate::token::open(&demo.state_dir)?;
    let pod_ip = free_pod_ip(controller)?;
    let app = OwnApp {
        name: &args.name,
        service_account,
        version: args.version.as_deref(),
        pod_ip,
        port: args.port.unwrap_or(args.app.port()),
        app_port: args.app.port(),
    };
    let file = demo
        .manifests
        .join(format!("meshctl-proxy-{}.yaml", args.name));
    let yaml = format!(
        "{OWNER}{} for {}; removed when it stops\n{}",
        std::process::id(),
        args.app,
        manifests::render_own_app(&app)
    );
    check(&demo.manifests, &file, &yaml)?;
    let sidecar = Sidecar {
        name: &args.name,
        pod_ip,
        app_ip: args.app.ip(),
        identity: identity.clone(),
        workload: &args.name,
        version: args.version.as_deref(),
    };
    let env = demo::sidecar_env(&sidecar, controller, &tokens, &demo.state_dir)?;
    let _token = RemoveOnDrop(demo::token_file(&demo.state_dir, &args.name));
    let config = trellis_proxy::Config::from_strings(&OverEnv(env.into_iter().collect()))?;
    let published = Published {
        file,
        yaml,
        context: context_path,
        name: args.name.clone(),
        admin: format!("http://{pod_ip}:{ADMIN_PORT}"),
    };
    let runtime = trellis_proxy::runtime(config.worker_threads).context("starting the runtime")?;
    let result = runtime.block_on(async {
        let sidecar = trellis_proxy::run(config);
        tokio::pin!(sidecar);
        // As a kubelet would, the endpoint is published once the sidecar is
        // ready (it has a certificate), so no caller sees it fail first.
        tokio::select! {
            result = &mut sidecar => return result.map_err(anyhow::Error::from),
            ready = demo::wait_ready(pod_ip, "the sidecar", || format!("is the demo's controller at {controller} up?")) => ready?,
        }
        let _published = published.write()?;
        print_banner(&app, &identity, args.app, &published.file);
        tokio::select! {
            result = &mut sidecar => result.map_err(anyhow::Error::from),
            () = demo_stopped(demo.pid) => {
                eprintln!("the demo (pid {}) stopped, so this sidecar stops too", demo.pid);
                Ok(())
            }
        }
    });
    // As `trellis-proxy run`: tasks still running are not waited for.
    runtime.shutdown_background();
    result.map(|()| true)
}

/// Who the app is in the mesh, how to call it, and what was written.
fn print_banner(app: &OwnApp, identity: &SpiffeId, listens: SocketAddr, manifests: &Path) {
    let (name, port, pod_ip) = (app.name, app.port, app.pod_ip);
    println!("{name} is in the mesh as {identity}:");
    println!(
        "  callers    http://{name}.{}.svc.cluster.local:{port}/ (through their sidecar)",
        manifests::NAMESPACE
    );
    println!("  app        {listens} (the sidecar forwards meshed requests here)");
    println!(
        "  sidecar    {pod_ip}  outbound :{OUTBOUND_PORT} (the app's http_proxy), inbound :{INBOUND_PORT}, admin http://{pod_ip}:{ADMIN_PORT}/ready"
    );
    println!(
        "  manifests  {} (removed when this stops)",
        manifests.display()
    );
    eprintln!("Ctrl-C to stop");
}

/// How a manifest file `meshctl proxy` wrote begins, then its pid.
const OWNER: &str = "# Written by meshctl proxy, pid ";

/// Refuses to write `yaml` to `file` when another `meshctl proxy` that is
/// still running owns it, or when its objects are defined elsewhere or
/// would not validate as the controller validates them.
fn check(dir: &Path, file: &Path, yaml: &str) -> anyhow::Result<()> {
    let owner = std::fs::read_to_string(file).ok().and_then(|old| {
        let pid = old.strip_prefix(OWNER)?.split_whitespace().next()?;
        pid.parse::<u32>().ok()
    });
    if let Some(pid) = owner.filter(|pid| context::process_alive(*pid)) {
        bail!(
            "meshctl proxy (pid {pid}) already meshes this name ({}); stop it or choose another --name",
            file.display()
        );
    }
    let ours = manifest::parse(file, yaml)?;
    let others: Vec<(PathBuf, Vec<Object>)> = parse_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .into_iter()
        .filter(|(other, _)| other != file)
        .map(|(other, parsed)| (other, parsed.unwrap_or_default()))
        .collect();
    for object in &ours {
        let same = |o: &Object| o.kind() == object.kind() && o.key() == object.key();
        if let Some((other, _)) = others.iter().find(|(_, objects)| objects.iter().any(same)) {
            bail!(
                "{object} is already defined in {}; choose another --name",
                other.display()
            );
        }
    }
    let all: Vec<&Object> = others.iter().flat_map(|(_, o)| o).chain(&ours).collect();
    manifest::validate(file, &ours, &all)?;
    Ok(())
}

/// What `meshctl proxy` adds to the demo while it runs: the app's manifests
/// and its entry in the context (so `meshctl identity` and `meshctl stat`
/// see it).
struct Published {
    file: PathBuf,
    yaml: String,
    context: PathBuf,
    name: String,
    admin: String,
}

/// Removes what [`Published::write`] added when dropped.
struct Unpublish<'a>(&'a Published);

impl Published {
    fn write(&self) -> anyhow::Result<Unpublish<'_>> {
        // Atomically: the controller never reads half a file.
        let tmp = self.file.with_extension("yaml.tmp~");
        std::fs::write(&tmp, &self.yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.file)
            .with_context(|| format!("writing {}", self.file.display()))?;
        let unpublish = Unpublish(self);
        self.update_context(|proxies| proxies.push((self.name.clone(), self.admin.clone())));
        Ok(unpublish)
    }

    /// Edits the context's proxies, if the demo that wrote it still owns it.
    fn update_context(&self, edit: impl FnOnce(&mut Vec<(String, String)>)) {
        if let Ok(Some(mut context)) = Context::load(&self.context) {
            if context::process_alive(context.pid) {
                edit(&mut context.proxies);
                if let Err(e) = context.save(&self.context) {
                    tracing::warn!(file = %self.context.display(), error = %e, "cannot update the context");
                }
            }
        }
    }
}

impl Drop for Unpublish<'_> {
    fn drop(&mut self) {
        let published = self.0;
        drop(RemoveOnDrop(published.file.clone()));
        published.update_context(|proxies| proxies.retain(|(name, _)| *name != published.name));
    }
}

/// A file removed when this is dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            // Gone already when the demo removed its temporary state directory.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %self.0.display(), error = %e, "cannot remove");
            }
            _ => {}
        }
    }
}

/// A loopback address for the sidecar in the demo's `127.x.y.0/24` block
/// (the controller has `.1`, the demo's pods `.2` to `.4`) whose sidecar
/// ports are free.
fn free_pod_ip(controller: SocketAddr) -> anyhow::Result<Ipv4Addr> {
    let IpAddr::V4(ip) = controller.ip() else {
        bail!("the demo's controller is at {controller}, not on IPv4 loopback");
    };
    let [a, b, c, _] = ip.octets();
    if a != 127 {
        bail!("the demo's controller is at {controller}, not on loopback");
    }
    let free = |ip: Ipv4Addr| {
        [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT]
            .iter()
            .all(|port| std::net::TcpListener::bind((ip, *port)).is_ok())
    };
    let mut last: Vec<u8> = (10..=254).collect();
    fastrand::shuffle(&mut last);
    last.into_iter()
        .map(|d| Ipv4Addr::new(a, b, c, d))
        .find(|ip| free(*ip))
        .with_context(|| format!("no address in {a}.{b}.{c}.10-254 has ports {OUTBOUND_PORT}, {INBOUND_PORT} and {ADMIN_PORT} free"))
}

/// Returns once process `pid` (the demo) has exited.
async fn demo_stopped(pid: u32) {
    while context::process_alive(pid) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The sidecar's configuration: what [`demo::sidecar_env`] computed, and
/// for anything else (`TRELLIS_DRAIN_TIMEOUT`, …) the process environment.
struct OverEnv(HashMap<&'static str, String>);

impl Strings for OverEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned().or_else(|| Env.get(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["web", "web-2", "a", &"a".repeat(63)] {
            assert_eq!(dns_label(good).unwrap(), good);
        }
        for bad in ["", "Web", "2web", "web-", "we_b", "web.x", &"a".repeat(64)] {
            let e = dns_label(bad).unwrap_err().to_string();
            assert!(e.contains("is not a valid name"), "{bad}: {e}");
        }
    }
}
