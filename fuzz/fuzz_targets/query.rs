//! `inject::rewrite_query` on an arbitrary `:path`, parameter name and value.
//!
//! Input layout: byte 0 = name length, byte 1 = value length (each cut to what
//! is left), then the name, the value and the path. The name must be non-empty
//! UTF-8 without `&`, `;` or `=` (a sane configured name); the value is read as
//! UTF-8, lossily.
//!
//! Invariants:
//! - the output starts with the input's part before its first `?`, then `?`;
//! - of the output query's segments (split on `&` and `;`) exactly one names the
//!   parameter (`inject::names_param`): the last, which is `name=value`
//!   percent-encoded (all but `A-Za-z0-9-._~` as `%XX`, upper case), after a `&`
//!   when anything precedes it;
//! - every other segment is an input query segment that does not name the
//!   parameter, and all of those are there, in order, byte for byte.

#![no_main]

use latchkey::inject::{names_param, rewrite_query};
use libfuzzer_sys::fuzz_target;

fn percent_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in raw {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend(format!("%{b:02X}").bytes());
        }
    }
    out
}

fn segments(query: &[u8]) -> Vec<&[u8]> {
    query.split(|&b| b == b'&' || b == b';').collect()
}

fuzz_target!(|data: &[u8]| {
    let [name_len, value_len, rest @ ..] = data else {
        return;
    };
    let (name, rest) = rest.split_at(usize::from(*name_len).min(rest.len()));
    let (value, path) = rest.split_at(usize::from(*value_len).min(rest.len()));
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    if name.is_empty() || name.contains(['&', ';', '=']) {
        return;
    }
    let value = String::from_utf8_lossy(value);

    let out = rewrite_query(path, name, &value);

    let question = path.iter().position(|&b| b == b'?');
    let base = &path[..question.unwrap_or(path.len())];
    assert!(out.starts_with(base), "base changed");
    assert_eq!(out.get(base.len()), Some(&b'?'), "no '?' after the base");
    let out_query = &out[base.len() + 1..];

    let mut injected = percent_encode(name.as_bytes());
    injected.push(b'=');
    injected.extend(percent_encode(value.as_bytes()));

    let out_segments = segments(out_query);
    let naming: Vec<usize> = out_segments
        .iter()
        .enumerate()
        .filter(|(_, s)| names_param(s, name))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        naming,
        [out_segments.len() - 1],
        "segments naming the parameter: not exactly the last one"
    );
    assert_eq!(
        out_segments.last().copied(),
        Some(injected.as_slice()),
        "injected segment"
    );
    if out_query.len() > injected.len() {
        assert_eq!(
            out_query.get(out_query.len() - injected.len() - 1),
            Some(&b'&'),
            "no '&' before the injected segment"
        );
    }

    let kept: Vec<&[u8]> = match question.map(|i| &path[i + 1..]) {
        Some(q) if !q.is_empty() => segments(q)
            .into_iter()
            .filter(|s| !names_param(s, name))
            .collect(),
        _ => Vec::new(),
    };
    assert_eq!(
        &out_segments[..out_segments.len() - 1],
        kept.as_slice(),
        "the other segments are not the input's, in order"
    );
});
