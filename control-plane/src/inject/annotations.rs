//! The `trellis.dev/*` pod annotations injection reads, each validated:
//! a bad value is an [`AnnotationError`] naming the annotation, the value
//! and the form expected, so the API server tells the pod's author.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::Value;

use super::config::InboundMode;

/// `enabled` opts a pod in (also in an unlabelled namespace), `disabled` out.
pub const INJECT: &str = "trellis.dev/inject";
/// Written by injection: the version of the injector.
pub const INJECTED_BY: &str = "trellis.dev/injected-by";
pub const PROXY_CPU_REQUEST: &str = "trellis.dev/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "trellis.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "trellis.dev/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "trellis.dev/proxy-memory-limit";
pub const PROXY_IMAGE: &str = "trellis.dev/proxy-image";
pub const INBOUND_MODE: &str = "trellis.dev/inbound-mode";
pub const OPAQUE_PORTS: &str = "trellis.dev/opaque-ports";
pub const SKIP_INBOUND_PORTS: &str = "trellis.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "trellis.dev/skip-outbound-ports";
pub const SKIP_OUTBOUND_CIDRS: &str = "trellis.dev/skip-outbound-cidrs";

/// A pod annotation whose value cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {value:?} is not {expected}; fix or remove the annotation")]
pub struct AnnotationError {
    pub annotation: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// What a pod's annotations change in its proxy; `None` keeps the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Resource name (`cpu`, `memory`) → quantity.
    pub requests: BTreeMap<&'static str, String>,
    pub limits: BTreeMap<&'static str, String>,
    pub proxy_image: Option<String>,
    pub inbound_mode: Option<InboundMode>,
    /// Checked, as written (the proxy and `trellis-proxy init` parse them).
    pub opaque_ports: Option<String>,
    pub skip_inbound_ports: Option<String>,
    pub skip_outbound_ports: Option<String>,
    pub skip_outbound_cidrs: Option<String>,
}

/// The pod's `trellis.dev/inject` annotation, if valid.
pub fn inject_choice(annotations: Option<&Value>) -> Result<Option<bool>, AnnotationError> {
    match get(annotations, INJECT) {
        None => Ok(None),
        Some("enabled") => Ok(Some(true)),
        Some("disabled") => Ok(Some(false)),
        Some(other) => Err(AnnotationError {
            annotation: INJECT,
            value: other.to_string(),
            expected: "enabled or disabled",
        }),
    }
}

/// Reads and checks every annotation injection uses; the first bad one is
/// the error.
pub fn overrides(annotations: Option<&Value>) -> Result<Overrides, AnnotationError> {
    inject_choice(annotations)?;
    let mut overrides = Overrides::default();
    let check = |annotation: &'static str,
                 expected: &'static str,
                 valid: fn(&str) -> bool|
     -> Result<Option<String>, AnnotationError> {
        match get(annotations, annotation) {
            None => Ok(None),
            Some(value) if valid(value) => Ok(Some(value.to_string())),
            Some(value) => Err(AnnotationError {
                annotation,
                value: value.to_string(),
                expected,
            }),
        }
    };
    const QUANTITY: &str = "a Kubernetes quantity such as 100m, 0.5, 1 or 64Mi";
    let quantity = |v: &str| check_quantity(v).is_ok();
    for (annotation, resource, into_limits) in [
        (PROXY_CPU_REQUEST, "cpu", false),
        (PROXY_CPU_LIMIT, "cpu", true),
        (PROXY_MEMORY_REQUEST, "memory", false),
        (PROXY_MEMORY_LIMIT, "memory", true),
    ] {
        if let Some(value) = check(annotation, QUANTITY, quantity)? {
            let map = if into_limits {
                &mut overrides.limits
            } else {
                &mut overrides.requests
            };
            map.insert(resource, value);
        }
    }
    overrides.proxy_image = check(PROXY_IMAGE, "an image reference", |v| {
        !v.is_empty() && !v.contains(char::is_whitespace)
    })?;
    overrides.inbound_mode = match check(INBOUND_MODE, "strict or permissive", |v| {
        matches!(v, "strict" | "permissive")
    })?
    .as_deref()
    {
        Some("strict") => Some(InboundMode::Strict),
        Some(_) => Some(InboundMode::Permissive),
        None => None,
    };
    const PORTS: &str = "a comma-separated list of ports (1-65535), e.g. 3306,5432";
    overrides.opaque_ports = check(OPAQUE_PORTS, PORTS, |v| list(v, |p| port(p).is_some()))?;
    const RANGES: &str = "a comma-separated list of ports or ranges, e.g. 22,8000-8100";
    overrides.skip_inbound_ports = check(SKIP_INBOUND_PORTS, RANGES, port_ranges)?;
    overrides.skip_outbound_ports = check(SKIP_OUTBOUND_PORTS, RANGES, port_ranges)?;
    overrides.skip_outbound_cidrs = check(
        SKIP_OUTBOUND_CIDRS,
        "a comma-separated list of IPv4 networks, e.g. 10.0.0.0/8,169.254.169.254/32",
        |v| list(v, cidr),
    )?;
    Ok(overrides)
}

fn get<'a>(annotations: Option<&'a Value>, key: &str) -> Option<&'a str> {
    annotations?.get(key)?.as_str()
}

fn list(value: &str, item: impl Fn(&str) -> bool) -> bool {
    value.split(',').all(|part| item(part.trim()))
}

fn port(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

fn port_ranges(value: &str) -> bool {
    list(value, |part| match part.split_once(['-', ':']) {
        Some((first, last)) => port(first).zip(port(last)).is_some_and(|(f, l)| f <= l),
        None => port(part).is_some(),
    })
}

fn cidr(text: &str) -> bool {
    let (addr, prefix) = text.split_once('/').unwrap_or((text, "32"));
    addr.parse::<Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
}

/// The value is not of the Kubernetes quantity grammar.
#[derive(Debug, PartialEq, Eq)]
pub struct NotAQuantity;

/// Checks `value` against the Kubernetes quantity grammar
/// (`k8s.io/apimachinery/pkg/api/resource`), without a sign: requests and
/// limits are never negative.
///
/// ```text
/// quantity ::= number suffix
/// number   ::= digits | digits "." digits? | "." digits
/// suffix   ::= "" | Ki Mi Gi Ti Pi Ei | m k M G T P E | (e|E) [+-]? digits
/// ```
pub fn check_quantity(value: &str) -> Result<(), NotAQuantity> {
    let number_end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(number_end);
    let digits = number.bytes().filter(u8::is_ascii_digit).count();
    let dots = number.len() - digits;
    if digits == 0 || dots > 1 {
        return Err(NotAQuantity);
    }
    let si = matches!(
        suffix,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
    );
    let exponent = || {
        let e = suffix.strip_prefix(['e', 'E'])?;
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        Some(!e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
    };
    let valid_suffix = si || exponent() == Some(true);
    valid_suffix.then_some(()).ok_or(NotAQuantity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for good in [
            "1", "100m", "0.5", ".5", "1.", "64Mi", "1Gi", "2k", "1e3", "1E-2", "12.5M", "3Ei",
        ] {
            assert_eq!(check_quantity(good), Ok(()), "{good}");
        }
        for bad in [
            "", "m", "-1", "1.2.3", "1mi", "1KB", "1 Gi", "1e", "1e+", "ten", "1Mi ", "1Ki2",
        ] {
            assert_eq!(check_quantity(bad), Err(NotAQuantity), "{bad:?}");
        }
    }

    #[test]
    fn every_override_is_read_and_checked() {
        let annotations = json!({
            PROXY_CPU_REQUEST: "50m",
            PROXY_MEMORY_LIMIT: "1Gi",
            PROXY_IMAGE: "reg.example/p:2",
            INBOUND_MODE: "strict",
            OPAQUE_PORTS: "3306, 5432",
            SKIP_INBOUND_PORTS: "22,8000-8100",
            SKIP_OUTBOUND_PORTS: "9000:9100",
            SKIP_OUTBOUND_CIDRS: "10.0.0.0/8,169.254.169.254",
        });
        let o = overrides(Some(&annotations)).unwrap();
        assert_eq!(o.requests["cpu"], "50m");
        assert_eq!(o.limits["memory"], "1Gi");
        assert_eq!(o.proxy_image.as_deref(), Some("reg.example/p:2"));
        assert_eq!(o.inbound_mode, Some(InboundMode::Strict));
        assert_eq!(o.skip_outbound_ports.as_deref(), Some("9000:9100"));
        assert_eq!(overrides(None).unwrap(), Overrides::default());
    }

    #[test]
    fn a_bad_annotation_is_named_with_its_value_and_the_form_expected() {
        for (annotation, value, expected) in [
            (PROXY_CPU_LIMIT, "a lot", "quantity"),
            (PROXY_MEMORY_REQUEST, "-20Mi", "quantity"),
            (INJECT, "yes", "enabled or disabled"),
            (INBOUND_MODE, "open", "strict or permissive"),
            (OPAQUE_PORTS, "3306,0", "ports"),
            (SKIP_INBOUND_PORTS, "100-10", "ranges"),
            (SKIP_OUTBOUND_CIDRS, "10.0.0.0/33", "IPv4 networks"),
            (SKIP_OUTBOUND_CIDRS, "fd00::/8", "IPv4 networks"),
            (PROXY_IMAGE, "", "image"),
        ] {
            let error = overrides(Some(&json!({ annotation: value }))).unwrap_err();
            assert_eq!(error.annotation, annotation);
            let text = error.to_string();
            assert!(
                text.contains(annotation)
                    && text.contains(&format!("{value:?}"))
                    && text.contains(expected),
                "{text}"
            );
        }
    }
}
