//! The node registry: the keygate processes that share the store, with their state and how far
//! each has applied the change feed.

use axum::Json;
use axum::extract::State;
use keygate_core::Timestamp;
use serde::Serialize;
use utoipa::ToSchema;

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Auth, WorkspacesRead};
use crate::service::NodeStatus;

/// One keygate process sharing the store.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    /// `cluster.node_id`, or the host name and gateway port.
    pub id: String,
    pub gateway_address: String,
    pub admin_address: String,
    pub version: String,
    /// `live` (waited for when a token change is acknowledged), `unreachable` (no heartbeat within
    /// `cluster.node_timeout_seconds`) or `stopped` (stopped gracefully).
    pub state: String,
    #[schema(value_type = String, format = DateTime)]
    pub started_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub last_heartbeat_at: Timestamp,
    /// Milliseconds since the last heartbeat, by this node's clock.
    pub heartbeat_age_ms: i64,
    /// The change-feed position the node's token index has applied.
    pub applied_position: u64,
    /// Feed positions committed that the node had not applied at its last heartbeat.
    pub lag: u64,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub stopped_at: Option<Timestamp>,
}

impl From<&NodeStatus> for NodeView {
    fn from(n: &NodeStatus) -> Self {
        Self {
            id: n.node.id.clone(),
            gateway_address: n.node.gateway_address.clone(),
            admin_address: n.node.admin_address.clone(),
            version: n.node.version.clone(),
            state: n.state.as_str().to_owned(),
            started_at: n.node.started_at,
            last_heartbeat_at: n.node.heartbeat_at,
            heartbeat_age_ms: n.heartbeat_age_ms,
            applied_position: n.node.applied_seq,
            lag: n.lag,
            stopped_at: n.node.stopped_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub data: Vec<NodeView>,
    /// Nodes in the `live` state.
    pub live: usize,
}

/// Lists the nodes registered in the store (an instance key: a root key of the default workspace
/// with `workspaces:read`).
#[utoipa::path(get, path = "/admin/v1/nodes", tag = "nodes",
    responses((status = 200, body = NodeList), (status = 403, body = ErrorBody)))]
pub(crate) async fn list_nodes(
    auth: Auth<WorkspacesRead>,
    State(s): State<AdminState>,
) -> Result<Json<NodeList>, ApiError> {
    s.admin.require_instance_key(&auth.key).await?;
    let nodes = s.admin.nodes().await?;
    let live = nodes.iter().filter(|n| n.state == crate::service::NodeState::Live).count();
    Ok(Json(NodeList { data: nodes.iter().map(NodeView::from).collect(), live }))
}
