//! `trellis-proxy run`: the sidecar; `trellis-proxy init`: the iptables
//! set-up for transparent mode, run once in the pod's network namespace.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use trellis_proxy::init::{self, CidrList, Family, Iptables, PortList};

#[derive(Parser)]
#[command(name = "trellis-proxy", version, about = "The Trellis sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, configured by TRELLIS_* environment variables.
    Run,
    /// Install iptables rules (nat table) that redirect the pod's TCP traffic
    /// through the proxy; needs root (or CAP_NET_ADMIN and CAP_NET_RAW).
    /// Safe to re-run.
    Init(InitArgs),
}

#[derive(Args)]
struct InitArgs {
    /// The proxy's inbound port: inbound TCP is redirected here.
    #[arg(long, value_name = "PORT", default_value_t = init::DEFAULT_INBOUND_PORT)]
    inbound_port: u16,
    /// The proxy's outbound port: outbound TCP is redirected here.
    #[arg(long, value_name = "PORT", default_value_t = init::DEFAULT_OUTBOUND_PORT)]
    outbound_port: u16,
    /// The proxy's admin port: never redirected inbound.
    #[arg(long, value_name = "PORT", default_value_t = init::DEFAULT_ADMIN_PORT)]
    admin_port: u16,
    /// The UID the proxy runs as; its own traffic is not redirected.
    #[arg(long, value_name = "UID", required_unless_present = "cleanup")]
    proxy_uid: Option<u32>,
    /// Inbound ports that bypass the proxy, e.g. 22,9090,8000-8100.
    #[arg(long, value_name = "PORTS")]
    skip_inbound_ports: Vec<PortList>,
    /// Outbound ports that bypass the proxy, e.g. 3306,11211.
    #[arg(long, value_name = "PORTS")]
    skip_outbound_ports: Vec<PortList>,
    /// Outbound networks that bypass the proxy, e.g. 10.0.0.0/8,fd00::/8.
    #[arg(long, value_name = "CIDRS")]
    skip_outbound_cidrs: Vec<CidrList>,
    /// Remove the rules instead of installing them.
    #[arg(long)]
    cleanup: bool,
    /// Print the commands as a shell script instead of running them.
    #[arg(long)]
    dry_run: bool,
    /// The iptables binary (e.g. iptables-legacy, iptables-nft).
    #[arg(long, value_name = "PATH", default_value = "iptables")]
    iptables: PathBuf,
    /// The ip6tables binary, for the same rules in the IPv6 tables.
    #[arg(long, value_name = "PATH", default_value = "ip6tables")]
    ip6tables: PathBuf,
    /// Whether IPv6 traffic gets the rules too: `auto` when the kernel has
    /// IPv6 in this network namespace (so no IPv6 connection bypasses the
    /// proxy), `on` or `off`.
    #[arg(long, value_enum, default_value = "auto")]
    ipv6: Ipv6Rules,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Ipv6Rules {
    Auto,
    On,
    Off,
}

impl Ipv6Rules {
    fn wanted(self) -> bool {
        match self {
            Ipv6Rules::On => true,
            Ipv6Rules::Off => false,
            // Listed interface addresses: IPv6 is up in this namespace.
            Ipv6Rules::Auto => std::path::Path::new("/proc/net/if_inet6").exists(),
        }
    }
}

fn main() -> anyhow::Result<()> {
    trellis_proxy::init_logging();
    match Cli::parse().command {
        Command::Init(args) => init(args),
        Command::Run => {
            let config = trellis_proxy::Config::from_strings(&trellis_proxy::config::Env)?;
            let runtime =
                trellis_proxy::runtime(config.worker_threads).context("starting the runtime")?;
            // Returns after SIGTERM, SIGINT or POST /shutdown and the drain.
            runtime.block_on(trellis_proxy::run(config))?;
            // Tasks still running (discovery, pooled client connections)
            // are not waited for.
            runtime.shutdown_background();
            Ok(())
        }
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let mut families = vec![(Family::V4, Iptables::new(&args.iptables))];
    if args.ipv6.wanted() {
        families.push((Family::V6, Iptables::new(&args.ip6tables)));
    }
    let (what, done) = if args.cleanup {
        (
            "removing the interception rules",
            "interception rules removed",
        )
    } else {
        (
            "installing the interception rules",
            "interception rules installed",
        )
    };
    let config = match args.cleanup {
        true => None,
        false => Some(config(&args)?),
    };
    for (family, iptables) in &families {
        let steps = match &config {
            None => init::rules::cleanup(),
            Some(config) => init::rules::apply(config, *family)?,
        };
        if args.dry_run {
            println!("# {family:?}: {}", iptables.path().display());
            print!("{}", iptables.script(&steps));
            continue;
        }
        iptables.run(&steps).context(what)?;
        tracing::info!(iptables = %iptables.path().display(), "{done}");
    }
    Ok(())
}

fn config(args: &InitArgs) -> anyhow::Result<init::Config> {
    let Some(proxy_uid) = args.proxy_uid else {
        anyhow::bail!("--proxy-uid is required: give the UID the proxy runs as");
    };
    if proxy_uid == 0 {
        tracing::warn!(
            "--proxy-uid 0: traffic of every process running as root bypasses the proxy"
        );
    }
    Ok(init::Config {
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        admin_port: args.admin_port,
        proxy_uid,
        skip_inbound_ports: args
            .skip_inbound_ports
            .iter()
            .flat_map(|l| l.0.clone())
            .collect(),
        skip_outbound_ports: args
            .skip_outbound_ports
            .iter()
            .flat_map(|l| l.0.clone())
            .collect(),
        skip_outbound_cidrs: args
            .skip_outbound_cidrs
            .iter()
            .flat_map(|l| l.0.clone())
            .collect(),
    })
}
