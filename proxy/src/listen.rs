//! The one accept loop every listener runs: each connection on its own task
//! holding a drain [`Watch`], accept errors backed off, counted and logged at
//! most once a second, at most `max_connections` held at once (more are
//! accepted and closed at once, counted), and the listening socket closed
//! when the drain starts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::drain::Watch;
use crate::metrics::ListenerMetrics;
use crate::woken::when_woken;

/// The first pause after a failed accept; doubled on each further failure.
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one "accept failed" line per listener per this period.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// A listening socket on `addr` (as `TcpListener::bind` makes one, with
/// the same backlog), IPv6-only when `addr` is IPv6 so that an IPv4 and an
/// IPv6 listener can share a port.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Whether binding failed because the host has no IPv6 (disabled in the
/// kernel, or no such address).
pub fn no_ipv6(error: &std::io::Error) -> bool {
    // EAFNOSUPPORT on Linux: std has no ErrorKind for it.
    const ADDRESS_FAMILY_NOT_SUPPORTED: i32 = 97;
    error.kind() == std::io::ErrorKind::AddrNotAvailable
        || error.raw_os_error() == Some(ADDRESS_FAMILY_NOT_SUPPORTED)
}

/// Accepts connections until the drain starts, then closes the listening
/// socket so new connects are refused at once (a client's proxy then tries
/// another endpoint). `serve` runs each connection; at the drain's deadline
/// whatever it still does is dropped.
pub async fn accept<F, Fut>(
    listener: TcpListener,
    direction: &'static str,
    metrics: Option<ListenerMetrics>,
    max_connections: usize,
    mut watch: Watch,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = BACKOFF_START;
    let mut log = Throttled::default();
    let mut over_limit_log = Throttled::default();
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            biased;
            () = watch.draining() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = BACKOFF_START;
                // Accepting and closing (rather than leaving it in the
                // backlog) tells the client at once, and keeps the backlog
                // free for when a slot opens.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(tcp);
                    if let Some(metrics) = &metrics {
                        metrics.over_limit(direction);
                    }
                    if let Some(suppressed) = over_limit_log.allow() {
                        tracing::warn!(
                            direction,
                            %peer,
                            max_connections,
                            suppressed,
                            "connection refused: the listener holds TRELLIS_MAX_CONNECTIONS connections"
                        );
                    }
                    continue;
                };
                // Boxed: the connection's future is large, and `select!`
                // would otherwise hold it twice (as captured, and pinned).
                let connection = Box::pin(serve(tcp, peer, watch.clone()));
                let mut deadline = watch.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    // The deadline is looked at only when the drain's
                    // phase changes, not on each wake-up of the connection.
                    tokio::select! {
                        biased;
                        () = connection => {}
                        () = when_woken(deadline.forced()) => {}
                    }
                });
            }
            Err(error) => {
                // EMFILE, ENFILE, ENOBUFS…: the pending connection stays in
                // the backlog and the next accept fails the same way at once.
                // Pause, or the loop spins a core and floods the log.
                if let Some(metrics) = &metrics {
                    metrics.accept_error(direction);
                }
                match log.allow() {
                    Some(suppressed) => tracing::warn!(
                        direction,
                        %error,
                        suppressed,
                        retry_in = ?backoff,
                        "accept failed"
                    ),
                    None => {
                        if let Some(metrics) = &metrics {
                            metrics.accept_log_suppressed(direction);
                        }
                    }
                }
                tokio::select! {
                    biased;
                    () = watch.draining() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    drop(listener);
    tracing::debug!(direction, "listener closed for the drain");
}

/// Allows one log line per period ([`LOG_EVERY`] by default) and counts the rest.
pub(crate) struct Throttled {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for Throttled {
    fn default() -> Self {
        Self::every(LOG_EVERY)
    }
}

impl Throttled {
    pub(crate) fn every(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be written.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// [`Throttled`] per kind of line: one kind's flood does not hide another's.
pub(crate) struct ThrottledByKind {
    every: Duration,
    kinds: std::sync::Mutex<std::collections::HashMap<&'static str, Throttled>>,
}

impl ThrottledByKind {
    pub(crate) fn every(every: Duration) -> Self {
        Self {
            every,
            kinds: Default::default(),
        }
    }

    /// `Some(lines of this kind suppressed since its last one)` when a line may be written.
    pub(crate) fn allow(&self, kind: &'static str) -> Option<u64> {
        let mut kinds = self.kinds.lock().ok()?;
        kinds
            .entry(kind)
            .or_insert_with(|| Throttled::every(self.every))
            .allow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_of_the_others() {
        let mut log = Throttled::default();
        assert_eq!(log.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(log.allow(), None);
        }
        log.last = log.last.map(|t| t - LOG_EVERY);
        assert_eq!(log.allow(), Some(1000));
    }

    #[test]
    fn each_kind_has_its_own_budget() {
        let log = ThrottledByKind::every(Duration::from_secs(60));
        assert_eq!(log.allow("timeout"), Some(0));
        assert_eq!(log.allow("timeout"), None);
        assert_eq!(log.allow("not_tls"), Some(0), "another kind still logs");
        assert_eq!(log.allow("timeout"), None);
    }
}
