//! # data — from instruction tables to a published preference dataset
//!
//! The data side of prefer, standing apart from the model crates (it reads tokenizers with
//! the `tokenizers` crate directly). Stages, one module each:
//!
//! - [`ingest`]: jsonl, json, csv/tsv, parquet, xlsx and `datasets.save_to_disk` folders →
//!   a [`ingest::Table`] of typed [`cell::Cell`]s → [`ingest::Record`]s of text fields, with
//!   a per-source column mapping and the documented text rule of [`cell`]. Shared with
//!   `prefer sample`.
//! - [`template`]: prompt templates (the reference workflow's Korean one, alpaca, chatml, the
//!   model's chat template as transformers renders it, user Jinja files), and the DPO-time
//!   `###질문:` wrapper the trainer applies ([`template::DpoWrapper`]).
//! - [`samples`]: the rows `prefer sample` writes and the scores `prefer score` writes.
//! - [`tokens`]: token counts under the model's tokenizer for the budget filter.
//! - [`pairs`]: join gold with samples, filter (each rule counted), split.
//! - [`writer`]: the dataset folder `datasets.load_dataset` reads, written atomically.
//! - [`hub`]: push a folder through the Hub's commit API.
//!
//! Every error is a [`DataError`] that names the file, the line or row, and the column.
//!
//! ## Example
//! ```
//! use data::template::{Template, wrap_question};
//! let prompt = Template::Korean.render("보험료는 어떻게 정하나요?", None).unwrap();
//! assert!(prompt.starts_with("아래는 문제를 설명하는 지시사항입니다."));
//! assert!(prompt.ends_with("###지시사항:\n보험료는 어떻게 정하나요?\n\n###답변:\n"));
//! // The trainer, not the data, applies the reference workflow's DPO-time wrapper:
//! assert_eq!(wrap_question("Q"), "###질문:\nQ\n\n###답변:\n");
//! ```

pub mod cell;
pub mod error;
pub mod hub;
pub mod ingest;
pub mod pairs;
pub mod samples;
pub mod template;
pub mod tokens;
pub mod writer;

pub use error::{DataError, Result};
