//! What the API server refuses, the local source refuses, naming the field.

use std::path::Path;

use crate::source::manifest;

fn accepted(yaml: &str) {
    if let Err(e) = manifest::parse(Path::new("mesh.yaml"), yaml) {
        panic!("refused: {e}");
    }
}

/// The reason `yaml` was refused, after `mesh.yaml: <object>: `.
fn refusal(yaml: &str) -> String {
    match manifest::parse(Path::new("mesh.yaml"), yaml) {
        Ok(objects) => panic!("accepted: {objects:?}"),
        Err(e) => e.to_string(),
    }
}

fn service(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: default}}\nspec: {spec}\n")
}

fn slice(address_type: &str, body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: hello-1, namespace: default, labels: {{kubernetes.io/service-name: hello}}}}\n\
         {address_type}{body}"
    )
}

fn pod(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: hello-v1, namespace: default}}\nspec: {spec}\n")
}

#[test]
fn an_endpoint_slice_without_address_type_is_refused() {
    assert_eq!(
        refusal(&slice("", "endpoints: [{addresses: [10.1.2.3]}]\n")),
        "mesh.yaml: EndpointSlice default/hello-1: addressType: is required; say what the \
         endpoints' addresses are: addressType: IPv4 (or IPv6, FQDN)"
    );
    assert_eq!(
        refusal(&slice("addressType: IP\n", "endpoints: []\n")),
        "mesh.yaml: EndpointSlice default/hello-1: addressType: \"IP\" is not supported; \
         use IPv4, IPv6, FQDN"
    );
}

#[test]
fn a_service_without_ports_is_refused_unless_headless_or_external_name() {
    assert_eq!(
        refusal(&service("{clusterIP: 10.96.0.20}")),
        "mesh.yaml: Service default/hello: spec.ports: is required; a Service needs at least \
         one port unless it is headless (clusterIP: None) or of type ExternalName; add e.g. \
         ports: [{name: http, port: 8080}]"
    );
    accepted(&service("{clusterIP: None}"));
    accepted(&service(
        "{type: ExternalName, externalName: db.example.com.}",
    ));
    let missing = refusal(&service("{type: ExternalName}"));
    assert!(
        missing.contains(": spec.externalName: is required"),
        "{missing}"
    );
    let both = refusal(&service(
        "{type: ExternalName, externalName: db, clusterIP: 10.96.0.1}",
    ));
    assert!(
        both.contains("spec.clusterIP: \"10.96.0.1\" must not be set"),
        "{both}"
    );
    let headless_lb = refusal(&service(
        "{type: LoadBalancer, clusterIP: None, ports: [{port: 80}]}",
    ));
    assert!(
        headless_lb.contains("spec.clusterIP: \"None\" is not allowed"),
        "{headless_lb}"
    );
    let unknown = refusal(&service("{type: Internal, ports: [{port: 80}]}"));
    assert!(
        unknown.contains("spec.type: \"Internal\" is not supported"),
        "{unknown}"
    );
}

#[test]
fn service_ports_follow_the_api_server() {
    // Several ports need names; one (protocol, port) pair appears once, but
    // the same number may serve TCP and UDP.
    let unnamed = refusal(&service("{ports: [{name: http, port: 80}, {port: 81}]}"));
    assert!(
        unnamed.contains("spec.ports[1].name: is required"),
        "{unnamed}"
    );
    let twice = refusal(&service(
        "{ports: [{name: a, port: 53}, {name: b, port: 53, protocol: TCP}]}",
    ));
    assert!(
        twice.contains("spec.ports[1]: port 53/TCP is also at spec.ports[0]"),
        "{twice}"
    );
    accepted(&service(
        "{ports: [{name: dns, port: 53}, {name: dns-udp, port: 53, protocol: UDP}]}",
    ));
    let cases = [
        (
            "{ports: [{port: 0}]}",
            "spec.ports[0].port: 0 is not a port number",
        ),
        (
            "{ports: [{port: 80, protocol: HTTP}]}",
            "spec.ports[0].protocol: \"HTTP\" is not supported; use TCP, UDP, SCTP",
        ),
        (
            "{ports: [{name: Web, port: 80}]}",
            "spec.ports[0].name: \"Web\" is not a DNS-1123 label",
        ),
        (
            "{ports: [{port: 80, targetPort: http_alt}]}",
            "spec.ports[0].targetPort: \"http_alt\" is not a port name",
        ),
        (
            "{ports: [{port: 80, appProtocol: 'a b'}]}",
            "spec.ports[0].appProtocol: \"a b\" is not a qualified name",
        ),
        (
            "{ports: [{port: 70000}]}",
            "spec.ports[0].port: does not match the Kubernetes schema",
        ),
        (
            "{clusterIP: 10.96.0, ports: [{port: 80}]}",
            "spec.clusterIP: \"10.96.0\" is not an IP address",
        ),
        (
            "{ports: [{port: 80}], selector: {app: 'a b'}}",
            "spec.selector[app]: \"a b\" is not a label value",
        ),
    ];
    for (spec, expected) in cases {
        let message = refusal(&service(spec));
        assert!(message.contains(expected), "{spec}: {message}");
    }
    // A targetPort of 0 or "" is defaulted to port, as the API server does.
    accepted(&service(
        "{ports: [{name: a, port: 80, targetPort: 0}, {name: b, port: 81, targetPort: http}]}",
    ));
}

#[test]
fn names_are_checked_per_kind() {
    // Service names are DNS-1035 labels; Pods' are DNS-1123 subdomains.
    let message = refusal(
        "apiVersion: v1\nkind: Service\nmetadata: {name: 1st}\nspec: {ports: [{port: 80}]}\n",
    );
    assert!(
        message.contains("Service default/1st: metadata.name: \"1st\" is not a DNS-1035 label"),
        "{message}"
    );
    let dotted = "metadata: {name: hello.v1}";
    assert!(refusal(
        &service("{ports: [{port: 80}]}")
            .replace("metadata: {name: hello, namespace: default}", dotted)
    )
    .contains("metadata.name: \"hello.v1\" is not a DNS-1035 label"));
    accepted(
        &pod("{containers: [{name: app, image: app}]}")
            .replace("name: hello-v1,", "name: hello.v1,"),
    );
    let namespace = refusal(
        &pod("{containers: [{name: app, image: app}]}")
            .replace("namespace: default", "namespace: Prod"),
    );
    assert!(
        namespace.contains("metadata.namespace: \"Prod\" is not a DNS-1123 label"),
        "{namespace}"
    );
    let label = refusal(&pod("{containers: [{name: app, image: app}]}").replace(
        "namespace: default",
        "namespace: default, labels: {'-x': v1}",
    ));
    assert!(
        label.contains("metadata.labels: \"-x\" is not a qualified name"),
        "{label}"
    );
    let route = refusal(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: Hello}\n",
    );
    assert!(
        route.contains("metadata.name: \"Hello\" is not a DNS-1123 subdomain"),
        "{route}"
    );
}

#[test]
fn endpoint_addresses_match_the_address_type() {
    let cases = [
        (
            "IPv4",
            "[{addresses: []}]",
            "endpoints[0].addresses: is required",
        ),
        ("IPv4", "[{}]", "endpoints[0].addresses: is required"),
        (
            "IPv4",
            "[{addresses: ['fd00::3']}]",
            "endpoints[0].addresses[0]: \"fd00::3\" is not an IPv4 address",
        ),
        (
            "IPv6",
            "[{addresses: [10.1.2.3]}]",
            "endpoints[0].addresses[0]: \"10.1.2.3\" is not an IPv6 address",
        ),
        (
            "IPv4",
            "[{addresses: [10.1.2.3, 169.254.0.9]}]",
            "endpoints[0].addresses[1]: \"169.254.0.9\" is link-local",
        ),
        (
            "IPv4",
            "[{addresses: [0.0.0.0]}]",
            "\"0.0.0.0\" is unspecified",
        ),
        (
            "FQDN",
            "[{addresses: [localhost]}]",
            "\"localhost\" is not a fully qualified domain name",
        ),
        (
            "IPv4",
            "[{addresses: [10.1.2.3], hostname: Web}]",
            "endpoints[0].hostname: \"Web\" is not a DNS-1123 label",
        ),
    ];
    for (address_type, endpoints, expected) in cases {
        let yaml = slice(
            &format!("addressType: {address_type}\n"),
            &format!("endpoints: {endpoints}\n"),
        );
        let message = refusal(&yaml);
        assert!(message.contains(expected), "{endpoints}: {message}");
    }
    // Loopback is the exception: local mode's pods live on loopback aliases.
    accepted(&slice(
        "addressType: IPv4\n",
        "endpoints: [{addresses: [127.0.0.3]}]\n",
    ));
    accepted(&slice(
        "addressType: IPv6\n",
        "endpoints: [{addresses: ['fd00::3', '::1']}]\n",
    ));
    accepted(&slice(
        "addressType: FQDN\n",
        "endpoints: [{addresses: [hello.example.com]}]\n",
    ));
}

#[test]
fn endpoint_ports_follow_the_api_server() {
    let ports = |ports: &str| {
        slice(
            "addressType: IPv4\n",
            &format!("endpoints: [{{addresses: [10.1.2.3]}}]\nports: {ports}\n"),
        )
    };
    let cases = [
        (
            "[{port: 80}, {port: 81}]",
            "ports[1].name: name \"\" is also at ports[0].name",
        ),
        (
            "[{name: http, port: 80, protocol: tcp}]",
            "ports[0].protocol: \"tcp\" is not supported",
        ),
        (
            "[{name: h_2, port: 80}]",
            "ports[0].name: \"h_2\" is not a DNS-1123 label",
        ),
    ];
    for (yaml, expected) in cases {
        let message = refusal(&ports(yaml));
        assert!(message.contains(expected), "{yaml}: {message}");
    }
    // A port without a number is allowed (it does not restrict the port).
    accepted(&ports("[{name: http}]"));
}

#[test]
fn pods_need_named_containers_with_images() {
    let cases = [
        ("{}", "spec.containers: is required"),
        (
            "{containers: [{name: app}]}",
            "spec.containers[0].image: is required; every container runs an image",
        ),
        (
            "{containers: [{image: app}]}",
            "spec.containers[0].name: is required",
        ),
        (
            "{containers: [{name: app, image: a}, {name: app, image: b}]}",
            "spec.containers[1].name: name \"app\" is also at spec.containers[0].name",
        ),
        (
            "{serviceAccountName: Hello, containers: [{name: app, image: a}]}",
            "spec.serviceAccountName: \"Hello\" is not a DNS-1123 subdomain",
        ),
    ];
    for (spec, expected) in cases {
        let message = refusal(&pod(spec));
        assert!(message.contains(expected), "{spec}: {message}");
    }
    let status =
        refusal(&(pod("{containers: [{name: app, image: a}]}") + "status: {podIP: here}\n"));
    assert!(
        status.contains("status.podIP: \"here\" is not an IP address"),
        "{status}"
    );
}

#[test]
fn every_problem_of_an_object_is_reported_at_once() {
    let message = refusal(&slice(
        "",
        "endpoints: [{addresses: []}]\nports: [{protocol: HTTP}]\n",
    ));
    for field in [
        "addressType:",
        "endpoints[0].addresses:",
        "ports[0].protocol:",
    ] {
        assert!(message.contains(field), "{field} in {message}");
    }
}

#[test]
fn dual_stack_cluster_ips_are_addresses_and_start_with_cluster_ip() {
    accepted(&service(
        "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, \"fd00:96::10\"], ports: [{port: 80}]}",
    ));
    let mismatch = refusal(&service(
        "{clusterIP: 10.96.0.10, clusterIPs: [\"fd00:96::10\"], ports: [{port: 80}]}",
    ));
    assert!(
        mismatch.contains("spec.clusterIPs[0]: \"fd00:96::10\" must be the same as spec.clusterIP"),
        "{mismatch}"
    );
    let bad = refusal(&service(
        "{clusterIPs: [10.96.0.10, fd00::zz], ports: [{port: 80}]}",
    ));
    assert!(
        bad.contains("spec.clusterIPs[1]: \"fd00::zz\" is not an IP address"),
        "{bad}"
    );
}
