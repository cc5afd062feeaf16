//! The decision as a pure function: callers, ports, modes and defaults.

use trellis_proto::discovery::{
    caller, AuthorizationRule, Caller, DefaultPolicy, HttpAuthorizationMatch, InboundPolicy,
    PathMatch, PortPolicy,
};

use super::*;

fn counters() -> IntCounterVec {
    IntCounterVec::new(
        prometheus::Opts::new("authz_total", "test"),
        &["decision", "policy", "mode"],
    )
    .unwrap()
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa)
}

fn rule(policy: &str, audit: bool, kind: caller::Kind) -> AuthorizationRule {
    AuthorizationRule {
        policy: policy.into(),
        audit,
        callers: vec![Caller { kind: Some(kind) }],
        http: Vec::new(),
    }
}

fn port(number: u32, rules: Vec<AuthorizationRule>) -> PortPolicy {
    let (audit, enforce): (Vec<_>, Vec<_>) = rules.iter().partition(|r| r.audit);
    let names = |rules: Vec<&AuthorizationRule>| {
        let mut names: Vec<String> = rules.iter().map(|r| r.policy.clone()).collect();
        names.dedup();
        names
    };
    PortPolicy {
        port: number,
        enforce_policies: names(enforce),
        audit_policies: names(audit),
        rules,
    }
}

fn compiled(default: DefaultPolicy, ports: Vec<PortPolicy>) -> (Compiled, IntCounterVec) {
    let counters = counters();
    let policy = InboundPolicy {
        workload: "default/hello".into(),
        default_policy: default.into(),
        ports,
    };
    (Compiled::new(policy, &counters), counters)
}

const GET: Access<'static> = Access::Http {
    method: &Method::GET,
    path: "/",
};

fn allowed(policy: &Compiled, port: u16, client: Option<&SpiffeId>, access: Access) -> bool {
    !matches!(
        policy.decide(port, client, access).verdict,
        Verdict::Deny(_)
    )
}

#[test]
fn namespace_defaults_decide_ports_no_policy_selects() {
    let web = id("web");
    let (open, _) = compiled(DefaultPolicy::AllUnauthenticated, Vec::new());
    assert!(allowed(&open, 80, None, GET));
    let (meshed, _) = compiled(DefaultPolicy::AllMeshed, Vec::new());
    assert!(allowed(&meshed, 80, Some(&web), GET));
    assert!(!allowed(&meshed, 80, None, GET), "plaintext is refused");
    let (deny, _) = compiled(DefaultPolicy::Deny, Vec::new());
    assert!(!allowed(&deny, 80, Some(&web), Access::Connection));
}

#[test]
fn a_selected_port_allows_only_what_its_rules_allow() {
    let (policy, _) = compiled(
        DefaultPolicy::AllUnauthenticated,
        vec![port(
            8080,
            vec![
                rule(
                    "default/a",
                    false,
                    caller::Kind::Identity(id("web").to_string()),
                ),
                rule(
                    "default/a",
                    false,
                    caller::Kind::Namespace("monitoring".into()),
                ),
            ],
        )],
    );
    assert!(allowed(&policy, 8080, Some(&id("web")), GET));
    assert!(!allowed(&policy, 8080, Some(&id("other")), GET));
    assert!(!allowed(&policy, 8080, None, GET));
    let prometheus = SpiffeId::new("cluster.local", "monitoring", "prometheus");
    assert!(allowed(&policy, 8080, Some(&prometheus), GET));
    // Another port keeps the namespace default.
    assert!(allowed(&policy, 9090, None, GET));
    match policy.decide(8080, None, GET).verdict {
        Verdict::Deny(reason) => assert!(
            reason.contains("plaintext") && reason.contains("default/a"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unauthenticated_allows_plaintext_and_meshed_clients_and_meshed_only_the_latter() {
    let (policy, _) = compiled(
        DefaultPolicy::Deny,
        vec![
            port(
                80,
                vec![rule(
                    "default/a",
                    false,
                    caller::Kind::Unauthenticated(true),
                )],
            ),
            port(
                81,
                vec![rule("default/a", false, caller::Kind::Meshed(true))],
            ),
        ],
    );
    assert!(allowed(&policy, 80, None, GET));
    assert!(allowed(&policy, 80, Some(&id("web")), Access::Connection));
    assert!(!allowed(&policy, 81, None, Access::Connection));
    assert!(allowed(&policy, 81, Some(&id("web")), GET));
}

#[test]
fn policies_without_ports_cover_every_port_not_listed() {
    let (policy, _) = compiled(
        DefaultPolicy::AllUnauthenticated,
        vec![port(
            EVERY,
            vec![rule("default/all", false, caller::Kind::Meshed(true))],
        )],
    );
    assert!(!allowed(&policy, 1234, None, GET));
    assert!(allowed(&policy, 1234, Some(&id("web")), GET));
}
const EVERY: u32 = 0;

#[test]
fn http_rules_match_methods_and_whole_path_segments_and_never_a_tcp_connection() {
    let mut api = rule("default/a", false, caller::Kind::Meshed(true));
    api.http = vec![HttpAuthorizationMatch {
        paths: vec![PathMatch {
            exact: false,
            value: "/api/".into(),
        }],
        methods: vec!["GET".into()],
    }];
    let (policy, _) = compiled(DefaultPolicy::AllUnauthenticated, vec![port(80, vec![api])]);
    let web = id("web");
    let web = Some(&web);
    let get = |path| Access::Http {
        method: &Method::GET,
        path,
    };
    assert!(allowed(&policy, 80, web, get("/api")));
    assert!(allowed(&policy, 80, web, get("/api/x")));
    assert!(!allowed(&policy, 80, web, get("/apix")));
    let post = Access::Http {
        method: &Method::POST,
        path: "/api",
    };
    assert!(!allowed(&policy, 80, web, post));
    assert!(!allowed(&policy, 80, web, Access::Connection));
}

#[test]
fn audit_policies_never_deny_and_count_what_they_would() {
    let audited = port(
        80,
        vec![rule(
            "default/trial",
            true,
            caller::Kind::Identity(id("web").to_string()),
        )],
    );
    let (policy, counters) = compiled(DefaultPolicy::AllUnauthenticated, vec![audited.clone()]);
    let other = id("other");
    let decision = policy.decide(80, Some(&other), GET);
    assert!(matches!(decision.verdict, Verdict::AuditDeny(_)));
    decision.counter.inc();
    assert_eq!(
        counters
            .with_label_values(&["deny", "default/trial", "audit"])
            .get(),
        1
    );
    let decision = policy.decide(80, Some(&id("web")), GET);
    assert_eq!(decision.verdict, Verdict::Allow);
    decision.counter.inc();
    assert_eq!(
        counters
            .with_label_values(&["allow", "default/trial", "audit"])
            .get(),
        1
    );
    // Audit does not open what the namespace default closes.
    let (closed, _) = compiled(DefaultPolicy::Deny, vec![audited.clone()]);
    assert!(!allowed(&closed, 80, Some(&id("web")), GET));
    // Next to an Enforce policy, the Enforce rules decide.
    let mut both = audited;
    both.rules
        .push(rule("default/strict", false, caller::Kind::Meshed(true)));
    both.enforce_policies = vec!["default/strict".into()];
    let (mixed, _) = compiled(DefaultPolicy::AllUnauthenticated, vec![both]);
    assert!(allowed(&mixed, 80, Some(&other), GET));
    assert!(!allowed(&mixed, 80, None, GET));
}

#[tokio::test]
async fn nothing_is_allowed_before_the_first_policy_arrives() {
    let (authz, _arrived) = Authz::new(counters(), Duration::from_millis(50));
    let refused = authz.check(80, None, GET).await;
    assert_eq!(refused, Err(Refused::Pending(Duration::from_millis(50))));
    authz.install(InboundPolicy::default());
    assert_eq!(authz.check(80, None, GET).await, Ok(()));
}
