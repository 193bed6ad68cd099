//! The compiler and the validator: each keyword, references and their cycles, the bounds, and
//! documents and bodies that must never make it panic.

use http::Method;
use serde_json::{Value, json};
use smallvec::SmallVec;

use super::*;

fn shop() -> Value {
    json!({
        "openapi": "3.0.3",
        "servers": [{"url": "https://api.example.com/shop"}],
        "paths": {
            "/items": {
                "get": {
                    "parameters": [
                        {"name": "limit", "in": "query", "required": true, "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "sort", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
                        {"name": "tag", "in": "query", "schema": {"type": "array", "items": {"type": "string", "maxLength": 3}}},
                        {"$ref": "#/components/parameters/RequestId"}
                    ]
                },
                "post": {
                    "requestBody": {"$ref": "#/components/requestBodies/Order"}
                }
            },
            "/items/mine": {"get": {}},
            "/items/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "format": "int32"}}],
                "get": {},
                "delete": {}
            },
            "/items/{item}/parts/{part}": {"get": {"parameters": [
                {"name": "item", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 3}},
                {"name": "part", "in": "path", "required": true, "schema": {"type": "integer"}}
            ]}},
            "/files/{name}.json": {"get": {"parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string", "minLength": 2}}]}}
        },
        "components": {
            "parameters": {
                "RequestId": {"name": "X-Request-Id", "in": "header", "required": false, "schema": {"type": "string", "format": "uuid"}}
            },
            "requestBodies": {
                "Order": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}}
            },
            "schemas": {
                "Order": {
                    "type": "object",
                    "required": ["id", "items"],
                    "additionalProperties": false,
                    "properties": {
                        "id": {"type": "string", "readOnly": true},
                        "items": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Line"}},
                        "note": {"type": "string", "nullable": true, "maxLength": 5},
                        "email": {"type": "string", "format": "email"}
                    }
                },
                "Line": {
                    "type": "object",
                    "required": ["sku", "price"],
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
                        "price": {"type": "number", "minimum": 0, "exclusiveMaximum": true, "maximum": 1000},
                        "qty": {"type": "integer", "multipleOf": 2}
                    }
                }
            }
        }
    })
}

fn compile(doc: &Value) -> Validator {
    Validator::compile(&doc.to_string()).unwrap()
}

fn found<'v, 'p>(v: &'v Validator, m: Method, path: &'p str) -> Matched<'v, 'p> {
    match v.find(&m, path) {
        Lookup::Found(f) => f,
        other => panic!("{m} {path}: {other:?}"),
    }
}

fn no_headers(_: &str) -> SmallVec<[&'static [u8]; 2]> {
    SmallVec::new()
}

fn params(v: &Validator, path: &str, query: Option<&str>) -> Result<(), Rejection> {
    let m = found(v, Method::GET, path);
    v.check_params(&m, query, &no_headers)
}

fn violations(r: Result<(), Rejection>) -> Vec<(Location, String, String, String)> {
    match r {
        Err(Rejection::Invalid(v)) => v.into_iter().map(|v| (v.location, v.name, v.pointer, v.message)).collect(),
        other => panic!("not invalid: {other:?}"),
    }
}

fn body(v: &Validator, b: Value) -> Result<(), Rejection> {
    let m = found(v, Method::POST, "/shop/items");
    v.check_body(v.json_schema(&m), true, b.to_string().as_bytes())
}

#[test]
fn operations_are_found_literal_segments_first_and_under_the_server_path() {
    let v = compile(&shop());
    assert_eq!(v.operations(), 7);
    assert_eq!(&*found(&v, Method::GET, "/shop/items/mine").op.name, "GET /items/mine");
    let m = found(&v, Method::GET, "/shop/items/42");
    assert_eq!(&*m.op.name, "GET /items/{id}");
    assert_eq!(m.captures.as_slice(), &["42"]);
    // Without the server's path too.
    assert_eq!(&*found(&v, Method::GET, "/items/42").op.name, "GET /items/{id}");
    assert_eq!(&*found(&v, Method::GET, "/files/ab.json").op.name, "GET /files/{name}.json");
    // HEAD is GET's.
    assert_eq!(&*found(&v, Method::HEAD, "/items/1").op.name, "GET /items/{id}");
    assert!(matches!(v.find(&Method::GET, "/nothing"), Lookup::NoPath));
    assert!(matches!(v.find(&Method::GET, "/items/1/more"), Lookup::NoPath));
    assert!(matches!(v.find(&Method::GET, "/files/.json"), Lookup::NoPath));
    assert!(matches!(v.find(&Method::GET, "/shopping/items"), Lookup::NoPath));
    match v.find(&Method::PUT, "/items/7") {
        Lookup::NoMethod(allow) => assert_eq!(allow, "GET, DELETE"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn query_parameters_are_checked_and_named() {
    let v = compile(&shop());
    assert_eq!(params(&v, "/items", Some("limit=10&sort=asc&tag=a&tag=bc")), Ok(()));
    let e = violations(params(&v, "/items", None));
    assert_eq!(e, vec![(Location::Query, "limit".into(), String::new(), "is required".into())]);
    let e = violations(params(&v, "/items", Some("limit=abc")));
    assert_eq!(e[0].3, "must be an integer");
    let e = violations(params(&v, "/items", Some("limit=101")));
    assert_eq!(e[0].3, "must be at most 100");
    let e = violations(params(&v, "/items", Some("limit=0&sort=up")));
    assert_eq!(e.len(), 2);
    assert_eq!(e[1].1, "sort");
    assert_eq!(e[1].3, "must be one of \"asc\", \"desc\"");
    let e = violations(params(&v, "/items", Some("limit=1&tag=abcd&tag=a")));
    assert_eq!((e[0].1.as_str(), e[0].2.as_str(), e[0].3.as_str()), ("tag", "/0", "must be at most 3 characters long"));
    // Percent-encoded names and values, and + as a space.
    assert_eq!(params(&v, "/items", Some("%6Cimit=%31%30&sort=asc")), Ok(()));
    let e = violations(params(&v, "/items", Some("limit=1+0")));
    assert_eq!(e[0].3, "must be an integer");
    // Invalid UTF-8 once decoded.
    let e = violations(params(&v, "/items", Some("limit=%FF")));
    assert_eq!(e[0].3, "is not valid UTF-8 once percent-decoded");
}

#[test]
fn path_and_header_parameters_are_checked() {
    let v = compile(&shop());
    assert_eq!(params(&v, "/items/12", None), Ok(()));
    let e = violations(params(&v, "/items/x", None));
    assert_eq!(e[0], (Location::Path, "id".into(), String::new(), "must be an integer".into()));
    let e = violations(params(&v, "/items/99999999999", None));
    assert_eq!(e[0].3, "must be a 32-bit integer");
    // Paths that differ only by their parameters' names share the trie, each with its names.
    assert_eq!(params(&v, "/items/abc/parts/7", None), Ok(()));
    let e = violations(params(&v, "/items/abcd/parts/x", None));
    assert_eq!(
        e.iter().map(|x| (x.1.as_str(), x.3.as_str())).collect::<Vec<_>>(),
        vec![("item", "must be at most 3 characters long"), ("part", "must be an integer")]
    );
    let e = violations(params(&v, "/files/a.json", None));
    assert_eq!(e[0].3, "must be at least 2 characters long");
    let m = found(&v, Method::GET, "/items");
    let good = |n: &str| -> SmallVec<[&'static [u8]; 2]> {
        if n == "x-request-id" {
            SmallVec::from_slice(&[b"0b7d3a3e-1c4f-4a8e-9d5e-2f3c4b5a6d7e".as_slice()])
        } else {
            SmallVec::new()
        }
    };
    assert_eq!(v.check_params(&m, Some("limit=5"), &good), Ok(()));
    let bad = |n: &str| -> SmallVec<[&'static [u8]; 2]> {
        if n == "x-request-id" {
            SmallVec::from_slice(&[b"secret-value-not-a-uuid".as_slice()])
        } else {
            SmallVec::new()
        }
    };
    let e = violations(v.check_params(&m, Some("limit=5"), &bad));
    assert_eq!(e[0], (Location::Header, "x-request-id".into(), String::new(), "must be a UUID".into()));
    // The value itself is never in the message.
    let r = Err::<(), _>(Rejection::Invalid(vec![]));
    let _ = r;
}

#[test]
fn a_body_is_checked_and_each_error_names_its_field() {
    let v = compile(&shop());
    let ok = json!({"items": [{"sku": "ABC-1", "price": 9.5, "qty": 2}], "note": null, "email": "a@b.example"});
    assert_eq!(body(&v, ok), Ok(()));
    let e = violations(body(&v, json!({"items": [{"sku": "ABC-1", "price": "free"}]})));
    assert_eq!(e, vec![(Location::Body, String::new(), "/items/0/price".into(), "must be a number".into())]);
    let e =
        violations(body(&v, json!({"items": [{"sku": "abc", "price": -1, "qty": 3}, {"price": 1000}], "extra": 1})));
    // In the order of the body's keys (which depends on serde_json's features): sorted here.
    let mut got: Vec<(&str, &str)> = e.iter().map(|x| (x.2.as_str(), x.3.as_str())).collect();
    got.sort();
    let mut want = vec![
        ("/items/0/sku", "must match the pattern ^[A-Z]{3}-[0-9]+$"),
        ("/items/0/price", "must be at least 0"),
        ("/items/0/qty", "must be a multiple of 2"),
        ("/items/1/sku", "is required"),
        ("/items/1/price", "must be less than 1000"),
        ("/extra", "is not a property this object may have"),
    ];
    want.sort();
    assert_eq!(got, want);
    let e = violations(body(&v, json!({"items": []})));
    assert_eq!(e[0].3, "must have at least 1 items");
    let e = violations(body(&v, json!({"items": [{"sku": "ABC-1", "price": 1}], "note": "ééééé!"})));
    assert_eq!((e[0].2.as_str(), e[0].3.as_str()), ("/note", "must be at most 5 characters long"));
    let e = violations(body(&v, json!({"items": [{"sku": "ABC-1", "price": 1}], "email": "no at sign"})));
    assert_eq!(e[0].3, "must be a email address");
    let e = violations(body(&v, json!([1])));
    assert_eq!(e[0].3, "must be an object");
    let m = found(&v, Method::POST, "/items");
    let e = violations(v.check_body(v.json_schema(&m), true, b"{\"items\": ["));
    assert!(e[0].3.starts_with("is not valid JSON"), "{e:?}");
    let e = violations(v.check_body(v.json_schema(&m), true, b""));
    assert_eq!(e[0].3, "a request body is required");
}

fn one(schema: Value, value: Value) -> Result<(), Rejection> {
    one_in("3.1.0", schema, value)
}

fn one_in(version: &str, schema: Value, value: Value) -> Result<(), Rejection> {
    let doc = json!({
        "openapi": version,
        "paths": {"/x": {"post": {"requestBody": {"content": {"application/json": {"schema": schema}}}}}},
        "components": {"schemas": {
            "Tree": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/components/schemas/Tree"}}}},
            "Name": {"type": "string", "minLength": 1}
        }}
    });
    let v = compile(&doc);
    let m = found(&v, Method::POST, "/x");
    v.check_value(v.json_schema(&m).unwrap(), &value)
}

fn msg(r: Result<(), Rejection>) -> String {
    violations(r).remove(0).3
}

#[test]
fn each_keyword() {
    // type, type arrays, integer within number
    assert_eq!(one(json!({"type": ["string", "null"]}), json!(null)), Ok(()));
    assert_eq!(msg(one(json!({"type": ["string", "null"]}), json!(1))), "must be a null or string");
    assert_eq!(one(json!({"type": "number"}), json!(3)), Ok(()));
    assert_eq!(msg(one(json!({"type": "integer"}), json!(3.5))), "must be an integer");
    assert_eq!(one(json!({"type": "integer"}), json!(3.0)), Ok(()));
    assert_eq!(msg(one(json!({"type": "boolean"}), json!("true"))), "must be a boolean");
    // nullable (3.0)
    assert_eq!(one_in("3.0.0", json!({"type": "string", "nullable": true}), json!(null)), Ok(()));
    assert!(one_in("3.0.0", json!({"type": "string"}), json!(null)).is_err());
    // enum, const
    assert_eq!(one(json!({"enum": [1, "a", null]}), json!("a")), Ok(()));
    assert_eq!(msg(one(json!({"enum": [1, "a"]}), json!("b"))), "must be one of 1, \"a\"");
    assert_eq!(msg(one(json!({"const": "x"}), json!("y"))), "must be \"x\"");
    // bounds, 3.0 and 3.1 forms
    assert_eq!(
        msg(one_in("3.0.0", json!({"minimum": 5, "exclusiveMinimum": true}), json!(5))),
        "must be greater than 5"
    );
    assert_eq!(msg(one(json!({"exclusiveMinimum": 5}), json!(5))), "must be greater than 5");
    assert_eq!(one(json!({"exclusiveMinimum": 5}), json!(5.1)), Ok(()));
    assert_eq!(msg(one(json!({"exclusiveMaximum": 5, "maximum": 10}), json!(7))), "must be less than 5");
    assert_eq!(msg(one(json!({"maximum": 10}), json!(11))), "must be at most 10");
    assert_eq!(one(json!({"multipleOf": 0.1}), json!(0.3)), Ok(()));
    // strings
    assert_eq!(msg(one(json!({"minLength": 2}), json!("é"))), "must be at least 2 characters long");
    assert_eq!(one(json!({"maxLength": 2}), json!("éé")), Ok(()));
    assert_eq!(one(json!({"pattern": "b+"}), json!("abbc")), Ok(()));
    assert_eq!(one(json!({"minLength": 5}), json!(3)), Ok(()), "string keywords apply to strings only");
    for (f, good, bad) in [
        ("date-time", "2026-12-04T19:51:04.123+01:00", "2026-12-04 25:00:00Z"),
        ("date-time", "2026-12-04T19:51:04Z", "2026-12-04"),
        ("date-time", "2026-12-04T19:51:04+01:00", "2026-12-04T19:51:04+0é:0"),
        ("date", "2026-02-28", "2026-13-01"),
        ("uuid", "0b7d3a3e-1c4f-4a8e-9d5e-2f3c4b5a6d7e", "0b7d3a3e1c4f4a8e9d5e2f3c4b5a6d7e"),
        ("email", "a.b@c.example", "a@b"),
        ("ipv4", "10.0.0.1", "10.0.0.256"),
        ("ipv6", "::1", "1::2::3"),
        ("uri", "https://x.example/a", "no scheme"),
    ] {
        assert_eq!(one(json!({"format": f}), json!(good)), Ok(()), "{f} {good}");
        assert!(one(json!({"format": f}), json!(bad)).is_err(), "{f} {bad}");
    }
    assert_eq!(one(json!({"format": "something-else"}), json!("x")), Ok(()));
    assert_eq!(msg(one(json!({"format": "int64"}), json!(1.5))), "must be a 64-bit integer");
    // arrays
    assert_eq!(msg(one(json!({"maxItems": 1}), json!([1, 2]))), "must have at most 1 items");
    assert_eq!(msg(one(json!({"uniqueItems": true}), json!([1, {"a": 1}, {"a": 1}]))), "must not have two equal items");
    let many: Vec<u32> = (0..100).chain([5]).collect();
    assert!(one(json!({"uniqueItems": true}), json!(many)).is_err());
    // objects
    assert_eq!(msg(one(json!({"minProperties": 1}), json!({}))), "must have at least 1 properties");
    assert_eq!(msg(one(json!({"maxProperties": 1}), json!({"a": 1, "b": 2}))), "must have at most 1 properties");
    let e = violations(one(json!({"additionalProperties": {"type": "integer"}}), json!({"a~/b": "x"})));
    assert_eq!((e[0].2.as_str(), e[0].3.as_str()), ("/a~0~1b", "must be an integer"));
    // combinators
    assert_eq!(
        msg(one(json!({"anyOf": [{"type": "string"}, {"type": "integer"}]}), json!(1.5))),
        "must match at least one of the 2 schemas of anyOf"
    );
    assert_eq!(one(json!({"oneOf": [{"type": "string"}, {"type": "integer"}]}), json!(1)), Ok(()));
    assert!(msg(one(json!({"oneOf": [{"type": "number"}, {"type": "integer"}]}), json!(1))).contains("more than one"));
    assert!(msg(one(json!({"oneOf": [{"type": "string"}]}), json!(1))).contains("it matches none"));
    assert_eq!(msg(one(json!({"not": {"type": "string"}}), json!("s"))), "must not match the schema of not");
    let e = violations(one(
        json!({"allOf": [{"required": ["a"]}, {"properties": {"b": {"type": "string"}}}]}),
        json!({"b": 1}),
    ));
    assert_eq!(e.len(), 2);
    // boolean schemas
    assert_eq!(one(json!(true), json!({"anything": 1})), Ok(()));
    assert_eq!(msg(one(json!({"properties": {"no": false}}), json!({"no": 1}))), "is not allowed here");
    // $ref with siblings (3.1) and without (3.0, siblings ignored)
    assert!(one(json!({"$ref": "#/components/schemas/Name", "maxLength": 2}), json!("abc")).is_err());
    assert_eq!(one_in("3.0.1", json!({"$ref": "#/components/schemas/Name", "maxLength": 2}), json!("abc")), Ok(()));
    // unknown keywords are ignored
    assert_eq!(
        one(json!({"x-whatever": 1, "discriminator": {"propertyName": "t"}, "prefixItems": [false]}), json!([1])),
        Ok(())
    );
}

#[test]
fn recursive_schemas_are_followed_within_the_depth_bound() {
    let tree = json!({"$ref": "#/components/schemas/Tree"});
    let mut v = json!({});
    for _ in 0..10 {
        v = json!({"kids": [v]});
    }
    assert_eq!(one(tree.clone(), v), Ok(()));
    let mut bad = json!({"kids": [{"kids": 3}]});
    assert_eq!(violations(one(tree.clone(), bad.clone()))[0].2, "/kids/0/kids");
    for _ in 0..MAX_BODY_DEPTH {
        bad = json!({"kids": [bad]});
    }
    let e = violations(one(tree, bad));
    assert!(e[0].3.starts_with("nests deeper than"), "{e:?}");
}

#[test]
fn the_work_of_one_request_is_bounded() {
    // Each level tries both branches of a oneOf over the same subtree: 2^depth without a budget.
    let doc = json!({
        "openapi": "3.1.0",
        "paths": {"/x": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/N"}}}}}}},
        "components": {"schemas": {"N": {"oneOf": [
            {"type": "object", "properties": {"c": {"$ref": "#/components/schemas/N"}}},
            {"type": "object", "properties": {"c": {"$ref": "#/components/schemas/N"}}, "not": {"required": ["c"]}}
        ]}}}
    });
    let v = compile(&doc);
    let m = found(&v, Method::POST, "/x");
    let mut body = json!({});
    for _ in 0..40 {
        body = json!({"c": body});
    }
    let e = violations(v.check_value(v.json_schema(&m).unwrap(), &body));
    assert!(e.iter().any(|x| x.3.contains("too complex")), "{e:?}");
    // Errors reported are bounded too.
    let items: Vec<Value> = (0..1000).map(|_| json!("x")).collect();
    let e = violations(one(json!({"items": {"type": "integer"}}), json!(items)));
    assert_eq!(e.len(), MAX_ERRORS);
}

#[test]
fn read_only_properties_are_not_required_in_requests() {
    let v = compile(&shop());
    assert_eq!(body(&v, json!({"items": [{"sku": "ABC-1", "price": 1}]})), Ok(()));
    let e = violations(body(&v, json!({})));
    assert_eq!(e.iter().map(|x| x.2.as_str()).collect::<Vec<_>>(), vec!["/items"]);
}

#[test]
fn media_types_are_checked() {
    let v = compile(&shop());
    let m = found(&v, Method::POST, "/items");
    let schema = v.json_schema(&m);
    assert_eq!(
        v.body_check(&m, Some(b"application/json; charset=utf-8"), true),
        Ok(BodyCheck::Json { schema, required: true })
    );
    assert!(matches!(v.body_check(&m, Some(b"text/plain"), true), Err(Rejection::MediaType(_))));
    assert!(matches!(v.body_check(&m, None, true), Err(Rejection::MediaType(_))));
    assert!(matches!(v.body_check(&m, Some(b"application/json"), false), Err(Rejection::Invalid(_))));
    // An operation without a body takes whatever comes.
    let g = found(&v, Method::GET, "/items/1");
    assert_eq!(v.body_check(&g, Some(b"text/plain"), true), Ok(BodyCheck::None));
    // Wildcards, +json.
    let doc = json!({"openapi": "3.1.0", "paths": {"/u": {"put": {"requestBody": {"content": {
        "application/merge-patch+json": {"schema": {"type": "object"}},
        "image/*": {}
    }}}}}});
    let v = compile(&doc);
    let m = found(&v, Method::PUT, "/u");
    assert!(matches!(
        v.body_check(&m, Some(b"application/merge-patch+json"), true),
        Ok(BodyCheck::Json { schema: Some(_), .. })
    ));
    assert_eq!(v.body_check(&m, Some(b"image/png"), true), Ok(BodyCheck::None));
    assert!(v.body_check(&m, Some(b"application/json"), true).is_err());
}

#[test]
fn documents_that_do_not_compile_say_why() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"swagger": "2.0"}), "not an OpenAPI 3.0 or 3.1"),
        (json!({"openapi": "3.0.0", "paths": []}), "paths: must be an object"),
        (json!({"openapi": "3.0.0", "paths": {"x": {}}}), "starts with '/'"),
        (json!({"openapi": "3.0.0", "paths": {"/a/{b": {}}}), "without '}'"),
        (json!({"openapi": "3.0.0", "paths": {"/a/{b}{c}": {}}}), "one {parameter} per path segment"),
        (
            json!({"openapi": "3.0.0", "paths": {"/a": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Nope"}}}}}}}}),
            "names nothing",
        ),
        (
            json!({"openapi": "3.0.0", "paths": {"/a": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "other.json#/X"}}}}}}}}),
            "is not local",
        ),
        (
            json!({"openapi": "3.0.0", "paths": {"/a": {"get": {"parameters": [{"name": "q", "in": "query", "schema": {"type": "string", "pattern": "(?=a)b"}}]}}}}),
            "pattern",
        ),
        (
            json!({"openapi": "3.0.0", "paths": {"/a": {"get": {"parameters": [{"name": "q", "in": "query", "schema": {"type": "strin"}}]}}}}),
            "unknown type",
        ),
        (
            json!({"openapi": "3.0.0", "paths": {"/a/{id}": {"get": {"parameters": [{"name": "other", "in": "path", "required": true}]}}}}),
            "is not in the path",
        ),
        (
            json!({"openapi": "3.1.0", "paths": {"/a": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/A"}}}}}}},
                   "components": {"schemas": {"A": {"$ref": "#/components/schemas/B"}, "B": {"anyOf": [{"$ref": "#/components/schemas/A"}]}}}}),
            "refers to itself",
        ),
        (
            json!({"openapi": "3.0.0", "paths": {"/a": {"get": {"parameters": [{"$ref": "#/components/parameters/P"}]}}},
                   "components": {"parameters": {"P": {"$ref": "#/components/parameters/P"}}}}),
            "$refs in a row",
        ),
    ];
    for (doc, want) in cases {
        let e = Validator::compile(&doc.to_string()).unwrap_err();
        assert!(e.contains(want), "{doc}: {e}");
    }
    // Nesting too deep.
    let mut s = json!({"type": "string"});
    for _ in 0..MAX_SCHEMA_DEPTH + 1 {
        s = json!({"type": "array", "items": s});
    }
    let doc = json!({"openapi": "3.0.0", "paths": {"/a": {"post": {"requestBody": {"content": {"application/json": {"schema": s}}}}}}});
    assert!(Validator::compile(&doc.to_string()).unwrap_err().contains("deeper than"));
    assert!(Validator::compile("not json").is_err());
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn random_value(r: &mut Rng, depth: u32) -> Value {
    match r.below(if depth > 5 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(r.below(2) == 0),
        2 => json!(r.below(200) as i64 - 100),
        3 => json!((r.below(2000) as f64) / 7.0 - 100.0),
        4 => json!(r.pick(&["", "a", "ABC-1", "é", "2026-01-01", "x@y.z", "::1", "a/b~c"])),
        5 => Value::Array((0..r.below(4)).map(|_| random_value(r, depth + 1)).collect()),
        _ => Value::Object(
            (0..r.below(4))
                .map(|_| (r.pick(&["a", "b", "kids", "c"]).to_owned(), random_value(r, depth + 1)))
                .collect(),
        ),
    }
}

fn random_schema(r: &mut Rng, depth: u32) -> Value {
    let mut m = serde_json::Map::new();
    let keys = if depth > 3 { 2 } else { 4 };
    for _ in 0..r.below(keys) + 1 {
        let (k, v) = match r.below(22) {
            0 => ("type", json!(r.pick(&["string", "integer", "number", "object", "array", "boolean", "null"]))),
            1 => ("type", json!(["string", "null"])),
            2 => ("enum", json!([1, "a", null])),
            3 => ("const", json!("a")),
            4 => ("minimum", json!(r.below(10) as i64 - 5)),
            5 => ("exclusiveMaximum", json!(r.below(10))),
            6 => ("multipleOf", json!(0.5)),
            7 => ("minLength", json!(r.below(3))),
            8 => ("pattern", json!("^[A-Z]")),
            9 => ("format", json!(r.pick(&["date-time", "date", "uuid", "email", "ipv6", "uri", "int32"]))),
            10 => ("items", random_schema(r, depth + 1)),
            11 => ("uniqueItems", json!(true)),
            12 => {
                ("properties", json!({"a": random_schema(r, depth + 1), "kids": {"$ref": "#/components/schemas/Tree"}}))
            }
            13 => ("required", json!(["a", "b"])),
            14 => ("additionalProperties", if r.below(2) == 0 { json!(false) } else { random_schema(r, depth + 1) }),
            15 => ("allOf", json!([random_schema(r, depth + 1)])),
            16 => ("anyOf", json!([random_schema(r, depth + 1), random_schema(r, depth + 1)])),
            17 => ("oneOf", json!([random_schema(r, depth + 1), {"$ref": "#/components/schemas/Name"}])),
            18 => ("not", random_schema(r, depth + 1)),
            19 => ("maxItems", json!(r.below(3))),
            20 => ("nullable", json!(true)),
            _ => ("$ref", json!("#/components/schemas/Tree")),
        };
        m.insert(k.into(), v);
    }
    Value::Object(m)
}

#[test]
fn random_bodies_against_random_schemas_never_panic() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let schema = random_schema(&mut r, 0);
        let value = random_value(&mut r, 0);
        for version in ["3.0.3", "3.1.0"] {
            let _ = one_in(version, schema.clone(), value.clone());
        }
    }
}

#[test]
fn malformed_documents_never_panic() {
    let mut r = Rng(7);
    let base = shop().to_string();
    for i in 0..2000 {
        // Cut, or replace one byte of, a real document; or a random schema in odd places.
        let mut b = base.clone().into_bytes();
        match i % 3 {
            0 => b.truncate(r.below(b.len() as u64) as usize),
            1 => {
                let at = r.below(b.len() as u64) as usize;
                b[at] = b"{}[]\",:0a/$#~"[r.below(13) as usize];
            }
            _ => {
                let doc = json!({"openapi": "3.1.0", "paths": {"/{a}": {"parameters": [{"name": "a", "in": "path", "schema": random_schema(&mut r, 0)}],
                    "post": {"requestBody": {"content": {"application/json": {"schema": random_schema(&mut r, 0)}}}}}},
                    "components": {"schemas": {"Tree": random_schema(&mut r, 1), "Name": random_schema(&mut r, 1)}}});
                b = doc.to_string().into_bytes();
            }
        }
        if let Ok(text) = String::from_utf8(b)
            && let Ok(v) = Validator::compile(&text)
            && let Lookup::Found(m) = v.find(&Method::POST, "/x")
        {
            let _ = v.check_params(&m, Some("a=1"), &no_headers);
            if let Some(s) = v.json_schema(&m) {
                let _ = v.check_value(s, &random_value(&mut r, 0));
            }
        }
    }
}
