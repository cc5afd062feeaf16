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
