//! The export queue between the agent's cycle and the exporter: bounded in bytes.
//!
//! Policy when full: [`WhenFull::DropOldest`]. The newest profile is the most useful,
//! so the oldest waiting ones are dropped (and counted) to make room. An item stays
//! in the queue, and in its byte count, until the exporter is done with it, so the
//! bound covers what is being sent too; but the oldest may be dropped in the middle
//! of an attempt to send it, and the exporter's copy then lives until that attempt
//! ends (at most `--timeout`): at most one request (`--max-request-kib`) beyond the
//! bound. Never blocks the producer.
//!
//! The memory budget (crate::memory) may lower the bound for a while
//! ([`ExportQueue::set_limit`]): the queue then holds at most that limit, but always
//! the newest item, so a profile that fits the configured bound is never refused.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use tokio::sync::Notify;

/// Default bound: 20 MiB of encoded requests. With ~2 900 distinct stacks per 15 s
/// interval on 2 CPUs (bench/agent_outage.py: ~78 KiB per interval) that holds ~65
/// minutes of outage, and the agent's RSS with the queue full stays under 64 MiB
/// (~40 MiB without it). With larger intervals the memory budget lowers it
/// (crate::memory). Memory: this much at most, plus per-request overhead.
pub const DEFAULT_QUEUE_BYTES: usize = 20 << 20;

/// What happens when an item does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    DropOldest,
}

/// Counters of the queue, readable at any time.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub enqueued: AtomicU64,
    /// Items dropped to make room (or because one alone exceeds the bound).
    pub dropped: AtomicU64,
    pub dropped_bytes: AtomicU64,
    /// Of the dropped items, those that fitted the configured bound but not the
    /// lower limit the memory budget had set.
    pub dropped_for_budget: AtomicU64,
    /// Most bytes ever queued at once (never above the bound).
    pub peak_bytes: AtomicU64,
}

struct Inner<T> {
    items: VecDeque<(u64, T, usize)>,
    bytes: usize,
    /// The bound in force: the configured one, or lower while the memory budget
    /// needs room.
    limit: usize,
    next_id: u64,
    closed: bool,
    /// True while pushes are dropping items (for "drops began/ended" logs).
    dropping: bool,
    dropped_in_episode: u64,
}

/// What a push did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Older items dropped to make room.
    pub dropped: u64,
    /// Drops started with this push.
    pub drops_began: bool,
    /// This push needed no drop after an episode of drops: how many were dropped.
    pub drops_ended: Option<u64>,
}

/// A byte-bounded FIFO of items waiting for export.
pub struct ExportQueue<T> {
    inner: Mutex<Inner<T>>,
    notify: Notify,
    capacity: usize,
    pub stats: QueueStats,
}

impl<T: Clone> ExportQueue<T> {
    pub fn new(capacity_bytes: usize) -> Self {
        ExportQueue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                bytes: 0,
                limit: capacity_bytes,
                next_id: 0,
                closed: false,
                dropping: false,
                dropped_in_episode: 0,
            }),
            notify: Notify::new(),
            capacity: capacity_bytes,
            stats: QueueStats::default(),
        }
    }

    /// Adds an item of `bytes` bytes, dropping the oldest items until it fits.
    pub fn push(&self, item: T, bytes: usize) -> Pushed {
        let mut inner = self.inner.lock().expect("queue lock");
        let mut pushed = Pushed::default();
        if bytes > self.capacity {
            pushed.dropped = 1;
            self.count_drop(bytes, false);
        } else {
            // The newest is admitted even over the budget's limit, alone if need be.
            while inner.bytes + bytes > inner.limit {
                let for_budget = inner.bytes + bytes <= self.capacity;
                if !self.drop_oldest(&mut inner, &mut pushed, for_budget) {
                    break;
                }
            }
            let id = inner.next_id;
            inner.next_id += 1;
            inner.items.push_back((id, item, bytes));
            inner.bytes += bytes;
            self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
            self.stats
                .peak_bytes
                .fetch_max(inner.bytes as u64, Ordering::Relaxed);
        }
        if pushed.dropped > 0 {
            Self::episode_drops(&mut inner, &mut pushed);
        } else if inner.dropping && inner.bytes <= inner.limit / 2 {
            // Hysteresis: the episode ends once the queue has drained to half, not
            // at the first push that happens to fit, so logs do not flap.
            inner.dropping = false;
            pushed.drops_ended = Some(std::mem::take(&mut inner.dropped_in_episode));
        }
        drop(inner);
        self.notify.notify_one();
        pushed
    }

    fn episode_drops(inner: &mut Inner<T>, pushed: &mut Pushed) {
        pushed.drops_began = !inner.dropping;
        inner.dropping = true;
        inner.dropped_in_episode += pushed.dropped;
    }

    /// Drops the oldest item, counted (as a budget drop if `for_budget`); false
    /// when the queue is empty.
    fn drop_oldest(&self, inner: &mut Inner<T>, pushed: &mut Pushed, for_budget: bool) -> bool {
        let Some((_, _, b)) = inner.items.pop_front() else {
            return false;
        };
        inner.bytes -= b;
        pushed.dropped += 1;
        self.count_drop(b, for_budget);
        true
    }

    fn count_drop(&self, bytes: usize, for_budget: bool) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.stats
            .dropped_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if for_budget {
            self.stats
                .dropped_for_budget
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets the bound in force to `limit` (at most the configured bound) and drops
    /// the oldest items until the queue fits it or holds only the newest.
    pub fn set_limit(&self, limit: usize) -> Pushed {
        let mut inner = self.inner.lock().expect("queue lock");
        inner.limit = limit.min(self.capacity);
        let mut pushed = Pushed::default();
        while inner.bytes > inner.limit && inner.items.len() > 1 {
            self.drop_oldest(&mut inner, &mut pushed, true);
        }
        if pushed.dropped > 0 {
            Self::episode_drops(&mut inner, &mut pushed);
        }
        pushed
    }

    /// The bound in force (see [`ExportQueue::set_limit`]).
    pub fn limit(&self) -> usize {
        self.inner.lock().expect("queue lock").limit
    }

    /// The configured bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The oldest item and its id, without removing it.
    pub fn front(&self) -> Option<(u64, T)> {
        let inner = self.inner.lock().expect("queue lock");
        inner.items.front().map(|(id, item, _)| (*id, item.clone()))
    }

    /// Removes the item `id` if it is still queued (it may have been dropped).
    pub fn remove(&self, id: u64) {
        let mut inner = self.inner.lock().expect("queue lock");
        if let Some(pos) = inner.items.iter().position(|(i, _, _)| *i == id) {
            let (_, _, bytes) = inner.items.remove(pos).expect("position is valid");
            inner.bytes -= bytes;
        }
    }

    /// Waits until an item is queued or the queue is closed.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            {
                let inner = self.inner.lock().expect("queue lock");
                if !inner.items.is_empty() || inner.closed {
                    return;
                }
            }
            notified.await;
        }
    }

    /// No more pushes will come; the consumer ends once the queue is empty.
    pub fn close(&self) {
        self.inner.lock().expect("queue lock").closed = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Waits until the queue is closed.
    pub async fn closed(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().expect("queue lock").closed
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("queue lock").items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the items queued (including one being sent, unless it was dropped
    /// meanwhile).
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("queue lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte bound holds: the oldest items are dropped, counted, and the drop
    /// episode's start and end are reported once each.
    #[test]
    fn drops_oldest_within_the_bound() {
        let q = ExportQueue::new(100);
        assert_eq!(q.push("a", 40), Pushed::default());
        assert_eq!(q.push("b", 40), Pushed::default());
        let p = q.push("c", 40);
        assert_eq!((p.dropped, p.drops_began), (1, true));
        assert_eq!(q.front().unwrap().1, "b");
        assert!(q.bytes() <= 100);
        let p = q.push("d", 40);
        assert_eq!((p.dropped, p.drops_began), (1, false));
        // A push that fits while the queue is still full-ish does not end the episode.
        q.remove(q.front().unwrap().0);
        assert_eq!(q.push("e", 20), Pushed::default());
        // Once the queue drains to half, the next push reports the end.
        while let Some((id, _)) = q.front() {
            q.remove(id);
        }
        let p = q.push("f", 10);
        assert_eq!(p.drops_ended, Some(2));
        assert_eq!(q.stats.dropped.load(Ordering::Relaxed), 2);
        assert!(q.bytes() <= 100);
        assert_eq!(q.stats.peak_bytes.load(Ordering::Relaxed), 80);
    }

    /// An item bigger than the whole bound is dropped alone, keeping the others.
    #[test]
    fn oversized_item_is_dropped() {
        let q = ExportQueue::new(100);
        q.push("small", 10);
        assert_eq!(q.push("huge", 101).dropped, 1);
        assert_eq!(q.len(), 1);
    }

    /// A lower limit drops the oldest at once and bounds later pushes, counted as
    /// budget drops; the newest item is kept even when alone it exceeds the limit;
    /// the configured bound comes back when the limit is raised.
    #[test]
    fn budget_limit_sheds_oldest_but_keeps_the_newest() {
        let q = ExportQueue::new(100);
        for item in ["a", "b", "c"] {
            q.push(item, 30);
        }
        let p = q.set_limit(50);
        assert_eq!((p.dropped, p.drops_began), (2, true));
        assert_eq!((q.front().unwrap().1, q.bytes(), q.limit()), ("c", 30, 50));
        let p = q.push("d", 40);
        assert_eq!((p.dropped, p.drops_began), (1, false));
        assert_eq!((q.len(), q.bytes()), (1, 40));
        assert_eq!(q.set_limit(10).dropped, 0, "nothing older than the newest");
        assert_eq!(
            q.push("e", 60).dropped,
            1,
            "alone over the limit, still admitted"
        );
        assert_eq!(q.front().unwrap().1, "e");
        assert_eq!(q.stats.dropped_for_budget.load(Ordering::Relaxed), 4);
        q.set_limit(1000);
        assert_eq!(q.limit(), 100, "never above the configured bound");
        q.push("f", 30);
        assert_eq!(q.len(), 2);
        let p = q.push("g", 30);
        assert_eq!(
            (
                p.dropped,
                q.stats.dropped_for_budget.load(Ordering::Relaxed)
            ),
            (1, 4)
        );
        assert_eq!(q.stats.dropped.load(Ordering::Relaxed), 5);
    }

    /// Removing an item that was dropped meanwhile is harmless.
    #[test]
    fn remove_after_drop_is_a_no_op() {
        let q = ExportQueue::new(10);
        q.push("a", 10);
        let (id, _) = q.front().unwrap();
        q.push("b", 10); // drops "a"
        q.remove(id);
        assert_eq!(q.front().unwrap().1, "b");
        assert_eq!(q.bytes(), 10);
    }

    /// `closed` waits through pushes and returns once the queue is closed (the
    /// exporter's backoff sleep ends with it at shutdown).
    #[tokio::test]
    async fn closed_returns_at_close_only() {
        let q = std::sync::Arc::new(ExportQueue::new(10));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.closed().await }
        });
        tokio::task::yield_now().await;
        q.push("a", 1);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        q.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by close")
            .unwrap();
        // Closed already: returns at once.
        q.closed().await;
    }
}
