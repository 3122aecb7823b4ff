//! PTB-style tokenization, as the caption metrics' reference applies it.
//!
//! The reference (pycocoevalcap's `tokenizer.py`, used by aac-metrics) runs Stanford
//! CoreNLP's `PTBTokenizer -preserveLines -lowerCase` and then drops a fixed list of
//! punctuation tokens. This module reproduces what changes the scores of ordinary
//! captions:
//!
//! - lower case (Unicode-aware);
//! - punctuation split off words and dropped: `. , ; : ! ? - -- ...`, quotes of
//!   every kind (`"`, `'`, `` ` ``, curly quotes), brackets of every kind;
//! - PTB contractions: `don't` → `do n't`, `can't` → `ca n't`, `it's` → `it 's`,
//!   `'re 've 'll 'd 'm` split off, `dogs'` → `dogs` (the lone `'` is dropped),
//!   and PTB's split words `cannot` → `can not`, `gonna` → `gon na`,
//!   `gotta` → `got ta`, `wanna` → `wan na`;
//! - kept as one token: hyphenated words (`well-known`), numbers with a decimal
//!   point, thousands separator or time colon (`3.5`, `1,000`, `10:30`), dotted
//!   abbreviations (`u.s.`), slashed words (`and/or`), words with an inner apostrophe
//!   that is no contraction (`o'clock`);
//! - curly apostrophes (`’`) act as `'`; `…` acts as `...`; en and em dashes act as
//!   `--`;
//! - other symbols (`$ % & # + = @ *`, emoji, ...) become tokens of their own and are
//!   kept, as PTB keeps them.
//!
//! Not reproduced (rare in captions): PTB's abbreviation list (`mr.` and `etc.` lose
//! their period here, PTB keeps it on some), its URL, e-mail and emoticon rules,
//! SGML/HTML entities, fractions like `1/2` spelled as `1\/2`, and `&` inside words
//! (`at&t`), which PTB keeps whole; brackets are always dropped here, whereas the
//! reference drops `-LRB- -RRB- -LCB- -RCB-` only (square brackets would survive as
//! `-lsb-`/`-rsb-` in the reference).

/// Tokens the reference removes after PTB tokenization (pycocoevalcap's list), plus the
/// forms that brackets and curly quotes take here.
fn is_dropped(token: &str) -> bool {
    token.chars().all(|c| {
        matches!(
            c,
            '\'' | '`'
                | '"'
                | '.'
                | '?'
                | '!'
                | ','
                | ':'
                | ';'
                | '-'
                | '('
                | ')'
                | '['
                | ']'
                | '{'
                | '}'
        )
    })
}

/// Contraction suffixes that PTB splits off a word (after `n't`, which is handled
/// first).
const SUFFIXES: [&str; 6] = ["'s", "'re", "'ve", "'ll", "'d", "'m"];

/// Whole words that PTB splits in two.
const SPLIT_WORDS: [(&str, &str, &str); 4] = [
    ("cannot", "can", "not"),
    ("gonna", "gon", "na"),
    ("gotta", "got", "ta"),
    ("wanna", "wan", "na"),
];

/// Tokenize a caption as the reference does before scoring: lower case, PTB
/// splitting, punctuation removed. See the module documentation for the details.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut normalized = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' | '\u{2032}' => normalized.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' | '\u{00AB}' | '\u{00BB}' => {
                normalized.push('"')
            }
            '\u{2026}' => normalized.push_str(" ... "),
            '\u{2013}' | '\u{2014}' | '\u{2015}' => normalized.push_str(" -- "),
            _ => normalized.push(c),
        }
    }
    let normalized = normalized.to_lowercase();

    let mut out = Vec::new();
    for chunk in normalized.split_whitespace() {
        tokenize_chunk(chunk, &mut out);
    }
    out.retain(|t| !is_dropped(t));
    out
}

/// Split one whitespace-free chunk into PTB tokens (punctuation still included).
fn tokenize_chunk(chunk: &str, out: &mut Vec<String>) {
    let chars: Vec<char> = chunk.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() {
            let end = word_end(&chars, i);
            let word: String = chars[i..end].iter().collect();
            push_word(word, out);
            i = end;
        } else if c == '\'' {
            // A contraction suffix standing alone ("the dog 's"), else a quote.
            let end = word_end_apostrophe(&chars, i);
            let piece: String = chars[i..end].iter().collect();
            if end > i + 1 && SUFFIXES.contains(&piece.as_str()) {
                out.push(piece);
                i = end;
            } else {
                out.push("'".to_string());
                i += 1;
            }
        } else if c == '.' || c == '-' {
            // Runs of periods ("...") or dashes ("--") are one token.
            let mut end = i + 1;
            while end < chars.len() && chars[end] == c {
                end += 1;
            }
            out.push(chars[i..end].iter().collect());
            i = end;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
}

/// End (exclusive) of the word starting at `start` (an alphanumeric character).
fn word_end(chars: &[char], start: usize) -> usize {
    let alnum = |k: usize| k < chars.len() && chars[k].is_alphanumeric();
    let digit = |k: usize| k < chars.len() && chars[k].is_ascii_digit();
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() {
            i += 1;
            continue;
        }
        let joins = match c {
            '-' | '/' | '\'' | '.' => alnum(i + 1),
            ',' | ':' => i > start && digit(i - 1) && digit(i + 1),
            _ => false,
        };
        if joins {
            i += 1;
            continue;
        }
        // A dotted abbreviation ("u.s.") keeps its final period.
        if c == '.' && is_dotted_abbreviation(&chars[start..i]) {
            i += 1;
        }
        break;
    }
    i
}

/// `u.s`, `e.g`: single letters separated by periods (at least two of them).
fn is_dotted_abbreviation(word: &[char]) -> bool {
    word.len() >= 3
        && word.iter().enumerate().all(|(k, c)| {
            if k % 2 == 0 {
                c.is_alphabetic()
            } else {
                *c == '.'
            }
        })
}

/// End (exclusive) of an apostrophe-led piece: the apostrophe and the letters after it.
fn word_end_apostrophe(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    while i < chars.len() && chars[i].is_alphabetic() {
        i += 1;
    }
    i
}

/// Push a word, splitting PTB contractions off its end.
fn push_word(word: String, out: &mut Vec<String>) {
    if let Some((_, a, b)) = SPLIT_WORDS.iter().find(|(w, _, _)| *w == word) {
        out.push((*a).to_string());
        out.push((*b).to_string());
        return;
    }
    if let Some(stem) = word.strip_suffix("n't")
        && !stem.is_empty()
        && !stem.ends_with('\'')
    {
        out.push(stem.to_string());
        out.push("n't".to_string());
        return;
    }
    for suffix in SUFFIXES {
        if let Some(stem) = word.strip_suffix(suffix)
            && !stem.is_empty()
            && !stem.ends_with('\'')
        {
            out.push(stem.to_string());
            out.push(suffix.to_string());
            return;
        }
    }
    out.push(word);
}

#[cfg(test)]
mod tests {
    use super::tokenize;

    fn tok(s: &str) -> Vec<String> {
        tokenize(s)
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn lower_cases_and_drops_punctuation() {
        assert_eq!(
            tok("A Dog barks, loudly!  Then: silence... (Really?)"),
            words("a dog barks loudly then silence really")
        );
        assert_eq!(tok("\"Quoted\" `text' here."), words("quoted text here"));
        assert_eq!(tok("wait -- what - now; ok"), words("wait what now ok"));
    }

    #[test]
    fn contractions_follow_ptb() {
        assert_eq!(tok("Don't stop"), words("do n't stop"));
        assert_eq!(tok("it's raining"), words("it 's raining"));
        assert_eq!(tok("I can't, we won't"), words("i ca n't we wo n't"));
        assert_eq!(
            tok("they're here, we've been"),
            words("they 're here we 've been")
        );
        assert_eq!(tok("the dog's bark"), words("the dog 's bark"));
        assert_eq!(tok("the dogs' barks"), words("the dogs barks"));
        assert_eq!(tok("I cannot, gonna go"), words("i can not gon na go"));
        assert_eq!(tok("at five o'clock"), words("at five o'clock"));
    }

    #[test]
    fn keeps_hyphens_numbers_and_abbreviations() {
        assert_eq!(
            tok("A high-pitched beep at 3.5 kHz, 1,000 times at 10:30."),
            words("a high-pitched beep at 3.5 khz 1,000 times at 10:30")
        );
        assert_eq!(tok("in the U.S. today"), words("in the u.s. today"));
        assert_eq!(tok("rain and/or wind"), words("rain and/or wind"));
        assert_eq!(tok("end."), words("end"));
    }

    #[test]
    fn unicode_text() {
        assert_eq!(
            tok("Un Café crème… “Très” bien — it’s ÉTÉ"),
            words("un café crème très bien it 's été")
        );
        assert_eq!(tok("cost $5 and 50%"), words("cost $ 5 and 50 %"));
        assert_eq!(
            tok("鳥が鳴く。"),
            vec!["鳥が鳴く".to_string(), "。".to_string()]
        );
    }

    #[test]
    fn empty_and_punctuation_only() {
        assert!(tok("").is_empty());
        assert!(tok("  ... !!! -- ").is_empty());
    }
}
