//! The controller as a library: readiness follows the CA's health; with
//! no peers (local mode) it leads.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_control_plane::controller::{Controller, ControllerConfig};
use trellis_control_plane::identity;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_expired_issuer_makes_the_controller_unready_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("manifests")).unwrap();
    let controller = Controller::start(ControllerConfig {
        leaf_lifetime: Duration::from_secs(60),
        ..ControllerConfig::local(dir.path(), [127, 0, 0, 1].into())
    })
    .await
    .unwrap();
    assert_eq!(
        get(controller.admin_addr, "/ready").await,
        (200, "ready\n".into())
    );

    // An issuer that expires in a second; the controller picks it up within a second.
    identity::rotate_issuer(dir.path(), Duration::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = get(controller.admin_addr, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("issuer certificate is not valid now") && body.contains("rotate-issuer"),
        "{body}"
    );

    // A fresh issuer makes it ready again, without a restart.
    identity::rotate_issuer(dir.path(), Duration::from_secs(3600)).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(controller.admin_addr, "/ready").await.0, 200);
}

#[tokio::test]
async fn a_local_controller_has_no_peers_and_always_leads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("manifests")).unwrap();
    let controller = Controller::start(ControllerConfig::local(dir.path(), [127, 0, 0, 1].into()))
        .await
        .unwrap();
    assert!(*controller.leadership.is_leader().borrow());
    let (status, metrics) = get(controller.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.lines().any(|l| l == "trellis_controller_leader 1"),
        "{metrics}"
    );
}
