//! The verify path of the gateway's token index (format and checksum, HMAC, lookup) with 1 and
//! 1,000,000 tokens resident, its parts on their own, and token creation through the SQLite
//! store. Run with `cargo bench -p keygate-gateway --bench verify`; the figures and the goals
//! they are held to are in `docs/benchmarks.md`.
//!
//! Before any benchmark runs, the 1,000,000-token index is built from records generated and
//! dropped one at a time, and the process's resident memory is read before and after, so the
//! printed bytes per token are the index's own.
// A benchmark's setup has nothing useful to do with an error but stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use keygate_core::Timestamp;
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::model::{Actor, App, NewAuditEvent, TokenRecord, TokenState, Workspace};
use keygate_core::notify::NotifyStore;
use keygate_core::policy::{Quota, QuotaPeriod, RateLimit};
use keygate_core::scope::Scope;
use keygate_core::secret::{OsRandom, Pepper};
use keygate_core::siem::SiemStore;
use keygate_core::store::{TokenStore, WorkspaceStore};
use keygate_core::token_format::{self, MintedToken, SeededRandom, TokenPrefix, mint};
use keygate_gateway::index::{Refusal, TokenIndex};
use keygate_store::StoreLocation;

const MANY: usize = 1_000_000;
/// How many distinct tokens a benchmark cycles through, so one hot cache line does not flatter
/// the lookup (a power of two, for a cheap wrap).
const PROBES: usize = 4096;
/// 2026-02-01, a fixed "now" for every check.
const NOW: Timestamp = Timestamp::from_millis(1_769_904_000_000);

const SCOPES: [&str; 8] = [
    "orders:read",
    "orders:write",
    "users:read",
    "users:*",
    "billing:read",
    "inventory:read",
    "inventory:write",
    "reports:read",
];
const WORKSPACES: usize = 4;
const APPS: usize = 250;

/// splitmix64's finalizer: spreads a counter into independent-looking bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The ids tokens are spread over: a few workspaces and a few hundred apps.
struct Tenants {
    workspaces: Vec<String>,
    apps: Vec<String>,
}

impl Tenants {
    fn new() -> Self {
        let rng = SeededRandom::new(7);
        let workspaces = (0..WORKSPACES).map(|_| WorkspaceId::random(&rng).unwrap().as_str().to_owned()).collect();
        let apps = (0..APPS).map(|_| AppId::random(&rng).unwrap().as_str().to_owned()).collect();
        Self { workspaces, apps }
    }
}

/// Resident token `i`, the same on every call (so probes can be re-minted after the build
/// instead of being kept alive through the memory measurement).
fn resident_token(i: usize) -> MintedToken {
    mint(&TokenPrefix::default(), &SeededRandom::new(mix(i as u64))).unwrap()
}

/// A well-formed token that is never inserted.
fn unknown_token(i: usize) -> MintedToken {
    mint(&TokenPrefix::default(), &SeededRandom::new(mix(!(i as u64)))).unwrap()
}

/// A record as the store would hold it, with a realistic spread of fields: 1–3 scopes from a
/// small catalog, about 40% with a rate limit, 15% with a quota, 25% expiring, 1% suspended and
/// 1% bound to an IP allowlist.
fn record(i: usize, minted: &MintedToken, pepper: &Pepper, tenants: &Tenants) -> TokenRecord {
    let r = mix(i as u64 ^ 0x5151_5151);
    let app = usize::try_from(r % tenants.apps.len() as u64).unwrap();
    let ws = app % tenants.workspaces.len();
    let scope_count = 1 + usize::try_from((r >> 8) % 3).unwrap();
    let mut picked: Vec<usize> = Vec::with_capacity(scope_count);
    let mut bits = r >> 16;
    while picked.len() < scope_count {
        let s = usize::try_from(bits % SCOPES.len() as u64).unwrap();
        bits = mix(bits);
        if !picked.contains(&s) {
            picked.push(s);
        }
    }
    picked.sort_unstable();
    let pct = (r >> 40) % 100;
    let limit_presets = [
        RateLimit { requests: 10, per_seconds: 1, burst: 20 },
        RateLimit { requests: 100, per_seconds: 60, burst: 0 },
        RateLimit { requests: 5000, per_seconds: 3600, burst: 100 },
    ];
    let created = Timestamp::from_millis(NOW.as_millis() - 86_400_000 * i64::try_from(r % 365).unwrap());
    TokenRecord {
        id: TokenId::from_public_id(&minted.public_id),
        workspace_id: WorkspaceId::from_trusted(tenants.workspaces[ws].clone()),
        app_id: AppId::from_trusted(tenants.apps[app].clone()),
        name: format!("service token {i}"),
        hash: pepper.hash(minted.secret.expose()),
        prefix: "kg".into(),
        last4: minted.last4.clone(),
        scopes: picked.iter().map(|&s| Scope::parse(SCOPES[s]).unwrap()).collect(),
        state: if pct == 99 { TokenState::Suspended } else { TokenState::Active },
        expires_at: (pct < 25).then(|| NOW.plus_seconds(86_400 * (1 + i64::try_from(r % 90).unwrap()))),
        ip_allowlist: if pct == 98 { vec![format!("10.{}.0.0/16", r % 256).parse().unwrap()] } else { vec![] },
        rate_limit: (pct < 40).then(|| limit_presets[usize::try_from(r % 3).unwrap()]),
        quota: (pct >= 85).then_some(Quota { requests: 1_000_000, period: QuotaPeriod::Month }),
        metadata: Default::default(),
        created_at: created,
        updated_at: created,
        last_used_at: None,
        last_used_ip: None,
        revoked_at: None,
        revoke_reason: None,
        rotated_from: None,
        replaced_by: None,
        exposed_at: None,
        dpop_jkt: None,
        llm_budget: None,
        max_uses: None,
        version: 1,
    }
}

/// Resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

/// Builds an index of `n` tokens, each record generated, inserted and dropped in turn.
fn build_index(n: usize, pepper: &Pepper, tenants: &Tenants) -> TokenIndex {
    let index = TokenIndex::new(TokenPrefix::default(), pepper.clone());
    for i in 0..n {
        let minted = resident_token(i);
        let rec = record(i, &minted, pepper, tenants);
        index.upsert(&rec);
    }
    index.shrink_to_fit();
    index
}

/// Up to [`PROBES`] resident tokens that verify (active, not expired), spread over the index.
fn probes(n: usize, index: &TokenIndex) -> Vec<String> {
    // Odd and not a multiple of 5, so coprime with 1,000,000: k * STEP % n visits every token.
    const STEP: usize = 244_141;
    let mut out = Vec::with_capacity(PROBES.min(n));
    for k in 0..n {
        let secret = resident_token(k * STEP % n).secret.expose().to_owned();
        if index.verify(&secret, NOW).is_ok() {
            out.push(secret);
            if out.len() == PROBES {
                break;
            }
        }
    }
    out
}

/// Changes one character of the secret, keeping the alphabet: only the checksum catches it.
fn with_typo(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    let at = 20;
    b[at] = if b[at] == b'a' { b'b' } else { b'a' };
    String::from_utf8(b).unwrap()
}

fn bench_verify(c: &mut Criterion, pepper: &Pepper, tenants: &Tenants, many: &TokenIndex) {
    let one = build_index(1, pepper, tenants);
    let one_probe = probes(1, &one);
    assert_eq!(one_probe.len(), 1);
    let many_probes = probes(MANY, many);
    assert_eq!(many_probes.len(), PROBES);
    let unknown: Vec<String> = (0..PROBES).map(|i| unknown_token(i).secret.expose().to_owned()).collect();
    let malformed: Vec<String> = many_probes.iter().map(|t| with_typo(t)).collect();
    assert_eq!(many.verify(&unknown[0], NOW).unwrap_err(), Refusal::Unknown);
    assert!(matches!(many.verify(&malformed[0], NOW), Err(Refusal::Malformed(_))));

    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::from_parameter(1), |b| {
        let t = &one_probe[0];
        b.iter(|| one.verify(black_box(t), NOW).is_ok())
    });
    g.bench_function(BenchmarkId::from_parameter(MANY), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            many.verify(black_box(&many_probes[i & (PROBES - 1)]), NOW).is_ok()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("verify_unknown");
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::from_parameter(MANY), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            many.verify(black_box(&unknown[i & (PROBES - 1)]), NOW).is_err()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("verify_malformed");
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::from_parameter(MANY), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            many.verify(black_box(&malformed[i & (PROBES - 1)]), NOW).is_err()
        })
    });
    g.finish();

    // The parts of a verify on their own.
    let prefix = TokenPrefix::default();
    let mut g = c.benchmark_group("parts");
    g.bench_function("parse_only", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            token_format::parse(black_box(&many_probes[i & (PROBES - 1)]), &prefix).is_ok()
        })
    });
    g.bench_function("hmac_only", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            pepper.hash(black_box(&many_probes[i & (PROBES - 1)]))
        })
    });
    g.finish();
}

fn bench_create(c: &mut Criterion, pepper: &Pepper) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(keygate_store::open(&StoreLocation::DataDir(dir.path().to_owned()))).unwrap();
    let ws = Workspace { id: WorkspaceId::random(&OsRandom).unwrap(), name: "bench".into(), created_at: NOW };
    let app = App {
        id: AppId::random(&OsRandom).unwrap(),
        workspace_id: ws.id.clone(),
        name: "Default app".into(),
        description: None,
        plan_id: None,
        is_default: true,
        metadata: Default::default(),
        created_at: NOW,
        updated_at: NOW,
        rate_limit: None,
        quota: None,
        llm_budget: None,
    };
    let ws = rt.block_on(store.ensure_workspace(&ws, &app)).unwrap();
    let tenants = Tenants { workspaces: vec![ws.id.as_str().to_owned()], apps: vec![app.id.as_str().to_owned()] };
    let actor = Actor::cli();
    let mut n = 0usize;
    c.bench_function("create_token_through_store", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(async {
                let minted = mint(&TokenPrefix::default(), &OsRandom).unwrap();
                let rec = record(n, &minted, pepper, &tenants);
                let audit = NewAuditEvent::new(&ws.id, &actor, "token.create", rec.id.as_str(), NOW)
                    .with_after(rec.audit_view());
                store.insert_token(&rec, &audit).await.unwrap();
            })
        })
    });
    // The same with the outboxes of issue 15 in use: three webhook endpoints subscribed to
    // token.created (a delivery each, written in the transaction) and a SIEM sink (a row more).
    for i in 0..3 {
        let endpoint = keygate_core::notify::WebhookEndpoint {
            id: keygate_core::ids::WebhookId::random(&OsRandom).unwrap(),
            workspace_id: ws.id.clone(),
            url: format!("https://hooks{i}.example.com/in"),
            description: None,
            event_types: vec![],
            enabled: true,
            disabled_reason: None,
            sealed_secret: vec![0; 60],
            previous_sealed_secret: None,
            previous_secret_until: None,
            failing_since: None,
            created_at: NOW,
            updated_at: NOW,
        };
        let audit = NewAuditEvent::new(&ws.id, &actor, "webhook.create", endpoint.id.as_str(), NOW);
        rt.block_on(store.insert_webhook(&endpoint, &audit)).unwrap();
    }
    store.set_siem_sinks(&[keygate_core::siem::Sink::Syslog]);
    c.bench_function("create_token_through_store_with_outboxes", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(async {
                let minted = mint(&TokenPrefix::default(), &OsRandom).unwrap();
                let rec = record(n, &minted, pepper, &tenants);
                let audit = NewAuditEvent::new(&ws.id, &actor, "token.create", rec.id.as_str(), NOW)
                    .with_after(rec.audit_view());
                store.insert_token(&rec, &audit).await.unwrap();
            })
        })
    });
    rt.block_on(store.close());
}

fn main() {
    let pepper = Pepper::new(&[0x5a; 32]).unwrap();
    let tenants = Tenants::new();

    // Memory first, before criterion or any other benchmark has touched the heap.
    let before = rss_bytes();
    let many = build_index(MANY, &pepper, &tenants);
    let after = rss_bytes();
    let per_token = after.saturating_sub(before) as f64 / many.len() as f64;
    println!("resident tokens: {}, index memory: {per_token:.0} bytes/token (RSS delta)", many.len());

    let mut c = Criterion::default().configure_from_args();
    bench_verify(&mut c, &pepper, &tenants, &many);
    bench_create(&mut c, &pepper);
    c.final_summary();
}
