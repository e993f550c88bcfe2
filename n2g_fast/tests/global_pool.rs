//! The crate never touches rayon's global pool (the fork hazard `parallel` exists to avoid).
//! Its own process (an integration test binary), so nothing else can initialise the global pool
//! first; one test, so the check at the end sees every batch call before it.

use n2g_fast::format::graph_to_bytes;
use n2g_fast::parallel;
use n2g_fast::predict::Semantics;
use n2g_fast::search::{Role, StoreIndex, Term};
use n2g_fast::store::GraphStore;
use n2g_fast::topk::{Batch, TopK};
use n2g_fast::trie::{Element, NeuronGraph};

fn el(label: &str, id: u32, value: f32) -> Element {
    Element { label: label.to_owned(), token_ids: vec![id], value }
}

fn graph(neuron: u32) -> NeuronGraph {
    let mut g = NeuronGraph::new("m".into(), 0, neuron, "h".into(), 2.0).unwrap();
    g.add_path(&el("a", 1, 1.0), &[Some(el("b", 2, 0.9)), None, Some(el("c", 3, 0.8))], 0.7).unwrap();
    g.add_path(&el("a", 1, 1.0), &[Some(el(&format!("n{}", neuron % 3), 4 + neuron % 3, 0.9))], 0.5).unwrap();
    g.finalize().unwrap();
    g
}

#[test]
fn batch_calls_never_initialise_the_global_pool() {
    // Work inside `install` runs on the crate's pool, not the global one.
    let size = parallel::pool_size().unwrap();
    assert_eq!(parallel::install(rayon::current_num_threads).unwrap(), size);

    // TopK: update, update_window_max, merge.
    let (n, batch, tokens) = (300, 4, 5);
    let acts: Vec<f32> = (0..batch * tokens * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let mut a = TopK::new(n, 3).unwrap();
    a.update(&Batch { activations: &acts, batch, tokens, window_ids: &[0, 1, 2, 3], token_mask: None }).unwrap();
    let mut b = TopK::new(n, 3).unwrap();
    b.update_window_max(&acts[..batch * n], &[4, 5, 6, 7]).unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a.filled().iter().filter(|&&f| f == 3).count(), n);

    // Store: blobs in, store file round trip, prediction, index, search, similarity.
    let graphs: Vec<NeuronGraph> = (0..40).map(graph).collect();
    let blobs: Vec<Vec<u8>> = graphs.iter().map(graph_to_bytes).collect();
    let mut store = GraphStore::new();
    store.add_blobs(&blobs.iter().map(|b| b.as_slice()).collect::<Vec<_>>()).unwrap();
    let store = GraphStore::from_bytes(&store.to_bytes()).unwrap();
    let keys = store.keys();
    let out = store.predict(&keys, &[1, 2, 1, 4, 1], 1, 5, Semantics::AllPathsMax).unwrap();
    assert!(out.iter().any(|&v| v > 0.0));
    assert_eq!(store.search(&[(Term::Label("b".into()), Role::Context)]).unwrap().len(), 40);
    assert!(!store.pairs(0.9).unwrap().0.is_empty());
    assert!(!store.neighbours((0, 0), 3).unwrap().is_empty());
    assert_eq!(store.in_context_neurons().unwrap().len(), 0);
    assert_eq!(StoreIndex::build(graphs.iter().map(|g| (g.key(), g))).unwrap().len(), 40);

    // Succeeds only if no call above initialised the global pool.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("a batch call initialised rayon's global pool");
}
