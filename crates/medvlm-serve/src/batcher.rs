//! The batching queue between the HTTP handlers and the model.
//!
//! Handlers decode and preprocess an upload, then [`Batcher::submit`] its pixels to a bounded
//! queue (a tokio `mpsc` channel of `queue` slots; a full queue is refused at once, which the
//! handlers answer with 429). One worker thread, outside the async runtime, takes the first
//! waiting image, then more until it has `max_batch` or `max_wait` has passed since the first,
//! groups them by the model they are for, runs one forward pass per group, and answers each
//! request through its own oneshot channel. Requests whose client has gone (timed out) are
//! dropped before the forward pass.
//!
//! [`Batcher::hold`] stops the worker after it has taken an image and before it runs the
//! model, until the returned guard is dropped: the tests use it to fill the queue and to
//! gather concurrent requests into one batch deterministically.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use medvlm_adapt::predictor::AdaptedModel;
use medvlm_models::LoadedModel;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

/// Which model an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The base model's image tower: the answer is the raw image embedding `[D]`.
    Embed,
    /// Adapted artefact number `i`: the answer is its probabilities `[C]`.
    Adapted(usize),
}

/// The models the worker runs.
pub struct Engine {
    /// The base model.
    pub model: Arc<LoadedModel>,
    /// The adapted artefacts, by index.
    pub adapted: Vec<Arc<AdaptedModel>>,
    /// Where tensors are computed.
    pub device: Device,
}

impl Engine {
    /// One forward pass of `pixels` (each `3 * H * W`) for `target`: one row per image.
    pub fn run(&self, target: Target, pixels: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, String> {
        let rows = match target {
            Target::Embed => {
                let px = self
                    .model
                    .preprocess
                    .batch(pixels, &self.device)
                    .map_err(|e| e.to_string())?;
                let out = self
                    .model
                    .model
                    .encode_image(&px)
                    .map_err(|e| e.to_string())?;
                out.embeds
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(&Device::Cpu))
                    .and_then(|t: Tensor| t.to_vec2::<f32>())
                    .map_err(|e| e.to_string())?
            }
            Target::Adapted(i) => {
                let a = self
                    .adapted
                    .get(i)
                    .ok_or_else(|| format!("no adapted artefact number {i}"))?;
                let px = a
                    .model
                    .preprocess
                    .batch(pixels, &self.device)
                    .map_err(|e| e.to_string())?;
                a.predict_pixels(&px)
                    .map_err(|e| e.to_string())?
                    .to_vec2::<f32>()
                    .map_err(|e| e.to_string())?
            }
        };
        if rows.len() != pixels.len() {
            return Err(format!(
                "the model returned {} rows for {} images",
                rows.len(),
                pixels.len()
            ));
        }
        Ok(rows)
    }
}

/// The answer to one image: a row of the model's output, or why it failed.
pub type JobResult = Result<Vec<f32>, String>;

struct Job {
    target: Target,
    pixels: Vec<f32>,
    reply: oneshot::Sender<JobResult>,
}

/// Why an image was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full (answer 429).
    Full,
    /// The worker has stopped (answer 503).
    Closed,
}

/// Batching options.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most images per forward pass (at least 1).
    pub max_batch: usize,
    /// Longest wait for more images after the first of a batch.
    pub max_wait: Duration,
    /// Queue slots (at least 1).
    pub queue: usize,
}

struct Shared {
    /// Images in the channel (not yet taken by the worker).
    queued: AtomicUsize,
    /// Images accepted and not yet given to the model (in the channel or held by the worker).
    waiting: AtomicUsize,
    /// The worker thread is running.
    alive: AtomicBool,
}

/// The queue and its worker thread; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    hold: Arc<watch::Sender<bool>>,
    capacity: usize,
}

/// Keeps the worker from running the model while alive (see [`Batcher::hold`]).
pub struct HoldGuard {
    hold: Arc<watch::Sender<bool>>,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.hold.send_replace(false);
    }
}

struct AliveFlag(Arc<Shared>);

impl Drop for AliveFlag {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Starts the worker thread. Needs no async runtime: the worker runs its own
    /// single-threaded one to wait on the queue, and computes on its own thread.
    pub fn start(
        engine: Arc<Engine>,
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let capacity = cfg.queue.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
        });
        let (hold_tx, hold_rx) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let worker_shared = shared.clone();
        std::thread::Builder::new()
            .name("medvlm-serve-worker".into())
            .spawn(move || {
                let _alive = AliveFlag(worker_shared.clone());
                rt.block_on(worker(engine, cfg, metrics, rx, hold_rx, worker_shared));
            })?;
        Ok(Self {
            tx,
            shared,
            hold: Arc::new(hold_tx),
            capacity,
        })
    }

    /// Queues one image's preprocessed pixels; the receiver gets the model's answer.
    pub fn submit(
        &self,
        target: Target,
        pixels: Vec<f32>,
    ) -> Result<oneshot::Receiver<JobResult>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        // Counted before sending so the worker never sees a job it has not been told of.
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Job {
            target,
            pixels,
            reply,
        }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => SubmitError::Full,
                    mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Images in the queue, not yet taken by the worker.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Images accepted and not yet given to the model (queued, or taken and held).
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Queue slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the worker thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Holds the worker before its next forward pass (it still takes the first image of a
    /// batch off the queue) until the guard is dropped.
    pub fn hold(&self) -> HoldGuard {
        self.hold.send_replace(true);
        HoldGuard {
            hold: self.hold.clone(),
        }
    }
}

async fn worker(
    engine: Arc<Engine>,
    cfg: BatchConfig,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Job>,
    mut hold: watch::Receiver<bool>,
    shared: Arc<Shared>,
) {
    let max_batch = cfg.max_batch.max(1);
    while let Some(first) = rx.recv().await {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        while *hold.borrow_and_update() {
            if hold.changed().await.is_err() {
                break;
            }
        }
        let deadline = tokio::time::Instant::now() + cfg.max_wait;
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => {
                    shared.queued.fetch_sub(1, Ordering::SeqCst);
                    batch.push(job);
                }
                _ => break,
            }
        }
        shared.waiting.fetch_sub(batch.len(), Ordering::SeqCst);
        run_batch(&engine, batch, &metrics);
    }
}

/// Runs the live jobs of a batch, one forward pass per target, and answers each.
fn run_batch(engine: &Engine, batch: Vec<Job>, metrics: &Metrics) {
    let mut groups: Vec<(Target, Vec<Job>)> = Vec::new();
    for job in batch {
        if job.reply.is_closed() {
            continue; // the client timed out or went away
        }
        match groups.iter_mut().find(|(t, _)| *t == job.target) {
            Some((_, jobs)) => jobs.push(job),
            None => groups.push((job.target, vec![job])),
        }
    }
    for (target, jobs) in groups {
        let (pixels, replies): (Vec<Vec<f32>>, Vec<oneshot::Sender<JobResult>>) =
            jobs.into_iter().map(|j| (j.pixels, j.reply)).unzip();
        metrics.record_batch(pixels.len());
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| engine.run(target, &pixels)))
            .unwrap_or_else(|_| Err("the model panicked on this batch".to_string()));
        match out {
            Ok(rows) => {
                for (reply, row) in replies.into_iter().zip(rows) {
                    let _ = reply.send(Ok(row));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
