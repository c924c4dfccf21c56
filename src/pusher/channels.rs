//! What the HTTP API tells of an app's channels, cluster-wide: `GET /apps/{id}/channels`,
//! `GET /apps/{id}/channels/{name}`, `GET /apps/{id}/channels/{name}/users`, and the `info`
//! an event's trigger may ask for. A channel's subscription count is the sum of its group's
//! size on every node (asked through the broker, as the native listings are); a presence
//! channel's users are the broker's presence table (Redis across nodes).
//!
//! When a node did not answer in time, or Redis did not, the answer is 503: a count that may
//! be short is not given as if it were whole.

use std::collections::BTreeMap;

use hyper::StatusCode;
use serde_json::{json, Map, Value};

use super::{group, App};
use crate::api::listing::gather;
use crate::broker::query::{Answer, Query};
use crate::broker::PresenceUsers;
use crate::node::Node;

/// Why a channel query has no answer: the status and the message.
pub type Refusal = (StatusCode, String);

fn unavailable() -> Refusal {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "not every node answered".into(),
    )
}

fn bad(message: &str) -> Refusal {
    (StatusCode::BAD_REQUEST, message.into())
}

/// What an `info` parameter asks for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub user_count: bool,
    pub subscription_count: bool,
}

impl Info {
    /// `info=user_count,subscription_count` (either, both, or nothing); unknown attributes are
    /// refused, as Pusher does.
    pub fn parse(info: Option<&str>) -> Result<Info, Refusal> {
        let mut parsed = Info::default();
        for attribute in info.unwrap_or("").split(',').filter(|a| !a.is_empty()) {
            match attribute {
                "user_count" => parsed.user_count = true,
                "subscription_count" => parsed.subscription_count = true,
                other => return Err(bad(&format!("unknown info attribute {other:?}"))),
            }
        }
        Ok(parsed)
    }
}

/// The subscription counts of `app`'s channels whose name starts with `prefix`, over every
/// node.
pub async fn subscription_counts(
    node: &Node,
    app: &App,
    prefix: &str,
) -> Result<BTreeMap<String, usize>, Refusal> {
    let group_prefix = group(app, prefix);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut add = |groups: Vec<(String, usize)>| {
        for (name, size) in groups {
            if let Some(channel) = name.strip_prefix(&group(app, "")) {
                *counts.entry(channel.to_owned()).or_default() += size;
            }
        }
    };
    add(node.router.groups(&group_prefix));
    let gathered = gather(
        node,
        &Query::Groups {
            prefix: group_prefix,
        },
    )
    .await;
    if !gathered.complete {
        return Err(unavailable());
    }
    for answer in gathered.answers {
        if let Answer::Groups { groups } = answer {
            add(groups);
        }
    }
    Ok(counts)
}

/// The user ids of a presence channel.
pub async fn users(node: &Node, app: &App, channel: &str) -> Result<Vec<String>, Refusal> {
    match node.broker.presence_users(&group(app, channel)) {
        PresenceUsers::Done(users) => Ok(users),
        PresenceUsers::Later(users) => users.await.map_err(|_| unavailable()),
    }
}

/// `GET /apps/{id}/channels`: the occupied channels (not the `#server-to-user-` ones), with
/// `user_count` (presence channels only: the prefix must be `presence-`) when asked.
pub async fn list(
    node: &Node,
    app: &App,
    prefix: Option<&str>,
    info: Option<&str>,
) -> Result<Value, Refusal> {
    let prefix = prefix.unwrap_or("");
    let info = Info::parse(info)?;
    if info.user_count && !prefix.starts_with("presence-") {
        return Err(bad(
            "user_count may be asked only with filter_by_prefix=presence-",
        ));
    }
    let counts = subscription_counts(node, app, prefix).await?;
    let mut channels = Map::new();
    for (channel, count) in counts {
        if channel.starts_with('#') || count == 0 {
            continue;
        }
        let mut attributes = Map::new();
        if info.user_count {
            attributes.insert(
                "user_count".into(),
                users(node, app, &channel).await?.len().into(),
            );
        }
        if info.subscription_count {
            attributes.insert("subscription_count".into(), count.into());
        }
        channels.insert(channel, Value::Object(attributes));
    }
    Ok(json!({ "channels": channels }))
}

/// `GET /apps/{id}/channels/{name}`: `occupied`, and the counts asked for (`user_count` of a
/// presence channel only).
pub async fn one(
    node: &Node,
    app: &App,
    channel: &str,
    info: Option<&str>,
) -> Result<Value, Refusal> {
    let info = Info::parse(info)?;
    let attributes = attributes(node, app, channel, info).await?;
    Ok(Value::Object(attributes))
}

/// A channel's `occupied` and the counts `info` asks for.
pub async fn attributes(
    node: &Node,
    app: &App,
    channel: &str,
    info: Info,
) -> Result<Map<String, Value>, Refusal> {
    let presence = channel.starts_with("presence-");
    if info.user_count && !presence {
        return Err(bad("user_count is a presence channel's only"));
    }
    let count = subscription_counts(node, app, channel)
        .await?
        .remove(channel)
        .unwrap_or(0);
    let mut attributes = Map::new();
    attributes.insert("occupied".into(), (count > 0).into());
    if info.subscription_count {
        attributes.insert("subscription_count".into(), count.into());
    }
    if info.user_count {
        attributes.insert(
            "user_count".into(),
            users(node, app, channel).await?.len().into(),
        );
    }
    Ok(attributes)
}

/// `GET /apps/{id}/channels/{name}/users`: a presence channel's users.
pub async fn list_users(node: &Node, app: &App, channel: &str) -> Result<Value, Refusal> {
    if !channel.starts_with("presence-") {
        return Err(bad("users are listed for presence channels only"));
    }
    let users: Vec<Value> = users(node, app, channel)
        .await?
        .into_iter()
        .map(|id| json!({ "id": id }))
        .collect();
    Ok(json!({ "users": users }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_user_count_and_subscription_count_and_nothing_else() {
        assert_eq!(Info::parse(None).unwrap(), Info::default());
        let both = Info::parse(Some("user_count,subscription_count")).unwrap();
        assert!(both.user_count && both.subscription_count);
        assert!(Info::parse(Some("members")).is_err());
    }
}
