//! gunicorn options that forkscope-server refuses, by name, with the reason and what to do.
//!
//! A Dockerfile written for gunicorn must never run with an option silently dropped: each entry
//! here becomes a hidden clap argument (so `--daemon`, `-D`, `--user=x`, `-u x` and clusters
//! all parse), and the loader turns its presence — on the command line, in
//! `GUNICORN_CMD_ARGS`/`FORKSCOPE_CMD_ARGS`, or as a config-file global — into an error that
//! names it.

use clap::{Arg, ArgAction};

/// One gunicorn setting forkscope does not support.
#[derive(Debug, Clone, Copy)]
pub struct Unsupported {
    /// gunicorn's setting name (the config-file key).
    pub name: &'static str,
    /// gunicorn's flags (`--daemon`, `-D`); empty for config-file-only settings.
    pub flags: &'static [&'static str],
    /// Whether the flag takes a value (`--user NAME`) or is a switch (`--daemon`).
    pub takes_value: bool,
    /// Why, and what to do instead.
    pub reason: &'static str,
}

const FOREGROUND: &str = "forkscope-server runs in the foreground; let Kubernetes, systemd or \
                          another supervisor manage the process";
const USERS: &str = "forkscope-server does not switch users; start it as the user it should run \
                     as (Kubernetes securityContext.runAsUser/runAsGroup, Docker USER)";
const RELOADER: &str = "there is no file-watching reloader; send HUP to the leader to reload";
const TLS: &str = "forkscope-server speaks plain HTTP; terminate TLS at the ingress, load \
                   balancer or a proxy in the pod";
const ASYNC: &str = "it belongs to gunicorn's async/ASGI workers; forkscope-server serves WSGI \
                     with its own worker (idle keep-alive connections cost no thread)";
const METRICS: &str = "forkscope exports Prometheus metrics from forkscope-sidecar instead of \
                       StatsD";
const LOGGING: &str = "forkscope-server writes gunicorn's log formats itself (error log and \
                       access log, to stderr/stdout or files); Python logging configuration and \
                       syslog are not applied";
const HTTP_PARSER: &str = "forkscope-server's HTTP parser is strict by design (RFC 9112) and \
                           has no switches to relax it";
const PROXY: &str = "the PROXY protocol and uwsgi protocol are not supported; use \
                     X-Forwarded-* headers with --forwarded-allow-ips";
const PASTE: &str = "PasteDeploy applications are not supported; give the WSGI app as \
                     MODULE:VARIABLE";
const DIRTY: &str = "gunicorn's dirty arbiters are not supported";
const CONTROL: &str = "gunicorn's control socket is not supported; forkscope-sidecar offers \
                       the leader's management signals over its API";
const STDIO: &str = "workers write to the server's stdout/stderr as they are; redirecting them \
                     to the error log is not supported";

/// Every gunicorn setting forkscope-server refuses.
pub const UNSUPPORTED: &[Unsupported] = &[
    u("daemon", &["-D", "--daemon"], false, FOREGROUND),
    u("user", &["-u", "--user"], true, USERS),
    u("group", &["-g", "--group"], true, USERS),
    u("initgroups", &["--initgroups"], false, USERS),
    u("umask", &["-m", "--umask"], true, USERS),
    u("reload", &["--reload"], false, RELOADER),
    u("reload_engine", &["--reload-engine"], true, RELOADER),
    u(
        "reload_extra_files",
        &["--reload-extra-file"],
        true,
        RELOADER,
    ),
    u(
        "spew",
        &["--spew"],
        false,
        "there is no line tracer; use the profiler (SIGUSR2)",
    ),
    u("paste", &["--paste", "--paster"], true, PASTE),
    u("raw_paste_global_conf", &["--paste-global"], true, PASTE),
    u("certfile", &["--certfile"], true, TLS),
    u("keyfile", &["--keyfile"], true, TLS),
    u("ca_certs", &["--ca-certs"], true, TLS),
    u("cert_reqs", &["--cert-reqs"], true, TLS),
    u("ciphers", &["--ciphers"], true, TLS),
    u("ssl_version", &["--ssl-version"], true, TLS),
    u(
        "do_handshake_on_connect",
        &["--do-handshake-on-connect"],
        false,
        TLS,
    ),
    u(
        "suppress_ragged_eofs",
        &["--suppress-ragged-eofs"],
        false,
        TLS,
    ),
    u("ssl_context", &[], false, TLS),
    u("worker_connections", &["--worker-connections"], true, ASYNC),
    u("asgi_loop", &["--asgi-loop"], true, ASYNC),
    u("asgi_lifespan", &["--asgi-lifespan"], true, ASYNC),
    u(
        "asgi_disconnect_grace_period",
        &["--asgi-disconnect-grace-period"],
        true,
        ASYNC,
    ),
    u(
        "websocket_max_message_size",
        &["--websocket-max-message-size"],
        true,
        ASYNC,
    ),
    u(
        "http_protocols",
        &["--http-protocols"],
        true,
        "only HTTP/1.0 and HTTP/1.1 are served",
    ),
    u(
        "http2_cleartext",
        &["--http2-cleartext"],
        true,
        "HTTP/2 is not supported",
    ),
    u(
        "http2_initial_window_size",
        &["--http2-initial-window-size"],
        true,
        "HTTP/2 is not supported",
    ),
    u(
        "http2_max_concurrent_streams",
        &["--http2-max-concurrent-streams"],
        true,
        "HTTP/2 is not supported",
    ),
    u(
        "http2_max_frame_size",
        &["--http2-max-frame-size"],
        true,
        "HTTP/2 is not supported",
    ),
    u(
        "http2_max_header_list_size",
        &["--http2-max-header-list-size"],
        true,
        "HTTP/2 is not supported",
    ),
    u("http_parser", &["--http-parser"], true, HTTP_PARSER),
    u("statsd_host", &["--statsd-host"], true, METRICS),
    u("statsd_prefix", &["--statsd-prefix"], true, METRICS),
    u("dogstatsd_tags", &["--dogstatsd-tags"], true, METRICS),
    u(
        "enable_backlog_metric",
        &["--enable-backlog-metric"],
        false,
        METRICS,
    ),
    u("syslog", &["--log-syslog"], false, LOGGING),
    u("syslog_addr", &["--log-syslog-to"], true, LOGGING),
    u("syslog_facility", &["--log-syslog-facility"], true, LOGGING),
    u("syslog_prefix", &["--log-syslog-prefix"], true, LOGGING),
    u(
        "disable_redirect_access_to_syslog",
        &["--disable-redirect-access-to-syslog"],
        false,
        LOGGING,
    ),
    u("logconfig", &["--log-config"], true, LOGGING),
    u("logconfig_json", &["--log-config-json"], true, LOGGING),
    u("logconfig_dict", &[], true, LOGGING),
    u("logger_class", &["--logger-class"], true, LOGGING),
    u("capture_output", &["--capture-output"], false, STDIO),
    u(
        "enable_stdio_inheritance",
        &["-R", "--enable-stdio-inheritance"],
        false,
        STDIO,
    ),
    u(
        "strip_header_spaces",
        &["--strip-header-spaces"],
        false,
        HTTP_PARSER,
    ),
    u(
        "permit_obsolete_folding",
        &["--permit-obsolete-folding"],
        false,
        HTTP_PARSER,
    ),
    u(
        "permit_unconventional_http_method",
        &["--permit-unconventional-http-method"],
        false,
        HTTP_PARSER,
    ),
    u(
        "permit_unconventional_http_version",
        &["--permit-unconventional-http-version"],
        false,
        HTTP_PARSER,
    ),
    u(
        "casefold_http_method",
        &["--casefold-http-method"],
        false,
        HTTP_PARSER,
    ),
    u("header_map", &["--header-map"], true, HTTP_PARSER),
    u(
        "forwarder_headers",
        &["--forwarder-headers"],
        true,
        "only X-Forwarded-Proto/-For style scheme detection from --forwarded-allow-ips is supported",
    ),
    u(
        "secure_scheme_headers",
        &[],
        true,
        "forkscope-server trusts gunicorn's default scheme headers (X-Forwarded-Proto, X-Forwarded-Protocol, X-Forwarded-Ssl) from --forwarded-allow-ips; other headers are not configurable",
    ),
    u("proxy_protocol", &["--proxy-protocol"], true, PROXY),
    u("proxy_allow_ips", &["--proxy-allow-from"], true, PROXY),
    u("protocol", &["--protocol"], true, PROXY),
    u("uwsgi_allow_ips", &["--uwsgi-allow-from"], true, PROXY),
    u(
        "root_path",
        &["--root-path"],
        true,
        "set SCRIPT_NAME through the proxy (X-Forwarded headers) or the app instead",
    ),
    u(
        "reuse_port",
        &["--reuse-port"],
        false,
        "listening sockets are bound once by the leader and shared by the workers",
    ),
    u(
        "sendfile",
        &["--no-sendfile"],
        false,
        "sendfile use is decided by the server",
    ),
    u(
        "tmp_upload_dir",
        &[],
        true,
        "request bodies are streamed, never spooled to a directory",
    ),
    u("default_proc_name", &[], true, "use proc_name (-n/--name)"),
    u("control_socket", &["--control-socket"], true, CONTROL),
    u(
        "control_socket_disable",
        &["--no-control-socket"],
        false,
        CONTROL,
    ),
    u(
        "control_socket_mode",
        &["--control-socket-mode"],
        true,
        CONTROL,
    ),
    u("dirty_apps", &["--dirty-app"], true, DIRTY),
    u("dirty_workers", &["--dirty-workers"], true, DIRTY),
    u("dirty_threads", &["--dirty-threads"], true, DIRTY),
    u("dirty_timeout", &["--dirty-timeout"], true, DIRTY),
    u(
        "dirty_graceful_timeout",
        &["--dirty-graceful-timeout"],
        true,
        DIRTY,
    ),
    u("on_dirty_starting", &[], false, DIRTY),
    u("dirty_post_fork", &[], false, DIRTY),
    u("dirty_worker_init", &[], false, DIRTY),
    u("dirty_worker_exit", &[], false, DIRTY),
];

const fn u(
    name: &'static str,
    flags: &'static [&'static str],
    takes_value: bool,
    reason: &'static str,
) -> Unsupported {
    Unsupported {
        name,
        flags,
        takes_value,
        reason,
    }
}

/// gunicorn's defaults (Python literals) of unsupported settings whose default is not falsy.
/// A config file that sets one of these to its default is accepted: the feature stays off.
const GUNICORN_DEFAULTS: &[(&str, &str)] = &[
    ("worker_connections", "1000"),
    ("suppress_ragged_eofs", "True"),
    ("syslog_addr", "'udp://localhost:514'"),
    ("syslog_facility", "'user'"),
    ("logger_class", "'gunicorn.glogging.Logger'"),
    ("reload_engine", "'auto'"),
    ("proxy_protocol", "'off'"),
    ("proxy_allow_ips", "'127.0.0.1,::1'"),
    ("uwsgi_allow_ips", "'127.0.0.1,::1'"),
    ("protocol", "'http'"),
    ("http_protocols", "'h1'"),
    ("http_parser", "'auto'"),
    ("header_map", "'drop'"),
    ("forwarder_headers", "'SCRIPT_NAME,PATH_INFO'"),
    ("asgi_loop", "'auto'"),
    ("asgi_lifespan", "'auto'"),
    ("default_proc_name", "'gunicorn'"),
    (
        "secure_scheme_headers",
        "{'X-FORWARDED-PROTOCOL': 'ssl', 'X-FORWARDED-PROTO': 'https', 'X-FORWARDED-SSL': 'on'}",
    ),
];

/// The entry for a gunicorn setting name, if forkscope refuses it.
pub fn by_name(name: &str) -> Option<&'static Unsupported> {
    UNSUPPORTED.iter().find(|entry| entry.name == name)
}

/// The entry behind a hidden clap argument id (the gunicorn name; no setting has one of these
/// names, which a test checks).
pub fn by_arg_id(id: &str) -> Option<&'static Unsupported> {
    by_name(id)
}

impl Unsupported {
    /// gunicorn's default for this setting as a Python literal, when it is not falsy.
    pub fn gunicorn_default(&self) -> Option<&'static str> {
        GUNICORN_DEFAULTS
            .iter()
            .find(|(name, _)| *name == self.name)
            .map(|(_, literal)| *literal)
    }

    /// The message for a flag given on a command line: `--daemon is a gunicorn option ...`.
    pub fn flag_error(&self, origin: &str) -> String {
        let flag = self
            .flags
            .iter()
            .find(|f| f.starts_with("--"))
            .copied()
            .unwrap_or(self.name);
        format!(
            "{flag} ({origin}) is a gunicorn option that forkscope-server does not support: {}",
            self.reason
        )
    }

    /// The message for a config-file global: `daemon in FILE is a gunicorn setting ...`.
    pub fn setting_error(&self, origin: &str) -> String {
        format!(
            "{} ({origin}) is a gunicorn setting that forkscope-server does not support: {}",
            self.name, self.reason
        )
    }
}

/// Hidden clap arguments for every unsupported flag, to add to the parsing command.
pub fn hidden_args() -> Vec<Arg> {
    UNSUPPORTED
        .iter()
        .filter(|entry| !entry.flags.is_empty())
        .map(|entry| {
            let mut arg = Arg::new(entry.name).hide(true).required(false);
            let short = entry
                .flags
                .iter()
                .filter(|flag| !flag.starts_with("--"))
                .find_map(|flag| flag.strip_prefix('-').and_then(|s| s.chars().next()));
            if let Some(short) = short {
                arg = arg.short(short);
            }
            let long_flags: Vec<&str> = entry
                .flags
                .iter()
                .filter_map(|flag| flag.strip_prefix("--"))
                .collect();
            if let Some((first, rest)) = long_flags.split_first() {
                arg = arg.long(*first).aliases(rest.iter().copied());
            }
            if entry.takes_value {
                arg.action(ArgAction::Append).num_args(1)
            } else {
                arg.action(ArgAction::SetTrue)
            }
        })
        .collect()
}
