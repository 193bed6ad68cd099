//! The token format (`keygate_core::token_format`, docs/token-format.md). Any string: parsing
//! never panics, and what parses has the documented layout and a checksum that matches. A token
//! minted from a seeded generator (with a prefix taken from the input) parses back to its own
//! parts, and no single-character change of it, nor a cut or an extension, parses at all: the
//! gateway and the leaked-token scanner rely on the checksum to refuse made-up tokens without a
//! lookup.
//!
//! Input: the first byte picks the mode; "parse": the rest is the string; "mint": 8 bytes of
//! seed, a byte naming the position to change, a byte for the new character, then the prefix.
#![no_main]

use keygate_core::token_format::{
    ALPHABET, BODY_LEN, CHECKSUM_LEN, PUBLIC_ID_LEN, SeededRandom, TokenPrefix, checksum, mint, parse, parse_any,
};
use libfuzzer_sys::fuzz_target;

fn parsed_is_consistent(token: &str) {
    let any = parse_any(token);
    if let Ok(p) = any {
        let (prefix, body) = token.split_once('_').expect("a parsed token has a _");
        assert_eq!(p.prefix, prefix);
        assert!(TokenPrefix::new(prefix).is_ok(), "prefix {prefix:?}");
        assert_eq!(body.len(), BODY_LEN);
        assert!(body.bytes().all(|b| ALPHABET.contains(&b)));
        assert_eq!(p.public_id, &body[..PUBLIC_ID_LEN]);
        assert_eq!(p.last4, &token[token.len() - 4..]);
        let (signed, sum) = token.split_at(token.len() - CHECKSUM_LEN);
        assert_eq!(checksum(signed.as_bytes()), sum);
    }
    // With the default prefix, `parse` and `parse_any` agree.
    let kg = parse(token, &TokenPrefix::default());
    if token.starts_with("kg_") {
        assert_eq!(kg, any, "{token:?}");
    } else {
        assert!(kg.is_err(), "{token:?} parsed with the kg prefix");
    }
}

fn mint_round_trip(input: &[u8]) {
    let Some((seed, rest)) = input.split_first_chunk::<8>() else { return };
    let [at, new, prefix @ ..] = rest else { return };
    let prefix = std::str::from_utf8(prefix).ok().and_then(|p| TokenPrefix::for_issuing(p).ok()).unwrap_or_default();
    for prefix in [prefix.clone(), prefix.root_key_prefix()] {
        let minted = mint(&prefix, &SeededRandom::new(u64::from_le_bytes(*seed))).expect("minting");
        let token = minted.secret.expose();
        let p = parse(token, &prefix).expect("a minted token parses");
        assert_eq!(p.prefix, prefix.as_str());
        assert_eq!(p.public_id, minted.public_id);
        assert_eq!(p.last4, minted.last4);
        assert_eq!(parse_any(token), Ok(p));
        parsed_is_consistent(token);

        // One character changed, anywhere: refused (CRC-32 catches every error within 32
        // bits, and base62 of the checksum is one-to-one).
        let i = usize::from(*at) % token.len();
        let mut changed = token.as_bytes().to_vec();
        let replacement = ALPHABET[usize::from(*new) % ALPHABET.len()];
        if changed[i] != replacement {
            changed[i] = replacement;
            let changed = String::from_utf8(changed).expect("ASCII");
            assert!(parse(&changed, &prefix).is_err(), "{token} changed at {i} still parses");
            assert!(parse_any(&changed).is_err(), "{token} changed at {i} still parses");
        }
        assert!(parse(&token[..token.len() - 1], &prefix).is_err());
        assert!(parse(&format!("{token}{}", char::from(replacement)), &prefix).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        if let Ok(s) = std::str::from_utf8(rest) {
            parsed_is_consistent(s);
        }
    } else {
        mint_round_trip(rest);
    }
});
