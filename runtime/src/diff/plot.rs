//! A hand-written SVG line plot of a diff's errors on a log scale: one line
//! per step over the dumped values (then the logits), or the logits' error
//! by step without dumps. No plotting crate: the runtime stays small.

use super::DiffReport;
use std::fmt::Write;

/// One line of the plot.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    /// One value per x tick; 0 is drawn on the bottom row, ∞ on the top edge.
    pub values: Vec<f64>,
}

#[derive(Clone, Debug)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub x_ticks: Vec<String>,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A dashed horizontal line: value and label.
    pub threshold: Option<(f64, String)>,
}

/// The error plot of a diff report: max abs difference per dumped value
/// (graph order, the logits last), one line per step; without dumps, the
/// logits' max abs difference per step.
pub fn error_plot(report: &DiffReport, a: &str, b: &str, max_abs: f32) -> Plot {
    let logits: Vec<f64> = report.steps.iter().map(|d| d.max_abs as f64).collect();
    let threshold = Some((max_abs as f64, format!("--max-abs {max_abs:.0e}")));
    let title = format!("{a} vs {b}: max abs difference");
    let y_label = "max abs difference (log scale)".to_string();
    if report.tensors.is_empty() {
        return Plot {
            title,
            x_label: "step (0 is the prefill)".into(),
            x_ticks: (0..logits.len()).map(|s| s.to_string()).collect(),
            y_label,
            series: vec![Series {
                label: "logits".into(),
                values: logits,
            }],
            threshold,
        };
    }
    let mut names: Vec<&str> = Vec::new();
    for d in &report.tensors {
        if !names.contains(&d.name.as_str()) {
            names.push(&d.name);
        }
    }
    // The logits close each line, unless they were dumped by name already.
    let logits_last = !names.contains(&crate::ir::GraphNames::LOGITS);
    let series = (0..logits.len())
        .map(|step| {
            let mut values = vec![f64::NAN; names.len()];
            for d in report.tensors.iter().filter(|d| d.step == step) {
                let at = names.iter().position(|n| *n == d.name).expect("listed");
                values[at] = d.closeness.max_abs as f64;
            }
            if logits_last {
                values.push(logits[step]);
            }
            Series {
                label: if step == 0 {
                    "step 0 (prefill)".into()
                } else {
                    format!("step {step}")
                },
                values,
            }
        })
        .collect();
    let mut x_ticks: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    if logits_last {
        x_ticks.push(crate::ir::GraphNames::LOGITS.into());
    }
    Plot {
        title,
        x_label: "value, in graph order".into(),
        x_ticks,
        y_label,
        series,
        threshold,
    }
}

/// Text and attribute values, escaped for XML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newlines are not XML.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// The decades the y axis spans, and whether a row below them holds zeros.
struct Scale {
    lo: i32,
    hi: i32,
    zero_row: bool,
}

impl Scale {
    fn new(values: impl Iterator<Item = f64>) -> Scale {
        let (mut min, mut max, mut zeros) = (f64::INFINITY, 0f64, false);
        for v in values {
            if v == 0.0 {
                zeros = true;
            } else if v.is_finite() && v > 0.0 {
                min = min.min(v);
                max = max.max(v);
            }
        }
        let (mut lo, mut hi) = if max > 0.0 {
            (min.log10().floor() as i32, max.log10().ceil() as i32)
        } else {
            (-8, 0)
        };
        if hi <= lo {
            hi = lo + 1;
        }
        if zeros {
            lo -= 1;
        }
        Scale {
            lo,
            hi,
            zero_row: zeros,
        }
    }

    /// 0 at the bottom, 1 at the top.
    fn fraction(&self, v: f64) -> Option<f64> {
        if v.is_nan() {
            return None;
        }
        let (lo, hi) = (self.lo as f64, self.hi as f64);
        let exponent = if v <= 0.0 {
            lo
        } else if v.is_infinite() {
            hi
        } else {
            v.log10()
                .clamp(lo + if self.zero_row { 1.0 } else { 0.0 }, hi)
        };
        Some((exponent - lo) / (hi - lo))
    }
}

impl Plot {
    pub fn to_svg(&self) -> String {
        let n = self.x_ticks.len().max(1);
        let rotate = self.x_ticks.iter().any(|t| t.chars().count() > 3);
        let longest = self
            .x_ticks
            .iter()
            .map(|t| t.chars().count())
            .max()
            .unwrap_or(1);
        let (top, plot_h) = (48.0, 320.0);
        let plot_w = f64::max(480.0, n as f64 * if rotate { 26.0 } else { 40.0 });
        // Room for the first rotated label, which reaches left of its tick.
        let first = self.x_ticks.first().map_or(0, |t| t.chars().count());
        let left = if rotate {
            f64::max(78.0, first as f64 * 4.6 + 12.0 - plot_w / n as f64 / 2.0)
        } else {
            78.0
        };
        let tick_room = if rotate {
            longest as f64 * 4.2 + 16.0
        } else {
            22.0
        };
        let legend_x = left + plot_w + 24.0;
        let legend_w = 20.0
            + 7.0
                * self
                    .series
                    .iter()
                    .map(|s| s.label.chars().count())
                    .max()
                    .unwrap_or(4) as f64;
        let width = legend_x + legend_w + 16.0;
        let height = f64::max(
            top + plot_h + tick_room + 40.0,
            top + 18.0 * (self.series.len() + 2) as f64,
        );
        let scale = Scale::new(
            self.series
                .iter()
                .flat_map(|s| s.values.iter().copied())
                .chain(self.threshold.iter().map(|t| t.0)),
        );
        let x_at = |i: usize| left + (i as f64 + 0.5) * plot_w / n as f64;
        let y_at = |v: f64| scale.fraction(v).map(|f| top + plot_h * (1.0 - f));

        let mut svg = String::new();
        let w = &mut svg;
        // fmt::Write into a String cannot fail.
        let _ = writeln!(w, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            w,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(w, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            w,
            r#"<text x="{:.1}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
            left + plot_w / 2.0,
            escape(&self.title)
        );

        // Y axis: a grid line and label per decade (every other one when many).
        let every = ((scale.hi - scale.lo) as usize).div_ceil(10).max(1);
        for (k, exponent) in (scale.lo..=scale.hi).enumerate() {
            if k % every != 0 && exponent != scale.hi {
                continue;
            }
            let y =
                top + plot_h * (1.0 - (exponent - scale.lo) as f64 / (scale.hi - scale.lo) as f64);
            let label = if scale.zero_row && exponent == scale.lo {
                "0".to_string()
            } else {
                format!("1e{exponent}")
            };
            let _ = writeln!(
                w,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/>"##,
                left + plot_w
            );
            let _ = writeln!(
                w,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 4.0,
                escape(&label)
            );
        }
        if scale.zero_row {
            let y = top + plot_h * (1.0 - 1.0 / (scale.hi - scale.lo) as f64);
            let _ = writeln!(
                w,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#999" stroke-dasharray="2 3"/>"##,
                left + plot_w
            );
        }
        let _ = writeln!(
            w,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            escape(&self.y_label)
        );

        // X axis ticks and labels.
        for (i, tick) in self.x_ticks.iter().enumerate() {
            let x = x_at(i);
            let y = top + plot_h;
            let _ = writeln!(
                w,
                r##"<line x1="{x:.1}" y1="{y:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/>"##,
                y + 5.0
            );
            if rotate {
                let _ = writeln!(
                    w,
                    r#"<text transform="translate({x:.1} {:.1}) rotate(-40)" text-anchor="end" font-size="11">{}</text>"#,
                    y + 14.0,
                    escape(tick)
                );
            } else {
                let _ = writeln!(
                    w,
                    r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    y + 18.0,
                    escape(tick)
                );
            }
        }
        let _ = writeln!(
            w,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + plot_w / 2.0,
            top + plot_h + tick_room + 24.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            w,
            r##"<rect x="{left:.1}" y="{top:.1}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#333"/>"##
        );

        if let Some((value, label)) = &self.threshold {
            if let Some(y) = y_at(*value) {
                let _ = writeln!(
                    w,
                    r##"<line class="threshold" x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#b00" stroke-dasharray="6 4"/>"##,
                    left + plot_w
                );
                let _ = writeln!(
                    w,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#b00">{}</text>"##,
                    left + plot_w - 4.0,
                    y - 4.0,
                    escape(label)
                );
            }
        }

        for (k, series) in self.series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let dash = if k >= PALETTE.len() {
                r#" stroke-dasharray="5 3""#
            } else {
                ""
            };
            let points: Vec<(f64, f64)> = series
                .values
                .iter()
                .enumerate()
                .filter_map(|(i, &v)| y_at(v).map(|y| (x_at(i), y)))
                .collect();
            let _ = writeln!(w, r#"<g><title>{}</title>"#, escape(&series.label));
            let coords: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                w,
                r#"<polyline class="series" data-label="{}" points="{}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>"#,
                escape(&series.label),
                coords.join(" ")
            );
            for (x, y) in &points {
                let _ = writeln!(
                    w,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.6" fill="{color}"/>"#
                );
            }
            let _ = writeln!(w, "</g>");
            let y = top + 8.0 + 18.0 * k as f64;
            let _ = writeln!(
                w,
                r#"<line x1="{legend_x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
                legend_x + 18.0
            );
            let _ = writeln!(
                w,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                legend_x + 24.0,
                y + 4.0,
                escape(&series.label)
            );
        }
        let _ = writeln!(w, "</svg>");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::dump::TensorDiff;
    use crate::diff::{compare, Closeness};

    /// A small XML well-formedness check: balanced tags, quoted attributes,
    /// no raw `<` or `&` in text or attribute values. Returns the elements'
    /// tags with their attributes, in document order.
    fn parse_xml(xml: &str) -> Vec<(String, Vec<(String, String)>)> {
        fn check_text(text: &str) {
            assert!(!text.contains('<'), "raw < in {text:?}");
            for (i, _) in text.match_indices('&') {
                let rest = &text[i + 1..];
                let entity = rest.split(';').next().unwrap();
                assert!(
                    rest.contains(';')
                        && (["amp", "lt", "gt", "quot", "apos"].contains(&entity)
                            || entity.starts_with('#')),
                    "bad entity in {text:?}"
                );
            }
        }
        let body = xml.trim_start();
        let body = match body.strip_prefix("<?xml") {
            Some(rest) => &rest[rest.find("?>").expect("prolog ends") + 2..],
            None => body,
        };
        let (mut stack, mut elements, mut roots) = (Vec::<String>::new(), Vec::new(), 0);
        let mut rest = body;
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open]);
            if stack.is_empty() {
                assert!(rest[..open].trim().is_empty(), "text outside the root");
            }
            let close = rest[open..].find('>').expect("tag ends") + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
            let name = &tag[..name_end];
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '-'),
                "bad tag name {name:?}"
            );
            let mut attrs = Vec::new();
            let mut a = tag[name_end..].trim_start();
            while !a.is_empty() {
                let eq = a.find('=').expect("attribute has a value");
                let key = a[..eq].trim();
                let quoted = &a[eq + 1..];
                let q = quoted.chars().next().unwrap();
                assert!(q == '"' || q == '\'', "unquoted attribute {key}");
                let end = quoted[1..].find(q).expect("attribute value ends") + 1;
                let value = &quoted[1..end];
                check_text(value);
                assert!(
                    attrs.iter().all(|(k, _): &(String, String)| k != key),
                    "duplicate attribute {key}"
                );
                attrs.push((key.to_string(), value.to_string()));
                a = quoted[end + 1..].trim_start();
            }
            if stack.is_empty() {
                roots += 1;
            }
            elements.push((name.to_string(), attrs));
            if !self_closing {
                stack.push(name.to_string());
            }
        }
        check_text(rest);
        assert!(
            rest.trim().is_empty() && stack.is_empty(),
            "unclosed {stack:?}"
        );
        assert_eq!(roots, 1, "one root element");
        elements
    }

    fn report(names: &[&str], steps: usize) -> DiffReport {
        let row = [0.5f32, 1.0, -2.0, 3.0, 0.0, 1.5];
        let mut other = row;
        other[2] += 1e-4;
        let tensors = (0..steps)
            .flat_map(|step| {
                names.iter().enumerate().map(move |(i, name)| TensorDiff {
                    step,
                    name: name.to_string(),
                    shape: vec![1, 4],
                    closeness: Closeness {
                        // Exact zero on the first value, growing after.
                        max_abs: if i == 0 {
                            0.0
                        } else {
                            1e-7 * 10f32.powi(i as i32)
                        },
                        mean_abs: 0.0,
                        cosine: 1.0,
                        scale: 1.0,
                    },
                })
            })
            .collect();
        DiffReport {
            tokens: vec![1; steps],
            steps: (0..steps).map(|_| compare(&row, &other)).collect(),
            tensors,
        }
    }

    #[test]
    fn one_well_formed_series_per_step_with_names_escaped() {
        let names = [
            "embed",
            "model.layers.0.<mlp> & \"out\"",
            "model.layers.1.mlp_residual",
        ];
        let svg = error_plot(&report(&names, 3), "cpu", "onnxruntime", 1e-3).to_svg();
        let elements = parse_xml(&svg);
        assert_eq!(elements[0].0, "svg");
        let series: Vec<&Vec<(String, String)>> = elements
            .iter()
            .filter(|(tag, attrs)| {
                tag == "polyline" && attrs.iter().any(|(k, v)| k == "class" && v == "series")
            })
            .map(|(_, attrs)| attrs)
            .collect();
        assert_eq!(series.len(), 3, "one line per step");
        for (step, attrs) in series.iter().enumerate() {
            let get = |key: &str| &attrs.iter().find(|(k, _)| k == key).unwrap().1;
            assert!(get("data-label").starts_with(&format!("step {step}")));
            // Three dumped values and the logits.
            assert_eq!(get("points").split(' ').count(), 4);
        }
        assert!(svg.contains("model.layers.0.&lt;mlp&gt; &amp; &quot;out&quot;"));
        assert!(!svg.contains("<mlp>"));
        // The exact zero gets its own bottom row, labelled 0.
        assert!(svg.contains(">0</text>"), "{svg}");
        assert!(svg.contains("class=\"threshold\""));
    }

    #[test]
    fn logits_dumped_by_name_are_not_plotted_twice() {
        let svg = error_plot(&report(&["embed", "logits"], 2), "a", "b", 1e-3).to_svg();
        let elements = parse_xml(&svg);
        let points = elements
            .iter()
            .find(|(tag, _)| tag == "polyline")
            .and_then(|(_, attrs)| attrs.iter().find(|(k, _)| k == "points"))
            .map(|(_, v)| v.split(' ').count());
        assert_eq!(points, Some(2));
        assert_eq!(svg.matches(">logits</text>").count(), 1);
    }

    #[test]
    fn without_dumps_the_logits_error_is_plotted_by_step() {
        let svg = error_plot(&report(&[], 5), "cpu", "onnxruntime", 1e-3).to_svg();
        let elements = parse_xml(&svg);
        let lines: Vec<_> = elements
            .iter()
            .filter(|(tag, _)| tag == "polyline")
            .collect();
        assert_eq!(lines.len(), 1);
        let points = &lines[0].1.iter().find(|(k, _)| k == "points").unwrap().1;
        assert_eq!(points.split(' ').count(), 5);
        assert!(svg.contains("step (0 is the prefill)"));
    }

    #[test]
    fn the_checker_rejects_broken_xml() {
        for bad in [
            "<svg><g></svg>",
            "<svg a=1/>",
            "<svg><text>a < b</text></svg>",
            "<svg><text>a & b</text></svg>",
            "<svg/><svg/>",
        ] {
            assert!(
                std::panic::catch_unwind(|| parse_xml(bad)).is_err(),
                "accepted {bad}"
            );
        }
    }

    #[test]
    fn log_scale_spans_the_decades_and_keeps_zero_apart() {
        let s = Scale::new([0.0, 2e-6, 3e-2, f64::INFINITY].into_iter());
        assert_eq!((s.lo, s.hi, s.zero_row), (-7, -1, true));
        assert_eq!(s.fraction(0.0), Some(0.0));
        assert_eq!(s.fraction(f64::INFINITY), Some(1.0));
        assert_eq!(s.fraction(f64::NAN), None);
        // 1e-6 is the first decade above the zero row.
        assert!((s.fraction(1e-6).unwrap() - 1.0 / 6.0).abs() < 1e-12);
    }
}
