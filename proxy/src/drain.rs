//! Graceful shutdown: signal, wait until every connection is done, deadline,
//! force.
//!
//! Listeners stop accepting when the drain starts; each connection holds a
//! [`Watch`] and finishes what it has in flight (HTTP servers call hyper's
//! `graceful_shutdown`); the drain is complete when every `Watch` is gone.
//! At the deadline the remaining connections are cut.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    Draining,
    /// The deadline passed: whatever is left ends now.
    Forced,
}

/// The drain of one proxy (or of one of its listeners' groups).
pub struct Drain {
    phase: watch::Sender<Phase>,
    /// Only [`Watch`]es hold receivers of this channel, so it closes when
    /// the last connection is done.
    held: watch::Sender<()>,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Connections (and accept loops) still open at the deadline, and cut.
    pub cut: usize,
    pub elapsed: Duration,
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            phase: watch::Sender::new(Phase::Serving),
            held: watch::Sender::new(()),
        })
    }

    /// A handle for one accept loop or connection; the drain waits for it.
    pub fn watch(&self) -> Watch {
        Watch {
            phase: self.phase.subscribe(),
            _held: self.held.subscribe(),
        }
    }

    /// Starts draining (once; later calls change nothing). Returns whether
    /// this call started it.
    pub fn start(&self) -> bool {
        self.phase.send_if_modified(|phase| {
            let serving = *phase == Phase::Serving;
            if serving {
                *phase = Phase::Draining;
            }
            serving
        })
    }

    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() != Phase::Serving
    }

    /// Resolves once the drain has started (by anyone).
    pub async fn started(&self) {
        let mut phase = self.phase.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = phase.wait_for(|p| *p != Phase::Serving).await;
    }

    /// Starts the drain if needed, waits until every [`Watch`] is dropped or
    /// `deadline` passed, then cuts what is left.
    pub async fn run(&self, deadline: Duration) -> Drained {
        let started = tokio::time::Instant::now();
        self.start();
        let finished = tokio::time::timeout(deadline, self.held.closed()).await;
        let cut = if finished.is_ok() {
            0
        } else {
            let cut = self.held.receiver_count();
            self.phase.send_replace(Phase::Forced);
            cut
        };
        Drained {
            cut,
            elapsed: started.elapsed(),
        }
    }
}

/// What a connection or accept loop watches; dropping it tells the drain
/// that its holder is done.
#[derive(Clone)]
pub struct Watch {
    phase: watch::Receiver<Phase>,
    _held: watch::Receiver<()>,
}

impl Watch {
    /// Resolves when the drain starts. Never resolves when the [`Drain`] is
    /// gone without draining (a proxy dropped in a test keeps its
    /// connections, as it always did).
    pub async fn draining(&mut self) {
        self.until(Phase::Draining).await;
    }

    /// Resolves when the drain's deadline has passed.
    pub async fn forced(&mut self) {
        self.until(Phase::Forced).await;
    }

    async fn until(&mut self, phase: Phase) {
        if self.phase.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_every_watch_then_completes() {
        let drain = Drain::new();
        let mut watch = drain.watch();
        let connection = tokio::spawn(async move {
            watch.draining().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let drained = drain.run(Duration::from_secs(5)).await;
        assert_eq!(drained.cut, 0);
        assert!(drained.elapsed >= Duration::from_millis(100), "{drained:?}");
        assert!(connection.is_finished());
        assert!(!drain.start(), "a second start changes nothing");
    }

    #[tokio::test]
    async fn at_the_deadline_what_is_left_is_forced() {
        let drain = Drain::new();
        let mut watch = drain.watch();
        let connection = tokio::spawn(async move { watch.forced().await });
        let drained = drain.run(Duration::from_millis(50)).await;
        assert_eq!(drained.cut, 1);
        tokio::time::timeout(Duration::from_secs(1), connection)
            .await
            .expect("the forced connection ends")
            .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_drain_never_signals() {
        let drain = Drain::new();
        let mut watch = drain.watch();
        drop(drain);
        let waited = tokio::time::timeout(Duration::from_millis(50), watch.draining()).await;
        assert!(waited.is_err());
    }
}
