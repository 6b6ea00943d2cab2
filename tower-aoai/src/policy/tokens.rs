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
//! its bytes that keeps only the prompt's character count and the few numbers the estimate needs,
//! allocates nothing, and reads plain string bytes eight at a time. It accepts exactly the bodies
//! `serde_json` reads into a `serde_json::Value` and reads the same numbers from them (the
//! property tests in `proptests/tests/tokens.rs` hold it to that reference); any other body is
//! estimated from its length, as before. What it copies from `serde_json` 1.0 to agree with it:
//!
//! - nesting 128 arrays/objects deep is an error (`serde_json`'s recursion limit), which also
//!   bounds the scanner's own recursion;
//! - strings: no raw control characters, only JSON's escapes, `\u` surrogates in pairs, UTF-8;
//! - a number whose value `serde_json` finds out of range (`1e400`) is an error; the rare number
//!   that could be (one with an exponent, or 300 integer digits or more) is checked by
//!   `serde_json` itself, whose bound is its own fast, inexact one;
//! - only whitespace (space, tab, CR, LF) may surround the value;
//! - a key given twice counts once, with its last value (keys are compared after unescaping).
//!
//! Why not a JSON crate: `serde_json`'s visitors (what this replaces) cost about 2,050
//! instructions for a 64-byte chat body, this scanner about 1,040 (callgrind). `jiter`
//! (pydantic's pull parser) walking the same body costs about 1,960 even without the checks it
//! would need on top to agree with `serde_json`: its recursion limit is 200, not 128, and it
//! parses floats exactly (`lexical`), so its out-of-range bound differs. It would also bring
//! `unsafe` SIMD code and five crates (`bitvec`, `lexical-parse-float`, `num-bigint`,
//! `num-traits`, `smallvec`) into a crate that forbids `unsafe`.

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
        let mut summary = Summary::default();
        if body.len() > MAX_PARSED_BODY || summary.read(body).is_none() {
            return self.prompt_tokens(body.len() as u64) + self.default_completion_tokens;
        }
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
        let tokens = chars as f64 / self.chars_per_token * self.prompt_share;
        // `tokens.ceil() as u64` without a call to libm's `ceil` (x86-64's baseline has no
        // rounding instruction), the same for every `tokens` (not negative here): below 2^53 the
        // cast truncates; above, `tokens` is whole or saturates the cast; NaN casts to 0.
        let whole = tokens as u64;
        whole.saturating_add(u64::from((whole as f64) < tokens))
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
    /// Reads a JSON body into this (empty) summary, or `None` when `serde_json` would not read
    /// it as JSON.
    fn read(&mut self, body: &[u8]) -> Option<()> {
        let mut r = Reader {
            bytes: body,
            pos: 0,
        };
        let s = self;
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
            None => Some(()),
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

#[inline(always)]
fn top_key(key: &[u8]) -> Option<Key> {
    // By length first: one comparison of known length per key.
    let is = |name: &[u8], k: Key| (key == name).then_some(k);
    match key.len() {
        8 => is(b"messages", Key::Prompt(0)),
        10 => is(b"max_tokens", Key::Completion(1)),
        21 => is(b"max_completion_tokens", Key::Completion(0)),
        1 => is(b"n", Key::Choices(0)),
        6 if key[0] == b'p' => is(b"prompt", Key::Prompt(1)),
        6 => is(b"system", Key::Prompt(4)),
        5 => is(b"input", Key::Prompt(2)),
        12 => is(b"instructions", Key::Prompt(3)),
        17 => is(b"max_output_tokens", Key::Completion(2)),
        7 => is(b"best_of", Key::Choices(1)),
        _ => None,
    }
}

/// The key of a message or part whose value holds text.
#[inline(always)]
fn text_key(key: &[u8]) -> Option<usize> {
    let is = |name: &[u8], i: usize| (key == name).then_some(i);
    match key.len() {
        7 => is(b"content", 0),
        4 => is(b"text", 1),
        5 => is(b"input", 2),
        6 => is(b"output", 3),
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
    /// Its characters once unescaped (an escape is one, a surrogate pair one).
    chars: u64,
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
    #[inline(always)]
    fn skip_ws(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        // Most values follow their separator directly.
        if b > b' ' {
            return Some(b);
        }
        self.skip_ws_slow()
    }

    #[inline(never)]
    fn skip_ws_slow(&mut self) -> Option<u8> {
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
            b'"' => self.string().map(|_| ()),
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
            b'"' => self.string().map(|s| s.chars),
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
                        // A string read here, not in a call: most values of a message are.
                        Some(i) if level < MAX_TEXT_LEVEL && r.skip_ws()? == b'"' => {
                            parts[i] = r.string()?.chars;
                        }
                        Some(i) => parts[i] = r.text(depth, level + 1)?,
                        None if r.skip_ws()? == b'"' => {
                            r.string()?;
                        }
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
            b'0'..=b'9' | b'-' => self.number(),
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
    #[inline(always)]
    fn number(&mut self) -> Option<Option<u64>> {
        let bytes = self.bytes;
        let start = self.pos;
        let negative = bytes.get(start) == Some(&b'-');
        let mut i = start + usize::from(negative);
        let digits = i;
        let mut value = 0u64;
        match bytes.get(i)? {
            // One leading zero only: a digit after it is not read here, and so rejected by the
            // caller as a stray byte.
            b'0' => i += 1,
            b'1'..=b'9' => {
                while let Some(&d) = bytes.get(i)
                    && d.is_ascii_digit()
                {
                    value = value.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                    i += 1;
                }
            }
            _ => return None,
        }
        let digits = i - digits;
        let mut integer = true;
        if bytes.get(i) == Some(&b'.') {
            i = digits_after(bytes, i + 1)?;
            integer = false;
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = bytes.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = bytes.get(i) {
                i += 1;
            }
            i = digits_after(bytes, i)?;
            exponent = true;
        }
        self.pos = i;
        if exponent || digits >= 300 {
            // Maybe out of range: ask serde_json, whose bound is not the exact f64 one. Rare in a
            // request body, so its cost does not matter.
            serde_json::from_slice::<serde_json::Value>(&bytes[start..i]).ok()?;
        }
        if negative || !integer || exponent {
            return Some(None);
        }
        Some(match digits {
            ..20 => Some(value),
            // Up to u64::MAX (20 digits) and no further.
            20 => bytes[start..i].iter().try_fold(0u64, |n, &d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            }),
            _ => None,
        })
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
        match self.skip_ws()? {
            b'"' => {}
            b'}' => {
                self.pos += 1;
                return Some(());
            }
            _ => return None,
        }
        loop {
            let key = self.string()?;
            if self.skip_ws()? != b':' {
                return None;
            }
            self.pos += 1;
            member(self, key, depth)?;
            match self.skip_ws()? {
                b',' => {
                    self.pos += 1;
                    if self.skip_ws()? != b'"' {
                        return None;
                    }
                }
                b'}' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Which key of `known` a string just read is, comparing its unescaped text.
    #[inline(always)]
    fn key<T>(&self, key: Str, known: impl Fn(&[u8]) -> Option<T>) -> Option<T> {
        let raw = self.bytes.get(key.start..key.end)?;
        if key.escaped {
            return unescaped_key(raw, known);
        }
        known(raw)
    }

    /// Reads the string at `pos` (its opening quote not yet consumed), checking it as `serde_json`
    /// does: no raw control character, only JSON's escapes, `\u` surrogates in pairs, UTF-8.
    #[inline(always)]
    fn string(&mut self) -> Option<Str> {
        let start = self.pos + 1;
        let end = plain_run(self.bytes, start);
        if *self.bytes.get(end)? == b'"' {
            self.pos = end + 1;
            return Some(Str {
                start,
                end,
                escaped: false,
                chars: (end - start) as u64,
            });
        }
        self.string_rest(start, end)
    }

    /// The rest of a string that holds an escape, a non-ASCII byte or a control character, from
    /// `i`.
    #[inline(never)]
    fn string_rest(&mut self, start: usize, mut i: usize) -> Option<Str> {
        let bytes = self.bytes;
        // Bytes that are not characters of their own: continuation bytes, escapes past their
        // first byte.
        let mut extra = 0usize;
        let mut escaped = false;
        loop {
            match *bytes.get(i)? {
                b'"' => {
                    self.pos = i + 1;
                    return Some(Str {
                        start,
                        end: i,
                        escaped,
                        chars: (i - start - extra) as u64,
                    });
                }
                b'\\' => {
                    let end = escape(bytes, i + 1)?;
                    extra += end - i - 1;
                    escaped = true;
                    i = end;
                }
                0x80.. => {
                    // A run of non-ASCII bytes: UTF-8 on its own, as an ASCII byte is never part
                    // of a multi-byte character.
                    let run = &bytes[i..];
                    let len = run.iter().position(u8::is_ascii).unwrap_or(run.len());
                    let run = &run[..len];
                    std::str::from_utf8(run).ok()?;
                    extra += run.iter().filter(|&&b| b & 0xC0 == 0x80).count();
                    i += len;
                }
                // A raw control character.
                _ => return None,
            }
            i = plain_run(bytes, i);
        }
    }
}

/// The index of the first byte from `i` that is not plain ASCII in a string (a quote, a
/// backslash, a control character, a non-ASCII byte), or the end.
#[inline(always)]
fn plain_run(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Eight bytes at a time. Each test sets the high bit of a byte it finds, and maybe of bytes
    // after it (a borrow carries upwards), never before: the lowest bit set is the first one.
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let has_zero = |v: u64| v.wrapping_sub(ONES) & !v;
        let quote = has_zero(x ^ (ONES * u64::from(b'"')));
        let backslash = has_zero(x ^ (ONES * u64::from(b'\\')));
        let control = x.wrapping_sub(ONES * 0x20) & !x;
        let found = (quote | backslash | control | x) & HIGH;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while bytes.get(i).is_some_and(|&b| PLAIN[usize::from(b)]) {
        i += 1;
    }
    i
}

/// Reads an escape whose backslash is just before `i`: where it ends. A `\u` surrogate must be a
/// leading one followed by a `\u` trailing one, as `serde_json` requires of a string.
fn escape(bytes: &[u8], i: usize) -> Option<usize> {
    match bytes.get(i)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(i + 1),
        b'u' => match hex4(bytes.get(i + 1..i + 5)?)? {
            0xDC00..=0xDFFF => None,
            0xD800..=0xDBFF => {
                if bytes.get(i + 5..i + 7)? != b"\\u" {
                    return None;
                }
                let low = hex4(bytes.get(i + 7..i + 11)?)?;
                (0xDC00..=0xDFFF).contains(&low).then_some(i + 11)
            }
            _ => Some(i + 5),
        },
        _ => None,
    }
}

/// The end of one digit or more from `i`.
fn digits_after(bytes: &[u8], mut i: usize) -> Option<usize> {
    if !bytes.get(i)?.is_ascii_digit() {
        return None;
    }
    while bytes.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    Some(i)
}

/// Bytes a string holds as they are: printable ASCII but the quote and the backslash.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x20;
    while b < 0x80 {
        table[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    table
};

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

/// Which key of `known` an escaped key is.
#[cold]
#[inline(never)]
fn unescaped_key<T>(raw: &[u8], known: impl Fn(&[u8]) -> Option<T>) -> Option<T> {
    let mut text = [0u8; LONGEST_KEY];
    let len = unescape(raw, &mut text)?;
    known(&text[..len])
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
