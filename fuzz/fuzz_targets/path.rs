//! Path normalization (`routes::normalize_path`): routes and scopes are matched on its output,
//! so no spelling may leave a dot segment, an empty segment or an escape of `.`, `/`, `\` or NUL
//! in it, and normalizing twice must change nothing (else the route matched and the path an
//! upstream resolves could differ). It never panics on any input.
#![no_main]

use std::borrow::Cow;

use keygate_gateway::routes::normalize_path;
use libfuzzer_sys::fuzz_target;

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

fn check_normal(raw: &str, out: &str) {
    assert!(out.starts_with('/'), "{raw:?} -> {out:?}: not absolute");
    assert!(out.is_ascii(), "{raw:?} -> {out:?}: not ASCII");
    assert!(!out.contains("//"), "{raw:?} -> {out:?}: an empty segment");
    assert!(!out.bytes().any(|b| b == b'\\' || b == 0), "{raw:?} -> {out:?}: a backslash or NUL");
    let segments: Vec<&str> = out.split('/').skip(1).collect();
    for seg in &segments {
        assert!(*seg != "." && *seg != "..", "{raw:?} -> {out:?}: a dot segment");
    }
    let b = out.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(hi), Some(lo)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex))
            else {
                panic!("{raw:?} -> {out:?}: a malformed escape at {i}");
            };
            let v = hi * 16 + lo;
            assert!(!matches!(v, b'.' | b'/' | b'\\' | 0), "{raw:?} -> {out:?}: an escaped {v:#04x} is left");
            i += 3;
        } else {
            i += 1;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(out) = normalize_path(raw) else { return };
    if let Cow::Borrowed(b) = &out {
        assert_eq!(*b, raw, "a borrowed result is the input itself");
    }
    check_normal(raw, &out);
    match normalize_path(&out) {
        Ok(again) => assert_eq!(again, out, "{raw:?}: normalizing twice changed it"),
        Err(e) => panic!("{raw:?} -> {out:?}: its own output is refused ({e})"),
    }
});
