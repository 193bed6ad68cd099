//! `keygate provider …`: the AI gateway's LLM providers through the admin API. A provider's key
//! is read from an environment variable or standard input — never from the command line, where
//! shell history and `ps` would keep it — sent once, sealed by keygate and never shown again.

use std::io::BufRead;

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{Layout, Shown};
use crate::UsageError;
use crate::cli::{ApiCommand, ProviderCommand, ProviderKeyArgs};
use crate::client::AdminClient;

const COLUMNS: &[&str] = &["id", "kind", "base_url", "source", "key_fingerprint", "key_rotated_at"];

/// A provider id as a path segment.
fn path(id: &str) -> anyhow::Result<String> {
    let ok =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if !ok {
        return Err(UsageError(format!("{id:?} is not a provider id (letters, digits, - _)")).into());
    }
    Ok(format!("/admin/v1/providers/{id}"))
}

/// The key from where the arguments say (`None`: no key, for a server that needs none).
fn read_key(args: &ProviderKeyArgs) -> anyhow::Result<Option<String>> {
    let key = if let Some(var) = &args.api_key_env {
        Some(std::env::var(var).map_err(|_| UsageError(format!("the environment variable {var} is not set")))?)
    } else if args.api_key_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        Some(line)
    } else {
        None
    };
    match key.map(|k| k.trim().to_owned()) {
        Some(k) if k.is_empty() => Err(UsageError("the provider's key is empty".into()).into()),
        k => Ok(k),
    }
}

/// `MODEL=INPUT,OUTPUT[,CACHED_INPUT]` (dollars per million tokens) as a price entry.
fn parse_price(s: &str) -> Result<(String, Value), String> {
    let err = || format!("--price {s:?}: MODEL=INPUT,OUTPUT[,CACHED_INPUT], in dollars per million tokens");
    let (model, nums) = s.split_once('=').ok_or_else(err)?;
    let nums: Vec<f64> =
        nums.split(',').map(|n| n.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|_| err())?;
    if model.is_empty() || !(2..=3).contains(&nums.len()) {
        return Err(err());
    }
    let mut price = json!({"input": nums[0], "output": nums[1]});
    if let Some(c) = nums.get(2) {
        price["cached_input"] = json!(c);
    }
    Ok((model.to_owned(), price))
}

pub async fn run(args: ApiCommand<ProviderCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let shown = match &args.command {
        ProviderCommand::List => Shown::rows(client.send(Method::GET, "/admin/v1/providers", None).await?, COLUMNS),
        ProviderCommand::Show { id } => Shown::rows(client.send(Method::GET, &path(id)?, None).await?, COLUMNS),
        ProviderCommand::Create { id, kind, base_url, api_version, prices, key } => {
            let mut table = Map::new();
            for p in prices {
                let (model, price) = parse_price(p).map_err(UsageError)?;
                table.insert(model, price);
            }
            let mut body = json!({"id": id, "kind": kind, "base_url": base_url, "prices": table});
            if let Some(v) = api_version {
                body["api_version"] = json!(v);
            }
            if let Some(k) = read_key(key)? {
                body["api_key"] = json!(k);
            }
            Shown::rows(client.send(Method::POST, "/admin/v1/providers", Some(body)).await?, COLUMNS)
        }
        ProviderCommand::RotateKey { id, key } => {
            let body = json!({"api_key": read_key(key)?});
            Shown::rows(client.send(Method::POST, &format!("{}/rotate-key", path(id)?), Some(body)).await?, COLUMNS)
        }
        ProviderCommand::Delete { id } => {
            let answer = client.send(Method::DELETE, &path(id)?, None).await?;
            Shown { answer, layout: Layout::Done(format!("deleted provider {id}")) }
        }
    };
    shown.print(args.api.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_read_from_the_flag() {
        assert_eq!(
            parse_price("gpt-4o-mini=0.15,0.6").unwrap(),
            ("gpt-4o-mini".into(), json!({"input": 0.15, "output": 0.6}))
        );
        assert_eq!(parse_price("m=1,2,0.5").unwrap().1["cached_input"], 0.5);
        for bad in ["m", "m=1", "=1,2", "m=a,b", "m=1,2,3,4"] {
            assert!(parse_price(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn provider_ids_cannot_escape_the_path() {
        assert_eq!(path("openai").unwrap(), "/admin/v1/providers/openai");
        for bad in ["", "..", "a/b", "a.b", "a?b"] {
            assert!(path(bad).is_err(), "{bad}");
        }
    }
}
