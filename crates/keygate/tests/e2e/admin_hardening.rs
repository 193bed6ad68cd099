//! Issue 12, the admin plane: root keys (list, revoke, expiry, last use, the permission to manage
//! them), the admin listener's body limit and security headers, CORS validation, the first-run
//! setup's throttle and the portal explorer's caller address. Seen from outside where the finding
//! was: raw sockets, the real binary, the admin API.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::keygate;

#[test]
fn config_check_refuses_cors_wildcard_with_credentials_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.toml");
    let route = "[[routes]]\nid = \"app\"\npath = \"/app\"\nupstream = \"http://127.0.0.1:9000\"\n[routes.cors]\n";
    std::fs::write(&cfg, format!("{route}allow_origins = [\"*\"]\nallow_credentials = true\n")).unwrap();
    let out = keygate(&["config", "check", cfg.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("route \"app\"") && stderr.contains("cors.allow_credentials"), "{stderr}");
    // Named origins may send credentials; `*` without them stays allowed.
    std::fs::write(&cfg, format!("{route}allow_origins = [\"https://app.example\"]\nallow_credentials = true\n"))
        .unwrap();
    assert_eq!(keygate(&["config", "check", cfg.to_str().unwrap()]).status().unwrap().code(), Some(0));
    std::fs::write(&cfg, format!("{route}allow_origins = [\"*\"]\n")).unwrap();
    assert_eq!(keygate(&["config", "check", cfg.to_str().unwrap()]).status().unwrap().code(), Some(0));
}
