//! The gateway's check of a JWT access token: cached (a token seen before: a SHA-256 of the token,
//! a cache lookup, the expiry and revocation checks) and in full (signature and claims), for
//! EdDSA and ES256. Run with `cargo bench -p keygate-gateway --bench jwt`; the figures are in
//! `docs/benchmarks.md`. The goal: a cached check under 1 µs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion};
use keygate_core::Timestamp;
use keygate_core::jose::{Alg, SigningKey};
use keygate_core::secret::Pepper;
use keygate_core::token_format::TokenPrefix;
use keygate_gateway::index::TokenIndex;
use keygate_gateway::jwt::{Issuer, JwtVerifier};
use serde_json::json;

const ISS: &str = "https://keygate.example";
/// 2026-02-01.
const NOW_S: i64 = 1_769_904_000;
/// Distinct tokens cycled through, so the cache is not one hot line.
const TOKENS: usize = 4096;

fn tokens(key: &SigningKey) -> Vec<String> {
    (0..TOKENS)
        .map(|i| {
            let claims = json!({
                "iss": ISS, "sub": format!("kgc_{i}"), "aud": ISS, "exp": NOW_S + 900, "iat": NOW_S,
                "jti": format!("jti-{i:06}"), "client_id": format!("kgc_{i}"), "scope": "orders:read orders:write",
                "app_id": "app_bench",
            });
            key.sign_claims(&json!({"typ": "at+jwt"}), &claims).unwrap()
        })
        .collect()
}

fn verifier(key: &SigningKey) -> JwtVerifier {
    let issuer = Arc::new(Issuer::new(ISS, ISS, true));
    issuer.set_keys([(key.kid().to_owned(), key.public_jwk().clone())]);
    JwtVerifier::new(vec![issuer], 30)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let index = TokenIndex::new(TokenPrefix::default(), Pepper::new(&[3; 32]).unwrap());
    // A few revoked ids, so the revocation check looks at a set that is not empty.
    index.revoke_jtis((0..100).map(|i| (format!("revoked-{i}"), Timestamp::from_millis((NOW_S + 900) * 1000))));
    let now = Timestamp::from_millis(NOW_S * 1000);
    let mut g = c.benchmark_group("jwt");
    for alg in [Alg::EdDSA, Alg::ES256] {
        let key = SigningKey::generate(alg, "k1").unwrap();
        let all = tokens(&key);
        let v = verifier(&key);
        for t in &all {
            v.verify(t, now, &index).unwrap();
        }
        let mut i = 0usize;
        g.bench_function(format!("cached/{}", alg.as_str()), |b| {
            b.iter(|| {
                i = (i + 1) & (TOKENS - 1);
                black_box(v.verify(black_box(&all[i]), now, &index).unwrap());
            })
        });
        let mut j = 0usize;
        g.bench_function(format!("uncached/{}", alg.as_str()), |b| {
            b.iter_batched(
                || {
                    j = (j + 1) & (TOKENS - 1);
                    (verifier(&key), &all[j])
                },
                |(fresh, t)| black_box(fresh.verify(t, now, &index).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    c.final_summary();
}
