//! `meshctl stat` and `meshctl graph`: golden metrics per Service version,
//! and who calls whom — from the proxies directly (local mode) or from a
//! Prometheus that scrapes them.

use std::time::Duration;

use crate::context::{self, Context};
use crate::stats::{self, Sample};
use anyhow::Context as _;
use trellis_common::exposition::HttpGet;

use crate::route::render_table;

#[derive(clap::Args)]
pub struct Source {
    /// How long to measure over.
    #[arg(long, default_value = "5s", value_parser = trellis_common::duration::parse)]
    window: Duration,
    /// Read from this Prometheus (e.g. http://127.0.0.1:9090) instead of the proxies.
    #[arg(long)]
    prometheus: Option<String>,
    /// Proxy admin URLs to scrape (default: every proxy of the running demo).
    #[arg(long = "admin")]
    admins: Vec<String>,
}

#[derive(clap::Args)]
pub struct StatArgs {
    #[command(flatten)]
    source: Source,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: crate::route::Format,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
    Json,
}

#[derive(clap::Args)]
pub struct GraphArgs {
    #[command(flatten)]
    source: Source,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: GraphFormat,
}

/// Samples at the start and the end of the window.
async fn measure(source: &Source) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
    let client = HttpGet::default();
    if let Some(prometheus) = &source.prometheus {
        return Ok((
            Vec::new(),
            from_prometheus(&client, prometheus, source.window).await?,
        ));
    }
    let admins = if source.admins.is_empty() {
        let path = context::path();
        let context = Context::load(&path)?.context(
            "no running demo found: start `meshctl demo`, or pass --admin URL or --prometheus URL",
        )?;
        context.proxies.into_iter().map(|(_, url)| url).collect()
    } else {
        source.admins.clone()
    };
    let scrape = || async {
        let mut all = Vec::new();
        for admin in &admins {
            let samples = client
                .scrape(&format!("{}/metrics", admin.trim_end_matches('/')))
                .await?;
            // Replicas have the same labels: keep them apart by instance.
            all.extend(samples.into_iter().map(|mut s| {
                s.labels.insert("instance".into(), admin.clone());
                s
            }));
        }
        anyhow::Ok(all)
    };
    let before = scrape().await?;
    tokio::time::sleep(source.window).await;
    Ok((before, scrape().await?))
}

/// The window's increase of every series the computations need, as
/// Prometheus has it.
async fn from_prometheus(
    client: &HttpGet,
    url: &str,
    window: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let range = format!("{}s", window.as_secs().max(1));
    let queries = [
        (format!("sum by (direction, src_namespace, src_workload, dst_namespace, dst_service, dst_backend, dst_version, classification, tls) (increase(trellis_requests_total[{range}]))"),
         "trellis_requests_total"),
        (format!("sum by (direction, dst_namespace, dst_service, dst_version, le) (increase(trellis_response_latency_seconds_bucket[{range}]))"),
         "trellis_response_latency_seconds_bucket"),
    ];
    let mut samples = Vec::new();
    for (query, name) in queries {
        samples.extend(client.query(url, &query, name).await?);
    }
    Ok(samples)
}

pub async fn stat(args: StatArgs) -> anyhow::Result<bool> {
    let (before, after) = measure(&args.source).await?;
    let rows = stats::services(&before, &after, args.source.window);
    if args.output != crate::route::Format::Table {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(true);
    }
    if rows.is_empty() {
        println!("no traffic in the last {:?}", args.source.window);
        return Ok(true);
    }
    let mut table = vec![[
        "NAMESPACE",
        "SERVICE",
        "VERSION",
        "RPS",
        "SUCCESS",
        "P50",
        "P95",
        "P99",
        "MTLS",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        table.push(vec![
            r.namespace,
            r.service,
            r.version,
            format!("{:.1}", r.rps),
            format!("{:.2}%", r.success_rate * 100.0),
            format!("{:.2}ms", r.p50_ms),
            format!("{:.2}ms", r.p95_ms),
            format!("{:.2}ms", r.p99_ms),
            format!("{:.0}%", r.mtls_share * 100.0),
        ]);
    }
    print!("{}", render_table(&table));
    Ok(true)
}

pub async fn graph(args: GraphArgs) -> anyhow::Result<bool> {
    let (before, after) = measure(&args.source).await?;
    let edges = stats::graph(&before, &after, args.source.window);
    match args.output {
        GraphFormat::Dot => print!("{}", stats::dot(&edges)),
        GraphFormat::Json => println!("{}", serde_json::to_string(&edges)?),
        GraphFormat::Text => {
            let mut table = vec![["FROM", "TO", "RPS", "SUCCESS"].map(String::from).to_vec()];
            for e in edges {
                table.push(vec![
                    e.from,
                    e.to,
                    format!("{:.1}", e.rps),
                    format!("{:.2}%", e.success_rate * 100.0),
                ]);
            }
            print!("{}", render_table(&table));
        }
    }
    Ok(true)
}
