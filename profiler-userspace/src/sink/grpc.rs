//! OTLP gRPC export: one long-lived channel to the backend, fed by the export queue.
//!
//! A failed export is one of three kinds ([`classify`]):
//! - [`Failure::Down`]: no answer from the backend (it cannot be reached, the
//!   connection broke, our deadline passed), `UNAVAILABLE`, or `DEADLINE_EXCEEDED`
//!   from the server (it ran out of time). The request stays at the front of the
//!   queue and is retried with exponential backoff and jitter, however long the
//!   outage lasts: new profiles queue behind it and the queue's byte bound drops the
//!   oldest.
//! - [`Failure::Throttled`]: the status carries a `google.rpc.RetryInfo` (the way
//!   an OTLP backend throttles, with `RESOURCE_EXHAUSTED` or `UNAVAILABLE`): the
//!   request is retried as for `Down`, but not before the delay the backend asked
//!   for.
//! - [`Failure::Refused`]: the backend is up and answered this request with a status
//!   that may change on a retry (`RESOURCE_EXHAUSTED`, `UNKNOWN`, ...), but may as
//!   well be about this request (grpc-go answers an oversized message with
//!   `RESOURCE_EXHAUSTED`, a proxy's 413 arrives as `UNKNOWN`). The request gets at
//!   most [`MAX_REFUSED_ATTEMPTS`] attempts, then it is given up (counted, logged
//!   once per cause), so it cannot hold up the requests behind it.
//! - [`Failure::Permanent`]: any other status. The request is dropped at once and
//!   the cause is logged once.
//!
//! Logs at info are state changes only (backend down / back); warnings are once per
//! episode or once per cause; per-request detail is debug.
//!
//! Requests are queued already encoded (protobuf bytes), so the queue's byte bound is
//! the real memory they take; a pass-through codec sends them as they are.
//!
//! Must never: block the agent's cycle (it only pushes to the queue), or hold more
//! than the queue's bound.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::{BufMut as _, Bytes};
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;
use prost::Message as _;
use tonic::{
    client::Grpc,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    metadata::{MetadataKey, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Status,
};
use tracing::{debug, info, warn};

use super::queue::ExportQueue;

/// A request waiting for export: an encoded `ExportProfilesServiceRequest`.
pub type QueuedRequest = Bytes;

/// The gRPC method we call.
pub const EXPORT_PATH: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// First retry delay; doubled per failure up to [`MAX_BACKOFF`], with ±50 % jitter.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Attempts a request gets while the backend answers it with a status that may
/// change ([`Failure::Refused`]), the first included: 4, so retries after about
/// 0.5, 1 and 2 s (±50 %, the backoff of this request's own refusals), then the
/// request is given up. A request the backend will never take (too large for it, say)
/// thus holds the ones behind it for ~3.5 s (at most ~5.3 s), well under one 15 s
/// interval, instead of until the full queue evicts it; one the backend refused for a
/// passing reason still gets three more chances. Failures while the backend is down
/// ([`Failure::Down`]) do not count: an outage keeps requests queued.
pub const MAX_REFUSED_ATTEMPTS: u32 = 4;

/// Distinct messages logged per status code: a cause is the code and its message with
/// the digits masked (`#`), so sizes and counts do not make each request a new cause;
/// this caps the rest (request ids with letters, ...).
pub const MAX_CAUSES_PER_CODE: usize = 4;

/// Distinct `partial_success` messages logged (digits masked likewise).
pub const MAX_PARTIAL_MESSAGES: usize = 16;

/// Characters of a message that make its cause: enough to tell causes apart, while
/// a message that goes on with request details is still one cause.
pub const CAUSE_CHARS: usize = 80;

/// HTTP/2 keepalive: a PING this often, and only while a request is in flight (not
/// while idle). grpc-go servers, among them the OpenTelemetry Collector, by default
/// allow a client at most one ping per 5 minutes and none without an active stream;
/// a client that pings more often gets, at its third such ping, GOAWAY
/// `too_many_pings` and its connection closed, failing the requests on it. So 5
/// minutes, that floor; as requests have a deadline (`--timeout`, 10 s by default),
/// a ping goes out only for a request stuck longer than that. A dead idle connection
/// is found by TCP keepalive ([`TCP_KEEPALIVE`]), which the server's gRPC layer never
/// sees, and by the next request's deadline.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// TCP keepalive probes on the connection when idle (kernel-level, invisible to gRPC).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    /// `http://host:port` (plain) or `https://host:port` (TLS).
    pub endpoint: String,
    /// Extra metadata on every request (e.g. `authorization`).
    pub headers: Vec<(String, String)>,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub gzip: bool,
    /// Per-request deadline.
    pub timeout: Duration,
}

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The endpoint is not a valid URI.
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TLS settings rejected.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A header name or value that gRPC metadata cannot carry.
    #[error("invalid OTLP header {0:?}")]
    Header(String),
}

/// Counters of the exporter.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub sent_requests: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub retries: AtomicU64,
    /// Requests dropped after a permanent error.
    pub rejected_requests: AtomicU64,
    /// Requests given up after [`MAX_REFUSED_ATTEMPTS`] refusals by a backend that
    /// was up ([`Failure::Refused`]).
    pub given_up_requests: AtomicU64,
    /// Profiles the backend reported as rejected in `partial_success`.
    pub partially_rejected_profiles: AtomicU64,
}

/// Longest wait a backend's `RetryInfo` gets: a longer one (or a garbled one) is
/// cut to this, so a profile is not held for hours on one answer.
pub const MAX_THROTTLE_DELAY: Duration = Duration::from_secs(5 * 60);

/// Shortest wait a backend's `RetryInfo` gets: [`INITIAL_BACKOFF`], so a backend
/// that asks for no wait at all (`retry_delay` 0) gets at most two attempts a
/// second, not a hot loop of them.
pub const MIN_THROTTLE_DELAY: Duration = INITIAL_BACKOFF;

/// Longest wait between attempts once the agent is shutting down: the last requests
/// get tried again within its deadline (`--shutdown-timeout`) rather than after an
/// outage's 30 s backoff. The backoff sleep under way when shutdown begins ends at
/// once.
pub const SHUTDOWN_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long a logged cause stays logged: the same cause again after this long (a
/// token that expires again next week) is logged again, with the counts since.
pub const CAUSE_RELOG_AFTER: Duration = Duration::from_secs(60 * 60);

/// What a failed export means for the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The backend is down or unreachable: no answer (connect, TLS or connection
    /// failures, our deadline passing, a stream the server refused before any work),
    /// or `UNAVAILABLE`, which servers and proxies (HTTP 429, 502, 503, 504) answer
    /// when the backend cannot take anything now, or `DEADLINE_EXCEEDED` from the
    /// server. Retried without an attempt bound.
    Down,
    /// The backend answered with a `google.rpc.RetryInfo` in the status details: it
    /// is up, and asks for this wait (at most [`MAX_THROTTLE_DELAY`]) before the
    /// next attempt. Retried without an attempt bound (the queue's bound applies).
    Throttled(Duration),
    /// The backend is up and refused this request with a status a retry may change
    /// (`RESOURCE_EXHAUSTED` without a `RetryInfo`, `UNKNOWN` (an HTTP answer without
    /// a gRPC status, e.g. a proxy's 413), `ABORTED`, `CANCELLED`, `OUT_OF_RANGE`,
    /// `DATA_LOSS`), or reset its stream. Retried at most [`MAX_REFUSED_ATTEMPTS`].
    Refused,
    /// Any other status (`INVALID_ARGUMENT`, `UNAUTHENTICATED`, `PERMISSION_DENIED`,
    /// `UNIMPLEMENTED`, `INTERNAL`, ...): retrying cannot help. Dropped at once.
    Permanent,
}

/// What a failed export means. A status the server sent has no source error; one
/// tonic made from a local error (connect, I/O, timeout, HTTP/2) has one.
pub fn classify(status: &Status) -> Failure {
    if let Some(delay) = retry_delay(status.details()) {
        return Failure::Throttled(delay.min(MAX_THROTTLE_DELAY));
    }
    let answered = match std::error::Error::source(status) {
        None => true,
        // The server reset this request's stream (HTTP/2 RST_STREAM): it is up and
        // will not take this request; but REFUSED_STREAM says it did no work and is
        // going away or overloaded, like a server that is down.
        Some(source) => {
            let text = with_sources(String::new(), Some(source));
            text.contains("stream error received") && !text.contains("refused stream")
        }
    };
    classify_code(status.code(), answered)
}

/// What a failed export with `code` means; `answered`: the server sent it.
pub fn classify_code(code: Code, answered: bool) -> Failure {
    match code {
        Code::Unavailable | Code::DeadlineExceeded => Failure::Down,
        _ if !answered => Failure::Down,
        Code::ResourceExhausted
        | Code::Unknown
        | Code::Aborted
        | Code::Cancelled
        | Code::OutOfRange
        | Code::DataLoss => Failure::Refused,
        _ => Failure::Permanent,
    }
}

/// The `retry_delay` of a `google.rpc.RetryInfo` in a status's details (the
/// encoded `google.rpc.Status` of the `grpc-status-details-bin` trailer), if any.
/// Garbled details are no delay: the status's code decides.
pub fn retry_delay(details: &[u8]) -> Option<Duration> {
    const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
    if details.is_empty() {
        return None;
    }
    let status = rpc::Status::decode(details).ok()?;
    let info = status
        .details
        .iter()
        .find(|any| any.type_url == RETRY_INFO)?;
    let delay = rpc::RetryInfo::decode(info.value.as_slice())
        .ok()?
        .retry_delay?;
    Some(
        match (u64::try_from(delay.seconds), u32::try_from(delay.nanos)) {
            (Ok(secs), Ok(nanos)) if nanos < 1_000_000_000 => Duration::new(secs, nanos),
            _ => MAX_THROTTLE_DELAY,
        },
    )
}

/// The few `google.rpc` messages a status's details are read with (from
/// google/rpc/status.proto, error_details.proto and protobuf's any/duration).
mod rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<ProtoDuration>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ProtoDuration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// What was logged already, so each cause is logged once per
/// [`CAUSE_RELOG_AFTER`]: keyed by a status code and [`cause_of`] its message, with
/// when it was last logged; at most `per_code` messages per code (so at most 17
/// codes times that in all; `partial_success` messages go under code 0).
struct LoggedCauses {
    logged: HashMap<(i32, String), Instant>,
    per_code: usize,
}

impl LoggedCauses {
    fn new(per_code: usize) -> Self {
        LoggedCauses {
            logged: HashMap::new(),
            per_code,
        }
    }

    /// True if this cause is to be logged now: the first time it is seen, or again
    /// [`CAUSE_RELOG_AFTER`] after it was last logged. A new cause of a code that
    /// has `per_code` of them takes the place of one logged that long ago, if any.
    fn first(&mut self, code: i32, message: &str) -> bool {
        self.first_at(code, message, Instant::now())
    }

    fn first_at(&mut self, code: i32, message: &str, now: Instant) -> bool {
        let stale = |at: &Instant| now.saturating_duration_since(*at) >= CAUSE_RELOG_AFTER;
        let key = (code, cause_of(message));
        if let Some(at) = self.logged.get_mut(&key) {
            if !stale(at) {
                return false;
            }
            *at = now;
            return true;
        }
        if self.logged.keys().filter(|(c, _)| *c == code).count() >= self.per_code {
            let Some(old) = self
                .logged
                .iter()
                .find(|((c, _), at)| *c == code && stale(at))
                .map(|(k, _)| k.clone())
            else {
                return false;
            };
            self.logged.remove(&old);
        }
        self.logged.insert(key, now);
        true
    }
}

/// The cause a message names: its first [`CAUSE_CHARS`] characters with each run of
/// digits as `#` ("message larger than max (5000000 vs. 4194304)" and "... (4200000
/// vs. 4194304)" are one cause).
fn cause_of(message: &str) -> String {
    let mut cause = String::new();
    for c in message.chars().take(CAUSE_CHARS) {
        if c.is_ascii_digit() {
            if !cause.ends_with('#') {
                cause.push('#');
            }
        } else {
            cause.push(c);
        }
    }
    cause
}

/// A `partial_success` the backend answered with.
#[derive(Debug, Default, PartialEq, Eq)]
struct Partial {
    rejected_profiles: u64,
    message: String,
}

/// Sends encoded requests as they are; decodes the response with prost.
#[derive(Clone, Copy, Debug, Default)]
struct EncodedCodec;

impl Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = ExportProfilesServiceResponse;
    type Encoder = EncodedCodec;
    type Decoder = EncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for EncodedCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for EncodedCodec {
    type Item = ExportProfilesServiceResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        ExportProfilesServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable export response: {e}")))
    }
}

/// The connected client (connection is lazy: a backend that is down at start is
/// retried like any other outage).
pub struct Exporter {
    client: Grpc<Channel>,
    headers: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
    timeout: Duration,
    endpoint: String,
    /// `Some(client certificate given?)` for an https:// endpoint.
    tls: Option<bool>,
}

impl Exporter {
    pub fn new(config: &GrpcConfig) -> Result<Exporter, GrpcError> {
        let endpoint_err = |reason: String| GrpcError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| endpoint_err(e.to_string()))?
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .timeout(config.timeout)
            .tcp_keepalive(Some(TCP_KEEPALIVE))
            .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(false);
        // `Some(client certificate given?)` for TLS, which the log's hints need.
        let tls = match endpoint.uri().scheme_str() {
            Some("https") => {
                let mut tls = ClientTlsConfig::new();
                tls = match &config.ca_file {
                    Some(path) => tls.ca_certificate(Certificate::from_pem(read(path)?)),
                    None => tls.with_native_roots(),
                };
                if let Some((cert, key)) = &config.client_cert {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                endpoint = endpoint.tls_config(tls).map_err(|e| {
                    GrpcError::Tls(with_sources(e.to_string(), std::error::Error::source(&e)))
                })?;
                Some(config.client_cert.is_some())
            }
            Some("http") => None,
            _ => {
                return Err(endpoint_err(
                    "the scheme must be http:// or https://".into(),
                ))
            }
        };
        let channel = endpoint.connect_lazy();
        let mut client = Grpc::new(channel)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(4 << 20);
        if config.gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| {
                let key = MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| GrpcError::Header(k.clone()))?;
                let value = MetadataValue::try_from(v.as_str())
                    .map_err(|_| GrpcError::Header(format!("{k}: <value>")))?;
                Ok((key, value))
            })
            .collect::<Result<_, GrpcError>>()?;
        Ok(Exporter {
            client,
            headers,
            timeout: config.timeout,
            endpoint: config.endpoint.clone(),
            tls,
        })
    }

    /// Sends one request; its `partial_success`, if the backend reported one.
    async fn send(&mut self, request: &Bytes) -> Result<Option<Partial>, Status> {
        let mut req = tonic::Request::new(request.clone());
        req.set_timeout(self.timeout);
        for (k, v) in &self.headers {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        self.client
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let response = self
            .client
            .unary(req, PathAndQuery::from_static(EXPORT_PATH), EncodedCodec)
            .await?
            .into_inner();
        Ok(response
            .partial_success
            .map(|p| Partial {
                rejected_profiles: p.rejected_profiles.max(0) as u64,
                message: p.error_message,
            })
            .filter(|p| p.rejected_profiles > 0 || !p.message.is_empty()))
    }

    /// Sends queued requests until the queue is closed and empty.
    pub async fn run(mut self, queue: Arc<ExportQueue<QueuedRequest>>, stats: Arc<ExportStats>) {
        let mut log = ExportLog::default();
        let mut retries = Retries::default();
        let mut jitter = Jitter::new();
        loop {
            let Some((id, request)) = queue.front() else {
                if queue.is_closed() {
                    return;
                }
                queue.wait().await;
                continue;
            };
            let bytes = request.len() as u64;
            let sent = self.send(&request).await;
            // Not held through a backoff: dropped from the queue meanwhile, it is freed.
            drop(request);
            let status = match sent {
                Ok(partial) => {
                    queue.remove(id);
                    stats.sent_requests.fetch_add(1, Ordering::Relaxed);
                    stats.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                    retries.sent();
                    log.sent(&self.endpoint);
                    if let Some(partial) = partial {
                        let total = stats
                            .partially_rejected_profiles
                            .fetch_add(partial.rejected_profiles, Ordering::Relaxed)
                            + partial.rejected_profiles;
                        log.partial(&self.endpoint, &partial, total);
                    }
                    debug!(bytes, queued = queue.len(), "exported profiles");
                    continue;
                }
                Err(status) => status,
            };
            let failure = classify(&status);
            let next = retries.failed(id, failure);
            match next {
                Next::Retry(delay) | Next::Wait(delay) => {
                    log.retrying(&self.endpoint, &status, self.tls, failure);
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    let jittered = jitter.apply(delay);
                    let mut delay = match next {
                        Next::Wait(_) => jittered.max(delay),
                        _ => jittered,
                    };
                    let closing = queue.is_closed();
                    if closing {
                        delay = delay.min(SHUTDOWN_RETRY_DELAY);
                    }
                    debug!(?delay, code = ?status.code(), ?failure, "export failed, will retry");
                    // Shutdown cuts the sleep short: the last requests are tried
                    // again while its deadline lasts.
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = queue.closed(), if !closing => {}
                    }
                }
                Next::GiveUp { attempts } => {
                    queue.remove(id);
                    let given_up = stats.given_up_requests.fetch_add(1, Ordering::Relaxed) + 1;
                    log.given_up(&self.endpoint, &status, self.tls, attempts, given_up);
                }
                Next::Drop => {
                    queue.remove(id);
                    let rejected = stats.rejected_requests.fetch_add(1, Ordering::Relaxed) + 1;
                    log.rejected(&self.endpoint, &status, self.tls, rejected);
                }
            }
        }
    }
}

/// What to do with the front request after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Send it again after this delay (before jitter).
    Retry(Duration),
    /// Send it again after at least this delay (the backend's; jitter only adds).
    Wait(Duration),
    /// Refused [`MAX_REFUSED_ATTEMPTS`] times: remove it and count it.
    GiveUp { attempts: u32 },
    /// A permanent error: remove it and count it.
    Drop,
}

/// The retry state: the front request's refusals and the outage's failures.
#[derive(Debug, Default)]
struct Retries {
    /// The request the backend refused last (queue id) and how often in a row.
    refused: Option<(u64, u32)>,
    /// Consecutive attempts that failed with the backend down, for their backoff.
    down_failures: u32,
}

impl Retries {
    /// The request `id` failed with `failure`.
    fn failed(&mut self, id: u64, failure: Failure) -> Next {
        match failure {
            // Refusals of the request are kept: an outage between them does not
            // reset its count.
            Failure::Down => {
                self.down_failures = self.down_failures.saturating_add(1);
                Next::Retry(backoff(self.down_failures))
            }
            // Up, and it said how long to wait: no backoff of our own on top, but no
            // less than MIN_THROTTLE_DELAY.
            Failure::Throttled(delay) => {
                self.down_failures = 0;
                Next::Wait(delay.max(MIN_THROTTLE_DELAY))
            }
            // The backend answered, so it is up: the outage backoff starts over, and
            // this request's own refusals set its delay, so a backend that refuses
            // every request gives each the same few seconds.
            Failure::Refused => {
                self.down_failures = 0;
                let attempts = match self.refused {
                    Some((front, n)) if front == id => n + 1,
                    _ => 1,
                };
                if attempts >= MAX_REFUSED_ATTEMPTS {
                    self.refused = None;
                    Next::GiveUp { attempts }
                } else {
                    self.refused = Some((id, attempts));
                    Next::Retry(backoff(attempts))
                }
            }
            Failure::Permanent => {
                self.down_failures = 0;
                Next::Drop
            }
        }
    }

    /// A request went through.
    fn sent(&mut self) {
        self.down_failures = 0;
        self.refused = None;
    }
}

/// The exporter's log: the failing episode's start and end once each (per kind of
/// failure), and each cause of a dropped request or partial rejection once.
struct ExportLog {
    /// Failed attempts since the last request went through.
    failed_attempts: u32,
    /// Warned already in this episode that the backend is down / refuses requests.
    warned_down: bool,
    warned_refused: bool,
    warned_throttled: bool,
    rejected: LoggedCauses,
    given_up: LoggedCauses,
    partial: LoggedCauses,
}

impl Default for ExportLog {
    fn default() -> Self {
        ExportLog {
            failed_attempts: 0,
            warned_down: false,
            warned_refused: false,
            warned_throttled: false,
            rejected: LoggedCauses::new(MAX_CAUSES_PER_CODE),
            given_up: LoggedCauses::new(MAX_CAUSES_PER_CODE),
            partial: LoggedCauses::new(MAX_PARTIAL_MESSAGES),
        }
    }
}

impl ExportLog {
    /// A request went through: the end of a failing episode, if one was on.
    fn sent(&mut self, endpoint: &str) {
        if self.failed_attempts > 0 {
            if self.warned_down {
                info!(
                    endpoint,
                    failed_attempts = self.failed_attempts,
                    "OTLP backend is reachable again"
                );
            } else {
                info!(
                    endpoint,
                    failed_attempts = self.failed_attempts,
                    "OTLP backend accepts requests again"
                );
            }
        }
        self.failed_attempts = 0;
        self.warned_down = false;
        self.warned_refused = false;
        self.warned_throttled = false;
    }

    /// An attempt failed and the request will be retried.
    fn retrying(&mut self, endpoint: &str, status: &Status, tls: Option<bool>, failure: Failure) {
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        match failure {
            Failure::Down if !self.warned_down => {
                self.warned_down = true;
                warn!(
                    endpoint,
                    code = ?status.code(),
                    message = %describe(status, tls),
                    "OTLP backend unavailable; retrying with backoff, profiles wait in the bounded queue"
                );
            }
            Failure::Throttled(delay) if !self.warned_throttled => {
                self.warned_throttled = true;
                warn!(
                    endpoint,
                    code = ?status.code(),
                    message = %describe(status, tls),
                    ?delay,
                    "OTLP backend throttles exports: retrying after the delay it asks for, profiles wait in the bounded queue"
                );
            }
            Failure::Refused if !self.warned_refused => {
                self.warned_refused = true;
                warn!(
                    endpoint,
                    code = ?status.code(),
                    message = %describe(status, tls),
                    max_attempts = MAX_REFUSED_ATTEMPTS,
                    "OTLP backend refuses a request: it is up and answers, but not with success; retrying the request with backoff, then giving it up"
                );
            }
            _ => {}
        }
    }

    /// A request refused [`MAX_REFUSED_ATTEMPTS`] times was given up.
    fn given_up(
        &mut self,
        endpoint: &str,
        status: &Status,
        tls: Option<bool>,
        attempts: u32,
        given_up_requests: u64,
    ) {
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        if self.given_up.first(status.code() as i32, status.message()) {
            warn!(
                endpoint,
                code = ?status.code(),
                message = %describe(status, tls),
                attempts,
                given_up_requests,
                "OTLP backend kept refusing a request; gave it up, its profiles are lost (logged once per cause, all counted)"
            );
        } else {
            debug!(code = ?status.code(), attempts, given_up_requests, "gave up another request");
        }
    }

    /// A request was dropped after a permanent error.
    fn rejected(
        &mut self,
        endpoint: &str,
        status: &Status,
        tls: Option<bool>,
        rejected_requests: u64,
    ) {
        if self.rejected.first(status.code() as i32, status.message()) {
            warn!(
                endpoint,
                code = ?status.code(),
                message = %describe(status, tls),
                rejected_requests,
                "OTLP backend rejected profiles permanently; dropping them (logged once per cause, all counted)"
            );
        } else {
            debug!(code = ?status.code(), rejected_requests, "rejected again");
        }
    }

    /// The backend took a request but reported `partial_success`.
    fn partial(&mut self, endpoint: &str, partial: &Partial, total_rejected_profiles: u64) {
        if !self.partial.first(0, &partial.message) {
            debug!(
                rejected_profiles = partial.rejected_profiles,
                total_rejected_profiles, "partial success again"
            );
        } else if partial.rejected_profiles > 0 {
            warn!(
                endpoint,
                rejected_profiles = partial.rejected_profiles,
                total_rejected_profiles,
                message = %partial.message,
                "OTLP backend rejected some profiles of a request (partial_success); counted, logged once per message"
            );
        } else {
            warn!(
                endpoint,
                message = %partial.message,
                "OTLP backend accepted a request with a warning (partial_success); logged once per message"
            );
        }
    }
}

/// A status's message and the chain of errors under it (a transport error's
/// message alone is just "transport error"), with a hint for the usual TLS
/// failures. `tls`: `Some(client certificate given?)` for an https:// endpoint.
fn describe(status: &tonic::Status, tls: Option<bool>) -> String {
    let mut text = with_sources(
        status.message().to_string(),
        std::error::Error::source(status),
    );
    let hint = tls_hint(&text).or_else(|| tls.and_then(|cert| closed_hint(&text, cert)));
    if let Some(hint) = hint {
        text.push_str(" (");
        text.push_str(hint);
        text.push(')');
    }
    text
}

/// What to do about the TLS errors users meet most, recognised in rustls's words.
fn tls_hint(error: &str) -> Option<&'static str> {
    const HINTS: [(&str, &str); 5] = [
        (
            "CaUsedAsEndEntity",
            "the server presents a CA certificate (basicConstraints CA:TRUE) as its own, which rustls refuses: give the server a certificate signed by that CA, and the CA to --ca-file",
        ),
        (
            "UnknownIssuer",
            "the server's certificate is not signed by a CA this agent trusts: give that CA with --ca-file or OTEL_EXPORTER_OTLP_CERTIFICATE",
        ),
        (
            "NotValidForName",
            "the server's certificate does not name the host in the endpoint",
        ),
        (
            "Expired",
            "the server's certificate has expired, or this host's clock is wrong",
        ),
        (
            "InvalidContentType",
            "the server does not speak TLS: use an http:// endpoint for plaintext",
        ),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| error.contains(needle))
        .map(|(_, hint)| *hint)
}

/// `text`, then the messages of `source` and its sources, each once
/// ("transport error: ...").
fn with_sources(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(e) = source {
        let line = e.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = e.source();
    }
    text
}

/// A TLS server that requires a client certificate accepts the handshake and then
/// closes the connection when it got none, or one it does not trust; the client
/// sees that as one of these, whichever comes first (TLS 1.3); all four of the
/// first were seen against gRPC's own (BoringSSL) server.
fn closed_hint(error: &str, client_cert: bool) -> Option<&'static str> {
    const CLOSED: [&str; 5] = [
        "without sending TLS close_notify",
        "broken pipe",
        "connection reset",
        "connection closed",
        "CertificateRequired",
    ];
    if !CLOSED.iter().any(|needle| error.contains(needle)) {
        return None;
    }
    Some(if client_cert {
        "the server closed the connection: if it requires a client certificate, it may not trust the one from --client-cert"
    } else {
        "the server closed the connection: if it requires a client certificate (mutual TLS), give one with --client-cert and --client-key"
    })
}

fn read(path: &PathBuf) -> Result<Vec<u8>, GrpcError> {
    std::fs::read(path).map_err(|source| GrpcError::TlsFile {
        path: path.clone(),
        source,
    })
}

/// Delay before retry number `failures` (1-based), before jitter.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    INITIAL_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// ±50 % jitter from a small xorshift generator (no need for a crypto RNG).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Jitter(seed | 1)
    }

    fn apply(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let factor = 0.5 + (self.0 % 1000) as f64 / 1000.0;
        d.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff doubles from 500 ms and stops growing at 30 s.
    /// The common TLS failures come with what to do about them; others do not.
    #[test]
    fn tls_errors_get_a_hint() {
        let hint = |e: &str| tls_hint(e).unwrap_or("");
        assert!(
            hint("invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))")
                .contains("signed by that CA")
        );
        assert!(hint("invalid peer certificate: UnknownIssuer").contains("--ca-file"));
        assert!(hint("NotValidForNameContext { expected: ... }").contains("does not name"));
        assert_eq!(tls_hint("tcp connect error: Connection refused"), None);
    }

    /// A TLS connection the server closes gets the mutual TLS hint that fits
    /// whether a client certificate was given; other errors get none.
    #[test]
    fn closed_tls_connection_hints_at_client_certificates() {
        let eof = "connection error: peer closed connection without sending TLS close_notify";
        assert!(closed_hint(eof, false)
            .unwrap()
            .contains("give one with --client-cert"));
        assert!(closed_hint("stream closed because of a broken pipe", true)
            .unwrap()
            .contains("may not trust"));
        assert_eq!(
            closed_hint("tcp connect error: Connection refused", false),
            None
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(10), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    /// Jitter stays within ±50 %.
    #[test]
    fn jitter_is_bounded() {
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let d = j.apply(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(5) && d < Duration::from_secs(15),
                "{d:?}"
            );
        }
    }

    /// A status the backend answered: retried without bound when it says it is
    /// unavailable, a few times when it refuses the request with a status that may
    /// change, not at all otherwise.
    #[test]
    fn answered_statuses_are_classified_by_code() {
        let class = |code| classify(&Status::new(code, "from the server"));
        assert_eq!(class(Code::Unavailable), Failure::Down);
        assert_eq!(class(Code::DeadlineExceeded), Failure::Down);
        for code in [
            Code::ResourceExhausted,
            Code::Unknown,
            Code::Aborted,
            Code::Cancelled,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert_eq!(class(code), Failure::Refused, "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::Internal,
            Code::FailedPrecondition,
            Code::NotFound,
        ] {
            assert_eq!(class(code), Failure::Permanent, "{code:?}");
        }
        // tonic's answer to a proxy's HTTP 413, which carries no gRPC status.
        let http_413 =
            Status::unknown("grpc-status header missing, mapped from HTTP status code 413");
        assert_eq!(classify(&http_413), Failure::Refused);
    }

    /// The encoded `google.rpc.Status` a server sends in `grpc-status-details-bin`,
    /// with a `RetryInfo` of this delay.
    fn status_details(code: Code, seconds: i64, nanos: i32) -> Vec<u8> {
        let info = rpc::RetryInfo {
            retry_delay: Some(rpc::ProtoDuration { seconds, nanos }),
        };
        rpc::Status {
            code: code as i32,
            message: "slow down".into(),
            details: vec![
                rpc::Any {
                    type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
                    value: vec![1, 2, 3],
                },
                rpc::Any {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: info.encode_to_vec(),
                },
            ],
        }
        .encode_to_vec()
    }

    /// A status with a RetryInfo is throttling, whatever its code: the backend's
    /// delay is kept (capped); a garbled one falls back to the code.
    #[test]
    fn retry_info_means_throttled() {
        let with = |code, details: Vec<u8>| {
            classify(&Status::with_details(code, "slow down", details.into()))
        };
        assert_eq!(
            with(
                Code::ResourceExhausted,
                status_details(Code::ResourceExhausted, 2, 500_000_000)
            ),
            Failure::Throttled(Duration::from_millis(2500))
        );
        assert_eq!(
            with(Code::Unavailable, status_details(Code::Unavailable, 0, 0)),
            Failure::Throttled(Duration::ZERO)
        );
        assert_eq!(
            with(
                Code::ResourceExhausted,
                status_details(Code::ResourceExhausted, 86_400, 0)
            ),
            Failure::Throttled(MAX_THROTTLE_DELAY)
        );
        assert_eq!(
            with(
                Code::ResourceExhausted,
                status_details(Code::ResourceExhausted, -1, 0)
            ),
            Failure::Throttled(MAX_THROTTLE_DELAY)
        );
        assert_eq!(
            with(Code::ResourceExhausted, vec![0xff, 0xff, 0xff]),
            Failure::Refused
        );
        // Throttling sets the wait, with no attempt bound.
        let mut r = Retries::default();
        for _ in 0..2 * MAX_REFUSED_ATTEMPTS {
            assert_eq!(
                r.failed(1, Failure::Throttled(Duration::from_secs(3))),
                Next::Wait(Duration::from_secs(3))
            );
        }
    }

    /// An error of this text, as the transport's errors are.
    #[derive(Debug)]
    struct Transport(&'static str);

    impl std::fmt::Display for Transport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Transport {}

    /// No answer from the backend (tonic's statuses made from a local error) means
    /// it is down, whatever the code: retried through the outage. A stream the server
    /// reset is its answer to this request, unless it refused the stream before any
    /// work (it is going away).
    #[test]
    fn failures_without_an_answer_mean_the_backend_is_down() {
        let local = |e: Transport| Status::from_error(Box::new(e));
        let refused_connection = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        ))));
        assert_eq!(refused_connection.code(), Code::Unavailable);
        assert_eq!(classify(&refused_connection), Failure::Down);
        // Our deadline passing is CANCELLED with a source.
        let deadline = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(deadline.code(), Code::Cancelled);
        assert_eq!(classify(&deadline), Failure::Down);
        // A connection broken mid-request is UNKNOWN with a source.
        let broken = local(Transport("connection closed before message completed"));
        assert_eq!(broken.code(), Code::Unknown);
        assert_eq!(classify(&broken), Failure::Down);
        assert_eq!(
            classify(&local(Transport(
                "connection error received: not a result of an error"
            ))),
            Failure::Down
        );
        assert_eq!(
            classify(&local(Transport(
                "stream error received: refused stream before processing any application logic"
            ))),
            Failure::Down
        );
        assert_eq!(
            classify(&local(Transport(
                "stream error received: unspecific protocol error detected"
            ))),
            Failure::Refused
        );
        assert_eq!(classify_code(Code::InvalidArgument, false), Failure::Down);
    }

    /// A refused request gets MAX_REFUSED_ATTEMPTS attempts with its own backoff,
    /// then is given up; failures while the backend is down do not count and keep
    /// the request; the next request starts afresh.
    #[test]
    fn refused_requests_get_bounded_attempts() {
        let mut r = Retries::default();
        assert_eq!(r.failed(7, Failure::Refused), Next::Retry(backoff(1)));
        assert_eq!(r.failed(7, Failure::Refused), Next::Retry(backoff(2)));
        // An outage in between: retried without bound, with the outage's backoff.
        for n in 1..=20 {
            assert_eq!(r.failed(7, Failure::Down), Next::Retry(backoff(n)));
        }
        assert_eq!(r.failed(7, Failure::Refused), Next::Retry(backoff(3)));
        assert_eq!(
            r.failed(7, Failure::Refused),
            Next::GiveUp {
                attempts: MAX_REFUSED_ATTEMPTS
            }
        );
        // The next request gets its own attempts and short delays, not the growing
        // backoff of a long episode.
        for n in 1..MAX_REFUSED_ATTEMPTS {
            assert_eq!(r.failed(8, Failure::Refused), Next::Retry(backoff(n)));
        }
        assert!(matches!(r.failed(8, Failure::Refused), Next::GiveUp { .. }));
        // A request that was evicted from the queue mid-retries: its successor
        // starts afresh.
        assert_eq!(r.failed(9, Failure::Refused), Next::Retry(backoff(1)));
        assert_eq!(r.failed(10, Failure::Refused), Next::Retry(backoff(1)));
        assert_eq!(r.failed(10, Failure::Permanent), Next::Drop);
        // A backend down for ever keeps its request.
        let mut r = Retries::default();
        for _ in 0..1000 {
            assert!(matches!(r.failed(1, Failure::Down), Next::Retry(_)));
        }
        r.sent();
        assert_eq!(r.failed(2, Failure::Down), Next::Retry(backoff(1)));
    }

    /// A backend's wait is kept, but one of zero is no hot loop.
    #[test]
    fn throttled_requests_wait_at_least_the_minimum() {
        let mut r = Retries::default();
        let long = Duration::from_secs(7);
        assert_eq!(r.failed(1, Failure::Throttled(long)), Next::Wait(long));
        for _ in 0..100 {
            assert_eq!(
                r.failed(1, Failure::Throttled(Duration::ZERO)),
                Next::Wait(MIN_THROTTLE_DELAY)
            );
        }
        assert!(MIN_THROTTLE_DELAY >= Duration::from_millis(100));
    }

    /// A cause logged an hour ago is logged again; one logged a minute ago is not;
    /// a stale cause makes room for a new one at the per-code bound.
    #[test]
    fn causes_are_logged_again_after_a_while() {
        let mut logged = LoggedCauses::new(2);
        let code = Code::Unauthenticated as i32;
        let t0 = Instant::now();
        assert!(logged.first_at(code, "token expired", t0));
        assert!(!logged.first_at(code, "token expired", t0 + Duration::from_secs(60)));
        let later = t0 + CAUSE_RELOG_AFTER;
        assert!(logged.first_at(code, "token expired", later));
        assert!(!logged.first_at(code, "token expired", later + Duration::from_secs(1)));
        // At the bound: no room while both are fresh, room once one is stale.
        assert!(logged.first_at(code, "bad tenant a", later));
        assert!(!logged.first_at(code, "bad tenant b", later));
        assert!(logged.first_at(code, "bad tenant b", later + CAUSE_RELOG_AFTER));
        assert!(logged.logged.len() <= 2);
    }

    /// A cause is its code and its message with digits masked, so sizes and request
    /// numbers do not make every request a new warning; each code logs a bounded
    /// number of distinct messages.
    #[test]
    fn causes_are_logged_once_each_and_bounded() {
        assert_eq!(
            cause_of("grpc: received message larger than max (5000000 vs. 4194304)"),
            "grpc: received message larger than max (# vs. #)"
        );
        let mut logged = LoggedCauses::new(MAX_CAUSES_PER_CODE);
        let code = Code::ResourceExhausted as i32;
        assert!(logged.first(code, "larger than max (5000000 vs. 4194304)"));
        assert!(!logged.first(code, "larger than max (4200001 vs. 4194304)"));
        // The same message under another code is another cause.
        assert!(logged.first(Code::Unknown as i32, "larger than max (1 vs. 2)"));
        // Messages that differ past CAUSE_CHARS are one cause.
        let long = "x".repeat(CAUSE_CHARS);
        assert!(logged.first(code, &format!("{long} request abc")));
        assert!(!logged.first(code, &format!("{long} request def")));
        // Messages that differ otherwise (ids with letters) stop at the bound.
        let mut new = 0;
        for id in ["req-aa", "req-ab", "req-ac", "req-ad", "req-ae", "req-af"] {
            new += usize::from(logged.first(code, id));
        }
        assert_eq!(new, MAX_CAUSES_PER_CODE - 2);
        assert!(!logged.first(code, "req-zz"));
    }

    /// Keepalive pings stay within what grpc-go servers allow by default.
    #[test]
    fn keepalive_respects_grpc_go_enforcement() {
        assert!(HTTP2_KEEPALIVE_INTERVAL >= Duration::from_secs(5 * 60));
    }

    /// Bad endpoints and headers are refused with the reason.
    #[tokio::test]
    async fn bad_configuration_is_refused() {
        let mut config = GrpcConfig {
            endpoint: "ftp://example".into(),
            headers: vec![],
            ca_file: None,
            client_cert: None,
            gzip: true,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            Exporter::new(&config),
            Err(GrpcError::Endpoint { .. })
        ));
        config.endpoint = "http://127.0.0.1:4317".into();
        config.headers = vec![("bad header".into(), "x".into())];
        assert!(matches!(Exporter::new(&config), Err(GrpcError::Header(_))));
        config.headers = vec![];
        config.endpoint = "https://127.0.0.1:4317".into();
        config.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(matches!(
            Exporter::new(&config),
            Err(GrpcError::TlsFile { .. })
        ));
    }
}
