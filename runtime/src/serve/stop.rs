//! Stop strings over streamed text: text is released as soon as it cannot
//! be the start of a stop string, and generation ends at the first match,
//! which is cut off (as OpenAI's `stop` does: the stop string is not
//! returned).

pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not released: it may be the start of a stop string.
    held: String,
}

/// What a piece of text released, and whether a stop string ended it.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    pub stopped: bool,
}

impl StopStrings {
    /// Empty stop strings are dropped: they would match everywhere.
    pub fn new(stops: Vec<String>) -> StopStrings {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds generated text; returns what can be sent now.
    pub fn push(&mut self, piece: &str) -> Released {
        self.held.push_str(piece);
        let first_match = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_match {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // Hold back the longest tail that begins some stop string.
        let keep = self
            .stops
            .iter()
            .map(|stop| longest_suffix_that_starts(&self.held, stop))
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let text = self.held[..split].to_string();
        self.held.drain(..split);
        Released {
            text,
            stopped: false,
        }
    }

    /// The held text, once generation has ended without a match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest proper suffix of `text` that is a prefix of
/// `stop`, on character boundaries.
pub(super) fn longest_suffix_that_starts(text: &str, stop: &str) -> usize {
    let longest = stop.len().saturating_sub(1).min(text.len());
    (1..=longest)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let r = s.push(piece);
            out += &r.text;
            if r.stopped {
                return (out, true);
            }
        }
        out += &s.finish();
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_cut_off() {
        assert_eq!(
            run(&["END"], &["Hello E", "N", "D more"]),
            ("Hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn text_is_held_only_while_it_may_start_a_stop_string() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("Hello E").text, "Hello ");
        // "EX" cannot start "END": all of it goes out.
        assert_eq!(s.push("X").text, "EX");
        assert_eq!(run(&["END"], &["Hello E"]), ("Hello E".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a"]), ("a".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        assert_eq!(run(&["é!", "x"], &["caf", "é", "!"]), ("caf".into(), true));
    }
}
