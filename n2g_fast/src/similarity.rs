//! Graph similarity (n2g-method.md section 9) over node-label sets, IGNORE excluded.
//!
//! For graphs i and j with activating-label sets A and context-label sets C:
//! - similar pair: |A_i n A_j| / max(|A_i|, |A_j|) >= t and the same for C;
//! - subset pair: |A_i n A_j| / min(|A_i|, |A_j|) >= t and the same for C, and not similar. The
//!   subset side is the graph with fewer labels in total (|A| + |C|), ties by smaller key;
//! - denominators are at least 1 (the reference's max(size, 1)), so an empty set overlaps
//!   nothing and graphs without context tokens are never similar nor subsets.
//!
//! All pairs without a quadratic scan (a prefix-filtered set-similarity join): a pair can only
//! qualify if |S_i n S_j| >= m = ceil(t * s), s = the smaller set's size, for S = A and for
//! S = C alike; then the smaller set must share a label with the other among its first
//! s - m + 1 labels when labels are ordered rarest first. So each graph probes the inverted index
//! with that prefix only, against graphs with a set at least as large (size, then index), and
//! candidates are verified exactly (activating sets first, the cheap test). Either family (A or
//! C) gives every qualifying pair exactly once; the join uses the one whose prefixes touch fewer
//! postings in total (with common activating tokens, context sets are usually far more
//! selective, and vice versa). Graphs are processed in parallel. Similar pairs are a subset of
//! the candidates (max >= min), so one pass yields both lists.

use crate::error::{invalid, Result};
use crate::parallel;
use crate::search::{intersection_len, Key, StoreIndex};
use rayon::prelude::*;

/// One pair with its two overlaps (by max for similar pairs, by min for subset pairs).
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub a: Key,
    pub b: Key,
    pub activating: f32,
    pub context: f32,
}

pub fn check_threshold(t: f64) -> Result<f32> {
    if t > 0.0 && t <= 1.0 {
        // A positive threshold below f32's range would round to 0 (which selects nothing); the
        // smallest positive f32 selects the same pairs as any tiny threshold (overlaps are 0 or
        // at least 1 / set size).
        Ok((t as f32).max(f32::from_bits(1)))
    } else {
        Err(invalid!("threshold must be in (0, 1], got {t}"))
    }
}

/// |A n B| / max(|A|, |B|, 1).
pub fn overlap_max(inter: usize, a: usize, b: usize) -> f32 {
    inter as f32 / a.max(b).max(1) as f32
}

/// |A n B| / max(min(|A|, |B|), 1).
pub fn overlap_min(inter: usize, a: usize, b: usize) -> f32 {
    inter as f32 / a.min(b).max(1) as f32
}

/// Smallest m with m / s >= t, computed with the same f32 arithmetic as the check.
fn min_overlap(s: usize, t: f32) -> usize {
    let mut m = ((t * s as f32).ceil() as usize).min(s);
    while m > 0 && overlap_min(m - 1, s, s) >= t {
        m -= 1;
    }
    while m <= s && overlap_min(m, s, s) < t {
        m += 1;
    }
    m
}

/// Classifies a pair: Some((similar, act overlap, ctx overlap)) if it is similar or subset.
fn classify(ix: &StoreIndex, i: usize, j: usize, t: f32) -> Option<(bool, f32, f32)> {
    let (ai, aj, ci, cj) = (&ix.act_sets[i], &ix.act_sets[j], &ix.ctx_sets[i], &ix.ctx_sets[j]);
    let ia = intersection_len(ai, aj);
    if overlap_min(ia, ai.len(), aj.len()) < t {
        return None;
    }
    let ic = intersection_len(ci, cj);
    if overlap_min(ic, ci.len(), cj.len()) < t {
        return None;
    }
    let (ma, mc) = (overlap_max(ia, ai.len(), aj.len()), overlap_max(ic, ci.len(), cj.len()));
    if ma >= t && mc >= t {
        Some((true, ma, mc))
    } else {
        Some((false, overlap_min(ia, ai.len(), aj.len()), overlap_min(ic, ci.len(), cj.len())))
    }
}

fn subset_order(ix: &StoreIndex, i: usize, j: usize) -> (usize, usize) {
    let size = |g: usize| ix.act_sets[g].len() + ix.ctx_sets[g].len();
    if (size(i), ix.keys[i]) <= (size(j), ix.keys[j]) {
        (i, j)
    } else {
        (j, i)
    }
}

/// Per-graph summary in one cache line: Bloom-style signatures of both label sets (64 bits for
/// activating sets, 256 for the larger context sets) and their sizes. Most candidate pairs are
/// rejected from these alone, before the label sets themselves are read.
#[derive(Clone, Copy, Default)]
struct Sig {
    act: [u64; 1],
    ctx: [u64; 4],
    n_act: u32,
    n_ctx: u32,
}

impl Sig {
    /// (word, mask) of label `l` in a signature of `bits` bits.
    #[inline]
    fn bit(l: u32, bits: u32) -> (usize, u64) {
        let h = ((l as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32 % bits;
        ((h / 64) as usize, 1u64 << (h % 64))
    }
    fn new(act: &[u32], ctx: &[u32]) -> Self {
        let mut s = Sig { n_act: act.len() as u32, n_ctx: ctx.len() as u32, ..Default::default() };
        for &l in act {
            let (w, m) = Sig::bit(l, 64);
            s.act[w] |= m;
        }
        for &l in ctx {
            let (w, m) = Sig::bit(l, 256);
            s.ctx[w] |= m;
        }
        s
    }
}

/// Rarest-first prefix of `set` that any qualifying partner must meet.
fn prefix<'a>(set: &[u32], freq: &[u32], t: f32, buf: &'a mut Vec<u32>) -> &'a [u32] {
    buf.clear();
    buf.extend_from_slice(set);
    buf.sort_unstable_by_key(|&l| (freq[l as usize], l));
    let s = set.len();
    let m = min_overlap(s, t);
    let len = if s == 0 || m == 0 || m > s { 0 } else { s - m + 1 };
    &buf[..len]
}

/// (similar pairs, subset pairs), each sorted by (a, b); similar pairs have a < b. Errors only
/// when the crate's thread pool cannot start.
pub fn all_pairs(ix: &StoreIndex, t: f32) -> Result<(Vec<Pair>, Vec<Pair>)> {
    all_pairs_by(ix, t, None)
}

/// `family`: Some(0) = activating-set prefixes, Some(1) = context-set prefixes, None = the
/// cheaper (tests force each).
fn all_pairs_by(ix: &StoreIndex, t: f32, family: Option<usize>) -> Result<(Vec<Pair>, Vec<Pair>)> {
    parallel::install(|| all_pairs_in_pool(ix, t, family))
}

/// [`all_pairs_by`]'s work; its parallel iterators need the crate's pool around them.
fn all_pairs_in_pool(ix: &StoreIndex, t: f32, family: Option<usize>) -> (Vec<Pair>, Vec<Pair>) {
    let n = ix.len();
    let usable = |g: usize| !ix.act_sets[g].is_empty() && !ix.ctx_sets[g].is_empty();
    // Pick the family (activating or context sets) whose prefixes touch fewer postings.
    let families = [(&ix.act_sets, &ix.act_by_label), (&ix.ctx_sets, &ix.ctx_by_label)];
    let costs: Vec<u64> = families
        .iter()
        .map(|(sets, by_label)| {
            let freq: Vec<u32> = by_label.iter().map(|p| p.len() as u32).collect();
            (0..n)
                .into_par_iter()
                .filter(|&g| usable(g))
                .map_init(Vec::new, |buf, g| prefix(&sets[g], &freq, t, buf).iter().map(|&l| by_label[l as usize].len() as u64).sum::<u64>())
                .sum()
        })
        .collect();
    let fam = family.unwrap_or(if costs[1] < costs[0] { 1 } else { 0 });
    let (sets, by_label) = families[fam];
    let freq: Vec<u32> = by_label.iter().map(|p| p.len() as u32).collect();
    let sigs: Vec<Sig> = (0..n).into_par_iter().map(|g| Sig::new(&ix.act_sets[g], &ix.ctx_sets[g])).collect();
    let max_size = sigs.iter().map(|s| s.n_act.max(s.n_ctx) as usize).max().unwrap_or(0);
    // need[s] = least intersection that reaches t against a smaller set of size s.
    let need: Vec<u32> = (0..=max_size).map(|s| if s == 0 { u32::MAX } else { min_overlap(s, t) as u32 }).collect();
    let by_act = fam == 0;
    let size = |sig: &Sig| if by_act { sig.n_act } else { sig.n_ctx };
    let found: Vec<(bool, Pair)> = (0..n)
        .into_par_iter()
        .map_init(
            || (vec![u32::MAX; n], Vec::new(), Vec::new(), Vec::new()),
            |(seen, buf, act_bits, ctx_bits), i| {
                let mut out = Vec::new();
                let si = sigs[i];
                if si.n_act == 0 || si.n_ctx == 0 {
                    return out;
                }
                act_bits.clear();
                act_bits.extend(ix.act_sets[i].iter().map(|&l| Sig::bit(l, 64)));
                ctx_bits.clear();
                ctx_bits.extend(ix.ctx_sets[i].iter().map(|&l| Sig::bit(l, 256)));
                let order_i = (size(&si), i);
                for &l in prefix(&sets[i], &freq, t, buf) {
                    for &j in &by_label[l as usize] {
                        let j = j as usize;
                        let sj = &sigs[j];
                        if (size(sj), j) <= order_i || seen[j] == i as u32 || sj.n_act == 0 || sj.n_ctx == 0 {
                            continue;
                        }
                        seen[j] = i as u32;
                        // Signature test: labels of i whose bit is absent from j's signature
                        // are surely not in j, so the bit count bounds the intersection.
                        let act_present = act_bits.iter().filter(|&&(w, m)| sj.act[w] & m != 0).count() as u32;
                        if act_present < need[si.n_act.min(sj.n_act) as usize] {
                            continue;
                        }
                        let ctx_present = ctx_bits.iter().filter(|&&(w, m)| sj.ctx[w] & m != 0).count() as u32;
                        if ctx_present < need[si.n_ctx.min(sj.n_ctx) as usize] {
                            continue;
                        }
                        if let Some((similar, pa, pc)) = classify(ix, i, j, t) {
                            let (a, b) = if similar {
                                if ix.keys[i] < ix.keys[j] {
                                    (i, j)
                                } else {
                                    (j, i)
                                }
                            } else {
                                subset_order(ix, i, j)
                            };
                            out.push((similar, Pair { a: ix.keys[a], b: ix.keys[b], activating: pa, context: pc }));
                        }
                    }
                }
                out
            },
        )
        .flatten_iter()
        .collect();
    let (mut sim, mut sub): (Vec<_>, Vec<_>) = found.into_iter().partition(|(s, _)| *s);
    sim.sort_by_key(|x| (x.1.a, x.1.b));
    sub.sort_by_key(|x| (x.1.a, x.1.b));
    (sim.into_iter().map(|x| x.1).collect(), sub.into_iter().map(|x| x.1).collect())
}

/// Neighbours of graph `g`: every graph sharing at least one label (activating or context),
/// scored by the mean of the two max-normalised overlaps, (|A n A'| / max + |C n C'| / max) / 2,
/// which is 1 for identical label sets. Best first (ties by key), score > 0, at most `k`.
/// Returns (key, score, activating overlap, context overlap).
pub fn neighbours(ix: &StoreIndex, g: usize, k: usize) -> Vec<(Key, f32, f32, f32)> {
    // The overlaps come from g's posting lists (an inverted index): each graph sharing a label
    // gains one count a shared label. The former candidate list (every posting of every label,
    // sorted, then a set intersection per candidate) cost 1.3 s a neuron on a whole model, where
    // common context labels post tens of thousands of graphs each.
    let n = ix.len();
    let (mut act, mut ctx) = (vec![0u32; n], vec![0u32; n]);
    let mut touched: Vec<u32> = Vec::new();
    for (sets, by_label, counts) in [(&ix.act_sets, &ix.act_by_label, &mut act), (&ix.ctx_sets, &ix.ctx_by_label, &mut ctx)] {
        for &l in &sets[g] {
            for &j in &by_label[l as usize] {
                if counts[j as usize] == 0 {
                    touched.push(j);
                }
                counts[j as usize] += 1;
            }
        }
    }
    touched.sort_unstable();
    touched.dedup(); // (a graph sharing both kinds of label was pushed once for each)
    let mut out: Vec<(Key, f32, f32, f32)> = touched
        .into_iter()
        .map(|j| j as usize)
        .filter(|&j| j != g)
        .filter_map(|j| {
            let pa = overlap_max(act[j] as usize, ix.act_sets[g].len(), ix.act_sets[j].len());
            let pc = overlap_max(ctx[j] as usize, ix.ctx_sets[g].len(), ix.ctx_sets[j].len());
            let score = (pa + pc) / 2.0;
            (score > 0.0).then_some((ix.keys[j], score, pa, pc))
        })
        .collect();
    out.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    out.truncate(k);
    out
}

/// The quadratic reference (tests and benchmarks): every pair, the definitions verbatim.
pub fn all_pairs_brute(ix: &StoreIndex, t: f32) -> (Vec<Pair>, Vec<Pair>) {
    let (mut sim, mut sub) = (Vec::new(), Vec::new());
    for i in 0..ix.len() {
        for j in i + 1..ix.len() {
            let (a, b, c, d) = (&ix.act_sets[i], &ix.act_sets[j], &ix.ctx_sets[i], &ix.ctx_sets[j]);
            let (ia, ic) = (intersection_len(a, b), intersection_len(c, d));
            let (ma, mc) = (overlap_max(ia, a.len(), b.len()), overlap_max(ic, c.len(), d.len()));
            if ma >= t && mc >= t {
                let (x, y) = if ix.keys[i] < ix.keys[j] { (i, j) } else { (j, i) };
                sim.push(Pair { a: ix.keys[x], b: ix.keys[y], activating: ma, context: mc });
                continue;
            }
            let (na, nc) = (overlap_min(ia, a.len(), b.len()), overlap_min(ic, c.len(), d.len()));
            if na >= t && nc >= t {
                let (x, y) = subset_order(ix, i, j);
                sub.push(Pair { a: ix.keys[x], b: ix.keys[y], activating: na, context: nc });
            }
        }
    }
    sim.sort_by_key(|x| (x.a, x.b));
    sub.sort_by_key(|x| (x.a, x.b));
    (sim, sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::tests::arb_graphs;
    use crate::trie::tests::tok;
    use crate::trie::NeuronGraph;
    use proptest::prelude::*;

    fn graph(neuron: u32, act: &[&str], ctx: &[&str]) -> NeuronGraph {
        let mut g = NeuronGraph::new("m".into(), 0, neuron, "h".into(), 1.0).unwrap();
        for a in act {
            for c in ctx {
                g.add_path(&tok(a, &[1], 0.9), &[Some(tok(c, &[2], 0.9))], 0.8).unwrap();
            }
            if ctx.is_empty() {
                g.add_path(&tok(a, &[1], 0.9), &[], 0.8).unwrap();
            }
        }
        g.finalize().unwrap();
        g
    }

    #[test]
    fn similar_subset_and_empty_context() {
        let gs = [
            graph(0, &["a"], &["x", "y"]),
            graph(1, &["a"], &["x", "y"]),                 // identical to 0: similar
            graph(2, &["a"], &["x", "y", "z", "w", "v"]),  // superset of 0 and 1 by context
            graph(3, &["a"], &[]),                         // no context: never paired
            graph(4, &["a"], &[]),
        ];
        let ix = StoreIndex::build(gs.iter().map(|g| (g.key(), g))).unwrap();
        let (sim, sub) = all_pairs(&ix, 0.9).unwrap();
        assert_eq!(sim, vec![Pair { a: (0, 0), b: (0, 1), activating: 1.0, context: 1.0 }]);
        assert_eq!(sub.iter().map(|p| (p.a, p.b)).collect::<Vec<_>>(), vec![((0, 0), (0, 2)), ((0, 1), (0, 2))]);
        assert_eq!((sim.clone(), sub.clone()), all_pairs_brute(&ix, 0.9));
        let nb = neighbours(&ix, 0, 10);
        assert_eq!(nb[0], ((0, 1), 1.0, 1.0, 1.0));
        assert_eq!(nb.len(), 4);
        assert!(check_threshold(0.0).is_err() && check_threshold(1.5).is_err() && check_threshold(f64::NAN).is_err());
    }

    #[test]
    fn min_overlap_is_exact() {
        for s in 1..50 {
            for t in [0.1f32, 0.5, 0.8, 0.9, 0.95, 1.0] {
                let m = min_overlap(s, t);
                assert!(overlap_min(m, s, s) >= t && (m == 0 || overlap_min(m - 1, s, s) < t));
            }
        }
    }

    proptest! {
        #[test]
        fn pairs_equal_brute_force(gs in arb_graphs(), t in prop_oneof![Just(0.9f32), Just(0.5), Just(1.0), 0.05f32..1.0]) {
            let ix = StoreIndex::build(gs.iter().map(|g| (g.key(), g))).unwrap();
            let want = all_pairs_brute(&ix, t);
            prop_assert_eq!(all_pairs_by(&ix, t, Some(0)).unwrap(), want.clone());
            prop_assert_eq!(all_pairs_by(&ix, t, Some(1)).unwrap(), want);
        }

        #[test]
        fn neighbours_equal_brute_force(gs in arb_graphs(), k in 1usize..6) {
            let ix = StoreIndex::build(gs.iter().map(|g| (g.key(), g))).unwrap();
            for g in 0..ix.len() {
                let mut want: Vec<(Key, f32, f32, f32)> = (0..ix.len()).filter(|&j| j != g).map(|j| {
                    let (a, b, c, d) = (&ix.act_sets[g], &ix.act_sets[j], &ix.ctx_sets[g], &ix.ctx_sets[j]);
                    let pa = overlap_max(intersection_len(a, b), a.len(), b.len());
                    let pc = overlap_max(intersection_len(c, d), c.len(), d.len());
                    (ix.keys[j], (pa + pc) / 2.0, pa, pc)
                }).filter(|x| x.1 > 0.0).collect();
                want.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
                want.truncate(k);
                prop_assert_eq!(neighbours(&ix, g, k), want);
            }
        }
    }
}
