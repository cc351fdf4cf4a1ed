//! OTLP gRPC export: one long-lived channel to the backend, fed by the export queue.
//!
//! Retries `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED` (and `ABORTED`,
//! `UNKNOWN`, which a restarting proxy returns) with exponential backoff and jitter,
//! keeping the request at the front of the queue: while the backend is down, new
//! profiles queue behind it and the queue's byte bound drops the oldest. Any other
//! status is permanent: the request is dropped and the cause is logged once. Logs at
//! info are state changes only (backend down / back); per-request detail is debug.
//!
//! Requests are queued already encoded (protobuf bytes), so the queue's byte bound is
//! the real memory they take; a pass-through codec sends them as they are.
//!
//! Must never: block the agent's cycle (it only pushes to the queue), or hold more
//! than the queue's bound.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
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
    /// Profiles the backend reported as rejected in `partial_success`.
    pub partially_rejected_profiles: AtomicU64,
}

/// Is a failed export worth retrying?
pub fn is_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled
    )
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

    async fn send(&mut self, request: &Bytes) -> Result<i64, Status> {
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
            .map_or(0, |p| p.rejected_profiles.max(0)))
    }

    /// Sends queued requests until the queue is closed and empty.
    pub async fn run(mut self, queue: Arc<ExportQueue<QueuedRequest>>, stats: Arc<ExportStats>) {
        let mut failures: u32 = 0;
        let mut logged_causes: HashSet<(i32, String)> = HashSet::new();
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
            match self.send(&request).await {
                Ok(rejected) => {
                    queue.remove(id);
                    stats.sent_requests.fetch_add(1, Ordering::Relaxed);
                    stats.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                    if failures > 0 {
                        info!(
                            endpoint = %self.endpoint,
                            failed_attempts = failures,
                            "OTLP backend is reachable again"
                        );
                        failures = 0;
                    }
                    if rejected > 0 {
                        stats
                            .partially_rejected_profiles
                            .fetch_add(rejected as u64, Ordering::Relaxed);
                        debug!(rejected, "backend partially rejected a request");
                    }
                    debug!(bytes, queued = queue.len(), "exported profiles");
                }
                Err(status) if is_retryable(status.code()) => {
                    if failures == 0 {
                        warn!(
                            endpoint = %self.endpoint,
                            code = ?status.code(),
                            message = %describe(&status, self.tls),
                            "OTLP backend unavailable; retrying with backoff, profiles wait in the bounded queue"
                        );
                    }
                    failures = failures.saturating_add(1);
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    let delay = jitter.apply(backoff(failures));
                    debug!(?delay, code = ?status.code(), "export failed, will retry");
                    tokio::time::sleep(delay).await;
                }
                Err(status) => {
                    queue.remove(id);
                    stats.rejected_requests.fetch_add(1, Ordering::Relaxed);
                    let cause = (status.code() as i32, status.message().to_string());
                    if logged_causes.len() < 64 && logged_causes.insert(cause) {
                        warn!(
                            endpoint = %self.endpoint,
                            code = ?status.code(),
                            message = %describe(&status, self.tls),
                            "OTLP backend rejected profiles permanently; dropping them (logged once per cause)"
                        );
                    } else {
                        debug!(code = ?status.code(), "rejected again");
                    }
                }
            }
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

    /// Outages are retried; rejections are not.
    #[test]
    fn status_classes() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(is_retryable(code));
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
        ] {
            assert!(!is_retryable(code));
        }
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
