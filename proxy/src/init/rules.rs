//! The interception rules as data: which chains, which rules, in which order.
//!
//! Everything lives in the `nat` table:
//!
//! ```text
//! PREROUTING -p tcp -j TRELLIS_INBOUND
//!   TRELLIS_INBOUND: RETURN for the proxy's own ports and skipped ports,
//!                    then -j TRELLIS_INBOUND_REDIRECT
//!   TRELLIS_INBOUND_REDIRECT: -p tcp -j REDIRECT --to-ports <inbound>
//! OUTPUT -p tcp -j TRELLIS_OUTBOUND
//!   TRELLIS_OUTBOUND: RETURN for the proxy's UID, loopback, skipped ports
//!                     and networks, then -j TRELLIS_OUTBOUND_REDIRECT
//!   TRELLIS_OUTBOUND_REDIRECT: -p tcp -j REDIRECT --to-ports <outbound>
//! ```
//!
//! Re-running is idempotent: Trellis' chains are flushed and refilled (so a
//! changed configuration replaces the old one), and the jumps from the
//! built-in chains are added only when absent.

use std::fmt;

use super::{Config, ConfigError, Family};

/// The table every rule lives in.
pub const TABLE: &str = "nat";
/// Jumped to from `PREROUTING`: decides which inbound connections to redirect.
pub const INBOUND: &str = "TRELLIS_INBOUND";
/// Redirects to the proxy's inbound port.
pub const INBOUND_REDIRECT: &str = "TRELLIS_INBOUND_REDIRECT";
/// Jumped to from `OUTPUT`: decides which outbound connections to redirect.
pub const OUTBOUND: &str = "TRELLIS_OUTBOUND";
/// Redirects to the proxy's outbound port.
pub const OUTBOUND_REDIRECT: &str = "TRELLIS_OUTBOUND_REDIRECT";
/// Trellis' chains, in the order they are created.
pub const CHAINS: [&str; 4] = [INBOUND_REDIRECT, INBOUND, OUTBOUND_REDIRECT, OUTBOUND];

/// Loopback: the app talking to itself (or to the proxy) is left alone.
fn loopback(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    }
}

/// One rule: the chain and the match/target arguments after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, spec: &[&str]) -> Self {
        Self {
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The iptables arguments (after `-t nat`) for `command` on this rule:
    /// `-A`, `-C` or `-D`.
    pub fn args(&self, command: &str) -> Vec<String> {
        [command.to_string(), self.chain.to_string()]
            .into_iter()
            .chain(self.spec.iter().cloned())
            .collect()
    }

    /// The chain this rule jumps to (`-j`), if any.
    pub fn target(&self) -> Option<&str> {
        let j = self.spec.iter().position(|a| a == "-j")?;
        self.spec.get(j + 1).map(String::as_str)
    }
}

/// `-A CHAIN spec...`, as `iptables -S` prints it.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.args("-A").join(" "))
    }
}

/// One step of installing or removing the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Creates the chain, or empties it if it exists (`-N`, else `-F`).
    ResetChain(&'static str),
    /// Appends a rule (`-A`).
    Append(Rule),
    /// Appends a rule unless an identical one is there (`-C`, then `-A`).
    Ensure(Rule),
    /// Deletes every copy of a rule, if there is any (`-C`, then `-D`).
    DeleteAll(Rule),
    /// Empties the chain if it exists (`-F`).
    FlushChain(&'static str),
    /// Deletes the chain if it exists (`-X`); it must be empty and unreferenced.
    DeleteChain(&'static str),
}

/// The jumps from the built-in chains into Trellis' chains.
pub fn jumps() -> [Rule; 2] {
    [
        Rule::new("PREROUTING", &["-p", "tcp", "-j", INBOUND]),
        Rule::new("OUTPUT", &["-p", "tcp", "-j", OUTBOUND]),
    ]
}

/// The steps that install (or refresh) the rules for `config` in one
/// family's tables: the same chains and rules in both, each with its own
/// loopback and the skipped networks of its family.
pub fn apply(config: &Config, family: Family) -> Result<Vec<Step>, ConfigError> {
    config.validate()?;
    let ret = |chain, spec: &[&str]| {
        let mut rule = Rule::new(chain, spec);
        rule.spec.extend(["-j".to_string(), "RETURN".to_string()]);
        Step::Append(rule)
    };
    let skip_port = |chain, port: String| ret(chain, &["-p", "tcp", "--dport", &port]);
    let redirect = |chain, port: u16| {
        let port = port.to_string();
        Step::Append(Rule::new(
            chain,
            &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &port],
        ))
    };
    let uid = config.proxy_uid.to_string();
    let mut steps = vec![
        Step::ResetChain(INBOUND_REDIRECT),
        redirect(INBOUND_REDIRECT, config.inbound_port),
        Step::ResetChain(INBOUND),
        // Peers' proxies connect to the inbound port directly, and probes
        // and scrapers to the admin port: both reach the proxy as addressed.
        skip_port(INBOUND, config.inbound_port.to_string()),
        skip_port(INBOUND, config.admin_port.to_string()),
    ];
    let skipped = config.skip_inbound_ports.iter();
    steps.extend(skipped.map(|ports| skip_port(INBOUND, ports.to_string())));
    steps.extend([
        Step::Append(Rule::new(INBOUND, &["-p", "tcp", "-j", INBOUND_REDIRECT])),
        Step::ResetChain(OUTBOUND_REDIRECT),
        redirect(OUTBOUND_REDIRECT, config.outbound_port),
        Step::ResetChain(OUTBOUND),
        // The proxy's own connections (to peers, to the app, to the control
        // plane) must leave as they are, or they would loop back into it.
        ret(OUTBOUND, &["-m", "owner", "--uid-owner", &uid]),
        ret(OUTBOUND, &["-d", loopback(family)]),
    ]);
    let skipped = config.skip_outbound_ports.iter();
    steps.extend(skipped.map(|ports| skip_port(OUTBOUND, ports.to_string())));
    let skipped = config
        .skip_outbound_cidrs
        .iter()
        .filter(|cidr| cidr.family() == family);
    steps.extend(skipped.map(|cidr| ret(OUTBOUND, &["-d", &cidr.to_string()])));
    steps.push(Step::Append(Rule::new(
        OUTBOUND,
        &["-p", "tcp", "-j", OUTBOUND_REDIRECT],
    )));

    // Last, so traffic is only sent into chains that are complete.
    steps.extend(jumps().map(Step::Ensure));
    Ok(steps)
}

/// The steps that remove everything [`apply`] installs; harmless when
/// nothing is installed.
pub fn cleanup() -> Vec<Step> {
    let mut steps: Vec<Step> = jumps().map(Step::DeleteAll).into();
    // Flush all before deleting any: TRELLIS_INBOUND refers to
    // TRELLIS_INBOUND_REDIRECT, and a referenced chain cannot be deleted.
    steps.extend(CHAINS.map(Step::FlushChain));
    steps.extend(CHAINS.map(Step::DeleteChain));
    steps
}
