//! Attention over a paged KV cache, and the write of new keys and values into it.
//!
//! The cache of one layer is a pair of pools, K and V, each `[num_blocks, block_size, Hkv,
//! D]` ([`kv_pool`]; f32 on the CPU, bf16 on a GPU). A sequence owns a list of blocks, its
//! block table: its position `p` lives in slot `table[p / block_size] · block_size +
//! p % block_size` (slot `s` is row `s` of the pool seen as `[num_blocks · block_size, Hkv,
//! D]`). Blocks need not be contiguous or in order, which is what lets a scheduler grow and
//! free sequences without moving memory (vLLM's PagedAttention).
//!
//! A step is described by one [`PagedLayout`]: per sequence its new queries (`q_starts`, as
//! in [`SeqLayout`]), its context length `kv_len` (cached + new positions) and its block
//! table. The new tokens are the last `q_len` positions of the `kv_len` (decode: q_len = 1;
//! chunked prefill: q_len > 1), so a layer first writes their keys and values with
//! [`paged_kv_write`] into `layout.slots()`, then calls [`paged_attention`], whose semantics
//! are [`super::attention`]'s on the equivalent packed keys: causal, GQA, sliding window,
//! soft-cap, scale, and the logsumexp of every query row.
//!
//! The CPU path gathers each sequence's visible keys and values (from the window's first key
//! on) through its table into packed tensors and runs [`super::attention`], so it is the
//! packed reference by construction. The CUDA path reads the pools in place
//! (`cuda/ops/paged_attention.rs`, `kernels/paged_attention.cu`).
//!
//! ```
//! use engine::ops::{self, AttentionParams, PagedLayout};
//! use engine::{Device, Tensor};
//! // One sequence: 3 cached positions + 2 new ones, in blocks 5 and 2 of 4 positions each.
//! let layout = PagedLayout::from_tables(4, &[0, 2], &[5], &[vec![5u32, 2]]).unwrap();
//! assert_eq!(layout.slots().as_slice(), &[23, 8]); // positions 3 and 4
//! let (mut k_pool, mut v_pool) = (
//!     ops::kv_pool(8, 4, 1, 2, Device::Cpu).unwrap(),
//!     ops::kv_pool(8, 4, 1, 2, Device::Cpu).unwrap(),
//! );
//! let k_new = Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0], &[2, 1, 2]).unwrap();
//! ops::paged_kv_write(&mut k_pool, &mut v_pool, &k_new, &k_new, layout.slots()).unwrap();
//! let q = Tensor::zeros(&[2, 1, 2]);
//! let params = AttentionParams { scale: 1.0, window: None, softcap: None };
//! let r = ops::paged_attention(&q, &k_pool, &v_pool, &layout, &params).unwrap();
//! assert_eq!(r.out.shape(), &[2, 1, 2]);
//! ```

use super::attention::{AttentionOut, AttentionParams, SeqLayout, attention};
use crate::cuda::copies::DeviceCopies;
use crate::cuda::ops as cuda_ops;
use crate::{Device, EngineError, Result, Tensor};

/// The pool slot of each new token (−1: skip the token), checked to be unique.
pub struct SlotMapping {
    slots: Vec<i32>, // [T]
    /// One past the largest slot (0 when every token is skipped).
    end: usize,
    /// The slots on each GPU that has used them.
    pub(crate) device: DeviceCopies,
}

impl SlotMapping {
    /// Slots for `slots.len()` tokens: each ≥ 0, or −1 for a token to skip (padding). Two
    /// tokens may not share a slot (which one would win is undefined on a GPU).
    pub fn new(slots: Vec<i32>) -> Result<SlotMapping> {
        const OP: &str = "slot mapping";
        if let Some((t, &s)) = slots.iter().enumerate().find(|&(_, &s)| s < -1) {
            return Err(EngineError::Arg {
                op: OP,
                msg: format!("token {t} has slot {s}; slots are ≥ 0, or −1 to skip the token"),
            });
        }
        let mut sorted: Vec<(i32, usize)> = slots
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s >= 0)
            .map(|(t, &s)| (s, t))
            .collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(EngineError::Arg {
                op: OP,
                msg: format!(
                    "tokens {} and {} are both written to slot {}",
                    w[0].1, w[1].1, w[0].0
                ),
            });
        }
        let end = sorted.last().map_or(0, |&(s, _)| s as usize + 1);
        Ok(SlotMapping {
            slots,
            end,
            device: DeviceCopies::default(),
        })
    }

    /// Number of tokens T.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn as_slice(&self) -> &[i32] {
        &self.slots
    }

    /// Slots a pool needs for these writes: one past the largest.
    pub fn end(&self) -> usize {
        self.end
    }
}

impl Clone for SlotMapping {
    fn clone(&self) -> SlotMapping {
        SlotMapping {
            slots: self.slots.clone(),
            end: self.end,
            device: DeviceCopies::default(),
        }
    }
}

impl std::fmt::Debug for SlotMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SlotMapping").field(&self.slots).finish()
    }
}

/// One step's sequences over a paged cache: new queries, context lengths and block tables.
pub struct PagedLayout {
    block_size: usize,
    q_starts: Vec<usize>, // [B + 1]
    kv_lens: Vec<usize>,  // [B]
    max_blocks: usize,
    /// Block ids, row b padded past sequence b's blocks with anything (−1 by convention).
    block_tables: Vec<i32>, // [B, max_blocks]
    /// One past the largest block id any sequence uses (0 when none does).
    blocks_end: usize,
    /// Where each new token's key and value go: position kv_len − q_len + i of its sequence.
    slots: SlotMapping, // [Tq]
    /// `q_starts`, `kv_lens` and `block_tables` as one i32 array, the kernels' view.
    flat: Vec<i32>, // [B + 1 + B + B · max_blocks]
    pub(crate) device: DeviceCopies,
}

impl PagedLayout {
    /// A layout from its arrays: sequence `b` has queries `q_starts[b]..q_starts[b + 1]`,
    /// `kv_lens[b]` ≥ its q_len positions, and its block ids in
    /// `block_tables[b · max_blocks..][..max_blocks]`, of which the first
    /// ⌈kv_len / block_size⌉ must be ≥ 0 (the rest are not read).
    pub fn new(
        block_size: usize,
        q_starts: Vec<usize>,
        kv_lens: Vec<usize>,
        block_tables: Vec<i32>,
        max_blocks: usize,
    ) -> Result<PagedLayout> {
        let batch = kv_lens.len();
        Self::with_padding(
            block_size,
            q_starts,
            kv_lens,
            block_tables,
            max_blocks,
            batch,
        )
    }

    /// [`PagedLayout::new`] where sequences `real..B` are padding: their new tokens get slot
    /// −1 (nothing is written) and their outputs are to be ignored.
    fn with_padding(
        block_size: usize,
        q_starts: Vec<usize>,
        kv_lens: Vec<usize>,
        block_tables: Vec<i32>,
        max_blocks: usize,
        real: usize,
    ) -> Result<PagedLayout> {
        const OP: &str = "paged layout";
        let arg = |msg: String| Err(EngineError::Arg { op: OP, msg });
        if block_size == 0 {
            return arg("block_size must be ≥ 1".into());
        }
        if q_starts.len() != kv_lens.len() + 1 || q_starts[0] != 0 {
            return arg(format!(
                "q_starts needs B + 1 entries from 0 and kv_lens B: got {} q_starts (first {:?}) \
                 and {} kv_lens",
                q_starts.len(),
                q_starts.first(),
                kv_lens.len()
            ));
        }
        let batch = kv_lens.len();
        if block_tables.len() != batch * max_blocks {
            return arg(format!(
                "block_tables has {} entries, B × max_blocks = {batch} × {max_blocks} = {}",
                block_tables.len(),
                batch * max_blocks
            ));
        }
        let mut blocks_end = 0usize;
        for b in 0..batch {
            let (q0, q1) = (q_starts[b], q_starts[b + 1]);
            if q1 < q0 {
                return arg(format!("sequence {b}: q_starts decrease ({q0} → {q1})"));
            }
            if q1 - q0 > kv_lens[b] {
                return arg(format!(
                    "sequence {b}: {} new queries but a context of only {} positions",
                    q1 - q0,
                    kv_lens[b]
                ));
            }
            let needed = kv_lens[b].div_ceil(block_size);
            if needed > max_blocks {
                return arg(format!(
                    "sequence {b}: {} positions need {needed} blocks of {block_size}, the \
                     table has {max_blocks} columns",
                    kv_lens[b]
                ));
            }
            let row = &block_tables[b * max_blocks..b * max_blocks + needed];
            if let Some((j, &id)) = row.iter().enumerate().find(|&(_, &id)| id < 0) {
                return arg(format!(
                    "sequence {b}: block table entry {j} is {id}; the first {needed} entries \
                     must be block ids ≥ 0"
                ));
            }
            blocks_end = blocks_end.max(row.iter().map(|&id| id as usize + 1).max().unwrap_or(0));
        }
        let tq = q_starts[batch];
        // The kernels index slots, positions and starts in 32 bits.
        let limit = i32::MAX as usize;
        if blocks_end.saturating_mul(block_size) > limit
            || tq > limit
            || kv_lens.iter().any(|&l| l > limit)
            || max_blocks > limit
        {
            return arg(format!(
                "{tq} queries, contexts up to {} and {blocks_end} blocks of {block_size} exceed \
                 the kernels' 32-bit indices",
                kv_lens.iter().max().unwrap_or(&0)
            ));
        }

        let mut slots = Vec::with_capacity(tq);
        for b in 0..batch {
            let q_len = q_starts[b + 1] - q_starts[b];
            for pos in kv_lens[b] - q_len..kv_lens[b] {
                if b >= real {
                    slots.push(-1);
                    continue;
                }
                let id = block_tables[b * max_blocks + pos / block_size] as usize;
                slots.push((id * block_size + pos % block_size) as i32);
            }
        }
        let slots = SlotMapping::new(slots).map_err(|e| EngineError::Arg {
            op: OP,
            msg: format!("the new tokens' slots collide (blocks shared between sequences?): {e}"),
        })?;
        let flat = q_starts
            .iter()
            .chain(&kv_lens)
            .map(|&x| x as i32)
            .chain(block_tables.iter().copied())
            .collect();
        Ok(PagedLayout {
            block_size,
            q_starts,
            kv_lens,
            max_blocks,
            block_tables,
            blocks_end,
            slots,
            flat,
            device: DeviceCopies::default(),
        })
    }

    /// A layout from per-sequence block tables (a scheduler's `Vec<u32>`s), padded to the
    /// longest with −1.
    pub fn from_tables<T: AsRef<[u32]>>(
        block_size: usize,
        q_starts: &[usize],
        kv_lens: &[usize],
        tables: &[T],
    ) -> Result<PagedLayout> {
        if tables.len() != kv_lens.len() {
            return Err(EngineError::Arg {
                op: "paged layout",
                msg: format!(
                    "{} block tables for {} sequences",
                    tables.len(),
                    kv_lens.len()
                ),
            });
        }
        let max_blocks = tables.iter().map(|t| t.as_ref().len()).max().unwrap_or(0);
        let flat = flat_tables(tables, tables.len(), max_blocks)?;
        PagedLayout::new(
            block_size,
            q_starts.to_vec(),
            kv_lens.to_vec(),
            flat,
            max_blocks,
        )
    }

    /// A decode step (one new token per sequence) shaped for a captured CUDA graph: the
    /// sequences' contexts `kv_lens` and block `tables`, then padding up to `batch` rows, the
    /// tables padded with −1 to `max_blocks` columns. A padding row has a context of
    /// `pad_kv_len` positions all in block 0 (read, never written: its slot is −1), so its
    /// output is garbage to be ignored. A graph is captured with a layout of padding rows
    /// only at the longest context it serves (the kernels' grids are sized then), and
    /// replayed with the real step's layout of the same `batch` and `max_blocks`.
    pub fn decode_padded<T: AsRef<[u32]>>(
        block_size: usize,
        kv_lens: &[usize],
        tables: &[T],
        batch: usize,
        max_blocks: usize,
        pad_kv_len: usize,
    ) -> Result<PagedLayout> {
        const OP: &str = "paged layout";
        let real = kv_lens.len();
        if tables.len() != real || batch < real || pad_kv_len == 0 {
            return Err(EngineError::Arg {
                op: OP,
                msg: format!(
                    "{} tables for {real} sequences padded to {batch} rows with contexts of \
                     {pad_kv_len}: expected one table per sequence, rows ≥ sequences and a \
                     context ≥ 1",
                    tables.len()
                ),
            });
        }
        let flat = flat_tables(tables, batch, max_blocks)?;
        let kv_lens: Vec<usize> = kv_lens
            .iter()
            .copied()
            .chain(std::iter::repeat_n(pad_kv_len, batch - real))
            .collect();
        PagedLayout::with_padding(
            block_size,
            (0..=batch).collect(),
            kv_lens,
            flat,
            max_blocks,
            real,
        )
    }

    /// Number of sequences B.
    pub fn num_seqs(&self) -> usize {
        self.kv_lens.len()
    }

    /// Number of new tokens (queries) Tq.
    pub fn num_queries(&self) -> usize {
        self.q_starts[self.num_seqs()]
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn q_starts(&self) -> &[usize] {
        &self.q_starts
    }

    pub fn kv_lens(&self) -> &[usize] {
        &self.kv_lens
    }

    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// [B, max_blocks], row-major.
    pub fn block_tables(&self) -> &[i32] {
        &self.block_tables
    }

    /// Blocks a pool needs for this layout: one past the largest id used.
    pub fn blocks_end(&self) -> usize {
        self.blocks_end
    }

    /// The slot of each new token, for [`paged_kv_write`].
    pub fn slots(&self) -> &SlotMapping {
        &self.slots
    }

    /// The same step over packed keys (sequence b's keys at `kv_starts[b]..kv_starts[b+1]`),
    /// as [`super::attention`] takes them.
    pub fn packed(&self) -> SeqLayout {
        let mut kv_starts = Vec::with_capacity(self.num_seqs() + 1);
        kv_starts.push(0);
        for l in &self.kv_lens {
            kv_starts.push(kv_starts.last().copied().unwrap_or(0) + l);
        }
        SeqLayout {
            q_starts: self.q_starts.clone(),
            kv_starts,
        }
    }

    /// The slot of position `pos` of sequence `b` (both validated by the caller).
    fn slot(&self, b: usize, pos: usize) -> usize {
        let id = self.block_tables[b * self.max_blocks + pos / self.block_size] as usize;
        id * self.block_size + pos % self.block_size
    }

    pub(crate) fn flat(&self) -> &[i32] {
        &self.flat
    }
}

/// Block tables as the kernels read them: `rows` rows of `max_blocks` columns, sequence b's
/// ids then −1; rows past the tables (padding) all block 0.
fn flat_tables<T: AsRef<[u32]>>(tables: &[T], rows: usize, max_blocks: usize) -> Result<Vec<i32>> {
    const OP: &str = "paged layout";
    let mut flat = vec![0i32; rows * max_blocks];
    for (b, t) in tables.iter().enumerate() {
        let t = t.as_ref();
        if t.len() > max_blocks {
            return Err(EngineError::Arg {
                op: OP,
                msg: format!(
                    "sequence {b} has {} blocks, the padded table {max_blocks} columns",
                    t.len()
                ),
            });
        }
        let row = &mut flat[b * max_blocks..(b + 1) * max_blocks];
        row.fill(-1);
        for (j, &id) in t.iter().enumerate() {
            row[j] = i32::try_from(id).map_err(|_| EngineError::Arg {
                op: OP,
                msg: format!("sequence {b}: block id {id} exceeds the kernels' 32-bit range"),
            })?;
        }
    }
    Ok(flat)
}

impl crate::Staged for SlotMapping {
    fn write_words(&self, out: &mut Vec<u32>) {
        out.extend(self.slots.iter().map(|&s| s as u32));
    }
    fn copies(&self) -> &DeviceCopies {
        &self.device
    }
}

impl crate::Staged for PagedLayout {
    fn write_words(&self, out: &mut Vec<u32>) {
        out.extend(self.flat.iter().map(|&s| s as u32));
    }
    fn copies(&self) -> &DeviceCopies {
        &self.device
    }
}

impl Clone for PagedLayout {
    fn clone(&self) -> PagedLayout {
        PagedLayout {
            block_size: self.block_size,
            q_starts: self.q_starts.clone(),
            kv_lens: self.kv_lens.clone(),
            max_blocks: self.max_blocks,
            block_tables: self.block_tables.clone(),
            blocks_end: self.blocks_end,
            slots: self.slots.clone(),
            flat: self.flat.clone(),
            device: DeviceCopies::default(),
        }
    }
}

impl std::fmt::Debug for PagedLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedLayout")
            .field("block_size", &self.block_size)
            .field("q_starts", &self.q_starts)
            .field("kv_lens", &self.kv_lens)
            .field("max_blocks", &self.max_blocks)
            .field("block_tables", &self.block_tables)
            .finish()
    }
}

/// Which kernels run [`paged_attention_with`] on a GPU (the CPU path ignores it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagedKernel {
    /// Sequences with q_len · H/Hkv ≤ 8 rows (decode) go to the split-K decode kernel, the
    /// others to the tensor-core kernel; head dims other than 64, 128, 256 use the scalar
    /// kernel.
    Auto,
    /// As Auto, with this many keys (1..=1024) per decode block instead of the automatic
    /// choice; tests use it to force many splits.
    DecodeChunk(usize),
    /// Every sequence through the tensor-core kernel (an error for head dims without one).
    TensorCore,
    /// Every sequence through the scalar one-warp-per-(query, head) kernel.
    Simple,
}

/// A zeroed K or V pool `[num_blocks, block_size, Hkv, D]` on `device` (bf16 on a GPU,
/// allocated there directly).
pub fn kv_pool(
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
) -> Result<Tensor> {
    let shape = [num_blocks, block_size, kv_heads, head_dim];
    match device {
        Device::Cpu => Ok(Tensor::zeros(&shape)),
        Device::Cuda(ordinal) => cuda_ops::paged_attention::zeroed_pool(ordinal, &shape),
    }
}

/// Dims of a pool `[num_blocks, block_size, Hkv, D]`, checked against the other pool.
fn pool_dims(op: &'static str, k_pool: &Tensor, v_pool: &Tensor) -> Result<[usize; 4]> {
    let dims = k_pool.dims(op, "k_pool: [num_blocks, block_size, Hkv, D]")?;
    v_pool.expect_shape(op, &dims)?;
    Ok(dims)
}

/// Writes each new token's key and value into its slot: `k_pool[slots[t]] = k_new[t]` (the
/// pool seen as `[num_blocks · block_size, Hkv, D]`), tokens with slot −1 skipped.
/// k_new, v_new: [T, Hkv, D]. A pool whose storage is shared (a clone of it is alive) is
/// copied first, as for every in-place op.
pub fn paged_kv_write(
    k_pool: &mut Tensor,
    v_pool: &mut Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    slots: &SlotMapping,
) -> Result<()> {
    const OP: &str = "paged_kv_write";
    let [nb, bs, hkv, d] = pool_dims(OP, k_pool, v_pool)?;
    let expected = [slots.len(), hkv, d];
    k_new.expect_shape(OP, &expected)?;
    v_new.expect_shape(OP, &expected)?;
    if slots.end() > nb * bs {
        return Err(EngineError::Index {
            op: OP,
            index: slots.end() - 1,
            limit: nb * bs,
        });
    }
    if let Some(gpu) = cuda_ops::device_of(
        OP,
        &[
            ("k_pool", k_pool),
            ("v_pool", v_pool),
            ("k_new", k_new),
            ("v_new", v_new),
        ],
    )? {
        return cuda_ops::paged_attention::paged_kv_write(
            &gpu, k_pool, v_pool, k_new, v_new, slots,
        );
    }
    let row = hkv * d;
    let (k_src, v_src) = (k_new.as_slice()?, v_new.as_slice()?);
    for (pool, src) in [(k_pool, k_src), (v_pool, v_src)] {
        let pool = pool.as_mut_slice()?;
        for (t, &slot) in slots.as_slice().iter().enumerate() {
            if slot >= 0 {
                let s = slot as usize;
                pool[s * row..(s + 1) * row].copy_from_slice(&src[t * row..(t + 1) * row]);
            }
        }
    }
    Ok(())
}

/// Dims of a paged attention call, checked.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PagedDims {
    pub(crate) tq: usize,
    pub(crate) h: usize,
    pub(crate) hkv: usize,
    pub(crate) d: usize,
}

/// The shape, layout and parameter checks every device applies.
pub(crate) fn check_attention(
    op: &'static str,
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    layout: &PagedLayout,
    params: &AttentionParams,
) -> Result<PagedDims> {
    let [tq, h, d] = q.dims(op, "q: [Tq, H, D]")?;
    let [nb, bs, hkv, dk] = pool_dims(op, k_pool, v_pool)?;
    if dk != d || hkv == 0 || h % hkv != 0 || bs != layout.block_size() {
        return Err(EngineError::Shape {
            op,
            expected: format!(
                "k_pool: [num_blocks, {}, Hkv, {d}] with Hkv dividing H = {h}",
                layout.block_size()
            ),
            got: k_pool.shape().to_vec(),
        });
    }
    if tq != layout.num_queries() {
        return Err(EngineError::Arg {
            op,
            msg: format!(
                "q has {tq} rows, the layout {} queries",
                layout.num_queries()
            ),
        });
    }
    if layout.blocks_end() > nb {
        return Err(EngineError::Index {
            op,
            index: layout.blocks_end() - 1,
            limit: nb,
        });
    }
    super::attention::check_params(op, params)?;
    Ok(PagedDims { tq, h, hkv, d })
}

/// Attention of the new queries q: [Tq, H, D] over their sequences' cached keys and values:
/// out [Tq, H, D] and lse [H, Tq], as [`super::attention`] on the packed equivalent
/// ([`PagedLayout::packed`]).
pub fn paged_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    layout: &PagedLayout,
    params: &AttentionParams,
) -> Result<AttentionOut> {
    paged_attention_with(q, k_pool, v_pool, layout, params, PagedKernel::Auto)
}

/// [`paged_attention`] with a chosen GPU kernel (tests and benchmarks compare them).
pub fn paged_attention_with(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    layout: &PagedLayout,
    params: &AttentionParams,
    kernel: PagedKernel,
) -> Result<AttentionOut> {
    const OP: &str = "paged_attention";
    let dims = check_attention(OP, q, k_pool, v_pool, layout, params)?;
    if let Some(gpu) = cuda_ops::device_of(OP, &[("q", q), ("k_pool", k_pool), ("v_pool", v_pool)])?
    {
        return cuda_ops::paged_attention::paged_attention(
            &gpu, q, k_pool, v_pool, layout, params, dims, kernel,
        );
    }
    // Gather each sequence's keys from the first one its first query can see (all of them
    // without a window): the queries see the same keys at the same relative distances, so
    // the result is the packed attention's.
    let row = dims.hkv * dims.d;
    let (kp, vp) = (k_pool.as_slice()?, v_pool.as_slice()?);
    let mut kv_starts = Vec::with_capacity(layout.num_seqs() + 1);
    kv_starts.push(0);
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for b in 0..layout.num_seqs() {
        let kv_len = layout.kv_lens[b];
        let q_len = layout.q_starts[b + 1] - layout.q_starts[b];
        let first = match (q_len, params.window) {
            (0, _) => kv_len,
            (_, None) => 0,
            (_, Some(w)) => (kv_len - q_len + 1).saturating_sub(w),
        };
        for pos in first..kv_len {
            let s = layout.slot(b, pos);
            keys.extend_from_slice(&kp[s * row..(s + 1) * row]);
            values.extend_from_slice(&vp[s * row..(s + 1) * row]);
        }
        kv_starts.push(kv_starts[b] + kv_len - first);
    }
    let tkv = kv_starts[layout.num_seqs()];
    let shape = [tkv, dims.hkv, dims.d];
    let gathered = SeqLayout {
        q_starts: layout.q_starts.clone(),
        kv_starts,
    };
    attention(
        q,
        &Tensor::from_vec(keys, &shape)?,
        &Tensor::from_vec(values, &shape)?,
        &gathered,
        params,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    #[test]
    fn decode_padded_layouts_pad_rows_that_write_nothing() {
        // Two sequences (contexts 5 and 2, blocks of 4) padded to 4 rows and 3 columns.
        let tables: [&[u32]; 2] = [&[7, 2], &[4]];
        let l = PagedLayout::decode_padded(4, &[5, 2], &tables, 4, 3, 1).unwrap();
        assert_eq!(l.q_starts(), &[0, 1, 2, 3, 4]);
        assert_eq!(l.kv_lens(), &[5, 2, 1, 1]);
        assert_eq!(l.block_tables(), &[7, 2, -1, 4, -1, -1, 0, 0, 0, 0, 0, 0]);
        // Position 4 of sequence 0 is slot 2·4 + 0; position 1 of sequence 1 is 4·4 + 1;
        // padding rows are skipped.
        assert_eq!(l.slots().as_slice(), &[8, 17, -1, -1]);
        // The same arrays as the kernels read them, staged as 32-bit words.
        let mut words = Vec::new();
        crate::Staged::write_words(&l, &mut words);
        assert_eq!(words.len(), 5 + 4 + 12);
        assert_eq!(&words[5..9], &[5, 2, 1, 1]);
        // A capture layout: padding rows only, at the longest context of 3 blocks.
        let none: &[&[u32]] = &[];
        let cap = PagedLayout::decode_padded(4, &[], none, 2, 3, 12).unwrap();
        assert_eq!(cap.kv_lens(), &[12, 12]);
        assert_eq!(cap.slots().as_slice(), &[-1, -1]);
        // Padded layouts attend like any other on the CPU: the real rows are unchanged.
        let (k_pool, v_pool) = (
            Tensor::from_vec(
                (0..8 * 4 * 2).map(|i| (i % 7) as f32).collect(),
                &[8, 4, 1, 2],
            )
            .unwrap(),
            Tensor::from_vec(
                (0..8 * 4 * 2).map(|i| (i % 5) as f32).collect(),
                &[8, 4, 1, 2],
            )
            .unwrap(),
        );
        let q = Tensor::from_vec((0..8).map(|i| i as f32 * 0.1).collect(), &[4, 1, 2]).unwrap();
        let params = AttentionParams {
            scale: 1.0,
            window: None,
            softcap: None,
        };
        let padded = paged_attention(&q, &k_pool, &v_pool, &l, &params).unwrap();
        let plain = PagedLayout::from_tables(4, &[0, 1, 2], &[5, 2], &tables).unwrap();
        let q2 = Tensor::from_vec(q.as_slice().unwrap()[..4].to_vec(), &[2, 1, 2]).unwrap();
        let want = paged_attention(&q2, &k_pool, &v_pool, &plain, &params).unwrap();
        assert_eq!(
            &padded.out.as_slice().unwrap()[..4],
            want.out.as_slice().unwrap()
        );
        // Bad shapes are errors, not panics.
        assert!(PagedLayout::decode_padded(4, &[5, 2], &tables, 1, 3, 1).is_err());
        assert!(PagedLayout::decode_padded(4, &[5, 2], &tables, 4, 1, 1).is_err());
        assert!(PagedLayout::decode_padded(4, &[5, 2], &tables, 4, 3, 0).is_err());
    }

    /// A random step over a paged cache, and the same keys and values packed.
    struct Case {
        layout: PagedLayout,
        q: Tensor,      // [Tq, H, D]
        k_pool: Tensor, // [NB, BS, Hkv, D]
        v_pool: Tensor,
        k: Tensor, // [Tkv, Hkv, D], packed
        v: Tensor,
    }

    /// Sequences with (q_len, kv_len); their blocks drawn from a shuffled pool with spare
    /// blocks, so tables are neither contiguous nor ordered. Slots no sequence uses hold NaN:
    /// reading one poisons the output.
    fn case(
        rng: &mut Rng,
        seqs: &[(usize, usize)],
        block_size: usize,
        (h, hkv, d): (usize, usize, usize),
    ) -> Case {
        let needed: usize = seqs.iter().map(|&(_, kv)| kv.div_ceil(block_size)).sum();
        let num_blocks = needed + 3;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut next = ids.into_iter();
        let tables: Vec<Vec<u32>> = seqs
            .iter()
            .map(|&(_, kv)| next.by_ref().take(kv.div_ceil(block_size)).collect())
            .collect();
        let mut q_starts = vec![0];
        for &(q, _) in seqs {
            q_starts.push(q_starts.last().unwrap() + q);
        }
        let kv_lens: Vec<usize> = seqs.iter().map(|&(_, kv)| kv).collect();
        let layout = PagedLayout::from_tables(block_size, &q_starts, &kv_lens, &tables).unwrap();

        let row = hkv * d;
        let tkv: usize = kv_lens.iter().sum();
        let k = rng.vec(tkv * row, -2.0, 2.0);
        let v = rng.vec(tkv * row, -1.0, 1.0);
        let slots = num_blocks * block_size;
        let (mut kp, mut vp) = (vec![f32::NAN; slots * row], vec![f32::NAN; slots * row]);
        let mut packed_row = 0;
        for (b, table) in tables.iter().enumerate() {
            for pos in 0..kv_lens[b] {
                let s = table[pos / block_size] as usize * block_size + pos % block_size;
                let src = packed_row * row..(packed_row + 1) * row;
                kp[s * row..(s + 1) * row].copy_from_slice(&k[src.clone()]);
                vp[s * row..(s + 1) * row].copy_from_slice(&v[src]);
                packed_row += 1;
            }
        }
        let tq = q_starts[seqs.len()];
        let pool_shape = [num_blocks, block_size, hkv, d];
        Case {
            layout,
            q: Tensor::from_vec(rng.vec(tq * h * d, -2.0, 2.0), &[tq, h, d]).unwrap(),
            k_pool: Tensor::from_vec(kp, &pool_shape).unwrap(),
            v_pool: Tensor::from_vec(vp, &pool_shape).unwrap(),
            k: Tensor::from_vec(k, &[tkv, hkv, d]).unwrap(),
            v: Tensor::from_vec(v, &[tkv, hkv, d]).unwrap(),
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.shape(), b.shape());
        let (a, b) = (a.as_slice().unwrap(), b.as_slice().unwrap());
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                assert!(x.is_finite() && y.is_finite(), "{x} vs {y}");
                (x - y).abs()
            })
            .fold(0.0, f32::max)
    }

    #[test]
    fn paged_equals_packed_attention() {
        let mut rng = Rng::new(21);
        // (q_len, kv_len): decode at several lengths (on and off block edges), chunked
        // prefill, a whole prefill, a sequence with no queries this step, and one position.
        let batches: [&[(usize, usize)]; 4] = [
            &[(1, 1), (1, 16), (1, 17), (1, 70)],
            &[(7, 40), (33, 33), (0, 12), (1, 5)],
            &[(64, 100)],
            &[(1, 1)],
        ];
        let heads = [(6, 2, 16), (3, 3, 20), (8, 1, 8)];
        for block_size in [16, 5, 1] {
            for seqs in batches {
                for &dims in &heads {
                    let c = case(&mut rng, seqs, block_size, dims);
                    for (window, softcap) in [
                        (None, None),
                        (Some(1), None),
                        (Some(6), Some(1.0)),
                        (Some(40), None),
                    ] {
                        let params = AttentionParams {
                            scale: 1.0 / (dims.2 as f32).sqrt(),
                            window,
                            softcap,
                        };
                        let got = paged_attention(&c.q, &c.k_pool, &c.v_pool, &c.layout, &params)
                            .unwrap();
                        let want =
                            attention(&c.q, &c.k, &c.v, &c.layout.packed(), &params).unwrap();
                        let what = format!("bs {block_size} {seqs:?} {dims:?} {params:?}");
                        assert!(max_abs_diff(&got.out, &want.out) <= 1e-6, "out, {what}");
                        assert!(max_abs_diff(&got.lse, &want.lse) <= 1e-6, "lse, {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn kv_write_puts_each_row_in_its_slot() {
        let mut rng = Rng::new(22);
        let (nb, bs, hkv, d) = (5, 4, 2, 3);
        let row = hkv * d;
        let init = rng.vec(nb * bs * row, -1.0, 1.0);
        let mut kp = Tensor::from_vec(init.clone(), &[nb, bs, hkv, d]).unwrap();
        let mut vp = kp.clone();
        // Shuffled slots, one token skipped.
        let slots = SlotMapping::new(vec![13, 2, -1, 19, 0]).unwrap();
        let k_new = rng.vec(5 * row, -1.0, 1.0);
        let v_new = rng.vec(5 * row, -1.0, 1.0);
        let kt = Tensor::from_vec(k_new.clone(), &[5, hkv, d]).unwrap();
        let vt = Tensor::from_vec(v_new.clone(), &[5, hkv, d]).unwrap();
        paged_kv_write(&mut kp, &mut vp, &kt, &vt, &slots).unwrap();
        let (kp, vp) = (kp.as_slice().unwrap(), vp.as_slice().unwrap());
        for s in 0..nb * bs {
            let written = slots.as_slice().iter().position(|&x| x == s as i32);
            let cell = s * row..(s + 1) * row;
            match written {
                Some(t) => {
                    assert_eq!(
                        &kp[cell.clone()],
                        &k_new[t * row..(t + 1) * row],
                        "k slot {s}"
                    );
                    assert_eq!(&vp[cell], &v_new[t * row..(t + 1) * row], "v slot {s}");
                }
                None => {
                    assert_eq!(
                        &kp[cell.clone()],
                        &init[cell.clone()],
                        "k slot {s} untouched"
                    );
                    assert_eq!(&vp[cell.clone()], &init[cell], "v slot {s} untouched");
                }
            }
        }
    }

    /// A sequence grown step by step as a generation engine does (a prefill chunk, a second
    /// chunk, then decode), writing through `layout.slots()` and attending each step, equals
    /// attention over the packed history.
    #[test]
    fn write_then_attend_step_by_step_matches_packed_history() {
        let mut rng = Rng::new(23);
        let (h, hkv, d, bs) = (4, 2, 8, 4);
        let row = hkv * d;
        let params = AttentionParams {
            scale: 0.4,
            window: Some(9),
            softcap: Some(3.0),
        };
        let (mut kp, mut vp) = (
            kv_pool(16, bs, hkv, d, Device::Cpu).unwrap(),
            kv_pool(16, bs, hkv, d, Device::Cpu).unwrap(),
        );
        // Two sequences, blocks handed out interleaved and out of order.
        let tables = [vec![9u32, 2, 14, 5, 0, 11], vec![3u32, 12, 7, 1, 8, 15]];
        let (mut hist_k, mut hist_v) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
        let mut lens = [0usize; 2];
        for new in [[5, 3], [6, 1], [1, 1], [1, 2], [1, 1]] {
            let q_starts = [0, new[0], new[0] + new[1]];
            let kv_lens = [lens[0] + new[0], lens[1] + new[1]];
            let layout = PagedLayout::from_tables(bs, &q_starts, &kv_lens, &tables).unwrap();
            let tq = q_starts[2];
            let k_new = rng.vec(tq * row, -2.0, 2.0);
            let v_new = rng.vec(tq * row, -1.0, 1.0);
            let kt = Tensor::from_vec(k_new.clone(), &[tq, hkv, d]).unwrap();
            let vt = Tensor::from_vec(v_new.clone(), &[tq, hkv, d]).unwrap();
            paged_kv_write(&mut kp, &mut vp, &kt, &vt, layout.slots()).unwrap();
            for b in 0..2 {
                let r = q_starts[b] * row..q_starts[b + 1] * row;
                hist_k[b].extend_from_slice(&k_new[r.clone()]);
                hist_v[b].extend_from_slice(&v_new[r]);
            }
            lens = kv_lens;
            let q = Tensor::from_vec(rng.vec(tq * h * d, -2.0, 2.0), &[tq, h, d]).unwrap();
            let got = paged_attention(&q, &kp, &vp, &layout, &params).unwrap();
            let tkv = lens[0] + lens[1];
            let k = Tensor::from_vec(hist_k.concat(), &[tkv, hkv, d]).unwrap();
            let v = Tensor::from_vec(hist_v.concat(), &[tkv, hkv, d]).unwrap();
            let want = attention(&q, &k, &v, &layout.packed(), &params).unwrap();
            assert!(
                max_abs_diff(&got.out, &want.out) <= 1e-6,
                "step to {lens:?}"
            );
            assert!(
                max_abs_diff(&got.lse, &want.lse) <= 1e-6,
                "step to {lens:?}"
            );
        }
    }

    #[test]
    fn slot_mapping_follows_the_block_tables() {
        // Block size 4; sequence 0: positions 6..9 new (blocks 7, 3, 1), sequence 1: position
        // 0 new (block 4), sequence 2: nothing new.
        let layout = PagedLayout::from_tables(
            4,
            &[0, 3, 4, 4],
            &[9, 1, 2],
            &[vec![7u32, 3, 1], vec![4], vec![0]],
        )
        .unwrap();
        assert_eq!(layout.slots().as_slice(), &[14, 15, 4, 16]);
        assert_eq!(layout.blocks_end(), 8);
        assert_eq!(layout.max_blocks(), 3);
        assert_eq!(&layout.block_tables()[3..6], &[4, -1, -1]);
        assert_eq!(layout.packed().kv_starts, vec![0, 9, 10, 12]);
        assert_eq!(layout.flat().len(), 4 + 3 + 9);
    }

    #[test]
    fn bad_layouts_and_slots_are_errors() {
        let arg = |r: Result<PagedLayout>| matches!(r, Err(EngineError::Arg { .. }));
        let t = |v: &[i32]| v.to_vec();
        // Block size 0; q_starts not from 0; entry counts; decreasing starts; more queries
        // than positions; too few table columns; a negative block in use; table length.
        assert!(arg(PagedLayout::new(0, vec![0, 1], vec![1], t(&[0]), 1)));
        assert!(arg(PagedLayout::new(4, vec![1, 2], vec![1], t(&[0]), 1)));
        assert!(arg(PagedLayout::new(
            4,
            vec![0, 1],
            vec![1, 1],
            t(&[0, 0]),
            1
        )));
        assert!(arg(PagedLayout::new(
            4,
            vec![0, 2, 1],
            vec![2, 2],
            t(&[0, 1]),
            1
        )));
        assert!(arg(PagedLayout::new(4, vec![0, 3], vec![2], t(&[0]), 1)));
        assert!(arg(PagedLayout::new(4, vec![0, 1], vec![5], t(&[0]), 1)));
        assert!(arg(PagedLayout::new(
            4,
            vec![0, 1],
            vec![5],
            t(&[0, -1]),
            2
        )));
        assert!(arg(PagedLayout::new(4, vec![0, 1], vec![1], t(&[0, 1]), 1)));
        // Two sequences writing into one shared block collide.
        assert!(arg(PagedLayout::new(
            4,
            vec![0, 1, 2],
            vec![1, 1],
            t(&[3, 3]),
            1
        )));
        // Padding past a sequence's blocks is never read: any value is fine.
        assert!(PagedLayout::new(4, vec![0, 1], vec![3], t(&[2, -7]), 2).is_ok());
        assert!(matches!(
            PagedLayout::from_tables(4, &[0, 1], &[1], &[vec![0u32], vec![1]]),
            Err(EngineError::Arg { .. })
        ));
        let slot_err = |s: Vec<i32>| matches!(SlotMapping::new(s), Err(EngineError::Arg { .. }));
        assert!(slot_err(vec![0, -2]));
        assert!(slot_err(vec![3, 1, 3]));
        assert!(SlotMapping::new(vec![-1, -1, 2]).unwrap().end() == 3);
    }

    #[test]
    fn bad_pools_and_params_are_errors() {
        let layout = PagedLayout::from_tables(4, &[0, 2], &[6], &[vec![3u32, 1]]).unwrap();
        let q = Tensor::zeros(&[2, 4, 8]);
        let pool = Tensor::zeros(&[4, 4, 2, 8]);
        let p = AttentionParams {
            scale: 0.5,
            window: None,
            softcap: None,
        };
        assert!(paged_attention(&q, &pool, &pool, &layout, &p).is_ok());
        let shape = |r: Result<AttentionOut>| matches!(r, Err(EngineError::Shape { .. }));
        // Another block size; head dim; Hkv not dividing H; v unlike k; rank-3 pool.
        for bad in [[8, 2, 2, 8], [4, 4, 2, 7], [4, 4, 3, 8]] {
            let b = Tensor::zeros(&bad);
            assert!(shape(paged_attention(&q, &b, &b, &layout, &p)), "{bad:?}");
        }
        assert!(shape(paged_attention(
            &q,
            &pool,
            &Tensor::zeros(&[5, 4, 2, 8]),
            &layout,
            &p
        )));
        let flat = Tensor::zeros(&[16, 2, 8]);
        assert!(shape(paged_attention(&q, &flat, &flat, &layout, &p)));
        // Too few blocks for the table (block 3 needs 4); q rows unlike the layout's.
        let small = Tensor::zeros(&[3, 4, 2, 8]);
        assert!(matches!(
            paged_attention(&q, &small, &small, &layout, &p),
            Err(EngineError::Index { .. })
        ));
        assert!(matches!(
            paged_attention(&Tensor::zeros(&[3, 4, 8]), &pool, &pool, &layout, &p),
            Err(EngineError::Arg { .. })
        ));
        for bad in [
            AttentionParams {
                window: Some(0),
                ..p
            },
            AttentionParams {
                softcap: Some(-1.0),
                ..p
            },
            AttentionParams {
                scale: f32::INFINITY,
                ..p
            },
        ] {
            assert!(matches!(
                paged_attention(&q, &pool, &pool, &layout, &bad),
                Err(EngineError::Arg { .. })
            ));
        }
        // Writes: a slot past the pool; rows unlike the mapping.
        let (mut kp, mut vp) = (pool.clone(), pool.clone());
        let rows = Tensor::zeros(&[2, 2, 8]);
        let far = SlotMapping::new(vec![0, 16]).unwrap();
        assert!(matches!(
            paged_kv_write(&mut kp, &mut vp, &rows, &rows, &far),
            Err(EngineError::Index { .. })
        ));
        let one = SlotMapping::new(vec![0]).unwrap();
        assert!(matches!(
            paged_kv_write(&mut kp, &mut vp, &rows, &rows, &one),
            Err(EngineError::Shape { .. })
        ));
    }

    #[test]
    fn layouts_cross_threads() {
        // A scheduler builds a step's layout on one thread; a model may run on another.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<PagedLayout>();
        send_sync::<SlotMapping>();
    }

    #[test]
    fn empty_steps() {
        let layout = PagedLayout::new(16, vec![0], vec![], vec![], 0).unwrap();
        let pool = kv_pool(2, 16, 1, 4, Device::Cpu).unwrap();
        let p = AttentionParams {
            scale: 1.0,
            window: None,
            softcap: None,
        };
        let r = paged_attention(&Tensor::zeros(&[0, 2, 4]), &pool, &pool, &layout, &p).unwrap();
        assert_eq!(r.out.shape(), &[0, 2, 4]);
        assert_eq!(r.lse.shape(), &[2, 0]);
        let (mut kp, mut vp) = (pool.clone(), pool);
        let none = Tensor::zeros(&[0, 1, 4]);
        paged_kv_write(&mut kp, &mut vp, &none, &none, layout.slots()).unwrap();
    }
}
