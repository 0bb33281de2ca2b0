//! Benchmark: `prefer pairs` end to end on N gold rows + N samples (default 100k).
//!
//!     cargo run --release -p data --example pairs_bench -- [ROWS] [TOKENIZER_DIR] [nobudget]
//!
//! Writes a gold parquet (instruction/output, Korean text of a few hundred characters) and a
//! samples file in `prefer sample`'s format into a temp folder, then times the stages the
//! command runs: read samples, read gold + render the Korean template + join + filters with
//! a token budget (tokenization in parallel, the fixture BPE tokenizer by default), and the
//! parquet writer. Prints rows/s per stage and overall.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use data::ingest::SourceSpec;
use data::pairs::{self, Filters, GoldSource, JoinKey, PairOptions};
use data::template::{Template, korean};
use data::tokens::TokenCounter;
use data::writer::{self, Columns, Format};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rows: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let tokenizer_dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizer")
        });
    // A third argument `nobudget` skips the token budget (to see what tokenization costs).
    let budget = args.next().as_deref() != Some("nobudget");
    let dir = tempfile::tempdir()?;
    let gold_path = dir.path().join("gold.parquet");
    let samples_path = dir.path().join("samples.jsonl");

    // Inputs.
    let prefix = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    let body = "보험 계약의 해지환급금은 납입한 보험료에서 사업비와 위험보험료를 뺀 금액으로, 가입 기간이 짧을수록 적습니다. ";
    let instructions: Vec<String> = (0..rows)
        .map(|i| {
            format!(
                "질문 {i}: 보험료 납입이 어려우면 어떻게 하나요? {}",
                prefix(body, 20)
            )
        })
        .collect();
    let outputs: Vec<String> = (0..rows)
        .map(|i| format!("{}{body}(답 {i})", body.repeat(1 + i % 3)))
        .collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(instructions.iter())),
        Arc::new(StringArray::from_iter_values(outputs.iter())),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("instruction", DataType::Utf8, false),
        Field::new("output", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&gold_path)?, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    let mut samples = String::with_capacity(rows * 600);
    for (i, instruction) in instructions.iter().enumerate() {
        let row = serde_json::json!({
            "id": format!("gold.parquet:{i}"), "sample_index": 0, "instruction": instruction,
            "prompt": korean(instruction), "text": format!("모델의 답변입니다. {}", prefix(body, (i % 4 + 1) * 10)),
            "token_ids": [1, 2, 3], "finish_reason": if i % 50 == 0 { "length" } else { "stop" },
            "cumulative_logprob": -12.5,
        });
        samples.push_str(&row.to_string());
        samples.push('\n');
    }
    std::fs::write(&samples_path, samples)?;
    let input_mb = (std::fs::metadata(&gold_path)?.len() + std::fs::metadata(&samples_path)?.len())
        as f64
        / 1e6;
    println!(
        "{rows} gold rows + {rows} samples ({input_mb:.1} MB), tokenizer {}",
        tokenizer_dir.display()
    );
    println!("rayon threads: {}", rayon::current_num_threads());

    // The stages `prefer pairs` runs.
    let total = Instant::now();
    let t = Instant::now();
    let samples = data::samples::read_samples(&samples_path)?;
    let read_s = t.elapsed().as_secs_f64();
    let tokens = TokenCounter::open(&tokenizer_dir)?;
    let template = Template::Korean;
    let gold = vec![GoldSource {
        split: "train".into(),
        spec: SourceSpec::plain(&gold_path),
    }];
    let options = PairOptions {
        template: &template,
        join: JoinKey::Auto,
        strict: false,
        filters: Filters {
            keep_truncated: false,
            max_length: budget.then_some(4096),
            max_prompt_length: None,
        },
        tokens: budget.then_some(&tokens),
        holdout: Some(pairs::Holdout::parse("validation=0.05", "train", 0)?),
        scores: None,
    };
    let t = Instant::now();
    let set = pairs::build(&gold, &samples, &options)?;
    let build_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = dir.path().join("out");
    let columns = Columns {
        schema: writer::Schema::Trl,
        ref_chosen: false,
        ref_rejected: false,
    };
    writer::write_dataset(
        &out,
        &set.splits,
        columns,
        Format::Parquet,
        &set.report.render_markdown(),
        false,
    )?;
    let write_s = t.elapsed().as_secs_f64();
    let total_s = total.elapsed().as_secs_f64();
    let written: usize = set.splits.iter().map(|s| s.pairs.len()).sum();
    println!(
        "read samples          {read_s:7.2} s  {:>9.0} rows/s",
        rows as f64 / read_s
    );
    println!(
        "gold + join + filters {build_s:7.2} s  {:>9.0} rows/s (tokenizes 3 texts per pair)",
        rows as f64 / build_s
    );
    println!(
        "write parquet + card  {write_s:7.2} s  {:>9.0} rows/s",
        written as f64 / write_s
    );
    println!(
        "end to end            {total_s:7.2} s  {:>9.0} rows/s ({written} pairs written)",
        rows as f64 / total_s
    );
    print!("{}", set.report.render_text());
    Ok(())
}
