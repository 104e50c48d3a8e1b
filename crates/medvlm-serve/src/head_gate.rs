//! Admission control of the task heads (`/v1/segment`, `/v1/anomaly`, `/v1/detect`,
//! `/v1/report`, `/v1/upscale`, `/v1/register`).
//!
//! A head request runs its own network on a blocking thread, outside the image queue of the
//! base model ([`crate::batcher`]): heads differ in networks and input sizes, so their
//! requests are not batched together. Without a bound, a burst of head requests would start
//! as many threads (tokio allows 512 blocking threads) and hold as many images and
//! activations in memory. The gate lets `workers` requests compute at once and `queue` more
//! wait; the next one is refused at once with 429 and `Retry-After`, as a full image queue is.
//! The permits travel with the work onto its thread, so a request that times out while its
//! network still runs keeps its slot until the computation really ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Bounds on concurrent task-head work.
#[derive(Debug)]
pub struct HeadGate {
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    workers: usize,
    queue: usize,
    busy: Arc<AtomicUsize>,
    rejected: AtomicUsize,
}

/// Counters of the gate for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLoad {
    /// Requests computing now.
    pub running: usize,
    /// Requests admitted and waiting for a worker.
    pub waiting: usize,
    /// Most requests computing at once.
    pub workers: usize,
    /// Most requests waiting.
    pub queue: usize,
    /// Requests refused with 429 so far.
    pub rejected: usize,
}

struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HeadLoad {
    /// Appends the gauges and the counter in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, kind, v) in [
            (
                "medvlm_head_running",
                "Task-head requests computing now.",
                "gauge",
                self.running,
            ),
            (
                "medvlm_head_waiting",
                "Task-head requests waiting for a worker.",
                "gauge",
                self.waiting,
            ),
            (
                "medvlm_head_workers",
                "Task-head requests that may compute at once (--head-workers).",
                "gauge",
                self.workers,
            ),
            (
                "medvlm_head_queue_capacity",
                "Task-head requests that may wait (--head-queue).",
                "gauge",
                self.queue,
            ),
            (
                "medvlm_head_rejected_total",
                "Task-head requests refused with 429.",
                "counter",
                self.rejected,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

impl HeadGate {
    /// A gate letting `workers` (at least 1) requests compute and `queue` more wait.
    pub fn new(workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(workers + queue)),
            running: Arc::new(Semaphore::new(workers)),
            workers,
            queue,
            busy: Arc::new(AtomicUsize::new(0)),
            rejected: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on a blocking thread once a worker is free; 429 when `workers + queue`
    /// requests are already admitted.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let admitted = self.admitted.clone().try_acquire_owned().map_err(|_| {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!(
                        "the task heads are busy ({} computing, {} waiting); retry later \
                         (--head-workers, --head-queue)",
                        self.workers, self.queue
                    ),
                )
            }
        })?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the task-head gate is closed"))?;
        self.busy.fetch_add(1, Ordering::Relaxed);
        let busy = Busy(self.busy.clone());
        tokio::task::spawn_blocking(move || {
            // Held until the computation ends, even if the request has timed out.
            let _slots = (admitted, running, busy);
            f()
        })
        .await
        .map_err(|_| ApiError::internal("a task-head worker failed"))?
    }

    /// Running, waiting and refused requests now.
    pub fn load(&self) -> HeadLoad {
        let running = self.busy.load(Ordering::Relaxed);
        let admitted = self.workers + self.queue - self.admitted.available_permits();
        HeadLoad {
            running,
            waiting: admitted.saturating_sub(running),
            workers: self.workers,
            queue: self.queue,
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits until `cond` holds (the blocking threads start asynchronously).
    async fn until(cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("condition not reached in 1 s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admits_workers_plus_queue_then_refuses_with_429() {
        let gate = Arc::new(HeadGate::new(1, 1));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let started = Arc::new(AtomicUsize::new(0));
        let job = |k: usize| {
            let gate = gate.clone();
            let rx = release_rx.clone();
            let started = started.clone();
            tokio::spawn(async move {
                gate.run(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    rx.lock().unwrap().recv().unwrap();
                    Ok(k)
                })
                .await
            })
        };
        let first = job(1);
        // `running` counts the slot as soon as it is taken; the blocking thread may start the
        // closure later (seen on a loaded machine), so wait for the closure itself too.
        until(|| gate.load().running == 1 && started.load(Ordering::SeqCst) == 1).await;
        let second = job(2);
        until(|| gate.load().waiting == 1).await;
        // One computing, one waiting: the third is refused at once.
        let third = gate.run(|| Ok(3)).await.unwrap_err();
        assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(third.retry_after, Some(1));
        assert_eq!(gate.load().rejected, 1);
        // Only one computes at a time.
        assert_eq!(started.load(Ordering::SeqCst), 1);
        release_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        until(|| started.load(Ordering::SeqCst) == 2).await;
        release_tx.send(()).unwrap();
        assert_eq!(second.await.unwrap().unwrap(), 2);
        until(|| gate.load().running == 0).await;
        assert_eq!(gate.load().waiting, 0);
        // Free again.
        assert_eq!(gate.run(|| Ok(4)).await.unwrap(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_request_keeps_its_slot_until_its_work_ends() {
        let gate = Arc::new(HeadGate::new(1, 0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let g = gate.clone();
        let fut = tokio::spawn(async move {
            g.run(move || {
                rx.recv().unwrap();
                Ok(())
            })
            .await
        });
        until(|| gate.load().running == 1).await;
        // The request goes away (as a timed-out one does); its computation goes on.
        fut.abort();
        let _ = fut.await;
        assert_eq!(
            gate.run(|| Ok(())).await.unwrap_err().status,
            StatusCode::TOO_MANY_REQUESTS
        );
        tx.send(()).unwrap();
        until(|| gate.load().running == 0).await;
        assert!(gate.run(|| Ok(())).await.is_ok());
    }
}
