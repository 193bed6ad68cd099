//! `keygate oauth-client …` and `keygate signing-key …`: an app's OAuth2 client and the OAuth2
//! server's signing keys.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{Shown, put_opt, read_object};
use crate::cli::{ApiCommand, OAuthClientCommand, SigningKeyCommand};
use crate::client::{AdminClient, id_segment};

const CLIENT_COLUMNS: &[&str] = &[
    "client_id",
    "app_id",
    "grant_types",
    "scopes",
    "token_endpoint_auth_method",
    "access_token_format",
    "client_secret_last4",
    "previous_secret_expires_at",
    "suspended_at",
    "suspended_reason",
];

const KEY_COLUMNS: &[&str] = &["kid", "alg", "created_at", "signs_from", "retired_at", "drop_after"];

fn path(app_id: &str) -> anyhow::Result<String> {
    Ok(format!("/admin/v1/apps/{}/oauth-client", id_segment(app_id, "an app id (app_…)")?))
}

pub async fn run_client(args: ApiCommand<OAuthClientCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let shown = match &args.command {
        OAuthClientCommand::Create {
            app_id,
            grant_types,
            scopes,
            auth_method,
            jwks,
            access_token_format,
            signing_alg,
            access_token_ttl,
            refresh_token_ttl,
            exchange_subject_apps,
        } => {
            let mut body = Map::new();
            if !grant_types.is_empty() {
                body.insert("grant_types".into(), json!(grant_types));
            }
            if !scopes.is_empty() {
                body.insert("scopes".into(), json!(scopes));
            }
            put_opt(&mut body, "token_endpoint_auth_method", auth_method.as_ref());
            if let Some(j) = jwks {
                body.insert("jwks".into(), read_object("--jwks", j)?);
            }
            put_opt(&mut body, "access_token_format", access_token_format.as_ref());
            put_opt(&mut body, "signing_alg", signing_alg.as_ref());
            put_opt(&mut body, "access_token_ttl_seconds", *access_token_ttl);
            put_opt(&mut body, "refresh_token_ttl_seconds", *refresh_token_ttl);
            if !exchange_subject_apps.is_empty() {
                body.insert("exchange_subject_apps".into(), json!(exchange_subject_apps));
            }
            let answer = client.send(Method::POST, &path(app_id)?, Some(Value::Object(body))).await?;
            Shown::with_secret(answer, CLIENT_COLUMNS, "client_secret")
        }
        OAuthClientCommand::Show { app_id } => {
            Shown::rows(client.send(Method::GET, &path(app_id)?, None).await?, CLIENT_COLUMNS)
        }
        OAuthClientCommand::Update { app_id, exchange_subject_apps, no_exchange_subject_apps: _ } => {
            // Without apps (--no-exchange-subject-apps) the list is emptied.
            let body = json!({ "exchange_subject_apps": exchange_subject_apps });
            Shown::rows(client.send(Method::PATCH, &path(app_id)?, Some(body)).await?, CLIENT_COLUMNS)
        }
        OAuthClientCommand::RotateSecret { app_id, grace_period } => {
            let body = json!({ "grace_period_seconds": grace_period });
            let answer = client.send(Method::POST, &format!("{}/rotate-secret", path(app_id)?), Some(body)).await?;
            Shown::with_secret(answer, CLIENT_COLUMNS, "client_secret")
        }
        OAuthClientCommand::Suspend { app_id, reason } => {
            let body = json!({ "reason": reason });
            Shown::rows(
                client.send(Method::POST, &format!("{}/suspend", path(app_id)?), Some(body)).await?,
                CLIENT_COLUMNS,
            )
        }
        OAuthClientCommand::Resume { app_id } => {
            Shown::rows(client.send(Method::POST, &format!("{}/resume", path(app_id)?), None).await?, CLIENT_COLUMNS)
        }
    };
    shown.print(args.api.output)
}

pub async fn run_keys(args: ApiCommand<SigningKeyCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let answer = match &args.command {
        SigningKeyCommand::List => client.send(Method::GET, "/admin/v1/oauth/keys", None).await?,
        SigningKeyCommand::Rotate { alg } => {
            let mut body = Map::new();
            put_opt(&mut body, "alg", alg.as_ref());
            client.send(Method::POST, "/admin/v1/oauth/keys/rotate", Some(Value::Object(body))).await?
        }
    };
    Shown::rows(answer, KEY_COLUMNS).print(args.api.output)
}
