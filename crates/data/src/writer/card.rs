//! README.md: the dataset card's YAML header and body.
//!
//! The YAML declares one `default` config whose `data_files` map each split to its file, the
//! features, and the splits with their exact `num_examples` (`datasets` verifies them) and
//! `num_bytes` (the Arrow size `datasets` records: per string column 4 bytes of offset per
//! row plus the UTF-8 bytes, 8 bytes per row per float column; it is informational, but
//! without it `datasets` ignores the whole `splits` block).

use super::{Columns, Format, split_file};

/// The whole README.md: YAML header, title, column description, then `body`.
pub fn card(splits: &[(&str, usize, u64)], columns: Columns, format: Format, body: &str) -> String {
    let mut y = String::from("---\nconfigs:\n- config_name: default\n  data_files:\n");
    for (name, _, _) in splits {
        y.push_str(&format!(
            "  - split: {name}\n    path: {}\n",
            split_file(name, format)
        ));
    }
    y.push_str("dataset_info:\n  features:\n");
    for (name, dtype) in columns.features() {
        y.push_str(&format!("  - name: {name}\n    dtype: {dtype}\n"));
    }
    y.push_str("  splits:\n");
    for (name, n, bytes) in splits {
        y.push_str(&format!(
            "  - name: {name}\n    num_bytes: {bytes}\n    num_examples: {n}\n"
        ));
    }
    y.push_str("---\n\n");
    let [p, c, r] = columns.schema.text_columns();
    y.push_str(&format!(
        "# Preference pairs\n\nWritten by `prefer pairs`. One row per pair: `{p}` is the prompt exactly as it was \
         sampled, `{c}` the gold answer (chosen), `{r}` the model's sample (rejected).\n"
    ));
    if columns.ref_chosen || columns.ref_rejected {
        y.push_str(
            "`ref_*_logps` are the summed log-probs of each completion under the reference model \
             (TRL's precomputed reference log-probs); they are valid only when the trainer applies no \
             prompt wrapper.\n",
        );
    }
    y.push('\n');
    y.push_str(body);
    if !body.ends_with('\n') {
        y.push('\n');
    }
    y
}

#[cfg(test)]
mod tests {
    use super::super::Schema;
    use super::*;

    #[test]
    fn yaml_declares_files_features_and_exact_counts() {
        let columns = Columns {
            schema: Schema::Trl,
            ref_chosen: false,
            ref_rejected: false,
        };
        let text = card(
            &[("train", 3, 30), ("validation", 1, 9)],
            columns,
            Format::Parquet,
            "## Counts\n",
        );
        let expected_yaml = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-00000-of-00001.parquet\n  - split: validation\n    path: data/validation-00000-of-00001.parquet\ndataset_info:\n  features:\n  - name: prompt\n    dtype: string\n  - name: chosen\n    dtype: string\n  - name: rejected\n    dtype: string\n  splits:\n  - name: train\n    num_bytes: 30\n    num_examples: 3\n  - name: validation\n    num_bytes: 9\n    num_examples: 1\n---\n";
        assert!(text.starts_with(expected_yaml), "{text}");
        assert!(text.ends_with("## Counts\n"));
    }
}
