//! Routes that name a ResiliencePolicy through an ExtensionRef filter, and
//! fields Trellis refuses rather than ignores.

use std::path::Path;

use crate::model::Object;
use crate::source::manifest;

const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: limit, namespace: default}
spec:
  circuitBreaker: {maxRequests: 50}
---
apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: hello, namespace: default}
spec:
  targetRefs: [{kind: Service, name: hello}]
  outlierDetection: {consecutiveFailures: 3}
  circuitBreaker: {maxRequests: 500}
";

/// An HTTPRoute for hello whose one rule has these filters.
fn route(filters: &[&str]) -> String {
    let filters: Vec<String> = filters
        .iter()
        .map(|name| {
            format!(
                "        - type: ExtensionRef\n          \
                 extensionRef: {{group: trellis.dev, kind: ResiliencePolicy, name: {name}}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: hello, namespace: default}}\nspec:\n  \
         parentRefs: [{{group: \"\", kind: Service, name: hello}}]\n  rules:\n    \
         - filters:\n{}",
        filters.concat()
    )
}

fn validate(route_yaml: &str) -> Result<(), String> {
    let file = Path::new("route.yaml");
    let objects = manifest::parse(file, route_yaml).map_err(|e| e.to_string())?;
    let mut all = manifest::parse(Path::new("mesh.yaml"), MESH).unwrap();
    all.extend(objects.iter().cloned());
    let all: Vec<&Object> = all.iter().collect();
    manifest::validate(file, &objects, &all).map_err(|e| e.to_string())
}

#[test]
fn a_rule_may_name_a_circuit_breaker_policy() {
    validate(&route(&["limit"])).unwrap();
}

#[test]
fn a_rule_naming_an_unknown_policy_is_refused() {
    assert_eq!(
        validate(&route(&["nope"])).unwrap_err(),
        "route.yaml: HTTPRoute default/hello: spec.rules[0].filters[0]: \
         ResiliencePolicy default/nope does not exist"
    );
}

#[test]
fn a_rule_naming_a_policy_with_outlier_detection_is_refused() {
    assert_eq!(
        validate(&route(&["hello"])).unwrap_err(),
        "route.yaml: HTTPRoute default/hello: spec.rules[0].filters[0]: \
         ResiliencePolicy default/hello sets outlierDetection, which applies per Service \
         through its spec.targetRefs, not per route rule; reference a policy with only circuitBreaker"
    );
}

#[test]
fn a_rule_takes_one_policy() {
    assert_eq!(
        validate(&route(&["limit", "limit"])).unwrap_err(),
        "route.yaml: HTTPRoute default/hello: spec.rules[0].filters[1]: \
         a rule takes one ResiliencePolicy, and filters[0] already names one"
    );
}

#[test]
fn other_extension_kinds_are_refused_with_the_supported_ones() {
    let yaml = route(&["limit"]).replace("kind: ResiliencePolicy", "kind: RateLimit");
    let err = validate(&yaml).unwrap_err();
    assert!(
        err.ends_with(
            "extensionRef trellis.dev/RateLimit is not supported; \
             use group trellis.dev, kind HTTPFault or ResiliencePolicy"
        ),
        "{err}"
    );
}

/// An HTTPRoute for hello with one rule: `rule` is its YAML body, indented
/// as the items of `rules`.
fn route_with(rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: hello, namespace: default}}\nspec:\n  \
         parentRefs: [{{group: \"\", kind: Service, name: hello}}]\n  rules:\n    - {rule}\n"
    )
}

/// The reason a route with this one rule is refused, without the file and
/// object prefix.
fn refusal(rule: &str) -> String {
    let err = validate(&route_with(rule)).unwrap_err();
    err.strip_prefix("route.yaml: HTTPRoute default/hello: ")
        .unwrap_or(&err)
        .to_string()
}

#[test]
fn header_modifiers_on_one_backend_are_accepted() {
    validate(&route_with(
        "backendRefs:\n      - name: hello\n        port: 8080\n        filters:\n\
         \x20         - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: v}]}}\n\
         \x20         - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x, value: v}]}}",
    ))
    .unwrap();
}

#[test]
fn other_filters_on_one_backend_are_refused_naming_the_field() {
    assert_eq!(
        refusal(
            "backendRefs:\n      - name: hello\n        port: 8080\n        \
             filters: [{type: URLRewrite, urlRewrite: {hostname: a.example}}]"
        ),
        "spec.rules[0].backendRefs[0].filters[0]: filter type \"URLRewrite\" is not supported \
         on one backend; use RequestHeaderModifier or ResponseHeaderModifier there, or move it \
         to the rule's filters (it then applies to all its backends)"
    );
    assert_eq!(
        refusal(
            "backendRefs:\n      - name: hello\n        port: 8080\n        \
             filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: v}]}}, \
             {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: z, value: v}]}}]"
        ),
        "spec.rules[0].backendRefs[0].filters[1]: a rule takes one RequestHeaderModifier filter, \
         and spec.rules[0].backendRefs[0].filters[0] is one already; merge them"
    );
}

#[test]
fn redirect_and_rewrite_may_not_share_a_rule() {
    assert_eq!(
        refusal(
            "filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}, \
             {type: URLRewrite, urlRewrite: {hostname: a.example}}]"
        ),
        "spec.rules[0].filters[1]: RequestRedirect and URLRewrite (spec.rules[0].filters[0], \
         spec.rules[0].filters[1]) may not share a rule; keep one"
    );
}

#[test]
fn a_redirect_rule_takes_no_backends() {
    assert_eq!(
        refusal(
            "filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]\n      \
             backendRefs: [{name: hello, port: 8080}]"
        ),
        "spec.rules[0].filters[0]: a RequestRedirect rule answers the request itself, so it \
         takes no backendRefs; remove them or the redirect"
    );
}

#[test]
fn redirect_fields_are_checked() {
    let redirect = |fields: &str| {
        refusal(&format!(
            "filters: [{{type: RequestRedirect, requestRedirect: {{{fields}}}}}]"
        ))
    };
    assert_eq!(
        redirect("statusCode: 304"),
        "spec.rules[0].filters[0].requestRedirect.statusCode: 304 is not 301, 302, 303, 307 or 308"
    );
    assert_eq!(
        redirect("scheme: ftp"),
        "spec.rules[0].filters[0].requestRedirect.scheme: \"ftp\" is not http or https"
    );
    assert_eq!(
        redirect("hostname: \"a.example:80\""),
        "spec.rules[0].filters[0].requestRedirect.hostname: \"a.example:80\" is not a hostname \
         like example.org (no port, no wildcard)"
    );
    assert_eq!(
        redirect("port: 0"),
        "spec.rules[0].filters[0].requestRedirect.port: 0 is not a port (1-65535)"
    );
    assert_eq!(
        redirect("path: {type: ReplaceFullPath}"),
        "spec.rules[0].filters[0].requestRedirect.path: type ReplaceFullPath needs replaceFullPath"
    );
    assert_eq!(
        redirect("path: {type: ReplaceFullPath, replaceFullPath: \"/a b\"}"),
        "spec.rules[0].filters[0].requestRedirect.path.replaceFullPath: \"/a b\" is not a URL path \
         (no query, fragment, spaces or control characters; percent-encode them)"
    );
    assert_eq!(
        redirect("path: {type: Regex}"),
        "spec.rules[0].filters[0].requestRedirect.path.type: \"Regex\" is not ReplaceFullPath or ReplacePrefixMatch"
    );
    validate(&route_with(
        "filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, \
         port: 8443, statusCode: 308, path: {type: ReplaceFullPath, replaceFullPath: /x}}}]",
    ))
    .unwrap();
}

#[test]
fn replace_prefix_match_needs_exactly_one_path_prefix_match() {
    let rewrite = "filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]";
    validate(&route_with(rewrite)).unwrap();
    validate(&route_with(&format!(
        "matches: [{{path: {{type: PathPrefix, value: /old}}}}]\n      {rewrite}"
    )))
    .unwrap();
    let want = "spec.rules[0].filters[0].urlRewrite.path: ReplacePrefixMatch replaces the matched \
                prefix, so the rule needs exactly one match, of type PathPrefix; use ReplaceFullPath \
                or split the rule";
    assert_eq!(
        refusal(&format!(
            "matches: [{{path: {{type: Exact, value: /old}}}}]\n      {rewrite}"
        )),
        want
    );
    assert_eq!(
        refusal(&format!(
            "matches: [{{path: {{value: /a}}}}, {{path: {{value: /b}}}}]\n      {rewrite}"
        )),
        want
    );
}

#[test]
fn a_rule_takes_one_of_each_modifier() {
    assert_eq!(
        refusal(
            "filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: a, value: b}]}}, \
             {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: c, value: d}]}}]"
        ),
        "spec.rules[0].filters[1]: a rule takes one ResponseHeaderModifier filter, and \
         spec.rules[0].filters[0] is one already; merge them"
    );
    assert_eq!(
        refusal("filters: [{type: ResponseHeaderModifier}]"),
        "spec.rules[0].filters[0]: type ResponseHeaderModifier needs responseHeaderModifier"
    );
    assert_eq!(
        refusal(
            "filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: \"a b\", value: c}]}}]"
        ),
        "spec.rules[0].filters[0]: \"a b\" is not a valid header name"
    );
}

#[test]
fn mirrors_are_checked() {
    let mirror = |fields: &str| {
        refusal(&format!(
            "filters: [{{type: RequestMirror, requestMirror: {{{fields}}}}}]"
        ))
    };
    assert_eq!(
        mirror("backendRef: {name: nope, port: 8080}"),
        "spec.rules[0].filters[0].requestMirror.backendRef: backendRef \"nope\" names no Service \
         in namespace default; create the Service or fix the name"
    );
    assert_eq!(
        mirror("backendRef: {name: hello}"),
        "spec.rules[0].filters[0].requestMirror.backendRef.port: a Service backend needs its port"
    );
    assert_eq!(
        mirror("backendRef: {name: hello, port: 8080}, percent: 101"),
        "spec.rules[0].filters[0].requestMirror.percent: 101 is not 0-100"
    );
    assert_eq!(
        mirror("backendRef: {name: hello, port: 8080}, percent: 5, fraction: {numerator: 1}"),
        "spec.rules[0].filters[0].requestMirror: give percent or fraction, not both"
    );
    assert_eq!(
        mirror("backendRef: {name: hello, port: 8080}, fraction: {numerator: 3, denominator: 2}"),
        "spec.rules[0].filters[0].requestMirror.fraction: 3/2 is not a fraction between 0 and 1 \
         (numerator 0 to denominator, denominator > 0)"
    );
    validate(&route_with(
        "filters: [{type: RequestMirror, requestMirror: {backendRef: {name: hello, port: 8080}, \
         fraction: {numerator: 1, denominator: 3}}}]",
    ))
    .unwrap();
}

#[test]
fn backend_request_timeout_is_at_most_the_request_timeout() {
    assert_eq!(
        refusal("timeouts: {request: 1s, backendRequest: 2s}"),
        "spec.rules[0].timeouts.backendRequest: \"2s\" is longer than timeouts.request (1s), which \
         covers every attempt; make it at most the request timeout"
    );
    assert_eq!(
        refusal("timeouts: {backendRequest: soon}"),
        "spec.rules[0].timeouts.backendRequest: \"soon\" is not a duration like 2s or 500ms"
    );
    validate(&route_with(
        "timeouts: {request: 2s, backendRequest: 500ms}",
    ))
    .unwrap();
    validate(&route_with("timeouts: {request: 0s, backendRequest: 5s}")).unwrap();
}

#[test]
fn fields_trellis_does_not_read_are_refused_not_ignored() {
    let base = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                metadata: {name: hello, namespace: default}\nspec:\n  \
                parentRefs: [{group: \"\", kind: Service, name: hello}]\n";
    let refused = [
        (
            "  rules: [{sessionPersistence: {type: Cookie}, backendRefs: [{name: hello, port: 8080}]}]\n",
            "spec.rules[0].sessionPersistence",
        ),
        // A typo the API server's schema would prune.
        (
            "  rules: [{backendRef: [{name: hello, port: 8080}]}]\n",
            "spec.rules[0].backendRef",
        ),
        (
            "  rules: [{matches: [{path: {value: /x}, header: [{name: a, value: b}]}]}]\n",
            "spec.rules[0].matches[0].header",
        ),
    ];
    for (spec, field) in refused {
        let err = validate(&format!("{base}{spec}")).unwrap_err();
        assert_eq!(
            err,
            format!(
                "route.yaml: HTTPRoute hello: {field}: Trellis does not implement this field; \
                 remove it (a route is never applied with part of it ignored)"
            )
        );
    }
    // GAMMA routes may carry hostnames, which a mesh must not act on.
    validate(&format!(
        "{base}  hostnames: [hello.example]\n  rules: [{{backendRefs: [{{name: hello, port: 8080}}]}}]\n"
    ))
    .unwrap();
}

/// A GRPCRoute for hello with one rule of `rule` (YAML flow mapping fields).
fn grpc_route(rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
         metadata: {{name: hello, namespace: default}}\nspec:\n  \
         parentRefs: [{{group: \"\", kind: Service, name: hello}}]\n  \
         rules: [{{{rule}}}]\n"
    )
}

#[test]
fn grpcroutes_are_checked_for_what_only_they_have() {
    let good = [
        "matches: [{method: {service: pkg.Echo, method: Say}}]",
        "matches: [{method: {service: pkg.Echo}}]",
        "matches: [{method: {type: RegularExpression, method: \"S.*\"}}]",
        "filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}]",
    ];
    for rule in good {
        validate(&grpc_route(rule)).unwrap_or_else(|e| panic!("{rule}: {e}"));
    }
    let bad = [
        (
            "matches: [{method: {}}]",
            "spec.rules[0].matches[0].method: give a service, a method or both",
        ),
        (
            "matches: [{method: {service: pkg.Echo, method: Say/It}}]",
            "spec.rules[0].matches[0].method.method: \"Say/It\" is not a gRPC method name",
        ),
        (
            "matches: [{method: {service: pkg..Echo}}]",
            "spec.rules[0].matches[0].method.service",
        ),
        (
            "matches: [{method: {type: RegularExpression, service: \"(\"}}]",
            "spec.rules[0].matches[0].method.service",
        ),
        (
            "matches: [{method: {type: Prefix, service: pkg}}]",
            "\"Prefix\" is not Exact or RegularExpression",
        ),
        (
            "filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]",
            "spec.rules[0].filters[0]: filter type \"URLRewrite\" is not one of GRPCRoute's",
        ),
    ];
    for (rule, why) in bad {
        let err = validate(&grpc_route(rule)).expect_err(rule);
        assert!(err.contains(why), "{rule}: {err}");
    }
}
