//! `meshctl rollout` as a user runs it: the real binary against a manifest
//! directory, carried out by a real controller process.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshctl::demo::manifests;
use support::{demo_dir, eventually, meshctl_in as meshctl, text};

/// Every file below `dir` with its contents (the status directory too).
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap_or_default(),
            ));
        }
    }
    out.sort();
    out
}

/// The controller the demo runs, on a free loopback address, serving `dir`;
/// stopped when dropped (its standard input closes, and it is killed).
struct Controller(Child);

impl Controller {
    fn start(dir: &Path, state: &Path) -> Self {
        let ip = (0..64)
            .map(|_| Ipv4Addr::new(127, fastrand::u8(1..=254), fastrand::u8(1..=254), 1))
            .find(|ip| std::net::TcpListener::bind((*ip, 8090)).is_ok())
            .expect("a free loopback address");
        let child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(["internal", "controller", "--manifests"])
            .arg(dir)
            .arg("--state-dir")
            .arg(state)
            .arg("--listen")
            .arg(SocketAddr::from((ip, 8090)).to_string())
            .arg("--admin")
            .arg(SocketAddr::from((ip, 9990)).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Controller(child)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `rollout status NAME -o json`: the Rollout with its status.
fn status_json(dir: &Path, name: &str) -> serde_json::Value {
    let out = meshctl(dir, &["rollout", "status", name, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until the rollout's status has `phase` at `step` (0-based).
fn wait_for(dir: &Path, phase: &str, step: u64) -> serde_json::Value {
    eventually(&format!("the rollout is {phase} at step {step}"), || {
        let rollout = status_json(dir, "hello");
        let status = &rollout["status"];
        match status["phase"] == phase && status["step"] == step {
            true => Ok(rollout),
            false => Err(rollout.to_string()),
        }
    })
}

/// Backends with their share of a rule's traffic, percent.
type Split = Vec<(String, u32)>;

/// The backends and shares proxies get for the `hello` Service's requests
/// that match no A/B rule.
fn hello_split(dir: &Path) -> Split {
    hello_rules(dir)
        .pop()
        .map(|(_, split)| split)
        .unwrap_or_default()
}

/// `rollout start hello` with these flags, `overrides` replacing a flag of
/// the same name or adding one.
fn start_args<'a>(overrides: &[&'a str]) -> Vec<&'a str> {
    let mut flags: Vec<(&str, Option<&str>)> = vec![
        ("--stable", Some("hello-v1")),
        ("--canary", Some("hello-v2")),
        ("--steps", Some("20,50,100")),
        // No window ends while the test runs: every move is the user's.
        ("--interval", Some("10m")),
        ("--min-success", Some("99%")),
    ];
    for pair in overrides.chunks(2) {
        let value = pair.get(1).copied();
        match flags.iter_mut().find(|(flag, _)| *flag == pair[0]) {
            Some(slot) => slot.1 = value,
            None => flags.push((pair[0], value)),
        }
    }
    let mut args = vec!["rollout", "start", "hello"];
    for (flag, value) in flags {
        args.push(flag);
        args.extend(value);
    }
    args
}

#[test]
fn refused_flags_name_what_is_wrong_and_write_nothing() {
    let dir = demo_dir();
    let before = files(dir.path());
    let start = |overrides: &[&str]| meshctl(dir.path(), &start_args(overrides));
    for (args, expect) in [
        (
            vec!["--steps", "50,20"],
            "spec.steps[1].weight 20 is not above the step before (50)",
        ),
        (
            vec!["--steps", "10,150"],
            "spec.steps[1].weight 150 is not 1-100",
        ),
        (vec!["--canary", "hello-v3"], "no Service default/hello-v3"),
        (
            vec!["--canary", "hello-v1"],
            "stable and canary are both hello-v1",
        ),
        (vec!["--interval", "30"], "\"30\" is not a duration"),
        (
            vec!["--min-success", "1000"],
            "successRate 1000 is not a percentage",
        ),
        (vec!["--min-success", "lots"], "--min-success \"lots\""),
        (vec!["--ab-windows", "2"], "--ab-windows needs a cohort"),
        (vec!["--ab-header", "x-beta"], "expected NAME=VALUE"),
    ] {
        let out = start(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(text(&out).contains(expect), "{args:?}: {}", text(&out));
    }
    // Each refusal says which flag fixes it.
    let out = start(&["--steps", "50,20"]);
    assert!(text(&out).contains("hint: --steps"), "{}", text(&out));
    assert_eq!(files(dir.path()), before, "a refused start writes nothing");

    // A command for a rollout that does not exist says so.
    for command in ["promote", "abort", "pause", "resume", "status"] {
        let out = meshctl(dir.path(), &["rollout", command, "nope"]);
        assert!(!out.status.success(), "{command}: {}", text(&out));
        assert!(
            text(&out).contains("no rollout default/nope"),
            "{command}: {}",
            text(&out)
        );
    }
    assert_eq!(files(dir.path()), before);
}

#[test]
fn start_promote_abort_against_a_real_controller() {
    let dir = demo_dir();
    let state = tempfile::tempdir().unwrap();
    let _controller = Controller::start(dir.path(), state.path());

    let out = meshctl(dir.path(), &start_args(&[]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("rollout default/hello started"),
        "{}",
        text(&out)
    );
    let rollout = wait_for(dir.path(), "Progressing", 0);
    assert_eq!(rollout["kind"], "Rollout", "{rollout}");
    assert_eq!(rollout["status"]["canaryWeight"], 20, "{rollout}");
    assert_eq!(rollout["status"]["steps"], 3, "{rollout}");
    eventually("the route splits 80/20", || {
        let split = hello_split(dir.path());
        match split == [("hello-v1".into(), 80), ("hello-v2".into(), 20)] {
            true => Ok(()),
            false => Err(format!("{split:?}")),
        }
    });
    let table = text(&meshctl(dir.path(), &["rollout", "status", "hello"]));
    assert!(
        table.contains("[##--------] step 1/3 canary 20%"),
        "{table}"
    );
    assert!(table.contains("Started"), "the decisions: {table}");

    // A second start of a rollout under way is refused unless forced.
    // (The controller may rewrite its own files meanwhile: compare meshctl's.)
    let rollout_file = dir.path().join("rollout-default-hello.yaml");
    let before = std::fs::read_to_string(&rollout_file).unwrap();
    let again = meshctl(dir.path(), &start_args(&[]));
    assert!(!again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("still Progressing") && text(&again).contains("--force"),
        "{}",
        text(&again)
    );
    assert_eq!(std::fs::read_to_string(&rollout_file).unwrap(), before);

    let out = meshctl(dir.path(), &["rollout", "promote", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    let rollout = wait_for(dir.path(), "Progressing", 1);
    assert_eq!(rollout["status"]["canaryWeight"], 50, "{rollout}");
    assert_eq!(rollout["spec"]["promote"], 0, "{rollout}");
    let history = rollout["status"]["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["reason"], "Promoted", "{rollout}");

    let list = meshctl(dir.path(), &["rollout", "list"]);
    let list = text(&list);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAMESPACE",
            "NAME",
            "SERVICE",
            "CANARY",
            "PHASE",
            "STEP",
            "WEIGHT",
            "AGE"
        ],
        "{list}"
    );
    assert_eq!(
        lines[1].split_whitespace().take(7).collect::<Vec<_>>(),
        [
            "default",
            "hello",
            "hello",
            "hello-v2",
            "Progressing",
            "2/3",
            "50%"
        ],
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&meshctl(dir.path(), &["rollout", "list", "-o", "json"]).stdout)
            .unwrap();
    assert_eq!(json[0]["status"]["step"], 1, "{json}");

    let out = meshctl(dir.path(), &["rollout", "abort", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("all traffic goes to hello-v1"),
        "{}",
        text(&out)
    );
    let rollout = wait_for(dir.path(), "Aborted", 1);
    assert_eq!(rollout["status"]["canaryWeight"], 0, "{rollout}");
    eventually("the route sends everything to the stable backend", || {
        let split = hello_split(dir.path());
        match split == [("hello-v1".into(), 100)] {
            true => Ok(()),
            false => Err(format!("{split:?}")),
        }
    });
    // `--watch` ends at once on an ended rollout, failing on an abort.
    let watch = meshctl(dir.path(), &["rollout", "status", "hello", "--watch"]);
    assert_eq!(watch.status.code(), Some(1), "{}", text(&watch));
    assert!(
        text(&watch).contains("aborted at step 2/3"),
        "{}",
        text(&watch)
    );
    let promote = meshctl(dir.path(), &["rollout", "promote", "hello"]);
    assert!(!promote.status.success());
    assert!(
        text(&promote).contains("has ended (Aborted)"),
        "{}",
        text(&promote)
    );

    // Starting it again is a new run, from the first step.
    let out = meshctl(dir.path(), &start_args(&[]));
    assert!(out.status.success(), "{}", text(&out));
    let rollout = wait_for(dir.path(), "Progressing", 0);
    assert_eq!(rollout["status"]["canaryWeight"], 20, "{rollout}");
    assert_eq!(
        rollout["spec"]["abort"],
        serde_json::Value::Null,
        "{rollout}"
    );
    let run = rollout["status"]["run"].clone();

    // --force starts over one under way: here an A/B rollout, whose abort
    // also takes the cohort's rule away.
    let out = meshctl(
        dir.path(),
        &start_args(&["--ab-header", "x-beta=yes", "--force"]),
    );
    assert!(out.status.success(), "{}", text(&out));
    let rollout = eventually("a new run with the cohort", || {
        let rollout = status_json(dir.path(), "hello");
        match rollout["status"]["cohort"] == true && rollout["status"]["run"] != run {
            true => Ok(rollout),
            false => Err(rollout.to_string()),
        }
    });
    let reasons: Vec<&str> = rollout["status"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["Started"], "a fresh history: {rollout}");
    eventually("the cohort rule comes first", || {
        let rules = hello_rules(dir.path());
        match rules.len() == 2 && rules[0].0 == ["x-beta=yes"] {
            true => Ok(()),
            false => Err(format!("{rules:?}")),
        }
    });
    let out = meshctl(dir.path(), &["rollout", "abort", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    eventually("everything to the stable backend, no cohort rule", || {
        let rules = hello_rules(dir.path());
        match rules == [(vec![], vec![("hello-v1".to_string(), 100)])] {
            true => Ok(()),
            false => Err(format!("{rules:?}")),
        }
    });
}

/// The rules proxies get for `hello`, in order, as the controller's own
/// loader reads the manifest directory: each rule's match headers and its
/// split.
fn hello_rules(dir: &Path) -> Vec<(Vec<String>, Split)> {
    let store = trellis_control_plane::store::Store::new("cluster.local");
    let mut source = trellis_control_plane::source::local::LocalSource::new(dir, store.clone());
    source.reload().unwrap();
    assert!(
        source.errors().borrow().is_empty(),
        "{:?}",
        source.errors().borrow()
    );
    store
        .routes(manifests::HELLO_AUTHORITY, "default")
        .rules
        .iter()
        .map(|rule| {
            let headers = rule
                .r#match
                .iter()
                .flat_map(|m| &m.headers)
                .map(|h| format!("{}={}", h.name, h.value))
                .collect();
            let total: u32 = rule.backends.iter().map(|b| b.weight).sum();
            let backends = rule
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.weight * 100 / total.max(1)))
                .collect();
            (headers, backends)
        })
        .collect()
}

#[test]
fn an_ab_cohort_goes_first_promote_ends_it_and_watch_exits_0() {
    let dir = demo_dir();
    let state = tempfile::tempdir().unwrap();
    let _controller = Controller::start(dir.path(), state.path());
    let out = meshctl(
        dir.path(),
        &start_args(&["--steps", "100", "--ab-header", "x-beta=yes", "--manual"]),
    );
    assert!(out.status.success(), "{}", text(&out));
    let yaml = std::fs::read_to_string(dir.path().join("rollout-default-hello.yaml")).unwrap();
    assert!(yaml.contains("pause: {}"), "--manual: {yaml}");
    let rollout = wait_for(dir.path(), "Progressing", 0);
    assert_eq!(rollout["status"]["cohort"], true, "{rollout}");
    assert_eq!(rollout["status"]["canaryWeight"], 0, "{rollout}");
    let cohort_first = vec![
        (
            vec!["x-beta=yes".to_string()],
            vec![("hello-v2".to_string(), 100)],
        ),
        (vec![], vec![("hello-v1".to_string(), 100)]),
    ];
    eventually("the cohort, and only it, goes to the canary", || {
        let rules = hello_rules(dir.path());
        match rules == cohort_first {
            true => Ok(()),
            false => Err(format!("{rules:?}")),
        }
    });

    // Pausing holds the step; resuming carries on.
    let out = meshctl(dir.path(), &["rollout", "pause", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    let paused = wait_for(dir.path(), "Paused", 0);
    assert_eq!(
        paused["status"]["history"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["reason"],
        "PausedByUser",
        "{paused}"
    );
    let out = meshctl(dir.path(), &["rollout", "resume", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(dir.path(), "Progressing", 0);

    let out = meshctl(dir.path(), &["rollout", "promote", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    let rollout = wait_for(dir.path(), "Progressing", 1);
    assert_eq!(rollout["status"]["canaryWeight"], 100, "{rollout}");

    // `--watch` follows it to the end: promoted, exit 0.
    let watch = std::thread::spawn({
        let dir = dir.path().to_path_buf();
        move || meshctl(&dir, &["rollout", "status", "hello", "--watch"])
    });
    std::thread::sleep(Duration::from_millis(700));
    let out = meshctl(dir.path(), &["rollout", "promote", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    let watch = watch.join().unwrap();
    assert!(watch.status.success(), "{}", text(&watch));
    let shown = String::from_utf8_lossy(&watch.stdout);
    assert!(
        shown.contains("step 2/2 canary 100%") && shown.contains("promoted: canary 100%"),
        "a block per change, the last one promoted:\n{shown}"
    );
    eventually("everything goes to the canary, no cohort rule", || {
        let rules = hello_rules(dir.path());
        match rules == [(vec![], vec![("hello-v2".to_string(), 100)])] {
            true => Ok(()),
            false => Err(format!("{rules:?}")),
        }
    });
}

#[test]
fn a_rollout_the_controller_refuses_is_invalid_and_watch_says_why() {
    let dir = demo_dir();
    let state = tempfile::tempdir().unwrap();
    // Written by hand, so no `start` checked it.
    std::fs::write(
        dir.path().join("mine.yaml"),
        "apiVersion: trellis.dev/v1alpha1
kind: Rollout
metadata: {name: hello, namespace: default}
spec:
  service: hello
  backends: {stable: hello-v1, canary: hello-v9}
  steps: [{weight: 50}]
  analysis: {interval: 10m, successRate: 99}
",
    )
    .unwrap();
    let _controller = Controller::start(dir.path(), state.path());
    let watch = meshctl(dir.path(), &["rollout", "status", "hello", "--watch"]);
    assert_eq!(watch.status.code(), Some(1), "{}", text(&watch));
    assert!(
        String::from_utf8_lossy(&watch.stderr).contains("no Service default/hello-v9"),
        "{}",
        text(&watch)
    );
    let rollout = status_json(dir.path(), "hello");
    assert_eq!(rollout["status"]["phase"], "Invalid", "{rollout}");
    assert!(hello_rules(dir.path()).is_empty(), "traffic is untouched");
    // meshctl leaves a file of the user's, shared or not, to the user.
    let start = meshctl(dir.path(), &start_args(&[]));
    assert!(!start.status.success());
    assert!(
        text(&start).contains("is defined in") && text(&start).contains("mine.yaml"),
        "{}",
        text(&start)
    );
    let promote = meshctl(dir.path(), &["rollout", "promote", "hello"]);
    assert!(!promote.status.success());
    assert!(text(&promote).contains("is invalid"), "{}", text(&promote));
}
