//! The manager's HTTP/JSON API (what the CLI talks to) and /metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::manager::{Manager, OpError};
use crate::model::{AttachSpec, Frontend};

fn err(e: OpError) -> Response {
    let code = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        Json(json!({"error": e.message, "advice": e.advice, "class": e.class})),
    )
        .into_response()
}

fn ok<T: serde::Serialize>(r: Result<T, OpError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => err(e),
    }
}

pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/nodes", get(nodes).post(register))
        .route("/v1/disks", get(disks))
        .route("/v1/volumes", get(volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(volume).delete(delete_volume))
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/detach", post(detach))
        .route("/v1/volumes/{name}/expand", post(expand))
        .route("/v1/volumes/{name}/salvage", post(salvage))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(snapshots).post(create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/volumes/{name}/snapshots/{snap}/revert", post(revert))
        .route("/v1/replicas", get(replicas))
        .route("/v1/replicas/{name}", axum::routing::delete(delete_replica))
        .route("/v1/controllers", get(controllers))
        .route("/v1/orphans", get(orphans))
        .route("/v1/orphans/collect", post(collect))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .with_state(m)
}

async fn nodes(State(m): State<Arc<Manager>>) -> Response {
    ok(m.nodes())
}

#[derive(Deserialize)]
struct Register {
    name: String,
    agent_url: String,
    address: String,
}

async fn register(State(m): State<Arc<Manager>>, Json(r): Json<Register>) -> Response {
    ok(m.register_node(&r.name, &r.agent_url, &r.address))
}

async fn disks(State(m): State<Arc<Manager>>) -> Response {
    ok(m.nodes().map(|ns| {
        ns.into_iter()
            .flat_map(|n| {
                n.disks
                    .into_iter()
                    .map(move |d| json!({"node": n.name, "disk": d}))
            })
            .collect::<Vec<_>>()
    }))
}

async fn volumes(State(m): State<Arc<Manager>>) -> Response {
    ok(m.volumes())
}

#[derive(Deserialize)]
struct CreateVolume {
    name: String,
    size_bytes: u64,
    #[serde(default = "three")]
    replicas: u32,
}

fn three() -> u32 {
    3
}

async fn create_volume(State(m): State<Arc<Manager>>, Json(c): Json<CreateVolume>) -> Response {
    ok(m.create_volume(&c.name, c.size_bytes, c.replicas))
}

#[derive(Deserialize)]
struct VolumeQuery {
    /// Answer only once an event about this volume newer than this sequence
    /// number exists (or `wait_ms` passed): a long poll for waiting clients.
    wait_after: Option<u64>,
    wait_ms: Option<u64>,
}

/// The longest a volume long poll is held.
const MAX_WAIT: Duration = Duration::from_secs(5);

async fn volume(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    Query(q): Query<VolumeQuery>,
) -> Response {
    if let Some(after) = q.wait_after {
        let max = Duration::from_millis(q.wait_ms.unwrap_or(250)).min(MAX_WAIT);
        m.wait_for_event(&name, after, max).await;
    }
    // Read before the volume: a change with a lower number is in what follows.
    let seq = m.event_seq();
    ok(m.volume(&name).and_then(|v| {
        let replicas = m.replicas(Some(&name))?;
        let snapshots = m.snapshots(&name)?;
        Ok(json!({"volume": v, "replicas": replicas, "snapshots": snapshots, "event_seq": seq}))
    }))
}

async fn delete_volume(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Response {
    ok(m.delete_volume(&name).map(|_| json!({})))
}

async fn delete_replica(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Response {
    ok(m.delete_replica(&name).await.map(|_| json!({})))
}

#[derive(Deserialize)]
struct Attach {
    node: Option<String>,
    #[serde(default)]
    frontend: Frontend,
}

async fn attach(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    Json(a): Json<Attach>,
) -> Response {
    let node = match a.node {
        Some(n) => n,
        None => match m.nodes() {
            // Default: the first ready node (a single-node setup needs no choice).
            Ok(ns) => match ns.into_iter().find(|n| n.ready) {
                Some(n) => n.name,
                None => return err(OpError::transient("no ready node to attach on")),
            },
            Err(e) => return err(e),
        },
    };
    if let Err(e) = m.node(&node) {
        return err(e);
    }
    ok(m.set_attach(
        &name,
        Some(AttachSpec {
            node,
            frontend: a.frontend,
        }),
    ))
}

async fn detach(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Response {
    ok(m.set_attach(&name, None))
}

#[derive(Deserialize)]
struct Expand {
    size_bytes: u64,
}

async fn expand(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    Json(e): Json<Expand>,
) -> Response {
    ok(m.expand_volume(&name, e.size_bytes))
}

async fn salvage(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Response {
    ok(m.salvage(&name))
}

async fn snapshots(State(m): State<Arc<Manager>>, Path(name): Path<String>) -> Response {
    ok(m.snapshots(&name))
}

#[derive(Deserialize)]
struct CreateSnap {
    name: String,
}

async fn create_snapshot(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    Json(s): Json<CreateSnap>,
) -> Response {
    ok(m.create_snapshot(&name, &s.name).await)
}

async fn delete_snapshot(
    State(m): State<Arc<Manager>>,
    Path((name, snap)): Path<(String, String)>,
) -> Response {
    ok(m.delete_snapshot(&name, &snap).await.map(|_| json!({})))
}

async fn revert(
    State(m): State<Arc<Manager>>,
    Path((name, snap)): Path<(String, String)>,
) -> Response {
    ok(m.revert_snapshot(&name, &snap).await.map(|_| json!({})))
}

async fn replicas(State(m): State<Arc<Manager>>) -> Response {
    ok(m.replicas(None))
}

#[derive(Deserialize)]
struct CtrlQ {
    #[serde(default)]
    orphans: bool,
}

async fn controllers(State(m): State<Arc<Manager>>, Query(q): Query<CtrlQ>) -> Response {
    let all = m.controllers();
    let v: Vec<_> = all
        .into_iter()
        .filter(|(_, _, o)| !q.orphans || *o)
        .map(|(n, c, o)| json!({"node": n, "controller": c, "orphan": o}))
        .collect();
    if q.orphans {
        // --orphans lists every orphaned resource, controllers first.
        let rest: Vec<_> = m
            .orphans()
            .into_iter()
            .filter(|(_, o)| o.kind != "controller")
            .map(|(n, o)| json!({"node": n, "orphan": o}))
            .collect();
        let mut all = v;
        all.extend(rest);
        return Json(all).into_response();
    }
    Json(v).into_response()
}

async fn orphans(State(m): State<Arc<Manager>>) -> Response {
    Json(
        m.orphans()
            .into_iter()
            .map(|(n, o)| json!({"node": n, "orphan": o}))
            .collect::<Vec<_>>(),
    )
    .into_response()
}

#[derive(Deserialize)]
struct CollectQ {
    #[serde(default)]
    force: bool,
}

async fn collect(State(m): State<Arc<Manager>>, Query(q): Query<CollectQ>) -> Response {
    ok(m.collect_orphans(q.force)
        .await
        .map(|n| json!({"collected": n})))
}

#[derive(Deserialize)]
struct EventsQ {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    follow: bool,
}

/// Events as JSON, or with `follow=true` as a never-ending stream of JSON
/// lines (a bare newline every 15 s keeps idle followers honest).
async fn events(State(m): State<Arc<Manager>>, Query(q): Query<EventsQ>) -> Response {
    // Subscribe before reading the past so that nothing falls in between.
    let mut sub = m.events_tx.subscribe();
    let past = match m.events_since(q.since) {
        Ok(p) => p,
        Err(e) => return err(e),
    };
    if !q.follow {
        return Json(past).into_response();
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, Infallible>>(64);
    tokio::spawn(async move {
        let mut last = q.since;
        for e in past {
            last = e.seq;
            if tx.send(Ok(line(&e))).await.is_err() {
                return;
            }
        }
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(15), sub.recv()).await {
                Ok(Ok(e)) if e.seq > last => {
                    last = e.seq;
                    line(&e)
                }
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    continue
                }
                Ok(Err(_)) => return,
                Err(_) => "\n".to_string(),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn line(e: &crate::model::Event) -> String {
    let mut s = serde_json::to_string(e).unwrap_or_default();
    s.push('\n');
    s
}

async fn metrics(State(m): State<Arc<Manager>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.metrics(),
    )
        .into_response()
}

/// Serves the manager's API and runs its reconcile loop.
pub async fn serve(
    m: Arc<Manager>,
    listen: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listen, "manager API listening");
    let looper = tokio::spawn(m.clone().run());
    let r = axum::serve(listener, router(m))
        .with_graceful_shutdown(shutdown)
        .await;
    looper.abort();
    r
}
