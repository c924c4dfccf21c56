//! Pusher's HTTP API (`/apps/{id}/...`), as the Pusher server SDKs call it (Laravel's
//! broadcaster among them): every request signed with the app's secret (`auth_key`,
//! `auth_timestamp` within 600 s, `auth_version`, `body_md5`, `auth_signature` over the
//! method, the path and every other query parameter, sorted): `POST /apps/{id}/events` and
//! `POST /apps/{id}/batch_events` (with `info`), the channel queries ([`super::channels`]),
//! and `POST /apps/{id}/users/{user}/terminate_connections`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::session::valid_channel;
use super::{channels, signing, wire, App};
use crate::api::{json, json_error};
use crate::node::Node;

/// How far a request's `auth_timestamp` may be from our clock, as Pusher allows.
const CLOCK_SKEW: u64 = 600;

/// The most channels one event goes to, as Pusher allows.
const MAX_CHANNELS: usize = 100;

/// The most events one batch holds, as Pusher allows.
const MAX_BATCH: usize = 10;

/// Room for the JSON around an event's data, over `--max-message-size`.
const BODY_ENVELOPE: usize = 64 * 1024;

/// `POST /apps/{id}/events`'s body.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    /// A string, as the SDKs send it: delivered as that JSON string.
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    socket_id: Option<String>,
    /// Counts to answer with, after the event went out (`user_count,subscription_count`).
    #[serde(default)]
    info: Option<String>,
}

/// `POST /apps/{id}/batch_events`'s body.
#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<Event<'a>>,
}

pub async fn respond(request: Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    let Some(apps) = &node.pusher else {
        return json_error(StatusCode::NOT_FOUND, "not found");
    };
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let Some((id, what)) = path["/apps/".len()..].split_once('/') else {
        return json_error(StatusCode::NOT_FOUND, "not found");
    };
    let Some((index, app)) = apps.by_id(id) else {
        return json_error(StatusCode::NOT_FOUND, "Unknown app");
    };
    let limit = node.config.max_message_size + BODY_ENVELOPE;
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            let text = format!("body larger than {limit} bytes");
            return json_error(StatusCode::PAYLOAD_TOO_LARGE, &text);
        }
        Err(_) => return json_error(StatusCode::BAD_REQUEST, "body not read"),
    };
    if let Err(refusal) = check_signature(
        app,
        parts.method.as_str(),
        &path,
        parts.uri.query().unwrap_or(""),
        &body,
        crate::protocol::timestamp(),
    ) {
        return json_error(StatusCode::UNAUTHORIZED, refusal);
    }
    let query = parts.uri.query().unwrap_or("");
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    if parts.method == hyper::Method::GET {
        let (info, prefix) = (param("info"), param("filter_by_prefix"));
        let answer = match what.strip_prefix("channels") {
            Some("") => channels::list(node, app, prefix.as_deref(), info.as_deref()).await,
            Some(rest) => match rest.strip_prefix('/').map(split_channel) {
                Some(Some((channel, false))) => {
                    channels::one(node, app, &channel, info.as_deref()).await
                }
                Some(Some((channel, true))) => channels::list_users(node, app, &channel).await,
                _ => return json_error(StatusCode::NOT_FOUND, "not found"),
            },
            None => return json_error(StatusCode::NOT_FOUND, "not found"),
        };
        return match answer {
            Ok(value) => json(&value),
            Err((status, message)) => json_error(status, &message),
        };
    }
    match (parts.method.as_str(), what) {
        ("POST", "events") => match serde_json::from_slice::<Event<'_>>(&body) {
            Ok(event) => {
                let info = match channels::Info::parse(event.info.as_deref()) {
                    Ok(info) => info,
                    Err((status, message)) => return json_error(status, &message),
                };
                let asked = check(&event).map(|channels| (channels, info));
                match publish(index, vec![event], node) {
                    Ok(()) => match asked {
                        Ok((names, info)) if info != channels::Info::default() => {
                            match infos(node, app, &names, info).await {
                                Ok(infos) => json(&serde_json::json!({ "channels": infos })),
                                Err((status, message)) => json_error(status, &message),
                            }
                        }
                        _ => json(&serde_json::json!({})),
                    },
                    Err(refusal) => json_error(StatusCode::BAD_REQUEST, &refusal),
                }
            }
            Err(error) => json_error(StatusCode::BAD_REQUEST, &format!("invalid event: {error}")),
        },
        ("POST", "batch_events") => match serde_json::from_slice::<Batch<'_>>(&body) {
            Ok(batch) if batch.batch.len() > MAX_BATCH => {
                let text = format!("a batch holds at most {MAX_BATCH} events");
                json_error(StatusCode::BAD_REQUEST, &text)
            }
            Ok(batch) => {
                let mut asked = Vec::with_capacity(batch.batch.len());
                for event in &batch.batch {
                    match channels::Info::parse(event.info.as_deref()) {
                        Ok(info) => asked.push((check(event).unwrap_or_default(), info)),
                        Err((status, message)) => return json_error(status, &message),
                    }
                }
                if let Err(refusal) = publish(index, batch.batch, node) {
                    return json_error(StatusCode::BAD_REQUEST, &refusal);
                }
                if asked
                    .iter()
                    .all(|(_, info)| *info == channels::Info::default())
                {
                    return json(&serde_json::json!({"batch": []}));
                }
                // One attributes object per event, in order: those of its (single) channel.
                let mut answers = Vec::with_capacity(asked.len());
                for (names, info) in asked {
                    let Some(channel) = names.first() else {
                        answers.push(serde_json::json!({}));
                        continue;
                    };
                    match channels::attributes(node, app, channel, info).await {
                        Ok(mut attributes) => {
                            attributes.remove("occupied");
                            answers.push(serde_json::Value::Object(attributes));
                        }
                        Err((status, message)) => return json_error(status, &message),
                    }
                }
                json(&serde_json::json!({ "batch": answers }))
            }
            Err(error) => json_error(StatusCode::BAD_REQUEST, &format!("invalid batch: {error}")),
        },
        ("POST", users) if users.starts_with("users/") => {
            match users
                .strip_prefix("users/")
                .and_then(|rest| rest.strip_suffix("/terminate_connections"))
            {
                Some(user) => terminate(node, index, user).await,
                None => json_error(StatusCode::NOT_FOUND, "not found"),
            }
        }
        (_, "events" | "batch_events") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => json_error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `POST /apps/{id}/users/{user}/terminate_connections`: closes the user's connections on
/// every node (`pusher:error` 4009, then the close); `{}` whether or not it had any, as Pusher
/// answers.
async fn terminate(node: &Node, app: u16, user: &str) -> Response<Full<Bytes>> {
    let Ok(user) = percent_encoding::percent_decode_str(user).decode_utf8() else {
        return json_error(StatusCode::BAD_REQUEST, "the user id is not UTF-8");
    };
    if user.is_empty() {
        return json_error(StatusCode::BAD_REQUEST, "no user id");
    }
    let apps = node.pusher.as_ref().expect("the Pusher API has apps");
    apps.users.terminate(app, &user);
    let query = crate::broker::query::Query::TerminatePusherUser {
        app: apps.get(app).id.to_string(),
        user: user.into_owned(),
    };
    let gathered = crate::api::listing::gather(node, &query).await;
    if !gathered.complete {
        // Some node did not answer: its connections of the user may still be open.
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "not every node answered");
    }
    json(&serde_json::json!({}))
}

/// The attributes `info` asks of each of `names` (without `occupied`, as Pusher answers a
/// trigger).
async fn infos(
    node: &Node,
    app: &App,
    names: &[String],
    info: channels::Info,
) -> Result<serde_json::Map<String, serde_json::Value>, channels::Refusal> {
    let mut infos = serde_json::Map::new();
    for name in names {
        // user_count is a presence channel's only: others get the rest.
        let asked = channels::Info {
            user_count: info.user_count && name.starts_with("presence-"),
            ..info
        };
        let mut attributes = channels::attributes(node, app, name, asked).await?;
        attributes.remove("occupied");
        infos.insert(name.clone(), serde_json::Value::Object(attributes));
    }
    Ok(infos)
}

/// `NAME` or `NAME/users` of a channel path, the name percent-decoded; whether it is users.
fn split_channel(rest: &str) -> Option<(String, bool)> {
    let (encoded, users) = match rest.strip_suffix("/users") {
        Some(name) => (name, true),
        None => (rest, false),
    };
    let name = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()?;
    (valid_channel(&name) && !name.contains('/')).then(|| (name.into_owned(), users))
}

/// Checks every event, then delivers them in order: a batch with one bad event delivers
/// none, and says which.
fn publish(app: u16, events: Vec<Event<'_>>, node: &Node) -> Result<(), String> {
    let mut checked = Vec::with_capacity(events.len());
    for (at, event) in events.into_iter().enumerate() {
        let channels = check(&event).map_err(|refusal| match at {
            0 => refusal,
            _ => format!("event {at}: {refusal}"),
        })?;
        checked.push((event, channels));
    }
    let mut delivered = 0;
    for (event, channels) in checked {
        // The publisher's own connection (`socket_id`), which the event skips on its node.
        let skip = event.socket_id.as_deref().unwrap_or("");
        for channel in &channels {
            let text = wire::event(&event.name, channel, event.data);
            delivered += super::publish(node, app, channel, &text, skip);
        }
    }
    node.metrics.fanout_deliveries.increment(delivered as u64);
    Ok(())
}

/// An event's channels, or why it is refused.
fn check(event: &Event<'_>) -> Result<Vec<String>, String> {
    if !event.data.get().starts_with('"') {
        return Err("data must be a string".into());
    }
    let channels = match (&event.channel, &event.channels) {
        (Some(channel), None) => vec![channel.clone()],
        (None, Some(channels)) => channels.clone(),
        _ => return Err("give channel or channels, not both".into()),
    };
    if channels.is_empty() || channels.len() > MAX_CHANNELS {
        return Err(format!("an event goes to 1 to {MAX_CHANNELS} channels"));
    }
    if let Some(bad) = channels.iter().find(|channel| !valid_channel(channel)) {
        return Err(format!("invalid channel name {bad:?}"));
    }
    Ok(channels)
}

/// Checks a request's signature: `Err` with the reason Pusher would give.
fn check_signature(
    app: &App,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now: u64,
) -> Result<(), &'static str> {
    let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| (name.to_ascii_lowercase(), value.into_owned()))
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let signature = param("auth_signature").ok_or("Missing auth_signature")?;
    if param("auth_key").as_deref() != Some(&*app.key) {
        return Err("Invalid auth_key");
    }
    let timestamp: u64 = param("auth_timestamp")
        .and_then(|value| value.parse().ok())
        .ok_or("Missing auth_timestamp")?;
    if timestamp.abs_diff(now) > CLOCK_SKEW {
        return Err("Timestamp expired: more than 600 s from the server's clock");
    }
    if param("auth_version").as_deref() != Some("1.0") {
        return Err("auth_version must be 1.0");
    }
    match param("body_md5") {
        Some(md5) if md5 != hex::encode(Md5::digest(body)) => {
            return Err("body_md5 does not match the body")
        }
        None if !body.is_empty() => return Err("Missing body_md5"),
        _ => {}
    }
    params.retain(|(name, _)| name != "auth_signature");
    params.sort();
    let query: Vec<String> = params
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    let text = format!("{method}\n{path}\n{}", query.join("&"));
    if signing::verify(&app.secret, &text, &signature) {
        Ok(())
    } else {
        Err("Invalid signature: you should have sent HmacSHA256Hex(\"METHOD\\nPATH\\nQUERY\", secret)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App {
            id: "3".into(),
            key: "3ee6bd1d2d8a6e1d5e3c".into(),
            secret: "7ad3773142a6692b25b8".into(),
            client_events: true,
            max_connections: None,
            webhook_url: None,
        }
    }

    fn signed(method: &str, path: &str, body: &[u8], timestamp: u64) -> String {
        let md5 = hex::encode(Md5::digest(body));
        let query = format!(
            "auth_key=3ee6bd1d2d8a6e1d5e3c&auth_timestamp={timestamp}&auth_version=1.0&body_md5={md5}"
        );
        let signature = signing::sign(&app().secret, &format!("{method}\n{path}\n{query}"));
        format!("{query}&auth_signature={signature}")
    }

    #[test]
    fn a_request_signed_with_the_apps_secret_is_accepted_within_600_s() {
        let body = br#"{"name":"e","channel":"c","data":"{}"}"#;
        let query = signed("POST", "/apps/3/events", body, 1_000_000);
        let check = |query: &str, body: &[u8], now| {
            check_signature(&app(), "POST", "/apps/3/events", query, body, now)
        };
        assert_eq!(check(&query, body, 1_000_000), Ok(()));
        assert_eq!(check(&query, body, 1_000_600), Ok(()));
        assert!(check(&query, body, 1_000_601).is_err(), "too old");
        assert!(check(&query, b"{}", 1_000_000).is_err(), "another body");
        let tampered = query.replace("auth_version=1.0", "auth_version=1.0&extra=1");
        assert!(
            check(&tampered, body, 1_000_000).is_err(),
            "a parameter added"
        );
        let wrong_path = check_signature(&app(), "POST", "/apps/4/events", &query, body, 1_000_000);
        assert!(wrong_path.is_err());
    }
}
