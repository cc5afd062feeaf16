use std::collections::BTreeMap;

use trellis_proto::discovery::{CircuitBreaker, Resilience};

use super::*;
use crate::model::ObjectKey;

fn hello(addresses: &[&str], resilience: Option<Resilience>) -> ServiceEndpoints {
    let endpoints: BTreeMap<String, Endpoint> = addresses
        .iter()
        .map(|ip| {
            let endpoint = Endpoint {
                ip: ip.to_string(),
                port: 8080,
                weight: 1,
                ..Endpoint::default()
            };
            (format!("{ip}:8080"), endpoint)
        })
        .collect();
    ServiceEndpoints {
        service: ObjectKey::new("default", "hello"),
        port: 8080,
        resilience,
        endpoints,
    }
}

fn breaker(max_requests: u32) -> Option<Resilience> {
    Some(Resilience {
        outlier_detection: None,
        circuit_breaker: Some(CircuitBreaker {
            max_requests: Some(max_requests),
        }),
    })
}

fn only_snapshot(updates: &[EndpointUpdate]) -> Option<&Snapshot> {
    match updates {
        [EndpointUpdate {
            kind: Some(Kind::Snapshot(snapshot)),
        }] => Some(snapshot),
        _ => None,
    }
}

#[test]
fn the_first_message_is_a_snapshot_with_the_services_resilience() {
    let current = hello(&["127.0.0.3"], breaker(10));
    let updates = diff(None, Some(&current));
    let snapshot = only_snapshot(&updates).expect("one Snapshot");
    let info = snapshot.service.as_ref().unwrap();
    assert_eq!((info.name.as_str(), info.port), ("hello", 8080));
    assert_eq!(info.resilience, breaker(10));
    assert_eq!(snapshot.endpoints.len(), 1);
}

#[test]
fn a_changed_policy_starts_over_with_a_snapshot() {
    let sent = hello(&["127.0.0.3", "127.0.0.4"], breaker(10));
    let current = hello(&["127.0.0.3", "127.0.0.4"], breaker(20));
    let updates = diff(Some(&sent), Some(&current));
    let snapshot = only_snapshot(&updates).expect("a Snapshot, not an Add/Remove");
    assert_eq!(snapshot.service.as_ref().unwrap().resilience, breaker(20));
    assert_eq!(snapshot.endpoints.len(), 2, "the complete set");

    let removed = hello(&["127.0.0.3", "127.0.0.4"], None);
    let updates = diff(Some(&current), Some(&removed));
    let snapshot = only_snapshot(&updates).expect("removing the policy starts over too");
    assert_eq!(snapshot.service.as_ref().unwrap().resilience, None);
}

#[test]
fn an_unchanged_service_gets_only_what_changed() {
    let sent = hello(&["127.0.0.3", "127.0.0.4"], breaker(10));
    let current = hello(&["127.0.0.3", "127.0.0.5"], breaker(10));
    let kinds: Vec<_> = diff(Some(&sent), Some(&current))
        .into_iter()
        .map(|u| u.kind)
        .collect();
    assert!(
        matches!(&kinds[..], [Some(Kind::Add(a)), Some(Kind::Remove(r))]
            if a.endpoints[0].ip == "127.0.0.5" && r.addresses == ["127.0.0.4:8080"]),
        "{kinds:?}"
    );
    assert!(diff(Some(&current), Some(&current)).is_empty());
}

#[test]
fn endpoints_after_no_endpoints_come_as_a_snapshot_with_the_service_info() {
    let empty = hello(&[], breaker(10));
    let updates = diff(None, Some(&empty));
    assert!(
        matches!(&updates[..], [EndpointUpdate { kind: Some(Kind::NoEndpoints(n)) }] if n.exists),
        "{updates:?}"
    );
    // A policy change while there is nothing to balance over waits.
    let still_empty = hello(&[], breaker(20));
    assert!(diff(Some(&empty), Some(&still_empty)).is_empty());

    let back = hello(&["127.0.0.3"], breaker(20));
    let updates = diff(Some(&still_empty), Some(&back));
    let snapshot =
        only_snapshot(&updates).expect("a Snapshot, so the client learns the ServiceInfo");
    assert_eq!(snapshot.service.as_ref().unwrap().resilience, breaker(20));
}
