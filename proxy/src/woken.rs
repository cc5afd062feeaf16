//! A future polled only when it asked to be.
//!
//! A connection's task wakes for every frame and every request, and
//! `select!` polls each of its branches every time. The branches that
//! watch for rare events (the drain, a timeout, a keep-alive PING due in
//! 20 s) would re-check their timers and channels on each of those wake-ups:
//! in the profile that was a few hundred instructions per request per
//! branch. Wrapped in [`WhenWoken`], such a branch costs one atomic swap
//! per wake-up of the task until its own waker fires.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// `future`, polled only after its waker was woken (and once at first).
    pub struct WhenWoken<F> {
        #[pin]
        future: F,
        signal: Arc<Signal>,
    }
}

/// The waker given to the inner future: it marks the future as due, then
/// wakes the task that polls the wrapper.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

pub fn when_woken<F: Future>(future: F) -> WhenWoken<F> {
    WhenWoken {
        future,
        signal: Arc::new(Signal {
            // The first poll goes through: the future has not said what
            // it waits for yet.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }),
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read, so a wake in between is not lost.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.signal.clone());
        this.future.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn polled_when_its_waker_fires_and_not_otherwise() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = {
            let polls = polls.clone();
            let mut sleep = Box::pin(tokio::time::sleep(Duration::from_millis(50)));
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                sleep.as_mut().poll(cx)
            })
        };
        let mut rare = std::pin::pin!(when_woken(counted));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let busy = tokio::spawn(async move {
            for _ in 0..100 {
                tx.send(()).unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut wake_ups = 0;
        loop {
            tokio::select! {
                biased;
                () = rare.as_mut() => break,
                Some(()) = rx.recv() => wake_ups += 1,
            }
        }
        busy.await.unwrap();
        assert_eq!(wake_ups, 100, "the busy branch woke the task");
        // Once at first, once when the sleep fired: never for the other 100.
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
