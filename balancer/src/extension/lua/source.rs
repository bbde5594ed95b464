//! What a script names in literals, found before it runs: the upstream
//! groups it sends requests to (`upstream = "canary"`), so that a name that
//! is not in the file fails the load instead of a request, and the modules
//! it requires (`require "names"`), so that they are read (and watched) with
//! the script instead of from disk at request time.
//!
//! This is a scan of Lua's tokens, not a parser: comments and strings are
//! skipped as Lua skips them, and only the two shapes above are looked for.
//! The script itself is compiled by Lua; a file Lua refuses never gets here.

/// A string literal the script names, and its line (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Literal {
    pub text: String,
    pub line: usize,
}

/// What [`scan`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Named {
    /// `upstream = "NAME"`: a key or variable called `upstream` given a string.
    pub groups: Vec<Literal>,
    /// `require "NAME"` or `require("NAME")`, not as a field (`x.require`).
    pub modules: Vec<Literal>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Str(Option<String>),
    /// `=` alone (not `==`, `<=`, `>=`, `~=`).
    Assign,
    Open,
    Close,
    /// `.` or `:` (a field or method access).
    Access,
    Other,
}

/// The group names and module names that `text` names in literals.
pub fn scan(text: &str) -> Named {
    let tokens = tokens(text);
    let mut named = Named::default();
    for (i, (token, line)) in tokens.iter().enumerate() {
        let Token::Name(name) = token else { continue };
        let next = |k: usize| tokens.get(i + k).map(|(t, _)| t);
        let field = i > 0 && tokens[i - 1].0 == Token::Access;
        let literal = |k: usize| match next(k) {
            Some(Token::Str(Some(text))) => Some(Literal {
                text: text.clone(),
                line: *line,
            }),
            _ => None,
        };
        match name.as_str() {
            "upstream" if next(1) == Some(&Token::Assign) => {
                named.groups.extend(literal(2));
            }
            "require" if !field => {
                let found = match next(1) {
                    Some(Token::Open) if next(3) == Some(&Token::Close) => literal(2),
                    _ => literal(1),
                };
                named.modules.extend(found);
            }
            _ => {}
        }
    }
    named
}

/// Lua's tokens, each with its line; what the scan does not look at is `Other`.
fn tokens(text: &str) -> Vec<(Token, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < bytes.len() {
        let start_line = line;
        let c = bytes[i];
        let token = match c {
            b'\n' => {
                line += 1;
                i += 1;
                continue;
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i += 2;
                match long_bracket(bytes, i) {
                    Some(level) => {
                        let (_, end) = long_body(bytes, i, level, &mut line);
                        i = end;
                    }
                    None => {
                        while i < bytes.len() && bytes[i] != b'\n' {
                            i += 1;
                        }
                    }
                }
                continue;
            }
            b'[' if long_bracket(bytes, i).is_some() => {
                let level = long_bracket(bytes, i).unwrap_or(0);
                let (body, end) = long_body(bytes, i, level, &mut line);
                i = end;
                Token::Str(Some(body))
            }
            b'"' | b'\'' => {
                let (value, end) = short_string(bytes, i, &mut line);
                i = end;
                Token::Str(value)
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                Token::Name(text[start..i].to_owned())
            }
            c if c.is_ascii_digit() => {
                // A number, exponent sign included: `1e-5` is one token.
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric()
                        || bytes[i] == b'.'
                        || (matches!(bytes[i], b'-' | b'+')
                            && matches!(bytes[i - 1], b'e' | b'E' | b'p' | b'P')))
                {
                    i += 1;
                }
                Token::Other
            }
            b'=' | b'<' | b'>' | b'~' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Token::Other
            }
            b'=' => {
                i += 1;
                Token::Assign
            }
            b'(' => {
                i += 1;
                Token::Open
            }
            b')' => {
                i += 1;
                Token::Close
            }
            b'.' if bytes.get(i + 1) == Some(&b'.') => {
                i += 2;
                Token::Other
            }
            b'.' | b':' if bytes.get(i + 1) != Some(&b':') => {
                i += 1;
                Token::Access
            }
            _ => {
                i += 1;
                Token::Other
            }
        };
        out.push((token, start_line));
    }
    out
}

/// The level of the long bracket opening at `i` (`[[` is 0, `[==[` is 2).
fn long_bracket(bytes: &[u8], i: usize) -> Option<usize> {
    if bytes.get(i) != Some(&b'[') {
        return None;
    }
    let level = bytes[i + 1..].iter().take_while(|&&b| b == b'=').count();
    (bytes.get(i + 1 + level) == Some(&b'[')).then_some(level)
}

/// The text of the long bracket opening at `i`, and where it ends.
fn long_body(bytes: &[u8], i: usize, level: usize, line: &mut usize) -> (String, usize) {
    let open = i + level + 2;
    let close: Vec<u8> = std::iter::once(b']')
        .chain(std::iter::repeat_n(b'=', level))
        .chain(std::iter::once(b']'))
        .collect();
    let mut j = open;
    while j < bytes.len() && !bytes[j..].starts_with(&close) {
        if bytes[j] == b'\n' {
            *line += 1;
        }
        j += 1;
    }
    let body = String::from_utf8_lossy(&bytes[open.min(j)..j]);
    // Lua drops a newline right after the opening bracket.
    let body = body.strip_prefix('\n').unwrap_or(&body).to_owned();
    (body, (j + close.len()).min(bytes.len()))
}

/// The value of the short string opening at `i` (`None` when it holds an
/// escape other than the plain ones: no name the scan wants has one), and
/// where it ends.
fn short_string(bytes: &[u8], i: usize, line: &mut usize) -> (Option<String>, usize) {
    let quote = bytes[i];
    let mut value = Vec::new();
    let mut plain = true;
    let mut j = i + 1;
    while j < bytes.len() && bytes[j] != quote && bytes[j] != b'\n' {
        if bytes[j] == b'\\' {
            match bytes.get(j + 1) {
                Some(&c @ (b'\\' | b'"' | b'\'')) => value.push(c),
                Some(b'\n') => {
                    *line += 1;
                    plain = false;
                }
                _ => plain = false,
            }
            j += 2;
            continue;
        }
        value.push(bytes[j]);
        j += 1;
    }
    let value = String::from_utf8(value).ok().filter(|_| plain);
    (value, (j + 1).min(bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(found: &[Literal]) -> Vec<(&str, usize)> {
        found.iter().map(|l| (l.text.as_str(), l.line)).collect()
    }

    #[test]
    fn finds_group_literals_given_to_upstream() {
        let named = scan(
            "-- upstream = \"commented\"\n\
             --[[ upstream = \"long comment\" ]]\n\
             local s = 'upstream = \"in a string\"'\n\
             if req.headers.upstream == \"compared\" then end\n\
             return { upstream = \"canary\" }\n\
             t.upstream = [[stable]]\n",
        );
        assert_eq!(names(&named.groups), [("canary", 5), ("stable", 6)]);
    }

    #[test]
    fn finds_required_modules_but_not_fields_called_require() {
        let named = scan(
            "local a = require \"keys\"\nlocal b = require('lib.util')\n\
             local c = x.require('not_a_module')\nlocal d = require(name)\n",
        );
        assert_eq!(names(&named.modules), [("keys", 1), ("lib.util", 2)]);
    }

    #[test]
    fn lines_count_through_long_strings_and_comments() {
        let named = scan("--[==[\n\n]==]\nlocal s = [[\nx\n]]\nreturn {upstream=\"g\"}");
        assert_eq!(names(&named.groups), [("g", 7)]);
        assert_eq!(scan("x = 1e-5 upstream = 'a'").groups.len(), 1);
        assert!(scan("upstream = \"a\\tb\"").groups.is_empty());
    }
}
