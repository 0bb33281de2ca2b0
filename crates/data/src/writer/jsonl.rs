//! JSON Lines split files (`--format jsonl`): one object per pair, keys in schema order.

use std::io::Write;
use std::path::Path;

use super::{Columns, text_cells};
use crate::error::{DataError, Result};
use crate::pairs::Pair;

pub(crate) fn write(path: &Path, pairs: &[Pair], columns: Columns) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    let names = columns.schema.text_columns();
    for pair in pairs {
        // Built by hand so the keys keep schema order (serde_json's map would sort them).
        let mut line = String::from("{");
        for (i, (name, text)) in names.iter().zip(text_cells(pair)).enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&serde_json::to_string(name).unwrap_or_default());
            line.push(':');
            line.push_str(&serde_json::to_string(text).unwrap_or_default());
        }
        let numbers = [
            (
                columns.ref_chosen,
                "ref_chosen_logps",
                pair.ref_chosen_logps,
            ),
            (
                columns.ref_rejected,
                "ref_rejected_logps",
                pair.ref_rejected_logps,
            ),
        ];
        for (present, name, value) in numbers {
            if present {
                let v = value
                    .and_then(serde_json::Number::from_f64)
                    .map_or("null".to_string(), |n| n.to_string());
                line.push_str(&format!(",\"{name}\":{v}"));
            }
        }
        line.push_str("}\n");
        w.write_all(line.as_bytes())
            .map_err(|e| DataError::io(path, e))?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}
