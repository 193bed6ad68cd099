//! Request validation against an API's OpenAPI document (issue 17): a route that validates
//! (`validate = true`, or its API version's `validate`) checks each request's path, query and
//! header parameters and its JSON body against the operation its API's document describes,
//! after every check of the credential, scopes and limits and before forwarding.
//!
//! The document (OpenAPI 3.0 or 3.1, JSON) is compiled once, when the route table is built
//! ([`Validator::compile`]), into
//!
//! - a matcher of operations: a trie of path segments, literal segments tried before templated
//!   ones (`/items/mine` before `/items/{id}`), one template per segment with an optional literal
//!   around it (`{id}.json`), then the method;
//! - per operation, its parameters (path-level and operation-level merged, `$ref`s to
//!   `#/components/parameters/…` resolved) and its request body's media types;
//! - an arena of compiled schemas ([`Node`]) that a subset of JSON Schema is checked with: `type`
//!   (3.1 type arrays, 3.0 `nullable`), `enum`, `const`, `minimum`, `maximum`,
//!   `exclusiveMinimum`/`exclusiveMaximum` (3.0 booleans and 3.1 numbers), `multipleOf`,
//!   `minLength`/`maxLength` (in characters), `pattern` (the `regex` crate: linear time, size
//!   bounded), `format` (`date-time`, `date`, `uuid`, `email` (lax), `ipv4`, `ipv6`, `uri`,
//!   `int32`, `int64`), `items`, `minItems`/`maxItems`, `uniqueItems`, `properties`,
//!   `required` (a `readOnly` property is not required in a request), `additionalProperties`
//!   (boolean or schema), `minProperties`/`maxProperties`, `allOf`/`anyOf`/`oneOf`/`not`, boolean
//!   schemas, and `$ref` to any local JSON pointer (`#/components/schemas/…`). Every other
//!   keyword is ignored.
//!
//! Which path the document's paths are matched with: the request's (normalized) path, less the
//! route's `path` when the route has `strip_prefix` (the path the upstream receives), then less
//! the path of the document's first `servers` URL when it starts with it.
//!
//! Everything is bounded: the document (1 MiB, checked when stored), a schema's nesting
//! ([`MAX_SCHEMA_DEPTH`]), `$ref` chains (compiled once each; a cycle that never goes into a
//! property or an item is refused), path templates' segments ([`MAX_TEMPLATE_SEGMENTS`]), a
//! pattern's compiled size; while validating, the body's nesting ([`MAX_BODY_DEPTH`]), the
//! schema checks one request may cost ([`MAX_STEPS`]) and the errors reported ([`MAX_ERRORS`]).
//! No value of the request is ever put in a message: only the schema's constraints, and the
//! pointer to the field (its keys, truncated).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use http::Method;
use serde_json::{Map, Value};
use smallvec::SmallVec;

/// How deep one schema of the document may nest (in schema keywords), when compiled.
pub const MAX_SCHEMA_DEPTH: usize = 64;
/// How deep a JSON body may nest where a schema still looks into it.
pub const MAX_BODY_DEPTH: usize = 64;
/// Schema checks one request may cost (each schema applied to one value is one).
pub const MAX_STEPS: u32 = 100_000;
/// The errors one refusal lists.
pub const MAX_ERRORS: usize = 10;
/// The most segments of one path template.
pub const MAX_TEMPLATE_SEGMENTS: usize = 64;
/// How many `$ref`s to parameters, request bodies or path items may follow one another.
const MAX_REF_HOPS: usize = 16;
/// A pattern's compiled size limit (the `regex` crate's `size_limit`).
const PATTERN_SIZE_LIMIT: usize = 256 * 1024;
/// Longest pointer and message put in a refusal, in characters.
const MAX_POINTER_CHARS: usize = 128;
const MAX_MESSAGE_CHARS: usize = 200;

type Id = u32;
/// A bound of a number: (the bound, exclusive).
type Bound = Option<(f64, bool)>;

const T_NULL: u8 = 1;
const T_BOOLEAN: u8 = 2;
const T_INTEGER: u8 = 4;
const T_NUMBER: u8 = 8;
const T_STRING: u8 = 16;
const T_ARRAY: u8 = 32;
const T_OBJECT: u8 = 64;

const TYPE_NAMES: [(u8, &str); 7] = [
    (T_NULL, "null"),
    (T_BOOLEAN, "boolean"),
    (T_INTEGER, "integer"),
    (T_NUMBER, "number"),
    (T_STRING, "string"),
    (T_ARRAY, "array"),
    (T_OBJECT, "object"),
];

/// A `format` keygate checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    DateTime,
    Date,
    Uuid,
    Email,
    Ipv4,
    Ipv6,
    Uri,
    Int32,
    Int64,
}

impl Format {
    fn of(s: &str) -> Option<Self> {
        Some(match s {
            "date-time" => Self::DateTime,
            "date" => Self::Date,
            "uuid" => Self::Uuid,
            "email" => Self::Email,
            "ipv4" => Self::Ipv4,
            "ipv6" => Self::Ipv6,
            "uri" => Self::Uri,
            "int32" => Self::Int32,
            "int64" => Self::Int64,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::DateTime => "date-time (RFC 3339)",
            Self::Date => "date (YYYY-MM-DD)",
            Self::Uuid => "UUID",
            Self::Email => "email address",
            Self::Ipv4 => "IPv4 address",
            Self::Ipv6 => "IPv6 address",
            Self::Uri => "URI",
            Self::Int32 => "32-bit integer",
            Self::Int64 => "64-bit integer",
        }
    }
}

#[derive(Debug, Default)]
enum Additional {
    #[default]
    Any,
    Deny,
    Schema(Id),
}

/// A compiled schema.
#[derive(Debug, Default)]
struct Node {
    /// The `false` schema: nothing matches.
    never: bool,
    /// Allowed types (`T_*` bits); 0: any.
    types: u8,
    /// 3.0 `nullable: true`: `null` is allowed whatever else is said.
    nullable: bool,
    enumeration: Option<Box<[Value]>>,
    constant: Option<Value>,
    /// (bound, exclusive)
    minimum: Option<(f64, bool)>,
    maximum: Option<(f64, bool)>,
    multiple_of: Option<f64>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    pattern: Option<Box<(regex::Regex, Box<str>)>>,
    format: Option<Format>,
    items: Option<Id>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    unique_items: bool,
    /// Sorted by name.
    properties: Box<[(Box<str>, Id)]>,
    required: Box<[Box<str>]>,
    additional: Additional,
    min_properties: Option<u64>,
    max_properties: Option<u64>,
    all_of: Box<[Id]>,
    any_of: Box<[Id]>,
    one_of: Box<[Id]>,
    not: Option<Id>,
    /// `readOnly: true` (not required in requests).
    read_only: bool,
}

/// Where a parameter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Path,
    Query,
    Header,
    Body,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Path => "path",
            Self::Query => "query",
            Self::Header => "header",
            Self::Body => "body",
        }
    }
}

/// How an array parameter is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Each occurrence is one item (`form` with `explode`, the query's default).
    Occurrences,
    /// One occurrence, items separated by this byte.
    By(char),
}

#[derive(Debug)]
struct Param {
    name: Box<str>,
    location: Location,
    required: bool,
    /// The schema, when it is checked (a parameter with `content`, or of type object, is only
    /// looked for).
    schema: Option<Id>,
    /// Its values are split into an array.
    array: Option<Split>,
    /// `deepObject` or an object: present when a `name[…]` key is.
    object: bool,
}

#[derive(Debug)]
struct Media {
    /// Lowercase media range (`application/json`, `text/*`, `*/*`).
    range: Box<str>,
    /// The schema of a JSON media type.
    schema: Option<Id>,
    json: bool,
}

#[derive(Debug)]
struct BodySpec {
    required: bool,
    media: Box<[Media]>,
}

/// One operation of the document.
#[derive(Debug)]
pub struct Operation {
    /// `POST /items/{id}`, for messages.
    pub name: Box<str>,
    /// The names of its path's `{parameters}`, in order (paths that differ only by these names
    /// share their trie nodes).
    path_names: Box<[Box<str>]>,
    params: Box<[Param]>,
    body: Option<BodySpec>,
}

/// A path template's segment: `prefix{name}suffix`, or a literal.
#[derive(Debug)]
struct Template {
    prefix: Box<str>,
    name: Box<str>,
    suffix: Box<str>,
}

#[derive(Debug, Default)]
struct PathNode {
    literal: HashMap<Box<str>, usize>,
    templates: Vec<(Template, usize)>,
    /// Operation per method ([`method_index`]).
    ops: [Option<u32>; 8],
}

const METHODS: [&str; 8] = ["GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"];

fn method_index(m: &Method) -> Option<usize> {
    METHODS.iter().position(|x| *x == m.as_str())
}

/// A compiled OpenAPI document.
#[derive(Debug)]
pub struct Validator {
    nodes: Vec<Node>,
    ops: Vec<Operation>,
    trie: Vec<PathNode>,
    /// The path of the first `servers` URL, without a trailing slash; empty: none.
    base: Box<str>,
}

/// An operation found for a request, with its path parameters' raw values.
#[derive(Debug)]
pub struct Matched<'v, 'p> {
    pub op: &'v Operation,
    /// The raw values of the path's `{parameters}`, in order.
    captures: SmallVec<[&'p str; 4]>,
}

/// What a request's method and path are in the document.
#[derive(Debug)]
pub enum Lookup<'v, 'p> {
    Found(Matched<'v, 'p>),
    /// No path of the document matches.
    NoPath,
    /// The path matches, not the method: these are allowed (for `Allow`).
    NoMethod(String),
}

/// What a route that validates checks with.
#[derive(Debug, Clone)]
pub enum RouteValidation {
    /// The API's document, compiled.
    Ready(Arc<Validator>),
    /// The route validates but has nothing to check with (its API is unknown, has no document,
    /// or one that does not compile, which the admin API refuses): every request is refused
    /// 503 `validation_unavailable` rather than forwarded unchecked. The reason is logged when
    /// the table is built, never told to clients.
    Unavailable(Arc<str>),
}

/// One thing wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub location: Location,
    /// The parameter's name (path, query, header); empty for the body.
    pub name: String,
    /// A JSON Pointer into the body or the parameter's value (`/items/0/price`); empty: the
    /// whole of it.
    pub pointer: String,
    pub message: String,
}

impl Violation {
    /// `body /items/0/price: must be at least 0`, `query parameter limit: is required`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        match self.location {
            Location::Body => s.push_str("body"),
            Location::Path => {
                let _ = write!(s, "path parameter {}", self.name);
            }
            Location::Query => {
                let _ = write!(s, "query parameter {}", self.name);
            }
            Location::Header => {
                let _ = write!(s, "header {}", self.name);
            }
        }
        if !self.pointer.is_empty() {
            s.push(' ');
            s.push_str(&self.pointer);
        }
        s.push_str(": ");
        s.push_str(&self.message);
        s
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 400: what is wrong, in order (at most [`MAX_ERRORS`]).
    Invalid(Vec<Violation>),
    /// 415: the body's media type is not one the operation takes.
    MediaType(String),
}

/// What the body of a found operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCheck {
    /// Nothing: forward it as it comes.
    None,
    /// Read it whole and check it with [`Validator::check_body`] (`required`: an empty body is
    /// refused).
    Json { schema: Option<u32>, required: bool },
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The place of a value in the body, as a chain kept on the stack (rendered only on an error).
#[derive(Clone, Copy)]
struct Ptr<'a> {
    up: Option<&'a Ptr<'a>>,
    seg: Seg<'a>,
}

#[derive(Clone, Copy)]
enum Seg<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

impl Ptr<'_> {
    fn render(&self) -> String {
        let mut segs = Vec::new();
        let mut at = Some(self);
        while let Some(p) = at {
            segs.push(p.seg);
            at = p.up;
        }
        let mut out = String::new();
        for s in segs.iter().rev() {
            match s {
                Seg::Root => {}
                Seg::Key(k) => {
                    out.push('/');
                    out.push_str(&k.replace('~', "~0").replace('/', "~1"));
                }
                Seg::Index(i) => {
                    let _ = write!(out, "/{i}");
                }
            }
            if out.len() > MAX_POINTER_CHARS * 4 {
                break;
            }
        }
        truncate(&out, MAX_POINTER_CHARS)
    }
}

// ---------------------------------------------------------------------------------------------
// Compiling.

struct Compiler<'d> {
    doc: &'d Value,
    v30: bool,
    nodes: Vec<Node>,
    refs: HashMap<&'d str, Id>,
    pending: Vec<(Id, &'d Value, String)>,
}

/// A JSON pointer (`#/components/schemas/Item`) in `doc`.
fn resolve<'d>(doc: &'d Value, r: &str) -> Option<&'d Value> {
    let p = r.strip_prefix('#')?;
    if p.is_empty() {
        return Some(doc);
    }
    let p = p.strip_prefix('/')?;
    let mut at = doc;
    for raw in p.split('/') {
        let seg = percent_decode(raw, false)?;
        let seg = seg.replace("~1", "/").replace("~0", "~");
        at = match at {
            Value::Object(m) => m.get(&seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(at)
}

fn as_u64(v: Option<&Value>) -> Option<u64> {
    v.and_then(|v| v.as_u64().or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64)))
}

impl<'d> Compiler<'d> {
    fn push(&mut self, n: Node) -> Id {
        self.nodes.push(n);
        Id::try_from(self.nodes.len() - 1).unwrap_or(Id::MAX)
    }

    /// The id of the schema a `$ref` names, compiled later (once).
    fn reference(&mut self, r: &'d str, at: &str) -> Result<Id, String> {
        if let Some(id) = self.refs.get(r) {
            return Ok(*id);
        }
        if !r.starts_with('#') {
            return Err(format!(
                "{at}: $ref {:?} is not local: only references into the document (#/…) are supported",
                truncate(r, 80)
            ));
        }
        let target = resolve(self.doc, r)
            .ok_or_else(|| format!("{at}: $ref {:?} names nothing in the document", truncate(r, 80)))?;
        let id = self.push(Node::default());
        self.refs.insert(r, id);
        self.pending.push((id, target, truncate(r, 120)));
        Ok(id)
    }

    /// Compiles the schema `s` (found at `at`) into a node.
    fn schema(&mut self, s: &'d Value, at: &str, depth: usize) -> Result<Id, String> {
        if let Some(r) = s.get("$ref").and_then(Value::as_str)
            && (self.v30 || s.as_object().is_some_and(|m| m.len() == 1))
        {
            return self.reference(r, at);
        }
        let id = self.push(Node::default());
        self.fill(id, s, at, depth)?;
        Ok(id)
    }

    fn sub(&mut self, s: &'d Value, at: &str, key: &str, depth: usize) -> Result<Id, String> {
        self.schema(s, &format!("{at}.{key}"), depth + 1)
    }

    fn list(&mut self, m: &'d Map<String, Value>, key: &str, at: &str, depth: usize) -> Result<Box<[Id]>, String> {
        let Some(v) = m.get(key) else { return Ok(Box::default()) };
        let a = v.as_array().ok_or_else(|| format!("{at}.{key}: must be an array of schemas"))?;
        a.iter().enumerate().map(|(i, s)| self.sub(s, at, &format!("{key}[{i}]"), depth)).collect()
    }

    fn fill(&mut self, id: Id, s: &'d Value, at: &str, depth: usize) -> Result<(), String> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(format!("{at}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"));
        }
        let m = match s {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => {
                if let Some(n) = self.nodes.get_mut(id as usize) {
                    n.never = true;
                }
                return Ok(());
            }
            Value::Object(m) => m,
            _ => return Err(format!("{at}: a schema is an object (or true/false)")),
        };
        let mut n = Node::default();
        let mut all_of = Vec::new();
        if let Some(r) = m.get("$ref").and_then(Value::as_str) {
            all_of.push(self.reference(r, at)?);
            if self.v30 {
                n.all_of = all_of.into();
                self.put(id, n);
                return Ok(());
            }
        }
        match m.get("type") {
            None => {}
            Some(Value::String(t)) => {
                n.types = type_bit(t).ok_or_else(|| format!("{at}.type: unknown type {:?}", truncate(t, 40)))?
            }
            Some(Value::Array(ts)) => {
                for t in ts {
                    let t = t.as_str().ok_or_else(|| format!("{at}.type: a type is a string"))?;
                    n.types |= type_bit(t).ok_or_else(|| format!("{at}.type: unknown type {:?}", truncate(t, 40)))?;
                }
            }
            Some(_) => return Err(format!("{at}.type: a string or an array of strings")),
        }
        if n.types & T_NUMBER != 0 {
            n.types |= T_INTEGER;
        }
        n.nullable = m.get("nullable").and_then(Value::as_bool).unwrap_or(false);
        n.read_only = m.get("readOnly").and_then(Value::as_bool).unwrap_or(false);
        if let Some(e) = m.get("enum") {
            let a = e.as_array().ok_or_else(|| format!("{at}.enum: must be an array"))?;
            n.enumeration = Some(a.clone().into_boxed_slice());
        }
        n.constant = m.get("const").cloned();
        let num = |k: &str| -> Result<Option<f64>, String> {
            match m.get(k) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("{at}.{k}: must be a number")),
            }
        };
        let bounds = |bound: Option<f64>, k: &str| -> Result<(Bound, Bound), String> {
            // 3.0: `exclusiveMinimum: true` makes `minimum` exclusive; 3.1: a bound of its own.
            match m.get(k) {
                Some(Value::Bool(b)) => Ok((bound.map(|x| (x, *b)), None)),
                Some(v) => {
                    let x = v.as_f64().ok_or_else(|| format!("{at}.{k}: must be a number or a boolean"))?;
                    Ok((bound.map(|x| (x, false)), Some((x, true))))
                }
                None => Ok((bound.map(|x| (x, false)), None)),
            }
        };
        let (min, xmin) = bounds(num("minimum")?, "exclusiveMinimum")?;
        n.minimum = tighter(min, xmin, true);
        let (max, xmax) = bounds(num("maximum")?, "exclusiveMaximum")?;
        n.maximum = tighter(max, xmax, false);
        n.multiple_of = num("multipleOf")?.filter(|x| *x > 0.0 && x.is_finite());
        n.min_length = as_u64(m.get("minLength"));
        n.max_length = as_u64(m.get("maxLength"));
        if let Some(p) = m.get("pattern") {
            let p = p.as_str().ok_or_else(|| format!("{at}.pattern: must be a string"))?;
            let re = regex::RegexBuilder::new(p)
                .size_limit(PATTERN_SIZE_LIMIT)
                .dfa_size_limit(PATTERN_SIZE_LIMIT)
                .build()
                .map_err(|e| {
                    let first = e.to_string();
                    let first = first.lines().last().unwrap_or_default().trim().to_owned();
                    format!(
                        "{at}.pattern {:?} cannot be used (keygate's patterns are the regex crate's syntax, without look-around or back-references): {}",
                        truncate(p, 80),
                        truncate(&first, 120)
                    )
                })?;
            n.pattern = Some(Box::new((re, truncate(p, 80).into())));
        }
        n.format = m.get("format").and_then(Value::as_str).and_then(Format::of);
        if let Some(items) = m.get("items") {
            n.items = Some(self.sub(items, at, "items", depth)?);
        }
        n.min_items = as_u64(m.get("minItems"));
        n.max_items = as_u64(m.get("maxItems"));
        n.unique_items = m.get("uniqueItems").and_then(Value::as_bool).unwrap_or(false);
        if let Some(props) = m.get("properties") {
            let props = props.as_object().ok_or_else(|| format!("{at}.properties: must be an object"))?;
            let mut out = Vec::with_capacity(props.len());
            for (k, v) in props {
                out.push((
                    Box::<str>::from(k.as_str()),
                    self.sub(v, at, &format!("properties.{}", truncate(k, 40)), depth)?,
                ));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            n.properties = out.into();
        }
        if let Some(r) = m.get("required") {
            let r = r.as_array().ok_or_else(|| format!("{at}.required: must be an array of names"))?;
            n.required = r.iter().filter_map(Value::as_str).map(Box::from).collect();
        }
        n.additional = match m.get("additionalProperties") {
            None | Some(Value::Bool(true)) => Additional::Any,
            Some(Value::Bool(false)) => Additional::Deny,
            Some(s) => Additional::Schema(self.sub(s, at, "additionalProperties", depth)?),
        };
        n.min_properties = as_u64(m.get("minProperties"));
        n.max_properties = as_u64(m.get("maxProperties"));
        all_of.extend(self.list(m, "allOf", at, depth)?.iter().copied());
        n.all_of = all_of.into();
        n.any_of = self.list(m, "anyOf", at, depth)?;
        n.one_of = self.list(m, "oneOf", at, depth)?;
        if let Some(s) = m.get("not") {
            n.not = Some(self.sub(s, at, "not", depth)?);
        }
        self.put(id, n);
        Ok(())
    }

    fn put(&mut self, id: Id, n: Node) {
        if let Some(slot) = self.nodes.get_mut(id as usize) {
            *slot = n;
        }
    }

    /// Compiles the schemas `$ref`s named, until none is left.
    fn finish_refs(&mut self) -> Result<(), String> {
        while let Some((id, s, at)) = self.pending.pop() {
            self.fill(id, s, &at, 0)?;
        }
        Ok(())
    }

    /// A `$ref` (of a parameter, request body or path item) followed to what it names.
    fn follow(&self, mut v: &'d Value, at: &str) -> Result<&'d Value, String> {
        for _ in 0..MAX_REF_HOPS {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else { return Ok(v) };
            v = resolve(self.doc, r)
                .ok_or_else(|| format!("{at}: $ref {:?} names nothing in the document", truncate(r, 80)))?;
        }
        Err(format!("{at}: more than {MAX_REF_HOPS} $refs in a row"))
    }

    fn param(&mut self, p: &'d Value, at: &str) -> Result<Param, String> {
        let p = self.follow(p, at)?;
        let name = p.get("name").and_then(Value::as_str).ok_or_else(|| format!("{at}: a parameter has a name"))?;
        let location = match p.get("in").and_then(Value::as_str) {
            Some("path") => Location::Path,
            Some("query") => Location::Query,
            Some("header") => Location::Header,
            Some("cookie") => Location::Body, // marker: ignored by the caller
            _ => return Err(format!("{at}: parameter {:?} has no valid \"in\"", truncate(name, 40))),
        };
        let at = format!("{at}({})", truncate(name, 40));
        let required = location == Location::Path || p.get("required").and_then(Value::as_bool).unwrap_or(false);
        let schema = match p.get("schema") {
            Some(s) => Some(self.schema(s, &format!("{at}.schema"), 0)?),
            None => None,
        };
        let style = p.get("style").and_then(Value::as_str);
        let explode = p
            .get("explode")
            .and_then(Value::as_bool)
            .unwrap_or(matches!(style, None | Some("form")) && location == Location::Query);
        let array = match style {
            Some("spaceDelimited") => Some(Split::By(' ')),
            Some("pipeDelimited") => Some(Split::By('|')),
            _ if location == Location::Query && explode => Some(Split::Occurrences),
            _ => Some(Split::By(',')),
        };
        Ok(Param {
            name: if location == Location::Header { name.to_ascii_lowercase().into() } else { name.into() },
            location,
            required,
            schema,
            array,
            object: style == Some("deepObject"),
        })
    }

    fn body(&mut self, b: &'d Value, at: &str) -> Result<BodySpec, String> {
        let b = self.follow(b, at)?;
        let required = b.get("required").and_then(Value::as_bool).unwrap_or(false);
        let mut media = Vec::new();
        if let Some(content) = b.get("content").and_then(Value::as_object) {
            for (range, m) in content {
                let range = range.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
                let json = is_json(&range);
                let schema = match m.get("schema") {
                    Some(s) if json => {
                        Some(self.schema(s, &format!("{at}.content.{}.schema", truncate(&range, 40)), 0)?)
                    }
                    _ => None,
                };
                media.push(Media { range: range.into(), schema, json });
            }
        }
        Ok(BodySpec { required, media: media.into() })
    }

    /// Refuses a cycle of schemas that apply to the same value (`allOf`, `anyOf`, `oneOf`, `not`,
    /// `$ref`) without going into a property or an item: it would never end.
    fn check_cycles(&self) -> Result<(), String> {
        // 0: not seen, 1: on the stack, 2: done.
        let mut mark = vec![0u8; self.nodes.len()];
        let edges = |n: &Node| -> Vec<Id> {
            n.all_of.iter().chain(n.any_of.iter()).chain(n.one_of.iter()).chain(n.not.iter()).copied().collect()
        };
        for start in 0..self.nodes.len() {
            if mark.get(start) != Some(&0) {
                continue;
            }
            let mut stack: Vec<(usize, Vec<Id>)> = vec![(start, self.nodes.get(start).map(edges).unwrap_or_default())];
            if let Some(m) = mark.get_mut(start) {
                *m = 1;
            }
            while let Some((node, next)) = stack.last_mut() {
                let node = *node;
                match next.pop() {
                    Some(to) => {
                        let to = to as usize;
                        match mark.get(to) {
                            Some(0) => {
                                if let Some(m) = mark.get_mut(to) {
                                    *m = 1;
                                }
                                stack.push((to, self.nodes.get(to).map(edges).unwrap_or_default()));
                            }
                            Some(1) => {
                                let name = self
                                    .refs
                                    .iter()
                                    .find(|(_, id)| **id as usize == to || **id as usize == node)
                                    .map(|(r, _)| *r)
                                    .unwrap_or("a schema");
                                return Err(format!(
                                    "{}: the schema refers to itself (allOf, anyOf, oneOf, not or $ref) without going into a property or an item",
                                    truncate(name, 120)
                                ));
                            }
                            _ => {}
                        }
                    }
                    None => {
                        if let Some(m) = mark.get_mut(node) {
                            *m = 2;
                        }
                        stack.pop();
                    }
                }
            }
        }
        Ok(())
    }
}

/// The tighter of an inclusive and an exclusive bound.
fn tighter(a: Option<(f64, bool)>, b: Option<(f64, bool)>, lower: bool) -> Option<(f64, bool)> {
    match (a, b) {
        (Some(x), Some(y)) => {
            let pick_y = if lower { y.0 >= x.0 } else { y.0 <= x.0 };
            Some(if pick_y { y } else { x })
        }
        (x, None) => x,
        (None, y) => y,
    }
}

fn type_bit(t: &str) -> Option<u8> {
    TYPE_NAMES.iter().find(|(_, n)| *n == t).map(|(b, _)| *b)
}

fn is_json(range: &str) -> bool {
    range == "application/json" || (range.starts_with("application/") && range.ends_with("+json"))
}

/// The path of a server URL (`https://h/v1` → `/v1`), its variables given their defaults.
fn server_base(doc: &Value) -> String {
    let Some(server) = doc.get("servers").and_then(Value::as_array).and_then(|s| s.first()) else {
        return String::new();
    };
    let Some(url) = server.get("url").and_then(Value::as_str) else { return String::new() };
    let mut url = url.to_owned();
    if let Some(vars) = server.get("variables").and_then(Value::as_object) {
        for (k, v) in vars {
            if let Some(d) = v.get("default").and_then(Value::as_str) {
                url = url.replace(&format!("{{{k}}}"), d);
            }
        }
    }
    let path = match url.find("://") {
        Some(i) => url.get(i + 3..).and_then(|rest| rest.find('/').map(|j| &rest[j..])).unwrap_or(""),
        None if url.starts_with("//") => url.get(2..).and_then(|rest| rest.find('/').map(|j| &rest[j..])).unwrap_or(""),
        None => url.as_str(),
    };
    let path = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
    if !path.starts_with('/') || path.contains('{') {
        return String::new();
    }
    path.to_owned()
}

fn parse_template(seg: &str, at: &str) -> Result<Option<Template>, String> {
    let Some(open) = seg.find('{') else {
        if seg.contains('}') {
            return Err(format!("{at}: a path segment has a '}}' without '{{'"));
        }
        return Ok(None);
    };
    let close =
        seg.find('}').filter(|c| *c > open).ok_or_else(|| format!("{at}: a path segment has a '{{' without '}}'"))?;
    let (prefix, name, suffix) = (&seg[..open], &seg[open + 1..close], &seg[close + 1..]);
    if name.is_empty() || suffix.contains(['{', '}']) {
        return Err(format!("{at}: keygate takes one {{parameter}} per path segment, named"));
    }
    Ok(Some(Template { prefix: prefix.into(), name: name.into(), suffix: suffix.into() }))
}

impl Validator {
    /// Compiles an OpenAPI document (JSON text). The error says what and where.
    pub fn compile(text: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("the OpenAPI document is not JSON: {e}"))?;
        let version = doc.get("openapi").and_then(Value::as_str).unwrap_or_default();
        if !version.starts_with("3.") {
            return Err("the document is not an OpenAPI 3.0 or 3.1 document (its \"openapi\" field)".into());
        }
        let mut c = Compiler {
            doc: &doc,
            v30: version.starts_with("3.0"),
            nodes: Vec::new(),
            refs: HashMap::new(),
            pending: Vec::new(),
        };
        let mut ops = Vec::new();
        let mut trie = vec![PathNode::default()];
        let paths = match doc.get("paths") {
            None => None,
            Some(p) => Some(p.as_object().ok_or("paths: must be an object")?),
        };
        for (template, item) in paths.into_iter().flatten() {
            let at = format!("paths.{}", truncate(template, 80));
            let rest = template.strip_prefix('/').ok_or_else(|| format!("{at}: a path starts with '/'"))?;
            let item = c.follow(item, &at)?;
            let item = item.as_object().ok_or_else(|| format!("{at}: a path item is an object"))?;
            // The trie node of this template.
            let mut node = 0usize;
            let segs: Vec<&str> = rest.split('/').collect();
            if segs.len() > MAX_TEMPLATE_SEGMENTS {
                return Err(format!("{at}: more than {MAX_TEMPLATE_SEGMENTS} segments"));
            }
            let mut names = Vec::new();
            for seg in segs {
                let next = match parse_template(seg, &at)? {
                    None => trie.get(node).and_then(|n| n.literal.get(seg).copied()),
                    Some(t) => {
                        names.push(t.name.clone());
                        trie.get(node).and_then(|n| {
                            n.templates
                                .iter()
                                .find(|(x, _)| x.prefix == t.prefix && x.suffix == t.suffix)
                                .map(|(_, i)| *i)
                        })
                    }
                };
                node = match next {
                    Some(i) => i,
                    None => {
                        trie.push(PathNode::default());
                        let i = trie.len() - 1;
                        let Some(parent) = trie.get_mut(node) else { return Err("internal: the path trie".into()) };
                        match parse_template(seg, &at)? {
                            None => {
                                parent.literal.insert(seg.into(), i);
                            }
                            Some(t) => parent.templates.push((t, i)),
                        }
                        i
                    }
                };
            }
            let shared: Vec<&Value> =
                item.get("parameters").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
            for (mi, method) in METHODS.iter().enumerate() {
                let Some(op) = item.get(&method.to_ascii_lowercase()) else { continue };
                let oat = format!("{at}.{}", method.to_ascii_lowercase());
                let mut params: Vec<Param> = Vec::new();
                let own: Vec<&Value> =
                    op.get("parameters").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
                for (i, p) in shared.iter().chain(own.iter()).enumerate() {
                    let p = c.param(p, &format!("{oat}.parameters[{i}]"))?;
                    if p.location == Location::Body {
                        continue; // a cookie: not checked
                    }
                    if p.location == Location::Header && matches!(&*p.name, "accept" | "content-type" | "authorization")
                    {
                        continue; // OpenAPI: these are ignored
                    }
                    // An operation's parameter replaces the path item's of the same name and place.
                    params.retain(|q| !(q.name == p.name && q.location == p.location));
                    params.push(p);
                }
                for p in &params {
                    if p.location == Location::Path && !names.iter().any(|n| **n == *p.name) {
                        return Err(format!("{oat}: path parameter {:?} is not in the path", truncate(&p.name, 40)));
                    }
                }
                for n in &names {
                    if !params.iter().any(|p| p.location == Location::Path && p.name == *n) {
                        params.push(Param {
                            name: n.clone(),
                            location: Location::Path,
                            required: true,
                            schema: None,
                            array: None,
                            object: false,
                        });
                    }
                }
                let body = match op.get("requestBody") {
                    Some(b) => Some(c.body(b, &format!("{oat}.requestBody"))?),
                    None => None,
                };
                ops.push(Operation {
                    name: format!("{method} {}", truncate(template, 120)).into(),
                    path_names: names.clone().into(),
                    params: params.into(),
                    body,
                });
                let oi = u32::try_from(ops.len() - 1).map_err(|_| "too many operations")?;
                if let Some(slot) = trie.get_mut(node).and_then(|n| n.ops.get_mut(mi)) {
                    *slot = Some(oi);
                }
            }
        }
        c.finish_refs()?;
        c.check_cycles()?;
        // Parameters' item kinds, now that every schema is compiled.
        let nodes = c.nodes;
        let mut v = Validator { nodes, ops: Vec::new(), trie, base: server_base(&doc).into() };
        for op in &mut ops {
            let params = std::mem::take(&mut op.params);
            op.params = params
                .into_vec()
                .into_iter()
                .map(|mut p| {
                    let types = p.schema.map_or(0, |s| v.types_of(s, 0));
                    if types & T_ARRAY == 0 {
                        p.array = None;
                    }
                    if types & T_OBJECT != 0 && types & !T_OBJECT & !T_NULL == 0 {
                        p.object = true;
                    }
                    p
                })
                .collect();
        }
        v.ops = ops;
        Ok(v)
    }

    /// The types a schema allows, looking through `allOf` (and `$ref`) when it says none itself.
    fn types_of(&self, id: Id, depth: usize) -> u8 {
        let Some(n) = self.nodes.get(id as usize) else { return 0 };
        if n.types != 0 || depth > 8 {
            return n.types;
        }
        n.all_of.iter().map(|s| self.types_of(*s, depth + 1)).find(|t| *t != 0).unwrap_or(0)
    }

    /// How many operations the document has.
    pub fn operations(&self) -> usize {
        self.ops.len()
    }

    /// The operation `method` `path` is: `path` is the one the upstream receives (see the
    /// module's header); the document's server path is taken off here.
    pub fn find<'v, 'p>(&'v self, method: &Method, path: &'p str) -> Lookup<'v, 'p> {
        let mut path = path;
        if !self.base.is_empty()
            && let Some(rest) = path.strip_prefix(&*self.base)
            && (rest.is_empty() || rest.starts_with('/'))
        {
            path = if rest.is_empty() { "/" } else { rest };
        }
        let rest = path.strip_prefix('/').unwrap_or(path);
        let segs: SmallVec<[&str; 16]> = rest.split('/').collect();
        let mut captures = SmallVec::new();
        let Some(node) = self.walk(0, &segs, &mut captures) else { return Lookup::NoPath };
        let Some(n) = self.trie.get(node) else { return Lookup::NoPath };
        let mut mi = method_index(method);
        // HEAD is GET without a body.
        if mi == Some(5) && n.ops[5].is_none() {
            mi = Some(0);
        }
        match mi.and_then(|i| n.ops.get(i).copied().flatten()).and_then(|o| self.ops.get(o as usize)) {
            Some(op) => Lookup::Found(Matched { op, captures }),
            None => {
                let allow: Vec<&str> =
                    METHODS.iter().zip(n.ops.iter()).filter(|(_, o)| o.is_some()).map(|(m, _)| *m).collect();
                Lookup::NoMethod(allow.join(", "))
            }
        }
    }

    /// The trie node the segments lead to from `node` that has an operation, literal segments
    /// first; each trie node is tried at most once.
    fn walk<'p>(&self, node: usize, segs: &[&'p str], caps: &mut SmallVec<[&'p str; 4]>) -> Option<usize> {
        let n = self.trie.get(node)?;
        let Some((first, rest)) = segs.split_first() else {
            return n.ops.iter().any(Option::is_some).then_some(node);
        };
        if let Some(next) = n.literal.get(*first)
            && let Some(found) = self.walk(*next, rest, caps)
        {
            return Some(found);
        }
        for (t, next) in &n.templates {
            let Some(v) = first.strip_prefix(&*t.prefix).and_then(|v| v.strip_suffix(&*t.suffix)) else { continue };
            if v.is_empty() {
                continue;
            }
            caps.push(v);
            if let Some(found) = self.walk(*next, rest, caps) {
                return Some(found);
            }
            caps.pop();
        }
        None
    }

    /// Checks the path, query and header parameters of a found operation. `header` gives every
    /// value of a header field (by its lowercase name).
    pub fn check_params<'h>(
        &self,
        m: &Matched<'_, '_>,
        query: Option<&str>,
        header: &dyn Fn(&str) -> SmallVec<[&'h [u8]; 2]>,
    ) -> Result<(), Rejection> {
        let mut run = Run::new(self);
        for p in m.op.params.iter() {
            if run.full() {
                break;
            }
            let mut values: SmallVec<[Cow<'_, str>; 2]> = SmallVec::new();
            let mut present = false;
            match p.location {
                Location::Path => {
                    let at = m.op.path_names.iter().position(|n| *n == p.name);
                    if let Some(raw) = at.and_then(|i| m.captures.get(i)) {
                        present = true;
                        match percent_decode(raw, false) {
                            Some(v) => values.push(v),
                            None => {
                                run.param_error(p, "", "is not valid UTF-8 once percent-decoded".into());
                                continue;
                            }
                        }
                    }
                }
                Location::Query => {
                    for pair in query.unwrap_or_default().split('&') {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        let Some(k) = percent_decode(k, true) else { continue };
                        if *k == *p.name {
                            present = true;
                            match percent_decode(v, true) {
                                Some(v) => values.push(v),
                                None => run.param_error(p, "", "is not valid UTF-8 once percent-decoded".into()),
                            }
                        } else if p.object
                            && k.starts_with(&*p.name)
                            && k.get(p.name.len()..).is_some_and(|r| r.starts_with('['))
                        {
                            present = true;
                        }
                    }
                }
                Location::Header => {
                    for v in header(&p.name) {
                        present = true;
                        match std::str::from_utf8(v) {
                            Ok(s) => values.push(Cow::Borrowed(s.trim())),
                            Err(_) => run.param_error(p, "", "is not text".into()),
                        }
                    }
                }
                Location::Body => {}
            }
            if !present {
                if p.required {
                    run.param_error(p, "", "is required".into());
                }
                continue;
            }
            let Some(schema) = p.schema.filter(|_| !p.object) else { continue };
            match p.array {
                Some(split) => {
                    let item_types =
                        self.nodes.get(schema as usize).and_then(|n| n.items).map_or(0, |i| self.types_of(i, 0));
                    let mut items = Vec::new();
                    let mut bad = false;
                    let mut each = |raw: &str, items: &mut Vec<Value>, run: &mut Run<'_>| match coerce(raw, item_types)
                    {
                        Ok(v) => items.push(v),
                        Err(msg) => {
                            let ptr = format!("/{}", items.len());
                            run.param_error(p, &ptr, msg.into());
                            bad = true;
                        }
                    };
                    match split {
                        Split::Occurrences => {
                            for v in &values {
                                each(v, &mut items, &mut run);
                            }
                        }
                        Split::By(c) => {
                            if let Some(v) = values.first().filter(|v| !v.is_empty()) {
                                for raw in v.split(c) {
                                    each(raw, &mut items, &mut run);
                                }
                            }
                        }
                    }
                    if !bad {
                        run.check_param(p, schema, &Value::Array(items));
                    }
                }
                None => {
                    let types = self.types_of(schema, 0);
                    for v in &values {
                        match coerce(v, types) {
                            Ok(value) => run.check_param(p, schema, &value),
                            Err(msg) => run.param_error(p, "", msg.into()),
                        }
                    }
                }
            }
        }
        run.finish()
    }

    /// What the body of a found operation needs, from its `Content-Type` and whether it has one.
    pub fn body_check(
        &self,
        m: &Matched<'_, '_>,
        content_type: Option<&[u8]>,
        has_body: bool,
    ) -> Result<BodyCheck, Rejection> {
        let Some(spec) = &m.op.body else { return Ok(BodyCheck::None) };
        if spec.media.is_empty() {
            return Ok(BodyCheck::None);
        }
        if !has_body {
            return if spec.required {
                Err(Rejection::Invalid(vec![Violation {
                    location: Location::Body,
                    name: String::new(),
                    pointer: String::new(),
                    message: "a request body is required".into(),
                }]))
            } else {
                Ok(BodyCheck::None)
            };
        }
        let takes = || spec.media.iter().map(|m| &*m.range).collect::<Vec<_>>().join(", ");
        let Some(ct) = content_type else {
            return Err(Rejection::MediaType(format!(
                "the request body has no Content-Type; {} takes {}",
                m.op.name,
                truncate(&takes(), 200)
            )));
        };
        let ct = String::from_utf8_lossy(ct);
        let ct = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        let major = ct.split('/').next().unwrap_or_default();
        let found = spec
            .media
            .iter()
            .find(|x| *x.range == *ct)
            .or_else(|| spec.media.iter().find(|x| x.range.strip_suffix("/*") == Some(major)))
            .or_else(|| spec.media.iter().find(|x| &*x.range == "*/*"));
        match found {
            Some(media) if media.json => Ok(BodyCheck::Json { schema: media.schema, required: spec.required }),
            Some(_) => Ok(BodyCheck::None),
            None => Err(Rejection::MediaType(format!(
                "{} takes {}, not {}",
                m.op.name,
                truncate(&takes(), 200),
                truncate(&ct, 60)
            ))),
        }
    }

    /// Checks a body read whole (`bytes`) for [`BodyCheck::Json`].
    pub fn check_body(&self, schema: Option<u32>, required: bool, bytes: &[u8]) -> Result<(), Rejection> {
        if bytes.is_empty() {
            if required {
                return Err(Rejection::Invalid(vec![Violation {
                    location: Location::Body,
                    name: String::new(),
                    pointer: String::new(),
                    message: "a request body is required".into(),
                }]));
            }
            return Ok(());
        }
        let Some(schema) = schema else { return Ok(()) };
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            Rejection::Invalid(vec![Violation {
                location: Location::Body,
                name: String::new(),
                pointer: String::new(),
                message: truncate(&format!("is not valid JSON: {e}"), MAX_MESSAGE_CHARS),
            }])
        })?;
        self.check_value(schema, &value)
    }

    /// Checks a JSON value with a schema, as a body.
    pub fn check_value(&self, schema: u32, value: &Value) -> Result<(), Rejection> {
        let mut run = Run::new(self);
        run.location = Location::Body;
        let root = Ptr { up: None, seg: Seg::Root };
        run.check(schema, value, &root, 0, true);
        run.finish()
    }

    /// The schema of a found operation's JSON body of media type `application/json` (tests,
    /// benchmarks).
    pub fn json_schema(&self, m: &Matched<'_, '_>) -> Option<u32> {
        m.op.body.as_ref()?.media.iter().find(|x| x.json).and_then(|x| x.schema)
    }
}

/// A parameter's text as the JSON value its schema's types ask for.
fn coerce(raw: &str, types: u8) -> Result<Value, &'static str> {
    if types == 0 {
        return Ok(Value::String(raw.to_owned()));
    }
    if types & T_INTEGER != 0 {
        if let Ok(i) = raw.parse::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = raw.parse::<u64>() {
            return Ok(Value::from(u));
        }
    }
    if types & T_NUMBER != 0
        && let Ok(f) = raw.parse::<f64>()
        && f.is_finite()
        && let Some(n) = serde_json::Number::from_f64(f)
    {
        return Ok(Value::Number(n));
    }
    if types & T_BOOLEAN != 0 {
        match raw {
            "true" => return Ok(Value::Bool(true)),
            "false" => return Ok(Value::Bool(false)),
            _ => {}
        }
    }
    if types & T_STRING != 0 {
        return Ok(Value::String(raw.to_owned()));
    }
    if types & T_NULL != 0 && raw.is_empty() {
        return Ok(Value::Null);
    }
    Err(if types & T_NUMBER != 0 {
        "must be a number"
    } else if types & T_INTEGER != 0 {
        "must be an integer"
    } else if types & T_BOOLEAN != 0 {
        "must be true or false"
    } else {
        "cannot be read as the type its schema says"
    })
}

/// Percent-decodes `s` (and `+` as a space, in a query); `None`: not UTF-8 once decoded.
fn percent_decode(s: &str, plus: bool) -> Option<Cow<'_, str>> {
    if !(s.contains('%') || (plus && s.contains('+'))) {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = |j: usize| b.get(j).and_then(|h| char::from(*h).to_digit(16));
        match c {
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                    i += 3;
                    continue;
                }
                _ => out.push(c),
            },
            b'+' if plus => out.push(b' '),
            _ => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

// ---------------------------------------------------------------------------------------------
// Validating.

struct Run<'v> {
    v: &'v Validator,
    steps: u32,
    errors: Vec<Violation>,
    location: Location,
    name: &'v str,
    over: bool,
}

impl<'v> Run<'v> {
    fn new(v: &'v Validator) -> Self {
        Self { v, steps: 0, errors: Vec::new(), location: Location::Body, name: "", over: false }
    }

    fn full(&self) -> bool {
        self.errors.len() >= MAX_ERRORS || self.over
    }

    fn finish(self) -> Result<(), Rejection> {
        let mut errors = self.errors;
        if self.over {
            errors.push(Violation {
                location: self.location,
                name: self.name.to_owned(),
                pointer: String::new(),
                message: format!("is too complex to check against its schema (more than {MAX_STEPS} checks)"),
            });
        }
        if errors.is_empty() { Ok(()) } else { Err(Rejection::Invalid(errors)) }
    }

    fn param_error(&mut self, p: &Param, pointer: &str, message: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(Violation {
                location: p.location,
                name: truncate(&p.name, MAX_POINTER_CHARS),
                pointer: pointer.to_owned(),
                message,
            });
        }
    }

    fn check_param(&mut self, p: &'v Param, schema: Id, value: &Value) {
        self.location = p.location;
        self.name = &p.name;
        let root = Ptr { up: None, seg: Seg::Root };
        self.check(schema, value, &root, 0, true);
    }

    fn error(&mut self, at: &Ptr<'_>, message: String, collect: bool) {
        if collect && self.errors.len() < MAX_ERRORS {
            self.errors.push(Violation {
                location: self.location,
                name: self.name.to_owned(),
                pointer: at.render(),
                message: truncate(&message, MAX_MESSAGE_CHARS),
            });
        }
    }

    /// Whether `value` (at `at`, `depth` deep) matches schema `id`; when `collect`, what does not
    /// is added to the errors (all of it, up to [`MAX_ERRORS`]), else the first mismatch ends it.
    fn check(&mut self, id: Id, value: &Value, at: &Ptr<'_>, depth: usize, collect: bool) -> bool {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            self.over = true;
            return false;
        }
        if self.full() && collect {
            return false;
        }
        let Some(n) = self.v.nodes.get(id as usize) else { return true };
        if n.never {
            self.error(at, "is not allowed here".into(), collect);
            return false;
        }
        if value.is_null() && n.nullable {
            return true;
        }
        let mut ok = true;
        macro_rules! fail {
            ($msg:expr) => {{
                ok = false;
                if !collect {
                    return false;
                }
                self.error(at, $msg, collect);
            }};
        }
        if n.types != 0 && !type_ok(n.types, value) {
            let names: Vec<&str> = TYPE_NAMES
                .iter()
                .filter(|(b, _)| n.types & b != 0 && !(*b == T_INTEGER && n.types & T_NUMBER != 0))
                .map(|(_, s)| *s)
                .collect();
            let article =
                if names.len() == 1 && matches!(names.first(), Some(&"integer") | Some(&"array") | Some(&"object")) {
                    "an"
                } else {
                    "a"
                };
            self.error(at, format!("must be {article} {}", names.join(" or ")), collect);
            return false;
        }
        if let Some(c) = &n.constant
            && c != value
        {
            fail!(format!("must be {}", truncate(&c.to_string(), 60)));
        }
        if let Some(e) = &n.enumeration
            && !e.iter().any(|x| x == value)
        {
            let list: Vec<String> = e.iter().take(10).map(|x| x.to_string()).collect();
            let more = if e.len() > 10 { ", …" } else { "" };
            fail!(format!("must be one of {}{more}", list.join(", ")));
        }
        match value {
            Value::Number(num) => {
                let x = num.as_f64().unwrap_or(0.0);
                if let Some((b, excl)) = n.minimum
                    && (x < b || (excl && x <= b))
                {
                    fail!(if excl { format!("must be greater than {b}") } else { format!("must be at least {b}") });
                }
                if let Some((b, excl)) = n.maximum
                    && (x > b || (excl && x >= b))
                {
                    fail!(if excl { format!("must be less than {b}") } else { format!("must be at most {b}") });
                }
                if let Some(m) = n.multiple_of {
                    let q = x / m;
                    if !q.is_finite() || (q - q.round()).abs() > 1e-9 {
                        fail!(format!("must be a multiple of {m}"));
                    }
                }
                match n.format {
                    Some(Format::Int32) if num.as_i64().is_none_or(|i| i32::try_from(i).is_err()) => {
                        fail!(format!("must be a {}", Format::Int32.name()))
                    }
                    Some(Format::Int64) if num.as_i64().is_none() => {
                        fail!(format!("must be a {}", Format::Int64.name()))
                    }
                    _ => {}
                }
            }
            Value::String(s) => {
                if n.min_length.is_some() || n.max_length.is_some() {
                    let len = s.chars().count() as u64;
                    if let Some(min) = n.min_length
                        && len < min
                    {
                        fail!(format!("must be at least {min} characters long"));
                    }
                    if let Some(max) = n.max_length
                        && len > max
                    {
                        fail!(format!("must be at most {max} characters long"));
                    }
                }
                if let Some(p) = &n.pattern
                    && !p.0.is_match(s)
                {
                    fail!(format!("must match the pattern {}", p.1));
                }
                if let Some(f) = n.format
                    && !format_ok(f, s)
                {
                    fail!(format!("must be a {}", f.name()));
                }
            }
            Value::Array(items) => {
                let len = items.len() as u64;
                if let Some(min) = n.min_items
                    && len < min
                {
                    fail!(format!("must have at least {min} items"));
                }
                if let Some(max) = n.max_items
                    && len > max
                {
                    fail!(format!("must have at most {max} items"));
                }
                if n.unique_items && items.len() > 1 && !unique(items) {
                    fail!("must not have two equal items".into());
                }
                if let Some(schema) = n.items {
                    if depth >= MAX_BODY_DEPTH {
                        self.error(at, format!("nests deeper than {MAX_BODY_DEPTH} levels"), collect);
                        return false;
                    }
                    for (i, item) in items.iter().enumerate() {
                        let p = Ptr { up: Some(at), seg: Seg::Index(i) };
                        if !self.check(schema, item, &p, depth + 1, collect) {
                            ok = false;
                            if !collect || self.full() {
                                return false;
                            }
                        }
                    }
                }
            }
            Value::Object(obj) => {
                let len = obj.len() as u64;
                if let Some(min) = n.min_properties
                    && len < min
                {
                    fail!(format!("must have at least {min} properties"));
                }
                if let Some(max) = n.max_properties
                    && len > max
                {
                    fail!(format!("must have at most {max} properties"));
                }
                for r in n.required.iter() {
                    if !obj.contains_key(&**r) && !self.read_only(n, r) {
                        ok = false;
                        if !collect {
                            return false;
                        }
                        let p = Ptr { up: Some(at), seg: Seg::Key(r) };
                        self.error(&p, "is required".into(), collect);
                    }
                }
                if !n.properties.is_empty() || !matches!(n.additional, Additional::Any) {
                    if depth >= MAX_BODY_DEPTH {
                        self.error(at, format!("nests deeper than {MAX_BODY_DEPTH} levels"), collect);
                        return false;
                    }
                    for (k, v) in obj {
                        let p = Ptr { up: Some(at), seg: Seg::Key(k) };
                        let schema = match n.properties.binary_search_by(|(name, _)| (**name).cmp(k.as_str())) {
                            Ok(i) => n.properties.get(i).map(|(_, s)| *s),
                            Err(_) => match n.additional {
                                Additional::Any => None,
                                Additional::Deny => {
                                    ok = false;
                                    if !collect {
                                        return false;
                                    }
                                    self.error(&p, "is not a property this object may have".into(), collect);
                                    None
                                }
                                Additional::Schema(s) => Some(s),
                            },
                        };
                        if let Some(s) = schema
                            && !self.check(s, v, &p, depth + 1, collect)
                        {
                            ok = false;
                            if !collect || self.full() {
                                return false;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        for s in n.all_of.iter() {
            if !self.check(*s, value, at, depth, collect) {
                ok = false;
                if !collect {
                    return false;
                }
            }
        }
        if !n.any_of.is_empty() && !n.any_of.iter().any(|s| self.check(*s, value, at, depth, false)) {
            fail!(format!("must match at least one of the {} schemas of anyOf", n.any_of.len()));
        }
        if !n.one_of.is_empty() {
            let mut matches = 0;
            for s in n.one_of.iter() {
                if self.check(*s, value, at, depth, false) {
                    matches += 1;
                    if matches > 1 {
                        break;
                    }
                }
            }
            if matches == 0 {
                fail!(format!("must match exactly one of the {} schemas of oneOf (it matches none)", n.one_of.len()));
            } else if matches > 1 {
                fail!(format!(
                    "must match exactly one of the {} schemas of oneOf (it matches more than one)",
                    n.one_of.len()
                ));
            }
        }
        if let Some(s) = n.not
            && self.check(s, value, at, depth, false)
        {
            fail!("must not match the schema of not".into());
        }
        if self.over {
            return false;
        }
        ok
    }

    /// Whether property `name` of `n` is `readOnly` (not sent in requests).
    fn read_only(&self, n: &Node, name: &str) -> bool {
        let Ok(i) = n.properties.binary_search_by(|(p, _)| (**p).cmp(name)) else { return false };
        let Some((_, id)) = n.properties.get(i) else { return false };
        let Some(p) = self.v.nodes.get(*id as usize) else { return false };
        p.read_only || p.all_of.iter().any(|s| self.v.nodes.get(*s as usize).is_some_and(|x| x.read_only))
    }
}

fn type_ok(types: u8, v: &Value) -> bool {
    let bit = match v {
        Value::Null => T_NULL,
        Value::Bool(_) => T_BOOLEAN,
        Value::Number(n) => {
            let integral = n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0);
            if integral { T_INTEGER } else { T_NUMBER }
        }
        Value::String(_) => T_STRING,
        Value::Array(_) => T_ARRAY,
        Value::Object(_) => T_OBJECT,
    };
    types & bit != 0
}

/// Whether no two items are equal (quadratic over at most a few thousand items; above that,
/// items are compared by their JSON text).
fn unique(items: &[Value]) -> bool {
    if items.len() <= 64 {
        return items.iter().enumerate().all(|(i, a)| items.iter().skip(i + 1).all(|b| a != b));
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    items.iter().all(|v| seen.insert(v.to_string()))
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

fn date_ok(s: &str) -> bool {
    let mut p = s.split('-');
    let (Some(y), Some(m), Some(d), None) = (p.next(), p.next(), p.next(), p.next()) else { return false };
    digits(y, 4)
        && digits(m, 2)
        && digits(d, 2)
        && (1..=12).contains(&m.parse::<u8>().unwrap_or(0))
        && (1..=31).contains(&d.parse::<u8>().unwrap_or(0))
}

fn format_ok(f: Format, s: &str) -> bool {
    match f {
        Format::Date => date_ok(s),
        Format::DateTime => {
            let Some(t) = s.find(['T', 't', ' ']) else { return false };
            let (date, time) = (&s[..t], &s[t + 1..]);
            if !date_ok(date) {
                return false;
            }
            let (clock, zone) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
                (c, "")
            } else {
                match time.rfind(['+', '-']) {
                    Some(i) => (&time[..i], &time[i + 1..]),
                    None => return false,
                }
            };
            let zone_ok = zone.is_empty()
                || (zone.len() == 5
                    && zone.is_ascii()
                    && zone.get(..2).is_some_and(|h| digits(h, 2))
                    && zone.get(2..3) == Some(":")
                    && zone.get(3..).is_some_and(|m| digits(m, 2)));
            let (hms, frac) = clock.split_once('.').unwrap_or((clock, "0"));
            let mut p = hms.split(':');
            let (Some(h), Some(m), Some(sec), None) = (p.next(), p.next(), p.next(), p.next()) else { return false };
            zone_ok
                && digits(h, 2)
                && digits(m, 2)
                && digits(sec, 2)
                && !frac.is_empty()
                && frac.bytes().all(|b| b.is_ascii_digit())
                && h.parse::<u8>().unwrap_or(99) < 24
                && m.parse::<u8>().unwrap_or(99) < 60
                && sec.parse::<u8>().unwrap_or(99) <= 60
        }
        Format::Uuid => {
            let b = s.as_bytes();
            b.len() == 36
                && b.iter()
                    .enumerate()
                    .all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { *c == b'-' } else { c.is_ascii_hexdigit() })
        }
        Format::Email => {
            let Some((local, domain)) = s.rsplit_once('@') else { return false };
            !local.is_empty()
                && local.len() <= 64
                && domain.len() <= 255
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        Format::Ipv4 => s.parse::<std::net::Ipv4Addr>().is_ok(),
        Format::Ipv6 => s.parse::<std::net::Ipv6Addr>().is_ok(),
        Format::Uri => {
            let Some((scheme, _)) = s.split_once(':') else { return false };
            let mut b = scheme.bytes();
            b.next().is_some_and(|c| c.is_ascii_alphabetic())
                && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'.' | b'-'))
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        Format::Int32 | Format::Int64 => true,
    }
}

#[cfg(test)]
mod tests;
