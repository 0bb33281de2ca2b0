//! CUDA graphs: a paged decode step captured once and replayed with each new step's arrays
//! staged at the same device addresses (`engine::Staging`), as the sampler's decode graphs
//! run it; and what a capture refuses.
//!
//! Every test needs a GPU: build with `cargo test --release -p engine --test cuda_graph
//! --no-run` and run the binary on the GPU machine with `--include-ignored`.

use engine::cuda::CudaBackend;
use engine::ops::{self, AttentionParams, PagedLayout};
use engine::{Indices, Staging, Tensor};

mod common;
use common::{GPU, NonFinite, Rng, gpu, gpu_lock, rand_tensor};

const H: usize = 8;
const HKV: usize = 2;
const D: usize = 64;
const BS: usize = 16;
const NUM_BLOCKS: usize = 96;
/// Rows of the q/k/v tables the steps' token ids pick from.
const VOCAB: usize = 50;

fn backend() -> std::sync::Arc<CudaBackend> {
    CudaBackend::get(0).unwrap()
}

/// A decode step: each sequence's context length and block table (disjoint blocks), and
/// its token id (which row of the q/k/v tables its new token takes).
struct Step {
    kv_lens: Vec<usize>,
    tables: Vec<Vec<u32>>,
    ids: Vec<u32>,
}

fn random_step(rng: &mut Rng, seqs: usize, max_ctx: usize) -> Step {
    let blocks = rng.shuffled(NUM_BLOCKS);
    let mut next = 0;
    let mut step = Step {
        kv_lens: Vec::new(),
        tables: Vec::new(),
        ids: Vec::new(),
    };
    for _ in 0..seqs {
        let kv_len = 1 + rng.below(max_ctx);
        let n = kv_len.div_ceil(BS);
        step.tables.push(blocks[next..next + n].to_vec());
        next += n;
        step.kv_lens.push(kv_len);
        step.ids.push(rng.below(VOCAB) as u32);
    }
    step
}

/// q, k, v of the step's new tokens, looked up by token id (so a graph reads them from
/// staged ids): [T, H, D], [T, Hkv, D], [T, Hkv, D].
fn qkv(tables: &[Tensor; 3], ids: &Indices) -> [Tensor; 3] {
    let t = ids.len();
    [(0, H), (1, HKV), (2, HKV)].map(|(i, heads)| {
        ops::embedding_indices(&tables[i], ids, 1.0)
            .unwrap()
            .reshape(&[t, heads, D])
            .unwrap()
    })
}

/// Writes the step's keys and values, then attends: out [T, H, D].
fn decode(
    pools: &mut (Tensor, Tensor),
    tables: &[Tensor; 3],
    ids: &Indices,
    layout: &PagedLayout,
) -> Tensor {
    let [q, k, v] = qkv(tables, ids);
    ops::paged_kv_write(&mut pools.0, &mut pools.1, &k, &v, layout.slots()).unwrap();
    let params = AttentionParams {
        scale: 0.125,
        window: None,
        softcap: None,
    };
    ops::paged_attention(&q, &pools.0, &pools.1, layout, &params)
        .unwrap()
        .out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_captured_decode_step_replays_with_each_steps_staged_arrays() {
    let _gpu = gpu_lock();
    let mut rng = Rng(7);
    let tables =
        [H, HKV, HKV].map(|heads| gpu(&rand_tensor(&mut rng, &[VOCAB, heads * D], -1.0, 1.0)));
    // Two copies of the same filled pools, one for the graph and one for eager steps, each
    // uploaded on its own (a shared buffer would be copied on the first write).
    let shape = [NUM_BLOCKS, BS, HKV, D];
    let (k0, v0) = (
        rand_tensor(&mut rng, &shape, -1.0, 1.0),
        rand_tensor(&mut rng, &shape, -1.0, 1.0),
    );
    let mut graph_pools = (gpu(&k0), gpu(&v0));
    let mut eager_pools = (gpu(&k0), gpu(&v0));

    // The key: 8 rows, 8 blocks of 16 positions; captured at the longest context.
    let (batch, max_blocks) = (8, 8);
    let none: &[Vec<u32>] = &[];
    let cap_layout =
        PagedLayout::decode_padded(BS, &[], none, batch, max_blocks, max_blocks * BS).unwrap();
    let cap_ids = Indices::new(vec![0; batch]);
    let mut staging = Staging::new(GPU);
    staging
        .stage(&[&cap_ids, &cap_layout, cap_layout.slots()])
        .unwrap();
    let address = staging.address();
    let b = backend();
    let live_before = b.memory_stats().live;
    let pool = b.graph_pool();
    let (graph, out) = b
        .capture(&pool, || {
            Ok::<_, engine::EngineError>(decode(&mut graph_pools, &tables, &cap_ids, &cap_layout))
        })
        .unwrap();
    // Captured, not run: the pools are untouched.
    assert_eq!(
        graph_pools.0.to_vec().unwrap(),
        eager_pools.0.to_vec().unwrap()
    );

    for (round, seqs) in [(0, 5), (1, 8), (2, 1)] {
        let step = random_step(&mut rng, seqs, max_blocks * BS);
        let ids = Indices::new(
            step.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, batch - seqs))
                .collect(),
        );
        let layout =
            PagedLayout::decode_padded(BS, &step.kv_lens, &step.tables, batch, max_blocks, 1)
                .unwrap();
        assert!(!staging.stage(&[&ids, &layout, layout.slots()]).unwrap());
        assert_eq!(staging.address(), address);
        graph.launch().unwrap();
        let got = out.to_vec().unwrap();

        // The same step eagerly, unpadded.
        let eager_ids = Indices::new(step.ids.clone());
        let q_starts: Vec<usize> = (0..=seqs).collect();
        let eager_layout =
            PagedLayout::from_tables(BS, &q_starts, &step.kv_lens, &step.tables).unwrap();
        let want = decode(&mut eager_pools, &tables, &eager_ids, &eager_layout);
        let want_t = want.to_vec().unwrap();
        let got_t = Tensor::from_vec(got[..want_t.len()].to_vec(), want.shape()).unwrap();
        // bf16 outputs; the graph's split-K chunks were sized for the longest context, so
        // the partial sums may be added in another order: a few bf16 ulps.
        common::assert_close_tensors(
            &format!("round {round}: graph vs eager"),
            &got_t,
            &Tensor::from_vec(want_t, want.shape()).unwrap(),
            2e-3,
            3.0,
            NonFinite::Fails,
        );
        // Padding rows write nothing: the pools stay equal to the bit.
        assert_eq!(
            graph_pools.0.to_vec().unwrap(),
            eager_pools.0.to_vec().unwrap(),
            "round {round}: k pools"
        );
        assert_eq!(
            graph_pools.1.to_vec().unwrap(),
            eager_pools.1.to_vec().unwrap(),
            "round {round}: v pools"
        );
    }

    // The graph's memory is its pool's until both are dropped.
    assert!(b.memory_stats().live > live_before);
    drop((graph, out, pool));
    assert_eq!(b.memory_stats().live, live_before);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn host_copies_fail_inside_a_capture_and_the_stream_stays_usable() {
    let _gpu = gpu_lock();
    let mut rng = Rng(9);
    let table = gpu(&rand_tensor(&mut rng, &[VOCAB, D], -1.0, 1.0));
    let b = backend();
    let pool = b.graph_pool();
    // `ops::embedding` uploads its ids: a captured copy would re-read freed host memory.
    let err = b
        .capture(&pool, || ops::embedding(&table, &[1, 2, 3], 1.0))
        .unwrap_err();
    assert!(err.to_string().contains("cannot be captured"), "{err}");
    // Eager work runs as before.
    let x = ops::embedding(&table, &[4], 1.0).unwrap();
    let want = table.to_vec().unwrap()[4 * D..5 * D].to_vec();
    assert_eq!(x.to_vec().unwrap(), want);
}
