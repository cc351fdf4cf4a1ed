//! `profiler agent` configuration: flags, then the standard OpenTelemetry
//! environment variables (`OTEL_EXPORTER_OTLP_PROFILES_*` before
//! `OTEL_EXPORTER_OTLP_*`; `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME`), then
//! defaults. Flags win.

use std::{path::PathBuf, time::Duration};

use crate::{
    config::{check_frequency, check_output_dir, check_pids, ConfigError},
    sink::{files::FilesConfig, grpc::GrpcConfig},
};

/// Default seconds per profile.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
/// Default per-request deadline (the OTel default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest request sent (encoded, before compression); larger profiles are
/// split. 4 MiB is the default receive limit of gRPC servers.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;
/// How long SIGTERM waits for the last profile to be exported.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `profiler agent` needs, checked.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub interval: Duration,
    pub frequency_hz: u64,
    pub pids: Vec<u32>,
    pub include_idle: bool,
    /// Local rotating files; always set when there is no endpoint.
    pub files: Option<FilesConfig>,
    pub grpc: Option<GrpcConfig>,
    pub queue_bytes: usize,
    pub max_request_bytes: usize,
    /// The agent's memory budget (crate::memory): 0 is off; None is the default,
    /// sized by the ring buffer (`memory::default_budget`).
    pub memory_budget_bytes: Option<u64>,
    pub shutdown_timeout: Duration,
    /// Attributes of every exported resource: `host.name` first (this host's name
    /// unless one was given), then the user's, from [`resource_attributes`].
    pub resource_attributes: Vec<(String, String)>,
    /// Runtime profilers; set by the caller after [`AgentConfig::new`] (none there).
    pub runtimes: crate::runtime_profilers::RuntimeConfig,
}

/// Raw values from the command line (None = not given).
#[derive(Clone, Debug, Default)]
pub struct AgentArgs {
    pub interval_secs: Option<u64>,
    pub frequency_hz: u64,
    pub pids: Vec<u32>,
    pub include_idle: bool,
    pub output_dir: Option<PathBuf>,
    pub max_files: usize,
    pub max_disk_bytes: u64,
    pub endpoint: Option<String>,
    pub headers: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub compression: Option<String>,
    pub timeout_secs: Option<u64>,
    pub queue_bytes: usize,
    pub max_request_bytes: usize,
    pub memory_budget_bytes: Option<u64>,
    pub shutdown_timeout_secs: Option<u64>,
    /// `--resource-attribute` values, each `KEY=VALUE[,KEY=VALUE...]`.
    pub resource_attributes: Vec<String>,
    pub service_name: Option<String>,
}

/// Key prefixes of the resource attributes the agent sets for each process itself:
/// one value for the whole host would be wrong for every process but one.
pub const PER_PROCESS_ATTRIBUTE_PREFIXES: [&str; 3] = ["process.", "thread.", "container."];

/// Reads `OTEL_EXPORTER_OTLP_PROFILES_<NAME>`, else `OTEL_EXPORTER_OTLP_<NAME>`; an
/// empty variable counts as unset (and does not hide the generic one).
fn otel(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    otel_named(env, name).map(|(_, value)| value)
}

/// [`otel`], with the name of the variable that gave the value.
fn otel_named(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_PROFILES_{name}"),
        format!("OTEL_EXPORTER_OTLP_{name}"),
    ]
    .into_iter()
    .find_map(|variable| {
        let value = env(&variable).filter(|v| !v.trim().is_empty())?;
        Some((variable, value))
    })
}

/// Refuses an endpoint with a path: tonic keeps only scheme and authority, so a
/// path (an HTTP exporter's `/v1development/profiles`, a proxy prefix) would be
/// dropped without a word. A bare `/` is fine.
/// `scheme://host:port/path` (or without the scheme) as its host and port, and its
/// path (empty if none; a trailing slash alone is no path).
fn authority_and_path(endpoint: &str) -> (&str, &str) {
    let after_scheme = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    after_scheme.split_once('/').unwrap_or((after_scheme, ""))
}

/// The port of the endpoint, if given (`[::1]` alone ends in no number: none).
fn endpoint_port(endpoint: &str) -> Option<u16> {
    let (_, port) = authority_and_path(endpoint).0.rsplit_once(':')?;
    port.parse().ok()
}

fn check_endpoint_path(endpoint: &str) -> Result<(), ConfigError> {
    match authority_and_path(endpoint) {
        (_, path) if !path.is_empty() => Err(ConfigError::EndpointPath(endpoint.into())),
        _ => Ok(()),
    }
}

/// `key1=value1,key2=value2`, values percent-decoded (the OTel format).
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    parse_pairs(text).map_err(|pair| {
        let position = text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .position(|p| p == pair)
            .map_or(0, |i| i + 1);
        // What a header's name would be: up to a separator, at most a few chars.
        let start = pair
            .split([':', ' ', '='])
            .next()
            .unwrap_or("")
            .chars()
            .take(24)
            .collect();
        ConfigError::Header { position, start }
    })
}

/// `key1=value1,key2=value2` with keys trimmed and values trimmed and
/// percent-decoded, as OTEL_EXPORTER_OTLP_HEADERS and OTEL_RESOURCE_ATTRIBUTES
/// are written. `Err` is the first pair that is not `key=value`.
fn parse_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), percent_decode(v.trim())))
            }
            _ => Err(pair.to_string()),
        })
        .collect()
}

/// The resource attributes every exported process gets: OTEL_RESOURCE_ATTRIBUTES,
/// then OTEL_SERVICE_NAME as `service.name`, then `--resource-attribute`, then
/// `--service-name` (a later value for a key wins), with `host.name` first:
/// `host_name` unless one was given. Keys that describe one process are refused.
pub fn resource_attributes(
    args: &AgentArgs,
    env: &dyn Fn(&str) -> Option<String>,
    host_name: String,
) -> Result<Vec<(String, String)>, ConfigError> {
    const ENV: &str = "OTEL_RESOURCE_ATTRIBUTES";
    const FLAG: &str = "--resource-attribute";
    let bad_pair =
        |origin: &'static str| move |pair| ConfigError::ResourceAttribute { origin, pair };
    let mut given: Vec<(&'static str, String, String)> = Vec::new();
    if let Some(text) = env(ENV) {
        for (k, v) in parse_pairs(&text).map_err(bad_pair(ENV))? {
            given.push((ENV, k, v));
        }
    }
    if let Some(name) = env("OTEL_SERVICE_NAME").filter(|n| !n.trim().is_empty()) {
        given.push((
            "OTEL_SERVICE_NAME",
            "service.name".into(),
            name.trim().into(),
        ));
    }
    for text in &args.resource_attributes {
        for (k, v) in parse_pairs(text).map_err(bad_pair(FLAG))? {
            given.push((FLAG, k, v));
        }
    }
    if let Some(name) = &args.service_name {
        given.push(("--service-name", "service.name".into(), name.clone()));
    }

    let mut out = vec![("host.name".to_string(), host_name)];
    for (origin, key, value) in given {
        if PER_PROCESS_ATTRIBUTE_PREFIXES
            .iter()
            .any(|prefix| key.starts_with(prefix))
        {
            return Err(ConfigError::PerProcessAttribute { origin, key });
        }
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => out.push((key, value)),
        }
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This host's name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

impl AgentConfig {
    /// Checks flags, fills the rest from `env` (normally `std::env::var`).
    pub fn new(
        args: AgentArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        check_frequency(args.frequency_hz)?;
        check_pids(&args.pids)?;
        let interval =
            Duration::from_secs(args.interval_secs.unwrap_or(DEFAULT_INTERVAL.as_secs()));
        if interval < Duration::from_secs(1) {
            return Err(ConfigError::Interval);
        }

        let endpoint = args.endpoint.clone().or_else(|| otel(env, "ENDPOINT"));
        let grpc = match endpoint {
            None => {
                // A flag given for export that cannot happen is a mistake worth
                // saying; the same settings from the environment may be meant for
                // other exporters and are ignored.
                let export_only = [
                    ("--header", !args.headers.is_empty()),
                    ("--ca-file", args.ca_file.is_some()),
                    ("--client-cert", args.client_cert.is_some()),
                    ("--client-key", args.client_key.is_some()),
                    ("--compression", args.compression.is_some()),
                    ("--timeout", args.timeout_secs.is_some()),
                    ("--resource-attribute", !args.resource_attributes.is_empty()),
                    ("--service-name", args.service_name.is_some()),
                ];
                if let Some((flag, _)) = export_only.iter().find(|(_, given)| *given) {
                    return Err(ConfigError::NeedsEndpoint(flag));
                }
                None
            }
            Some(endpoint) => {
                match otel_named(env, "PROTOCOL") {
                    Some((variable, value)) if value.trim() != "grpc" => {
                        return Err(ConfigError::Protocol { variable, value });
                    }
                    Some(_) => {}
                    // SDKs default to http/protobuf, on port 4318: an endpoint there
                    // shared with them would be retried for ever as "down".
                    None if endpoint_port(&endpoint) == Some(4318) => {
                        return Err(ConfigError::HttpPort(endpoint));
                    }
                    None => {}
                }
                check_endpoint_path(&endpoint)?;
                let endpoint = if endpoint.contains("://") {
                    endpoint
                } else if otel(env, "INSECURE").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
                    format!("http://{endpoint}")
                } else {
                    format!("https://{endpoint}")
                };
                let mut headers = match otel(env, "HEADERS") {
                    Some(text) => parse_headers(&text)?,
                    None => vec![],
                };
                for h in &args.headers {
                    headers.extend(parse_headers(h)?);
                }
                let ca_file = args
                    .ca_file
                    .clone()
                    .or_else(|| otel(env, "CERTIFICATE").map(PathBuf::from));
                let cert = args
                    .client_cert
                    .clone()
                    .or_else(|| otel(env, "CLIENT_CERTIFICATE").map(PathBuf::from));
                let key = args
                    .client_key
                    .clone()
                    .or_else(|| otel(env, "CLIENT_KEY").map(PathBuf::from));
                let client_cert = match (cert, key) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => return Err(ConfigError::ClientCert),
                };
                // A TLS flag with a plaintext endpoint is a mistake worth saying (the
                // same settings from the environment apply to secure endpoints only,
                // as OTel SDKs read them, and are left alone).
                if endpoint.starts_with("http://") {
                    let tls_flags = [
                        ("--ca-file", args.ca_file.is_some()),
                        ("--client-cert", args.client_cert.is_some()),
                        ("--client-key", args.client_key.is_some()),
                    ];
                    if let Some((flag, _)) = tls_flags.iter().find(|(_, given)| *given) {
                        return Err(ConfigError::TlsOnPlaintext {
                            flag,
                            endpoint: endpoint.clone(),
                        });
                    }
                }
                for path in ca_file
                    .iter()
                    .chain(client_cert.iter().flat_map(|(c, k)| [c, k]))
                {
                    if !path.is_file() {
                        return Err(ConfigError::MissingFile(path.clone()));
                    }
                }
                let compression = args
                    .compression
                    .clone()
                    .or_else(|| otel(env, "COMPRESSION"))
                    .unwrap_or_else(|| "gzip".into());
                let gzip = match compression.to_ascii_lowercase().as_str() {
                    "gzip" => true,
                    "none" => false,
                    other => return Err(ConfigError::Compression(other.to_string())),
                };
                let timeout = match (args.timeout_secs, otel(env, "TIMEOUT")) {
                    (Some(0), _) => return Err(ConfigError::TimeoutSecs),
                    (Some(secs), _) => Duration::from_secs(secs),
                    (None, Some(ms)) => Duration::from_millis(
                        ms.trim()
                            .parse()
                            .map_err(|_| ConfigError::Timeout(ms.clone()))?,
                    ),
                    (None, None) => DEFAULT_TIMEOUT,
                };
                if timeout.is_zero() {
                    return Err(ConfigError::Timeout("0".into()));
                }
                Some(GrpcConfig {
                    endpoint,
                    headers,
                    ca_file,
                    client_cert,
                    gzip,
                    timeout,
                })
            }
        };

        // Resource attributes only travel in OTLP: without an endpoint the
        // environment's are not ours to judge (the flags were refused above).
        let resource_attributes = if grpc.is_some() {
            resource_attributes(&args, env, host_name())?
        } else {
            vec![("host.name".to_string(), host_name())]
        };

        // Every check before the output directory, which is created last.
        if args.max_request_bytes < 64 << 10 {
            return Err(ConfigError::RequestSize(args.max_request_bytes));
        }
        if args.queue_bytes < args.max_request_bytes {
            return Err(ConfigError::QueueSize {
                queue: args.queue_bytes,
                request: args.max_request_bytes,
            });
        }

        // Local files: always without a backend (the default needs no server), and
        // beside one when --output-dir is given.
        let files = match (&args.output_dir, &grpc) {
            (Some(dir), _) => Some(dir.clone()),
            (None, None) => Some(PathBuf::from("profiles")),
            (None, Some(_)) => None,
        }
        .map(|dir| -> Result<FilesConfig, ConfigError> {
            if args.max_files == 0 {
                return Err(ConfigError::MaxFiles);
            }
            check_output_dir(&dir)?;
            Ok(FilesConfig {
                dir: dir.canonicalize().unwrap_or(dir),
                max_profiles: args.max_files,
                max_bytes: args.max_disk_bytes,
            })
        })
        .transpose()?;

        Ok(AgentConfig {
            interval,
            frequency_hz: args.frequency_hz,
            pids: args.pids,
            include_idle: args.include_idle,
            files,
            grpc,
            queue_bytes: args.queue_bytes,
            max_request_bytes: args.max_request_bytes,
            memory_budget_bytes: args.memory_budget_bytes,
            shutdown_timeout: args
                .shutdown_timeout_secs
                .map_or(DEFAULT_SHUTDOWN_TIMEOUT, Duration::from_secs),
            resource_attributes,
            runtimes: crate::runtime_profilers::RuntimeConfig::none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::queue::DEFAULT_QUEUE_BYTES;
    use std::collections::HashMap;

    fn args() -> AgentArgs {
        AgentArgs {
            frequency_hz: 97,
            max_files: 10,
            max_disk_bytes: 1 << 20,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            ..AgentArgs::default()
        }
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// Without an endpoint the agent writes local files under ./profiles.
    #[test]
    fn default_is_local_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.output_dir = Some(dir.path().join("p"));
        let c = AgentConfig::new(a, &env(&[])).unwrap();
        assert!(c.grpc.is_none());
        assert_eq!(c.files.unwrap().max_profiles, 10);
        assert_eq!(c.interval, DEFAULT_INTERVAL);
    }

    /// The profiles-specific variables win over the generic ones, and flags over both.
    #[test]
    fn otel_environment_precedence() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            (
                "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT",
                "http://profiles:4317",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20abc,x-tenant=7",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ]);
        let c = AgentConfig::new(args(), &e).unwrap();
        let g = c.grpc.unwrap();
        assert_eq!(g.endpoint, "http://profiles:4317");
        assert_eq!(
            g.headers,
            vec![
                ("authorization".into(), "Bearer abc".into()),
                ("x-tenant".into(), "7".into())
            ]
        );
        assert_eq!(g.timeout, Duration::from_millis(2500));
        assert!(!g.gzip);
        assert!(c.files.is_none());

        let mut a = args();
        a.endpoint = Some("http://flag:4317".into());
        a.timeout_secs = Some(3);
        let g = AgentConfig::new(a, &e).unwrap().grpc.unwrap();
        assert_eq!(
            (g.endpoint.as_str(), g.timeout),
            ("http://flag:4317", Duration::from_secs(3))
        );
    }

    /// An endpoint without a scheme is TLS unless OTEL_EXPORTER_OTLP_INSECURE=true.
    #[test]
    fn scheme_defaults_to_tls() {
        let g = AgentConfig::new(
            args(),
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]),
        )
        .unwrap()
        .grpc
        .unwrap();
        assert_eq!(g.endpoint, "https://collector:4317");
        let g = AgentConfig::new(
            args(),
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
            ]),
        )
        .unwrap()
        .grpc
        .unwrap();
        assert_eq!(g.endpoint, "http://collector:4317");
    }

    /// A malformed header is named by position and the start of its name, never
    /// by its value, which may be a token.
    #[test]
    fn a_bad_header_does_not_show_its_value() {
        let e = parse_headers("x-tenant=a, authorization: Bearer s3cret").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("header 2"), "{text}");
        assert!(text.contains("authorization"), "{text}");
        assert!(
            !text.contains("s3cret") && !text.contains("Bearer"),
            "{text}"
        );
    }

    /// Compression names are case-insensitive, as OTel SDKs take them.
    #[test]
    fn compression_ignores_case() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "GZIP"),
        ]);
        assert!(AgentConfig::new(args(), &e).is_ok());
        let mut a = args();
        a.compression = Some("None".into());
        assert!(AgentConfig::new(a, &e).is_ok());
    }

    /// Bad values are refused with the reason.
    #[test]
    fn bad_values_are_refused() {
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]);
        let mut a = args();
        a.compression = Some("zstd".into());
        assert!(matches!(
            AgentConfig::new(a, &e),
            Err(ConfigError::Compression(_))
        ));
        let mut a = args();
        a.headers = vec!["novalue".into()];
        assert!(matches!(
            AgentConfig::new(a, &e),
            Err(ConfigError::Header { .. })
        ));
        let mut a = args();
        a.client_cert = Some("/etc/hostname".into());
        assert!(matches!(
            AgentConfig::new(a, &e),
            Err(ConfigError::ClientCert)
        ));
        let mut a = args();
        a.ca_file = Some("/nonexistent.pem".into());
        let tls = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317")]);
        assert!(matches!(
            AgentConfig::new(a, &tls),
            Err(ConfigError::MissingFile(_))
        ));
        let e2 = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ]);
        assert!(matches!(
            AgentConfig::new(args(), &e2),
            Err(ConfigError::Timeout(_))
        ));
        let mut a = args();
        a.interval_secs = Some(0);
        assert!(matches!(
            AgentConfig::new(a, &e),
            Err(ConfigError::Interval)
        ));
        let mut a = args();
        a.queue_bytes = 1 << 20;
        assert!(matches!(
            AgentConfig::new(a, &e),
            Err(ConfigError::QueueSize { .. })
        ));
    }

    /// An empty OTEL_EXPORTER_OTLP_PROFILES_* variable does not hide the generic one.
    #[test]
    fn empty_profiles_variable_falls_back_to_the_generic_one() {
        let c = AgentConfig::new(
            args(),
            &env(&[
                ("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT", ""),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ]),
        )
        .unwrap();
        assert_eq!(c.grpc.unwrap().endpoint, "http://generic:4317");
    }

    /// A protocol other than grpc is refused, naming the variable; the profiles
    /// variable overrides the generic one.
    #[test]
    fn non_grpc_protocol_is_refused() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let err = AgentConfig::new(
            args(),
            &env(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Protocol { variable, .. } if variable == "OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{err}"
        );
        let ok = AgentConfig::new(
            args(),
            &env(&[
                endpoint,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL", "grpc"),
            ]),
        );
        assert!(ok.is_ok());
        // Without an endpoint the variable is someone else's business.
        let files = AgentConfig::new(
            args(),
            &env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
        );
        assert!(files.is_ok());
    }

    /// OTLP/HTTP's port without a protocol named is refused (SDKs default to
    /// http/protobuf there); naming grpc allows it.
    #[test]
    fn http_port_needs_grpc_named() {
        for endpoint in ["http://c:4318", "c:4318", "https://[::1]:4318/"] {
            let r = AgentConfig::new(args(), &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)]));
            assert!(
                matches!(r, Err(ConfigError::HttpPort(_))),
                "{endpoint}: {r:?}"
            );
        }
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert!(AgentConfig::new(args(), &e).is_ok());
        assert_eq!(endpoint_port("http://c:4317"), Some(4317));
        assert_eq!(endpoint_port("http://[::1]:4318"), Some(4318));
        assert_eq!(endpoint_port("http://c"), None);
    }

    /// A TLS flag with a plaintext endpoint is refused by name, not ignored; the
    /// same setting from the environment is left to secure endpoints.
    #[test]
    fn tls_flags_need_https() {
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]);
        let mut a = args();
        a.ca_file = Some("/etc/hostname".into());
        assert!(matches!(
            AgentConfig::new(a, &e),
            Err(ConfigError::TlsOnPlaintext {
                flag: "--ca-file",
                ..
            })
        ));
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/hostname"),
        ]);
        assert!(AgentConfig::new(args(), &e).is_ok());
    }

    /// An endpoint with a path is refused; a trailing slash is not a path.
    #[test]
    fn endpoint_path_is_refused() {
        for (endpoint, ok) in [
            ("http://c:4317", true),
            ("http://c:4317/", true),
            ("c:4317", true),
            ("http://c:4317/v1development/profiles", false),
            ("c:4317/prefix", false),
        ] {
            let r = AgentConfig::new(args(), &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)]));
            assert_eq!(r.is_ok(), ok, "{endpoint}: {r:?}");
        }
    }

    /// Export flags without an endpoint are refused by name; the same settings in
    /// the environment (perhaps meant for another exporter) are not.
    #[test]
    fn export_flags_need_an_endpoint() {
        let e = env(&[]);
        let mut a = args();
        a.headers = vec!["a=b".into()];
        assert_eq!(
            AgentConfig::new(a, &e).unwrap_err(),
            ConfigError::NeedsEndpoint("--header")
        );
        let mut a = args();
        a.timeout_secs = Some(5);
        assert_eq!(
            AgentConfig::new(a, &e).unwrap_err(),
            ConfigError::NeedsEndpoint("--timeout")
        );
        let mut a = args();
        a.service_name = Some("svc".into());
        assert_eq!(
            AgentConfig::new(a, &e).unwrap_err(),
            ConfigError::NeedsEndpoint("--service-name")
        );
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=b"),
            ("OTEL_RESOURCE_ATTRIBUTES", "not a pair"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let mut a = args();
        a.output_dir = Some(dir.path().to_path_buf());
        let config = AgentConfig::new(a, &e).unwrap();
        assert!(config.grpc.is_none());
    }

    /// Percent-escapes in header values are decoded; bad escapes are kept as text.
    #[test]
    fn header_values_are_percent_decoded() {
        assert_eq!(
            parse_headers("a=b%2Cc, d = %zz,e=%é1").unwrap(),
            vec![
                ("a".into(), "b,c".into()),
                ("d".into(), "%zz".into()),
                ("e".into(), "%é1".into())
            ]
        );
    }

    /// OTEL_RESOURCE_ATTRIBUTES, then OTEL_SERVICE_NAME, then the flags: a later
    /// value for a key wins, values are percent-decoded, and host.name comes first,
    /// this host's unless given.
    #[test]
    fn resource_attribute_precedence() {
        let e = env(&[
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=prod, k8s.cluster.name=c%201,service.name=listed",
            ),
            ("OTEL_SERVICE_NAME", "env-service"),
        ]);
        let mut a = args();
        a.resource_attributes = vec!["k8s.cluster.name=flag-cluster".into()];
        let attrs = resource_attributes(&a, &e, "here".into()).unwrap();
        let expect = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            attrs,
            expect(&[
                ("host.name", "here"),
                ("deployment.environment.name", "prod"),
                ("k8s.cluster.name", "flag-cluster"),
                ("service.name", "env-service"),
            ])
        );
        a.service_name = Some("flag-service".into());
        a.resource_attributes.push("host.name=node-7".into());
        let attrs = resource_attributes(&a, &e, "here".into()).unwrap();
        assert_eq!(attrs[0], ("host.name".into(), "node-7".into()));
        assert_eq!(attrs[3], ("service.name".into(), "flag-service".into()));
        assert_eq!(attrs.len(), 4);
    }

    /// Attributes that describe one process cannot be set for the whole host, and
    /// a pair without `=` is refused; each error names where it came from.
    #[test]
    fn resource_attribute_errors_name_their_origin() {
        let mut a = args();
        a.resource_attributes = vec!["process.pid=1".into()];
        assert_eq!(
            resource_attributes(&a, &env(&[]), "h".into()).unwrap_err(),
            ConfigError::PerProcessAttribute {
                origin: "--resource-attribute",
                key: "process.pid".into()
            }
        );
        let e = env(&[("OTEL_RESOURCE_ATTRIBUTES", "a=b,container.id=x")]);
        assert_eq!(
            resource_attributes(&args(), &e, "h".into()).unwrap_err(),
            ConfigError::PerProcessAttribute {
                origin: "OTEL_RESOURCE_ATTRIBUTES",
                key: "container.id".into()
            }
        );
        let e = env(&[("OTEL_RESOURCE_ATTRIBUTES", "a=b,novalue")]);
        assert_eq!(
            resource_attributes(&args(), &e, "h".into()).unwrap_err(),
            ConfigError::ResourceAttribute {
                origin: "OTEL_RESOURCE_ATTRIBUTES",
                pair: "novalue".into()
            }
        );
    }
}
