//! The rule builder and argument parsing, without root or iptables.

use super::rules::{self, Rule, Step};
use super::*;

/// The rules `apply` appends, as `iptables -S` would print them.
fn appended(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .filter_map(|step| match step {
            Step::Append(rule) | Step::Ensure(rule) => Some(rule.to_string()),
            _ => None,
        })
        .collect()
}

fn config() -> Config {
    Config {
        skip_inbound_ports: "22,9090".parse::<PortList>().unwrap().0,
        skip_outbound_ports: "3306, 8000-8100".parse::<PortList>().unwrap().0,
        skip_outbound_cidrs: "10.0.0.0/8,192.168.1.7".parse::<CidrList>().unwrap().0,
        ..Config::new(1337)
    }
}

#[test]
fn redirects_inbound_and_outbound_to_the_proxy_ports() {
    let rules = appended(&rules::apply(&Config::new(1337), Family::V4).unwrap());
    for expected in [
        "-A TRELLIS_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
        "-A TRELLIS_INBOUND -p tcp -j TRELLIS_INBOUND_REDIRECT",
        "-A TRELLIS_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140",
        "-A TRELLIS_OUTBOUND -p tcp -j TRELLIS_OUTBOUND_REDIRECT",
        "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
        "-A OUTPUT -p tcp -j TRELLIS_OUTBOUND",
    ] {
        assert!(
            rules.contains(&expected.to_string()),
            "{expected:?} missing from {rules:#?}"
        );
    }
}

#[test]
fn proxy_uid_loopback_and_own_ports_are_not_redirected() {
    let config = Config {
        inbound_port: 5143,
        outbound_port: 5140,
        admin_port: 5191,
        ..Config::new(2102)
    };
    let rules = appended(&rules::apply(&config, Family::V4).unwrap());
    for expected in [
        "-A TRELLIS_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
        "-A TRELLIS_OUTBOUND -d 127.0.0.0/8 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 5143 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 5191 -j RETURN",
        "-A TRELLIS_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 5143",
        "-A TRELLIS_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 5140",
    ] {
        assert!(
            rules.contains(&expected.to_string()),
            "{expected:?} missing from {rules:#?}"
        );
    }
}

#[test]
fn skip_lists_are_rendered_before_the_redirects() {
    let rules = appended(&rules::apply(&config(), Family::V4).unwrap());
    let position = |rule: &str| {
        rules
            .iter()
            .position(|r| r == rule)
            .unwrap_or_else(|| panic!("{rule:?} missing from {rules:#?}"))
    };
    let inbound_redirect = position("-A TRELLIS_INBOUND -p tcp -j TRELLIS_INBOUND_REDIRECT");
    for skip in [
        "-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 9090 -j RETURN",
    ] {
        assert!(position(skip) < inbound_redirect, "{skip:?} comes too late");
    }
    let outbound_redirect = position("-A TRELLIS_OUTBOUND -p tcp -j TRELLIS_OUTBOUND_REDIRECT");
    for skip in [
        "-A TRELLIS_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
        "-A TRELLIS_OUTBOUND -p tcp --dport 3306 -j RETURN",
        "-A TRELLIS_OUTBOUND -p tcp --dport 8000:8100 -j RETURN",
        "-A TRELLIS_OUTBOUND -d 10.0.0.0/8 -j RETURN",
        "-A TRELLIS_OUTBOUND -d 192.168.1.7/32 -j RETURN",
    ] {
        assert!(
            position(skip) < outbound_redirect,
            "{skip:?} comes too late"
        );
    }
}

#[test]
fn chains_are_filled_before_traffic_is_sent_into_them() {
    let steps = rules::apply(&config(), Family::V4).unwrap();
    // Each chain is reset exactly once, before any rule is appended to it.
    for chain in rules::CHAINS {
        let reset = steps
            .iter()
            .position(|s| *s == Step::ResetChain(chain))
            .unwrap_or_else(|| panic!("{chain} is never reset"));
        assert_eq!(
            steps
                .iter()
                .filter(|s| **s == Step::ResetChain(chain))
                .count(),
            1
        );
        let first_rule = steps
            .iter()
            .position(|s| matches!(s, Step::Append(r) if r.chain == chain));
        assert!(first_rule.is_some_and(|i| i > reset), "{chain}: {steps:#?}");
    }
    // The jumps from the built-in chains come last and only if absent.
    let tail = &steps[steps.len() - 2..];
    assert_eq!(tail, rules::jumps().map(Step::Ensure));
    assert_eq!(
        steps
            .iter()
            .filter(|s| matches!(s, Step::Ensure(_)))
            .count(),
        2
    );
}

#[test]
fn cleanup_removes_jumps_then_chains() {
    let steps = rules::cleanup();
    let mut expected: Vec<Step> = rules::jumps().map(Step::DeleteAll).into();
    expected.extend(rules::CHAINS.map(Step::FlushChain));
    expected.extend(rules::CHAINS.map(Step::DeleteChain));
    assert_eq!(steps, expected);
}

#[test]
fn dry_run_prints_a_shell_script() {
    let script = Iptables::new("/usr/sbin/iptables-legacy")
        .script(&rules::apply(&config(), Family::V4).unwrap());
    let lines: Vec<&str> = script.lines().collect();
    assert_eq!(
        lines.first(),
        Some(
            &"/usr/sbin/iptables-legacy -w -t nat -N TRELLIS_INBOUND_REDIRECT 2>/dev/null \
              || /usr/sbin/iptables-legacy -w -t nat -F TRELLIS_INBOUND_REDIRECT"
        )
    );
    assert!(lines.contains(
        &"/usr/sbin/iptables-legacy -w -t nat -C OUTPUT -p tcp -j TRELLIS_OUTBOUND 2>/dev/null \
          || /usr/sbin/iptables-legacy -w -t nat -A OUTPUT -p tcp -j TRELLIS_OUTBOUND"
    ));
    let cleanup = Iptables::new("/opt/my tools/iptables").script(&rules::cleanup());
    assert!(
        cleanup.starts_with(
            "while '/opt/my tools/iptables' -w -t nat -D PREROUTING -p tcp -j TRELLIS_INBOUND"
        ),
        "{cleanup}"
    );
}

#[test]
fn rule_target_is_the_jump() {
    let [prerouting, _] = rules::jumps();
    assert_eq!(prerouting.target(), Some(rules::INBOUND));
    let rule = Rule {
        chain: "OUTPUT",
        spec: vec!["-d".into(), "10.0.0.0/8".into()],
    };
    assert_eq!(rule.target(), None);
}

#[test]
fn ports_and_ranges_parse() {
    let list: PortList = " 22, 9090,,8000-8100,7000:7001 ".parse().unwrap();
    let shown: Vec<String> = list.0.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["22", "9090", "8000:8100", "7000:7001"]);
    assert_eq!("".parse::<PortList>().unwrap(), PortList::default());
    assert_eq!("65535".parse::<PortRange>().unwrap().last(), 65535);
}

#[test]
fn bad_ports_are_rejected_with_the_value_and_the_fix() {
    let err = |s: &str| s.parse::<PortList>().unwrap_err().to_string();
    assert_eq!(
        err("22,ssh"),
        "\"ssh\" is not a port; give a number from 1 to 65535 or a range such as 8000-8100"
    );
    assert_eq!(
        err("70000"),
        "port 70000 is out of range; ports go from 1 to 65535"
    );
    assert_eq!(err("0"), "port 0 is out of range; ports go from 1 to 65535");
    assert_eq!(
        err("9000-8000"),
        "port range 9000-8000 is backwards; write the lower port first (8000-9000)"
    );
    assert!(err("8000-").contains("\"8000-\" is not a port"));
}

#[test]
fn networks_parse() {
    let list: CidrList = "10.0.0.0/8, 192.168.1.7,0.0.0.0/0, fd00::/8, 2001:db8::1"
        .parse()
        .unwrap();
    let shown: Vec<String> = list.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "10.0.0.0/8",
            "192.168.1.7/32",
            "0.0.0.0/0",
            "fd00::/8",
            "2001:db8::1/128"
        ]
    );
}

/// The IPv6 tables get the same chains and rules, with IPv6's loopback,
/// and each family only its own skipped networks.
#[test]
fn both_families_get_the_same_rules_with_their_own_networks() {
    let config = Config {
        skip_outbound_cidrs: "10.0.0.0/8,fd00::/8".parse::<CidrList>().unwrap().0,
        ..Config::new(1337)
    };
    let v4 = appended(&rules::apply(&config, Family::V4).unwrap());
    let v6 = appended(&rules::apply(&config, Family::V6).unwrap());
    let family_free = |rules: &[String]| -> Vec<String> {
        rules
            .iter()
            .filter(|r| !r.contains(" -d "))
            .cloned()
            .collect()
    };
    assert_eq!(family_free(&v4), family_free(&v6));
    let destinations = |rules: &[String]| -> Vec<String> {
        rules
            .iter()
            .filter(|r| r.contains(" -d "))
            .cloned()
            .collect()
    };
    assert_eq!(
        destinations(&v4),
        [
            "-A TRELLIS_OUTBOUND -d 127.0.0.0/8 -j RETURN",
            "-A TRELLIS_OUTBOUND -d 10.0.0.0/8 -j RETURN"
        ]
    );
    assert_eq!(
        destinations(&v6),
        [
            "-A TRELLIS_OUTBOUND -d ::1/128 -j RETURN",
            "-A TRELLIS_OUTBOUND -d fd00::/8 -j RETURN"
        ]
    );
}

#[test]
fn bad_networks_are_rejected_with_the_value_and_the_fix() {
    let err = |s: &str| s.parse::<CidrList>().unwrap_err().to_string();
    assert_eq!(
        err("10.0.0.0/8,10.1.0.0/8"),
        "\"10.1.0.0/8\" has bits set past the /8 prefix; did you mean 10.0.0.0/8?"
    );
    assert_eq!(
        err("10.0.0.0/33"),
        "\"10.0.0.0/33\" has a bad prefix length; use /0 to /32"
    );
    assert_eq!(
        err("fd00::/129"),
        "\"fd00::/129\" has a bad prefix length; use /0 to /128"
    );
    assert_eq!(
        err("fd00::1/8"),
        "\"fd00::1/8\" has bits set past the /8 prefix; did you mean fd00::/8?"
    );
    assert_eq!(
        err("cluster"),
        "\"cluster\" is not a network; write it as address/prefix, such as 10.0.0.0/8 or fd00::/8"
    );
}

#[test]
fn unworkable_configs_name_the_flags() {
    let same = Config {
        outbound_port: 4143,
        ..Config::new(1337)
    };
    let err = rules::apply(&same, Family::V4).unwrap_err();
    assert_eq!(err, ConfigError::SamePort { port: 4143 });
    assert!(err
        .to_string()
        .starts_with("--inbound-port and --outbound-port are both 4143"));

    let zero = Config {
        admin_port: 0,
        ..Config::new(1337)
    };
    let err = rules::apply(&zero, Family::V4).unwrap_err().to_string();
    assert!(err.starts_with("--admin-port 0: "), "{err}");
}
