//! The proxy's limits against hostile or merely numerous clients: the
//! connection limit refuses what is over it and serves the rest, garbage
//! and half-open TLS on the inbound port are closed and counted by reason,
//! HTTP/2 streams are capped and a rapid-reset flood is cut off, and
//! 10,000 idle connections are held in bounded memory, which the next
//! 10,000 reuse once they close, and a request body streams through both
//! sidecars instead of being buffered whole. nextest runs each test in its own process,
//! which the resource limits and measurements below rely on.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::config::{HANDSHAKE_TIMEOUT, HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
use trellis_tests::*;

/// Whether the server closed `tcp` within `within` (a read returned 0 or failed).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once_and_the_others_are_served() {
    let mesh = HelloMesh::start_with_proxy_env(vec![(MAX_CONNECTIONS, "3".into())]).await;
    let outbound = mesh.client.outbound_addr;
    // The harness's own client may still hold a pooled connection: open
    // until the sidecar refuses, then some more.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let mut tcp = TcpStream::connect(outbound).await.expect("connect");
        if closed_within(&mut tcp, Duration::from_millis(300)).await {
            refused += 1;
        } else {
            held.push(tcp);
        }
    }
    assert!(
        held.len() <= 3,
        "{} connections held over a limit of 3",
        held.len()
    );
    assert!(refused >= 5, "only {refused} of 8 refused");
    let counted = metric(
        mesh.client.admin_addr,
        "trellis_connections_over_limit_total",
        &[("direction", "outbound")],
    )
    .await;
    assert!(
        counted >= f64::from(refused),
        "{counted} counted, {refused} refused"
    );
    // A connection within the limit is served as ever.
    let authority = mesh.authority();
    let first = held.first_mut().expect("one connection held");
    first
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // When the held ones close, new clients get their slots.
    drop(held);
    let client = mesh.http1();
    eventually(Duration::from_secs(5), "a new client is served", || async {
        client.version(&authority).await
    })
    .await;
}

#[tokio::test]
async fn garbage_and_half_open_tls_on_the_inbound_port_are_closed_and_counted_by_reason() {
    let mesh = HelloMesh::start_with_proxy_env(vec![(HANDSHAKE_TIMEOUT, "1s".into())]).await;
    let (_, hello) = &mesh.hello[0];
    let (inbound, admin) = (hello.inbound_addr, hello.admin_addr);
    let failures = |reason: &'static str| async move {
        metric(
            admin,
            "trellis_tls_handshake_failures_total",
            &[("direction", "inbound"), ("reason", reason)],
        )
        .await
    };
    let before = (failures("not_tls").await, failures("timeout").await);

    // A well-behaved client keeps being served meanwhile.
    let requests = RequestLoop::start(mesh.http1(), &mesh.authority());
    // A TLS record header, then bytes that are no handshake message.
    let mut garbage = TcpStream::connect(inbound).await.unwrap();
    let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    record.extend(std::iter::repeat_n(0xAB, 0x40));
    garbage.write_all(&record).await.unwrap();
    // A record header that promises a ClientHello which never comes.
    let mut half_open = TcpStream::connect(inbound).await.unwrap();
    half_open
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut garbage, Duration::from_secs(2)).await,
        "garbage TLS is closed at once"
    );
    assert!(
        closed_within(&mut half_open, Duration::from_secs(3)).await,
        "half-open TLS is closed by the 1 s handshake timeout"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let answers = requests.stop().await;
    assert!(
        !answers.is_empty() && answers.iter().all(Result::is_ok),
        "every request of the well-behaved client succeeded: {answers:?}"
    );
    let after = (failures("not_tls").await, failures("timeout").await);
    assert!(
        after.0 > before.0,
        "not_tls counted: {before:?} → {after:?}"
    );
    assert!(
        after.1 > before.1,
        "timeout counted: {before:?} → {after:?}"
    );
}

/// Opens `count` connections to `addr` from a child process (this one's
/// open-file limit is the sidecar's), each sending the start of a request
/// head; they stay open until the child's stdin closes.
fn hold_connections(addr: std::net::SocketAddr, count: usize) -> std::process::Child {
    const SCRIPT: &str = r#"
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port = sys.argv[2].rsplit(":", 1)
held = []
for i in range(int(sys.argv[1])):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET / HTTP/1.1\r\nHost: hello.default.svc.cluster.local\r\n")
    held.append(s)
    # Paced within the sidecar's listen backlog: a SYN beyond it waits
    # a second for its retransmission.
    if i % 100 == 99:
        time.sleep(0.02)
print("held", len(held), flush=True)
sys.stdin.read()
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT, &count.to_string(), &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the child's report");
    assert_eq!(
        line.trim(),
        format!("held {count}"),
        "the child opened them all"
    );
    child
}

/// One thread, as a sidecar runs by default (TRELLIS_WORKER_THREADS=1).
#[tokio::test]
async fn ten_thousand_idle_connections_are_held_in_bounded_memory_reused_after_they_close() {
    const CONNECTIONS: usize = 10_000;
    let fds = raise_fd_limit();
    assert!(
        fds > CONNECTIONS as u64 + 1_000,
        "RLIMIT_NOFILE hard limit {fds} is too low"
    );
    let mesh = HelloMesh::start_with_proxy_env(vec![
        (HEADER_READ_TIMEOUT, "60s".into()),
        (HANDSHAKE_TIMEOUT, "60s".into()),
    ])
    .await;
    let (outbound, admin) = (mesh.client.outbound_addr, mesh.client.admin_addr);
    let authority = mesh.authority();
    let client = mesh.http1();
    let open = || {
        metric(
            admin,
            "trellis_tcp_open_connections",
            &[("direction", "outbound")],
        )
    };
    client.version(&authority).await.expect("served before");
    let before = rss_kib();

    // Opens them all, checks a normal client is served meanwhile, closes
    // them, and waits until the sidecar has too: (time, RSS with them, RSS after).
    let flood = || async {
        let started = Instant::now();
        let mut holder =
            tokio::task::spawn_blocking(move || hold_connections(outbound, CONNECTIONS))
                .await
                .expect("the child holds the connections");
        eventually(
            Duration::from_secs(10),
            "the sidecar holds them all",
            || async {
                let n = open().await;
                if n >= CONNECTIONS as f64 {
                    Ok(n)
                } else {
                    Err(format!("{n} open"))
                }
            },
        )
        .await;
        let elapsed = started.elapsed();
        let with = rss_kib();
        client
            .version(&authority)
            .await
            .expect("served with 10,000 idle connections");
        drop(holder.stdin.take());
        tokio::task::spawn_blocking(move || holder.wait())
            .await
            .expect("join")
            .expect("the child exits");
        eventually(
            Duration::from_secs(10),
            "the sidecar closes them",
            || async {
                let n = open().await;
                if n < 10.0 {
                    Ok(n)
                } else {
                    Err(format!("{n} open"))
                }
            },
        )
        .await;
        client.version(&authority).await.expect("served after");
        (elapsed, with, rss_kib())
    };
    let (elapsed, with, after) = flood().await;
    let per_connection = with.saturating_sub(before) as f64 / CONNECTIONS as f64;
    println!(
        "{CONNECTIONS} idle connections held in {elapsed:?}: RSS {before} KiB before, {with} KiB with \
         ({per_connection:.1} KiB per connection), {after} KiB after they closed"
    );
    let (_, again, after_again) = flood().await;
    println!("a second flood: RSS {again} KiB with, {after_again} KiB after");
    assert!(
        per_connection < 64.0,
        "{per_connection:.1} KiB per idle connection (bounded: a task, a socket and the head buffers)"
    );
    // The allocator keeps freed memory for reuse rather than handing it
    // back to the system: what the first flood freed must serve the
    // second, so floods do not add up.
    let grown = with.saturating_sub(before);
    assert!(
        again <= with + grown / 3,
        "memory reused after close: before {before}, first flood {with}, second {again} KiB"
    );
    assert!(
        after_again <= after + grown / 3,
        "no growth across floods: after the first {after}, after the second {after_again} KiB"
    );
}

/// An HTTP/2 (prior knowledge) connection to the outbound listener, raw.
async fn raw_h2(
    outbound: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    (client, tokio::spawn(connection))
}

#[tokio::test]
async fn http2_streams_are_capped_and_a_rapid_reset_flood_gets_goaway_while_others_are_served() {
    let mesh = HelloMesh::start_with_proxy_env(vec![(
        trellis_proxy::config::MAX_CONCURRENT_STREAMS,
        "8".into(),
    )])
    .await;
    let outbound = mesh.client.outbound_addr;
    let authority = mesh.authority();
    let request = || {
        http::Request::get(format!("http://{authority}/"))
            .body(())
            .unwrap()
    };

    let (client, _connection) = raw_h2(outbound).await;
    let mut client = client.ready().await.expect("ready");
    // The sidecar's SETTINGS have come once a first answer has.
    let (response, _) = client.send_request(request(), true).expect("send");
    assert_eq!(response.await.expect("response").status(), 200);
    assert_eq!(
        client.current_max_send_streams(),
        8,
        "the sidecar announces TRELLIS_MAX_CONCURRENT_STREAMS"
    );

    // HEADERS then RST_STREAM, as fast as the client can: the sidecar ends
    // the connection (GOAWAY) long before a thousand.
    let (flooder, flooding) = raw_h2(outbound).await;
    let mut flooder = flooder;
    let mut sent = 0;
    for _ in 0..1_000 {
        match flooder.clone().ready().await {
            Ok(ready) => flooder = ready,
            Err(_) => break,
        }
        let Ok((_, mut stream)) = flooder.send_request(request(), true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), flooding)
        .await
        .expect("the flooding connection ends")
        .expect("join");
    assert!(
        sent < 1_000 || ended.is_err(),
        "sent {sent}, connection ended with {ended:?}"
    );
    let error = ended.expect_err("the sidecar closed the flooding connection with an error");
    println!("rapid reset: {sent} streams opened and reset before the sidecar ended the connection: {error}");
    assert!(
        error.is_go_away()
            || error.is_io()
            || error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{error}"
    );

    // The well-behaved connection, and new clients, are served.
    let (response, _) = client.send_request(request(), true).expect("send");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(response.status(), 200);
    mesh.http1()
        .version(&authority)
        .await
        .expect("a new client is served");
}

/// An application that reads no request body until `open` turns true, then
/// reads it all and answers how many bytes came.
fn gated_reader(
    open: tokio::sync::watch::Receiver<bool>,
) -> impl FnMut(tokio::net::TcpListener, &str) {
    use http_body_util::BodyExt;
    move |listener, _version| {
        let open = open.clone();
        tokio::spawn(trellis_common::serve::serve(
            listener,
            move |request: http::Request<hyper::body::Incoming>| {
                let mut open = open.clone();
                async move {
                    let _ = open.wait_for(|open| *open).await;
                    let mut body = request.into_body();
                    let mut received = 0usize;
                    while let Some(Ok(frame)) = body.frame().await {
                        received += frame.data_ref().map_or(0, |d| d.len());
                    }
                    http::Response::new(trellis_proxy::http::full(format!("{received} bytes")))
                }
            },
        ));
    }
}

#[tokio::test]
async fn a_request_body_streams_through_both_sidecars_without_being_buffered_whole() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    const BODY: u64 = 128 * 1024 * 1024;
    let (open, gate) = tokio::sync::watch::channel(false);
    let mesh = HelloMesh::start_with_apps(gated_reader(gate)).await;
    let mut tcp = TcpStream::connect(mesh.client.outbound_addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: {BODY}\r\nConnection: close\r\n\r\n",
        mesh.authority()
    );
    tcp.write_all(head.as_bytes()).await.expect("send the head");
    let (mut reader, mut writer) = tcp.into_split();
    let sent = Arc::new(AtomicU64::new(0));
    let sending = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            while sent.load(Ordering::Relaxed) < BODY {
                writer.write_all(&chunk).await.expect("send the body");
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            writer
        })
    };
    // While the application reads nothing, what the client could send is
    // what the sockets and the sidecars' windows hold: each sidecar keeps at
    // most TRELLIS_MAX_BODY_IN_FLIGHT (1 MiB) of it, the kernel's socket
    // buffers a few MiB more. Buffering the body whole would take it all.
    let stalled = eventually(Duration::from_secs(10), "the upload stalls", || {
        let (sent, before) = (sent.clone(), sent.load(Ordering::Relaxed));
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = sent.load(Ordering::Relaxed);
            (after == before)
                .then_some(after)
                .ok_or(format!("{after} bytes sent, still moving"))
        }
    })
    .await;
    eprintln!("with the application not reading, the client got {stalled} bytes in");
    assert!(
        stalled < 48 * 1024 * 1024,
        "{stalled} bytes went in while nothing read them: the body is buffered, not streamed"
    );
    open.send_replace(true);
    let _writer = sending.await.expect("the whole body is sent");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(60), reader.read_to_string(&mut answer))
        .await
        .expect("an answer within 60 s")
        .expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&format!("{BODY} bytes")), "{answer}");
}
