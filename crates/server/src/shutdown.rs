//! The end of a grace period: after a shutdown signal the server stops accepting and lets
//! running requests finish; when the grace period is over, `CancelSignal` fires and every
//! request and job still running ends (dropping its engine stream, which frees its KV).

use tokio::sync::watch;

/// Fires once, when work still running must stop. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CancelSignal {
    rx: watch::Receiver<bool>,
}

/// Fires the `CancelSignal`s made with it.
#[derive(Debug)]
pub struct CancelTrigger {
    tx: watch::Sender<bool>,
}

pub fn cancel_channel() -> (CancelTrigger, CancelSignal) {
    let (tx, rx) = watch::channel(false);
    (CancelTrigger { tx }, CancelSignal { rx })
}

impl CancelTrigger {
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }
}

impl CancelSignal {
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once cancelled; never, if the trigger is gone without firing.
    pub async fn cancelled(&mut self) {
        if self.rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_once_for_every_clone_and_never_without_the_trigger() {
        let (trigger, signal) = cancel_channel();
        let mut a = signal.clone();
        let waiter = tokio::spawn(async move { a.cancelled().await });
        assert!(!signal.is_cancelled());
        trigger.cancel();
        waiter.await.unwrap();
        assert!(signal.is_cancelled());

        let (trigger, mut signal) = cancel_channel();
        drop(trigger);
        let r = tokio::time::timeout(Duration::from_millis(20), signal.cancelled()).await;
        assert!(r.is_err(), "a dropped trigger must not cancel");
    }
}
