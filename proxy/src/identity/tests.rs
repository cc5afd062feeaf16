//! The certificate manager, with certificates from a test CA and an in-test Identity server.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};
use trellis_proto::identity::identity_server::{Identity, IdentityServer};
use trellis_proto::identity::CertifyResponse;

use super::*;
use crate::tls::test_ca::{spiffe, unix_now, TestCa};

/// A controller that certifies CSRs with a test CA, for a fixed lifetime.
struct FakeController {
    ca: TestCa,
    lifetime_secs: i64,
    token: &'static str,
    /// When set, every request fails as if the controller were down.
    refuse: AtomicBool,
    calls: AtomicUsize,
}

impl FakeController {
    fn new(lifetime_secs: i64, token: &'static str) -> Arc<Self> {
        Arc::new(Self {
            ca: TestCa::new("controller"),
            lifetime_secs,
            token,
            refuse: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        })
    }
}

#[tonic::async_trait]
impl Identity for FakeController {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        self.calls.fetch_add(1, SeqCst);
        let request = request.into_inner();
        if self.refuse.load(SeqCst) {
            return Err(Status::unavailable("the controller is down"));
        }
        if request.token != self.token {
            return Err(Status::permission_denied("invalid token"));
        }
        let now = unix_now();
        let not_after = now + self.lifetime_secs;
        Ok(Response::new(CertifyResponse {
            chain_der: self.ca.sign(&request.csr_der, now - 60, not_after),
            trust_anchors_der: self.ca.trust_anchors(),
            valid_until_unix: not_after,
        }))
    }
}

/// Serves `controller` on 127.0.0.1 and returns a client for it.
async fn start(controller: Arc<FakeController>) -> IdentityClient<Channel> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(IdentityServer::from_arc(controller))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    IdentityClient::new(
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    )
}

fn serial(leaf_der: &[u8]) -> Vec<u8> {
    x509_parser::parse_x509_certificate(leaf_der)
        .unwrap()
        .1
        .raw_serial()
        .to_vec()
}

#[tokio::test]
async fn ready_waits_for_a_certificate() {
    let ca = TestCa::new("mesh");
    let manager = IdentityManager::new(spiffe("frontend"));
    assert!(manager.current().is_none());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), manager.ready())
            .await
            .is_err(),
        "ready without a certificate"
    );

    let mut changes = manager.subscribe();
    let installer = {
        let (manager, configs) = (manager.clone(), ca.configs(&spiffe("frontend")));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            manager.install(configs);
        })
    };
    tokio::time::timeout(Duration::from_secs(5), manager.ready())
        .await
        .expect("not ready after install");
    installer.await.unwrap();
    assert_eq!(manager.current().unwrap().identity, spiffe("frontend"));
    assert!(changes.has_changed().unwrap(), "subscribers were not told");
    assert!(changes.borrow_and_update().is_some());
}

#[tokio::test]
async fn an_expired_certificate_is_never_handed_out() {
    let ca = TestCa::new("mesh");
    let manager = IdentityManager::new(spiffe("frontend"));
    let now = unix_now();
    manager.install(ca.configs_valid(&spiffe("frontend"), now - 60, now + 2));
    let not_after = manager.current().expect("fresh certificate").not_after;

    let deadline = Instant::now() + Duration::from_secs(5);
    while manager.current().is_some() {
        assert!(
            Instant::now() < deadline,
            "certificate still handed out 5 s after install"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        SystemTime::now() >= not_after,
        "withdrawn before it expired"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), manager.ready())
            .await
            .is_err(),
        "ready with an expired certificate"
    );
}

#[tokio::test]
async fn run_renews_before_expiry_and_stops_when_the_controller_is_gone() {
    let controller = FakeController::new(3, "secret");
    let client = start(controller.clone()).await;
    let manager = IdentityManager::new(spiffe("frontend"));
    let mut changes = manager.subscribe();
    let run = tokio::spawn(
        manager
            .clone()
            .run(client, TokenSource::Static("secret".into())),
    );

    // The first certificate and at least two renewals, each installed while
    // its predecessor was still valid.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut issued: Vec<Arc<TlsConfigs>> = Vec::new();
    while issued.len() < 3 {
        tokio::time::timeout_at(deadline, changes.changed())
            .await
            .unwrap_or_else(|_| panic!("only {} certificate(s) within 8 s", issued.len()))
            .unwrap();
        let configs = changes
            .borrow_and_update()
            .clone()
            .expect("certificate withdrawn while the controller works");
        if let Some(previous) = issued.last() {
            assert!(
                SystemTime::now() < previous.not_after,
                "renewed only after expiry"
            );
        }
        assert_eq!(configs.identity, spiffe("frontend"));
        issued.push(configs);
    }
    let serials: HashSet<_> = issued.iter().map(|c| serial(&c.leaf_der)).collect();
    assert_eq!(
        serials.len(),
        issued.len(),
        "a renewal reused a certificate"
    );
    assert!(
        issued.windows(2).all(|w| w[0].not_after < w[1].not_after),
        "renewals did not extend the lifetime"
    );

    // The controller goes away: the last certificate serves until it
    // expires, then the proxy has none.
    controller.refuse.store(true, SeqCst);
    let mut last = issued.last().cloned();
    tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            changes.changed().await.unwrap();
            match changes.borrow_and_update().clone() {
                Some(configs) => last = Some(configs),
                None => break,
            }
        }
    })
    .await
    .expect("expiry was not published");
    assert!(
        SystemTime::now() >= last.unwrap().not_after,
        "withdrawn before expiry"
    );
    assert!(manager.current().is_none());
    run.abort();
}

#[tokio::test]
async fn run_retries_and_rereads_the_token_file() {
    let controller = FakeController::new(3600, "secret");
    let client = start(controller.clone()).await;
    let path = std::env::temp_dir().join(format!(
        "trellis-token-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, "stale\n").unwrap();
    let manager = IdentityManager::new(spiffe("frontend"));
    let run = tokio::spawn(manager.clone().run(client, TokenSource::File(path.clone())));

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        manager.current().is_none(),
        "certified with a refused token"
    );
    assert!(
        controller.calls.load(SeqCst) >= 2,
        "no retry after a refusal"
    );

    // The token rotates on disk; the next attempt must read the new one.
    std::fs::write(&path, "secret\n").unwrap();
    tokio::time::timeout(Duration::from_secs(5), manager.ready())
        .await
        .expect("not certified after the token file was fixed");
    assert_eq!(manager.current().unwrap().identity, spiffe("frontend"));
    run.abort();
    let _ = std::fs::remove_file(path);
}

#[test]
fn renewal_is_at_about_seventy_percent_of_the_lifetime() {
    for _ in 0..200 {
        let delay = refresh_delay(Duration::from_secs(4));
        assert!(
            (Duration::from_millis(2660)..=Duration::from_millis(2940)).contains(&delay),
            "{delay:?}"
        );
        let day = Duration::from_secs(24 * 3600);
        let delay = refresh_delay(day);
        assert!(
            (day.mul_f64(0.665)..=day.mul_f64(0.735)).contains(&delay),
            "{delay:?}"
        );
    }
    // Clamped: at least a second, but before expiry; at most a day.
    assert_eq!(
        refresh_delay(Duration::from_secs(1)),
        Duration::from_millis(900)
    );
    assert_eq!(
        refresh_delay(Duration::from_secs(100 * 24 * 3600)),
        MAX_REFRESH
    );
    assert_eq!(refresh_delay(Duration::from_millis(10)), BACKOFF_MIN);
}

#[test]
fn backoff_doubles_up_to_ten_seconds_and_resets() {
    let mut backoff = Backoff::default();
    let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
    assert!(
        (Duration::from_millis(160)..=Duration::from_millis(240)).contains(&delays[0]),
        "{delays:?}"
    );
    assert!(
        (Duration::from_millis(320)..=Duration::from_millis(480)).contains(&delays[1]),
        "{delays:?}"
    );
    assert!(delays.iter().all(|d| *d <= BACKOFF_MAX), "{delays:?}");
    assert!(delays[9] >= BACKOFF_MAX.mul_f64(0.8), "{delays:?}");
    backoff.reset();
    assert!(backoff.next_delay() <= Duration::from_millis(240));
}
