//! `trellis-proxy init`: iptables rules that send a pod's TCP traffic through the proxy.
//!
//! The rules live in the `nat` table, in Trellis' own chains (see [`rules`]):
//! inbound connections (PREROUTING) are redirected to the proxy's inbound
//! port, outbound ones (OUTPUT) to its outbound port, except the proxy's own
//! traffic (by UID), loopback and whatever the operator asks to skip. The
//! proxy learns the original destination with `SO_ORIGINAL_DST`.
//!
//! [`rules::apply`] and [`rules::cleanup`] build the steps as plain data;
//! [`Iptables`] runs them (or prints them, for `--dry-run`).

mod iptables;
pub mod rules;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

pub use iptables::{Error, Iptables};

/// The proxy's inbound port when none is given.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;
/// The proxy's outbound port when none is given.
pub const DEFAULT_OUTBOUND_PORT: u16 = 4140;
/// The proxy's admin port when none is given.
pub const DEFAULT_ADMIN_PORT: u16 = 4191;

/// What to intercept and where to send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Inbound TCP is redirected here (`--inbound-port`).
    pub inbound_port: u16,
    /// Outbound TCP is redirected here (`--outbound-port`).
    pub outbound_port: u16,
    /// Never redirected inbound, so probes and scrapers reach the proxy
    /// itself (`--admin-port`).
    pub admin_port: u16,
    /// The proxy runs as this user; its own connections are not redirected,
    /// or they would loop back into it (`--proxy-uid`).
    pub proxy_uid: u32,
    /// Inbound destination ports that bypass the proxy (`--skip-inbound-ports`).
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports that bypass the proxy (`--skip-outbound-ports`).
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destination networks that bypass the proxy (`--skip-outbound-cidrs`).
    pub skip_outbound_cidrs: Vec<Cidr>,
}

impl Config {
    /// The default ports and no skip lists.
    pub fn new(proxy_uid: u32) -> Self {
        Self {
            inbound_port: DEFAULT_INBOUND_PORT,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            proxy_uid,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, port) in [
            ("--inbound-port", self.inbound_port),
            ("--outbound-port", self.outbound_port),
            ("--admin-port", self.admin_port),
        ] {
            if port == 0 {
                return Err(ConfigError::ZeroPort { flag });
            }
        }
        if self.inbound_port == self.outbound_port {
            return Err(ConfigError::SamePort {
                port: self.inbound_port,
            });
        }
        Ok(())
    }
}

/// A [`Config`] that cannot work.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A proxy port is 0.
    #[error("{flag} 0: traffic cannot be redirected to port 0; give the port the proxy listens on (1-65535)")]
    ZeroPort { flag: &'static str },
    /// Inbound and outbound traffic would go to the same listener.
    #[error(
        "--inbound-port and --outbound-port are both {port}: the proxy has separate inbound and \
         outbound listeners; give each its own port (defaults 4143 and 4140)"
    )]
    SamePort { port: u16 },
}

/// A TCP port or an inclusive range of ports: `22`, `8000-8100` or `8000:8100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// A single port; `None` for 0.
    pub fn port(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    /// `first..=last`; `None` for port 0 or a backwards range.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first != 0 && first <= last).then_some(Self { first, last })
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }
}

/// The form iptables' `--dport` takes.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let port = |p: &str| -> Result<u16, PortError> {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| PortError::NotAPort(s.to_string()))?;
            match u16::try_from(n) {
                Ok(n) if n != 0 => Ok(n),
                _ => Err(PortError::OutOfRange(n)),
            }
        };
        let (first, last) = match s.split_once(['-', ':']) {
            Some((first, last)) => (port(first)?, port(last)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        Self::new(first, last).ok_or(PortError::Backwards { first, last })
    }
}

/// A port or port range that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Not a number.
    #[error("{0:?} is not a port; give a number from 1 to 65535 or a range such as 8000-8100")]
    NotAPort(String),
    /// 0 or above 65535.
    #[error("port {0} is out of range; ports go from 1 to 65535")]
    OutOfRange(u32),
    /// The range ends before it starts.
    #[error("port range {first}-{last} is backwards; write the lower port first ({last}-{first})")]
    Backwards { first: u16, last: u16 },
}

/// A comma-separated list of ports and ranges, as given on the command
/// line: `22,9090,8000-8100`. Empty items are ignored, so `""` is no ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

impl FromStr for PortList {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        items(s).map(str::parse).collect::<Result<_, _>>().map(Self)
    }
}

/// An IPv4 or IPv6 network, `10.0.0.0/8` or `fd00::/8`; a bare address
/// means that address alone (`/32`, `/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `None` when `prefix` is longer than the address or `addr` has bits
    /// set past it.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        (prefix <= bits(addr) && mask(addr, prefix) == addr).then_some(Self { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
}

/// 32 for IPv4, 128 for IPv6.
fn bits(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & keep))
        }
        IpAddr::V6(a) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & keep))
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::NotAnAddress(s.to_string()))?;
        let prefix = match prefix.map(str::parse::<u8>) {
            None => bits(addr),
            Some(Ok(p)) if p <= bits(addr) => p,
            Some(_) => return Err(CidrError::BadPrefix(s.to_string(), bits(addr))),
        };
        Self::new(addr, prefix).ok_or_else(|| CidrError::HostBits {
            given: s.to_string(),
            network: Self {
                addr: mask(addr, prefix),
                prefix,
            },
        })
    }
}

/// A network that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IP address.
    #[error("{0:?} is not a network; write it as address/prefix, such as 10.0.0.0/8 or fd00::/8")]
    NotAnAddress(String),
    /// The prefix length is longer than the address.
    #[error("{0:?} has a bad prefix length; use /0 to /{1}")]
    BadPrefix(String, u8),
    /// Bits are set past the prefix: probably a typo.
    #[error("{given:?} has bits set past the /{} prefix; did you mean {network}?", network.prefix)]
    HostBits { given: String, network: Cidr },
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`): each has its own tables, so
/// the same rules are installed once per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A comma-separated list of networks: `10.0.0.0/8,192.168.0.0/16,fd00::/8`.
/// Empty items are ignored, so `""` is no networks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        items(s).map(str::parse).collect::<Result<_, _>>().map(Self)
    }
}

fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|item| !item.is_empty())
}
