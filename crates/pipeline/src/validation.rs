//! Stage 7, the validation queue: outputs waiting to be checked, shared by every job of a
//! pipeline. Outputs on a job's critical path go first, then retries (someone is waiting
//! on them), then in order of arrival. Each item is tracked through its states; an item
//! whose submitter went away (its job finished or was cancelled) is dropped unrun.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;

use crate::llm::BoxFuture;
use crate::validators::Verdict;

/// Where an item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    Queued,
    Running,
    Passed,
    Failed,
    /// Its submitter no longer waited for it.
    Dropped,
}

/// How an item ranks: critical first, then retries, then arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidationPriority {
    pub critical: bool,
    pub attempt: usize,
}

/// What the queue has seen, for the trace and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueueStats {
    pub submitted: u64,
    pub queued: u64,
    pub running: u64,
    pub passed: u64,
    pub failed: u64,
    pub dropped: u64,
    pub max_depth: u64,
}

type Work = Box<dyn FnOnce() -> BoxFuture<'static, Verdict> + Send>;

struct Item {
    priority: ValidationPriority,
    seq: u64,
    index: usize,
    work: Work,
    reply: UnboundedSender<(usize, Verdict)>,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    // BinaryHeap pops the greatest: critical, then higher attempt, then lower seq.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.priority
            .critical
            .cmp(&other.priority.critical)
            .then(self.priority.attempt.cmp(&other.priority.attempt))
            .then(other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Item>,
    seq: u64,
    stats: QueueStats,
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
}

/// The queue, with `validators` runners pulling from it. Cheap to clone; the runners stop
/// when the last clone is dropped.
#[derive(Clone)]
pub struct ValidationQueue {
    inner: Arc<Inner>,
    _closer: Arc<Closer>,
}

/// Closes the queue when the last handle goes.
struct Closer(Arc<Inner>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.closed = true;
            s.heap.clear();
        }
        self.0.wake.notify_waiters();
    }
}

impl ValidationQueue {
    /// Starts the runners on the current tokio runtime.
    pub fn start(validators: usize) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        for _ in 0..validators.max(1) {
            let inner = inner.clone();
            tokio::spawn(async move { run(inner).await });
        }
        Self {
            _closer: Arc::new(Closer(inner.clone())),
            inner,
        }
    }

    /// Queues a check; its verdict is sent to `reply` tagged with `index`.
    pub fn submit(
        &self,
        priority: ValidationPriority,
        index: usize,
        reply: UnboundedSender<(usize, Verdict)>,
        work: impl FnOnce() -> BoxFuture<'static, Verdict> + Send + 'static,
    ) {
        let mut s = self.inner.state.lock().expect("queue lock");
        s.seq += 1;
        let seq = s.seq;
        s.heap.push(Item {
            priority,
            seq,
            index,
            work: Box::new(work),
            reply,
        });
        s.stats.submitted += 1;
        s.stats.queued += 1;
        s.stats.max_depth = s.stats.max_depth.max(s.stats.queued);
        drop(s);
        self.inner.wake.notify_one();
    }

    pub fn stats(&self) -> QueueStats {
        self.inner.state.lock().expect("queue lock").stats.clone()
    }
}

/// One runner: pops the best item, runs it, reports, until the queue closes.
async fn run(inner: Arc<Inner>) {
    loop {
        let notified = inner.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let mut s = inner.state.lock().expect("queue lock");
            if s.closed {
                return;
            }
            let item = s.heap.pop();
            if item.is_some() {
                s.stats.queued -= 1;
            }
            item
        };
        let Some(item) = next else {
            notified.await;
            continue;
        };
        if item.reply.is_closed() {
            inner.state.lock().expect("queue lock").stats.dropped += 1;
            continue;
        }
        inner.state.lock().expect("queue lock").stats.running += 1;
        // A check runs as its own task: if it panics (a bug reached by some output), that
        // item fails with the panic's message and this runner goes on serving every job.
        let verdict = match tokio::spawn((item.work)()).await {
            Ok(v) => v,
            Err(e) => Verdict::internal_failure(&crate::join_error_message(e)),
        };
        {
            let mut s = inner.state.lock().expect("queue lock");
            s.stats.running -= 1;
            if verdict.passed {
                s.stats.passed += 1;
            } else {
                s.stats.failed += 1;
            }
        }
        let _ = item.reply.send((item.index, verdict));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    fn verdict(passed: bool) -> Verdict {
        Verdict {
            passed,
            ..Verdict::default()
        }
    }

    #[tokio::test]
    async fn a_panicking_check_fails_its_item_and_the_runner_survives() {
        let q = ValidationQueue::start(1);
        let (tx, mut rx) = unbounded_channel();
        let p = ValidationPriority {
            critical: false,
            attempt: 0,
        };
        q.submit(p, 0, tx.clone(), || Box::pin(async { panic!("boom at 3") }));
        q.submit(p, 1, tx, || Box::pin(async { verdict(true) }));
        let (i, v) = rx.recv().await.unwrap();
        assert_eq!(i, 0);
        assert!(!v.passed && !v.executed);
        assert!(v.feedback.contains("boom at 3"), "{}", v.feedback);
        let (i, v) = rx.recv().await.unwrap();
        assert_eq!((i, v.passed), (1, true));
        assert_eq!(q.stats().failed, 1);
    }

    #[tokio::test]
    async fn critical_items_run_first_and_dropped_ones_not_at_all() {
        let q = ValidationQueue::start(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = unbounded_channel();
        let (gone_tx, gone_rx) = unbounded_channel();
        drop(gone_rx);
        // Block the runner so the next items queue up behind it.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        {
            let gate = gate.clone();
            q.submit(
                ValidationPriority {
                    critical: true,
                    attempt: 9,
                },
                0,
                tx.clone(),
                move || {
                    Box::pin(async move {
                        let _ = gate.acquire().await;
                        verdict(true)
                    })
                },
            );
        }
        tokio::task::yield_now().await;
        for (i, critical, attempt) in [(1, false, 0), (2, true, 0), (3, false, 1), (4, true, 1)] {
            let order = order.clone();
            q.submit(
                ValidationPriority { critical, attempt },
                i,
                tx.clone(),
                move || {
                    Box::pin(async move {
                        order.lock().unwrap().push(i);
                        verdict(i % 2 == 0)
                    })
                },
            );
        }
        q.submit(
            ValidationPriority {
                critical: true,
                attempt: 5,
            },
            5,
            gone_tx,
            || Box::pin(async { verdict(true) }),
        );
        gate.add_permits(1);
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(rx.recv().await.unwrap().0);
        }
        assert_eq!(*order.lock().unwrap(), vec![4, 2, 3, 1]);
        assert_eq!(got[0], 0);
        let s = q.stats();
        assert_eq!(
            (
                s.submitted,
                s.passed,
                s.failed,
                s.dropped,
                s.queued,
                s.running
            ),
            (6, 3, 2, 1, 0, 0)
        );
        assert!(s.max_depth >= 5);
    }
}
