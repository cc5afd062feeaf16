//! `meshctl identity`: the certificate each proxy currently presents.

use crate::context::{self, Context};
use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(clap::Args)]
pub struct IdentityArgs {
    /// Only this pod (default: every proxy of the running demo).
    pod: Option<String>,
    /// A proxy's admin URL instead of the demo's, e.g. http://127.0.0.1:4191.
    #[arg(long)]
    admin: Option<String>,
    /// Print the proxies' JSON as is.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: crate::route::Format,
}

pub async fn run(args: IdentityArgs) -> anyhow::Result<bool> {
    let proxies: Vec<(String, String)> = match &args.admin {
        Some(url) => vec![("proxy".into(), url.trim_end_matches('/').to_string())],
        None => {
            let path = context::path();
            let context = Context::load(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .context("no running demo found; start `meshctl demo` or pass --admin URL")?;
            context.proxies
        }
    };
    let proxies: Vec<_> = proxies
        .into_iter()
        .filter(|(pod, _)| args.pod.as_ref().is_none_or(|p| p == pod))
        .collect();
    if proxies.is_empty() {
        bail!("no proxy named {:?}", args.pod.unwrap_or_default());
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut rows = vec![["POD", "SPIFFE ID", "ISSUER", "NOT AFTER"]
        .map(String::from)
        .to_vec()];
    for (pod, admin) in proxies {
        let url: http::Uri = format!("{admin}/identity")
            .parse()
            .with_context(|| format!("bad admin URL {admin}"))?;
        let response = client
            .get(url)
            .await
            .with_context(|| format!("asking {admin} (is the proxy of {pod} running?)"))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{pod}: {status}: {}", String::from_utf8_lossy(&body).trim());
        }
        let cert: serde_json::Value =
            serde_json::from_slice(&body).context("the proxy answered no JSON")?;
        if args.output != crate::route::Format::Table {
            println!("{cert}");
            continue;
        }
        let not_after = cert["not_after_unix"].as_u64().unwrap_or(0);
        let remaining = not_after.saturating_sub(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        rows.push(vec![
            pod,
            cert["spiffe_id"].as_str().unwrap_or("").to_string(),
            cert["issuer"].as_str().unwrap_or("").to_string(),
            format!("unix {not_after} (in {remaining} s)"),
        ]);
    }
    if args.output == crate::route::Format::Table {
        print!("{}", crate::route::render_table(&rows));
    }
    Ok(true)
}
