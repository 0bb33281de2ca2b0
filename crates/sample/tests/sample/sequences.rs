//! Whole sequences over the fixture tokenizer, driven by scripted logits: stop strings
//! (across tokens, inside split Korean characters), stop tokens, min/max tokens, streaming.

use sample::{FinishReason, SampleError, SamplingParams, SequenceState, StepOutcome, StopReason};

use crate::common::{EOS, VOCAB, encode, forcing, sequence, tokenizer};

/// Steps `seq` through `ids` (each forced by its logits row) until it finishes; checks on
/// every step that the streamed text so far is a prefix of the final text.
fn run(seq: &mut SequenceState, ids: &[u32]) -> Vec<StepOutcome> {
    let mut outs = Vec::new();
    for &id in ids {
        let out = seq.step(&forcing(id)).unwrap();
        assert_eq!(out.token.token_id, id);
        let done = out.finish.is_some();
        outs.push(out);
        if done {
            break;
        }
    }
    let streamed: String = outs.iter().map(|o| o.text_delta.as_str()).collect();
    if seq.is_finished() {
        assert_eq!(
            streamed,
            seq.text(),
            "streamed text differs from the final text"
        );
    }
    outs
}

fn stop_params(stop: &[&str]) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: Some(100),
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Whether `stop` lies across token boundaries of `ids` (no single token's text holds it).
fn spans_tokens(ids: &[u32], stop: &str) -> bool {
    let tok = tokenizer();
    ids.iter()
        .all(|&id| !tok.decode(&[id], false).unwrap().contains(stop))
}

fn finish(seq: &SequenceState) -> (FinishReason, Option<StopReason>) {
    let f = seq.finish().expect("finished");
    (f.reason, f.stop_reason.clone())
}

#[test]
fn stop_string_spanning_tokens_cuts_the_text_before_it() {
    let ids = encode("답변은 다음과 같습니다.\n\n###지시사항: 더 있음");
    assert!(spans_tokens(&ids, "###지시"));
    let mut seq = sequence(stop_params(&["###지시"]), "질문", &[]);
    let outs = run(&mut seq, &ids);
    assert_eq!(seq.text(), "답변은 다음과 같습니다.\n\n");
    assert_eq!(
        finish(&seq),
        (FinishReason::Stop, Some(StopReason::Text("###지시".into())))
    );
    // Generation ends on the token that completed the stop string.
    let last = seq.output_ids().len();
    assert_eq!(
        tokenizer().decode(&ids[last - 1..last], false).unwrap(),
        "지시사항"
    );
    assert_eq!(seq.output_ids(), &ids[..last]);
    // The last delta never shows any of "###": it was held back, then dropped.
    assert!(outs.iter().all(|o| !o.text_delta.contains('#')));
}

#[test]
fn stop_string_inside_split_korean_characters() {
    // "뷁" is three bytes, each its own token in the fixture's vocabulary.
    let text = "서울입니다. 그리고 뷁 끝";
    let ids = encode(text);
    let tok = tokenizer();
    let split = (1..ids.len()).any(|k| tok.decode(&ids[..k], false).unwrap().ends_with('\u{FFFD}'));
    assert!(split);
    for (stop, kept) in [
        ("뷁", "서울입니다. 그리고 "),
        ("고 뷁", "서울입니다. 그리"),
        ("니다", "서울입"), // '니' is split between two tokens
    ] {
        let mut seq = sequence(stop_params(&[stop]), "질문", &[]);
        let outs = run(&mut seq, &ids);
        assert_eq!(seq.text(), kept, "stop {stop:?}");
        assert_eq!(finish(&seq).1, Some(StopReason::Text(stop.into())));
        for o in &outs {
            assert!(
                !o.text_delta.contains('\u{FFFD}'),
                "stop {stop:?}: {:?}",
                o.text_delta
            );
        }
    }
}

#[test]
fn include_stop_str_keeps_the_stop_string_and_drops_what_follows() {
    let ids = encode("답변 ###지시사항");
    let mut p = stop_params(&["##"]);
    p.include_stop_str_in_output = true;
    let mut seq = sequence(p, "질문", &[]);
    run(&mut seq, &ids);
    // The token "###" completes "##" and brings one more '#', which is cut.
    assert_eq!(seq.text(), "답변 ##");
    assert_eq!(
        finish(&seq),
        (FinishReason::Stop, Some(StopReason::Text("##".into())))
    );
}

#[test]
fn partial_stop_string_is_held_back_then_released() {
    let ids = encode("답변 ###지도 보기");
    let mut seq = sequence(stop_params(&["###지시"]), "질문", &[]);
    let mut streamed = String::new();
    for &id in &ids {
        let out = seq.step(&forcing(id)).unwrap();
        streamed.push_str(&out.text_delta);
        // Whatever the step, the stream never ends in a prefix of the stop string.
        for cut in ["#", "##", "###", "###지"] {
            assert!(!streamed.ends_with(cut), "stream shows {streamed:?}");
        }
    }
    assert!(!seq.is_finished());
    assert_eq!(seq.text(), "답변 ###지도 보기");
    assert_eq!(streamed, "답변 ###지도 보기");
}

#[test]
fn max_tokens_finishes_with_length_and_no_stop_reason() {
    let ids = encode("하나 둘 셋 넷 다섯 여섯");
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.0,
            max_tokens: Some(3),
            ..Default::default()
        },
        "세어 보세요",
        &[],
    );
    run(&mut seq, &ids);
    assert_eq!(seq.output_ids(), &ids[..3]);
    assert_eq!(finish(&seq), (FinishReason::Length, None));
    // The third token is " " plus the first byte of "둘": the text stops at the last whole
    // character, and the space waits with the incomplete one (vLLM's rule).
    assert!(
        tokenizer()
            .decode(&ids[..3], true)
            .unwrap()
            .ends_with(" \u{FFFD}")
    );
    assert_eq!(seq.text(), "하나");
    let e = seq.step(&forcing(ids[3])).unwrap_err();
    assert!(
        matches!(e, SampleError::Finished { reason: "length" }),
        "{e}"
    );
}

#[test]
fn stop_tokens_finish_with_vllm_reasons() {
    let dot = encode(".")[0];
    let body = encode("안녕하세요");
    let script = |stop: u32| [body.clone(), vec![stop], encode(" 더")].concat();

    // The tokenizer's EOS: stop_reason null, its text left out even when not skipped.
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.0,
            skip_special_tokens: false,
            ..Default::default()
        },
        "인사",
        &[],
    );
    run(&mut seq, &script(EOS));
    assert_eq!(finish(&seq), (FinishReason::Stop, None));
    assert_eq!(seq.text(), "안녕하세요");
    assert_eq!(*seq.output_ids().last().unwrap(), EOS);

    // A stop_token_id: stop_reason is the id; its text is cut unless asked for.
    for (include, text) in [(false, "안녕하세요"), (true, "안녕하세요.")] {
        let mut seq = sequence(
            SamplingParams {
                temperature: 0.0,
                stop_token_ids: vec![dot],
                include_stop_str_in_output: include,
                ..Default::default()
            },
            "인사",
            &[],
        );
        run(&mut seq, &script(dot));
        assert_eq!(
            finish(&seq),
            (FinishReason::Stop, Some(StopReason::Token(dot)))
        );
        assert_eq!(seq.text(), text);
    }

    // generation_config.json's EOS ids stop too, with their id as stop_reason.
    let im_end = tokenizer().token_to_id("<|im_end|>").unwrap();
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        "인사",
        &[EOS, im_end],
    );
    run(&mut seq, &script(im_end));
    assert_eq!(
        finish(&seq),
        (FinishReason::Stop, Some(StopReason::Token(im_end)))
    );
    assert_eq!(seq.text(), "안녕하세요");

    // ignore_eos: neither EOS nor generation_config's ids stop; max_tokens does.
    let s = script(EOS);
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.0,
            ignore_eos: true,
            max_tokens: Some(s.len() as u32),
            ..Default::default()
        },
        "인사",
        &[im_end],
    );
    run(&mut seq, &s);
    assert_eq!(seq.output_ids(), &s[..]);
    assert_eq!(finish(&seq), (FinishReason::Length, None));
    assert_eq!(seq.text(), "안녕하세요 더");
}

#[test]
fn eos_as_the_last_allowed_token_is_a_stop() {
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.0,
            max_tokens: Some(2),
            ..Default::default()
        },
        "가",
        &[],
    );
    let a = encode("나")[0];
    run(&mut seq, &[a, EOS]);
    assert_eq!(finish(&seq), (FinishReason::Stop, None));
}

#[test]
fn min_tokens_masks_every_stop_token_and_stop_strings() {
    let im_end = tokenizer().token_to_id("<|im_end|>").unwrap();
    let dot = encode(".")[0];
    let word = encode("답변")[0];
    assert_eq!(encode("답변"), vec![word]);
    // The model wants to stop: EOS, the generation_config id and a stop_token_id all beat
    // the word token, but min_tokens 3 masks all three until three tokens are out.
    let mut row = vec![0.0f32; VOCAB];
    row[EOS as usize] = 30.0;
    row[im_end as usize] = 29.0;
    row[dot as usize] = 28.0;
    row[word as usize] = 20.0;
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.0,
            min_tokens: 3,
            stop_token_ids: vec![dot],
            stop: vec!["답변".into()],
            ..Default::default()
        },
        "대답",
        &[im_end],
    );
    let mut got = Vec::new();
    while !seq.is_finished() {
        got.push(seq.step(&row).unwrap().token.token_id);
    }
    // "답변" is produced inside min_tokens, so it is not matched as a stop string either.
    assert_eq!(got, vec![word, word, word, EOS]);
    assert_eq!(finish(&seq), (FinishReason::Stop, None));
    assert_eq!(seq.text(), "답변답변답변");

    // A stop string completed right after min_tokens is found, reaching back into the text
    // produced inside min_tokens.
    let ids = encode("ab");
    assert_eq!(ids.len(), 2);
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.0,
            min_tokens: 1,
            stop: vec!["ab".into()],
            ..Default::default()
        },
        "대답",
        &[],
    );
    run(&mut seq, &ids);
    assert_eq!(
        finish(&seq),
        (FinishReason::Stop, Some(StopReason::Text("ab".into())))
    );
    assert_eq!(seq.text(), "");
}

#[test]
fn the_models_context_ends_a_sequence() {
    let p = std::sync::Arc::new(
        SamplingParams {
            temperature: 0.0,
            max_tokens: None,
            min_tokens: 5,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    );
    let mut seq = SequenceState::new(sample::NewSequence {
        stop_tokens: std::sync::Arc::new(sample::StopTokens::new(&p, Some(EOS), &[])),
        rng: sample::Sampler::new(0).rng_for(&p, 0, 0),
        params: p,
        prompt_ids: vec![2, 10, 11],
        tokenizer: tokenizer(),
        max_model_len: Some(5),
    })
    .unwrap();
    run(&mut seq, &[20, 21, 22]);
    assert_eq!(seq.output_ids(), &[20, 21]);
    assert_eq!(finish(&seq), (FinishReason::Length, None));
}

#[test]
fn log_probs_are_raw_and_accumulate() {
    let ids = encode("보험금 청구");
    let mut seq = sequence(
        SamplingParams {
            temperature: 0.5,
            repetition_penalty: 1.3,
            logprobs: Some(2),
            max_tokens: Some(ids.len() as u32),
            ..Default::default()
        },
        "보험",
        &[],
    );
    run(&mut seq, &ids);
    // forcing(): one logit 30, the other V-1 at 0; the raw log-prob ignores the penalty and
    // the temperature.
    let want = 30.0 - (30f64.exp() + (VOCAB - 1) as f64).ln();
    for &lp in seq.token_logprobs() {
        assert!((lp as f64 - want).abs() < 1e-5, "{lp} vs {want}");
    }
    let sum: f64 = seq.token_logprobs().iter().map(|&x| x as f64).sum();
    assert!((seq.cumulative_logprob() - sum).abs() < 1e-9);
    assert_eq!(seq.top_logprobs().len(), ids.len());
    for (top, &id) in seq.top_logprobs().iter().zip(&ids) {
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].0, id);
        // Then the lowest id among the tied zeros.
        assert_eq!(top[1].0, if id == 0 { 1 } else { 0 });
    }
}

#[test]
fn empty_prompt_is_refused() {
    let p = std::sync::Arc::new(SamplingParams::default().validate().unwrap());
    let r = SequenceState::new(sample::NewSequence {
        stop_tokens: std::sync::Arc::new(sample::StopTokens::new(&p, Some(EOS), &[])),
        rng: sample::Sampler::new(0).rng_for(&p, 0, 0),
        params: p,
        prompt_ids: vec![],
        tokenizer: tokenizer(),
        max_model_len: None,
    });
    assert!(matches!(r, Err(SampleError::EmptyPrompt)));
}
