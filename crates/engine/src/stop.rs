//! When generation stops: the reasons, and stop strings found in streamed text.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopToken,
    StopString,
    MaxTokens,
    ContextFull,
    /// The request's deadline passed.
    Deadline,
    /// The output completes the request's constraint, which admits no further token.
    ConstraintDone,
}

/// Holds back text that may be the start of a stop string, and finds complete ones.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds `delta`; returns the text now safe to emit and whether a stop string was hit
    /// (the stop string and anything after it are dropped).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Longest suffix of `pending` that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.pending.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    #[test]
    fn stop_strings_hold_back_partial_matches_and_cut_at_the_match() {
        let mut s = StopStrings::new(vec!["```".into(), "\nEND".into()]);
        assert_eq!(s.push("def f():"), ("def f():".into(), false));
        assert_eq!(s.push(" pass`"), (" pass".into(), false));
        assert_eq!(s.push("`"), (String::new(), false));
        assert_eq!(s.push("` tail"), (String::new(), true));
        let mut s = StopStrings::new(vec!["\nEND".into()]);
        assert_eq!(s.push("a\nE"), ("a".into(), false));
        assert_eq!(s.push("x"), ("\nEx".into(), false));
        assert_eq!(s.push("\n"), (String::new(), false));
        assert_eq!(s.finish(), "\n");
    }
}
