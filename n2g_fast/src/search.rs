//! The store's inverted index (n2g-method.md section 9): for every node label and token id, the
//! graphs that hold it as an activating token and as a context token (IGNORE excluded). It also
//! carries each graph's label sets as sorted integer ids, which similarity compares.
//!
//! Search is a conjunction of `(term, role)` clauses; a term is a token id (matched against node
//! id sets) or a label (matched exactly against normalised node labels).

use crate::error::{invalid, Result};
use crate::parallel;
use crate::trie::{Label, NeuronGraph};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::str::FromStr;
use smol_str::SmolStr;

pub type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Activating,
    Context,
    Either,
}

impl FromStr for Role {
    type Err = crate::error::N2GError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "activating" => Ok(Role::Activating),
            "context" => Ok(Role::Context),
            "either" => Ok(Role::Either),
            _ => Err(invalid!("role must be 'activating', 'context' or 'either', got '{s}'")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    Token(u32),
    Label(String),
}

/// Index over a snapshot of the store: graph `g` is `keys[g]` (keys sorted).
#[derive(Debug, Default)]
pub struct StoreIndex {
    pub keys: Vec<Key>,
    pub label_ids: FxHashMap<SmolStr, u32>,
    pub label_names: Vec<SmolStr>,
    /// Per graph: sorted label ids of its activating / context tokens.
    pub act_sets: Vec<Vec<u32>>,
    pub ctx_sets: Vec<Vec<u32>>,
    /// Per label id: sorted graph indices holding it as activating / context token.
    pub act_by_label: Vec<Vec<u32>>,
    pub ctx_by_label: Vec<Vec<u32>>,
    act_by_token: TokenPostings,
    ctx_by_token: TokenPostings,
}

/// token id -> sorted graph indices, in CSR form (one sort instead of a hash map of vectors).
#[derive(Debug, Default)]
struct TokenPostings {
    tokens: Vec<u32>,
    start: Vec<u32>,
    graphs: Vec<u32>,
}

impl TokenPostings {
    /// From (token, graph) pairs.
    /// `pairs` come in graph order without repeats, so a stable counting sort by token keeps
    /// each posting list sorted; ids too large for a counting array fall back to a sort.
    fn new(mut pairs: Vec<(u32, u32)>) -> Self {
        let max = pairs.iter().map(|p| p.0).max().unwrap_or(0);
        if max < (1 << 24) {
            let mut count = vec![0u32; max as usize + 2];
            for p in &pairs {
                count[p.0 as usize + 1] += 1;
            }
            for i in 0..count.len() - 1 {
                count[i + 1] += count[i];
            }
            let mut sorted = vec![(0u32, 0u32); pairs.len()];
            for &p in &pairs {
                sorted[count[p.0 as usize] as usize] = p;
                count[p.0 as usize] += 1;
            }
            pairs = sorted;
        } else {
            pairs.sort_unstable();
        }
        let mut p = TokenPostings { start: vec![0], ..Default::default() };
        for (i, &(t, g)) in pairs.iter().enumerate() {
            if i > 0 && pairs[i - 1].0 != t {
                p.start.push(p.graphs.len() as u32);
            }
            if i == 0 || pairs[i - 1].0 != t {
                p.tokens.push(t);
            }
            p.graphs.push(g);
        }
        p.start.push(p.graphs.len() as u32);
        if p.tokens.is_empty() {
            p.start = vec![0];
        }
        p
    }
    fn get(&self, t: u32) -> &[u32] {
        match self.tokens.binary_search(&t) {
            Ok(k) => &self.graphs[self.start[k] as usize..self.start[k + 1] as usize],
            Err(_) => &[],
        }
    }
}

/// One graph's labels (borrowed, repeats allowed: they are deduplicated as ids) and sorted
/// unique token ids, by role.
pub(crate) struct Extract<'a> {
    pub act_labels: Vec<&'a SmolStr>,
    pub ctx_labels: Vec<&'a SmolStr>,
    pub act_tokens: Vec<u32>,
    pub ctx_tokens: Vec<u32>,
}

/// Only nodes on paths that can fire count ([`NeuronGraph::can_fire`]): a graph is found for
/// the tokens it says the neuron fires on, not for those that carry its graded level.
fn extract(g: &NeuronGraph) -> Extract<'_> {
    let (roots, context) = g.firing_nodes();
    let mut e = Extract { act_labels: Vec::new(), ctx_labels: Vec::new(), act_tokens: Vec::new(), ctx_tokens: Vec::new() };
    for r in roots {
        let n = g.node(r);
        if let Label::Token(s) = &n.label {
            e.act_labels.push(s);
        }
        e.act_tokens.extend_from_slice(&n.token_ids);
    }
    for i in context {
        let n = g.node(i);
        if let Label::Token(s) = &n.label {
            e.ctx_labels.push(s);
            e.ctx_tokens.extend_from_slice(&n.token_ids);
        }
    }
    for v in [&mut e.act_tokens, &mut e.ctx_tokens] {
        v.sort_unstable();
        v.dedup();
    }
    e
}

/// Sorted intersection size.
pub fn intersection_len(a: &[u32], b: &[u32]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

fn intersect(a: &[u32], b: &[u32]) -> Vec<u32> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

fn union(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = a.iter().chain(b).copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

impl StoreIndex {
    /// Builds the index over `graphs` (keys unique). Per-graph extraction runs in parallel.
    pub fn build<'a>(graphs: impl Iterator<Item = (Key, &'a NeuronGraph)>) -> Result<StoreIndex> {
        let mut all: Vec<(Key, &NeuronGraph)> = graphs.collect();
        all.sort_by_key(|x| x.0);
        let (keys, gs): (Vec<Key>, Vec<&NeuronGraph>) = all.into_iter().unzip();
        let extracted: Vec<Extract> = parallel::install(|| gs.par_iter().map(|g| extract(g)).collect())?;
        Ok(Self::build_extracted(keys, extracted))
    }

    /// Builds the index from each graph's extract; `keys` sorted and unique, in the same order.
    pub(crate) fn build_extracted(keys: Vec<Key>, extracted: Vec<Extract>) -> StoreIndex {
        let mut ix = StoreIndex { keys, ..Default::default() };
        let (mut act_tok, mut ctx_tok) = (Vec::new(), Vec::new());
        let label_id = |ix: &mut StoreIndex, s: &SmolStr| -> u32 {
            if let Some(&id) = ix.label_ids.get(s.as_str()) {
                return id;
            }
            let id = ix.label_names.len() as u32;
            ix.label_ids.insert(s.clone(), id);
            ix.label_names.push(s.clone());
            ix.act_by_label.push(Vec::new());
            ix.ctx_by_label.push(Vec::new());
            id
        };
        for (g, e) in extracted.iter().enumerate() {
            let g = g as u32;
            let mut act: Vec<u32> = e.act_labels.iter().map(|s| label_id(&mut ix, s)).collect();
            let mut ctx: Vec<u32> = e.ctx_labels.iter().map(|s| label_id(&mut ix, s)).collect();
            act.sort_unstable();
            act.dedup();
            ctx.sort_unstable();
            ctx.dedup();
            // Graph indices grow, so every posting list stays sorted.
            for &l in &act {
                ix.act_by_label[l as usize].push(g);
            }
            for &l in &ctx {
                ix.ctx_by_label[l as usize].push(g);
            }
            act_tok.extend(e.act_tokens.iter().map(|&t| (t, g)));
            ctx_tok.extend(e.ctx_tokens.iter().map(|&t| (t, g)));
            ix.act_sets.push(act);
            ix.ctx_sets.push(ctx);
        }
        ix.act_by_token = TokenPostings::new(act_tok);
        ix.ctx_by_token = TokenPostings::new(ctx_tok);
        ix
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn postings(&self, term: &Term, role: Role) -> Vec<u32> {
        let (act, ctx): (&[u32], &[u32]) = match term {
            Term::Token(t) => (self.act_by_token.get(*t), self.ctx_by_token.get(*t)),
            Term::Label(s) => match self.label_ids.get(s.as_str()) {
                Some(&l) => (&self.act_by_label[l as usize], &self.ctx_by_label[l as usize]),
                None => (&[], &[]),
            },
        };
        match role {
            Role::Activating => act.to_vec(),
            Role::Context => ctx.to_vec(),
            Role::Either => union(act, ctx),
        }
    }

    /// Keys of the graphs matching every clause, sorted.
    pub fn search(&self, clauses: &[(Term, Role)]) -> Result<Vec<Key>> {
        if clauses.is_empty() {
            return Err(invalid!("search needs at least one (token, role) clause"));
        }
        let mut lists: Vec<Vec<u32>> = clauses.iter().map(|(t, r)| self.postings(t, *r)).collect();
        lists.sort_by_key(|l| l.len());
        let mut acc = lists[0].clone();
        for l in &lists[1..] {
            if acc.is_empty() {
                break;
            }
            acc = intersect(&acc, l);
        }
        Ok(acc.into_iter().map(|g| self.keys[g as usize]).collect())
    }

    /// The paper's case-study query: graphs whose activating labels also appear among their own
    /// context labels (a token that fires the neuron when it was seen before: repeated-token /
    /// in-context neurons). Each entry is `(key, shared labels sorted, fraction)` where fraction
    /// = shared / number of activating labels. Ranked by the number of shared labels, then the
    /// fraction (both descending), then key.
    pub fn in_context(&self) -> Vec<(Key, Vec<String>, f32)> {
        let mut out: Vec<(Key, Vec<String>, f32)> = (0..self.len())
            .filter_map(|g| {
                let shared = intersect(&self.act_sets[g], &self.ctx_sets[g]);
                if shared.is_empty() {
                    return None;
                }
                let mut labels: Vec<String> = shared.iter().map(|&l| self.label_names[l as usize].to_string()).collect();
                labels.sort();
                let frac = shared.len() as f32 / self.act_sets[g].len() as f32;
                Some((self.keys[g], labels, frac))
            })
            .collect();
        out.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(b.2.total_cmp(&a.2)).then(a.0.cmp(&b.0)));
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::trie::tests::tok;
    use crate::trie::Element;
    use proptest::prelude::*;

    /// Random small stores: graph `i` gets paths over labels t0..t7 (ids k and k+20).
    pub fn arb_graphs() -> impl Strategy<Value = Vec<NeuronGraph>> {
        let elem = prop_oneof![1 => Just(None), 3 => (0u32..8).prop_map(Some)];
        let path = (0u32..8, prop::collection::vec(elem, 0..4), any::<bool>());
        prop::collection::vec(prop::collection::vec(path, 0..5), 0..24).prop_map(|gs| {
            gs.into_iter()
                .enumerate()
                .map(|(i, paths)| {
                    let mut g = NeuronGraph::new("m".into(), (i % 3) as u32, i as u32, "h".into(), 1.0).unwrap();
                    for (a, ctx, fires) in paths {
                        let c: Vec<Option<Element>> = ctx.iter().map(|e| e.map(|k| tok(&format!("t{k}"), &[k, k + 20], 0.9))).collect();
                        // some paths below the firing threshold: they carry a graded level only
                        let end = if fires { 0.7 } else { 0.3 };
                        g.add_path(&tok(&format!("t{a}"), &[a, a + 20], 0.8), &c, end).unwrap();
                    }
                    g.finalize().unwrap();
                    g
                })
                .collect()
        })
    }

    fn index(gs: &[NeuronGraph]) -> StoreIndex {
        StoreIndex::build(gs.iter().map(|g| (g.key(), g))).unwrap()
    }

    /// Brute force from the paths: the (activating, context) nodes of every path whose END can fire.
    fn firing_nodes(g: &NeuronGraph) -> (Vec<u32>, Vec<u32>) {
        let (mut act, mut ctx) = (Vec::new(), Vec::new());
        for p in g.paths() {
            if g.node(*p.last().unwrap()).end.unwrap() >= crate::trie::FIRING_THRESHOLD {
                act.push(p[0]);
                ctx.extend(p[1..].iter().copied().filter(|&i| !g.node(i).label.is_ignore()));
            }
        }
        (act, ctx)
    }

    fn firing_labels(g: &NeuronGraph) -> (Vec<String>, Vec<String>) {
        let (a, c) = firing_nodes(g);
        let names = |ids: Vec<u32>| {
            let mut v: Vec<String> = ids.iter().map(|&i| g.node(i).label.as_str().to_owned()).collect();
            v.sort();
            v.dedup();
            v
        };
        (names(a), names(c))
    }

    /// Brute force: does graph `g` hold `term` in `role`?
    fn holds(g: &NeuronGraph, term: &Term, role: Role) -> bool {
        let hit = |n: &crate::trie::Node| match term {
            Term::Token(t) => n.token_ids.contains(t),
            Term::Label(s) => !n.label.is_ignore() && n.label.as_str() == s,
        };
        let (a, c) = firing_nodes(g);
        let act = a.iter().any(|&r| hit(g.node(r)));
        let ctx = c.iter().any(|&i| hit(g.node(i)));
        match role {
            Role::Activating => act,
            Role::Context => ctx,
            Role::Either => act || ctx,
        }
    }

    proptest! {
        #[test]
        fn search_equals_brute_force(
            gs in arb_graphs(),
            clauses in prop::collection::vec((0u32..30, any::<bool>(), 0u8..3), 1..4)
        ) {
            let ix = index(&gs);
            let clauses: Vec<(Term, Role)> = clauses.into_iter().map(|(t, lab, r)| {
                let term = if lab { Term::Label(format!("t{}", t % 9)) } else { Term::Token(t) };
                (term, [Role::Activating, Role::Context, Role::Either][r as usize])
            }).collect();
            let mut want: Vec<Key> = gs.iter().filter(|g| clauses.iter().all(|(t, r)| holds(g, t, *r))).map(|g| g.key()).collect();
            want.sort();
            prop_assert_eq!(ix.search(&clauses).unwrap(), want);
        }

        #[test]
        fn in_context_equals_brute_force(gs in arb_graphs()) {
            let ix = index(&gs);
            let got = ix.in_context();
            for g in &gs {
                let (a, c) = firing_labels(g);
                prop_assert_eq!(&a, &g.activating_labels());
                prop_assert_eq!(&c, &g.context_labels());
                let shared: Vec<String> = a.iter().filter(|l| c.contains(l)).cloned().collect();
                let entry = got.iter().find(|e| e.0 == g.key());
                if shared.is_empty() {
                    prop_assert!(entry.is_none());
                } else {
                    let e = entry.unwrap();
                    prop_assert_eq!(&e.1, &shared);
                    prop_assert_eq!(e.2, shared.len() as f32 / a.len() as f32);
                }
            }
            prop_assert!(got.windows(2).all(|w| (w[0].1.len(), w[0].2) >= (w[1].1.len(), w[1].2)));
        }
    }

    #[test]
    fn paths_that_cannot_fire_are_not_found() {
        let mut g = NeuronGraph::new("m".into(), 0, 1, "h".into(), 1.0).unwrap();
        g.add_path(&tok("a", &[1], 0.9), &[Some(tok("b", &[2], 0.9))], 0.8).unwrap();
        g.add_path(&tok("a", &[1], 0.9), &[], 0.2).unwrap(); // graded: "a" alone
        g.add_path(&tok("c", &[3], 0.2), &[Some(tok("d", &[4], 0.5))], 0.2).unwrap(); // graded
        g.finalize().unwrap();
        let ix = index(&[g]);
        let found = |t: u32, r: Role| !ix.search(&[(Term::Token(t), r)]).unwrap().is_empty();
        assert!(found(1, Role::Activating) && found(2, Role::Context));
        assert!(!found(3, Role::Activating) && !found(4, Role::Context) && !found(4, Role::Either));
    }

    #[test]
    fn search_refuses_no_clause_and_bad_role() {
        assert!(StoreIndex::default().search(&[]).is_err());
        assert!("both".parse::<Role>().is_err());
    }
}
