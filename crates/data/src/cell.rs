//! Typed cells and the one rule that turns a cell into text.
//!
//! Sources disagree about types: JSON and parquet are typed, xlsx stores every number as a
//! float, CSV is all text. A field that must be text (instruction, output, …) goes through
//! [`Cell::to_text`], which applies the documented rule (docs/pairs.md, "Cells"):
//!
//! | cell | result |
//! |---|---|
//! | text | kept byte for byte; empty or whitespace-only → `Empty` |
//! | null, NaN | `Empty` (the row is dropped and counted) |
//! | integer | decimal digits (`42`), counted as converted |
//! | float with an integral value below 2^53 | as an integer (`42.0` → `42`: xlsx has no integers) |
//! | other float | shortest round-trip decimal (`0.1`) |
//! | boolean | `true` / `false` |
//! | list, object, date, error cell | error naming file, row and column |
//!
//! With `strict`, every non-text, non-null cell is an error instead of a conversion.

/// One value of a source table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    /// A value that cannot stand for text; the string names its type for error messages.
    Other(String),
}

/// What [`Cell::to_text`] made of a cell.
#[derive(Debug, Clone, PartialEq)]
pub enum TextCell {
    /// Text that was text in the source.
    Text(String),
    /// Text converted from a number or boolean.
    Converted(String),
    /// Null, NaN, or text that is empty or only whitespace.
    Empty,
}

/// Why a cell could not become text; the caller adds file, row and column.
#[derive(Debug, Clone, PartialEq)]
pub struct NotText {
    /// The cell's type as the error message shows it ("a list", "a number (strict mode)").
    pub found: String,
}

impl Cell {
    /// Applies the text rule of the module doc.
    pub fn to_text(&self, strict: bool) -> Result<TextCell, NotText> {
        let converted = |s: String, what: &str| {
            if strict {
                Err(NotText {
                    found: format!("{what} {s} (--strict allows only text)"),
                })
            } else {
                Ok(TextCell::Converted(s))
            }
        };
        match self {
            Cell::Null => Ok(TextCell::Empty),
            Cell::Text(s) if s.trim().is_empty() => Ok(TextCell::Empty),
            Cell::Text(s) => Ok(TextCell::Text(s.clone())),
            Cell::Int(i) => converted(i.to_string(), "the number"),
            Cell::Float(f) if f.is_nan() => Ok(TextCell::Empty),
            Cell::Float(f) => converted(float_text(*f), "the number"),
            Cell::Bool(b) => converted(b.to_string(), "the boolean"),
            Cell::Other(kind) => Err(NotText {
                found: kind.clone(),
            }),
        }
    }

    /// The cell as an identifier (join key): text as is, integers in decimal, integral
    /// floats as integers; `None` for null/empty.
    pub fn to_key(&self) -> Option<String> {
        match self {
            Cell::Text(s) if !s.is_empty() => Some(s.clone()),
            Cell::Int(i) => Some(i.to_string()),
            Cell::Float(f) if f.is_finite() => Some(float_text(*f)),
            Cell::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// Integral floats print without a fraction (xlsx stores 42 as 42.0); others in the
/// shortest form that reads back to the same f64.
fn float_text(f: f64) -> String {
    const EXACT_INT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
    if f.is_finite() && f.fract() == 0.0 && f.abs() < EXACT_INT_LIMIT {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_kept_byte_for_byte_and_blank_is_empty() {
        let s = " 안녕\n\"하세요\" ".to_string();
        assert_eq!(Cell::Text(s.clone()).to_text(false), Ok(TextCell::Text(s)));
        assert_eq!(
            Cell::Text(" \n\t".into()).to_text(false),
            Ok(TextCell::Empty)
        );
        assert_eq!(Cell::Null.to_text(false), Ok(TextCell::Empty));
        assert_eq!(Cell::Float(f64::NAN).to_text(false), Ok(TextCell::Empty));
    }

    #[test]
    fn numbers_convert_by_the_documented_rule() {
        assert_eq!(
            Cell::Int(-7).to_text(false),
            Ok(TextCell::Converted("-7".into()))
        );
        assert_eq!(
            Cell::Float(42.0).to_text(false),
            Ok(TextCell::Converted("42".into()))
        );
        assert_eq!(
            Cell::Float(0.1).to_text(false),
            Ok(TextCell::Converted("0.1".into()))
        );
        assert_eq!(
            Cell::Float(1.5e300)
                .to_text(false)
                .map(|t| matches!(t, TextCell::Converted(_))),
            Ok(true)
        );
        assert_eq!(
            Cell::Bool(true).to_text(false),
            Ok(TextCell::Converted("true".into()))
        );
    }

    #[test]
    fn strict_refuses_numbers_and_nested_values_always_fail() {
        assert!(Cell::Int(3).to_text(true).is_err());
        assert!(Cell::Text("3".into()).to_text(true).is_ok());
        let err = Cell::Other("a list".into()).to_text(false).unwrap_err();
        assert_eq!(err.found, "a list");
    }

    #[test]
    fn keys_normalise_integral_floats() {
        assert_eq!(Cell::Float(17.0).to_key(), Some("17".into()));
        assert_eq!(Cell::Int(17).to_key(), Some("17".into()));
        assert_eq!(Cell::Null.to_key(), None);
    }
}
