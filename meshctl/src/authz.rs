//! `meshctl authz POD`: who may call which port and path of a pod, and why,
//! computed from the manifest directory by the controller's own resolver
//! (the answer its sidecar is streamed).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use trellis_control_plane::source::local::parse_dir;
use trellis_control_plane::store::{DefaultInboundPolicy, Store, EVERY_PORT};
use trellis_proto::discovery::{caller, AuthorizationRule, InboundPolicy, PortPolicy};

use crate::context;
use crate::route::render_table;

#[derive(clap::Args)]
pub struct AuthzArgs {
    /// The pod's name (metadata.name), e.g. hello-v1.
    pod: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The controller's manifest directory; the running demo's by default.
    #[arg(long, env = "TRELLIS_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// The mesh's trust domain, in which service accounts become SPIFFE IDs.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

pub fn run(args: AuthzArgs) -> anyhow::Result<bool> {
    let dir = context::manifests_dir(args.manifests.as_deref())?;
    let store = Store::new(&args.trust_domain);
    let parsed = parse_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut objects = Vec::new();
    for (file, result) in parsed {
        match result {
            Ok(parsed) => objects.extend(parsed),
            // The controller would not load it either; say so.
            Err(error) => eprintln!("warning: {} is not served: {error}", file.display()),
        }
    }
    store.replace_all(objects);
    let policy = store.inbound_policy(&args.namespace, &args.pod, "");
    if policy.workload.is_empty() {
        bail!(
            "no Pod {}/{} in {}; name a pod (metadata.name) of the manifests",
            args.namespace,
            args.pod,
            dir.display()
        );
    }
    print!("{}", render(&policy));
    Ok(true)
}

/// The table and one line per port saying why.
pub fn render(policy: &InboundPolicy) -> String {
    let default = DefaultInboundPolicy::from(policy.default_policy());
    let mut rows = vec![["PORT", "PATH/METHOD", "CALLER", "POLICY", "MODE"]
        .map(String::from)
        .to_vec()];
    for port in &policy.ports {
        for rule in &port.rules {
            for caller in &rule.callers {
                rows.push(vec![
                    port_name(port.port),
                    requests(rule),
                    caller_name(caller.kind.as_ref()),
                    rule.policy.clone(),
                    mode(rule.audit).into(),
                ]);
            }
        }
    }
    let mut out = String::new();
    if rows.len() > 1 {
        out.push_str(&render_table(&rows));
        out.push('\n');
    }
    for port in &policy.ports {
        out.push_str(&why(port, default));
    }
    let others = if policy.ports.iter().any(|p| p.port == EVERY_PORT) {
        String::new()
    } else if policy.ports.is_empty() {
        format!("every port: no AuthorizationPolicy selects this pod; the namespace default {default} applies ({})\n", allows(default))
    } else {
        format!(
            "other ports: the namespace default {default} applies ({})\n",
            allows(default)
        )
    };
    out.push_str(&others);
    out
}

fn why(port: &PortPolicy, default: DefaultInboundPolicy) -> String {
    let name = match port.port {
        EVERY_PORT => "every other port".to_string(),
        number => format!("port {number}"),
    };
    if !port.enforce_policies.is_empty() {
        let audit = match port.audit_policies.is_empty() {
            true => String::new(),
            false => format!(
                "; Audit policies {} only count",
                port.audit_policies.join(", ")
            ),
        };
        return format!(
            "{name}: default-deny, selected by {}: only the rules above allow{audit}\n",
            port.enforce_policies.join(", ")
        );
    }
    format!(
        "{name}: only Audit policies ({}) select it: the namespace default {default} decides ({}), and what their rules do not allow is counted as a would-be denial\n",
        port.audit_policies.join(", "),
        allows(default)
    )
}

fn allows(default: DefaultInboundPolicy) -> &'static str {
    match default {
        DefaultInboundPolicy::AllUnauthenticated => "everyone",
        DefaultInboundPolicy::AllMeshed => "any meshed identity",
        DefaultInboundPolicy::Deny => "nobody",
    }
}

fn port_name(port: u32) -> String {
    match port {
        EVERY_PORT => "*".into(),
        number => number.to_string(),
    }
}

fn mode(audit: bool) -> &'static str {
    if audit {
        "Audit"
    } else {
        "Enforce"
    }
}

fn requests(rule: &AuthorizationRule) -> String {
    if rule.http.is_empty() {
        return "any (and TCP)".into();
    }
    let each: Vec<String> = rule
        .http
        .iter()
        .map(|m| {
            let methods = match m.methods.is_empty() {
                true => "any".to_string(),
                false => m.methods.join("|"),
            };
            let paths: Vec<String> = m
                .paths
                .iter()
                .map(|p| match p.exact {
                    true => p.value.clone(),
                    false => format!("{}*", p.value),
                })
                .collect();
            match paths.is_empty() {
                true => format!("{methods} *"),
                false => format!("{methods} {}", paths.join(",")),
            }
        })
        .collect();
    each.join("; ")
}

fn caller_name(kind: Option<&caller::Kind>) -> String {
    match kind {
        Some(caller::Kind::Identity(id)) => id.clone(),
        Some(caller::Kind::Namespace(ns)) => format!("namespace {ns}"),
        Some(caller::Kind::Meshed(_)) => "any meshed identity".into(),
        Some(caller::Kind::Unauthenticated(_)) => "anyone (also plaintext)".into(),
        None => "nobody".into(),
    }
}
