//! `trellis-proxy init`, the real binary: argument errors and dry runs
//! anywhere, and the real rules inside a fresh network namespace (root,
//! `ip` and `iptables` needed; under `CI=true` their absence fails the test).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use trellis_proxy::init::{self, rules::Step, Config, Family};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

fn trellis_proxy(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bad_arguments_name_the_flag_the_value_and_the_fix() {
    for (args, expected) in [
        (
            &["--skip-inbound-ports", "22,ssh"][..],
            &[
                "--skip-inbound-ports",
                "\"ssh\" is not a port",
                "1 to 65535",
            ][..],
        ),
        (
            &["--skip-outbound-ports", "9000-8000"],
            &[
                "--skip-outbound-ports",
                "write the lower port first (8000-9000)",
            ],
        ),
        (
            &["--skip-outbound-cidrs", "10.1.0.0/8"],
            &["--skip-outbound-cidrs", "did you mean 10.0.0.0/8?"],
        ),
        (
            &["--outbound-port", "4143"],
            &["--inbound-port and --outbound-port are both 4143"],
        ),
        (&["--inbound-port", "0"], &["--inbound-port 0"]),
        (&["--admin-port", "70000"], &["--admin-port", "70000"]),
    ] {
        let mut all = vec!["init", "--proxy-uid", "1337", "--dry-run"];
        all.extend(args);
        let out = trellis_proxy(&all);
        assert!(!out.status.success(), "{all:?} was accepted");
        let err = stderr(&out);
        for e in expected {
            assert!(err.contains(e), "{all:?}: {e:?} not in the error:\n{err}");
        }
    }

    let out = trellis_proxy(&["init", "--dry-run"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--proxy-uid"), "{}", stderr(&out));
}

#[test]
fn dry_run_prints_the_commands_without_running_them() {
    let out = trellis_proxy(&[
        "init",
        "--proxy-uid",
        "1337",
        "--skip-outbound-cidrs",
        "10.0.0.0/8,fd00::/8",
        "--iptables",
        "/nonexistent/iptables",
        "--ip6tables",
        "/nonexistent/ip6tables",
        "--ipv6",
        "on",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    for expected in [
        "/nonexistent/iptables -w -t nat -A TRELLIS_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
        "/nonexistent/iptables -w -t nat -A TRELLIS_OUTBOUND -d 10.0.0.0/8 -j RETURN",
        "/nonexistent/iptables -w -t nat -C PREROUTING -p tcp -j TRELLIS_INBOUND",
        "/nonexistent/ip6tables -w -t nat -A TRELLIS_OUTBOUND -d ::1/128 -j RETURN",
        "/nonexistent/ip6tables -w -t nat -A TRELLIS_OUTBOUND -d fd00::/8 -j RETURN",
    ] {
        assert!(script.contains(expected), "{expected:?} not in:\n{script}");
    }

    let out = trellis_proxy(&["init", "--cleanup", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("iptables -w -t nat -X TRELLIS_OUTBOUND"));
    // Each family only its own networks; `--ipv6 off` leaves IPv6 alone.
    assert!(!script.contains("/nonexistent/iptables -w -t nat -A TRELLIS_OUTBOUND -d fd00::/8"));
    let out = trellis_proxy(&["init", "--proxy-uid", "1337", "--ipv6", "off", "--dry-run"]);
    assert!(!stdout(&out).contains("ip6tables"), "{}", stdout(&out));
}

#[test]
fn a_missing_iptables_says_how_to_install_it() {
    let out = trellis_proxy(&[
        "init",
        "--proxy-uid",
        "1337",
        "--iptables",
        "/nonexistent/trellis-test/iptables",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("/nonexistent/trellis-test/iptables")
            && err.contains("install iptables (Debian: apt-get install iptables)"),
        "{err}"
    );
}

#[test]
fn rules_are_installed_once_refreshed_and_removed_in_a_network_namespace() {
    let Some(ns) = Netns::for_test() else { return };
    let init = |args: &[&str]| {
        let mut all = vec![BIN, "init"];
        all.extend(args);
        let out = ns.exec(&all);
        assert!(out.status.success(), "{all:?} failed:\n{}", stderr(&out));
    };
    let args = [
        "--proxy-uid",
        "1337",
        "--skip-inbound-ports",
        "22,9090",
        "--skip-outbound-ports",
        "3306,8000-8100",
        "--skip-outbound-cidrs",
        "10.0.0.0/8,fd00::/8",
        "--ipv6",
        "on",
    ];
    init(&args);
    init(&args);

    let config = Config {
        skip_inbound_ports: "22,9090".parse::<init::PortList>().unwrap().0,
        skip_outbound_ports: "3306,8000-8100".parse::<init::PortList>().unwrap().0,
        skip_outbound_cidrs: "10.0.0.0/8,fd00::/8".parse::<init::CidrList>().unwrap().0,
        ..Config::new(1337)
    };
    // One set of rules in each family's tables.
    let rules6 = ns.nat_rules(Family::V6);
    assert_exactly_once(&rules6, &config, Family::V6);
    assert_eq!(
        count(&rules6, "TRELLIS_OUTBOUND", &["-d ::1/128 ", "-j RETURN"]),
        1
    );
    assert_eq!(
        count(&rules6, "TRELLIS_OUTBOUND", &["-d fd00::/8 ", "-j RETURN"]),
        1
    );
    assert_eq!(count(&rules6, "TRELLIS_OUTBOUND", &["-d 10.0.0.0/8 "]), 0);
    let rules = ns.nat_rules(Family::V4);
    assert_exactly_once(&rules, &config, Family::V4);
    for (chain, fragments) in [
        ("PREROUTING", &["-p tcp", "-j TRELLIS_INBOUND"][..]),
        ("OUTPUT", &["-p tcp", "-j TRELLIS_OUTBOUND"]),
        ("TRELLIS_INBOUND", &["--dport 22 ", "-j RETURN"]),
        ("TRELLIS_INBOUND", &["--dport 9090 ", "-j RETURN"]),
        ("TRELLIS_INBOUND", &["--dport 4143 ", "-j RETURN"]),
        ("TRELLIS_INBOUND", &["--dport 4191 ", "-j RETURN"]),
        ("TRELLIS_INBOUND_REDIRECT", &["-j REDIRECT --to-ports 4143"]),
        ("TRELLIS_OUTBOUND", &["--uid-owner 1337 ", "-j RETURN"]),
        ("TRELLIS_OUTBOUND", &["-d 127.0.0.0/8 ", "-j RETURN"]),
        ("TRELLIS_OUTBOUND", &["--dport 3306 ", "-j RETURN"]),
        ("TRELLIS_OUTBOUND", &["--dport 8000:8100 ", "-j RETURN"]),
        ("TRELLIS_OUTBOUND", &["-d 10.0.0.0/8 ", "-j RETURN"]),
        (
            "TRELLIS_OUTBOUND_REDIRECT",
            &["-j REDIRECT --to-ports 4140"],
        ),
    ] {
        assert_eq!(
            count(&rules, chain, fragments),
            1,
            "one {chain} rule with {fragments:?} expected in:\n{}",
            rules.join("\n")
        );
    }

    // A changed configuration replaces the old rules instead of adding to them.
    init(&[
        "--proxy-uid",
        "1337",
        "--skip-inbound-ports",
        "2222",
        "--ipv6",
        "on",
    ]);
    let rules = ns.nat_rules(Family::V4);
    let config = Config {
        skip_inbound_ports: "2222".parse::<init::PortList>().unwrap().0,
        ..Config::new(1337)
    };
    assert_exactly_once(&rules, &config, Family::V4);
    assert_exactly_once(&ns.nat_rules(Family::V6), &config, Family::V6);
    assert_eq!(count(&rules, "TRELLIS_INBOUND", &["--dport 22 "]), 0);
    assert_eq!(count(&rules, "TRELLIS_INBOUND", &["--dport 2222 "]), 1);

    init(&["--cleanup", "--ipv6", "on"]);
    for family in [Family::V4, Family::V6] {
        let save = ns.iptables_save(family);
        assert!(
            !save.contains("TRELLIS"),
            "Trellis chains or jumps left after --cleanup ({family:?}):\n{save}"
        );
    }
    // Cleaning up again, with nothing installed, is harmless.
    init(&["--cleanup"]);
}

#[test]
fn without_privileges_the_error_says_which_are_needed() {
    let Some(ns) = Netns::for_test() else { return };
    let Some(setpriv) = find("setpriv") else {
        eprintln!("skipping the unprivileged run: no setpriv (util-linux) on PATH");
        return;
    };
    let setpriv = setpriv.to_string_lossy().into_owned();
    let out = ns.exec(&[
        &setpriv,
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        BIN,
        "init",
        "--proxy-uid",
        "1337",
    ]);
    assert!(!out.status.success(), "an unprivileged init succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("was not permitted") && err.contains("NET_ADMIN"),
        "{err}"
    );
}

/// Checks that every rule `config` calls for is in `rules` exactly once,
/// and that nothing else of Trellis' is there.
fn assert_exactly_once(rules: &[String], config: &Config, family: Family) {
    let mut expected: HashMap<&str, usize> = HashMap::new();
    for step in init::rules::apply(config, family).expect("a valid config") {
        if let Step::Append(rule) | Step::Ensure(rule) = step {
            *expected.entry(rule.chain).or_default() += 1;
        }
    }
    let mut actual: HashMap<&str, usize> = HashMap::new();
    for rule in rules {
        let chain = rule.split_whitespace().nth(1).unwrap_or_default();
        if chain.starts_with("TRELLIS") || rule.contains("-j TRELLIS") {
            *actual.entry(chain).or_default() += 1;
        }
    }
    assert_eq!(
        actual,
        expected,
        "rules per chain, in:\n{}",
        rules.join("\n")
    );
    let mut seen = std::collections::HashSet::new();
    for rule in rules {
        assert!(seen.insert(rule), "{rule:?} is there twice");
    }
}

/// How many `-A chain` rules contain every fragment.
fn count(rules: &[String], chain: &str, fragments: &[&str]) -> usize {
    let prefix = format!("-A {chain} ");
    rules
        .iter()
        .filter(|r| r.starts_with(&prefix))
        .map(|r| format!("{r} "))
        .filter(|r| fragments.iter().all(|f| r.contains(f)))
        .count()
}

/// A network namespace of the test's own, deleted on drop (also when the
/// test fails), so no rule ever reaches the host's tables.
struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace, or `None` (after saying why) when this machine
    /// cannot make one. Under `CI=true` that is a failure instead.
    fn for_test() -> Option<Self> {
        let missing = missing_requirements();
        let result = if missing.is_empty() {
            Self::create()
        } else {
            Err(missing.join("; "))
        };
        match result {
            Ok(ns) => Some(ns),
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true and this test cannot run: {why}")
            }
            Err(why) => {
                eprintln!("skipping: {why}");
                None
            }
        }
    }

    fn create() -> Result<Self, String> {
        let name = format!(
            "trellis-init-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip netns add {name}` failed: {}",
                stderr(&out).trim()
            ));
        }
        Ok(Self { name })
    }

    fn exec(&self, command: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec {command:?}: {e}"))
    }

    fn iptables_save(&self, family: Family) -> String {
        let save = match family {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        };
        let out = self.exec(&[save, "-t", "nat"]);
        assert!(out.status.success(), "{save}: {}", stderr(&out));
        stdout(&out)
    }

    /// The nat table's rules, `-A CHAIN ...` lines.
    fn nat_rules(&self, family: Family) -> Vec<String> {
        self.iptables_save(family)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(|l| l.trim().to_string())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deleted = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        if !deleted.is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

/// What this machine lacks for the namespace tests, each with its fix.
fn missing_requirements() -> Vec<String> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("not running as root, which creating a network namespace needs".to_string());
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("iptables-save", "iptables"),
        ("ip6tables", "iptables"),
        ("ip6tables-save", "iptables"),
    ] {
        if find(tool).is_none() {
            missing.push(format!(
                "`{tool}` is not on PATH (Debian: apt-get install -y {package})"
            ));
        }
    }
    missing
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        == Some("0")
}

fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
