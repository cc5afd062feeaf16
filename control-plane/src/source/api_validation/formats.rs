//! The string formats the API server checks names, labels and addresses
//! against (k8s.io/apimachinery `pkg/util/validation`), each with the rule
//! spelled out for the error message.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A format a string field must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// RFC 1123 label: Pod container names, port names, namespaces.
    Dns1123Label,
    /// RFC 1123 subdomain: names of Pods, EndpointSlices and custom objects.
    Dns1123Subdomain,
    /// RFC 1035 label: Service names (they become DNS labels).
    Dns1035Label,
    /// Label and annotation keys, appProtocol: `[prefix/]name`.
    QualifiedName,
    /// Label values.
    LabelValue,
    /// A named port (IANA_SVC_NAME).
    PortName,
    /// A dotted-quad IPv4 address.
    Ipv4,
    /// An IPv6 address (not an IPv4-mapped one).
    Ipv6,
    /// An IPv4 or IPv6 address.
    Ip,
    /// A domain name of at least two labels.
    Fqdn,
}

impl Format {
    pub fn admits(self, value: &str) -> bool {
        match self {
            Format::Dns1123Label => is_dns1123_label(value),
            Format::Dns1123Subdomain => is_dns1123_subdomain(value),
            Format::Dns1035Label => is_dns1035_label(value),
            Format::QualifiedName => is_qualified_name(value),
            Format::LabelValue => value.is_empty() || is_name_part(value),
            Format::PortName => is_port_name(value),
            Format::Ipv4 => value.parse::<Ipv4Addr>().is_ok(),
            Format::Ipv6 => value
                .parse::<Ipv6Addr>()
                .is_ok_and(|ip| ip.to_ipv4_mapped().is_none()),
            Format::Ip => value.parse::<IpAddr>().is_ok(),
            Format::Fqdn => is_fqdn(value),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Dns1123Label => {
                "a DNS-1123 label: at most 63 lowercase letters, digits or '-', \
                 starting and ending with a letter or digit (e.g. hello-v1)"
            }
            Format::Dns1123Subdomain => {
                "a DNS-1123 subdomain: at most 253 lowercase letters, digits, '-' or '.', \
                 starting and ending with a letter or digit (e.g. hello-v1.abc)"
            }
            Format::Dns1035Label => {
                "a DNS-1035 label: at most 63 lowercase letters, digits or '-', \
                 starting with a letter and ending with a letter or digit (e.g. hello-v1)"
            }
            Format::QualifiedName => {
                "a qualified name: an optional DNS subdomain prefix and '/', then at most \
                 63 letters, digits, '-', '_' or '.', starting and ending with a letter or \
                 digit (e.g. example.com/my-name)"
            }
            Format::LabelValue => {
                "a label value: empty, or at most 63 letters, digits, '-', '_' or '.', \
                 starting and ending with a letter or digit"
            }
            Format::PortName => {
                "a port name: at most 15 lowercase letters, digits or '-', with at least \
                 one letter, no '-' at either end and no \"--\" (e.g. http)"
            }
            Format::Ipv4 => "an IPv4 address (e.g. 10.1.2.3)",
            Format::Ipv6 => "an IPv6 address (e.g. fd00::3)",
            Format::Ip => "an IP address",
            Format::Fqdn => {
                "a fully qualified domain name of at least two DNS-1123 labels \
                 (e.g. hello.example.com)"
            }
        })
    }
}

fn is_dns1123_label(value: &str) -> bool {
    value.len() <= 63 && is_dns_label_chars(value)
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, any length.
fn is_dns_label_chars(value: &str) -> bool {
    let bytes = value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

fn is_dns1123_subdomain(value: &str) -> bool {
    // apimachinery's pattern bounds the whole name, not each label.
    value.len() <= 253 && value.split('.').all(is_dns_label_chars)
}

fn is_dns1035_label(value: &str) -> bool {
    is_dns1123_label(value) && value.starts_with(|c: char| c.is_ascii_lowercase())
}

fn is_qualified_name(value: &str) -> bool {
    let (prefix, name) = match value.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, value),
    };
    prefix.is_none_or(|p| !p.is_empty() && is_dns1123_subdomain(p)) && is_name_part(name)
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters.
fn is_name_part(value: &str) -> bool {
    let bytes = value.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            value.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

fn is_port_name(value: &str) -> bool {
    (1..=15).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && value.bytes().any(|b| b.is_ascii_lowercase())
        && !value.starts_with('-')
        && !value.ends_with('-')
        && !value.contains("--")
}

fn is_fqdn(value: &str) -> bool {
    let name = value.strip_suffix('.').unwrap_or(value);
    is_dns1123_subdomain(name)
        && name.split('.').count() >= 2
        && name.split('.').all(is_dns1123_label)
}

/// Why the API server refuses an endpoint IP, if it does: unspecified,
/// link-local and link-local multicast addresses (`ValidateNonSpecialIP`).
/// Loopback addresses, which it refuses too, are the one exception: local
/// mode runs each pod on a loopback alias of one machine.
pub fn special_ip(ip: IpAddr) -> Option<&'static str> {
    let link_local_unicast = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    let link_local_multicast = match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [224, 0, 0],
        IpAddr::V6(v6) => v6.octets()[0] == 0xff && v6.octets()[1] & 0x0f == 0x02,
    };
    if ip.is_unspecified() {
        Some("is unspecified, which is no endpoint")
    } else if link_local_unicast {
        Some("is link-local (169.254.0.0/16, fe80::/10)")
    } else if link_local_multicast {
        Some("is link-local multicast (224.0.0.0/24, ff02::/16)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_apimachinery() {
        let cases = [
            (Format::Dns1123Label, "hello-v1", true),
            (Format::Dns1123Label, "1st", true),
            (Format::Dns1123Label, "Hello", false),
            (Format::Dns1123Label, "-a", false),
            (Format::Dns1123Label, "a.b", false),
            (Format::Dns1123Label, &"a".repeat(64), false),
            (Format::Dns1123Subdomain, "hello-v1.abc", true),
            (Format::Dns1123Subdomain, "a..b", false),
            (Format::Dns1123Subdomain, &"a".repeat(254), false),
            (Format::Dns1035Label, "hello", true),
            (Format::Dns1035Label, "1st", false),
            (Format::QualifiedName, "kubernetes.io/service-name", true),
            (Format::QualifiedName, "app", true),
            (Format::QualifiedName, "kubernetes.io/h2c", true),
            (Format::QualifiedName, "/x", false),
            (Format::QualifiedName, "a/b/c", false),
            (Format::QualifiedName, "x_", false),
            (Format::LabelValue, "", true),
            (Format::LabelValue, "v1.2_A", true),
            (Format::LabelValue, "a b", false),
            (Format::PortName, "http", true),
            (Format::PortName, "h2-8080", true),
            (Format::PortName, "8080", false),
            (Format::PortName, "a--b", false),
            (Format::PortName, "abcdefghijklmnop", false),
            (Format::Ipv4, "10.1.2.3", true),
            (Format::Ipv4, "fd00::1", false),
            (Format::Ipv6, "fd00::1", true),
            (Format::Ipv6, "::ffff:10.1.2.3", false),
            (Format::Fqdn, "hello.example.com.", true),
            (Format::Fqdn, "hello", false),
        ];
        for (format, value, admitted) in cases {
            assert_eq!(format.admits(value), admitted, "{format:?} {value:?}");
        }
    }

    #[test]
    fn special_ips_are_those_the_api_server_refuses_but_loopback() {
        for ip in [
            "0.0.0.0",
            "::",
            "169.254.1.1",
            "fe80::1",
            "224.0.0.5",
            "ff02::1",
        ] {
            assert!(special_ip(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["10.1.2.3", "127.0.0.3", "::1", "fd00::1", "239.1.1.1"] {
            assert!(special_ip(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }
}
