//! Synthetic clustered unit vectors for the retrieval tests and `medvlm bench retrieval`:
//! `clusters` centres drawn uniformly on the sphere, each vector a centre plus isotropic
//! Gaussian noise of standard deviation `spread / sqrt(dim)` per coordinate, normalised.
//! Deterministic for a seed (SplitMix64 + Box-Muller; no external RNG).

/// SplitMix64 (Steele, Lea & Flood, OOPSLA 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn unit(v: &mut [f32]) {
    let n = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= n);
}

/// The cluster centres of [`clustered`] for `seed`.
pub fn centres(clusters: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut c: Vec<f32> = (0..clusters * dim).map(|_| rng.normal() as f32).collect();
    c.chunks_mut(dim.max(1)).for_each(unit);
    c
}

/// `n` unit vectors `[n, dim]` around the centres of `centres(clusters, dim, seed)`;
/// `stream` picks an independent draw of points (e.g. 0 for the base, 1 for queries).
pub fn clustered(
    n: usize,
    dim: usize,
    clusters: usize,
    spread: f32,
    seed: u64,
    stream: u64,
) -> Vec<f32> {
    let c = centres(clusters.max(1), dim, seed);
    let mut rng =
        SplitMix64::new(seed ^ (stream.wrapping_add(1)).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let sd = spread / (dim as f32).sqrt();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let k = (rng.next_u64() % clusters.max(1) as u64) as usize;
        let start = out.len();
        for j in 0..dim {
            out.push(c[k * dim + j] + sd * rng.normal() as f32);
        }
        unit(&mut out[start..]);
    }
    out
}
