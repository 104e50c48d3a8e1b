//! A small L-BFGS minimiser (Nocedal & Wright, "Numerical Optimization",
//! 2nd ed., algorithm 7.4 two-loop recursion, with a backtracking Armijo line
//! search) for the convex, smooth objectives of the linear probe. The
//! problems are tiny (C x D parameters, a few hundred samples), so a
//! dependency-free f64 implementation is enough and keeps fits
//! deterministic.

/// Options of [`minimize`].
#[derive(Debug, Clone, Copy)]
pub struct LbfgsOptions {
    /// Maximum iterations.
    pub max_iter: usize,
    /// Number of (s, y) pairs kept.
    pub history: usize,
    /// Stop when the gradient's max-norm falls below this.
    pub grad_tol: f64,
}

impl Default for LbfgsOptions {
    fn default() -> Self {
        // sklearn's LogisticRegression(solver="lbfgs") uses max_iter=100 and
        // tol 1e-4; we allow more iterations, as CLIP's linear probe did
        // (max_iter=1000), since the problems are tiny.
        Self {
            max_iter: 500,
            history: 10,
            grad_tol: 1e-6,
        }
    }
}

/// Outcome of [`minimize`].
#[derive(Debug, Clone)]
pub struct LbfgsResult {
    /// Minimiser found.
    pub x: Vec<f64>,
    /// Objective at `x`.
    pub value: f64,
    /// Iterations used.
    pub iterations: usize,
    /// Whether the gradient tolerance was reached.
    pub converged: bool,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimises `f`, which returns the objective and writes the gradient into
/// its second argument, starting from `x0`.
pub fn minimize(
    x0: Vec<f64>,
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
    opts: LbfgsOptions,
) -> LbfgsResult {
    let n = x0.len();
    let mut x = x0;
    let mut g = vec![0.0; n];
    let mut value = f(&x, &mut g);
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut x_new = vec![0.0; n];
    let mut g_new = vec![0.0; n];
    for iter in 0..opts.max_iter {
        let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if gmax < opts.grad_tol {
            return LbfgsResult {
                x,
                value,
                iterations: iter,
                converged: true,
            };
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let m = s_hist.len();
        let mut alphas = vec![0.0; m];
        for i in (0..m).rev() {
            let rho = 1.0 / dot(&y_hist[i], &s_hist[i]);
            alphas[i] = rho * dot(&s_hist[i], &q);
            for (qj, yj) in q.iter_mut().zip(&y_hist[i]) {
                *qj -= alphas[i] * yj;
            }
        }
        let gamma = if m > 0 {
            dot(&s_hist[m - 1], &y_hist[m - 1]) / dot(&y_hist[m - 1], &y_hist[m - 1])
        } else {
            1.0 / gmax.max(1e-12)
        };
        for qj in q.iter_mut() {
            *qj *= gamma;
        }
        for i in 0..m {
            let rho = 1.0 / dot(&y_hist[i], &s_hist[i]);
            let beta = rho * dot(&y_hist[i], &q);
            for (qj, sj) in q.iter_mut().zip(&s_hist[i]) {
                *qj += (alphas[i] - beta) * sj;
            }
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart with -g.
            s_hist.clear();
            y_hist.clear();
            d = g.iter().map(|v| -v / gmax.max(1e-12)).collect();
            slope = dot(&g, &d);
        }
        // Backtracking Armijo line search.
        let mut step = 1.0;
        let mut accepted = false;
        for _ in 0..40 {
            for i in 0..n {
                x_new[i] = x[i] + step * d[i];
            }
            let v = f(&x_new, &mut g_new);
            if v.is_finite() && v <= value + 1e-4 * step * slope {
                accepted = true;
                let s: Vec<f64> = (0..n).map(|i| x_new[i] - x[i]).collect();
                let y: Vec<f64> = (0..n).map(|i| g_new[i] - g[i]).collect();
                if dot(&s, &y) > 1e-12 {
                    if s_hist.len() == opts.history {
                        s_hist.remove(0);
                        y_hist.remove(0);
                    }
                    s_hist.push(s);
                    y_hist.push(y);
                }
                std::mem::swap(&mut x, &mut x_new);
                std::mem::swap(&mut g, &mut g_new);
                value = v;
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            // No decrease possible along d: we are at the numerical minimum.
            return LbfgsResult {
                x,
                value,
                iterations: iter + 1,
                converged: true,
            };
        }
    }
    LbfgsResult {
        x,
        value,
        iterations: opts.max_iter,
        converged: false,
    }
}
