//! Outbound fetches of the documents the configuration names: trusted issuers' JWK Sets and the
//! portal's OpenAPI documents (issue 12). What is fetched decides whose tokens the gateway accepts,
//! so the fetch takes nothing on trust: `https://` only (`http://` only to a loopback host, where
//! nothing on the way can replace the answer; checked at config load and again here), no
//! redirects (a redirect could lead anywhere, over anything), a connect timeout and an overall
//! one, and a byte cap enforced while the body streams in — never after buffering it whole.

use std::net::IpAddr;
use std::time::Duration;

/// How long a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole fetch may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The client every fetch of a configured document uses.
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(TIMEOUT)
        .build()
}

/// Whether `url` may be fetched: an `https://` URL, or an `http://` one whose host is loopback
/// (`localhost`, 127.0.0.0/8, `::1`). The error says what to do.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    let Some(host) = parsed.host_str() else { return Err(format!("{url:?} names no host")) };
    // The URL parser has already normalized the host (IPv4 in dotted form, IPv6 in brackets).
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{url} is plain http:// to a host that is not loopback, so anyone on the way could replace what keygate reads; use https:// (http:// is allowed only for localhost, 127.0.0.0/8 and ::1)"
        )),
        other => Err(format!("{url}: the scheme {other}:// is not fetched; use https://")),
    }
}

/// GETs `url` and returns its body, refusing a redirect, a failure status, and a body larger than
/// `max_bytes` (as declared, or as it arrives: reading stops at the cap).
pub async fn get_bounded(client: &reqwest::Client, url: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
    check_url(url)?;
    let mut resp = client.get(url).send().await.map_err(|e| format!("cannot fetch {url}: {e}"))?;
    let status = resp.status();
    if status.is_redirection() {
        return Err(format!(
            "{url} answered {status}, a redirect; keygate follows none: configure the URL it points to"
        ));
    }
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    let too_large = || format!("{url} sent more than {max_bytes} bytes; keygate reads at most that");
    if resp.content_length().is_some_and(|n| n > u64::try_from(max_bytes).unwrap_or(u64::MAX)) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("reading {url}: {e}"))? {
        if chunk.len() > max_bytes.saturating_sub(body.len()) {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server on an ephemeral loopback port that answers every connection with `head` and then
    /// `body` (repeated forever when `endless`); returns its base URL.
    async fn serve(head: String, body: &'static [u8], endless: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let head = head.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    loop {
                        let chunk = format!("{:x}\r\n", body.len());
                        let sent = if endless {
                            conn.write_all(chunk.as_bytes()).await.is_ok()
                                && conn.write_all(body).await.is_ok()
                                && conn.write_all(b"\r\n").await.is_ok()
                        } else {
                            conn.write_all(body).await.is_ok()
                        };
                        // The client hung up (as it must, at its cap) or the body is out.
                        if !sent || !endless {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    const JWKS: &[u8] = br#"{"keys":[]}"#;

    #[test]
    fn only_https_or_loopback_http_is_fetched() {
        for ok in ["https://idp.example.com/jwks", "http://127.0.0.1:8080/jwks", "http://[::1]/k", "http://localhost/k"]
        {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in ["http://idp.example.com/jwks", "http://10.0.0.1/jwks", "ftp://127.0.0.1/x", "file:///etc/passwd"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url("http://idp.example.com/jwks").unwrap_err().contains("https://"));
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let target = serve(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", JWKS.len()), JWKS, false).await;
        let head = format!("HTTP/1.1 302 Found\r\nlocation: {target}/jwks\r\ncontent-length: 0\r\n\r\n");
        let redirecting = serve(head, b"", false).await;
        let c = client().unwrap();
        assert_eq!(get_bounded(&c, &format!("{target}/jwks"), 1024).await.unwrap(), JWKS);
        let e = get_bounded(&c, &format!("{redirecting}/jwks"), 1024).await.unwrap_err();
        assert!(e.contains("redirect"), "{e}");
    }

    #[tokio::test]
    async fn the_byte_cap_holds_while_the_body_streams() {
        // An endless chunked body: only a cap enforced while reading ends the fetch.
        let endless = serve("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".into(), &[b'a'; 1000], true).await;
        let c = client().unwrap();
        let e = get_bounded(&c, &format!("{endless}/jwks"), 64 * 1024).await.unwrap_err();
        assert!(e.contains("more than 65536 bytes"), "{e}");
        // A declared length over the cap is refused before reading.
        let declared = serve("HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\n".into(), b"{}", false).await;
        let e = get_bounded(&c, &format!("{declared}/jwks"), 64 * 1024).await.unwrap_err();
        assert!(e.contains("more than"), "{e}");
    }
}
