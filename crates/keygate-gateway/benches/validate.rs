//! Request validation's cost per request (issue 17): the operation lookup (the path trie and the
//! method), the parameters of a typical request (four query parameters, a path parameter and a
//! header), and a ~1 KB JSON body checked against a realistic schema (parsing included), with
//! the whole request's check (all three) for the sum. Run with `cargo bench -p keygate-gateway
//! --bench validate`; the figures are in `docs/benchmarks.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::Criterion;
use http::Method;
use keygate_gateway::validate::{BodyCheck, Lookup, Validator};
use serde_json::{Value, json};
use smallvec::SmallVec;

/// An orders API: 40 paths (so the lookup is not the trivial one), one realistic operation.
fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for r in ["customers", "products", "invoices", "shipments", "refunds", "carts", "coupons", "stores", "reviews"] {
        paths.insert(format!("/{r}"), json!({"get": {}, "post": {}}));
        paths.insert(format!("/{r}/{{id}}"), json!({"get": {}, "put": {}, "delete": {}}));
        paths.insert(format!("/{r}/{{id}}/events"), json!({"get": {}}));
        paths.insert(format!("/{r}/search"), json!({"get": {}}));
    }
    paths.insert(
        "/stores/{store}/orders".into(),
        json!({"post": {
            "parameters": [
                {"name": "store", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1}},
                {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}},
                {"name": "currency", "in": "query", "required": true, "schema": {"type": "string", "enum": ["EUR", "USD", "GBP"]}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                {"name": "tags", "in": "query", "schema": {"type": "array", "items": {"type": "string", "maxLength": 20}}},
                {"name": "Idempotency-Key", "in": "header", "required": true, "schema": {"type": "string", "format": "uuid"}}
            ],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}}
        }}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {"title": "orders", "version": "1"},
        "paths": paths,
        "components": {"schemas": {
            "Order": {"type": "object", "required": ["customer", "lines", "shipping"], "additionalProperties": false, "properties": {
                "id": {"type": "string", "readOnly": true},
                "customer": {"$ref": "#/components/schemas/Customer"},
                "lines": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"$ref": "#/components/schemas/Line"}},
                "shipping": {"$ref": "#/components/schemas/Address"},
                "note": {"type": "string", "maxLength": 500, "nullable": true},
                "placed_at": {"type": "string", "format": "date-time"}
            }},
            "Customer": {"type": "object", "required": ["email", "name"], "properties": {
                "email": {"type": "string", "format": "email"},
                "name": {"type": "string", "minLength": 1, "maxLength": 100},
                "vip": {"type": "boolean"}
            }},
            "Line": {"type": "object", "required": ["sku", "quantity", "unit_price"], "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4,8}$"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                "unit_price": {"type": "number", "minimum": 0, "multipleOf": 0.01},
                "discount": {"oneOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": 1}]}
            }},
            "Address": {"type": "object", "required": ["line1", "city", "country"], "properties": {
                "line1": {"type": "string", "maxLength": 200},
                "line2": {"type": "string", "maxLength": 200},
                "city": {"type": "string", "maxLength": 100},
                "postcode": {"type": "string", "maxLength": 20},
                "country": {"type": "string", "enum": ["FR", "DE", "GB", "US", "ES", "IT", "NL", "BE"]}
            }}
        }}
    })
}

fn body() -> Vec<u8> {
    let lines: Vec<Value> = (0..12)
        .map(|i| json!({"sku": format!("ABC-{:04}", 1000 + i), "quantity": i + 1, "unit_price": 12.5 + f64::from(i), "discount": if i % 2 == 0 { Value::Null } else { json!(0.1) }}))
        .collect();
    serde_json::to_vec(&json!({
        "customer": {"email": "ada@example.com", "name": "Ada Lovelace", "vip": true},
        "lines": lines,
        "shipping": {"line1": "12 Analytical Engine Street", "city": "London", "postcode": "EC1A 1BB", "country": "GB"},
        "note": "Leave at the door, please.",
        "placed_at": "2026-12-04T19:51:04Z"
    }))
    .unwrap()
}

const PATH: &str = "/stores/42/orders";
const QUERY: &str = "dry_run=false&currency=EUR&limit=20&tags=gift&tags=express";
const KEY: &[u8] = b"0b7d3a3e-1c4f-4a8e-9d5e-2f3c4b5a6d7e";

fn header(name: &str) -> SmallVec<[&'static [u8]; 2]> {
    if name == "idempotency-key" { SmallVec::from_slice(&[KEY]) } else { SmallVec::new() }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let text = document().to_string();
    let v = Validator::compile(&text).unwrap();
    let body = body();
    assert!((900..1400).contains(&body.len()), "a ~1 KB body: {}", body.len());
    let Lookup::Found(m) = v.find(&Method::POST, PATH) else { panic!("no operation") };
    v.check_params(&m, Some(QUERY), &header).unwrap();
    let BodyCheck::Json { schema, required } = v.body_check(&m, Some(b"application/json"), true).unwrap() else {
        panic!("no JSON body")
    };
    v.check_body(schema, required, &body).unwrap();

    let mut g = c.benchmark_group("validate");
    g.bench_function("lookup", |b| {
        b.iter(|| black_box(matches!(v.find(black_box(&Method::POST), black_box(PATH)), Lookup::Found(_))))
    });
    g.bench_function("params", |b| b.iter(|| black_box(v.check_params(&m, black_box(Some(QUERY)), &header).is_ok())));
    g.bench_function("body_1k", |b| b.iter(|| black_box(v.check_body(schema, required, black_box(&body)).is_ok())));
    g.bench_function("parse_only_1k", |b| {
        b.iter(|| black_box(serde_json::from_slice::<Value>(black_box(&body)).is_ok()))
    });
    g.bench_function("request", |b| {
        b.iter(|| {
            let Lookup::Found(m) = v.find(black_box(&Method::POST), black_box(PATH)) else { return false };
            v.check_params(&m, Some(QUERY), &header).is_ok()
                && matches!(v.body_check(&m, Some(b"application/json"), true), Ok(BodyCheck::Json { .. }))
                && v.check_body(schema, required, black_box(&body)).is_ok()
        })
    });
    g.bench_function("compile_document", |b| b.iter(|| black_box(Validator::compile(black_box(&text)).is_ok())));
    g.finish();
    c.final_summary();
}
