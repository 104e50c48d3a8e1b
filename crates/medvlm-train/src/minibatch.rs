//! Seeded minibatch sampling and the AdamW + warm-up/cosine update of the task heads' loops.
//!
//! The task heads of `medvlm-tasks` train in memory on cached features, with simple loops of
//! their own (their losses and bookkeeping differ), but they draw their minibatches the same
//! way: the sample indices are shuffled by a ChaCha8 generator seeded with the run seed, once
//! per epoch, each epoch shuffling the previous epoch's order again. [`ShuffledEpochs`] is that
//! sampler, read either epoch by epoch ([`ShuffledEpochs::epoch`]: the loops over epochs of
//! chunks) or batch by batch across epoch boundaries ([`ShuffledEpochs::batch`]: the loops
//! over a number of optimiser steps). [`EpochTraining`] adds what the epoch loops of the report
//! generator, the VQA classifier and the multi-task network also share: the engine's AdamW and
//! a warm-up + cosine schedule ([`WarmupCosine`]) over all the run's updates, 5% of them warm-up.
//!
//! (The contrastive trainer, [`crate::trainer`], draws each epoch's order from its own stream
//! instead so that a resumed run continues the same order; these loops are not resumable.)

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::optim::{AdamW, AdamWConfig, Gradients, NamedVar, Result, WeightDecayRule};
use crate::schedule::WarmupCosine;

/// Sample indices `0..n` in seeded shuffled epochs (see the module documentation).
#[derive(Debug, Clone)]
pub struct ShuffledEpochs {
    rng: ChaCha8Rng,
    order: Vec<usize>,
    pos: usize,
}

impl ShuffledEpochs {
    /// A sampler of `n` samples whose order comes from `ChaCha8Rng::seed_from_u64(seed)`.
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            order: (0..n).collect(),
            pos: n,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The order of the next epoch: the previous order shuffled again. The whole epoch is
    /// taken, so a following [`Self::batch`] starts a new one.
    pub fn epoch(&mut self) -> &[usize] {
        self.order.shuffle(&mut self.rng);
        self.pos = self.order.len();
        &self.order
    }

    /// The next `size` indices (all `n` when there are fewer), continuing the current epoch
    /// and shuffling a new one when it runs out, so a batch may span two epochs but holds
    /// no index twice.
    pub fn batch(&mut self, size: usize) -> Vec<usize> {
        let size = size.min(self.order.len());
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.pos == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// Settings of an [`EpochTraining`] run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochTrainingConfig {
    /// Passes over the samples.
    pub epochs: usize,
    /// Samples per update (the last batch of an epoch may be smaller).
    pub batch: usize,
    /// Peak learning rate of the schedule.
    pub lr: f64,
    /// AdamW decoupled weight decay (on the parameters [`WeightDecayRule::default`] selects).
    pub weight_decay: f64,
    /// Seed of the sample order.
    pub seed: u64,
}

/// The optimiser side of an epoch loop: AdamW ([`AdamWConfig::default`] but for the weight
/// decay) and the warm-up + cosine schedule over `ceil(n / batch) * epochs` updates, the first
/// `total / 20` of them (integer division) warm-up, down to 0; and the [`ShuffledEpochs`]
/// sampler of the `n` samples, cut into batches.
pub struct EpochTraining {
    opt: AdamW,
    schedule: WarmupCosine,
    sampler: ShuffledEpochs,
    batch: usize,
    updates: u64,
}

impl EpochTraining {
    /// The optimiser of `params` and the sampler of `n` samples. A batch of 0 is refused.
    pub fn new(params: Vec<NamedVar>, n: usize, cfg: &EpochTrainingConfig) -> Result<Self> {
        if cfg.batch == 0 {
            return Err(crate::optim::OptimError::InvalidSetting {
                name: "batch",
                reason: "a batch of 0 samples".into(),
            });
        }
        let opt = adamw(params, cfg.weight_decay)?;
        let total = (n.div_ceil(cfg.batch) * cfg.epochs) as u64;
        Ok(Self {
            opt,
            schedule: WarmupCosine {
                base_lr: cfg.lr,
                warmup_steps: total / 20,
                total_steps: total,
                min_lr: 0.0,
            },
            sampler: ShuffledEpochs::new(n, cfg.seed),
            batch: cfg.batch,
            updates: 0,
        })
    }

    /// The batches of the next epoch: its shuffled order ([`ShuffledEpochs::epoch`]) in
    /// chunks of `batch` samples, the last one possibly smaller.
    pub fn epoch_batches(&mut self) -> Vec<Vec<usize>> {
        let batch = self.batch;
        self.sampler
            .epoch()
            .chunks(batch)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// One AdamW update with `grads` at the schedule's learning rate for the updates done.
    pub fn update(&mut self, grads: &Gradients) -> Result<()> {
        self.opt.step(grads, self.schedule.lr(self.updates))?;
        self.updates += 1;
        Ok(())
    }

    /// Updates done so far (the 0-based index of the next one).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The schedule of the run.
    pub fn schedule(&self) -> &WarmupCosine {
        &self.schedule
    }
}

/// The engine's AdamW over `params` with [`AdamWConfig::default`] but for `weight_decay`,
/// decaying the parameters [`WeightDecayRule::default`] selects (matrices, not biases or
/// norms): the optimiser of every task head.
pub fn adamw(params: Vec<NamedVar>, weight_decay: f64) -> Result<AdamW> {
    AdamW::new(
        params,
        AdamWConfig {
            weight_decay,
            ..AdamWConfig::default()
        },
        &WeightDecayRule::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor, Var};

    /// Each epoch is one in-place shuffle of the previous order by the seeded ChaCha8 stream,
    /// read whole by `epoch` or in batches spanning epochs by `batch`.
    #[test]
    fn epochs_and_batches_follow_one_seeded_shuffle_stream() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut order: Vec<usize> = (0..7).collect();
        let mut want = Vec::new();
        for _ in 0..3 {
            order.shuffle(&mut rng);
            want.push(order.clone());
        }
        let mut s = ShuffledEpochs::new(7, 11);
        for w in &want {
            assert_eq!(s.epoch(), w.as_slice());
        }
        // Batches of 3 over 7 samples: the third batch takes the last index of epoch 1 and
        // the first two of epoch 2.
        let mut s = ShuffledEpochs::new(7, 11);
        let drawn: Vec<Vec<usize>> = (0..4).map(|_| s.batch(3)).collect();
        let flat: Vec<usize> = want.concat();
        assert_eq!(drawn.concat(), flat[..12].to_vec());
        // Every epoch is a permutation, and the seed changes it.
        for w in &want {
            let mut sorted = w.clone();
            sorted.sort();
            assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        }
        assert_ne!(ShuffledEpochs::new(7, 12).epoch(), want[0].as_slice());
        // More than n asked: n, each once.
        assert_eq!(ShuffledEpochs::new(2, 0).batch(5).len(), 2);
        assert!(ShuffledEpochs::new(0, 0).batch(5).is_empty());
    }

    #[test]
    fn epoch_training_chunks_epochs_and_follows_the_schedule() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones((1, 1), DType::F32, &dev).unwrap()).unwrap();
        let params: Vec<NamedVar> = vec![("w".into(), w.clone())];
        let cfg = EpochTrainingConfig {
            epochs: 10,
            batch: 4,
            lr: 0.1,
            weight_decay: 0.0,
            seed: 3,
        };
        let mut run = EpochTraining::new(params.clone(), 10, &cfg).unwrap();
        // 3 batches per epoch (4, 4, 2), 30 updates, 1 of warm-up.
        assert_eq!(run.schedule().total_steps, 30);
        assert_eq!(run.schedule().warmup_steps, 1);
        let mut sampler = ShuffledEpochs::new(10, 3);
        let batches = run.epoch_batches();
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(batches.concat(), sampler.epoch().to_vec());
        // An update moves the parameter at the schedule's rate (AdamW's first step is
        // lr * sign(g)) and counts.
        let loss = w.as_tensor().sum_all().unwrap();
        let grads = Gradients::from_grad_store(&loss.backward().unwrap(), &params);
        run.update(&grads).unwrap();
        assert_eq!(run.updates(), 1);
        let after: f32 = w.as_tensor().sum_all().unwrap().to_scalar().unwrap();
        assert!((after - 0.9).abs() < 1e-4, "{after}");
        assert!(EpochTraining::new(params, 10, &EpochTrainingConfig { batch: 0, ..cfg }).is_err());
    }
}
