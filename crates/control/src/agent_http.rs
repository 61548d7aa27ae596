//! The agent's HTTP API (used by the manager).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::agent::{Agent, StepError};
use crate::api::*;
use crate::retry::ErrorClass;

fn err(e: ApiError) -> Response {
    let code = match e.class {
        ErrorClass::Transient => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::Permanent => StatusCode::UNPROCESSABLE_ENTITY,
    };
    (code, Json(e)).into_response()
}

fn step_err(e: StepError) -> Response {
    err(e.to_api())
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/replicas/{name}",
            put(put_replica).delete(delete_replica),
        )
        .route("/v1/replicas/{name}/snapshots", post(snapshot))
        .route(
            "/v1/replicas/{name}/snapshots/{snap}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/replicas/{name}/revert", post(revert))
        .route(
            "/v1/engines/{volume}",
            put(put_engine).delete(delete_engine),
        )
        .route("/v1/engines/{volume}/quiesce", post(quiesce_engine))
        .route("/v1/engines/{volume}/members", post(add_member))
        .route(
            "/v1/engines/{volume}/members/{replica}",
            axum::routing::delete(remove_member),
        )
        .route(
            "/v1/rebuilds/{target}/connection",
            put(rebuild_connect).delete(rebuild_disconnect),
        )
        .route("/v1/rebuilds/{target}/copies", post(copy_start))
        .route("/v1/copies/{op}", get(copy_check))
        .route("/v1/replicas/{name}/head-ranges", get(head_ranges))
        .route("/v1/engines/{volume}/resume", post(resume_engine))
        .route("/v1/desired", put(put_desired))
        .route("/v1/orphans/collect", post(collect))
        .route("/v1/debug/fault", post(set_fault))
        .with_state(agent)
}

async fn status(State(a): State<Arc<Agent>>) -> Response {
    match a.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => err(ApiError {
            message: e.to_string(),
            class: ErrorClass::Transient,
        }),
    }
}

async fn put_replica(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(spec): Json<ReplicaSpec>,
) -> Response {
    if spec.name != name {
        return err(ApiError {
            message: "name in path and body differ".into(),
            class: ErrorClass::Permanent,
        });
    }
    match a.ensure_replica(&spec).await {
        Ok((st, ev)) => Json(json!({"status": st, "events": ev})).into_response(),
        Err(e) => step_err(e),
    }
}

#[derive(Deserialize)]
struct DiskQ {
    disk: String,
}

async fn delete_replica(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(q): Query<DiskQ>,
) -> Response {
    match a.delete_replica(&name, &q.disk).await {
        Ok(ev) => Json(json!({"events": ev})).into_response(),
        Err(e) => step_err(e),
    }
}

#[derive(Deserialize)]
struct SnapReq {
    disk: String,
    snapshot: String,
}

async fn snapshot(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(r): Json<SnapReq>,
) -> Response {
    let alias = crate::naming::lvol_alias(&r.disk, &name);
    match a
        .call(
            "bdev_lvol_snapshot",
            json!({"lvol_name": alias, "snapshot_name": crate::naming::snapshot_lvol(&name, &r.snapshot)}),
        )
        .await
    {
        Ok(v) => Json(json!({"snapshot": v})).into_response(),
        Err(e) if e.code() == Some(-17) => Json(json!({"snapshot": "exists"})).into_response(),
        Err(e) => err(ApiError {
            message: e.to_string(),
            class: e.class(),
        }),
    }
}

async fn delete_snapshot(
    State(a): State<Arc<Agent>>,
    Path((name, snap)): Path<(String, String)>,
    Query(q): Query<DiskQ>,
) -> Response {
    let alias = crate::naming::lvol_alias(&q.disk, &crate::naming::snapshot_lvol(&name, &snap));
    match a.call("bdev_lvol_delete", json!({"name": alias})).await {
        Ok(_) => Json(json!({})).into_response(),
        Err(e) if e.code() == Some(-19) => Json(json!({})).into_response(),
        Err(e) => err(ApiError {
            message: e.to_string(),
            class: e.class(),
        }),
    }
}

async fn revert(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(r): Json<SnapReq>,
) -> Response {
    let alias = crate::naming::lvol_alias(&r.disk, &name);
    let snap =
        crate::naming::lvol_alias(&r.disk, &crate::naming::snapshot_lvol(&name, &r.snapshot));
    match a
        .call(
            "corral_lvol_revert",
            json!({"name": alias, "snapshot_name": snap}),
        )
        .await
    {
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => err(ApiError {
            message: e.to_string(),
            class: e.class(),
        }),
    }
}

async fn put_engine(
    State(a): State<Arc<Agent>>,
    Path(volume): Path<String>,
    Json(spec): Json<EngineSpec>,
) -> Response {
    if spec.volume != volume {
        return err(ApiError {
            message: "volume in path and body differ".into(),
            class: ErrorClass::Permanent,
        });
    }
    match a.ensure_engine(&spec).await {
        Ok(st) => Json(st).into_response(),
        Err(e) => step_err(e),
    }
}

async fn delete_engine(State(a): State<Arc<Agent>>, Path(volume): Path<String>) -> Response {
    match a.delete_engine(&volume).await {
        Ok(ev) => Json(json!({"events": ev})).into_response(),
        Err(e) => step_err(e),
    }
}

async fn quiesce_engine(
    State(a): State<Arc<Agent>>,
    Path(volume): Path<String>,
    Json(q): Json<QuiesceReq>,
) -> Response {
    let drain = std::time::Duration::from_millis(q.drain_timeout_ms);
    let lease = std::time::Duration::from_millis(q.lease_ms);
    match a.quiesce_engine(&volume, drain, lease).await {
        Ok(token) => Json(QuiesceResp { token }).into_response(),
        Err(e) => step_err(e),
    }
}

async fn resume_engine(
    State(a): State<Arc<Agent>>,
    Path(volume): Path<String>,
    Json(r): Json<QuiesceResp>,
) -> Response {
    match a.resume_engine(&volume, r.token).await {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => step_err(e),
    }
}

async fn add_member(
    State(a): State<Arc<Agent>>,
    Path(volume): Path<String>,
    Json(q): Json<AddMemberReq>,
) -> Response {
    match a
        .add_engine_member(&volume, q.epoch, &q.replica, &q.knobs, &q.ranges)
        .await
    {
        Ok(ev) => Json(json!({ "events": ev })).into_response(),
        Err(e) => step_err(e),
    }
}

async fn remove_member(
    State(a): State<Arc<Agent>>,
    Path((volume, replica)): Path<(String, String)>,
) -> Response {
    match a.remove_engine_member(&volume, &replica).await {
        Ok(ev) => Json(json!({ "events": ev })).into_response(),
        Err(e) => step_err(e),
    }
}

async fn rebuild_connect(
    State(a): State<Arc<Agent>>,
    Path(target): Path<String>,
    Json(q): Json<RebuildConnectReq>,
) -> Response {
    match a.rebuild_connect(&target, &q.target, &q.knobs).await {
        Ok((bdev, ev)) => Json(json!({ "bdev": bdev, "events": ev })).into_response(),
        Err(e) => step_err(e),
    }
}

async fn rebuild_disconnect(State(a): State<Arc<Agent>>, Path(target): Path<String>) -> Response {
    match a.rebuild_disconnect(&target).await {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => step_err(e),
    }
}

async fn copy_start(
    State(a): State<Arc<Agent>>,
    Path(target): Path<String>,
    Json(q): Json<CopyReq>,
) -> Response {
    match a
        .rebuild_copy_start(&target, &q.source, &q.disk, &q.snapshot)
        .await
    {
        Ok(op) => Json(json!({ "operation_id": op })).into_response(),
        Err(e) => step_err(e),
    }
}

async fn copy_check(State(a): State<Arc<Agent>>, Path(op): Path<u64>) -> Response {
    match a.rebuild_copy_check(op).await {
        Ok(Some(p)) => Json(p).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(ApiError {
                message: format!("copy {op} is not known to this node's dataplane"),
                class: ErrorClass::Permanent,
            }),
        )
            .into_response(),
        Err(e) => step_err(e),
    }
}

async fn head_ranges(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(q): Query<DiskQ>,
) -> Response {
    match a.head_ranges(&name, &q.disk).await {
        Ok(r) => Json(json!({ "ranges": r })).into_response(),
        Err(e) => step_err(e),
    }
}

async fn put_desired(State(a): State<Arc<Agent>>, Json(d): Json<Desired>) -> Response {
    let taken = a.set_desired(d);
    Json(json!({ "taken": taken })).into_response()
}

#[derive(Deserialize)]
struct CollectQ {
    #[serde(default)]
    force: bool,
}

async fn collect(State(a): State<Arc<Agent>>, Query(q): Query<CollectQ>) -> Response {
    match a.collect_orphans(q.force).await {
        Ok(ev) => Json(json!({"events": ev})).into_response(),
        Err(e) => err(ApiError {
            message: e.to_string(),
            class: e.class(),
        }),
    }
}

#[derive(Deserialize)]
struct FaultReq {
    point: Option<String>,
}

async fn set_fault(State(a): State<Arc<Agent>>, Json(f): Json<FaultReq>) -> Response {
    tracing::warn!(point = ?f.point, "fault injection point set");
    a.set_fault(f.point);
    Json(json!({})).into_response()
}

/// Runs the agent's HTTP API and its background loop (orphan collection).
pub async fn serve(
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(agent.cfg.listen).await?;
    tracing::info!(addr = %agent.cfg.listen, node = %agent.cfg.node, "agent API listening");
    agent.ensure_disks().await;
    let bg = agent.clone();
    let collector = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            if !bg.cfg.orphan_grace.is_zero() {
                if let Err(e) = bg.collect_orphans(false).await {
                    tracing::debug!("orphan sweep: {e}");
                }
            }
        }
    });
    let r = axum::serve(listener, router(agent))
        .with_graceful_shutdown(shutdown)
        .await;
    collector.abort();
    r
}
