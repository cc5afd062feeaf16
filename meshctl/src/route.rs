//! `meshctl route set|get|delete`: write, show and remove the HTTPRoute of a
//! Service. In local mode the route is a file in the manifest directory the
//! controller serves, validated exactly as the controller will before it is
//! written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::context;
use anyhow::{bail, Context as _};
use trellis_control_plane::model::*;
use trellis_control_plane::route_status::{status_of_document, Refs};
use trellis_control_plane::source::local::{documents, parse_dir, write_atomically};
use trellis_control_plane::source::manifest::{self, References};
use trellis_control_plane::store::Store;
use trellis_proto::discovery::route_match::PathKind;
use trellis_proto::discovery::Rule;

mod build;
use build::build;

#[derive(clap::Subcommand)]
pub enum RouteCommand {
    /// Create or replace the route of a Service.
    ///
    /// Examples:
    ///   meshctl route set hello --backend hello-v1=90 --backend hello-v2=10
    ///   meshctl route set hello --backend hello-v1=100 --match header:x-canary=true --to hello-v2
    ///   meshctl route set hello --timeout 2s --retries 2 --fault abort=503:5%
    #[command(verbatim_doc_comment)]
    Set(SetArgs),
    /// Show the routing rules of a Service, in the order proxies apply them.
    Get(Target),
    /// Remove the route `meshctl route set` wrote; traffic falls back to the
    /// Service's own endpoints.
    Delete(Target),
}

#[derive(clap::Args)]
pub struct Target {
    /// The Service whose traffic is routed.
    service: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The manifest directory the controller serves (default: the running
    /// demo's, from the meshctl context).
    #[arg(long, env = "TRELLIS_MANIFESTS")]
    manifests: Option<PathBuf>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

#[derive(clap::Args)]
pub struct SetArgs {
    #[command(flatten)]
    target: Target,
    /// A weighted backend Service, NAME=WEIGHT (repeat for a split).
    #[arg(long = "backend", value_name = "NAME=WEIGHT")]
    backends: Vec<String>,
    /// Conditions for an A/B rule (all must hold): header:NAME=VALUE,
    /// query:NAME=VALUE, path:/PREFIX, exact-path:/PATH, method:METHOD.
    #[arg(long = "match", value_name = "KIND:SPEC", requires = "to")]
    matches: Vec<String>,
    /// The backend Service for requests that satisfy --match.
    #[arg(long, requires = "matches")]
    to: Option<String>,
    /// Whole-request timeout, e.g. 2s or 500ms (504 when it passes).
    #[arg(long)]
    timeout: Option<String>,
    /// Retry failed idempotent requests up to N times (within a 20% budget).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=10))]
    retries: Option<u32>,
    /// Status codes to retry (default 502, 503, 504), e.g. 500,503.
    #[arg(long, value_delimiter = ',', requires = "retries")]
    retry_on: Vec<u16>,
    /// Fault injection: abort=STATUS:PERCENT% or delay=DURATION:PERCENT%.
    #[arg(long = "fault", value_name = "abort=503:5%|delay=200ms:10%")]
    faults: Vec<String>,
}

pub fn run(command: RouteCommand) -> anyhow::Result<bool> {
    match command {
        RouteCommand::Set(args) => set(args),
        RouteCommand::Get(target) => get(&target),
        RouteCommand::Delete(target) => delete(&target),
    }
}

fn manifests_dir(target: &Target) -> anyhow::Result<PathBuf> {
    context::manifests_dir(target.manifests.as_deref())
}

/// The file `route set` owns for a Service.
fn route_file(dir: &Path, target: &Target) -> PathBuf {
    dir.join(format!(
        "route-{}-{}.yaml",
        target.namespace, target.service
    ))
}

fn set(args: SetArgs) -> anyhow::Result<bool> {
    let dir = manifests_dir(&args.target)?;
    let file = route_file(&dir, &args.target);
    let (route, fault) = build(&args)?;
    let mut objects = vec![Object::HttpRoute(route.clone())];
    if let Some(fault) = &fault {
        objects.push(Object::HttpFault(fault.clone()));
    }
    // Validate against what the controller serves, as the controller will.
    let mut all: Vec<Object> = Vec::new();
    for (other, parsed) in parse_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        if other != file {
            all.extend(parsed.unwrap_or_default());
        }
    }
    let service = ObjectKey::new(&args.target.namespace, &args.target.service);
    if !all
        .iter()
        .any(|o| o.kind() == "Service" && o.key() == service)
    {
        bail!(
            "no Service {service} in {}; route an existing Service",
            dir.display()
        );
    }
    refuse_if_rolling_out(&all, &service)?;
    let everything: Vec<&Object> = all.iter().chain(&objects).collect();
    if let Err(e) = manifest::validate(&file, &objects, &everything) {
        bail!("refusing to write the route: {}", e.reason);
    }
    let yaml = objects
        .iter()
        .map(to_yaml)
        .collect::<anyhow::Result<Vec<_>>>()?
        .join("---\n");
    let unchanged = std::fs::read_to_string(&file).is_ok_and(|current| current == yaml);
    if !unchanged {
        write_atomically(&file, yaml.as_bytes())
            .with_context(|| format!("writing {}", file.display()))?;
    }
    match args.target.output {
        Format::Yaml => print!("{yaml}"),
        Format::Json => println!("{}", serde_json::to_string_pretty(&route)?),
        Format::Table => {
            let verb = if unchanged { "unchanged" } else { "written" };
            println!("HTTPRoute {service} {verb}: {}", file.display());
            all.extend(objects);
            print!("{}", table(&all, &service)?);
        }
    }
    Ok(true)
}

fn get(target: &Target) -> anyhow::Result<bool> {
    let dir = manifests_dir(target)?;
    let all = serving(&dir)?;
    let service = ObjectKey::new(&target.namespace, &target.service);
    let routes: Vec<&HttpRoute> = all
        .iter()
        .filter_map(|o| match o {
            Object::HttpRoute(r) if attaches_to(r, &service) => Some(r),
            _ => None,
        })
        .collect();
    match target.output {
        Format::Yaml => {
            let docs: Vec<String> = routes
                .iter()
                .map(|r| to_yaml(&Object::HttpRoute((*r).clone())))
                .collect::<anyhow::Result<_>>()?;
            print!("{}", docs.join("---\n"));
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&routes)?),
        Format::Table => {
            print!("{}", table(&all, &service)?);
            print!("{}", conditions(&dir, &all, &service)?);
        }
    }
    Ok(true)
}

/// The objects of the files the controller would accept: those that parse,
/// and validate against everything that parses.
fn serving(dir: &Path) -> anyhow::Result<Vec<Object>> {
    let parsed: Vec<(PathBuf, Vec<Object>)> = parse_dir(dir)?
        .into_iter()
        .filter_map(|(file, p)| Some((file, p.ok()?)))
        .collect();
    let everything: Vec<&Object> = parsed.iter().flat_map(|(_, o)| o).collect();
    Ok(parsed
        .iter()
        .filter(|(file, objects)| manifest::validate(file, objects, &everything).is_ok())
        .flat_map(|(_, objects)| objects.iter().cloned())
        .collect())
}

/// The Gateway API conditions of every HTTPRoute and GRPCRoute in the directory that
/// names `service` as a parent, refused ones included, as the controller
/// would report them in cluster mode: a refused route says why here.
fn conditions(dir: &Path, all: &[Object], service: &ObjectKey) -> anyhow::Result<String> {
    let loaded: Vec<&Object> = all.iter().collect();
    let references = References::loaded(&loaded);
    let mut rows = vec![["ROUTE", "CONDITION", "STATUS", "REASON", "MESSAGE"]
        .map(String::from)
        .to_vec()];
    for (file, document) in documents(dir)? {
        if document["kind"] != "HTTPRoute" && document["kind"] != "GRPCRoute" {
            continue;
        }
        let text = |pointer: &str| document.pointer(pointer).and_then(|v| v.as_str());
        let namespace = text("/metadata/namespace").unwrap_or("default");
        let name = text("/metadata/name").unwrap_or_default();
        let file = file
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned());
        for parent in status_of_document(&document, &references, Refs::Refuse) {
            let parent_key = ObjectKey::new(
                parent.parent_ref.namespace.as_deref().unwrap_or(namespace),
                &parent.parent_ref.name,
            );
            if parent_key != *service {
                continue;
            }
            let route = format!("{namespace}/{name} ({file})");
            for (i, c) in [&parent.accepted, &parent.resolved_refs]
                .into_iter()
                .enumerate()
            {
                rows.push(vec![
                    if i == 0 { route.clone() } else { String::new() },
                    c.kind.to_string(),
                    c.status.to_string(),
                    c.reason.to_string(),
                    c.message.clone(),
                ]);
            }
        }
    }
    if rows.len() == 1 {
        return Ok(String::new());
    }
    Ok(format!(
        "
{}",
        render_table(&rows)
    ))
}

fn delete(target: &Target) -> anyhow::Result<bool> {
    let dir = manifests_dir(target)?;
    let file = route_file(&dir, target);
    match std::fs::remove_file(&file) {
        Ok(()) => println!(
            "HTTPRoute {}/{} deleted ({})",
            target.namespace,
            target.service,
            file.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let service = ObjectKey::new(&target.namespace, &target.service);
            let elsewhere: BTreeSet<String> = parse_dir(&dir)?
                .into_iter()
                .filter(|(_, parsed)| {
                    parsed.as_ref().is_ok_and(|objects| {
                        objects
                            .iter()
                            .any(|o| matches!(o, Object::HttpRoute(r) if attaches_to(r, &service)))
                    })
                })
                .map(|(f, _)| f.display().to_string())
                .collect();
            if elsewhere.is_empty() {
                println!("Service {service} has no route; nothing to delete");
            } else {
                bail!("the routes of {service} are defined in {elsewhere:?}, not written by meshctl; edit or remove them there");
            }
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
    }
    Ok(true)
}

/// A rollout owns its Service's traffic: a second route would fight it.
fn refuse_if_rolling_out(all: &[Object], service: &ObjectKey) -> anyhow::Result<()> {
    let managed = all.iter().find_map(|o| match o {
        Object::HttpRoute(r) if attaches_to(r, service) => {
            r.metadata.annotations.get(ROLLOUT_ANNOTATION)
        }
        _ => None,
    });
    if let Some(rollout) = managed {
        bail!(
            "the traffic of {service} is managed by rollout {}/{rollout}; \
             use `meshctl rollout promote|abort {rollout}` instead, or delete the rollout first",
            service.namespace
        );
    }
    Ok(())
}

fn attaches_to(route: &HttpRoute, service: &ObjectKey) -> bool {
    route
        .service_parents()
        .any(|(parent, _)| parent == *service)
}

fn to_yaml(object: &Object) -> anyhow::Result<String> {
    Ok(match object {
        Object::HttpRoute(r) => serde_saphyr::to_string(r)?,
        Object::HttpFault(f) => serde_saphyr::to_string(f)?,
        other => bail!("cannot write {other}"),
    })
}

/// The rules proxies will apply to the Service, as a table.
fn table(objects: &[Object], service: &ObjectKey) -> anyhow::Result<String> {
    let port = objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) if s.metadata.key() == *service => {
                s.spec.ports.first().map(|p| p.port)
            }
            _ => None,
        })
        .with_context(|| format!("no Service {service}"))?;
    let store = Store::new("cluster.local");
    store.replace_all(objects.iter().cloned());
    // As the Service's own namespace sees it: its producer routes.
    let routes = store.routes(
        &format!(
            "{}.{}.svc.cluster.local:{port}",
            service.name, service.namespace
        ),
        &service.namespace,
    );
    if routes.rules.is_empty() {
        return Ok(format!(
            "Service {service} has no route: requests go to its own endpoints\n"
        ));
    }
    let mut rows = vec![["RULE", "MATCH", "BACKENDS", "TIMEOUT", "RETRIES", "FAULT"]
        .map(String::from)
        .to_vec()];
    for (i, rule) in routes.rules.iter().enumerate() {
        rows.push(row(i + 1, rule));
    }
    Ok(render_table(&rows))
}

/// Rows as left-aligned columns, the first row being the header.
pub fn render_table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

fn row(index: usize, rule: &Rule) -> Vec<String> {
    let mut conditions = Vec::new();
    if let Some(m) = &rule.r#match {
        match PathKind::try_from(m.path_kind) {
            Ok(PathKind::Exact) => conditions.push(format!("path = {}", m.path)),
            Ok(PathKind::Regex) => conditions.push(format!("path ~ {}", m.path)),
            _ if m.path != "/" => conditions.push(format!("path {}*", m.path)),
            _ => {}
        }
        if !m.method.is_empty() {
            conditions.push(m.method.clone());
        }
        for h in &m.headers {
            conditions.push(format!(
                "header {}{}{}",
                h.name,
                if h.regex { "~" } else { "=" },
                h.value
            ));
        }
        for q in &m.query_params {
            conditions.push(format!(
                "query {}{}{}",
                q.name,
                if q.regex { "~" } else { "=" },
                q.value
            ));
        }
    }
    let total: u32 = rule.backends.iter().map(|b| b.weight).sum();
    let backends: Vec<String> = rule
        .backends
        .iter()
        .map(|b| {
            format!(
                "{} {:.0}%",
                b.name,
                f64::from(b.weight) * 100.0 / f64::from(total.max(1))
            )
        })
        .collect();
    let fault = rule.fault.as_ref().map_or("-".to_string(), |f| {
        let mut parts = Vec::new();
        if f.abort_percent > 0.0 {
            parts.push(format!("abort {} {}%", f.abort_status, f.abort_percent));
        }
        if f.delay_percent > 0.0 {
            parts.push(format!("delay {}ms {}%", f.delay_ms, f.delay_percent));
        }
        parts.join(", ")
    });
    vec![
        index.to_string(),
        if conditions.is_empty() {
            "*".into()
        } else {
            conditions.join(", ")
        },
        backends.join(", "),
        if rule.timeout_ms > 0 {
            format!("{}ms", rule.timeout_ms)
        } else {
            "-".into()
        },
        rule.retry
            .as_ref()
            .map_or("-".into(), |r| r.attempts.to_string()),
        fault,
    ]
}
