//! Per-neuron top-k accumulator for the dataset scan (n2g-method.md section 1).
//!
//! A window's score for a neuron is its largest activation over the window's scored tokens;
//! each neuron keeps its k best windows (ties: smaller window id first) and a_max, the largest
//! activation it has seen. A batch is folded in two phases so a bad batch changes nothing:
//! window scores are computed first (in parallel over blocks of neurons, reading contiguous
//! rows), then inserted.

use crate::error::{invalid, Result};
use crate::parallel;
use rayon::prelude::*;

/// Neurons per parallel task: one task reads `[b, t, block]` row slices, which keeps the reads
/// contiguous while giving every core work.
const BLOCK: usize = 256;

#[derive(Clone, Debug)]
pub struct TopK {
    n_neurons: usize,
    k: usize,
    /// `[n_neurons, k]`, best first; unused slots are -1 / -inf.
    ids: Vec<i64>,
    scores: Vec<f32>,
    /// Filled slots per neuron.
    len: Vec<u32>,
    a_max: Vec<f32>,
}

/// A batch of activations `[batch, tokens, n_neurons]` (row-major) with its window ids and an
/// optional `[batch, tokens]` mask (false = not scored).
pub struct Batch<'a> {
    pub activations: &'a [f32],
    pub batch: usize,
    pub tokens: usize,
    pub window_ids: &'a [i64],
    pub token_mask: Option<&'a [bool]>,
}

/// `(score, id)` ordering: higher score first, then smaller id.
#[inline]
fn better(s1: f32, id1: i64, s2: f32, id2: i64) -> bool {
    s1 > s2 || (s1 == s2 && id1 < id2)
}

impl TopK {
    pub fn new(n_neurons: usize, k: usize) -> Result<Self> {
        if n_neurons == 0 {
            return Err(invalid!("n_neurons must be at least 1"));
        }
        if k == 0 {
            return Err(invalid!("k must be at least 1"));
        }
        let total = n_neurons.checked_mul(k).filter(|&t| t <= (1usize << 34)).ok_or_else(|| invalid!("n_neurons * k = {n_neurons} * {k} is too large"))?;
        Ok(TopK {
            n_neurons,
            k,
            ids: vec![-1; total],
            scores: vec![f32::NEG_INFINITY; total],
            len: vec![0; n_neurons],
            a_max: vec![f32::NEG_INFINITY; n_neurons],
        })
    }

    pub fn n_neurons(&self) -> usize {
        self.n_neurons
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// `[n_neurons]`; -inf where a neuron saw no scored token.
    pub fn max_activation(&self) -> &[f32] {
        &self.a_max
    }
    /// `([n_neurons * k] ids, [n_neurons * k] scores)`, row-major, best first, -1 / -inf pad.
    pub fn top(&self) -> (&[i64], &[f32]) {
        (&self.ids, &self.scores)
    }

    fn validate(&self, b: &Batch) -> Result<()> {
        let want = b.batch.checked_mul(b.tokens).and_then(|x| x.checked_mul(self.n_neurons));
        if want != Some(b.activations.len()) {
            return Err(invalid!(
                "activations hold {} values, expected batch * tokens * n_neurons = {} * {} * {}",
                b.activations.len(),
                b.batch,
                b.tokens,
                self.n_neurons
            ));
        }
        if b.window_ids.len() != b.batch {
            return Err(invalid!("window_ids has {} entries, expected one per batch row ({})", b.window_ids.len(), b.batch));
        }
        if let Some(m) = b.token_mask {
            if m.len() != b.batch * b.tokens {
                return Err(invalid!("token_mask has {} values, expected batch * tokens = {} * {}", m.len(), b.batch, b.tokens));
            }
        }
        Ok(())
    }

    /// Folds one batch in. NaN activations are refused (the batch is then not applied) because
    /// a NaN would silently never rank; masked tokens are skipped.
    pub fn update(&mut self, b: &Batch) -> Result<()> {
        self.validate(b)?;
        let n = self.n_neurons;
        let (bsz, t) = (b.batch, b.tokens);
        if bsz == 0 {
            return Ok(());
        }
        // Phase 1: window scores `[n, batch]` (-inf = no scored token), per block of neurons.
        let mut window_max = vec![f32::NEG_INFINITY; n * bsz];
        let nan_at: Option<(usize, usize, usize)> = parallel::install(|| {
            window_max
                .par_chunks_mut(BLOCK * bsz)
                .enumerate()
                .map(|(blk, out)| {
                    let j0 = blk * BLOCK;
                    let width = out.len() / bsz;
                    let mut row_max = vec![f32::NEG_INFINITY; width];
                    for w in 0..bsz {
                        row_max.fill(f32::NEG_INFINITY);
                        for tok in 0..t {
                            if b.token_mask.is_some_and(|m| !m[w * t + tok]) {
                                continue;
                            }
                            let row = &b.activations[(w * t + tok) * n + j0..][..width];
                            for (m, &a) in row_max.iter_mut().zip(row) {
                                // `max` would drop NaN silently; compare so NaN is caught below.
                                if a > *m {
                                    *m = a;
                                }
                            }
                            if let Some(x) = row.iter().position(|a| a.is_nan()) {
                                return Some((w, tok, j0 + x));
                            }
                        }
                        for (x, &m) in row_max.iter().enumerate() {
                            out[x * bsz + w] = m;
                        }
                    }
                    None
                })
                .find_any(|r| r.is_some())
                .flatten()
        });
        if let Some((w, tok, j)) = nan_at {
            return Err(invalid!("activations[{w}, {tok}, {j}] is NaN; the batch was not applied"));
        }
        // Phase 2: insertion, neurons independent.
        let k = self.k;
        parallel::install(|| {
            self.ids
                .par_chunks_mut(k)
                .zip(self.scores.par_chunks_mut(k))
                .zip(self.len.par_iter_mut())
                .zip(self.a_max.par_iter_mut())
                .zip(window_max.par_chunks(bsz))
                .for_each(|((((ids, scores), len), amax), wmax)| {
                    for (w, &s) in wmax.iter().enumerate() {
                        if s == f32::NEG_INFINITY {
                            continue;
                        }
                        if s > *amax {
                            *amax = s;
                        }
                        let id = b.window_ids[w];
                        let l = *len as usize;
                        if l == k && !better(s, id, scores[k - 1], ids[k - 1]) {
                            continue;
                        }
                        // Shift worse entries down one slot, dropping the last when full.
                        let mut pos = l.min(k - 1);
                        while pos > 0 && better(s, id, scores[pos - 1], ids[pos - 1]) {
                            scores[pos] = scores[pos - 1];
                            ids[pos] = ids[pos - 1];
                            pos -= 1;
                        }
                        scores[pos] = s;
                        ids[pos] = id;
                        *len = (l + 1).min(k) as u32;
                    }
                })
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type TestBatch = (Vec<f32>, usize, usize, Vec<i64>, Option<Vec<bool>>);

    fn brute(n: usize, k: usize, batches: &[TestBatch]) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
        let mut ids = Vec::new();
        let mut scores = Vec::new();
        let mut amax = vec![f32::NEG_INFINITY; n];
        for j in 0..n {
            let mut all: Vec<(f32, i64)> = Vec::new();
            for (acts, b, t, wid, mask) in batches {
                for w in 0..*b {
                    let vals: Vec<f32> = (0..*t)
                        .filter(|&tok| mask.as_ref().is_none_or(|m| m[w * t + tok]))
                        .map(|tok| acts[(w * t + tok) * n + j])
                        .collect();
                    if let Some(m) = vals.iter().copied().reduce(f32::max) {
                        all.push((m, wid[w]));
                        amax[j] = amax[j].max(m);
                    }
                }
            }
            all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            all.resize(k, (f32::NEG_INFINITY, -1));
            all.truncate(k);
            ids.extend(all.iter().map(|x| x.1));
            scores.extend(all.iter().map(|x| x.0));
        }
        (ids, scores, amax)
    }

    #[test]
    fn refuses_bad_shapes_and_nan_without_changing_state() {
        let mut tk = TopK::new(2, 3).unwrap();
        let acts = [1.0, 2.0, 3.0, 4.0];
        let bad = Batch { activations: &acts, batch: 1, tokens: 2, window_ids: &[7, 8], token_mask: None };
        assert!(tk.update(&bad).is_err());
        let nan = [1.0, f32::NAN, 3.0, 4.0];
        let b = Batch { activations: &nan, batch: 1, tokens: 2, window_ids: &[7], token_mask: None };
        let err = tk.update(&b).unwrap_err().to_string();
        assert!(err.contains("[0, 0, 1]"), "{err}");
        assert_eq!(tk.max_activation(), &[f32::NEG_INFINITY; 2]);
        assert!(TopK::new(0, 3).is_err() && TopK::new(3, 0).is_err());
    }

    #[test]
    fn masked_window_is_not_scored() {
        let mut tk = TopK::new(1, 2).unwrap();
        let acts = [5.0, 1.0, 9.0, 2.0];
        let mask = [false, true, false, false];
        tk.update(&Batch { activations: &acts, batch: 2, tokens: 2, window_ids: &[10, 11], token_mask: Some(&mask) }).unwrap();
        assert_eq!(tk.top(), (&[10, -1][..], &[1.0, f32::NEG_INFINITY][..]));
        assert_eq!(tk.max_activation(), &[1.0]);
    }

    proptest! {
        #[test]
        fn equals_brute_force(
            n in 1usize..300, k in 1usize..5,
            batches in prop::collection::vec((1usize..4, 1usize..4, any::<bool>(), any::<u64>()), 1..4)
        ) {
            let mut tk = TopK::new(n, k).unwrap();
            let mut data = Vec::new();
            let mut next_id = 0i64;
            for (b, t, masked, seed) in batches {
                // Small integer-valued activations so ties happen.
                let mut x = seed;
                let mut rnd = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 33) as u32 };
                let acts: Vec<f32> = (0..b * t * n).map(|_| (rnd() % 7) as f32 - 3.0).collect();
                let mask: Option<Vec<bool>> = masked.then(|| (0..b * t).map(|_| rnd() % 3 != 0).collect());
                let wid: Vec<i64> = (0..b as i64).map(|w| { next_id += 1; (next_id * 7919 + w) % 101 }).collect();
                tk.update(&Batch { activations: &acts, batch: b, tokens: t, window_ids: &wid, token_mask: mask.as_deref() }).unwrap();
                data.push((acts, b, t, wid, mask));
            }
            let (ids, scores, amax) = brute(n, k, &data);
            prop_assert_eq!(tk.top().0, &ids[..]);
            prop_assert_eq!(tk.top().1, &scores[..]);
            prop_assert_eq!(tk.max_activation(), &amax[..]);
        }
    }
}
