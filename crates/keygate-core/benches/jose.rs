//! What verifying a keygate access token costs without a cache: the full RFC 9068 check
//! (split, header, signature, claims) for EdDSA and ES256, and the signature alone. The gateway's
//! JWT path will cache verified tokens; this is the cost of a token's first request.
//!
//! `cargo bench -p keygate-core --bench jose`
#![allow(clippy::unwrap_used, reason = "a benchmark: a failure should stop it")]

use criterion::{Criterion, criterion_group, criterion_main};
use keygate_core::jose::{Alg, Audience, Claims, SigningKey, verify, verify_access_token};
use std::hint::black_box;

fn claims() -> Claims {
    Claims {
        iss: "https://keygate.example".into(),
        sub: "app_0123456789abcdef".into(),
        aud: Audience::One("https://api.example".into()),
        exp: 2_000_000_000,
        nbf: None,
        iat: 1_900_000_000,
        jti: "jti_0123456789abcdef".into(),
        client_id: "client_0123456789".into(),
        scope: Some("orders:read orders:write".into()),
        cnf: None,
    }
}

fn bench(c: &mut Criterion) {
    let header = serde_json::json!({"typ": "at+jwt"});
    for alg in [Alg::EdDSA, Alg::ES256] {
        let key = SigningKey::generate(alg, "k1").unwrap();
        let public = key.public_jwk();
        let token = key.sign_claims(&header, &claims()).unwrap();
        let name = alg.as_str();
        c.bench_function(&format!("access_token/{name}"), |b| {
            b.iter(|| {
                verify_access_token(
                    black_box(&token),
                    public,
                    alg,
                    1_950_000_000,
                    30,
                    "https://keygate.example",
                    "https://api.example",
                )
                .unwrap()
            })
        });
        c.bench_function(&format!("jws_only/{name}"), |b| b.iter(|| verify(black_box(&token), public, alg).unwrap()));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
