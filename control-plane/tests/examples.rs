//! Every manifest in `examples/` loads through the local source with no
//! error, so the examples never rot.

use trellis_control_plane::source::local::LocalSource;
use trellis_control_plane::store::Store;

#[test]
fn every_example_directory_loads_cleanly() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap().flatten() {
        if !entry.path().is_dir() {
            continue;
        }
        let store = Store::new("cluster.local");
        let mut source = LocalSource::new(entry.path(), store.clone());
        source.reload().unwrap();
        let errors = source.errors().borrow().clone();
        assert!(errors.is_empty(), "{}: {errors:?}", entry.path().display());
        assert!(
            store.counts().services > 0,
            "{} defines no Service",
            entry.path().display()
        );
        checked += 1;
    }
    assert!(checked > 0, "no example directories found");
}

#[test]
fn the_local_example_routes_hello() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local");
    let store = Store::new("cluster.local");
    LocalSource::new(dir, store.clone()).reload().unwrap();
    let routes = store.routes("hello.default.svc.cluster.local:8080", "default");
    assert_eq!(routes.rules.len(), 2, "the A/B rule and the split");
    assert_eq!(
        routes.rules[0].backends[0].name, "hello-v2",
        "the header match comes first"
    );
    let fault = routes.rules[1]
        .fault
        .as_ref()
        .expect("fault filter resolved");
    assert_eq!((fault.delay_ms, fault.delay_percent), (100, 1.0));
    let hello = store
        .resolve("hello.default.svc.cluster.local:8080")
        .unwrap();
    assert_eq!(hello.endpoints.len(), 2);
}
