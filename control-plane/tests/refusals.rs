//! The local source refuses an object the API server would refuse, naming
//! the file, the object and the field, and the last good version of the
//! file keeps serving.

use trellis_control_plane::source::local::LocalSource;
use trellis_control_plane::store::Store;

const AUTHORITY: &str = "hello.default.svc.cluster.local:8080";

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {ports: [{name: http, port: 8080}]}
";

const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-1, namespace: default, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
endpoints: [{addresses: [127.0.0.3]}, {addresses: [127.0.0.4]}]
ports: [{name: http, port: 8080}]
";

#[test]
fn refused_objects_name_the_field_and_the_last_good_version_serves() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hello.yaml");
    let store = Store::new("cluster.local");
    let mut source = LocalSource::new(dir.path(), store.clone());
    let errors = source.errors();
    let endpoints = |store: &Store| store.resolve(AUTHORITY).map(|e| e.endpoints.len());

    std::fs::write(&file, format!("{SERVICE}---\n{SLICE}")).unwrap();
    source.reload().unwrap();
    assert!(errors.borrow().is_empty(), "{:?}", errors.borrow());
    assert_eq!(endpoints(&store), Some(2));

    let broken = [
        (
            format!("{SERVICE}---\n{}", SLICE.replace("addressType: IPv4\n", "")),
            "EndpointSlice default/hello-1: addressType: is required",
        ),
        (
            format!(
                "{}---\n{SLICE}",
                SERVICE.replace("{ports: [{name: http, port: 8080}]}", "{}")
            ),
            "Service default/hello: spec.ports: is required",
        ),
    ];
    for (contents, refusal) in broken {
        std::fs::write(&file, &contents).unwrap();
        source.reload().unwrap();
        let reported: Vec<String> = errors.borrow().iter().map(|e| e.to_string()).collect();
        assert!(
            reported.len() == 1
                && reported[0].starts_with(&format!("{}: {refusal}", file.display())),
            "expected {refusal:?}, got {reported:#?}"
        );
        assert_eq!(
            endpoints(&store),
            Some(2),
            "the last good hello.yaml serves"
        );
    }

    std::fs::write(
        &file,
        format!(
            "{SERVICE}---\n{}",
            SLICE.replace(", {addresses: [127.0.0.4]}", "")
        ),
    )
    .unwrap();
    source.reload().unwrap();
    assert!(errors.borrow().is_empty(), "{:?}", errors.borrow());
    assert_eq!(endpoints(&store), Some(1), "the fixed file replaces it");
}

#[test]
fn namespaces_load_with_their_labels_and_a_name_the_api_server_refuses_is_refused() {
    use trellis_control_plane::model::{Object, ObjectKey};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.yaml");
    let store = Store::new("cluster.local");
    let mut source = LocalSource::new(dir.path(), store.clone());
    let errors = source.errors();

    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/inject: enabled}}\n",
    )
    .unwrap();
    source.reload().unwrap();
    assert!(errors.borrow().is_empty(), "{:?}", errors.borrow());
    let namespaces: Vec<_> = store
        .objects()
        .into_iter()
        .filter_map(|o| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(namespaces.len(), 1);
    assert_eq!(
        namespaces[0]
            .metadata
            .labels
            .get("trellis.dev/inject")
            .map(String::as_str),
        Some("enabled")
    );
    assert_eq!(
        store.objects()[0].key(),
        ObjectKey::cluster_scoped("shop"),
        "a Namespace lives in no namespace"
    );

    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: Shop_1}\n",
    )
    .unwrap();
    source.reload().unwrap();
    let message = errors
        .borrow()
        .first()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("shop.yaml")
            && message.contains("metadata.name")
            && message.contains("Shop_1"),
        "{message}"
    );
    assert_eq!(
        store.counts().namespaces,
        1,
        "the last good file keeps serving"
    );
}
