//! JSON as Python's `json.dumps` writes it, which is what chat templates
//! print: transformers gives them a `tojson` filter over `json.dumps(x,
//! ensure_ascii=False, indent=indent, separators=separators,
//! sort_keys=sort_keys)` (`utils/chat_template_utils.py`), where Jinja2's
//! and minijinja's own filters escape `<`, `>`, `&` and `'` for HTML and
//! space items differently. A tool schema printed into a prompt must be
//! byte for byte what the model saw in training.

use minijinja::value::Kwargs;
use minijinja::{Error, ErrorKind, Value};
use serde_json::Value as Json;

/// `json.dumps`'s layout options.
#[derive(Clone, Debug)]
pub struct Style {
    /// Spaces per level; `None` writes everything on one line.
    pub indent: Option<usize>,
    pub item_separator: String,
    pub key_separator: String,
    pub ensure_ascii: bool,
    pub sort_keys: bool,
}

impl Default for Style {
    /// `json.dumps(x)` with transformers' `ensure_ascii=False`.
    fn default() -> Style {
        Style {
            indent: None,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            ensure_ascii: false,
            sort_keys: false,
        }
    }
}

/// `value` as `json.dumps(value, …)` writes it.
pub fn dumps(value: &Json, style: &Style) -> String {
    let mut out = String::new();
    write_value(value, style, 0, &mut out);
    out
}

/// The `tojson` filter transformers registers: `x | tojson`,
/// `x | tojson(indent=4)`, `separators=(",", ":")`, `ensure_ascii`,
/// `sort_keys`.
pub fn tojson_filter(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let mut style = Style::default();
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    if let Some(indent) = indent.filter(|v| !v.is_none()) {
        let n = usize::try_from(indent.clone()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be a non-negative integer, got {indent}"),
            )
        })?;
        style.indent = Some(n);
        // Python: with an indent the item separator loses its space.
        style.item_separator = ",".into();
    }
    if let Some(separators) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(separators).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item_separator, key_separator)",
            )
        })?;
        style.item_separator = item;
        style.key_separator = key;
    }
    if let Some(ascii) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        style.ensure_ascii = ascii;
    }
    if let Some(sort) = kwargs.get::<Option<bool>>("sort_keys")? {
        style.sort_keys = sort;
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: cannot write {value} as JSON: {e}"),
        )
    })?;
    Ok(Value::from_safe_string(dumps(&json, &style)))
}

fn write_value(value: &Json, style: &Style, level: usize, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, Some(f)) => out.push_str(&python_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Json::String(s) => write_string(s, style.ensure_ascii, out),
        Json::Array(items) => {
            let items: Vec<&Json> = items.iter().collect();
            write_container(('[', ']'), &items, style, level, out, |item, out| {
                write_value(item, style, level + 1, out)
            });
        }
        Json::Object(map) => {
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            write_container(('{', '}'), &entries, style, level, out, |(k, v), out| {
                write_string(k, style.ensure_ascii, out);
                out.push_str(&style.key_separator);
                write_value(v, style, level + 1, out);
            });
        }
    }
}

/// `[a, b]`, or with an indent each item on its own line one level in.
fn write_container<T: Copy>(
    (open, close): (char, char),
    items: &[T],
    style: &Style,
    level: usize,
    out: &mut String,
    mut write_item: impl FnMut(T, &mut String),
) {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return;
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * level));
        }
    };
    for (i, &item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_separator);
        }
        newline(out, level + 1);
        write_item(item, out);
    }
    newline(out, level);
    out.push(close);
}

/// A JSON string as Python escapes it: `"`, `\\` and control characters
/// always (`\n`, `\r`, `\t`, `\b`, `\f` by name, the rest as `\u00XX`), and
/// with `ensure_ascii` everything past ASCII as UTF-16 `\uXXXX`.
fn write_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that read back the same
/// (as Rust's), written fixed when the exponent is in -4..16, else as
/// `1e-05` / `1.5e+16`; whole numbers keep a `.0`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e16", "-2e-5".
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("{:e} always writes an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} writes an integer exponent");
    if (-4..16).contains(&exponent) {
        let fixed = f.to_string();
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Each expected string is what CPython 3.11's json.dumps printed.
    #[test]
    fn writes_what_python_writes() {
        let v = json!({"b": [1, 2.5, -0.0001, 1e-05, 1e16, 3.0, null, true],
                       "a": {"ü": "x\"y\n\u{1}", "e": {}, "l": []}});
        assert_eq!(
            dumps(&v, &Style::default()),
            r#"{"b": [1, 2.5, -0.0001, 1e-05, 1e+16, 3.0, null, true], "a": {"ü": "x\"y\n\u0001", "e": {}, "l": []}}"#
        );
        let indented = Style {
            indent: Some(2),
            item_separator: ",".into(),
            sort_keys: true,
            ensure_ascii: true,
            ..Style::default()
        };
        assert_eq!(
            dumps(&json!({"z": [1, {"k": "é😀"}], "a": []}), &indented),
            "{\n  \"a\": [],\n  \"z\": [\n    1,\n    {\n      \"k\": \"\\u00e9\\ud83d\\ude00\"\n    }\n  ]\n}"
        );
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(123456789.0), "123456789.0");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
        assert_eq!(python_float(-2.5e300), "-2.5e+300");
    }
}
