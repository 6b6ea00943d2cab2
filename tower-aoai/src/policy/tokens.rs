//! The token estimate of a request, made the way Azure OpenAI makes it when the request arrives.
//!
//! Azure counts a request against the deployment's tokens-per-minute quota *before* running it,
//! from an estimate: the prompt (estimated from its character count) plus the completion budget,
//! `max_tokens` (or `max_completion_tokens` / `max_output_tokens`) times `n` / `best_of`. The
//! limiter paces on this estimate and the simulator charges it, so both use this one function.
//!
//! # Reading the body
//!
//! The estimate runs for every attempt, so the body is read by a small single-pass scanner over
//! its bytes ([`Reader`]) that keeps only the prompt's character count and the few numbers the
//! estimate needs, and allocates nothing. It accepts exactly the bodies `serde_json` reads into a
//! `serde_json::Value` and reads the same numbers from them (the property test
//! `proptests/tests/tokens.rs` holds it to that reference); any other body is estimated from its
//! length, as before. What it copies from `serde_json` 1.0 to agree with it:
//!
//! - nesting deeper than 127 arrays/objects is an error (`serde_json`'s recursion limit);
//! - strings: no raw control characters, only the JSON escapes, `\u` surrogates in pairs, UTF-8;
//! - a number whose value `serde_json` finds out of range (`1e400`) is an error; the rare number
//!   that could be (an exponent, or 300 integer digits or more) is checked by `serde_json` itself,
//!   whose overflow bound is its own fast, inexact one;
//! - a key given twice counts once, with its last value (keys are compared after unescaping).
//!
//! Why not a JSON crate: `serde_json` (the one-pass visitor this replaces) pays a fixed cost per
//! key and value through its visitors, about 2,200 instructions for a 64-byte chat body. `jiter`
//! (pydantic's pull parser) would still need its own checks on top to agree with `serde_json`: its
//! recursion limit is 200, not 128, and it parses floats exactly (`lexical`), so its out-of-range
//! bound differs; it also brings `unsafe` SIMD code and five crates (`bitvec`, `lexical-parse-float`,
//! `num-bigint`, `num-traits`, `smallvec`) into a crate that forbids `unsafe`.

use super::ConfigError;

/// Bodies larger than this are not parsed; their estimate is made from their length alone.
const MAX_PARSED_BODY: usize = 8 * 1024 * 1024;

/// Arrays and objects nested this deep make a body `serde_json` rejects (its recursion limit): the
/// scanner rejects it too, which also bounds its own recursion.
const MAX_DEPTH: u32 = 128;

/// Prompt text nested deeper than this (arrays and objects below the prompt key) counts nothing.
const MAX_TEXT_LEVEL: u32 = 16;

/// Estimates the tokens a request will be charged for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenEstimator {
    chars_per_token: f64,
    prompt_share: f64,
    default_completion_tokens: u64,
}

impl Default for TokenEstimator {
    /// 4 characters per token, the whole prompt counted, 1,024 completion tokens when the request
    /// sets no limit.
    fn default() -> Self {
        Self {
            chars_per_token: 4.0,
            prompt_share: 1.0,
            default_completion_tokens: 1024,
        }
    }
}

impl TokenEstimator {
    /// An estimator with explicit settings.
    pub fn new(
        chars_per_token: f64,
        prompt_share: f64,
        default_completion_tokens: u64,
    ) -> Result<Self, ConfigError> {
        if !(chars_per_token.is_finite() && chars_per_token > 0.0) {
            return Err(ConfigError::new(
                "tokens.chars_per_token",
                format!("must be a positive number, got {chars_per_token}"),
            ));
        }
        if !(0.0..=10.0).contains(&prompt_share) {
            return Err(ConfigError::new(
                "tokens.prompt_share",
                format!("must be between 0 and 10, got {prompt_share}"),
            ));
        }
        Ok(Self {
            chars_per_token,
            prompt_share,
            default_completion_tokens,
        })
    }

    /// The completion budget assumed when a request sets none.
    pub fn default_completion_tokens(&self) -> u64 {
        self.default_completion_tokens
    }

    /// The estimated tokens of a request with this JSON body. A body that is not JSON (or is too
    /// large to parse) is estimated from its length plus the default completion budget.
    ///
    /// The body is read in one pass without building a JSON tree or allocating: only the prompt's
    /// characters and the few numbers the estimate needs are kept (this runs for every attempt the
    /// limiter paces).
    pub fn estimate(&self, body: &[u8]) -> u64 {
        let parsed = (body.len() <= MAX_PARSED_BODY)
            .then(|| Summary::read(body))
            .flatten();
        let Some(summary) = parsed else {
            return self.prompt_tokens(body.len() as u64) + self.default_completion_tokens;
        };
        let chars = summary
            .prompt_chars
            .iter()
            .copied()
            .fold(0u64, u64::saturating_add);
        let completion = summary
            .completion
            .iter()
            .find_map(|n| *n)
            .unwrap_or(self.default_completion_tokens);
        let choices = summary
            .choices
            .iter()
            .filter_map(|n| *n)
            .max()
            .unwrap_or(1)
            .clamp(1, 128);
        self.prompt_tokens(chars)
            .saturating_add(completion.saturating_mul(choices))
    }

    fn prompt_tokens(&self, chars: u64) -> u64 {
        (chars as f64 / self.chars_per_token * self.prompt_share).ceil() as u64
    }
}

/// What the estimate needs from a request body. As with a JSON object, a key given twice counts
/// once, with its last value; a body that is JSON but not an object has none of these.
#[derive(Debug, Default)]
struct Summary {
    /// Characters of text under `messages`, `prompt`, `input`, `instructions`, `system`.
    prompt_chars: [u64; 5],
    /// `max_completion_tokens`, `max_tokens`, `max_output_tokens`, first found wins in this order.
    completion: [Option<u64>; 3],
    /// `n`, `best_of`: the larger counts.
    choices: [Option<u64>; 2],
}

impl Summary {
    /// The summary of a JSON body, or `None` when `serde_json` would not read it as JSON.
    fn read(body: &[u8]) -> Option<Self> {
        let mut r = Reader {
            bytes: body,
            pos: 0,
        };
        let mut s = Summary::default();
        if r.skip_ws()? == b'{' {
            r.members(0, |r, key, depth| {
                match r.key(key, top_key) {
                    Some(Key::Prompt(i)) => s.prompt_chars[i] = r.text(depth, 0)?,
                    Some(Key::Completion(i)) => s.completion[i] = r.count(depth)?,
                    Some(Key::Choices(i)) => s.choices[i] = r.count(depth)?,
                    None => r.skip(depth)?,
                }
                Some(())
            })?;
        } else {
            r.skip(0)?;
        }
        // Only whitespace may follow the value.
        match r.skip_ws() {
            None => Some(s),
            Some(_) => None,
        }
    }
}

/// A top-level key of a request body the estimate reads.
enum Key {
    Prompt(usize),
    Completion(usize),
    Choices(usize),
}

fn top_key(key: &[u8]) -> Option<Key> {
    Some(match key {
        b"messages" => Key::Prompt(0),
        b"prompt" => Key::Prompt(1),
        b"input" => Key::Prompt(2),
        b"instructions" => Key::Prompt(3),
        b"system" => Key::Prompt(4),
        b"max_completion_tokens" => Key::Completion(0),
        b"max_tokens" => Key::Completion(1),
        b"max_output_tokens" => Key::Completion(2),
        b"n" => Key::Choices(0),
        b"best_of" => Key::Choices(1),
        _ => return None,
    })
}

/// The key of a message or part whose value holds text.
fn text_key(key: &[u8]) -> Option<usize> {
    match key {
        b"content" => Some(0),
        b"text" => Some(1),
        b"input" => Some(2),
        b"output" => Some(3),
        _ => None,
    }
}

/// The longest key [`top_key`] or [`text_key`] knows (`max_completion_tokens`); an escaped key
/// that unescapes to more bytes than this is none of them.
const LONGEST_KEY: usize = 21;

/// A string just read: where its raw bytes are (between the quotes) and what it holds.
#[derive(Clone, Copy)]
struct Str {
    start: usize,
    end: usize,
    /// It holds an escape, so its raw bytes are not its text.
    escaped: bool,
}

/// A single-pass JSON scanner over a body's bytes. Every method returns `None` when the body is
/// not JSON as `serde_json` reads it; `depth` is the number of arrays and objects around the
/// value being read.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    /// Skips whitespace; the next byte, not consumed, or `None` at the end.
    #[inline]
    fn skip_ws(&mut self) -> Option<u8> {
        while let Some(&b) = self.bytes.get(self.pos) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    /// Reads any value, keeping nothing.
    fn skip(&mut self, depth: u32) -> Option<()> {
        match self.skip_ws()? {
            b'"' => self.string::<false>().map(|_| ()),
            b'[' => self.elements(depth, |r, depth| r.skip(depth)),
            b'{' => self.members(depth, |r, _, depth| r.skip(depth)),
            _ => self.scalar().map(|_| ()),
        }
    }

    /// Reads a prompt value at this text level: the characters of its strings, and of the
    /// `content` / `text` / `input` / `output` of its objects.
    fn text(&mut self, depth: u32, level: u32) -> Option<u64> {
        if level > MAX_TEXT_LEVEL {
            return self.skip(depth).map(|()| 0);
        }
        match self.skip_ws()? {
            b'"' => self.string::<true>().map(|(_, chars)| chars),
            b'[' => {
                let mut total = 0u64;
                self.elements(depth, |r, depth| {
                    total = total.saturating_add(r.text(depth, level + 1)?);
                    Some(())
                })?;
                Some(total)
            }
            b'{' => {
                let mut parts = [0u64; 4];
                self.members(depth, |r, key, depth| {
                    match r.key(key, text_key) {
                        Some(i) => parts[i] = r.text(depth, level + 1)?,
                        None => r.skip(depth)?,
                    }
                    Some(())
                })?;
                Some(parts.iter().copied().fold(0u64, u64::saturating_add))
            }
            _ => self.scalar().map(|_| 0),
        }
    }

    /// Reads a value that should be a count: `Some(n)` for a non-negative integer that fits a
    /// `u64` (what `serde_json::Value::as_u64` gives), `None` for any other value.
    fn count(&mut self, depth: u32) -> Option<Option<u64>> {
        match self.skip_ws()? {
            b'"' | b'[' | b'{' => self.skip(depth).map(|()| None),
            _ => self.scalar(),
        }
    }

    /// Reads a number, `true`, `false` or `null`: `Some(n)` for a non-negative integer that fits
    /// a `u64`, `None` for the others.
    fn scalar(&mut self) -> Option<Option<u64>> {
        let rest = &self.bytes[self.pos..];
        let literal: &[u8] = match rest.first()? {
            b'-' | b'0'..=b'9' => return self.number(),
            b't' => b"true",
            b'f' => b"false",
            b'n' => b"null",
            _ => return None,
        };
        if !rest.starts_with(literal) {
            return None;
        }
        self.pos += literal.len();
        Some(None)
    }

    /// Reads a number (JSON grammar): the value when it is a non-negative integer that fits a
    /// `u64`.
    fn number(&mut self) -> Option<Option<u64>> {
        let start = self.pos;
        let negative = self.bytes[start] == b'-';
        if negative {
            self.pos += 1;
        }
        match self.bytes.get(self.pos)? {
            // One leading zero only: a digit after it is not read here, and so rejected by the
            // caller as a stray byte.
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let integer = &self.bytes[start + usize::from(negative)..self.pos];
        let mut fraction = false;
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            self.first_digit()?;
            fraction = true;
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            self.first_digit()?;
            exponent = true;
        }
        if exponent || integer.len() >= 300 {
            // Maybe out of range: ask serde_json, whose bound is not the exact f64 one. Rare in a
            // request body, so its cost does not matter.
            serde_json::from_slice::<serde_json::Value>(&self.bytes[start..self.pos]).ok()?;
        }
        if negative || fraction || exponent {
            return Some(None);
        }
        Some(integer.iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        }))
    }

    /// Reads one digit or more.
    fn first_digit(&mut self) -> Option<()> {
        if !self.bytes.get(self.pos)?.is_ascii_digit() {
            return None;
        }
        self.digits();
        Some(())
    }

    fn digits(&mut self) {
        while self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
    }

    /// Reads the array at `pos` (its `[` not yet consumed), each element with `element`.
    #[inline]
    fn elements(
        &mut self,
        depth: u32,
        mut element: impl FnMut(&mut Self, u32) -> Option<()>,
    ) -> Option<()> {
        let depth = depth + 1;
        if depth >= MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        if self.skip_ws()? == b']' {
            self.pos += 1;
            return Some(());
        }
        loop {
            element(self, depth)?;
            match self.skip_ws()? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Reads the object at `pos` (its `{` not yet consumed), each value with `member`, which is
    /// given the key.
    #[inline]
    fn members(
        &mut self,
        depth: u32,
        mut member: impl FnMut(&mut Self, Str, u32) -> Option<()>,
    ) -> Option<()> {
        let depth = depth + 1;
        if depth >= MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        if self.skip_ws()? == b'}' {
            self.pos += 1;
            return Some(());
        }
        loop {
            if self.skip_ws()? != b'"' {
                return None;
            }
            let (key, _) = self.string::<false>()?;
            if self.skip_ws()? != b':' {
                return None;
            }
            self.pos += 1;
            member(self, key, depth)?;
            match self.skip_ws()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Which key of `known` a string just read is, comparing its unescaped text.
    #[inline]
    fn key<T>(&self, key: Str, known: fn(&[u8]) -> Option<T>) -> Option<T> {
        let raw = &self.bytes[key.start..key.end];
        if !key.escaped {
            return known(raw);
        }
        let mut text = [0u8; LONGEST_KEY];
        let len = unescape(raw, &mut text)?;
        known(&text[..len])
    }

    /// Reads the string at `pos` (its opening quote not yet consumed), checking it as `serde_json`
    /// does; with `COUNT`, also counts its characters (an escape is one, a surrogate pair one).
    #[inline]
    fn string<const COUNT: bool>(&mut self) -> Option<(Str, u64)> {
        self.pos += 1;
        let start = self.pos;
        let mut escaped = false;
        let mut chars = 0u64;
        loop {
            let run = self.pos;
            let mut high = 0u8;
            let stop = loop {
                let b = *self.bytes.get(self.pos)?;
                if SPECIAL[usize::from(b)] {
                    break b;
                }
                high |= b;
                self.pos += 1;
            };
            let run = &self.bytes[run..self.pos];
            // An escape and a quote are ASCII, so a run between them is UTF-8 on its own.
            if high >= 0x80 {
                std::str::from_utf8(run).ok()?;
            }
            if COUNT {
                chars += if high >= 0x80 {
                    run.iter().filter(|&&b| !is_continuation(b)).count() as u64
                } else {
                    run.len() as u64
                };
            }
            match stop {
                b'"' => {
                    let end = self.pos;
                    self.pos += 1;
                    return Some((
                        Str {
                            start,
                            end,
                            escaped,
                        },
                        chars,
                    ));
                }
                b'\\' => {
                    self.pos += 1;
                    self.escape()?;
                    escaped = true;
                    chars += 1;
                }
                // A raw control character.
                _ => return None,
            }
        }
    }

    /// Reads an escape after its backslash. A `\u` surrogate must be a leading one followed by
    /// a `\u` trailing one, as `serde_json` requires of a string.
    fn escape(&mut self) -> Option<()> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(()),
            b'u' => match self.hex4()? {
                0xDC00..=0xDFFF => None,
                0xD800..=0xDBFF => {
                    if self.bytes.get(self.pos..self.pos + 2)? != b"\\u" {
                        return None;
                    }
                    self.pos += 2;
                    (0xDC00..=0xDFFF).contains(&self.hex4()?).then_some(())
                }
                _ => Some(()),
            },
            _ => None,
        }
    }

    fn hex4(&mut self) -> Option<u16> {
        let digits = self.bytes.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        hex4(digits)
    }
}

/// Bytes that end a run of plain string bytes: a quote, a backslash, a control character.
static SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

fn hex4(digits: &[u8]) -> Option<u16> {
    digits.iter().try_fold(0u16, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        Some(n << 4 | u16::from(v))
    })
}

/// Unescapes a string's raw bytes (already checked) into `out`: its length, or `None` when it
/// does not fit (then it is no key the estimate reads).
fn unescape(raw: &[u8], out: &mut [u8; LONGEST_KEY]) -> Option<usize> {
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        let slot = out.get_mut(len..len + bytes.len())?;
        slot.copy_from_slice(bytes);
        len += bytes.len();
        Some(())
    };
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            push(&raw[i..=i])?;
            i += 1;
            continue;
        }
        let byte = match raw.get(i + 1)? {
            b'b' => b'\x08',
            b'f' => b'\x0c',
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let mut code = u32::from(hex4(raw.get(i + 2..i + 6)?)?);
                i += 6;
                if (0xD800..0xDC00).contains(&code) {
                    let low = u32::from(hex4(raw.get(i + 2..i + 6)?)?);
                    code = 0x10000 + ((code - 0xD800) << 10) + (low.checked_sub(0xDC00)?);
                    i += 6;
                }
                let mut utf8 = [0u8; 4];
                push(char::from_u32(code)?.encode_utf8(&mut utf8).as_bytes())?;
                continue;
            }
            // `"`, `\`, `/`: the character itself.
            &other => other,
        };
        push(&[byte])?;
        i += 2;
    }
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body_counts_prompt_and_completion_budget() {
        let e = TokenEstimator::default();
        // 40 characters of prompt = 10 tokens, plus 100 * n=2.
        let body = br#"{"messages":[{"role":"user","content":"0123456789012345678901234567890123456789"}],"max_tokens":100,"n":2}"#;
        assert_eq!(e.estimate(body), 10 + 200);
    }

    #[test]
    fn content_parts_and_best_of() {
        let e = TokenEstimator::default();
        let body = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcd"},{"type":"text","text":"efgh"}]}],"max_completion_tokens":10,"best_of":3,"n":1}"#;
        assert_eq!(e.estimate(body), 2 + 30);
    }

    #[test]
    fn missing_limit_uses_the_default_budget() {
        let e = TokenEstimator::new(4.0, 1.0, 500).unwrap();
        assert_eq!(e.estimate(br#"{"input":"abcdefgh"}"#), 2 + 500);
    }

    #[test]
    fn prompt_share_scales_the_prompt_only() {
        let e = TokenEstimator::new(4.0, 0.5, 0).unwrap();
        assert_eq!(
            e.estimate(br#"{"prompt":"abcdefgh","max_tokens":7}"#),
            1 + 7
        );
    }

    #[test]
    fn non_json_is_estimated_from_its_length() {
        let e = TokenEstimator::new(4.0, 1.0, 0).unwrap();
        assert_eq!(e.estimate(b"not json at all!"), 4);
    }

    #[test]
    fn escapes_count_one_character_each() {
        let e = TokenEstimator::new(1.0, 1.0, 0).unwrap();
        // a, newline, é, 😀 (a surrogate pair), b, é written raw.
        let body = "{\"prompt\":\"a\\n\\u00e9\\ud83d\\ude00b\u{e9}\"}";
        assert_eq!(e.estimate(body.as_bytes()), 6);
    }

    #[test]
    fn what_a_json_string_may_not_hold_makes_the_body_not_json() {
        let e = TokenEstimator::new(1.0, 1.0, 0).unwrap();
        for body in [
            &br#"{"prompt":"\ude00"}"#[..],
            br#"{"prompt":"\ud83d"}"#,
            br#"{"prompt":"\ud83d\u0041"}"#,
            br#"{"prompt":"\x"}"#,
            b"{\"prompt\":\"a\tb\"}",
            b"{\"prompt\":\"\xc3\"}",
        ] {
            assert_eq!(e.estimate(body), body.len() as u64, "{body:?}");
        }
    }

    #[test]
    fn keys_are_compared_unescaped() {
        let e = TokenEstimator::new(4.0, 1.0, 0).unwrap();
        assert_eq!(e.estimate(br#"{"max\u005ftokens":7,"\u006e":2}"#), 14);
    }

    #[test]
    fn counts_are_non_negative_integers_that_fit() {
        let e = TokenEstimator::new(4.0, 1.0, 9).unwrap();
        assert_eq!(
            e.estimate(br#"{"max_tokens":18446744073709551615}"#),
            u64::MAX
        );
        for limit in ["18446744073709551616", "-1", "5.0", "1e2", "\"5\"", "null"] {
            let body = format!(r#"{{"max_tokens":{limit}}}"#);
            assert_eq!(e.estimate(body.as_bytes()), 9, "{limit}");
        }
    }

    #[test]
    fn numbers_out_of_range_make_the_body_not_json() {
        let e = TokenEstimator::new(1.0, 1.0, 0).unwrap();
        assert_eq!(e.estimate(br#"{"max_tokens":3,"t":1e308}"#), 3);
        assert_eq!(e.estimate(br#"{"max_tokens":3,"t":0e999999999999}"#), 3);
        let body = br#"{"max_tokens":3,"t":1e309}"#;
        assert_eq!(e.estimate(body), body.len() as u64);
        let long = format!(r#"{{"max_tokens":3,"t":{}}}"#, "9".repeat(400));
        assert_eq!(e.estimate(long.as_bytes()), long.len() as u64);
    }

    #[test]
    fn nesting_stops_where_serde_json_stops() {
        let e = TokenEstimator::new(1.0, 1.0, 0).unwrap();
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(e.estimate(nested(127).as_bytes()), 0);
        assert_eq!(e.estimate(nested(128).as_bytes()), 256);
        assert_eq!(e.estimate(nested(100_000).as_bytes()), 200_000);
    }

    #[test]
    fn only_whitespace_may_follow_the_body() {
        let e = TokenEstimator::new(1.0, 1.0, 0).unwrap();
        assert_eq!(e.estimate(b" {\"max_tokens\":3}\r\n\t "), 3);
        assert_eq!(e.estimate(b"{\"max_tokens\":3} x"), 18);
        assert_eq!(e.estimate(b"{\"max_tokens\":3,}"), 17);
        assert_eq!(e.estimate(b""), 0);
    }

    #[test]
    fn bad_settings_name_the_field() {
        assert_eq!(
            TokenEstimator::new(0.0, 1.0, 1).unwrap_err().field(),
            "tokens.chars_per_token"
        );
        assert_eq!(
            TokenEstimator::new(4.0, -1.0, 1).unwrap_err().field(),
            "tokens.prompt_share"
        );
    }
}
