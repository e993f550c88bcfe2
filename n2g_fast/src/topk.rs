//! Per-neuron top-k accumulator for the dataset scan (n2g-method.md section 1).
//!
//! A window's score for a neuron is its largest activation over the window's scored tokens;
//! each neuron keeps its k best windows and a_max, the largest activation it has seen. A batch
//! is folded in two phases so a bad batch changes nothing: window scores are computed first (in
//! parallel over blocks of neurons, reading contiguous rows), then inserted.
//!
//! Order: higher score first, ties by smaller window id. This is a total order on
//! (score, window id), so the k best of a set of windows do not depend on the order the windows
//! came in; a_max is the largest score under `f32::total_cmp` (so +0 beats -0 whatever the
//! order). Hence a scan split into shards of disjoint windows, each folded into its own TopK and
//! combined with [`TopK::merge`] in any order, equals the single pass bit for bit.
//!
//! Binary form (`to_bytes` / `from_bytes`, all little-endian):
//! ```text
//! magic "N2TK" | version u16 = 1 | flags u16 = 0 | n_neurons u32 | k u32
//! len u32 * n | a_max f32 * n | ids i64 * n*k | scores f32 * n*k
//! crc u32 (CRC-32 of every byte before it)
//! ```

use crate::error::{corrupt, invalid, N2GError, Result};
use crate::parallel;
use rayon::prelude::*;

/// Neurons per parallel task: one task reads `[b, t, block]` row slices, which keeps the reads
/// contiguous while giving every core work.
const BLOCK: usize = 256;
/// Neurons per parallel task when window scores come row by row (`update_window_max`): rows of
/// 64 floats stay contiguous, and a layer of 1,536 neurons gives 24 tasks.
const ROW_BLOCK: usize = 64;

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

pub const TOPK_MAGIC: &[u8; 4] = b"N2TK";
pub const TOPK_FORMAT_VERSION: u16 = 1;
const TOPK_HEADER_LEN: usize = 16;

/// `(score, id)` ordering: higher score first, then smaller id.
#[inline]
fn better(s1: f32, id1: i64, s2: f32, id2: i64) -> bool {
    s1 > s2 || (s1 == s2 && id1 < id2)
}

/// Puts (s, id) in its place in one neuron's list (`ids`, `scores`: its k slots, best first,
/// `len` used), shifting worse entries down and dropping the last when full; nothing when it
/// is not better than the k-th.
#[inline]
fn insert_one(ids: &mut [i64], scores: &mut [f32], len: &mut u32, s: f32, id: i64) {
    let (k, l) = (ids.len(), *len as usize);
    if l == k && !better(s, id, scores[k - 1], ids[k - 1]) {
        return;
    }
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

/// The lowest score that may still enter a neuron's list: its k-th when full, else any.
/// a_max needs no other score: a score below the k-th of a full list is below a_max too.
#[inline]
fn entry_floor(scores: &[f32], len: u32, k: usize) -> f32 {
    if len as usize == k { scores[k - 1] } else { f32::NEG_INFINITY }
}

/// a_max update: the larger under `total_cmp` (scores are never NaN), so +0 wins over -0 in
/// any order.
#[inline]
fn raise_max(amax: &mut f32, s: f32) {
    if s.total_cmp(amax).is_gt() {
        *amax = s;
    }
}

/// Most (neuron, slot) pairs an accumulator holds: 12 GiB, far above any layer's scan (tens of
/// thousands of neurons times k in the tens).
const MAX_SLOTS: usize = 1 << 30;

/// `vec![v; n]` that reports an allocation failure instead of aborting the process.
fn filled<T: Clone>(n: usize, v: T) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| N2GError::Resource(format!("cannot allocate a TopK of {n} slots: out of memory")))?;
    out.resize(n, v);
    Ok(out)
}

/// Window ids are >= 0: -1 marks an empty slot in `top()`.
fn check_window_ids(ids: &[i64]) -> Result<()> {
    match ids.iter().position(|&w| w < 0) {
        Some(i) => Err(invalid!("window_ids[{i}] = {} is negative; window ids must be >= 0 (-1 marks an empty slot)", ids[i])),
        None => Ok(()),
    }
}

impl TopK {
    pub fn new(n_neurons: usize, k: usize) -> Result<Self> {
        if n_neurons == 0 {
            return Err(invalid!("n_neurons must be at least 1"));
        }
        if k == 0 {
            return Err(invalid!("k must be at least 1"));
        }
        let total = n_neurons
            .checked_mul(k)
            .filter(|&t| t <= MAX_SLOTS)
            .ok_or_else(|| invalid!("n_neurons * k = {n_neurons} * {k} is too large (at most 2**30 slots, 12 bytes each)"))?;
        Ok(TopK {
            n_neurons,
            k,
            ids: filled(total, -1)?,
            scores: filled(total, f32::NEG_INFINITY)?,
            len: filled(n_neurons, 0)?,
            a_max: filled(n_neurons, f32::NEG_INFINITY)?,
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
        check_window_ids(b.window_ids)?;
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
        })?;
        if let Some((w, tok, j)) = nan_at {
            return Err(invalid!("activations[{w}, {tok}, {j}] is NaN; the batch was not applied"));
        }
        self.insert(&window_max, b.window_ids)
    }

    /// Folds in window scores computed elsewhere (e.g. reduced on the GPU, so only
    /// `[batch, n_neurons]` crosses to the host): `window_max[w * n_neurons + j]` is neuron j's
    /// largest activation over window w's scored tokens, -inf when none was scored. Same
    /// result as [`TopK::update`] on the activations they come from; NaN is refused (nothing
    /// changes).
    pub fn update_window_max(&mut self, window_max: &[f32], window_ids: &[i64]) -> Result<()> {
        let n = self.n_neurons;
        let bsz = window_ids.len();
        if Some(window_max.len()) != bsz.checked_mul(n) {
            return Err(invalid!(
                "window_max holds {} values, expected batch * n_neurons = {bsz} * {n} (one row per window id)",
                window_max.len()
            ));
        }
        check_window_ids(window_ids)?;
        const CHUNK: usize = 1 << 14;
        let first_nan = parallel::install(|| {
            window_max
                .par_chunks(CHUNK)
                .enumerate()
                .find_map_first(|(c, ch)| ch.iter().position(|v| v.is_nan()).map(|p| c * CHUNK + p))
        })?;
        if let Some(i) = first_nan {
            return Err(invalid!("window_max[{}, {}] is NaN; the batch was not applied", i / n, i % n));
        }
        if bsz == 0 {
            return Ok(());
        }
        // Row-major, per block of neurons: every score raises a_max, and only a score that can
        // enter the neuron's list (any while it holds fewer than k, else at least its k-th) is
        // inserted. After the first batches almost none can, so this reads each row once.
        let k = self.k;
        parallel::install(|| {
            self.ids
                .par_chunks_mut(ROW_BLOCK * k)
                .zip(self.scores.par_chunks_mut(ROW_BLOCK * k))
                .zip(self.len.par_chunks_mut(ROW_BLOCK))
                .zip(self.a_max.par_chunks_mut(ROW_BLOCK))
                .enumerate()
                .for_each(|(blk, (((ids, scores), len), amax))| {
                    let j0 = blk * ROW_BLOCK;
                    let width = amax.len();
                    let mut floor: Vec<f32> = (0..width).map(|x| entry_floor(&scores[x * k..][..k], len[x], k)).collect();
                    for (w, &id) in window_ids.iter().enumerate() {
                        let row = &window_max[w * n + j0..][..width];
                        for (x, &s) in row.iter().enumerate() {
                            if s < floor[x] || s == f32::NEG_INFINITY {
                                continue;
                            }
                            raise_max(&mut amax[x], s);
                            let (ids, scores) = (&mut ids[x * k..][..k], &mut scores[x * k..][..k]);
                            insert_one(ids, scores, &mut len[x], s, id);
                            floor[x] = entry_floor(scores, len[x], k);
                        }
                    }
                })
        })
    }

    /// Phase 2: inserts window scores `[n_neurons, batch]` (-inf = not scored); neurons
    /// independent.
    fn insert(&mut self, window_max: &[f32], window_ids: &[i64]) -> Result<()> {
        let (k, bsz) = (self.k, window_ids.len());
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
                        raise_max(amax, s);
                        insert_one(ids, scores, len, s, window_ids[w]);
                    }
                })
        })
    }

    /// Folds in another accumulator's result, as if its windows had been folded into this one.
    /// Exact when the two saw disjoint windows (shards of one scan): the k best of a union are
    /// the k best of the two k-best lists. Refuses a different n_neurons or k (nothing changes).
    pub fn merge(&mut self, other: &TopK) -> Result<()> {
        if other.n_neurons != self.n_neurons || other.k != self.k {
            return Err(invalid!(
                "cannot merge TopK(n_neurons={}, k={}) into TopK(n_neurons={}, k={}): both must have the same n_neurons and k",
                other.n_neurons,
                other.k,
                self.n_neurons,
                self.k
            ));
        }
        let k = self.k;
        parallel::install(|| {
            self.ids
                .par_chunks_mut(k)
                .zip(self.scores.par_chunks_mut(k))
                .zip(self.len.par_iter_mut())
                .zip(self.a_max.par_iter_mut())
                .enumerate()
                .for_each(|(j, (((ids, scores), len), amax))| {
                    let lb = other.len[j] as usize;
                    if lb == 0 {
                        return;
                    }
                    raise_max(amax, other.a_max[j]);
                    let (ob_ids, ob_scores) = (&other.ids[j * k..j * k + lb], &other.scores[j * k..j * k + lb]);
                    let la = *len as usize;
                    let (a_ids, a_scores): (Vec<i64>, Vec<f32>) = (ids[..la].to_vec(), scores[..la].to_vec());
                    let (mut ia, mut ib) = (0, 0);
                    let total = (la + lb).min(k);
                    for slot in 0..total {
                        // Equal (score, id) pairs are interchangeable, so taking `a` first is exact.
                        let take_a = ib == lb || (ia < la && !better(ob_scores[ib], ob_ids[ib], a_scores[ia], a_ids[ia]));
                        if take_a {
                            ids[slot] = a_ids[ia];
                            scores[slot] = a_scores[ia];
                            ia += 1;
                        } else {
                            ids[slot] = ob_ids[ib];
                            scores[slot] = ob_scores[ib];
                            ib += 1;
                        }
                    }
                    *len = total as u32;
                })
        })
    }

    /// `[n_neurons]` filled slots per neuron.
    pub fn filled(&self) -> &[u32] {
        &self.len
    }

    /// Builds an accumulator from its result arrays (as `top` and `max_activation` give them):
    /// `ids` / `scores` `[n_neurons * k]` row-major, best first, -1 / -inf pad; `a_max`
    /// `[n_neurons]`. Checks every invariant an accumulator keeps, so a merge of the result is
    /// as exact as a merge of the original.
    pub fn from_parts(n_neurons: usize, k: usize, ids: Vec<i64>, scores: Vec<f32>, a_max: Vec<f32>) -> Result<Self> {
        let mut tk = TopK::new(n_neurons, k)?;
        if ids.len() != n_neurons * k || scores.len() != n_neurons * k || a_max.len() != n_neurons {
            return Err(invalid!(
                "TopK arrays have {} ids, {} scores and {} a_max values; n_neurons = {n_neurons}, k = {k} need {} , {} and {n_neurons}",
                ids.len(),
                scores.len(),
                a_max.len(),
                n_neurons * k,
                n_neurons * k
            ));
        }
        for j in 0..n_neurons {
            let (row_ids, row_scores) = (&ids[j * k..(j + 1) * k], &scores[j * k..(j + 1) * k]);
            let l = row_scores.iter().position(|&s| s == f32::NEG_INFINITY).unwrap_or(k);
            for x in 0..k {
                let (s, id) = (row_scores[x], row_ids[x]);
                if x < l {
                    if s.is_nan() {
                        return Err(invalid!("TopK scores[{j}, {x}] is NaN"));
                    }
                    if x > 0 && better(s, id, row_scores[x - 1], row_ids[x - 1]) {
                        return Err(invalid!(
                            "TopK row {j} is not sorted best first (higher score, then smaller window id) at slot {x}"
                        ));
                    }
                } else if s != f32::NEG_INFINITY || id != -1 {
                    return Err(invalid!("TopK row {j}: slot {x} follows an empty slot but holds (id {id}, score {s}); empty slots are -1 / -inf"));
                }
            }
            let m = a_max[j];
            // Every scored window is a candidate, so the best kept score is a_max.
            let ok = if l == 0 { m == f32::NEG_INFINITY } else { m == row_scores[0] };
            if !ok {
                return Err(invalid!(
                    "TopK a_max[{j}] = {m} does not match the neuron's best score ({}); a_max is the best window score, -inf with no window",
                    if l == 0 { f32::NEG_INFINITY } else { row_scores[0] }
                ));
            }
            tk.len[j] = l as u32;
        }
        tk.ids = ids;
        tk.scores = scores;
        tk.a_max = a_max;
        Ok(tk)
    }

    /// The binary form (module docs); `from_bytes(to_bytes())` is exact.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.n_neurons;
        let nk = n * self.k;
        let mut out = Vec::with_capacity(TOPK_HEADER_LEN + n * 8 + nk * 12 + 4);
        out.extend_from_slice(TOPK_MAGIC);
        out.extend_from_slice(&TOPK_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&(self.k as u32).to_le_bytes());
        self.len.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        self.a_max.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        self.ids.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        self.scores.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads the binary form; refuses a wrong magic, an unknown version, a wrong length, a bad
    /// checksum or contents that break the accumulator's invariants.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if data.len() < TOPK_HEADER_LEN + 4 || &data[..4] != TOPK_MAGIC {
            return Err(corrupt!("not a serialised TopK (expected the magic \"N2TK\" and at least {} bytes)", TOPK_HEADER_LEN + 4));
        }
        let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
        let version = u16_at(4);
        if version != TOPK_FORMAT_VERSION {
            return Err(corrupt!("TopK format version {version} is not supported (this build reads version {TOPK_FORMAT_VERSION})"));
        }
        let (n, k) = (u32_at(8) as usize, u32_at(12) as usize);
        let want = n
            .checked_mul(k)
            .and_then(|nk| nk.checked_mul(12))
            .and_then(|b| b.checked_add(n * 8 + TOPK_HEADER_LEN + 4));
        if want != Some(data.len()) {
            return Err(corrupt!("serialised TopK(n_neurons={n}, k={k}) has {} bytes, expected {want:?}", data.len()));
        }
        let body_end = data.len() - 4;
        if crc32fast::hash(&data[..body_end]) != u32_at(body_end) {
            return Err(corrupt!("serialised TopK is corrupt (checksum mismatch)"));
        }
        let nk = n * k;
        let mut o = TOPK_HEADER_LEN;
        let lens: Vec<u32> = (0..n).map(|i| u32_at(o + 4 * i)).collect();
        o += 4 * n;
        let a_max: Vec<f32> = (0..n).map(|i| f32::from_le_bytes(data[o + 4 * i..o + 4 * i + 4].try_into().unwrap())).collect();
        o += 4 * n;
        let ids: Vec<i64> = (0..nk).map(|i| i64::from_le_bytes(data[o + 8 * i..o + 8 * i + 8].try_into().unwrap())).collect();
        o += 8 * nk;
        let scores: Vec<f32> = (0..nk).map(|i| f32::from_le_bytes(data[o + 4 * i..o + 4 * i + 4].try_into().unwrap())).collect();
        let tk = TopK::from_parts(n, k, ids, scores, a_max).map_err(|e| corrupt!("serialised TopK is invalid: {e}"))?;
        if tk.len != lens {
            return Err(corrupt!("serialised TopK is invalid: its slot counts do not match its scores"));
        }
        Ok(tk)
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

    /// A random scan: `[windows, t, n]` small-integer activations (with -0.0, so ties and signed
    /// zeros happen), a mask with some windows fully masked, distinct shuffled window ids.
    fn random_scan(n: usize, w: usize, t: usize, seed: u64) -> (Vec<f32>, Vec<bool>, Vec<i64>) {
        let mut x = seed;
        let mut rnd = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u32
        };
        let acts: Vec<f32> = (0..w * t * n).map(|_| match rnd() % 8 { 7 => -0.0, v => v as f32 - 3.0 }).collect();
        let mask: Vec<bool> = (0..w * t).map(|_| rnd() % 4 != 0).collect();
        let mut ids: Vec<i64> = (0..w as i64).map(|i| i * 3 + 5).collect();
        for i in (1..w).rev() {
            ids.swap(i, rnd() as usize % (i + 1));
        }
        (acts, mask, ids)
    }

    /// Folds windows `lo..hi` of a random scan into `tk`, in batches of `step` windows.
    fn fold(tk: &mut TopK, scan: &(Vec<f32>, Vec<bool>, Vec<i64>), t: usize, lo: usize, hi: usize, step: usize) {
        let n = tk.n_neurons();
        let mut s = lo;
        while s < hi {
            let e = (s + step).min(hi);
            tk.update(&Batch {
                activations: &scan.0[s * t * n..e * t * n],
                batch: e - s,
                tokens: t,
                window_ids: &scan.2[s..e],
                token_mask: Some(&scan.1[s * t..e * t]),
            })
            .unwrap();
            s = e;
        }
    }

    #[test]
    fn update_window_max_equals_update_and_refuses_bad_input() {
        let (n, w, t) = (300, 9, 3);
        let scan = random_scan(n, w, t, 7);
        let mut a = TopK::new(n, 4).unwrap();
        fold(&mut a, &scan, t, 0, w, 4);
        // Window maxima as a device would reduce them: masked tokens are -inf, max over tokens
        // in token order (first of equal values kept, as `update` does).
        let mut b = TopK::new(n, 4).unwrap();
        let mut wmax = vec![f32::NEG_INFINITY; w * n];
        for win in 0..w {
            for tok in 0..t {
                if scan.1[win * t + tok] {
                    for j in 0..n {
                        let v = scan.0[(win * t + tok) * n + j];
                        if v > wmax[win * n + j] {
                            wmax[win * n + j] = v;
                        }
                    }
                }
            }
        }
        for (lo, hi) in [(0, 4), (4, 9)] {
            b.update_window_max(&wmax[lo * n..hi * n], &scan.2[lo..hi]).unwrap();
        }
        assert_eq!(b.to_bytes(), a.to_bytes());
        let before = b.to_bytes();
        assert!(b.update_window_max(&wmax[..n], &scan.2[..2]).is_err());
        let mut nan = wmax[..n].to_vec();
        nan[5] = f32::NAN;
        assert!(b.update_window_max(&nan, &scan.2[..1]).unwrap_err().to_string().contains("[0, 5]"));
        assert_eq!(b.to_bytes(), before);
    }

    #[test]
    fn merge_refuses_other_shape_and_bytes_refuse_damage() {
        let mut a = TopK::new(3, 2).unwrap();
        assert!(a.merge(&TopK::new(3, 3).unwrap()).is_err());
        assert!(a.merge(&TopK::new(4, 2).unwrap()).is_err());
        let scan = random_scan(3, 5, 2, 1);
        fold(&mut a, &scan, 2, 0, 5, 2);
        let bytes = a.to_bytes();
        assert_eq!(TopK::from_bytes(&bytes).unwrap().to_bytes(), bytes);
        for cut in [0, 10, bytes.len() - 1] {
            assert!(TopK::from_bytes(&bytes[..cut]).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[TOPK_HEADER_LEN + 2] ^= 1;
        assert!(TopK::from_bytes(&flipped).unwrap_err().to_string().contains("checksum"));
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(TopK::from_bytes(&v2).unwrap_err().to_string().contains("version 2"));
        // Unsorted rows and an a_max that is not the best score are refused.
        assert!(TopK::from_parts(1, 2, vec![1, 2], vec![1.0, 2.0], vec![2.0]).is_err());
        assert!(TopK::from_parts(1, 2, vec![1, 2], vec![2.0, 1.0], vec![3.0]).is_err());
        assert!(TopK::from_parts(1, 2, vec![1, 5], vec![2.0, f32::NEG_INFINITY], vec![2.0]).is_err());
        assert!(TopK::from_parts(1, 2, vec![2, 1], vec![2.0, 2.0], vec![2.0]).is_err());
        assert!(TopK::from_parts(1, 2, vec![1, 2], vec![2.0, 2.0], vec![2.0]).is_ok());
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

        /// Window maxima reduced elsewhere (as on a GPU) and folded row by row give the brute
        /// force's result too: ties, -0.0, windows with no scored token (-inf), lists that fill
        /// and then mostly refuse, and neuron counts that leave a partial block.
        #[test]
        fn window_max_equals_brute_force(
            n in 1usize..300, k in 1usize..5,
            batches in prop::collection::vec((1usize..12, 1usize..4, any::<u64>()), 1..6)
        ) {
            let mut tk = TopK::new(n, k).unwrap();
            let mut data = Vec::new();
            let mut next_id = 0i64;
            for (b, t, seed) in batches {
                let mut x = seed;
                let mut rnd = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 33) as u32 };
                let acts: Vec<f32> = (0..b * t * n).map(|_| match rnd() % 8 { 7 => -0.0, v => v as f32 - 3.0 }).collect();
                let mask: Vec<bool> = (0..b * t).map(|_| rnd() % 3 != 0).collect();
                let wid: Vec<i64> = (0..b as i64).map(|w| { next_id += 1; (next_id * 7919 + w) % 101 }).collect();
                let mut wmax = vec![f32::NEG_INFINITY; b * n];
                for w in 0..b {
                    for tok in (0..t).filter(|&tok| mask[w * t + tok]) {
                        for j in 0..n {
                            let v = acts[(w * t + tok) * n + j];
                            if v > wmax[w * n + j] {
                                wmax[w * n + j] = v;
                            }
                        }
                    }
                }
                tk.update_window_max(&wmax, &wid).unwrap();
                data.push((acts, b, t, wid, Some(mask)));
            }
            let (ids, scores, amax) = brute(n, k, &data);
            prop_assert_eq!(tk.top().0, &ids[..]);
            prop_assert_eq!(tk.top().1, &scores[..]);
            prop_assert_eq!(tk.max_activation(), &amax[..]);
        }

        /// A scan split into random shards (disjoint window ranges, each folded in its own batch
        /// sizes), merged in a random order and grouping, some through the binary form, equals
        /// the single pass bit for bit.
        #[test]
        fn sharded_merge_equals_single_pass(
            n in 1usize..40, k in 1usize..6, w in 1usize..30, t in 1usize..4, seed in any::<u64>(),
            cuts in prop::collection::vec(0usize..30, 0..6),
            steps in prop::collection::vec(1usize..5, 8),
            order in prop::collection::vec(any::<u64>(), 8),
        ) {
            let scan = random_scan(n, w, t, seed);
            let mut single = TopK::new(n, k).unwrap();
            fold(&mut single, &scan, t, 0, w, steps[0]);
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (w + 1)).chain([0, w]).collect();
            bounds.sort_unstable();
            let mut pool: Vec<TopK> = bounds.windows(2).enumerate().map(|(i, r)| {
                let mut tk = TopK::new(n, k).unwrap();
                fold(&mut tk, &scan, t, r[0], r[1], steps[(i + 1) % steps.len()]);
                tk
            }).collect();
            let mut r = 0;
            while pool.len() > 1 {
                let pick = order[r % order.len()].rotate_left(r as u32);
                r += 1;
                let a = pool.swap_remove(pick as usize % pool.len());
                let mut b = pool.swap_remove((pick >> 20) as usize % pool.len());
                let a = if pick & 1 == 1 { TopK::from_bytes(&a.to_bytes()).unwrap() } else { a };
                b.merge(&a).unwrap();
                pool.push(b);
            }
            prop_assert_eq!(pool[0].to_bytes(), single.to_bytes());
        }
    }
}
