//! The developer portal's view of the gateway: its routes as an API catalog, their OpenAPI
//! documents (from files, or URLs fetched and cached for a few minutes), and the explorer's
//! requests, sent into the gateway's request path as the person using the explorer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate_admin::catalog::{ApiCatalog, ApiEntry, TryAnswer};
use keygate_gateway::ctx::ConnInfo;
use keygate_gateway::gateway::Gateway;
use keygate_gateway::head::FieldRead;
use keygate_gateway::routes::normalize_path;
use parking_lot::Mutex;

/// The largest OpenAPI document or explorer answer read.
const MAX_DOC_BYTES: usize = 4 * 1024 * 1024;
const MAX_ANSWER_SHOWN: usize = 64 * 1024;
const URL_CACHE: Duration = Duration::from_secs(300);
/// How long the explorer waits for the gateway's answer, and then for its body.
const EXPLORER_TIMEOUT: Duration = Duration::from_secs(30);
/// Answer headers the explorer shows.
const SHOWN_HEADERS: [&str; 6] =
    ["content-type", "ratelimit", "ratelimit-policy", "retry-after", "www-authenticate", "content-length"];

pub struct Catalog {
    gateway: Arc<Gateway>,
    gateway_addr: SocketAddr,
    /// Relative OpenAPI paths are read from here (the config file's directory).
    base_dir: PathBuf,
    http: reqwest::Client,
    fetched: Mutex<HashMap<String, (Instant, serde_json::Value)>>,
}

impl Catalog {
    pub fn new(gateway: Arc<Gateway>, gateway_addr: SocketAddr, base_dir: PathBuf) -> Self {
        // No redirects, bounded time (the explorer's calls to the gateway too).
        let http = crate::fetch::client().unwrap_or_default();
        Self { gateway, gateway_addr, base_dir, http, fetched: Mutex::new(HashMap::new()) }
    }

    async fn fetch(&self, url: &str) -> Result<serde_json::Value, String> {
        if let Some((at, doc)) = self.fetched.lock().get(url)
            && at.elapsed() < URL_CACHE
        {
            return Ok(doc.clone());
        }
        // Streamed with a cap: a huge or endless document is cut off, never buffered whole.
        let bytes = crate::fetch::get_bounded(&self.http, url, MAX_DOC_BYTES).await?;
        let doc = parse_doc(&bytes)?;
        self.fetched.lock().insert(url.to_owned(), (Instant::now(), doc.clone()));
        Ok(doc)
    }
}

impl Catalog {
    /// Sends `req` into the gateway's own request path over an in-process HTTP/2 connection whose
    /// remote address is `caller`, the person using the explorer. Through a socket, the gateway
    /// would see keygate's own address instead, and a token whose IP allowlist names the keygate
    /// host would pass for anyone who can open the dashboard (issue 12). So every check the
    /// gateway makes on the client address (allowlists, and what it records as `last_used_ip`)
    /// is made on the person's address, with no header to trust and no special case in the gateway.
    async fn through_gateway(
        &self,
        caller: IpAddr,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let gw = self.gateway.clone();
        let info = ConnInfo::new(SocketAddr::new(caller, 0), false);
        let service = hyper::service::service_fn(move |req| {
            let gw = gw.clone();
            // The body is already in memory: the explorer's own time limit covers it.
            async move { Ok::<_, std::convert::Infallible>(gw.handle(info, req, EXPLORER_TIMEOUT).await) }
        });
        let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(1)
            .serve_connection(TokioIo::new(server_io), service);
        // Both halves end with the connection: when `sender` is dropped after the answer is read.
        tokio::spawn(async move {
            let _ = server.await;
        });
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
            .await
            .map_err(|e| format!("the gateway could not be reached: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender.send_request(req).await.map_err(|e| format!("the gateway could not be reached: {e}"))
    }
}

fn parse_doc(bytes: &[u8]) -> Result<serde_json::Value, String> {
    let doc: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("it is not JSON ({e}); keygate reads OpenAPI documents in JSON"))?;
    if doc.get("openapi").is_none() && doc.get("swagger").is_none() {
        return Err("it has no `openapi` field: is it an OpenAPI document?".into());
    }
    Ok(doc)
}

#[async_trait::async_trait]
impl ApiCatalog for Catalog {
    fn apis(&self) -> Vec<ApiEntry> {
        let table = self.gateway.table.load();
        table
            .routes
            .routes
            .iter()
            .map(|r| {
                let mut scopes: Vec<(String, String)> =
                    r.scopes.iter().map(|(m, s)| (m.to_string(), s.to_string())).collect();
                scopes.sort();
                if let Some(d) = &r.default_scope {
                    scopes.push(("*".into(), d.to_string()));
                }
                ApiEntry {
                    id: r.id.to_string(),
                    path: r.prefix.clone(),
                    host: r.host.clone(),
                    headers: r
                        .headers
                        .iter()
                        .map(|c| (c.name.to_string(), c.values.iter().map(ToString::to_string).collect()))
                        .collect(),
                    public: r.public,
                    description: r.description.clone(),
                    scopes,
                    openapi: r.openapi.clone(),
                    workspace_id: r.workspace_id.as_deref().map(str::to_owned),
                    shared: r.shared,
                    api_state: r.lifecycle.as_ref().map(|l| l.state.as_str().to_owned()),
                    api_name: r.lifecycle.as_ref().map(|l| l.api.clone()),
                    api_version: r.lifecycle.as_ref().and_then(|l| l.version.clone()),
                    sunset: r.lifecycle.as_ref().and_then(|l| l.sunset).map(keygate_core::Timestamp::to_rfc3339),
                    successor: r.lifecycle.as_ref().and_then(|l| l.successor.clone()),
                    subscription_required: r
                        .lifecycle
                        .as_ref()
                        .and_then(|l| l.subscribers.as_deref())
                        .is_some_and(|s| s.required),
                    document: r.ai.as_ref().filter(|a| !a.prompts.is_empty()).map(|a| {
                        let prompts: Vec<_> = a.prompts.values().collect();
                        keygate_gateway::ai::prompt::openapi(&r.id, &r.prefix, &prompts)
                    }),
                }
            })
            .collect()
    }

    async fn openapi(&self, source: &str) -> Result<serde_json::Value, String> {
        if source.starts_with("http://") || source.starts_with("https://") {
            return self.fetch(source).await;
        }
        let path = self.base_dir.join(source);
        let bytes = tokio::fs::read(&path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() > MAX_DOC_BYTES {
            return Err(format!("{} is larger than 4 MiB", path.display()));
        }
        parse_doc(&bytes)
    }

    async fn send(
        &self,
        caller: IpAddr,
        api_id: &str,
        method: &str,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Result<TryAnswer, String> {
        let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| "not an HTTP method".to_owned())?;
        // The request must reach this API, as the gateway will route it: normalize the path the
        // same way and match it against the live route table.
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let path = normalize_path(path).map_err(|e| format!("the path is not valid: {e}"))?;
        let table = self.gateway.table.load();
        // A route told apart by header fields (an API version): the request carries the first
        // value of each.
        let headers: Vec<(String, String)> = table
            .routes
            .routes
            .iter()
            .find(|r| &*r.id == api_id)
            .map(|r| {
                r.headers.iter().filter_map(|c| Some((c.name.to_string(), c.values.first()?.to_string()))).collect()
            })
            .unwrap_or_default();
        let sent = |name: &str| match headers.iter().find(|(n, _)| n == name) {
            Some((_, v)) => FieldRead::One(v.as_bytes()),
            None => FieldRead::Absent,
        };
        let routed = table.routes.find(|| None, &sent, &path).is_some_and(|r| &*r.id == api_id);
        if !routed {
            return Err(format!("{path} is not served by the API {api_id}"));
        }
        let target = match query {
            Some(q) if !q.contains(['#', ' ', '\r', '\n']) => format!("{path}?{q}"),
            Some(_) => return Err("the query string holds characters a URL cannot".into()),
            None => path.into_owned(),
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{target}", self.gateway_addr))
            .header(http::header::HOST, self.gateway_addr.to_string());
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {}", t.trim()));
        }
        for (name, value) in &headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let body = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req =
            req.body(Full::new(body)).map_err(|_| "the token or path holds characters a request cannot".to_owned())?;
        let mut resp = tokio::time::timeout(EXPLORER_TIMEOUT, self.through_gateway(caller, req))
            .await
            .map_err(|_| "the gateway did not answer in time".to_owned())??;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter(|(k, _)| SHOWN_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        // Read no more than is shown: a large answer is cut, not buffered whole.
        let mut shown: Vec<u8> = Vec::new();
        let mut truncated = false;
        let read = async {
            while let Some(frame) = resp.body_mut().frame().await {
                let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
                let Ok(chunk) = frame.into_data() else { continue };
                let room = MAX_ANSWER_SHOWN - shown.len();
                shown.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    truncated = true;
                    break;
                }
            }
            Ok::<(), String>(())
        };
        tokio::time::timeout(EXPLORER_TIMEOUT, read)
            .await
            .map_err(|_| "the answer did not arrive in time".to_owned())??;
        Ok(TryAnswer { status, headers, body: String::from_utf8_lossy(&shown).into_owned(), truncated })
    }
}
