//! The engine against a deterministic toy model that keeps its "KV cache" in a paged pool
//! addressed by the engine's block tables: continuous batching, chunked prefill and
//! preemption must give exactly the tokens of one sequence stepped alone.
//!
//! The toy's logits are a hash of the sequence's whole history *as read back from the pool*
//! through its block table, so a wrong table, a block shared by two sequences, a position
//! not recomputed after preemption or a stale slot changes the tokens (or fails the step
//! with a message).

use std::sync::Arc;

use sample::{
    Engine, EngineConfig, KvGeometry, NewSequence, Result, SampleError, Sampler, SamplingParams,
    SeqId, SequenceState, StepBatch, StepModel, StopTokens,
};

use crate::common::{EOS, VOCAB, tokenizer};

/// Ids at and above this are padding rows of the embedding: never sampled.
const TOKENIZER_LEN: usize = 1003;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The toy model's next-token logits after `history`: pseudo-random in [0, 10), EOS
/// strongly favoured after one history in six, padding rows masked.
fn toy_logits(history: &[u32]) -> Vec<f32> {
    let h = history
        .iter()
        .fold(0xCBF2_9CE4_8422_2325u64, |h, &t| mix(h ^ t as u64));
    let mut row: Vec<f32> = (0..VOCAB as u64)
        .map(|v| (mix(h ^ (v << 32)) % 1000) as f32 / 100.0)
        .collect();
    if h % 6 == 0 {
        row[EOS as usize] = 30.0;
    }
    for x in &mut row[TOKENIZER_LEN..] {
        *x = f32::NEG_INFINITY;
    }
    row
}

/// A slot of the toy's pool: which sequence wrote which token at which position.
type Slot = Option<(SeqId, usize, u32)>;

struct ToyModel {
    geometry: KvGeometry,
    max_model_len: usize,
    slots: Vec<Slot>,
    /// Per step: (sequence, start, len) of each batch entry.
    log: Vec<Vec<(SeqId, usize, usize)>>,
    freed: Vec<SeqId>,
    /// Return one logit too few (to test the engine's check).
    broken: bool,
}

impl ToyModel {
    fn new(block_size: usize, num_blocks: usize) -> Self {
        Self {
            geometry: KvGeometry {
                block_size,
                num_blocks,
            },
            max_model_len: 512,
            slots: vec![None; block_size * num_blocks],
            log: Vec::new(),
            freed: Vec::new(),
            broken: false,
        }
    }
}

fn fail(msg: String) -> SampleError {
    SampleError::model(std::io::Error::other(msg))
}

impl StepModel for ToyModel {
    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    fn kv_geometry(&self) -> KvGeometry {
        self.geometry
    }

    fn step(&mut self, batch: &StepBatch) -> Result<Vec<f32>> {
        let bs = batch.block_size;
        assert_eq!(bs, self.geometry.block_size);
        // Blocks are owned by one sequence at a time.
        let mut owner = vec![None; self.geometry.num_blocks];
        for s in &batch.seqs {
            for &b in &s.block_table {
                if let Some(other) = owner[b as usize].replace(s.seq) {
                    return Err(fail(format!(
                        "block {b} in tables of {other} and {}",
                        s.seq
                    )));
                }
            }
            if s.block_table.len() * bs < s.start + s.len {
                return Err(fail(format!("sequence {}: table too short", s.seq)));
            }
        }
        let q = batch.q_starts();
        let mut logits = Vec::with_capacity(batch.seqs.len() * VOCAB);
        for (b, s) in batch.seqs.iter().enumerate() {
            for (i, pos) in (s.start..s.start + s.len).enumerate() {
                if batch.positions[q[b] + i] as usize != pos {
                    return Err(fail(format!("sequence {}: position mismatch", s.seq)));
                }
                let slot = s.block_table[pos / bs] as usize * bs + pos % bs;
                self.slots[slot] = Some((s.seq, pos, batch.ids[q[b] + i]));
            }
            let mut history = Vec::with_capacity(s.start + s.len);
            for pos in 0..s.start + s.len {
                let slot = s.block_table[pos / bs] as usize * bs + pos % bs;
                match self.slots[slot] {
                    Some((seq, p, tok)) if seq == s.seq && p == pos => history.push(tok),
                    other => {
                        return Err(fail(format!(
                            "sequence {} position {pos}: slot holds {other:?}",
                            s.seq
                        )));
                    }
                }
            }
            logits.extend(toy_logits(&history));
        }
        self.log
            .push(batch.seqs.iter().map(|s| (s.seq, s.start, s.len)).collect());
        if self.broken {
            logits.pop();
        }
        Ok(logits)
    }

    fn free(&mut self, seq: SeqId) {
        self.freed.push(seq);
    }
}

/// One request: a prompt and its parameters; `n` samples become `n` sequences.
struct Request {
    prompt: Vec<u32>,
    params: SamplingParams,
}

fn new_sequence(req: &Request, key: u64, index: u32) -> NewSequence {
    let params = Arc::new(req.params.clone().validate().unwrap());
    NewSequence {
        stop_tokens: Arc::new(StopTokens::new(&params, Some(EOS), &[])),
        rng: Sampler::new(3).rng_for(&params, key, index),
        params,
        prompt_ids: req.prompt.clone(),
        tokenizer: tokenizer(),
        max_model_len: Some(512),
    }
}

/// What a finished sequence produced, for comparisons.
#[derive(Debug, Clone, PartialEq)]
struct Produced {
    ids: Vec<u32>,
    text: String,
    finish: String,
    logprob: f64,
}

fn produced(s: &SequenceState) -> Produced {
    Produced {
        ids: s.output_ids().to_vec(),
        text: s.text().to_string(),
        finish: format!("{:?}", s.finish()),
        logprob: s.cumulative_logprob(),
    }
}

/// The reference: one sequence stepped alone on the toy's logits of its full history.
fn alone(req: &Request, key: u64, index: u32) -> Produced {
    let mut seq = SequenceState::new(new_sequence(req, key, index)).unwrap();
    while !seq.is_finished() {
        let history: Vec<u32> = seq
            .prompt_ids()
            .iter()
            .chain(seq.output_ids())
            .copied()
            .collect();
        seq.step(&toy_logits(&history)).unwrap();
    }
    produced(&seq)
}

fn requests() -> Vec<Request> {
    let mut x = 99u64;
    let mut next = move || {
        x = mix(x);
        x
    };
    (0..14)
        .map(|i| {
            let len = 1 + (next() % 30) as usize;
            let prompt = (0..len)
                .map(|_| 8 + (next() % (TOKENIZER_LEN as u64 - 8)) as u32)
                .collect();
            let params = SamplingParams {
                temperature: if i % 3 == 0 { 0.0 } else { 0.8 },
                top_k: if i % 2 == 0 { 40 } else { 0 },
                max_tokens: Some(4 + (next() % 22) as u32),
                n: if i % 3 == 1 { 2 } else { 1 },
                repetition_penalty: if i % 4 == 0 { 1.2 } else { 1.0 },
                ..Default::default()
            };
            Request { prompt, params }
        })
        .collect()
}

/// A sequence's tag: (request, sample index).
type Tag = (usize, u32);

/// Runs every request's samples through one engine; results keyed by tag.
fn run_engine(
    reqs: &[Request],
    model: ToyModel,
    config: EngineConfig,
) -> (Vec<(Tag, Produced)>, Engine<ToyModel, Tag>) {
    let mut engine = Engine::new(model, config).unwrap();
    for (r, req) in reqs.iter().enumerate() {
        for k in 0..req.params.n {
            engine.add((r, k), new_sequence(req, r as u64, k)).unwrap();
        }
    }
    let mut out: Vec<_> = engine
        .run_to_completion()
        .unwrap()
        .into_iter()
        .map(|f| (f.tag, produced(&f.seq)))
        .collect();
    out.sort_by_key(|(tag, _)| *tag);
    (out, engine)
}

fn reference(reqs: &[Request]) -> Vec<(Tag, Produced)> {
    let mut out = Vec::new();
    for (r, req) in reqs.iter().enumerate() {
        for k in 0..req.params.n {
            out.push(((r, k), alone(req, r as u64, k)));
        }
    }
    out
}

fn assert_same(got: &[(Tag, Produced)], want: &[(Tag, Produced)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sequence count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0, "{what}");
        assert_eq!(g.1.ids, w.1.ids, "{what}: request {:?} tokens", g.0);
        assert_eq!(g.1.text, w.1.text, "{what}: request {:?} text", g.0);
        assert_eq!(g.1.finish, w.1.finish, "{what}: request {:?} finish", g.0);
        // Same logits, same order of additions.
        assert_eq!(
            g.1.logprob, w.1.logprob,
            "{what}: request {:?} logprob",
            g.0
        );
    }
}

#[test]
fn batched_generation_equals_each_sequence_alone() {
    let reqs = requests();
    let want = reference(&reqs);
    // The toy really produces a mix of lengths and finish reasons.
    let lens: std::collections::BTreeSet<usize> = want.iter().map(|w| w.1.ids.len()).collect();
    assert!(lens.len() > 4, "{lens:?}");
    assert!(want.iter().any(|w| w.1.finish.contains("Stop")));
    assert!(want.iter().any(|w| w.1.finish.contains("Length")));

    let (got, engine) = run_engine(&reqs, ToyModel::new(16, 400), EngineConfig::default());
    assert_same(&got, &want, "one batch");
    // Everything fits: all sequences started in the first step, no preemption.
    assert_eq!(engine.stats().preemptions, 0);
    assert_eq!(engine.model().log[0].len(), want.len());
    assert_eq!(engine.num_free_blocks(), 400);
}

#[test]
fn chunked_prefill_gives_the_same_tokens() {
    let reqs = requests();
    let want = reference(&reqs);
    let config = EngineConfig {
        max_num_seqs: 256,
        max_num_batched_tokens: 7,
    };
    let (got, engine) = run_engine(&reqs, ToyModel::new(4, 400), config);
    assert_same(&got, &want, "chunked prefill");
    let log = &engine.model().log;
    assert!(
        log.iter()
            .all(|step| step.iter().map(|e| e.2).sum::<usize>() <= 7)
    );
    // Some prompt was continued in a later step with more than one token (a chunk), and
    // some step mixed a prefill chunk with decode tokens.
    assert!(
        log.iter()
            .flatten()
            .any(|&(_, start, len)| start > 0 && len > 1)
    );
    assert!(
        log.iter().any(|step| {
            step.iter().any(|e| e.2 > 1) && step.iter().any(|e| e.2 == 1 && e.1 > 0)
        })
    );
}

#[test]
fn preemption_by_recompute_gives_the_same_tokens() {
    let reqs = requests();
    let want = reference(&reqs);
    // The longest sequence needs 30 + 25 positions = 28 blocks of 2; 40 blocks cannot hold
    // everyone at once.
    let config = EngineConfig {
        max_num_seqs: 256,
        max_num_batched_tokens: 64,
    };
    let (got, engine) = run_engine(&reqs, ToyModel::new(2, 40), config);
    assert_same(&got, &want, "preemption");
    let stats = engine.stats();
    assert!(stats.preemptions > 0, "{stats:?}");
    // Recomputation costs positions: more were computed than the sequences hold.
    let needed: usize = want
        .iter()
        .map(|((r, _), p)| reqs[*r].prompt.len() + p.ids.len() - 1)
        .sum();
    assert!(
        stats.computed_tokens as usize > needed,
        "{stats:?} vs {needed}"
    );
    // The model was told to forget every preempted sequence, and every finished one.
    assert_eq!(
        engine.model().freed.len() as u64,
        stats.preemptions + want.len() as u64
    );
    assert_eq!(engine.num_free_blocks(), 40);
}

#[test]
fn continuous_batching_admits_waiting_sequences_as_others_finish() {
    let req = |len: u32, max: u32| Request {
        prompt: (10..10 + len).collect(),
        params: SamplingParams {
            temperature: 0.0,
            ignore_eos: true,
            max_tokens: Some(max),
            ..Default::default()
        },
    };
    let reqs = vec![req(3, 2), req(4, 9), req(5, 3), req(2, 3)];
    let want = reference(&reqs);
    let config = EngineConfig {
        max_num_seqs: 2,
        max_num_batched_tokens: 100,
    };
    let (got, engine) = run_engine(&reqs, ToyModel::new(4, 100), config);
    assert_same(&got, &want, "max_num_seqs 2");
    let log = &engine.model().log;
    assert!(log.iter().all(|step| step.len() <= 2));
    // Sequence ids follow the order of adding. Sequence 2 joins (prefill, start 0) in the
    // step right after 0 finished, beside 1 which is still decoding.
    let joined = log
        .iter()
        .position(|step| step.iter().any(|&(s, start, _)| s == 2 && start == 0))
        .unwrap();
    assert_eq!(joined, 2, "{log:?}");
    assert!(
        log[joined]
            .iter()
            .any(|&(s, start, len)| s == 1 && start > 0 && len == 1)
    );
    assert!(log[joined - 1].iter().any(|&(s, _, _)| s == 0));
    assert!(log[joined..].iter().flatten().all(|&(s, _, _)| s != 0));
    // And 3 joins when 2 leaves, while 1 still decodes.
    let joined3 = log
        .iter()
        .position(|step| step.iter().any(|&(s, _, _)| s == 3))
        .unwrap();
    assert!(log[joined3].iter().any(|&(s, _, _)| s == 1));
}

#[test]
fn bad_requests_and_a_broken_model_are_errors() {
    let prompt_of = |n: u32| Request {
        prompt: (10..10 + n).collect(),
        params: SamplingParams {
            max_tokens: Some(8),
            ..Default::default()
        },
    };
    let mut engine: Engine<ToyModel, ()> =
        Engine::new(ToyModel::new(4, 100), EngineConfig::default()).unwrap();
    let e = engine
        .add((), new_sequence(&prompt_of(513), 0, 0))
        .unwrap_err();
    assert!(
        matches!(
            e,
            SampleError::PromptTooLong {
                len: 513,
                max_model_len: 512
            }
        ),
        "{e}"
    );
    let e = engine
        .add((), new_sequence(&prompt_of(0), 0, 0))
        .unwrap_err();
    assert!(matches!(e, SampleError::EmptyPrompt), "{e}");
    let mut bad = new_sequence(&prompt_of(3), 0, 0);
    bad.prompt_ids[1] = VOCAB as u32;
    let e = engine.add((), bad).unwrap_err().to_string();
    assert!(e.contains("prompt token id 1008"), "{e}");
    // 395 prompt + 8 new - 1 cached positions need 101 blocks of 4.
    let e = engine
        .add((), new_sequence(&prompt_of(395), 0, 0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs 101 KV blocks") && e.contains("holds only 100"),
        "{e}"
    );
    assert!(!engine.has_unfinished());

    let mut model = ToyModel::new(4, 100);
    model.broken = true;
    let mut engine = Engine::new(model, EngineConfig::default()).unwrap();
    engine.add(0, new_sequence(&prompt_of(3), 0, 0)).unwrap();
    let e = engine.step().err().unwrap().to_string();
    assert!(e.contains("1007 values") && e.contains("1 rows"), "{e}");

    let zero = EngineConfig {
        max_num_seqs: 0,
        ..Default::default()
    };
    let e = Engine::<ToyModel, ()>::new(ToyModel::new(4, 10), zero)
        .err()
        .unwrap();
    assert!(e.to_string().contains("max_num_seqs"), "{e}");
}
