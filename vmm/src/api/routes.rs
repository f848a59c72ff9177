//! The API's routes: each handler translates HTTP into one manager call
//! and the result (or the error, by its kind) back. The OpenAPI description
//! is made from these handlers and their types ([`openapi`]); docs/api.json
//! is that description, kept equal to it by a test.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::config::{DedupSettings, DedupUpdate, GuestConfig, Source};
use crate::error::{Error, Kind};
use crate::stats_file::SharingStats;
use crate::supervisor::manager::{GuestInfo, GuestSharing, GuestState, Manager};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Every route the server answers: (method, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/guests"),
    ("POST", "/guests"),
    ("GET", "/guests/{id}"),
    ("DELETE", "/guests/{id}"),
    ("POST", "/guests/{id}/start"),
    ("POST", "/guests/{id}/pause"),
    ("POST", "/guests/{id}/resume"),
    ("POST", "/guests/{id}/stop"),
    ("POST", "/guests/{id}/merge"),
    ("PUT", "/guests/{id}/snapshot"),
    ("PUT", "/guests/{id}/balloon"),
    ("GET", "/guests/{id}/console"),
    ("GET", "/dedup/stats"),
    ("GET", "/dedup/audit"),
    ("GET", "/dedup/config"),
    ("PATCH", "/dedup/config"),
    ("GET", "/host"),
    ("GET", "/metrics"),
];

pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/guests", get(list).post(create))
        .route("/guests/{id}", get(get_guest).delete(delete))
        .route("/guests/{id}/start", post(start))
        .route("/guests/{id}/pause", post(pause))
        .route("/guests/{id}/resume", post(resume))
        .route("/guests/{id}/stop", post(stop))
        .route("/guests/{id}/merge", post(merge))
        .route("/guests/{id}/snapshot", put(snapshot))
        .route("/guests/{id}/balloon", put(balloon))
        .route("/guests/{id}/console", get(console))
        .route("/dedup/stats", get(stats))
        .route("/dedup/audit", get(audit))
        .route("/dedup/config", get(get_config).patch(patch_config))
        .route("/host", get(host))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route".into())
        })
        // Bodies are read with our own limit, so an oversized one gets a JSON error too.
        .layer(DefaultBodyLimit::disable())
        .with_state(manager)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "vmm", description = "Guests, each in a process of its own, and their page sharing."),
    paths(
        list,
        create,
        get_guest,
        delete,
        start,
        pause,
        resume,
        stop,
        merge,
        snapshot,
        balloon,
        console,
        stats,
        audit,
        get_config,
        patch_config,
        host,
        metrics
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The OpenAPI description of this API (docs/api.json), with links from a
/// made guest to the routes that take its id.
pub fn openapi_json() -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the description serializes");
    let links: serde_json::Map<String, serde_json::Value> =
        ["get_guest", "delete", "start", "pause", "resume", "stop", "merge", "console", "balloon"]
            .iter()
            .map(|op| {
                (op.to_string(), serde_json::json!({"operationId": op, "parameters": {"id": "$response.body#/id"}}))
            })
            .collect();
    doc["paths"]["/guests"]["post"]["responses"]["201"]["links"] = links.into();
    serde_json::to_string_pretty(&doc).expect("the description serializes")
}

/// An error as the API returns it: a status and `{"error": "..."}`.
pub struct ApiError(pub StatusCode, pub String);

/// The body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e.kind {
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict | Kind::Unresponsive => StatusCode::CONFLICT,
            Kind::BadInput => StatusCode::BAD_REQUEST,
            Kind::Host => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.message)
    }
}

type Reply<T> = Result<T, ApiError>;

/// Runs blocking manager work off the async runtime's thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Reply<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("request failed: {e}"))),
    }
}

fn guest_id(text: &str) -> Reply<usize> {
    text.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("'{text}' is not a guest id")))
}

/// Reads a JSON body of type T, with every failure named.
async fn json_body<T: serde::de::DeserializeOwned>(body: Body) -> Reply<T> {
    let bytes = to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("request body larger than {MAX_BODY} bytes")))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// The guest id in a path: a number, else a 400 naming what was given.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct GuestId {
    /// The guest's id, as `POST /guests` gave it.
    id: u64,
}

#[utoipa::path(get, path = "/guests", responses((status = 200, body = Vec<GuestInfo>)))]
async fn list(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    blocking(move || Ok(Json(m.list()))).await
}

/// Makes a guest, in a process of its own, ready to start.
#[utoipa::path(post, path = "/guests", request_body = GuestConfig, responses(
    (status = 201, description = "made", body = GuestInfo),
    (status = 400, description = "a bad configuration or kernel", body = ErrorBody),
    (status = 413, description = "body too large", body = ErrorBody),
    (status = 500, description = "the host could not make it", body = ErrorBody),
))]
async fn create(State(m): State<Arc<Manager>>, body: Body) -> Reply<impl IntoResponse> {
    let config: GuestConfig = json_body(body).await?;
    let info = blocking(move || m.create(config, Source::Api).and_then(|id| m.get(id))).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/guests/{id}", params(GuestId), responses(
    (status = 200, body = GuestInfo),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
))]
async fn get_guest(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<impl IntoResponse> {
    let id = guest_id(&id)?;
    blocking(move || m.get(id).map(Json)).await
}

/// Stops the guest if it runs, then forgets it.
#[utoipa::path(delete, path = "/guests/{id}", params(GuestId), responses(
    (status = 204, description = "deleted"),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 500, body = ErrorBody),
))]
async fn delete(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<impl IntoResponse> {
    let id = guest_id(&id)?;
    blocking(move || m.delete(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a guest action: the guest afterwards, or the error by its kind.
async fn act(
    m: Arc<Manager>,
    id: String,
    call: fn(&Manager, usize) -> Result<GuestInfo, Error>,
) -> Reply<Json<GuestInfo>> {
    let id = guest_id(&id)?;
    blocking(move || call(&m, id).map(Json)).await
}

/// Starts a created guest.
#[utoipa::path(post, path = "/guests/{id}/start", params(GuestId), responses(
    (status = 200, body = GuestInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 500, body = ErrorBody),
))]
async fn start(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<Json<GuestInfo>> {
    act(m, id, Manager::start).await
}

/// Parks a running guest's vCPUs; its memory stays mapped and mergeable.
#[utoipa::path(post, path = "/guests/{id}/pause", params(GuestId), responses(
    (status = 200, body = GuestInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 500, body = ErrorBody),
))]
async fn pause(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<Json<GuestInfo>> {
    act(m, id, Manager::pause).await
}

#[utoipa::path(post, path = "/guests/{id}/resume", params(GuestId), responses(
    (status = 200, body = GuestInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 500, body = ErrorBody),
))]
async fn resume(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<Json<GuestInfo>> {
    act(m, id, Manager::resume).await
}

/// Ends a guest and waits until it has.
#[utoipa::path(post, path = "/guests/{id}/stop", params(GuestId), responses(
    (status = 200, body = GuestInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 500, body = ErrorBody),
))]
async fn stop(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<Json<GuestInfo>> {
    act(m, id, Manager::stop).await
}

/// Merges what can be merged in the guest now.
#[utoipa::path(post, path = "/guests/{id}/merge", params(GuestId), responses(
    (status = 200, body = GuestInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 500, body = ErrorBody),
))]
async fn merge(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<Json<GuestInfo>> {
    act(m, id, Manager::merge_now).await
}

/// Where to write a snapshot.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    /// A directory that does not exist yet, or is empty (absolute, or
    /// relative to the server's working directory).
    #[schema(value_type = String)]
    dir: std::path::PathBuf,
}

/// A snapshot written.
#[derive(Serialize, ToSchema)]
struct SnapshotReply {
    #[schema(value_type = String)]
    dir: std::path::PathBuf,
    /// Pages of guest memory written (zero pages are holes in the file).
    pages: u64,
    /// How long the guest was held, in milliseconds, beyond its pause.
    held_ms: f64,
}

/// Writes a paused guest to a directory: its state and its memory, which
/// `POST /guests {"restore": DIR}` starts clones of. A running guest is
/// refused (409): pause it first.
#[utoipa::path(put, path = "/guests/{id}/snapshot", params(GuestId), request_body = SnapshotRequest, responses(
    (status = 200, body = SnapshotReply), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 500, body = ErrorBody),
))]
async fn snapshot(State(m): State<Arc<Manager>>, Path(id): Path<String>, body: Body) -> Reply<impl IntoResponse> {
    let id = guest_id(&id)?;
    let request: SnapshotRequest = json_body(body).await?;
    blocking(move || {
        let (dir, written) = m.snapshot(id, &request.dir)?;
        Ok(Json(SnapshotReply { dir, pages: written.pages, held_ms: written.micros as f64 / 1000.0 }))
    })
    .await
}

/// How much a guest's balloon is to hold.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BalloonRequest {
    /// MiB the guest is to give back (0: take everything back), at most
    /// its memory.
    target_mib: u64,
}

/// Asks a guest to give memory back through its balloon, or to take it
/// back; the reply's `balloon` shows where it stands (the guest's driver
/// gets there on its own time). Refused (409) for a guest without a
/// balloon or whose balloon driver has not started.
#[utoipa::path(put, path = "/guests/{id}/balloon", params(GuestId), request_body = BalloonRequest, responses(
    (status = 200, body = GuestInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 500, body = ErrorBody),
))]
async fn balloon(State(m): State<Arc<Manager>>, Path(id): Path<String>, body: Body) -> Reply<Json<GuestInfo>> {
    let id = guest_id(&id)?;
    let request: BalloonRequest = json_body(body).await?;
    blocking(move || m.set_balloon(id, request.target_mib).map(Json)).await
}

/// The last bytes a guest wrote to its console.
#[derive(Serialize, ToSchema)]
struct ConsoleTail {
    id: u64,
    tail: String,
}

#[utoipa::path(get, path = "/guests/{id}/console", params(GuestId), responses(
    (status = 200, body = ConsoleTail), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 500, body = ErrorBody),
))]
async fn console(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Reply<impl IntoResponse> {
    let id = guest_id(&id)?;
    blocking(move || m.console(id).map(|tail| Json(ConsoleTail { id: id as u64, tail }))).await
}

#[derive(Serialize, Default, ToSchema)]
struct GroupStats {
    guests: usize,
    merged_pages: u64,
    zero_pages: u64,
    cow_breaks: u64,
}

#[derive(Serialize, ToSchema)]
struct StatsReply {
    enabled: bool,
    global: Option<SharingStats>,
    /// By guest id.
    #[schema(value_type = BTreeMap<String, GuestSharing>)]
    guests: BTreeMap<usize, GuestSharing>,
    /// By merge group.
    #[schema(value_type = BTreeMap<String, GroupStats>)]
    groups: BTreeMap<u32, GroupStats>,
}

/// From what the scanner last published: never waits for a scan step.
fn stats_of(m: &Manager) -> StatsReply {
    let Some(sharing) = m.sharing() else {
        return StatsReply { enabled: false, global: None, guests: BTreeMap::new(), groups: BTreeMap::new() };
    };
    let published = sharing.published();
    let mut groups: BTreeMap<u32, GroupStats> = BTreeMap::new();
    let mut guests = BTreeMap::new();
    for (&id, s) in &published.guests {
        let g = groups.entry(s.group).or_default();
        g.guests += 1;
        g.merged_pages += s.merged_pages;
        g.zero_pages += s.zero_pages;
        g.cow_breaks += s.cow_breaks;
        guests.insert(id as usize, GuestSharing::from(s));
    }
    StatsReply { enabled: sharing.settings().enabled, global: Some(SharingStats::new(&published)), guests, groups }
}

/// Page-sharing counters: global, per guest and per merge group.
#[utoipa::path(get, path = "/dedup/stats", responses((status = 200, body = StatsReply)))]
async fn stats(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    blocking(move || Ok(Json(stats_of(&m)))).await
}

/// The engine's books recounted.
#[derive(Serialize, ToSchema)]
struct AuditReply {
    /// Frames the stores hold.
    live_frames: u64,
    /// Frames guest pages map or queued merges are for.
    referenced_frames: u64,
    /// Frames nobody uses: always 0.
    leaked_frames: u64,
    /// Pages of memory the stores' files hold.
    store_pages: u64,
}

/// Recounts the stable frames against the guest pages that use them (slow:
/// it waits for a scan step; for tests and soaks).
#[utoipa::path(get, path = "/dedup/audit", responses(
    (status = 200, body = AuditReply), (status = 409, description = "page sharing is off", body = ErrorBody),
))]
async fn audit(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    blocking(move || {
        let a = sharing_of(&m)?.audit();
        Ok(Json(AuditReply {
            live_frames: a.live_frames,
            referenced_frames: a.referenced_frames,
            leaked_frames: a.leaked_frames,
            store_pages: a.store_pages,
        }))
    })
    .await
}

fn sharing_of(m: &Manager) -> Result<&crate::supervisor::sharing::Sharing, Error> {
    m.sharing().ok_or_else(|| Error::conflict("page sharing is off (started with --dedup off or ksm)"))
}

#[utoipa::path(get, path = "/dedup/config", responses(
    (status = 200, body = DedupSettings), (status = 409, description = "page sharing is off", body = ErrorBody),
))]
async fn get_config(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    blocking(move || sharing_of(&m).map(|s| Json(s.settings()))).await
}

/// Changes page-sharing settings, live; the update is checked whole and
/// nothing changes if any part of it is refused.
#[utoipa::path(patch, path = "/dedup/config", request_body = DedupUpdate, responses(
    (status = 200, body = DedupSettings), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
    (status = 413, body = ErrorBody),
))]
async fn patch_config(State(m): State<Arc<Manager>>, body: Body) -> Reply<impl IntoResponse> {
    let update: DedupUpdate = json_body(body).await?;
    blocking(move || sharing_of(&m)?.update(&update).map(Json)).await
}

/// The host the supervisor runs on.
#[derive(Serialize, ToSchema)]
struct HostInfo {
    /// hardware, pvm or unknown.
    kvm: String,
    max_map_count: Option<u64>,
    memory_total_mib: Option<u64>,
    memory_available_mib: Option<u64>,
    guests: usize,
    /// inprocess or off.
    dedup: String,
    supervisor_pid: u32,
    /// Guest processes started ahead of need (`--pool`); absent with `--pool 0`.
    pool: Option<crate::supervisor::pool::PoolStatus>,
}

#[utoipa::path(get, path = "/host", responses((status = 200, body = HostInfo)))]
async fn host(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    blocking(move || {
        let mib = |kib_key: &str| -> Option<u64> {
            let text = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = text.lines().find(|l| l.starts_with(kib_key))?;
            Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
        };
        Ok(Json(HostInfo {
            kvm: match m.host() {
                crate::host::HostKind::Hardware => "hardware",
                crate::host::HostKind::Pvm => "pvm",
                crate::host::HostKind::Unknown => "unknown",
            }
            .into(),
            max_map_count: dedup::os::max_map_count().ok().map(|n| n as u64),
            memory_total_mib: mib("MemTotal:"),
            memory_available_mib: mib("MemAvailable:"),
            guests: m.list().len(),
            dedup: if m.sharing().is_some() { "inprocess" } else { "off" }.into(),
            supervisor_pid: std::process::id(),
            pool: m.pool(),
        }))
    })
    .await
}

/// Prometheus text: guests by state, sharing counters, memory per guest.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    let text = blocking(move || Ok(prometheus_text(&m))).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

fn prometheus_text(m: &Manager) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let guests = m.list();
    out += "# HELP vmm_guests Guests by state.\n# TYPE vmm_guests gauge\n";
    for (state, name) in [
        (GuestState::Created, "created"),
        (GuestState::Running, "running"),
        (GuestState::Paused, "paused"),
        (GuestState::Ended, "ended"),
    ] {
        let n = guests.iter().filter(|g| g.state == state).count();
        let _ = writeln!(out, "vmm_guests{{state=\"{name}\"}} {n}");
    }
    let stats = stats_of(m);
    if let Some(g) = &stats.global {
        for (name, kind, help, value) in [
            ("vmm_dedup_pages_shared", "gauge", "Shared frames in use.", g.pages_shared as f64),
            (
                "vmm_dedup_pages_sharing",
                "gauge",
                "Guest pages on shared frames beyond the first.",
                g.pages_sharing as f64,
            ),
            ("vmm_dedup_zero_pages", "gauge", "Guest pages mapped to the zero page.", g.zero_pages as f64),
            ("vmm_dedup_pages_saved", "gauge", "Host pages saved by sharing.", g.pages_saved as f64),
            ("vmm_dedup_full_scans_total", "counter", "Full scanner passes.", g.full_scans as f64),
            ("vmm_dedup_cow_breaks_total", "counter", "Merged pages written since.", g.cow_breaks as f64),
            ("vmm_dedup_pages_held", "gauge", "Pages held back as they keep changing.", g.pages_held as f64),
            ("vmm_dedup_scanner_cpu_seconds_total", "counter", "Scanner thread CPU time.", g.scanner_cpu_s),
            ("vmm_dedup_stalls_total", "counter", "Times page sharing held a guest thread.", g.stalls as f64),
            ("vmm_dedup_stall_p99_seconds", "gauge", "p99 of those holds.", g.stall_p99_us as f64 / 1e6),
            ("vmm_dedup_stall_max_seconds", "gauge", "Longest of those holds.", g.stall_max_us as f64 / 1e6),
            ("vmm_dedup_errors_total", "counter", "Failures page sharing counted and survived.", g.errors as f64),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out += "# HELP vmm_dedup_holds_total Times a page was held back as it keeps changing, by why.\n\
                # TYPE vmm_dedup_holds_total counter\n";
        for (why, n) in [
            ("after_break", g.held_after_break),
            ("changed_in_merge", g.held_changed_in_merge),
            ("rewritten", g.held_rewritten),
        ] {
            let _ = writeln!(out, "vmm_dedup_holds_total{{why=\"{why}\"}} {n}");
        }
    }
    out += "# HELP vmm_guest_memory_bytes Host memory a guest's process uses.\n# TYPE vmm_guest_memory_bytes gauge\n";
    for g in &guests {
        if let Some(bytes) = g.memory_bytes {
            let _ = writeln!(out, "vmm_guest_memory_bytes{{guest=\"{}\"}} {bytes}", g.id);
        }
    }
    out += "# HELP vmm_guest_throttled_seconds_total Time the memory governor held a guest.\n\
            # TYPE vmm_guest_throttled_seconds_total counter\n";
    for g in &guests {
        let _ =
            writeln!(out, "vmm_guest_throttled_seconds_total{{guest=\"{}\"}} {}", g.id, g.throttled_ms as f64 / 1e3);
    }
    if let Some(stall) = crate::memory::host_memory_stall() {
        out += "# HELP vmm_host_memory_stall_seconds_total Time tasks on the host stalled on memory (PSI): \
                some = at least one, full = all at once.\n# TYPE vmm_host_memory_stall_seconds_total counter\n";
        for (tasks, us) in [("some", stall.some_us), ("full", stall.full_us)] {
            let _ = writeln!(out, "vmm_host_memory_stall_seconds_total{{tasks=\"{tasks}\"}} {}", us as f64 / 1e6);
        }
    }
    let for_memory = m.pressure().ended_for_memory;
    let _ = writeln!(
        out,
        "# HELP vmm_guests_ended_for_memory Guests the memory governor ended.\n\
         # TYPE vmm_guests_ended_for_memory gauge\nvmm_guests_ended_for_memory {for_memory}"
    );
    out += "# HELP vmm_guest_merged_pages Pages of a guest on shared frames.\n# TYPE vmm_guest_merged_pages gauge\n";
    for (id, s) in &stats.guests {
        let _ = writeln!(out, "vmm_guest_merged_pages{{guest=\"{id}\",group=\"{}\"}} {}", s.group, s.merged_pages);
    }
    let balloons: Vec<_> = guests.iter().filter_map(|g| Some((g.id, g.balloon.as_ref()?))).collect();
    out += "# HELP vmm_guest_balloon_mib What a guest's balloon holds and was asked to hold.\n\
            # TYPE vmm_guest_balloon_mib gauge\n";
    for (id, b) in &balloons {
        for (of, mib) in [("actual", b.actual_mib), ("target", b.target_mib)] {
            let _ = writeln!(out, "vmm_guest_balloon_mib{{guest=\"{id}\",of=\"{of}\"}} {mib}");
        }
    }
    out += "# HELP vmm_guest_balloon_pages_total Pages a guest gave back through its balloon, by how.\n\
            # TYPE vmm_guest_balloon_pages_total counter\n";
    for (id, b) in &balloons {
        for (how, n) in [("inflated", b.inflated_pages), ("deflated", b.deflated_pages), ("reported", b.reported_pages)]
        {
            let _ = writeln!(out, "vmm_guest_balloon_pages_total{{guest=\"{id}\",how=\"{how}\"}} {n}");
        }
    }
    out
}
